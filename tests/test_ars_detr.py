"""ARS-DETR's oriented-box pieces (`rsrepro.ars_detr`): the le90/le135 conventions, the AR-CSL label against exact
rotated IoUs, the rotated sampling locations, and the Hungarian matching."""
import itertools
import math

import numpy as np
import pytest
import shapely
import torch

from rsrepro.ars_detr import (AngleCoder, angle_bce_cost, aspect_ratio, hungarian_match, norm_rbox, poly_to_rbox,
                              rbox_to_poly, rotated_sampling_locations, rotation_iou)


def _shapely_rotation_iou(r, deg):
    box = shapely.box(-r, -1, r, 1)
    rot = shapely.affinity.rotate(box, deg, origin=(0, 0))
    i = box.intersection(rot).area
    return i / (box.area + rot.area - i)


@pytest.mark.parametrize('r', [1.0, 1.3, 2.0, 4.5, 12.0])
def test_arcsl_label_is_the_rotated_iou(r):
    import shapely.affinity  # noqa: F401
    degs = [0, 1, 5, 17, 30, 44, 45, 46, 60, 89, 90]
    got = rotation_iou([r], degs)[0].numpy()
    ref = np.array([_shapely_rotation_iou(r, d) for d in degs])
    assert np.abs(got - ref).max() < 1e-9
    lab = AngleCoder().encode(torch.tensor([math.radians(-89.5)]), torch.tensor([r]))[0].double()
    # the true bin is 0; the label wraps around: bin 179 is 1 degree away on the other side
    assert lab[0] == 1 and torch.isclose(lab[1], lab[179]) and torch.isclose(lab[1], torch.tensor(ref[1], dtype=torch.float64), atol=1e-6)


def test_arcsl_is_narrower_for_long_boxes_and_normalize():
    c = AngleCoder()
    lab = c.encode(torch.zeros(3), torch.tensor([1.0, 2.0, 8.0]))
    width = (lab > 0.5).sum(1)
    assert width[0] > width[1] > width[2]
    n = AngleCoder(normalize=True).encode(torch.zeros(2), torch.tensor([2.0, 8.0]))
    assert torch.allclose(n.min(1).values, torch.zeros(2)) and torch.allclose(n.max(1).values, torch.ones(2))
    with pytest.raises(ValueError, match='aspect ratios'):
        c.encode(torch.zeros(2))
    with pytest.raises(ValueError, match='no bins'):
        AngleCoder(None).encode(torch.zeros(2))


def test_decode_inverts_encode_to_half_a_bin():
    c = AngleCoder()
    a = torch.linspace(-math.pi / 2, math.pi / 2 - 1e-4, 400)
    back = c.decode(c.encode(a, torch.full((400,), 3.0)))
    err = torch.remainder(back - a + math.pi / 2, math.pi) - math.pi / 2
    assert err.abs().max() <= math.radians(0.5) + 1e-6


@pytest.mark.parametrize('version, lo', [('le90', -math.pi / 2), ('le135', -math.pi / 4)])
def test_angle_wrap_and_swap_at_the_boundaries(version, lo):
    eps = 1e-3
    for t in (lo - eps, lo, lo + eps, lo + math.pi - eps, lo + math.pi, lo + math.pi / 2):
        n = norm_rbox(torch.tensor([[0., 0., 8., 4., t]], dtype=torch.float64), version)[0]
        assert lo <= n[4] < lo + math.pi and n[2] == 8 and n[3] == 4
        assert math.isclose((n[4].item() - t) % math.pi, 0, abs_tol=1e-9) or math.isclose((n[4].item() - t) % math.pi, math.pi, abs_tol=1e-9)
        # the same rectangle given with w < h: swapped, turned by pi/2, same result
        m = norm_rbox(torch.tensor([[0., 0., 4., 8., t - math.pi / 2]], dtype=torch.float64), version)[0]
        assert torch.allclose(n, m, atol=1e-9)
    # at +-pi/4 the le135 range starts: -pi/4 stays, just below it jumps to just below 3pi/4
    assert math.isclose(norm_rbox(torch.tensor([[0, 0, 8., 4, -math.pi / 4]], dtype=torch.float64), 'le135')[0, 4].item(), -math.pi / 4)
    assert norm_rbox(torch.tensor([[0, 0, 8., 4, -math.pi / 4 - eps]], dtype=torch.float64), 'le135')[0, 4] > 3 * math.pi / 4 - 2 * eps


