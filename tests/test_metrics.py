"Hand-computed checks of rsrepro.metrics: detection AP, segmentation scores, mask AP@50, multi-label mAP, P/R/F1."
import math, random

import pytest
import torch

from rsrepro.metrics import (AP_METHODS, SegmentationMeter, average_precision, box_iou, confusion_matrix,
                             detection_ap, mask_ap50, match_detections, multilabel_map, precision_recall_f1,
                             segmentation_scores, topk_accuracy)


def B(*boxes):
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def two_class_case():
    "Class 0: preds .9 TP, .8 FP, .7 TP on 2 objects; class 1: pred .6 TP on 2 objects."
    gt = dict(boxes=B([0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]),
              labels=torch.tensor([0, 0, 1, 1]))
    pr = dict(boxes=B([0, 0, 10, 10], [80, 80, 90, 90], [20, 20, 30, 31], [40, 40, 50, 50]),
              labels=torch.tensor([0, 0, 0, 1]), scores=torch.tensor([.9, .8, .7, .6]))
    return pr, gt


# ---------------------------------------------------------------- average_precision
def test_ap_methods_by_hand():
    # TP, FP, TP on 2 objects: precision 1, 1/2, 2/3; recall 1/2, 1/2, 1; envelope 1, 2/3, 2/3
    r, p = [.5, .5, 1.], [1., .5, 2 / 3]
    assert average_precision(r, p, 'all_points') == pytest.approx(.5 * 1 + .5 * 2 / 3)       # 0.8333
    assert average_precision(r, p, 'voc07_11pt') == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)  # t=0..0.5 -> 1; 0.6..1 -> 2/3
    assert average_precision(r, p, 'coco_101') == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)  # 0.8350
    # ultralytics: 1 on [0,.49], 2/3 on [.5,.99], 0 at 1 (sentinel), trapezoids
    assert average_precision(r, p, 'ultralytics') == pytest.approx(.49 + .01 * (1 + 2 / 3) / 2 + .49 * 2 / 3 + .01 * (2 / 3) / 2)


def test_ap_partial_recall():
    # one TP out of 2 objects: all-points 0.5; coco: levels 0..0.5 = 51 of 101; ultralytics: 0.5 + triangle 0.25
    assert average_precision([.5], [1.]) == pytest.approx(.5)
    assert average_precision([.5], [1.], 'coco_101') == pytest.approx(51 / 101)
    assert average_precision([.5], [1.], 'voc07_11pt') == pytest.approx(6 / 11)
    assert average_precision([.5], [1.], 'ultralytics') == pytest.approx(.75)
    assert average_precision([.5], [1.], 'ultralytics_legacy') == pytest.approx(.505)


def test_ap_perfect_and_errors():
    for m in ('all_points', 'voc07_11pt', 'coco_101'):
        assert average_precision([.5, 1.], [1., 1.], m) == pytest.approx(1.0)
    assert average_precision([.5, 1.], [1., 1.], 'ultralytics') == pytest.approx(.995)  # ultralytics' known 0.995
    assert average_precision([], [], 'coco_101') == 0.0
    with pytest.raises(ValueError, match='method'):
        average_precision([1.], [1.], 'voc')
    with pytest.raises(ValueError, match='points'):
        average_precision([1., 1.], [1.])


# ---------------------------------------------------------------- detection_ap
def test_detection_two_classes_by_hand():
    pr, gt = two_class_case()
    res = detection_ap([pr], [gt])
    assert res['ap'][0] == pytest.approx(5 / 6)            # 0.5*1 + 0.5*2/3
    assert res['ap'][1] == pytest.approx(.5)               # recall stops at 1/2 with precision 1
    assert res['map'] == pytest.approx((5 / 6 + .5) / 2)   # 0.6667
    assert res['num_gt'] == {0: 2, 1: 2} and res['num_pred'] == {0: 3, 1: 1} and res['num_tp'] == {0: 2, 1: 1}
    # the [20,20,30,31] box has IoU 100/110 = 0.909 with its object: a miss at iou_thr 0.95
    assert detection_ap([pr], [gt], iou_thr=.95)['ap'][0] == pytest.approx(.5)  # TP, FP, FP: 0.5 * 1


