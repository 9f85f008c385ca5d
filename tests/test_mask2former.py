"Tests of rsrepro.mask2former: the Mask2Former head (HF transformers' parts) of the incomplete paper, on hand cases."
import itertools
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from rsrepro.mask2former import (Mask2FormerHead, SimpleFeaturePyramid, count_parameters, instance_inference,
                                 semantic_inference, semantic_targets)


def tiny(**kw):
    "A small head (hidden 64, FFN 128): same architecture, fast on CPU."
    cfg = dict(in_channels=192, num_classes=1, num_queries=10, hidden_dim=64, dim_feedforward=128,
               encoder_feedforward_dim=128, train_num_points=1024)
    return Mask2FormerHead(**{**cfg, **kw})


def hand_outputs(class_logits, mask_logits):
    "Hand-set head outputs (final prediction only, no auxiliary ones)."
    return dict(class_logits=torch.as_tensor(class_logits, dtype=torch.float32),
                mask_logits=torch.as_tensor(mask_logits, dtype=torch.float32), aux_outputs=[])


def box(n, r0, r1, c0, c1):
    m = torch.zeros(n, n)
    m[r0:r1, c0:c1] = 1
    return m


# ---------------------------------------------------------------- construction
def test_builds_offline_with_the_paper_layer_counts(monkeypatch):
    def no_network(*a, **k): raise AssertionError('Mask2FormerHead tried to open a network connection')
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    head = tiny(pixel_decoder_layers=2, decoder_layers=4)
    # HF counts the query-only prediction as a decoder layer: decoder_layers=4 -> config 5 -> 4 Transformer layers
    assert head.config.decoder_layers == 5 and len(head.transformer_module.decoder.layers) == 4
    assert head.config.encoder_layers == 2 and len(head.pixel_decoder.encoder.layers) == 2
    assert not any('backbone' in n or 'encoder.embeddings' in n for n, _ in head.named_parameters())
    # HF's init ran: the pixel decoder's level embedding is created uninitialised by HF and set N(0, 1) by _init_weights
    le = head.pixel_decoder.level_embed
    assert torch.isfinite(le).all() and 0.5 < le.detach().std().item() < 1.5
    assert torch.allclose(head.criterion.empty_weight, torch.tensor([1.0, 0.1]))
    with pytest.raises(ValueError, match='multiple of 32'):
        tiny(hidden_dim=48)
    with pytest.raises(ValueError, match='task'):
        tiny(task='panoptic')


def test_simple_feature_pyramid_strides():
    fpn = SimpleFeaturePyramid(192, 64)
    maps = fpn(torch.randn(2, 192, 16, 16))
    assert fpn.strides == (4, 8, 16, 32)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 64, 64), (2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8)]
    with pytest.raises(ValueError):
        fpn(torch.randn(2, 96, 16, 16))


