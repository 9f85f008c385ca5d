"Hand-computed checks of rsrepro.metrics: detection AP, segmentation scores, mask AP@50, multi-label mAP, P/R/F1."
import math, random

import numpy as np
import pytest
import torch

from rsrepro.metrics import (AP_METHODS, IMIM_AP_METHOD, MATCHING_RULES, SegmentationMeter, average_precision, box_iou,
                             confusion_matrix, detection_ap, mask_ap50, match_detections, multilabel_map,
                             precision_recall_f1, segmentation_scores, topk_accuracy)


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
    # YOLOv5 7.0 / ultralytics 8.4 (recall reaches 1): 1 on [0,.49], 2/3 on [.5,.99], 0 at 1 (sentinel), trapezoids
    for m in ('yolov5_v7.0', 'ultralytics_8.4'):
        assert average_precision(r, p, m) == pytest.approx(.49 + .01 * (1 + 2 / 3) / 2 + .49 * 2 / 3 + .01 * (2 / 3) / 2)
    # YOLOv5 v5.0: sentinel at 1.01, so 2/3 holds up to recall 1 inclusive
    assert average_precision(r, p, 'yolov5_v5.0') == pytest.approx(.49 + .01 * (1 + 2 / 3) / 2 + .5 * 2 / 3)


def test_ap_partial_recall():
    # one TP out of 2 objects: all-points 0.5; coco: levels 0..0.5 = 51 of 101
    assert average_precision([.5], [1.]) == pytest.approx(.5)
    assert average_precision([.5], [1.], 'coco_101') == pytest.approx(51 / 101)
    assert average_precision([.5], [1.], 'voc07_11pt') == pytest.approx(6 / 11)
    # the three YOLO end rules after the last point (0.5, 1):
    assert average_precision([.5], [1.], 'yolov5_v5.0') == pytest.approx(.505)      # fall to (0.51, 0): + 0.01 / 2
    assert average_precision([.5], [1.], 'yolov5_v7.0') == pytest.approx(.75)       # fall to (1, 0): + triangle 0.25
    assert average_precision([.5], [1.], 'ultralytics_8.4') == pytest.approx(.495)  # 0 from 0.5 on: 0.49 + 0.01 / 2
    # recall 1/3, precision 1 (the sentinel 1/3 + 0.01 is off the 0.01 grid): v5.0 samples 1/3 at x = 0.34
    assert average_precision([1 / 3], [1.], 'yolov5_v5.0') == pytest.approx(.33 + .01 * (1 + 1 / 3) / 2 + .01 * (1 / 3) / 2)
    # the lead's example, (0.1, 1), (0.2, 1): 0.205 / 0.6 / 0.195
    assert [average_precision([.1, .2], [1., 1.], m) for m in ('yolov5_v5.0', 'yolov5_v7.0', 'ultralytics_8.4')] == \
        pytest.approx([.205, .6, .195])


def test_ap_perfect_and_errors():
    for m in ('all_points', 'voc07_11pt', 'coco_101'):
        assert average_precision([.5, 1.], [1., 1.], m) == pytest.approx(1.0)
    for m in ('yolov5_v7.0', 'ultralytics_8.4'):
        assert average_precision([.5, 1.], [1., 1.], m) == pytest.approx(.995)   # the known YOLO 0.995
    assert average_precision([.5, 1.], [1., 1.], 'yolov5_v5.0') == pytest.approx(1.0)
    assert IMIM_AP_METHOD == 'yolov5_v5.0' and IMIM_AP_METHOD in AP_METHODS
    assert average_precision([], [], 'coco_101') == 0.0
    with pytest.raises(ValueError, match='method'):
        average_precision([1.], [1.], 'voc')
    for old in ('ultralytics', 'ultralytics_legacy'):          # the former, misleading names are gone
        with pytest.raises(ValueError, match='method'):
            average_precision([1.], [1.], old)
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