def test_detection_class_without_gt_excluded_and_missing_class_counts():
    pr, gt = two_class_case()
    # num_classes=3: class 2 has no ground truth -> nan, not in the mean
    res = detection_ap([pr], [gt], num_classes=3)
    assert math.isnan(res['ap'][2]) and res['map'] == pytest.approx((5 / 6 + .5) / 2)
    # drop the class-1 prediction: class 1 has GT but no prediction -> AP 0, still in the mean
    pr1 = {k: v[:3] for k, v in pr.items()}
    assert detection_ap([pr1], [gt])['map'] == pytest.approx((5 / 6 + 0) / 2)


def test_detection_difficult_gt():
    # 2 GTs, the second difficult. preds: .9 on the easy GT (TP), .8 on the difficult GT (ignored), .7 nowhere (FP)
    gt = dict(boxes=B([0, 0, 10, 10], [20, 20, 30, 30]), labels=torch.tensor([0, 0]),
              difficult=torch.tensor([False, True]))
    pr = dict(boxes=B([0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]), labels=torch.zeros(3, dtype=torch.long),
              scores=torch.tensor([.9, .8, .7]))
    res = detection_ap([pr], [gt])
    # npos = 1; curve after dropping the ignored pred: TP (p=1, r=1), FP (p=1/2, r=1) -> AP 1
    assert res['num_gt'][0] == 1 and res['ap'][0] == pytest.approx(1.0)
    # without the flag the GT counts: TP, TP, FP on 2 objects -> AP 1 as well, so also check a case where it matters:
    # the difficult GT is missed entirely -> still AP 1 (npos excludes it); not flagged -> recall 1/2 -> AP 0.5
    pr2 = {k: v[[0, 2]] for k, v in pr.items()}
    assert detection_ap([pr2], [gt])['ap'][0] == pytest.approx(1.0)
    gt_plain = {k: v for k, v in gt.items() if k != 'difficult'}
    assert detection_ap([pr2], [gt_plain])['ap'][0] == pytest.approx(.5)
    assert detection_ap([pr2], [dict(gt_plain, ignore=torch.tensor([False, True]))])['ap'][0] == pytest.approx(1.0)


def test_duplicate_detection_is_fp():
    # two preds on the same single GT: TP then FP; all-points AP = 1 (recall 1 reached at precision 1)
    gt = dict(boxes=B([0, 0, 10, 10]), labels=torch.tensor([0]))
    pr = dict(boxes=B([0, 0, 10, 10], [0, 0, 10, 10]), labels=torch.tensor([0, 0]), scores=torch.tensor([.9, .8]))
    res = detection_ap([pr], [gt])
    assert res['num_tp'][0] == 1 and res['ap'][0] == pytest.approx(1.0)
    # reversed scores: still one TP; the higher-scored one is the TP under VOC matching
    flags = match_detections(box_iou(pr['boxes'], gt['boxes']), torch.tensor([.1, .8]))
    assert flags.tolist() == [0, 1]


def test_iou_matching_differs_from_score_matching():
    # GT A=[0,0,10,10]. p0 (score .9) overlaps A with IoU 0.5625 ([0,0,10,10] vs [0,0,7.5,10]); p1 (.8) is exact.
    # VOC (score order): p0 takes A -> p0 TP, p1 FP. YOLOv5 (IoU order): p1 takes A -> p1 TP, p0 FP.
    iou = box_iou(B([0, 0, 7.5, 10], [0, 0, 10, 10]), B([0, 0, 10, 10]))
    assert iou[0, 0].item() == pytest.approx(.75)
    s = torch.tensor([.9, .8])
    assert match_detections(iou, s, matching='score').tolist() == [1, 0]
    assert match_detections(iou, s, matching='iou').tolist() == [0, 1]
    with pytest.raises(ValueError, match='matching'):
        match_detections(iou, s, matching='hungarian')
    with pytest.raises(ValueError, match='difficult'):
        match_detections(iou, s, gt_ignore=torch.tensor([True]), matching='iou')