# ---------------------------------------------------------------- Hungarian matching
def test_hungarian_matching_hand_case_beats_greedy():
    """3 queries, 2 ground truths on 8x8, one class. GT0 = left half, GT1 = top-right quadrant.
    Q0 = GT0 + GT1 (an L), Q1 = top-left quadrant, Q2 = bottom-right quadrant (and a confident "no object").
    Mask logits +-2. HF's cost = 2 * (-p_class) + 5 * mean BCE + 5 * dice (Mask2Former's weights)."""
    n, L = 8, 2.0
    gt = torch.stack([box(n, 0, 8, 0, 4), box(n, 0, 4, 4, 8)])
    q = torch.stack([torch.maximum(gt[0], gt[1]), box(n, 0, 4, 0, 4), box(n, 4, 8, 4, 8)])
    mask_logits = q * 2 * L - L
    class_logits = torch.tensor([[0., 0.], [0., 0.], [-3., 3.]])      # columns: building, no object
    # the cost matrix, pixel by pixel (the matcher estimates it from random points)
    p, y, x = mask_logits.sigmoid().flatten(1), gt.flatten(1), mask_logits.flatten(1)
    bce = (F.softplus(-x)[:, None] * y[None] + F.softplus(x)[:, None] * (1 - y[None])).mean(-1)
    dice = 1 - (2 * p @ y.T + 1) / (p.sum(-1)[:, None] + y.sum(-1)[None] + 1)
    cost = 2 * -class_logits.softmax(-1)[:, :1] + 5 * bce + 5 * dice           # [3 queries, 2 GT]
    #  Q0: 3.42  7.25 | Q1: 4.01  8.98 | Q2: 12.31  9.97
    assert cost.argmin() == 0                                                   # Q0-GT0 is the cheapest pair ...
    greedy = cost[0, 0] + cost[1:, 1].min()                                     # ... so greedy: Q0-GT0, Q1-GT1 = 12.40
    total = {(a, b): float(cost[a, 0] + cost[b, 1]) for a, b in itertools.permutations(range(3), 2)}
    best = min(total, key=total.get)
    assert best == (1, 0) and total[best] < greedy - 1.0                       # optimal: Q1-GT0, Q0-GT1 = 11.26
    # HF's matcher samples train_num_points uniform points (the same for all queries and targets): seed + many points
    head = tiny(num_classes=1, num_queries=3, train_num_points=4 * 12544)
    torch.manual_seed(0)
    (qi, ti), = head.match(hand_outputs(class_logits[None], mask_logits[None]),
                           [dict(masks=gt.bool(), labels=torch.zeros(2, dtype=torch.long))])
    assert qi.tolist() == [0, 1] and ti.tolist() == [1, 0]                      # Q0 -> GT1, Q1 -> GT0, Q2 unmatched


def test_matching_follows_classes_when_masks_tie():
    "All masks equal: only the class cost -p[q, class] decides. Greedy would give Q0 to GT0 (p .6) and waste GT1."
    probs = torch.tensor([[.6, .4, 0.], [.55, 0., .45], [0., 0., 1.]]) + 1e-4    # columns: class 0, class 1, no object
    head = tiny(num_classes=2, num_queries=3, train_num_points=512)
    out = hand_outputs(probs.log()[None], torch.zeros(1, 3, 8, 8))
    gt = [dict(masks=torch.stack([box(8, 0, 8, 0, 4), box(8, 0, 8, 4, 8)]), labels=torch.tensor([0, 1]))]
    (qi, ti), = head.match(out, gt)
    assert qi.tolist() == [0, 1] and ti.tolist() == [1, 0]     # Q0 -> class-1 GT (.4), Q1 -> class-0 GT (.55): .95 > .6