def test_matching_rules_by_hand():
    # objects L0, L1; D0 (.9) overlaps L0 0.6; D1 (.8) overlaps L0 0.9 and L1 0.8.
    # VOC / YOLOv5 v5.0 ('score') and YOLOv5 7.0 ('iou'): D0 takes L0; D1's best (L0) is taken -> FP.
    # ultralytics 8.4 ('score_unclaimed'): D1 takes the free L1.
    iou = torch.tensor([[.6, 0.], [.9, .8]])
    s = torch.tensor([.9, .8])
    assert match_detections(iou, s, matching='score').tolist() == [1, 0]
    assert match_detections(iou, s, matching='iou').tolist() == [1, 0]
    assert match_detections(iou, s, matching='score_unclaimed').tolist() == [1, 1]
    # one object, two predictions: the higher score takes it even when the other overlaps more (all three rules)
    iou1 = box_iou(B([0, 0, 7.5, 10], [0, 0, 10, 10]), B([0, 0, 10, 10]))
    assert iou1[0, 0].item() == pytest.approx(.75)
    for m in MATCHING_RULES:
        assert match_detections(iou1, s, matching=m).tolist() == [1, 0], m
        assert match_detections(iou1, s.flip(0), matching=m).tolist() == [0, 1], m
    with pytest.raises(ValueError, match='matching'):
        match_detections(iou, s, matching='hungarian')
    with pytest.raises(ValueError, match='matching'):
        detection_ap([], [], matching='hungarian')
    with pytest.raises(ValueError, match='difficult'):
        match_detections(iou1, s, gt_ignore=torch.tensor([True]), matching='iou')


def test_iou_matching_equals_score_matching_without_ties():
    # YOLOv5 7.0's process_batch is VOC's greedy rule in another form (see the notebook): same flags on random data
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        P, G = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        iou = torch.rand(P, G, generator=g) * (torch.rand(P, G, generator=g) < .6)
        s = torch.rand(P, generator=g)
        for thr in (.3, .5):
            assert match_detections(iou, s, thr, matching='iou').tolist() == \
                match_detections(iou, s, thr, matching='score').tolist()


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
    assert detection_ap(perfect, gts, method='yolov5_v7.0', matching='iou')['map'] == pytest.approx(.995)
    assert detection_ap(perfect, gts, method='yolov5_v5.0')['map'] == pytest.approx(1.0)
    # adding a low-score FP after all TPs does not change all-points AP
    extra = [dict(boxes=torch.cat([p['boxes'], B([500, 500, 510, 510])]), labels=torch.cat([p['labels'], torch.tensor([0])]),
                  scores=torch.cat([p['scores'], torch.tensor([-1.])])) for p in preds]
    assert detection_ap(extra, gts, num_classes=3)['ap'] == pytest.approx(base['ap'], nan_ok=True)
    # ... but a high-score FP lowers class 0's AP (the test can fail)
    hi = [dict(boxes=torch.cat([p['boxes'], B([500, 500, 510, 510])]), labels=torch.cat([p['labels'], torch.tensor([0])]),
               scores=torch.cat([p['scores'], torch.tensor([2.])])) for p in preds]
    assert detection_ap(hi, gts, num_classes=3)['ap'][0] < base['ap'][0]


# ---------------------------------------------------------------- against the YOLO codes themselves
@pytest.fixture(scope='module')
def yolo_refs():
    "compute_ap / ap_per_class / the matching of the yolov5 7.0 package and of the installed ultralytics 8.4."
    from types import SimpleNamespace
    mp = pytest.MonkeyPatch()
    if not hasattr(np, 'trapz'):                         # yolov5 7.0 calls np.trapz, which numpy 2.4 renamed trapezoid
        mp.setattr(np, 'trapz', np.trapezoid, raising=False)
    from rsrepro.detector import yolov5_offline
    yolov5_offline()                                     # ultralytics offline first, then yolov5 (which imports it)
    import ultralytics.utils.metrics as ulm
    import yolov5.utils.metrics as y5m
    from ultralytics.engine.validator import BaseValidator
    from yolov5.val import process_batch
    yield SimpleNamespace(y5m=y5m, ulm=ulm, process_batch=process_batch, match_predictions=BaseValidator.match_predictions)
    mp.undo()


def random_curve(rng):
    "Cumulative recall / precision of a random ranking: n predictions, each TP with some probability, npos objects."
    n = int(rng.integers(1, 40)); tp = rng.random(n) < rng.random()
    npos = int(tp.sum() + rng.integers(0 if tp.any() else 1, 6))
    c = np.cumsum(tp)
    return c / npos, c / np.arange(1, n + 1)


def test_ap_formulas_equal_the_yolo_codes(yolo_refs):
    rng = np.random.default_rng(0)
    curves = [random_curve(rng) for _ in range(500)] + [(np.array([.5, 1.]), np.array([1., 1.])),
                                                         (np.zeros(3), np.zeros(3)), (np.array([1.]), np.array([.5]))]
    differ = 0
    for r, p in curves:
        assert average_precision(r, p, 'yolov5_v7.0') == pytest.approx(yolo_refs.y5m.compute_ap(r, p)[0], abs=1e-12)
        assert average_precision(r, p, 'ultralytics_8.4') == pytest.approx(yolo_refs.ulm.compute_ap(r, p)[0], abs=1e-12)
        differ += abs(average_precision(r, p, 'yolov5_v5.0') - average_precision(r, p, 'yolov5_v7.0')) > 1e-3
    assert differ > 250                                 # v5.0's formula is another one (tested by hand above)


