"MutDet's UP-DETR and AlignDet baselines on ARS-DETR: losses, gradients, the group mask, the views, the momentum network, learning."
import math

import pytest
import torch
import torch.nn.functional as F

from rsrepro.ars_detr import ARSDETR as _ARSDETR, AngleCoder
from rsrepro.core import MODELS
from rsrepro.mutdet_baselines import (ASSUMPTIONS, AlignDet, UPDETR, box_queries, crop_boxes, group_attention_mask,
                                      two_views)

SMALL = dict(num_classes=8, dim=64, num_heads=4, enc_layers=1, dec_layers=1, ffn=128, num_queries=20, backbone='resnet18')
CODER = AngleCoder()    # one AR-CSL coder for every test: its window cache is filled once


def ARSDETR(**kw):
    return _ARSDETR(coder=CODER, **kw)


def _batch(n_obj=(3, 2), dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tg = [{'labels': torch.randint(0, 8, (n,), generator=g), 'boxes': torch.rand(n, 4, generator=g) * 0.4 + 0.2,
           'angles': torch.rand(n, generator=g) * 2 - 1, 'embeddings': F.normalize(torch.randn(n, dim, generator=g), dim=-1)}
          for n in n_obj]
    return {'image': torch.randn(len(n_obj), 3, 96, 96, generator=g), 'targets': tg}


def _finite(losses):
    return all(torch.isfinite(v) for v in losses.values())


def test_registered_and_assumptions():
    assert MODELS.get('updetr') is UPDETR and MODELS.get('aligndet') is AlignDet
    assert {'UP-DETR grouping', 'UP-DETR matching', 'AlignDet views', 'AlignDet contrast', 'AlignDet momentum'} <= set(ASSUMPTIONS)


def test_updetr_losses_and_gradients():
    "Finite losses with every term; gradient reaches the decoder and the patch projection, never the backbone; the hook is gone."
    torch.manual_seed(0)
    m = UPDETR(ARSDETR(**SMALL))
    L = m(_batch())
    assert _finite(L) and {'cls', 'l1', 'giou', 'angle', 'feature', 'loss'} <= set(L)
    L['loss'].backward()
    assert all(p.grad is None for p in m.detector.backbone.parameters())
    assert m.detector.decoder[0].cross.sampling_offsets.weight.grad.abs().sum() > 0
    assert m.patch2query.weight.grad.abs().sum() > 0 and m.feature_align.layers[0].weight.grad.abs().sum() > 0
    assert not m.detector.decoder[0]._forward_pre_hooks
    # the variants: per-group matching, denoising queries on the patches
    L = UPDETR(ARSDETR(**SMALL), group_matching=True, denoising=True)(_batch())
    assert _finite(L) and {'dn_cls', 'dn_l1', 'dn_giou', 'dn_angle'} <= set(L)


def test_updetr_rejects_wrong_embedding_width():
    with pytest.raises(ValueError, match='32-d'):
        UPDETR(ARSDETR(**SMALL), embed_dim=32)(_batch())


@pytest.mark.parametrize('masked', [True, False])
def test_updetr_group_mask_blocks_cross_group_attention(masked):
    "Eval, no dropout: a new feature for patch 1 changes group 1's outputs; group 0's stay unchanged only under the mask."
    torch.manual_seed(0)
    m = UPDETR(ARSDETR(dropout=0.0, **SMALL), group_mask=masked).eval()
    bt = _batch()
    other = {'image': bt['image'], 'targets': [dict(t) for t in bt['targets']]}
    e = bt['targets'][0]['embeddings'].clone(); e[1] = -e[1]
    other['targets'][0]['embeddings'] = e
    with torch.no_grad(): (o1, _, g), (o2, _, _) = m.decode(bt), m.decode(other)
    h1, h2 = o1['hidden'][-1][0], o2['hidden'][-1][0]
    assert not torch.allclose(h1[g == 1], h2[g == 1])
    assert torch.allclose(h1[g == 0], h2[g == 0], atol=1e-6) == masked
    assert torch.equal(o1['hidden'][-1][1], o2['hidden'][-1][1])        # another image: untouched


def test_group_attention_mask_structure():
    g = torch.arange(6) % 3
    m = group_attention_mask(g)
    assert torch.equal(~m, g[:, None] == g[None, :])
    base = torch.zeros(8, 8, dtype=torch.bool); base[2:, :2] = True
    m = group_attention_mask(g, pad=2, base=base)
    assert torch.equal(m[2:, :2], base[2:, :2]) and not m[:2].any() and torch.equal(~m[2:, 2:], g[:, None] == g[None, :])


def test_updetr_group_matching_pairs_each_group_with_its_patch():
    torch.manual_seed(0)
    m = UPDETR(ARSDETR(**SMALL), group_matching=True).eval()
    with torch.no_grad(): out, patches, groups = m.decode(_batch())
    pairs = m.match(out['logits'][-1], out['boxes'][-1], out['angle_out'][-1], patches, groups)
    for (q, j), p in zip(pairs, patches):
        assert len(q) == len(p['boxes']) and torch.equal(groups[q], j)


def _bar_image(cx, cy, length, width, theta, size=96):
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
    u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
    return ((u.abs() < length / 2) & (v.abs() < width / 2)).float()


def test_views_move_boxes_with_their_pixels():
    "A rotated bar: its centre and orientation (second moments) in each view are the box's in that view, flips included."
    size, theta = 96, 0.5
    img = _bar_image(44, 50, 40, 8, theta, size)[None, None].expand(1, 3, -1, -1).contiguous()
    tg = [{'labels': torch.zeros(1, dtype=torch.long), 'boxes': torch.tensor([[44 / size, 50 / size, 40 / size, 8 / size]]),
           'angles': torch.tensor([theta])}]
    flipped = seen = 0
    for seed in range(6):
        for x, t in two_views(img, tg, (0.7, 1.0), 0.5, 0., torch.Generator().manual_seed(seed)):
            if not len(t[0]['boxes']): continue
            w = x[0, 0].clamp_min(0); yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing='ij')
            mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
            assert torch.allclose(torch.stack([mx, my]), t[0]['boxes'][0, :2] * size, atol=1.0)
            mu20, mu02, mu11 = (w * (xx - mx) ** 2).sum(), (w * (yy - my) ** 2).sum(), (w * (xx - mx) * (yy - my)).sum()
            phi = 0.5 * math.atan2(2 * mu11, mu20 - mu02)
            d = (phi - float(t[0]['angles'][0]) + math.pi / 2) % math.pi - math.pi / 2
            assert abs(d) < 0.05, (phi, t[0]['angles'])
            assert -math.pi / 2 <= float(t[0]['angles'][0]) < math.pi / 2
            seen += 1; flipped += abs(float(t[0]['angles'][0]) - theta) > 0.1
    assert seen >= 8 and flipped >= 1