def test_polygons_round_trip_through_rotated_boxes():
    rng = np.random.default_rng(0)
    b = torch.tensor(np.c_[rng.uniform(50, 500, (64, 2)), rng.uniform(10, 80, (64, 2)), rng.uniform(-4, 4, 64)], dtype=torch.float64)
    b = b[aspect_ratio(b[:, 2], b[:, 3]) > 1.05]       # a square's angle is only defined modulo pi/2
    back = poly_to_rbox(rbox_to_poly(b))
    n = norm_rbox(b)
    assert torch.allclose(back[:, :4], n[:, :4], atol=2e-3)
    d = torch.remainder(back[:, 4] - n[:, 4] + math.pi / 2, math.pi) - math.pi / 2
    assert d.abs().max() < 1e-4
    assert poly_to_rbox(np.zeros((0, 8))).shape == (0, 5)


def test_rotated_sampling_locations_lie_on_the_box():
    torch.manual_seed(0)
    B, Q, H, L, P = 2, 5, 3, 2, 4
    ref = torch.rand(B, Q, L, 4) * 0.5 + 0.2
    ang = (torch.rand(B, Q) - 0.5) * math.pi
    off = torch.zeros(B, Q, H, L, P, 2); off[..., 0] = P          # offset P along the width axis: half the width
    loc = rotated_sampling_locations(ref, ang, off)
    assert loc.shape == (B, Q, H, L, P, 2)
    d = loc - ref[:, :, None, :, None, :2]
    assert torch.allclose(d.norm(dim=-1), (ref[:, :, None, :, None, 2] * 0.5).expand_as(d[..., 0]), atol=1e-6)
    direction = torch.atan2(d[..., 1], d[..., 0])
    assert torch.allclose(direction, ang[:, :, None, None, None].expand_as(direction), atol=1e-5)


def test_hungarian_match_is_the_minimum_cost_assignment():
    torch.manual_seed(1)
    Q, G, C = 5, 3, 4
    cls = torch.randn(Q, C); boxes = torch.rand(Q, 4) * 0.5 + 0.1
    gl = torch.randint(0, C, (G,)); gb = torch.rand(G, 4) * 0.5 + 0.1; ga = (torch.rand(G) - 0.5) * math.pi
    coder = AngleCoder(); al = torch.randn(Q, coder.num_bins)
    q, g = hungarian_match(cls, boxes, al, gl, gb, ga, coder)
    assert len(q) == G and len(set(q.tolist())) == G
    # recompute the cost matrix independently and brute-force the assignment
    from torchvision.ops import generalized_box_iou
    xyxy = lambda b: torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)
    p = cls.sigmoid()
    foc = (0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log())[:, gl]
    r = aspect_ratio(gb[:, 2], gb[:, 3])
    t = coder.encode(ga, r).float()
    bce = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(al[i:i + 1].expand(G, -1), t, reduction='none').mean(1)
                       for i in range(Q)])
    cost = 2 * foc + 2 * torch.cdist(boxes, gb, p=1) - 5 * generalized_box_iou(xyxy(boxes), xyxy(gb)) + 2 * bce * (2 * r / (r + 1))[None]
    best = min(itertools.permutations(range(Q), G), key=lambda qs: sum(cost[qq, j].item() for j, qq in enumerate(qs)))
    assert dict(zip(g.tolist(), q.tolist())) == dict(enumerate(best))
    assert torch.allclose(angle_bce_cost(al, t), bce, atol=1e-5)
    e = hungarian_match(cls, boxes, al, gl[:0], gb[:0], ga[:0], coder)
    assert len(e[0]) == len(e[1]) == 0


