"""crossscale: CAF mixes modalities only when on, CMF is exactly the decoders' cross-modal path, the crop ratio, InfoNCE
by hand, λ's linear scaling, every modality subset for the method and the baselines, RandomSensorDrop, DINO's EMA
teacher, exact mask ratios, encoder loading through rsrepro.io, and a falling loss under rsrepro.train.fit."""
import math

import pytest
import torch
import torch.nn.functional as F

from rsrepro.core import MODELS, atomic_torch_save, create_model, DataFormatError
from rsrepro.crossscale import (BIGEARTHNET_MODALITIES, DINOMM, CrossScaleContrastive, CrossScaleEncoder,
                                CrossScaleFusionMAE, FusMAE, MultiLabelClassifier, RandomSensorDrop, SatViTMAE,
                                SceneClassifier, Segmenter, box_patch_weights, crop_and_resize, cross_scale_info_nce,
                                load_backbone, modality_combinations)
from rsrepro.train import TrainConfig, fit

SIZE, P = 16, 4                     # a 4x4 token grid
VIT = dict(img_size=SIZE, patch_size=P, embed_dim=32, depth=2, num_heads=2)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
SUBSETS = modality_combinations(list(BIGEARTHNET_MODALITIES))     # (s1, s2), (s1,), (s2,)


def method(**kw):
    torch.manual_seed(0)
    return CrossScaleFusionMAE(**{**VIT, **DEC, **kw})


def dinomm(**kw):
    torch.manual_seed(0)
    return DINOMM(**{**VIT, 'out_dim': 64, 'hidden_dim': 32, 'bottleneck_dim': 16, 'global_crop_size': SIZE,
                     'local_crop_size': 8, 'n_local_crops': 2, **kw})


BUILDERS = {'crossscale': method, 'fusmae': lambda: (torch.manual_seed(0), FusMAE(**VIT, **DEC))[1],
            'satvit': lambda: (torch.manual_seed(0), SatViTMAE(**VIT, **DEC))[1], 'dinomm': dinomm}


def batch(B=4, seed=0, names=('s1', 's2')):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, c, SIZE, SIZE, generator=g) for n, c in BIGEARTHNET_MODALITIES.items() if n in names}


def gen(seed=0): return torch.Generator().manual_seed(seed)


# -- cross-attention fusion ---------------------------------------------------------------------------------------
def fused(enc, b):
    "The tokens the shared encoder receives: embedded, then CAF when on."
    x, _ = enc.embed(b, enc.names)
    return enc.caf(x) if enc.caf is not None else x


@pytest.mark.parametrize('caf', [True, False])
def test_caf_mixes_modalities_only_when_on(caf):
    torch.manual_seed(0)
    enc = CrossScaleEncoder(**VIT, cross_attention_fusion=caf).eval()
    b = batch(); b2 = dict(b, s1=torch.randn_like(b['s1']))
    with torch.no_grad():
        s2, s2_new = fused(enc, b)['s2'], fused(enc, b2)['s2']
    assert (s2 - s2_new).abs().max() > 1e-4 if caf else torch.equal(s2, s2_new)
    with torch.no_grad():   # and S2's own input always matters
        assert not torch.allclose(fused(enc, b)['s2'], fused(enc, dict(b, s2=torch.randn_like(b['s2'])))['s2'])


# -- cross-modality fusion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('cmf', [True, False])
def test_cmf_is_the_decoders_cross_modal_path(cmf):
    m = method(cross_modality_fusion=cmf).eval()
    b = batch()
    with torch.no_grad():
        enc = m.encoder.forward_encoder(b, m.mask_ratio, gen())
        dec = lambda tokens: m.forward_decoder('s2', tokens, enc['cls'], enc['ids_restore']['s2'], enc['grid'])
        ref = dec(enc['tokens'])
        other = dec(dict(enc['tokens'], s1=enc['tokens']['s1'] + torch.randn_like(enc['tokens']['s1'])))
        own = dec(dict(enc['tokens'], s2=enc['tokens']['s2'] + torch.randn_like(enc['tokens']['s2'])))
    assert (ref - other).abs().max() > 1e-4 if cmf else torch.equal(ref, other)
    assert (ref - own).abs().max() > 1e-4
    assert (m.cmf is not None) == cmf