# ---------------------------------------------------------------- the loss, by hand
def test_loss_parts_by_hand():
    """2 queries, 1 ground truth (class 0), mask logits 0 everywhere. How HF normalises:
    * loss_mask: BCE-with-logits averaged over the sampled points of each matched mask, summed over matched masks,
      divided by num_masks (GT masks in the batch, >= 1). With logit 0 the BCE is log 2 at every point, whatever
      the label and wherever the points fall: exactly log 2.
    * loss_dice: 1 - (2 sum(p y) + 1) / (sum p + sum y + 1) over the P = train_num_points sampled points, / num_masks.
      p = 0.5 everywhere; the GT is a 32x32 square inside a 64x64 image (area 1/4, away from the border, so the
      bilinear sampling keeps its mean): sum y ~ P / 4, dice ~ 1 - (P/4 + 1) / (3P/4 + 1) ~ 2/3 (Monte-Carlo: +-0.002).
    * loss_cross_entropy: CrossEntropyLoss(weight=[1, 0.1]) over all queries: the matched query targets class 0
      (weight 1), the other "no object" (weight 0.1), and torch's weighted mean divides by the sum of the weights."""
    P = 4 * 12544
    head = tiny(num_classes=1, num_queries=2, train_num_points=P)
    cls = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])                  # Q0 says building (p .88), Q1 leans "no object"
    out = hand_outputs(cls, torch.zeros(1, 2, 64, 64))
    tgt = [dict(masks=box(64, 16, 48, 16, 48).bool()[None], labels=torch.tensor([0]))]
    torch.manual_seed(0)
    (qi, ti), = head.match(out, tgt)
    assert qi.tolist() == [0] and ti.tolist() == [0]                # equal mask costs: the class cost picks Q0
    losses = head.loss(out, tgt)
    nll0 = math.log(1 + math.exp(-2.0))                             # -log softmax([2, 0])[0]
    nll1 = math.log(1 + math.exp(-1.0))                             # -log softmax([0, 1])[1] (no object)
    ce = (1.0 * nll0 + 0.1 * nll1) / (1.0 + 0.1)
    assert losses['loss_cross_entropy'].item() == pytest.approx(ce, rel=1e-5)
    assert abs(ce - (nll0 + nll1) / 2) > 0.05                       # the no-object weight matters here
    assert losses['loss_mask'].item() == pytest.approx(math.log(2), rel=1e-6)
    dice = 1 - (P / 4 + 1) / (3 * P / 4 + 1)
    assert losses['loss_dice'].item() == pytest.approx(dice, abs=0.01)
    assert set(losses) == {'loss', 'loss_cross_entropy', 'loss_mask', 'loss_dice'}  # no auxiliary predictions given
    total = 2.0 * losses['loss_cross_entropy'] + 5.0 * losses['loss_mask'] + 5.0 * losses['loss_dice']
    assert losses['loss'].item() == pytest.approx(total.item(), rel=1e-6)


def test_zero_instance_targets():
    "An image without objects: all its queries target 'no object' (weight 0.1); num_masks counts the batch's masks."
    head = tiny(num_classes=1, num_queries=2, train_num_points=1024)
    cls = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]])
    out = hand_outputs(cls, torch.zeros(2, 2, 32, 32))
    empty = dict(masks=torch.zeros(0, 64, 64, dtype=torch.bool), labels=torch.zeros(0, dtype=torch.long))
    one = dict(masks=box(64, 16, 48, 16, 48).bool()[None], labels=torch.tensor([0]))
    losses = head.loss(out, [one, empty])
    nll = lambda logits, k: -torch.log_softmax(torch.tensor(logits), 0)[k].item()
    ce = (nll([2., 0.], 0) + 0.1 * (nll([0., 1.], 1) + nll([1., 0.], 1) + nll([0., 2.], 1))) / 1.3
    assert losses['loss_cross_entropy'].item() == pytest.approx(ce, rel=1e-5)
    assert losses['loss_mask'].item() == pytest.approx(math.log(2), rel=1e-6)  # one matched mask / num_masks = 1
    # the real head, a batch with no object at all: finite, only classification, gradients flow
    head = tiny(num_classes=1, num_queries=5)
    x = torch.randn(2, 192, 4, 4, requires_grad=True)
    losses = head.loss(head(x), [empty, empty])
    assert torch.isfinite(losses['loss']) and losses['loss_mask'].item() == 0 and losses['loss_dice'].item() == 0
    assert losses['loss_cross_entropy'].item() > 0
    losses['loss'].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_target_validation():
    head = tiny(num_classes=2, num_queries=3)
    out = hand_outputs(torch.zeros(1, 3, 3), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r'\[0, 2\)'):
        head.loss(out, [dict(masks=torch.ones(1, 8, 8), labels=torch.tensor([2]))])
    with pytest.raises(ValueError, match='N = len'):
        head.loss(out, [dict(masks=torch.ones(2, 8, 8), labels=torch.tensor([0]))])
    with pytest.raises(ValueError, match='targets for a batch'):
        head.loss(out, [])