@pytest.mark.parametrize('coords', [2, 4])
def test_deformable_attention_matches_hf_deformable_detr_without_rotation(coords):
    "Points (encoder) and unrotated boxes: the same numbers as HF transformers' Deformable DETR attention with the same weights."
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention
    from rsrepro.ars_detr import RotatedDeformableAttention
    torch.manual_seed(2)
    ours = RotatedDeformableAttention(dim=64, num_heads=4, num_levels=2, num_points=3)
    with torch.no_grad():
        for m in (ours.sampling_offsets, ours.attention_weights):
            m.weight.normal_(0, 0.05); m.bias.normal_(0, 0.5)
    hf = DeformableDetrMultiscaleDeformableAttention(DeformableDetrConfig(d_model=64, num_feature_levels=2), num_heads=4, n_points=3)
    hf.load_state_dict({k: v for k, v in ours.state_dict().items()})
    shapes = [(6, 7), (3, 4)]
    val, q = torch.randn(2, 54, 64), torch.randn(2, 9, 64)
    ref = torch.rand(2, 9, 2, coords) * 0.5 + 0.25
    st = torch.tensor(shapes)
    want = hf(q, encoder_hidden_states=val, reference_points=ref, spatial_shapes=st, spatial_shapes_list=shapes,
              level_start_index=torch.tensor([0, 42]))[0]
    assert torch.allclose(ours(q, val, ref, shapes), want, atol=1e-5)
    if coords == 4:     # a zero angle is the unrotated case; a non-zero one is not
        assert torch.allclose(ours(q, val, ref, shapes, torch.zeros(2, 9)), want, atol=1e-5)
        assert not torch.allclose(ours(q, val, ref, shapes, torch.full((2, 9), 0.5)), want, atol=1e-3)


DOTA = __import__('pathlib').Path(__file__).resolve().parents[2]/'shared'/'data'/'DOTA'


@pytest.mark.skipif(not (DOTA/'images').is_dir(), reason='the real DOTA samples are absent')
def test_ars_detr_loss_falls_on_a_real_dota_tile():
    "A small ARS-DETR (ResNet-18, 2+2 layers, denoising on) on one real 256-px DOTA tile: 40 AdamW steps cut the loss by a third."
    from rsrepro.ars_detr import ARSCriterion, ARSDETR
    from rsrepro.io import read_image
    from rsrepro.rotated import read_dota_gt, split_image
    torch.manual_seed(0)
    g = read_dota_gt(DOTA/'labelTxt')['P1888']
    img = read_image(DOTA/'images'/'P1888.png')[..., :3]
    name, tile, o = next(t for t in split_image(img, g, 'P1888', size=256, gap=0) if (t[2]['difficult'] != 2).sum() >= 8)
    keep = o['difficult'] != 2
    rb = poly_to_rbox(o['polygons'][keep].reshape(-1, 8)).float()
    target = [{'labels': torch.as_tensor(o['label'][keep]), 'boxes': rb[:, :4] / 256, 'angles': rb[:, 4]}]
    x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)[None].float() / 255 - 0.45
    model = ARSDETR(num_classes=15, dim=64, num_heads=4, enc_layers=2, dec_layers=2, ffn=128, num_queries=50,
                    backbone='resnet18', dropout=0.0)
    crit = ARSCriterion(15, model.coder)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    for _ in range(40):
        loss = crit(model(x, target), target)['loss']      # with denoising queries, as in training
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.67 * losses[0], losses[::5]


def test_table_9_variants_are_switches_of_one_model():
    "Rotated D-DETR (angle regression), CSL D-DETR (Gaussian window), AR-CSL D-DETR: the same model, other coders."
    from rsrepro.ars_detr import ARSCriterion, ARSDETR
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    tg = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[.5, .5, .3, .1]]), 'angles': torch.tensor([0.4])}]
    for coder, n in ((AngleCoder(None), 1), (AngleCoder('gaussian'), 180), (AngleCoder(), 180)):
        m = ARSDETR(num_classes=3, coder=coder, dim=32, num_heads=2, enc_layers=1, dec_layers=1, ffn=64, num_queries=10,
                    backbone='resnet18')
        out = m(x)
        assert out['angle_out'].shape[-1] == n and out['angles'].shape == (1, 10)
        L = ARSCriterion(3, coder)(out, tg)
        assert torch.isfinite(L['loss']) and L['angle'] > 0


def test_attention_reference_quarter_turn_by_hand():
    "A reference at 1.2 rad is the same rectangle at 1.2 - π/2 with w, h swapped; one within ±π/4 is untouched."
    from rsrepro.ars_detr import attention_reference
    b, a = attention_reference(torch.tensor([[.5, .4, .3, .1], [.2, .2, .1, .2]]), torch.tensor([1.2, 0.5]))
    assert torch.allclose(b, torch.tensor([[.5, .4, .1, .3], [.2, .2, .1, .2]]))
    assert torch.allclose(a, torch.tensor([1.2 - math.pi / 2, 0.5]))
    b, a = attention_reference(torch.tensor([[.5, .5, .3, .1]]), torch.tensor([-1.5]))
    assert torch.allclose(a, torch.tensor([-1.5 + math.pi / 2])) and torch.allclose(b, torch.tensor([[.5, .5, .1, .3]]))