def test_detection_invariances():
    g = torch.Generator().manual_seed(0)
    preds, gts = [], []
    for _ in range(6):
        n = 5
        xy = torch.rand(n, 2, generator=g) * 100
        gb = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 10], 1)
        gl = torch.randint(0, 3, (n,), generator=g)
        pb = gb + torch.randn(n, 4, generator=g) * 2
        gts.append(dict(boxes=gb, labels=gl))
        preds.append(dict(boxes=pb, labels=gl.clone(), scores=torch.rand(n, generator=g)))
    base = detection_ap(preds, gts, num_classes=3)
    # permuting images does not change AP
    perm = [3, 0, 5, 1, 4, 2]
    res = detection_ap([preds[i] for i in perm], [gts[i] for i in perm], num_classes=3)
    assert res['ap'] == pytest.approx(base['ap'], nan_ok=True)
    # permuting predictions inside an image does not change AP either
    p2 = [{k: v.flip(0) for k, v in p.items()} for p in preds]
    assert detection_ap(p2, gts, num_classes=3)['ap'] == pytest.approx(base['ap'], nan_ok=True)
    # perfect predictions give 1.0 (and 0.995 in ultralytics' convention)
    perfect = [dict(boxes=t['boxes'], labels=t['labels'], scores=torch.ones(len(t['labels']))) for t in gts]
    assert detection_ap(perfect, gts, method='all_points')['map'] == pytest.approx(1.0)
    assert detection_ap(perfect, gts, method='coco_101')['map'] == pytest.approx(1.0)
    assert detection_ap(perfect, gts, method='ultralytics', matching='iou')['map'] == pytest.approx(.995)
    # adding a low-score FP after all TPs does not change all-points AP
    extra = [dict(boxes=torch.cat([p['boxes'], B([500, 500, 510, 510])]), labels=torch.cat([p['labels'], torch.tensor([0])]),
                  scores=torch.cat([p['scores'], torch.tensor([-1.])])) for p in preds]
    assert detection_ap(extra, gts, num_classes=3)['ap'] == pytest.approx(base['ap'], nan_ok=True)
    # ... but a high-score FP lowers class 0's AP (the test can fail)
    hi = [dict(boxes=torch.cat([p['boxes'], B([500, 500, 510, 510])]), labels=torch.cat([p['labels'], torch.tensor([0])]),
               scores=torch.cat([p['scores'], torch.tensor([2.])])) for p in preds]
    assert detection_ap(hi, gts, num_classes=3)['ap'][0] < base['ap'][0]


def test_detection_input_errors():
    pr, gt = two_class_case()
    with pytest.raises(ValueError, match='images'):
        detection_ap([pr], [gt, gt])
    with pytest.raises(ValueError, match="'scores'"):
        detection_ap([{k: v for k, v in pr.items() if k != 'scores'}], [gt])
    with pytest.raises(ValueError, match='outside'):
        detection_ap([pr], [gt], num_classes=1)


# ---------------------------------------------------------------- segmentation
def test_segmentation_3x3_by_hand():
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    p = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    # pairs (t,p): (0,0) (0,1) (1,1) (1,1) (2,0) (2,2) [ignored] (1,2)
    C = confusion_matrix(p, t, 3)
    assert C.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    s = segmentation_scores(C)
    # IoU: c0 1/(1+1+1)=1/3, c1 2/(2+1+1)=1/2, c2 1/(1+1+1)=1/3
    assert s['per_class_iou'] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert s['miou'] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert s['oa'] == pytest.approx(4 / 7)                           # trace 4 of 7 counted pixels
    # F1 = 2TP/(2TP+FP+FN): c0 2/4, c1 4/6, c2 2/4
    assert s['per_class_f1'] == pytest.approx([.5, 2 / 3, .5])
    assert s['mf1'] == pytest.approx((.5 + 2 / 3 + .5) / 3)