# ---------------------------------------------------------------- shapes and gradients
@pytest.mark.parametrize('size', [256, 128])
@pytest.mark.parametrize('task,Q,K', [('instance', 100, 1), ('semantic', 2, 2), ('semantic', 9, 7)])
def test_shapes_and_gradients(task, Q, K, size):
    torch.manual_seed(0)
    head = tiny(task=task, num_queries=Q, num_classes=K)
    h = size // 16                                                   # ViT-T, patch 16
    x = torch.randn(2, 192, h, h, requires_grad=True)
    out = head(x)
    assert out['class_logits'].shape == (2, Q, K + 1)
    assert out['mask_logits'].shape == (2, Q, size // 4, size // 4)
    assert len(out['aux_outputs']) == 4                              # query-only prediction + first 3 layers
    assert all(a['mask_logits'].shape == out['mask_logits'].shape and a['class_logits'].shape == out['class_logits'].shape
               for a in out['aux_outputs'])
    if task == 'instance':
        m = torch.zeros(2, size, size, dtype=torch.bool); m[0, :size // 2, :size // 2] = True; m[1, size // 2:, 10:] = True
        targets = [dict(masks=m, labels=torch.zeros(2, dtype=torch.long))] * 2
    else:
        targets = semantic_targets(torch.randint(0, K, (2, size, size)), K)
    losses = head.loss(out, targets)
    assert losses['loss'].ndim == 0 and torch.isfinite(losses['loss'])
    assert {f'loss_dice_{i}' for i in range(4)} <= set(losses)       # deep supervision on the 4 earlier predictions
    losses['loss'].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # every part learns; the one exception is the pixel decoder's level embedding, whose gradient is exactly 0 at
    # HF's init (it only enters the deformable attention's sampling offsets / weights, whose weights start at 0)
    zero = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert zero == ['pixel_decoder.level_embed'], zero
    sem = head.predict_semantic(out, size)
    assert sem.shape == (2, K, size, size)
    inst = head.predict_instances(out, size, top_k=7)
    assert len(inst) == 2 and inst[0]['masks'].shape == (min(7, Q * K), size, size)


def test_paper_width_forward():
    "The paper's width (hidden 256) on a 128x128 image, 100 queries."
    head = Mask2FormerHead(in_channels=192, num_classes=1, num_queries=100)
    with torch.no_grad():
        out = head(torch.randn(1, 192, 8, 8))
    assert out['class_logits'].shape == (1, 100, 2) and out['mask_logits'].shape == (1, 100, 32, 32)


# ---------------------------------------------------------------- inference
def test_predict_semantic_hand_case():
    """K = 3 classes, 5 queries, 2x2 mask logits (+-20) upsampled to 4x4 (each quadrant keeps its sign).
    Left half: Q0 (class 0, p .9). Top-right: Q1 (class 1, p .9). Bottom-right: Q2 and Q3 say class 2 with p .4 each,
    Q4 says class 1 with p .6: Mask2Former *sums* over queries, so class 2 (.8 + .05) beats class 1 (.6 + .1),
    although the single most confident query there says class 1."""
    P = torch.tensor([[.9, .03, .03, .04], [.03, .9, .03, .04], [.05, .05, .4, .5], [.05, .05, .4, .5],
                      [.05, .6, .05, .3]])                               # columns: classes 0, 1, 2, no object
    cells = {'L': [[1, -1], [1, -1]], 'TR': [[-1, 1], [-1, -1]], 'BR': [[-1, -1], [-1, 1]]}
    masks = torch.tensor([cells['L'], cells['TR'], cells['BR'], cells['BR'], cells['BR']], dtype=torch.float32) * 20
    out = hand_outputs(P.log()[None], masks[None])
    head = tiny(num_classes=3, num_queries=5, task='semantic')
    sem = head.predict_semantic(out, (4, 4))
    assert sem.shape == (1, 3, 4, 4) and (sem >= 0).all()
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    assert torch.equal(sem.argmax(1)[0], expected)
    assert sem[0, 2, 3, 3].item() == pytest.approx(.85, abs=1e-3) and sem[0, 1, 3, 3].item() == pytest.approx(.7, abs=1e-3)
    assert torch.equal(semantic_inference(out['class_logits'], out['mask_logits'], 4), sem)


def test_predict_instances_hand_case():
    "Q0: class 1 with p .9, mask logits +3 on a 4x4 square: score = .9 * sigmoid(3) (mean mask prob inside the mask)."
    probs = torch.tensor([[.05, .9, .05], [.3, .2, .5], [.1, .1, .8]])   # columns: class 0, class 1, no object
    sq = box(8, 2, 6, 2, 6).bool()
    masks = torch.stack([torch.where(sq, 3.0, -3.0), torch.randn(8, 8), torch.randn(8, 8)])
    out = hand_outputs(probs.log()[None], masks[None])
    head = tiny(num_classes=2, num_queries=3)
    res = head.predict_instances(out, (8, 8))[0]
    assert res['masks'].dtype == torch.bool and res['masks'].shape == (6, 8, 8)        # top_k = min(100, Q*K)
    assert torch.equal(res['masks'][0], sq) and res['labels'][0].item() == 1
    assert res['scores'][0].item() == pytest.approx(.9 * torch.sigmoid(torch.tensor(3.0)).item(), rel=1e-4)
    assert (res['scores'][:-1] >= res['scores'][1:]).all()
    assert len(head.predict_instances(out, (8, 8), top_k=2)[0]['scores']) == 2
    kept = head.predict_instances(out, (8, 8), score_threshold=0.5)[0]
    assert len(kept['scores']) == 1 and (kept['scores'] >= 0.5).all()
    # random outputs, upsampled to 64x64: sorted scores, binarised masks
    torch.manual_seed(1)
    for r in instance_inference(torch.randn(2, 10, 4), torch.randn(2, 10, 16, 16), (64, 48), top_k=12):
        assert r['masks'].dtype == torch.bool and r['masks'].shape == (12, 64, 48)
        assert (r['scores'][:-1] >= r['scores'][1:]).all() and ((r['labels'] >= 0) & (r['labels'] < 3)).all()


# ---------------------------------------------------------------- semantic targets
def test_semantic_targets_ignore():
    lab = torch.tensor([[[0, 0, 2], [255, 2, 2]], [[1, 1, 1], [1, 255, 255]]])
    t = semantic_targets(lab, num_classes=3)
    assert t[0]['labels'].tolist() == [0, 2] and t[1]['labels'].tolist() == [1]          # only classes present
    assert t[0]['masks'].dtype == torch.bool and t[0]['masks'].shape == (2, 2, 3)
    assert torch.equal(t[0]['masks'][1], torch.tensor([[False, False, True], [False, True, True]]))
    for ti, li in zip(t, lab):                                                            # ignored pixels: no mask
        assert not ti['masks'][:, li == 255].any()
        assert torch.equal(ti['masks'].sum(0) == 1, li != 255)                            # others: exactly one
    with pytest.raises(ValueError, match='outside'):
        semantic_targets(lab, num_classes=2)
    assert semantic_targets(torch.full((1, 2, 2), 255), 3)[0]['masks'].shape == (0, 2, 2)



def test_semantic_targets_equal_hf_image_processor_with_an_ignored_region():
    "The reference tool: HF's Mask2FormerImageProcessor(ignore_index=255) on the same label maps."
    from transformers import Mask2FormerImageProcessor
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 3, (3, 32, 32), generator=g)
    lab[0, 4:20, 8:30] = 255                         # an ignored block
    lab[1] = torch.where(torch.rand(32, 32, generator=g) < 0.3, 255, lab[1])   # scattered ignored pixels
    lab[2] = 255; lab[2, :5, :5] = 1                 # mostly ignored, one class present
    proc = Mask2FormerImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, ignore_index=255)
    hf = proc(images=[torch.zeros(3, 32, 32)] * 3, segmentation_maps=list(lab.to(torch.uint8)),
              input_data_format='channels_first')
    ours = semantic_targets(lab, num_classes=3, ignore_index=255)
    for o, m, c, l in zip(ours, hf['mask_labels'], hf['class_labels'], lab):
        assert torch.equal(o['masks'].float(), m) and torch.equal(o['labels'], c)
        assert not o['masks'][:, l == 255].any()      # an ignored pixel is in no target mask
    # without an ignore index HF would keep 255 as a class; we refuse it (no 256-class head exists)
    assert 255 in proc(images=[torch.zeros(3, 32, 32)], segmentation_maps=[lab[0].to(torch.uint8)],
                       input_data_format='channels_first', ignore_index=None)['class_labels'][0]
    with pytest.raises(ValueError, match='outside'):
        semantic_targets(lab, num_classes=3, ignore_index=None)