def test_denoising_noise_scales_groups_and_pairs():
    "Positive copies move corners by at most 0.4 of the half-size, negatives by 0.4 to 0.8; angles by at most 2 % (4 %);"
    " about a quarter of labels flip; the positive pairs sit at g·2G + i."
    from torchvision.ops import box_convert
    from rsrepro.ars_detr import denoising_pairs, denoising_queries
    torch.manual_seed(0)
    n = 5
    boxes = torch.tensor([[.5, .5, .2, .1]]).repeat(n, 1); ang = torch.full((n,), 1.0)
    tg = [{'labels': torch.arange(n) % 3, 'boxes': boxes, 'angles': ang}]
    emb = torch.nn.Embedding(3, 4)
    d = denoising_queries(tg, 3, emb, num_queries=7, num_dn=100, label_noise=0.5)
    G, groups = d['group_size'], d['num_groups']
    assert (G, groups, d['pad_size']) == (5, 20, 200)
    slot = torch.arange(d['pad_size']); neg = (slot // G) % 2 == 1
    xyxy = box_convert(d['box_unact'][0].sigmoid(), 'cxcywh', 'xyxy')
    shift = (xyxy - box_convert(boxes[:1], 'cxcywh', 'xyxy')).abs() / torch.tensor([.1, .05, .1, .05])
    assert shift[~neg].max() <= 0.4 + 1e-3 and shift[neg].min() >= 0.4 - 1e-3 and shift[neg].max() <= 0.8 + 1e-3
    da = (d['angles'][0] - 1.0).abs()
    assert da[~neg].max() <= 0.02 + 1e-6 and da[neg].min() >= 0.02 - 1e-6 and da[neg].max() <= 0.04 + 1e-6
    # label flips: compare the content to each slot's true label embedding
    true = (tg[0]['labels']).repeat(2 * groups)
    flipped = (d['label_query'][0] != emb(true)).any(-1).float().mean()
    assert 0.1 < flipped < 0.3                                   # p = 0.25, of which 2/3 land on another class
    (q, g), = denoising_pairs(d, tg)
    assert torch.equal(q[:n], torch.arange(n)) and torch.equal(q[n:2 * n], 2 * G + torch.arange(n)) and torch.equal(g[:2 * n], torch.arange(n).repeat(2))


def test_denoising_queries_do_not_leak_into_matching_queries():
    "Without dropout, the matching queries' outputs are the same with and without denoising queries (the mask)."
    from rsrepro.ars_detr import ARSDETR, denoising_queries
    torch.manual_seed(0)
    m = ARSDETR(num_classes=3, dim=32, num_heads=2, enc_layers=1, dec_layers=2, ffn=64, num_queries=10, backbone='resnet18').eval()
    tg = [{'labels': torch.tensor([1, 2]), 'boxes': torch.tensor([[.5, .5, .3, .1], [.2, .3, .1, .1]]), 'angles': torch.tensor([0.4, -1.])}]
    with torch.no_grad():
        enc = m.encode(torch.randn(1, 3, 96, 96))
        a = m.decode(**enc)
        b = m.decode(**enc, dn=denoising_queries(tg, 3, m.label_embedding, 10))
        c = m.decode(**enc, dn={**denoising_queries(tg, 3, m.label_embedding, 10), 'attn_mask': None})
    assert torch.allclose(a['logits'], b['logits'], atol=1e-5) and torch.allclose(a['hidden'], b['hidden'], atol=1e-5)
    assert not torch.allclose(a['logits'], c['logits'], atol=1e-4)    # without the mask they would leak


def test_ar_csl_windows_are_cached_exactly(monkeypatch):
    "The AR-CSL window of a ratio is computed once per coder and equals the uncached computation."
    import rsrepro.ars_detr as A
    coder = AngleCoder()
    r = torch.tensor([1.0, 2.5, 2.5, 7.0]); a = torch.tensor([0.1, -0.4, 1.2, 0.0])
    first = coder.encode(a, r)
    calls = []
    real = A.rotation_iou
    monkeypatch.setattr(A, 'rotation_iou', lambda *x: calls.append(1) or real(*x))
    again = coder.encode(a.flip(0), r.flip(0))
    assert not calls and torch.equal(again, first.flip(0))
    fresh = AngleCoder().encode(a, r)
    assert torch.equal(fresh, first) and len(calls) == 1