def random_detections(seed, n_img=10, nc=4):
    "Images with objects and NMS-like predictions (jittered hits, some of the wrong class, some false alarms)."
    g = torch.Generator().manual_seed(seed)
    preds, gts = [], []
    for _ in range(n_img):
        m = int(torch.randint(0, 7, (1,), generator=g))
        xy = torch.rand(m, 2, generator=g) * 200
        gb = torch.cat([xy, xy + 10 + torch.rand(m, 2, generator=g) * 30], 1)
        gl = torch.randint(0, nc, (m,), generator=g)
        hits = gb.repeat(2, 1) + torch.randn(2 * m, 4, generator=g) * 4
        hl = torch.where(torch.rand(2 * m, generator=g) < .8, gl.repeat(2), torch.randint(0, nc, (2 * m,), generator=g))
        k = int(torch.randint(0, 4, (1,), generator=g)); fxy = torch.rand(k, 2, generator=g) * 200
        pb = torch.cat([hits, torch.cat([fxy, fxy + 15], 1)]); pl = torch.cat([hl, torch.randint(0, nc, (k,), generator=g)])
        ps = torch.rand(len(pb), generator=g)
        o = ps.argsort(descending=True)                  # as NMS returns them
        preds.append(dict(boxes=pb[o].float(), labels=pl[o], scores=ps[o].float()))
        gts.append(dict(boxes=gb.float(), labels=gl))
    return preds, gts


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_detection_ap_equals_yolov5_val(yolo_refs, seed):
    "detection_ap(matching='iou', method='yolov5_v7.0') is YOLOv5 7.0's val.py: process_batch, then ap_per_class."
    preds, gts = random_detections(seed)
    iouv = torch.tensor([0.5])
    stats = []
    for pr, gt in zip(preds, gts):
        det = torch.cat([pr['boxes'], pr['scores'][:, None], pr['labels'][:, None].float()], 1)
        lab = torch.cat([gt['labels'][:, None].float(), gt['boxes']], 1)
        correct = yolo_refs.process_batch(det, lab, iouv) if len(lab) else torch.zeros(len(det), 1, dtype=torch.bool)
        stats.append((correct, pr['scores'], pr['labels'].float(), gt['labels'].float()))
    tp, conf, pcls, tcls = (torch.cat(x, 0).numpy() for x in zip(*stats))
    out = yolo_refs.y5m.ap_per_class(tp, conf, pcls, tcls, names={c: str(c) for c in range(4)})
    ref = dict(zip(out[-1].tolist(), out[5][:, 0].tolist()))
    assert len(ref) >= 3
    ours = detection_ap(preds, gts, num_classes=4, matching='iou', method='yolov5_v7.0')
    for c, v in ref.items(): assert ours['ap'][c] == pytest.approx(v, abs=1e-9), c
    assert ours['map'] == pytest.approx(np.mean(list(ref.values())), abs=1e-9)
    assert {c for c in range(4) if not math.isnan(ours['ap'][c])} == set(ref)
    # the same detections in imim's convention (v5.0: VOC matching, v5.0 formula) score differently
    assert detection_ap(preds, gts, num_classes=4, method=IMIM_AP_METHOD)['map'] != pytest.approx(ours['map'], abs=1e-3)


@pytest.mark.parametrize('seed', [1, 2])
def test_detection_ap_equals_ultralytics_val(yolo_refs, seed):
    "detection_ap(matching='score_unclaimed', method='ultralytics_8.4') is ultralytics 8.4's DetectionValidator."
    from types import SimpleNamespace
    preds, gts = random_detections(seed)
    stub = SimpleNamespace(iouv=torch.tensor([0.5]))
    stats = []
    for pr, gt in zip(preds, gts):
        iou = yolo_refs.ulm.box_iou(gt['boxes'], pr['boxes'])
        correct = yolo_refs.match_predictions(stub, pr['labels'], gt['labels'], iou)
        stats.append((correct, pr['scores'], pr['labels'].float(), gt['labels'].float()))
    tp, conf, pcls, tcls = (torch.cat(x, 0).numpy() for x in zip(*stats))
    out = yolo_refs.ulm.ap_per_class(tp, conf, pcls, tcls, names={c: str(c) for c in range(4)})
    ref = dict(zip(out[6].tolist(), out[5][:, 0].tolist()))
    ours = detection_ap(preds, gts, num_classes=4, matching='score_unclaimed', method='ultralytics_8.4')
    for c, v in ref.items(): assert ours['ap'][c] == pytest.approx(v, abs=1e-9), c


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