def test_loss_and_miou_with_an_ignored_region():
    from rsrepro.metrics import SegmentationMeter
    torch.manual_seed(0)
    head = tiny(in_channels=32, num_classes=3, num_queries=4, task='semantic')
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    lab = torch.zeros(2, 64, 64, dtype=torch.long); lab[:, :, 32:] = 1; lab[1, 40:, :20] = 2
    lab[:, :16] = 255                                # the top quarter ignored
    losses = head.loss(head(x), semantic_targets(lab, 3))
    assert torch.isfinite(losses['loss']) and all(torch.isfinite(v) for v in losses.values())
    losses['loss'].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # mIoU leaves the ignored pixels out: any prediction there changes nothing
    target = lab[1:]
    good = torch.where(target == 255, 0, target)
    m_good = SegmentationMeter(3, ignore_index=255).update(good, target).compute()['miou']
    bad = good.clone(); bad[0, :16] = 2              # wrong class everywhere in the ignored quarter
    m_bad = SegmentationMeter(3, ignore_index=255).update(bad, target).compute()['miou']
    assert m_good == pytest.approx(1.0) and m_bad == pytest.approx(1.0)
    m_counted = SegmentationMeter(3, ignore_index=None).update(bad, torch.where(target == 255, 0, target)).compute()['miou']
    assert m_counted < 0.9                           # the same error outside an ignored region does count