def test_crop_boxes_by_hand():
    b, a = crop_boxes(torch.tensor([[0.5, 0.5, 0.2, 0.1]]), torch.tensor([0.3]), torch.tensor([0.25, 0.0, 0.5]), flip=True)
    assert torch.allclose(b, torch.tensor([[0.5, 1.0, 0.4, 0.2]])) and torch.allclose(a, torch.tensor([-0.3]))


def test_two_views_keep_the_same_objects_in_order():
    bt = _batch((6, 4), seed=3)
    for t in bt['targets']: t['boxes'][:, :2] = torch.rand(len(t['boxes']), 2, generator=torch.Generator().manual_seed(1)) * 0.96 + 0.02
    (x1, t1), (x2, t2) = two_views(bt['image'], bt['targets'], (0.4, 0.6), generator=torch.Generator().manual_seed(0))
    assert x1.shape == x2.shape == bt['image'].shape and not torch.allclose(x1, x2)
    for a, b, t in zip(t1, t2, bt['targets']):
        assert torch.equal(a['embeddings'], b['embeddings']) and torch.equal(a['labels'], b['labels'])
        rows = [int((t['embeddings'] == e).all(1).nonzero()) for e in a['embeddings']]
        assert rows == sorted(rows)                                         # a subset, in the original order
        for v in (a, b): assert ((v['boxes'][:, :2] > 0) & (v['boxes'][:, :2] < 1)).all()
    assert sum(len(a['boxes']) for a in t1) < 10                            # crops of 40-60 % lose objects


def test_box_queries_reference_the_boxes():
    tg = [{'boxes': torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.6, 0.1, 0.1]]), 'angles': torch.tensor([0.1, -0.2])},
          {'boxes': torch.zeros(0, 4), 'angles': torch.zeros(0)}]
    dn = box_queries(tg, torch.ones(8), num_queries=5)
    assert dn['pad_size'] == 2 and dn['label_query'].shape == (2, 2, 8)
    assert torch.allclose(dn['box_unact'][0].sigmoid(), tg[0]['boxes']) and torch.equal(dn['angles'][0], tg[0]['angles'])
    assert dn['attn_mask'][2:, :2].all() and not dn['attn_mask'][:2].any() and not dn['attn_mask'][2:, 2:].any()
    assert box_queries([tg[1]], torch.ones(8), 5) is None