# ---------------------------------------------------------------- the vectorised evaluator against a plain-Python oracle
def _voc_oracle(preds, gts, iou_thr=0.5):
    """The PASCAL VOC devkit's algorithm, written plainly (per class: every detection of every image sorted by score,
    each matched to its best ground truth of that image; difficult ones ignored; duplicates are FP), IoU >= thr."""
    classes = sorted({int(c) for d in list(preds) + list(gts) for c in d['labels']})
    aps = {}
    for c in classes:
        dets = [(float(s), n, b) for n, p in enumerate(preds) for b, l, s in zip(p['boxes'], p['labels'], p['scores'])
                if int(l) == c]
        dets.sort(key=lambda d: -d[0])
        R = {n: [(b, bool(dif)) for b, l, dif in zip(g['boxes'], g['labels'], g.get('difficult', [False] * len(g['labels'])))
                 if int(l) == c] for n, g in enumerate(gts)}
        taken = {n: [False] * len(r) for n, r in R.items()}
        npos = sum(not d for r in R.values() for _, d in r)
        tp, fp = [], []
        for s, n, b in dets:
            best, jbest = -1.0, -1
            for j, (g, _) in enumerate(R[n]):
                ov = float(box_iou(b[None], g[None])[0, 0])
                if ov > best: best, jbest = ov, j
            if best >= iou_thr:
                if R[n][jbest][1]: continue                      # difficult
                if not taken[n][jbest]: tp.append(1); fp.append(0); taken[n][jbest] = True
                else: tp.append(0); fp.append(1)
            else: tp.append(0); fp.append(1)
        if npos == 0: continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        aps[c] = average_precision(tp / npos, tp / np.maximum(tp + fp, 1e-12), 'voc07_11pt')
    return aps


def _random_detections(n_img, seed, n_cls=4, max_pred=12, max_gt=6):
    g = torch.Generator().manual_seed(seed)
    def boxes(k):
        xy = torch.rand(k, 2, generator=g) * 60; wh = 4 + torch.rand(k, 2, generator=g) * 30
        return torch.cat([xy, xy + wh], 1)
    preds, gts = [], []
    for _ in range(n_img):
        G = int(torch.randint(0, max_gt + 1, (1,), generator=g)); P = int(torch.randint(0, max_pred + 1, (1,), generator=g))
        gb = boxes(G)
        near = gb[torch.randint(0, max(G, 1), (P,), generator=g)] + torch.randn(P, 4, generator=g) * 3 if G else boxes(P)
        pb = torch.where(torch.rand(P, 1, generator=g) < 0.7, near, boxes(P))
        gts.append({'boxes': gb, 'labels': torch.randint(0, n_cls, (G,), generator=g),
                    'difficult': torch.rand(G, generator=g) < 0.15})
        preds.append({'boxes': pb, 'labels': torch.randint(0, n_cls, (P,), generator=g),
                      'scores': torch.rand(P, generator=g).round(decimals=2)})      # ties happen
    return preds, gts


@pytest.mark.parametrize('seed', range(6))
def test_vectorised_detection_ap_equals_the_voc_oracle(seed):
    preds, gts = _random_detections(25, seed)
    for thr in (0.5, 0.3):
        ours = detection_ap(preds, gts, iou_thr=thr, method='voc07_11pt')['ap']
        ref = _voc_oracle(preds, gts, thr)
        assert {c: v for c, v in ours.items() if not np.isnan(v)} == pytest.approx(ref, abs=1e-12)


def test_vectorised_score_matching_equals_the_greedy_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        P, G = int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(0, 6, (1,), generator=g))
        iou = (torch.rand(P, G, generator=g) * 1.2 - 0.1).clamp(0, 1).round(decimals=1)   # many ties
        s = torch.rand(P, generator=g).round(decimals=1); ign = torch.rand(G, generator=g) < 0.3
        want = np.zeros(P, dtype=np.int64); taken = np.zeros(G, bool)
        for i in np.argsort(-s.double().numpy(), kind='stable'):          # the textbook loop
            if G == 0: break
            j = int(np.argmax(iou[i].numpy()))
            if iou[i, j] < 0.5: continue
            if ign[j]: want[i] = -1
            elif not taken[j]: want[i] = 1; taken[j] = True
        assert match_detections(iou, s, 0.5, ign).tolist() == want.tolist()