# -- cross-scale contrastive --------------------------------------------------------------------------------------
def test_crop_ratio_range_and_fixed():
    boxes = CrossScaleContrastive(crop_ratio=(0.4, 0.6)).sample_boxes(2000, gen())
    r = boxes[:, 2]
    assert torch.equal(boxes[:, 2], boxes[:, 3]) and r.min() >= 0.4 and r.max() <= 0.6
    assert r.min() < 0.42 and r.max() > 0.58                            # uniform over the range, not a constant
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 1 + 1e-6).all()
    fixed = CrossScaleContrastive(crop_ratio=0.3).sample_boxes(50, gen())
    assert torch.allclose(fixed[:, 2], torch.full((50,), 0.3))
    for bad in (0.0, 1.5, (0.6, 0.4)):
        with pytest.raises(ValueError): CrossScaleContrastive(crop_ratio=bad)
    for ratio in (0.3, 0.7, (0.4, 0.6)):                                # Table 7's settings run
        m = method(crop_ratio=ratio)
        out = m(batch(), gen()); out['loss'].backward()
        assert torch.isfinite(out['loss_con'])


def test_crop_geometry():
    x = torch.randn(2, 3, SIZE, SIZE)
    full = torch.tensor([[0., 0., 1., 1.]] * 2)
    assert torch.allclose(crop_and_resize(x, full, SIZE), x, atol=1e-5)
    quarter = torch.tensor([[0., 0., .5, .5]] * 2)
    ref = F.interpolate(x[..., :8, :8], size=SIZE, mode='bilinear', align_corners=False)
    # the same as resizing the cut, except the last row/column, which samples the image beyond the box edge
    assert torch.allclose(crop_and_resize(x, quarter, SIZE)[..., :-1, :-1], ref[..., :-1, :-1], atol=1e-5)
    w = box_patch_weights(torch.tensor([[0., 0., .5, .5], [.125, .25, .5, .5]]), (4, 4))
    assert torch.equal(w[0].reshape(4, 4), torch.tensor([[1., 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.allclose(w.sum(1), torch.full((2,), 4.)) and torch.allclose(w[1].reshape(4, 4)[0, 1:3], torch.tensor([.5, .5]))


def test_info_nce_by_hand_lowest_when_views_match():
    tau = 0.5
    e = torch.eye(3)
    by_hand = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0)))   # cos = 1 with itself, 0 with others
    assert math.isclose(float(cross_scale_info_nce(e, e, tau)), by_hand, rel_tol=1e-5)
    shuffled = cross_scale_info_nce(e, e[[1, 2, 0]], tau)
    assert float(shuffled) > float(cross_scale_info_nce(e, e, tau))
    g = gen()
    a = torch.randn(8, 16, generator=g)
    assert float(cross_scale_info_nce(a, a, tau)) < float(cross_scale_info_nce(a, a + 2 * torch.randn(8, 16, generator=g), tau))


def test_lambda_scales_the_contrastive_term_linearly():
    m = method(contrastive_weight=0.5)
    outs = {}
    for lam in (0.5, 1.0, 2.0):
        m.contrastive_weight = lam
        outs[lam] = m(batch(), gen(3))
    con = outs[0.5]['loss_con']
    assert float(con.detach()) > 0
    for lam, out in outs.items():
        assert torch.allclose(out['loss_con'], con)
        assert torch.allclose(out['loss'] - out['loss_rec'], lam * con, atol=1e-6)
    m.contrastive_weight = 0.
    out = m(batch(), gen(3))
    assert torch.equal(out['loss'], out['loss_rec']) and float(out['loss_con']) == 0


# -- every modality subset, method and baselines, pre-training and downstream ---------------------------------------
@pytest.mark.parametrize('name', list(BUILDERS))
@pytest.mark.parametrize('subset', SUBSETS, ids=['+'.join(s) for s in SUBSETS])
def test_every_subset_pretrains_and_classifies(name, subset):
    model = BUILDERS[name]().train()
    b = batch(names=subset)
    out = model(b)
    assert out['loss'].ndim == 0 and torch.isfinite(out['loss'])
    out['loss'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    backbone, report = load_backbone(model)
    assert not report.missing
    clf = MultiLabelClassifier(backbone, num_classes=19)
    label = (torch.rand(4, 19, generator=gen()) < .3).float()
    o = clf(dict(b, label=label))
    assert o['logits'].shape == (4, 19)
    o['loss'].backward()
    assert torch.isclose(o['loss'], F.binary_cross_entropy_with_logits(o['logits'], label))
    assert backbone.forward_feature_map(b).shape == (4, 32, SIZE // P, SIZE // P)


def test_scene_classifier_and_segmenter():
    backbone, _ = load_backbone(method())
    b = batch()
    o = SceneClassifier(backbone, num_classes=10)(dict(b, label=torch.tensor([0, 3, 9, 1])))
    o['loss'].backward()
    assert o['logits'].shape == (4, 10)
    mask = torch.randint(0, 5, (4, SIZE, SIZE)); mask[:, :4] = 255
    seg = Segmenter(backbone, num_classes=5, channels=16)
    o = seg(dict(b, mask=mask))
    assert o['logits'].shape == (4, 5, SIZE, SIZE)
    o['loss'].backward()
    keep = mask != 255
    ref = F.cross_entropy(o['logits'].permute(0, 2, 3, 1)[keep], mask[keep])
    assert torch.isclose(o['loss'], ref, atol=1e-5)
    frozen = MultiLabelClassifier(load_backbone(method())[0], freeze_backbone=True)
    frozen(dict(b, label=torch.zeros(4, 19)))['loss'].backward()
    assert all(p.grad is None for p in frozen.backbone.parameters()) and frozen.head.weight.grad is not None


# -- DINO-MM ----------------------------------------------------------------------------------------------------------
def test_random_sensor_drop_zeroes_exactly_one_sensor():
    b = {n: torch.rand(4000, c, 2, 2) + 1 for n, c in BIGEARTHNET_MODALITIES.items()}
    out, dropped = RandomSensorDrop(0.5)(b, gen())
    zero = {n: (out[n] == 0).flatten(1).all(1) for n in out}
    untouched = {n: torch.equal(out[n][~zero[n]], b[n][~zero[n]]) for n in out}
    assert all(untouched.values())
    assert not (zero['s1'] & zero['s2']).any()                           # never both
    assert torch.equal(zero['s1'] | zero['s2'], dropped >= 0)             # exactly one where drawn
    assert abs(float((dropped >= 0).float().mean()) - 0.5) < 0.03         # with probability p
    assert abs(float(zero['s1'].float().mean()) - 0.25) < 0.03            # each sensor equally often
    assert (RandomSensorDrop(0.0)(b, gen())[1] == -1).all()
    alone, d = RandomSensorDrop(1.0)({'s2': b['s2']}, gen())
    assert torch.equal(alone['s2'], b['s2']) and (d == -1).all()          # the only sensor is never dropped
    assert abs(float((RandomSensorDrop(0.2)(b, gen())[1] >= 0).float().mean()) - 0.2) < 0.03


def test_dino_teacher_has_no_gradient_and_follows_the_ema():
    m = dinomm(momentum_teacher=0.9).train()
    assert all(not p.requires_grad for p in m.teacher_params())
    b = batch()
    m(b, gen())['loss'].backward()
    assert all(p.grad is None for p in m.teacher_params())
    assert any(p.grad is not None for p in m.student_params())
    opt = torch.optim.SGD([p for p in m.student_params() if p.requires_grad], lr=1.0)
    opt.step(); opt.zero_grad()
    before = [p.clone() for p in m.teacher_params()]
    student = [p.clone() for p in m.student_params()]
    assert any(not torch.equal(t, s) for t, s in zip(before, student))
    m(b, gen())                                                           # the EMA runs at the start of the forward
    for t0, s, t in zip(before, student, m.teacher_params()):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * s, atol=1e-6)
    centre = m.center.clone(); m.eval(); m(b, gen())
    assert torch.equal(m.center, centre)                                  # eval: no EMA, no centre update
    m2 = dinomm(total_steps=10)
    assert m2.teacher_momentum() == pytest.approx(0.996)
    m2.ema_steps.fill_(10); assert m2.teacher_momentum() == pytest.approx(1.0)


def test_dino_multicrop_views():
    m = dinomm(n_local_crops=3)
    views = m.views(batch(), gen())
    assert len(views) == 5
    assert [tuple(v['s2'].shape[-2:]) for v in views] == [(SIZE, SIZE)] * 2 + [(8, 8)] * 3


# -- masks -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['crossscale', 'fusmae', 'satvit'])
@pytest.mark.parametrize('ratio', [0.75, 0.5, 0.6])
def test_masks_hit_their_ratio_exactly(name, ratio):
    model = BUILDERS[name]()
    (model.mae if name == 'satvit' else model).mask_ratio = ratio
    out = model(batch(B=5))
    L = (SIZE // P) ** 2
    masks = [out['mask']] if name == 'satvit' else [out['mask_s1'], out['mask_s2']]
    for mk in masks:
        assert mk.shape == (5, L) and (mk.sum(1) == L - int(L * (1 - ratio) + 1e-9)).all()


# -- registry and weights ------------------------------------------------------------------------------------------------
def test_registered_names():
    names = set(MODELS.names())
    want = {'crossscale_vit_tiny', 'crossscale_vit_small', 'crossscale_vit_small_wo_caf', 'crossscale_vit_small_wo_cmf',
            'crossscale_vit_small_wo_contrastive', 'cross_attention_fusion', 'cross_modality_fusion',
            'cross_scale_contrastive', 'dinomm_vit_tiny', 'dinomm_vit_small', 'satvit_vit_tiny', 'satvit_vit_small',
            'fusmae_vit_tiny', 'fusmae_vit_small'}
    assert want <= names
    small = dict(img_size=SIZE, patch_size=P, depth=1)
    m = create_model('crossscale_vit_tiny', **small)
    assert isinstance(m, CrossScaleFusionMAE) and m.encoder.embed_dim == 192 and m.contrastive_weight == 0.5
    assert m.contrastive.crop_ratio == (0.4, 0.6)
    assert create_model('crossscale_vit_small_wo_caf', **small).encoder.caf is None
    assert create_model('crossscale_vit_small_wo_cmf', **small).cmf is None
    assert create_model('crossscale_vit_small_wo_contrastive', **small).contrastive is None
    caf = create_model('cross_attention_fusion', modalities=['a', 'b'], embed_dim=8, num_heads=2)
    assert set(caf(dict(a=torch.randn(1, 3, 8), b=torch.randn(1, 5, 8)))) == {'a', 'b'}


def test_encoder_weights_through_load_weights(tmp_path):
    m = method()
    path = atomic_torch_save({'model': m.state_dict()}, tmp_path/'checkpoint.pt')
    backbone, report = load_backbone(method(cross_scale_contrastive=False), path)   # another init, same encoder config
    assert not report.missing
    for k, v in backbone.state_dict().items(): assert torch.equal(v, m.state_dict()[f'encoder.{k}'])
    with pytest.raises(DataFormatError):
        load_backbone(CrossScaleFusionMAE(**{**VIT, 'embed_dim': 48}, **DEC), path)
    sat = BUILDERS['satvit']()
    bb, rep = load_backbone(sat)
    assert torch.equal(bb.vit.blocks[0].attn.qkv.weight, sat.mae.blocks[0].attn.qkv.weight) and not rep.unused


# -- learning ------------------------------------------------------------------------------------------------------------
def structured(n=8, seed=0):
    "Smooth random waves; S2 bands are mixtures of the S1 waves plus their own, so the modalities share structure."
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing='ij')
    out = []
    for _ in range(n):
        f, ph = torch.rand(4, generator=g) * 3 + 1, torch.rand(4, generator=g) * 6.3
        waves = torch.stack([torch.sin(2 * math.pi * f[i] * (xx if i % 2 else yy) + ph[i]) for i in range(4)])
        s1 = waves[:2]
        s2 = torch.einsum('kc,chw->khw', torch.rand(12, 4, generator=g), waves)
        out.append({'s1': s1.float(), 's2': s2.float()})
    return out


def test_loss_falls_with_fit():
    m = method()
    res = fit(m, structured(), TrainConfig(max_steps=30, batch_size=8, lr=2e-3, warmup_steps=3, device='cpu',
                                           log_every=1, weight_decay=0.0, progress=False))
    losses = [r['loss'] for r in res['history']]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