def test_segmentation_absent_class_excluded():
    t = torch.tensor([0, 0, 1]); p = torch.tensor([0, 1, 1])
    s = segmentation_scores(confusion_matrix(p, t, 4))   # classes 2, 3 absent from both
    assert math.isnan(s['per_class_iou'][2]) and math.isnan(s['per_class_iou'][3])
    assert s['miou'] == pytest.approx((1 / 2 + 1 / 2) / 2)   # c0 1/(1+0+1), c1 1/(1+1+0)
    # a class predicted but absent from the target counts with IoU 0
    s2 = segmentation_scores(confusion_matrix(torch.tensor([0, 2, 1]), t, 4))
    assert s2['per_class_iou'][2] == 0 and s2['miou'] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_segmentation_meter_and_errors():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 8, 8, generator=g); target = torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, 0, :4] = 255
    m = SegmentationMeter(3)
    for i in range(4): m.update(logits[i:i + 1], target[i:i + 1])
    assert torch.equal(m.conf, confusion_matrix(logits.argmax(1), target, 3))
    assert m.conf.sum() == 4 * 64 - 4
    assert m.compute() == segmentation_scores(m.conf)
    # perfect prediction: mIoU = OA = mF1 = 1
    perfect = SegmentationMeter(3).update(target.clamp(max=2), target).compute()
    assert perfect['miou'] == perfect['oa'] == perfect['mf1'] == 1.0
    m.reset(); assert m.conf.sum() == 0
    with pytest.raises(ValueError, match='outside'):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match='shape'):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match='channels'):
        SegmentationMeter(4).update(logits, target)


# ---------------------------------------------------------------- mask AP@50
def test_mask_ap50_by_hand():
    # 4x4 image, GTs: left half (8 px) and right half (8 px)
    g = torch.zeros(2, 4, 4, dtype=torch.bool); g[0, :, :2] = True; g[1, :, 2:] = True
    q = torch.zeros(3, 4, 4, dtype=torch.bool)
    q[0, :, :2] = True          # .9: exact left -> TP
    q[1, :, 1:3] = True         # .8: middle columns, IoU 4/12 with each half -> FP
    q[2, :3, 2:] = True         # .7: 6 px inside right half, IoU 6/8 -> TP
    s = torch.tensor([.9, .8, .7])
    # curve TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> COCO (51 + 50*2/3)/101
    assert mask_ap50([q], [s], [g]) == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert mask_ap50([q], [s], [g], method='all_points') == pytest.approx(5 / 6)
    # split over two images (the right half alone in the second) and permuted: same AP
    g2 = [g[:1], g[1:]]; q2 = [q[:2], q[2:]]; s2 = [s[:2], s[2:]]
    assert mask_ap50(q2[::-1], s2[::-1], g2[::-1]) == pytest.approx((51 + 50 * 2 / 3) / 101)
    # max_dets=2 keeps the two best (.9 TP, .8 FP): recall 1/2 -> 51/101
    assert mask_ap50([q], [s], [g], max_dets=2) == pytest.approx(51 / 101)
    # image with no prediction still counts its GTs
    assert mask_ap50([q[:1], torch.zeros(0, 4, 4)], [s[:1], torch.zeros(0)], [g[:1], g[1:]]) == pytest.approx(51 / 101)
    with pytest.raises(ValueError, match='same images'):
        mask_ap50([q], [s, s], [g])


# ---------------------------------------------------------------- multi-label mAP
def test_multilabel_map_by_hand():
    S = torch.tensor([[.9, .5, .3], [.8, .5, .2], [.7, .1, .9], [.6, .2, .1]])
    Y = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # class 0: ranks 1..4 -> T F T F: AP = 1/2*1 + 1/2*2/3 = 5/6
    # class 1: images 0,1 tie at .5 (one threshold): precision 1/2 at recall 1 -> 1/2
    # class 2: no positive -> skipped
    assert multilabel_map(S, Y) == pytest.approx((5 / 6 + 1 / 2) / 2)
    # micro: 12 pairs ranked .9,.9,.8,.7,.6,.5,.5,.3,.2,.2,.1,.1 with positives (0,0) .9, (2,0) .7, (1,1) .5
    # thresholds: .9 -> tp1/2 (one of the .9s is (2,2) negative) r=1/3 p=1/2; .7 -> tp2/4 r=2/3 p=1/2;
    # .5 -> tp3/7 r=1 p=3/7. AP = 1/3*(1/2) + 1/3*(1/2) + 1/3*(3/7)
    assert multilabel_map(S, Y, average='micro') == pytest.approx((1 / 2 + 1 / 2 + 3 / 7) / 3)