def test_count_parameters():
    a = Mask2FormerHead(num_classes=1, num_queries=100)
    b = Mask2FormerHead(num_classes=2, num_queries=2, task='semantic')
    # only the two query embeddings (Q x 256 each) and the class predictor (256 x (K+1) + K+1) differ
    assert count_parameters(a) - count_parameters(b) == 98 * 2 * 256 + (257 * 2 - 257 * 3)
    a.pyramid.requires_grad_(False)
    assert count_parameters(a, trainable_only=True) == count_parameters(a) - count_parameters(a.pyramid)


# ---------------------------------------------------------------- it learns
def test_overfits_one_square():
    torch.manual_seed(0)
    head = tiny(in_channels=32, num_classes=1, num_queries=5)
    x = torch.randn(1, 32, 8, 8)                                     # a 128x128 image's stride-16 map
    m = torch.zeros(1, 128, 128, dtype=torch.bool); m[0, 32:80, 48:96] = True
    target = [dict(masks=m, labels=torch.zeros(1, dtype=torch.long))]
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    hist = []
    for _ in range(30):
        losses = head.loss(head(x), target)
        opt.zero_grad(); losses['loss'].backward(); opt.step()
        hist.append(losses['loss'].item())
    assert sum(hist[-3:]) / 3 < hist[0] / 4, hist
    with torch.no_grad():
        best = head.predict_instances(head(x), 128, top_k=1)[0]
    iou = (best['masks'][0] & m[0]).sum() / (best['masks'][0] | m[0]).sum()
    assert iou > 0.8 and best['scores'][0] > 0.5