def test_aligndet_losses_and_gradients():
    torch.manual_seed(0)
    m = AlignDet(ARSDETR(**SMALL))
    L = m(_batch(), generator=torch.Generator().manual_seed(0))
    assert _finite(L) and {'cls', 'l1', 'giou', 'angle', 'dn_cls', 'contrastive', 'loss'} <= set(L) and L['contrastive'] > 0
    L['loss'].backward()
    assert all(p.grad is None for p in m.detector.backbone.parameters()) and all(p.grad is None for p in m.target_params())
    assert m.detector.decoder[0].cross.sampling_offsets.weight.grad.abs().sum() > 0
    assert m.box_query.weight.grad.abs().sum() > 0 and m.projector[0].weight.grad.abs().sum() > 0
    assert int(m.ema_steps) == 1
    keys = m.state_dict()                                   # fine-tuning loads detector.*: exactly the online detector
    assert {k.removeprefix('detector.') for k in keys if k.startswith('detector.')} == set(m.detector.state_dict())


def test_aligndet_momentum_network():
    "One EMA step moves each trainable tensor by 1 - m, copies query_embed, leaves the frozen backbone; the cosine schedule."
    torch.manual_seed(0)
    m = AlignDet(ARSDETR(**SMALL), total_steps=10)
    with torch.no_grad():
        for p in m.detector.parameters(): p.add_(1.)
        for p in m.projector.parameters(): p.add_(1.)
    before = m.target_detector.enc_output.weight.clone(), m.target_projector[0].weight.clone()
    assert m.momentum() == pytest.approx(0.996)
    assert m.update_target(0.9) == 0.9
    assert torch.allclose(m.target_detector.enc_output.weight, 0.9 * before[0] + 0.1 * m.detector.enc_output.weight, atol=1e-6)
    assert torch.allclose(m.target_projector[0].weight, 0.9 * before[1] + 0.1 * m.projector[0].weight, atol=1e-6)
    assert torch.equal(m.target_detector.query_embed.weight, m.detector.query_embed.weight)
    assert torch.allclose(m.target_detector.backbone.conv1.weight + 1, m.detector.backbone.conv1.weight)
    m.ema_steps.fill_(5); assert m.momentum() == pytest.approx(0.998)
    m.ema_steps.fill_(50); assert m.momentum() == pytest.approx(1.0)


def test_aligndet_contrast_is_lower_for_matching_boxes():
    "Identical views: the contrast of box j with box j is lower than with the second view's boxes reversed."
    torch.manual_seed(0)
    m = AlignDet(ARSDETR(**SMALL), crop_scale=(1., 1.), flip_p=0., jitter=0.).eval()
    bt = _batch((3, 3))
    with torch.no_grad():
        v1, (x2, t2) = m.views(bt)
        assert torch.allclose(v1[0], x2) and all(torch.equal(a['boxes'], b['boxes']) for a, b in zip(v1[1], t2))
        same = m.losses(v1, (x2, t2))['contrastive']
        rev = m.losses(v1, (x2, [{**t, 'boxes': t['boxes'].flip(0), 'angles': t['angles'].flip(0)} for t in t2]))['contrastive']
    assert same < rev


def _train(model, batch, steps, seeded_views=False, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = last = None
    for _ in range(steps):
        L = model(batch, generator=torch.Generator().manual_seed(1)) if seeded_views else model(batch)
        opt.zero_grad(); L['loss'].backward(); opt.step()
        last = {k: float(v.detach()) for k, v in L.items()}; first = first or last
    return first, last


def test_updetr_learns_a_fixed_batch():
    "Eval mode (fixed patches, no dropout): a few AdamW steps lower every UP-DETR term."
    torch.manual_seed(0)
    first, last = _train(UPDETR(ARSDETR(**SMALL)).eval(), _batch(), 6, lr=2e-3)
    for k in ('cls', 'l1', 'giou', 'angle', 'feature', 'loss'): assert last[k] < first[k], (k, first[k], last[k])


def test_aligndet_learns_a_fixed_batch():
    "Eval mode, the same views every step: a few AdamW steps lower every term (the box queries' L1 / GIoU start at 0)."
    torch.manual_seed(0)
    first, last = _train(AlignDet(ARSDETR(**SMALL)).eval(), _batch(), 6, seeded_views=True, lr=2e-3)
    assert first['dn_l1'] < 1e-6 and first['dn_giou'] < 1e-6
    for k in ('cls', 'l1', 'giou', 'angle', 'dn_cls', 'dn_angle', 'contrastive', 'loss'):
        assert last[k] < first[k], (k, first[k], last[k])