def test_multilabel_map_properties():
    g = torch.Generator().manual_seed(2)
    Y = (torch.rand(50, 19, generator=g) < .2).long(); Y[0] = 1
    S = torch.rand(50, 19, generator=g)
    assert multilabel_map(Y.float() + .01 * S, Y) == pytest.approx(1.0)          # positives ranked first
    perm = torch.randperm(50, generator=g)
    assert multilabel_map(S[perm], Y[perm]) == pytest.approx(multilabel_map(S, Y))
    assert multilabel_map(2 * S + 1, Y) == pytest.approx(multilabel_map(S, Y))    # rank-based
    # a constant score gives precision = prevalence for each class
    prev = Y.float().mean(0)
    assert multilabel_map(torch.zeros(50, 19), Y) == pytest.approx(prev.mean().item())
    with pytest.raises(ValueError, match=r'\[N, K\]'):
        multilabel_map(S, Y[:, :3])
    with pytest.raises(ValueError, match='average'):
        multilabel_map(S, Y, average='samples')


# ---------------------------------------------------------------- single-label scores
def test_topk_and_prf_by_hand():
    L = torch.tensor([[3., 2, 1], [1, 2, 3], [1, 3, 2], [2, 3, 1]])
    t = torch.tensor([0, 0, 2, 0])
    # top1: row0 only; top2: rows 0, 2 ([1,2]), 3 ([1,0]); top3: all
    assert topk_accuracy(L, t, (1, 2, 3)) == (1 / 4, 3 / 4, 1.0)
    assert topk_accuracy(L, t, 1) == 1 / 4
    with pytest.raises(ValueError, match='exceeds'):
        topk_accuracy(L, t, 4)
    # targets 0 0 1 1 2, preds 0 1 1 1 0
    # c0 TP1 FP1 FN1 (P=R=F1=1/2); c1 TP2 FP1 FN0 (P 2/3, R 1, F1 .8); c2 TP0 FN1 (0)
    t, p = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    m = precision_recall_f1(p, t)
    assert m['precision'] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert m['recall'] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m['f1'] == pytest.approx((1 / 2 + .8 + 0) / 3)
    w = precision_recall_f1(p, t, average='weighted')   # supports 2, 2, 1
    assert w['recall'] == pytest.approx(3 / 5)            # = accuracy
    assert w['precision'] == pytest.approx((2 * 1 / 2 + 2 * 2 / 3) / 5)
    assert w['f1'] == pytest.approx((2 * 1 / 2 + 2 * .8) / 5)
    mi = precision_recall_f1(p, t, average='micro')
    assert mi['precision'] == mi['recall'] == pytest.approx(3 / 5)
    # a class listed by num_classes but absent from both does not enter the macro mean
    assert precision_recall_f1(p, t, num_classes=5)['recall'] == pytest.approx(m['recall'])
    # multi-label indicators: same counts as the one-hot form
    oh = lambda x: torch.nn.functional.one_hot(x, 3)
    assert precision_recall_f1(oh(p), oh(t))['f1'] == pytest.approx(m['f1'])
    with pytest.raises(ValueError, match='average'):
        precision_recall_f1(p, t, average='binary')


def test_weighted_recall_equals_top1_accuracy():
    # crossscale Table 3: recall == Top-1 accuracy, which holds for average='weighted' on single-label data
    g = torch.Generator().manual_seed(3)
    L = torch.randn(200, 10, generator=g); t = torch.randint(0, 10, (200,), generator=g)
    acc = topk_accuracy(L, t, 1)
    assert precision_recall_f1(L.argmax(1), t, average='weighted')['recall'] == pytest.approx(acc)
    assert precision_recall_f1(L.argmax(1), t, average='macro')['recall'] != pytest.approx(acc)
