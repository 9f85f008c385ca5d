"""The DOTA Task1 evaluator (`rsrepro.rotated`, `rsrepro eval-dota`): DOTA_devkit's rules on real DOTA labels, the
polygon IoU, the result-file reader's errors, and the benchmark harness beside a devkit."""
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely

from rsrepro.bench import bench_dota_eval, format_dota_bench, realistic_detections
from rsrepro.cli import main
from rsrepro.core import DataFormatError, DataNotFoundError
from rsrepro.detection_data import DOTA_CLASSES
from rsrepro.rotated import (TASK1_COLUMNS, convex_intersection_area, dota_eval, eval_dota, intersection_area,
                             poly_iou, read_dota_gt, read_task1_file, write_task1)

DOTA = Path(__file__).resolve().parents[2]/'shared'/'data'/'DOTA'
needs_dota = pytest.mark.skipif(not (DOTA/'labelTxt').is_dir(), reason='the real DOTA samples (../shared/data/DOTA) are absent')

# A plain transcription of DOTA_devkit's dota_evaluation_task1.voc_eval (one detection at a time, shapely for the
# polygon IoU where the devkit calls its C++ polyiou), written as a module so that it can also stand in for a devkit
# checkout in the benchmark harness. It reads the same files the devkit reads.
ORACLE = r'''
import numpy as np, shapely

def _iou(p, q):
    a, b = shapely.polygons(np.reshape(p, (4, 2))), shapely.polygons(np.reshape(q, (4, 2)))
    i = shapely.area(shapely.intersection(a, b))
    return i / (shapely.area(a) + shapely.area(b) - i)

def parse_gt(filename):
    objs = []
    for line in open(filename):
        t = line.strip().split(' ')
        if len(t) < 9: continue
        objs.append({'name': t[8], 'difficult': int(t[9]) if len(t) == 10 else 0, 'bbox': [float(v) for v in t[:8]]})
    return objs

def voc_ap(rec, prec):
    ap = 0.
    for t in np.arange(0., 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.
    return ap

def voc_eval(detpath, annopath, imagesetfile, classname, ovthresh=0.5, use_07_metric=True):
    names = [x.strip() for x in open(imagesetfile)]
    recs, npos = {}, 0
    for n in names:
        R = [o for o in parse_gt(annopath.format(n)) if o['name'] == classname]
        d = np.array([o['difficult'] for o in R]).astype(bool)
        npos += int(np.sum(~d))
        recs[n] = {'bbox': np.array([o['bbox'] for o in R]), 'difficult': d, 'det': [False] * len(R)}
    lines = [x.strip().split(' ') for x in open(detpath.format(classname))]
    ids = [x[0] for x in lines]; conf = np.array([float(x[1]) for x in lines])
    BB = np.array([[float(z) for z in x[2:]] for x in lines])
    order = np.argsort(-conf); BB = BB[order, :]; ids = [ids[x] for x in order]
    tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
    for d in range(len(ids)):
        R = recs[ids[d]]; bb = BB[d]; ovmax = -np.inf
        if R['bbox'].size > 0:
            G = R['bbox']
            iw = np.maximum(np.minimum(G[:, 0::2].max(1), bb[0::2].max()) - np.maximum(G[:, 0::2].min(1), bb[0::2].min()) + 1., 0.)
            ih = np.maximum(np.minimum(G[:, 1::2].max(1), bb[1::2].max()) - np.maximum(G[:, 1::2].min(1), bb[1::2].min()) + 1., 0.)
            keep = np.where(iw * ih > 0)[0]
            if len(keep):
                ov = [_iou(G[k], bb) for k in keep]
                ovmax = np.max(ov); jmax = keep[int(np.argmax(ov))]
        if ovmax > ovthresh:
            if not R['difficult'][jmax]:
                if not R['det'][jmax]: tp[d] = 1.; R['det'][jmax] = 1
                else: fp[d] = 1.
        else: fp[d] = 1.
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos); prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, voc_ap(rec, prec)
'''


@pytest.fixture(scope='module')
def oracle(tmp_path_factory):
    d = tmp_path_factory.mktemp('devkit_stub')
    (d/'dota_evaluation_task1.py').write_text(ORACLE)
    sys.path.insert(0, str(d))
    import importlib
    mod = importlib.import_module('dota_evaluation_task1')
    sys.path.remove(str(d))
    return d, mod


@pytest.fixture(scope='module')
def real_case(tmp_path_factory):
    "The real DOTA sample labels, realistic synthetic detections of them written as Task1 files, and an image set."
    d = tmp_path_factory.mktemp('dota_eval')
    gts = read_dota_gt(DOTA/'labelTxt')
    dets = realistic_detections(gts, DOTA_CLASSES, seed=1)
    write_task1(d/'det', dets)
    (d/'imageset.txt').write_text(''.join(f'{i}\n' for i in sorted(gts)))
    return d, gts, dets


@needs_dota
@pytest.mark.parametrize('thr', [0.5, 0.7])
def test_agrees_with_the_devkit_rules_on_real_labels(real_case, oracle, thr):
    d, gts, dets = real_case
    r = eval_dota(d/'det', DOTA/'labelTxt', iou_thr=thr)
    compared = 0
    for c in DOTA_CLASSES:
        if r['num_gt'][c] == 0:
            assert r['ap'][c] is None; continue
        if c not in dets: assert r['ap'][c] == 0.0; continue
        ref = oracle[1].voc_eval(str(d/'det'/'Task1_{:s}.txt'), str(DOTA/'labelTxt'/'{:s}.txt'), str(d/'imageset.txt'), c, thr)[2]
        assert r['ap'][c] == pytest.approx(ref, abs=1e-12), c
        compared += 1
    assert compared >= 5 and 0.05 < r['map'] < 0.95
    assert r['map'] == pytest.approx(np.mean([v for v in r['ap'].values() if v is not None]))


@needs_dota
def test_ties_rank_as_in_the_devkit(real_case, oracle, tmp_path):
    "Every score equal: the ranking is np.argsort's, and the APs still agree."
    d, gts, dets = real_case
    flat = {c: f.assign(score=0.5) for c, f in dets.items()}
    write_task1(tmp_path, flat)
    r = eval_dota(tmp_path, DOTA/'labelTxt')
    for c in ('small-vehicle', 'large-vehicle', 'plane'):
        if r['num_gt'][c] and c in dets:
            ref = oracle[1].voc_eval(str(tmp_path/'Task1_{:s}.txt'), str(DOTA/'labelTxt'/'{:s}.txt'), str(d/'imageset.txt'), c)[2]
            assert r['ap'][c] == pytest.approx(ref, abs=1e-12), c


@needs_dota
def test_perfect_and_empty_detections(tmp_path):
    gts = read_dota_gt(DOTA/'labelTxt')
    rows = {c: [] for c in DOTA_CLASSES}
    for name, g in gts.items():
        for p, l in zip(g['polygons'].reshape(-1, 8).tolist(), g['label'].tolist()):
            rows[DOTA_CLASSES[l]].append([name, 1.0, *p])
    perfect = {c: pd.DataFrame(r, columns=list(TASK1_COLUMNS)) for c, r in rows.items() if r}
    r = dota_eval(perfect, gts)
    assert all(v == pytest.approx(1.0) for v in r['ap'].values() if v is not None) and r['map'] == pytest.approx(1.0)
    assert r['invalid_polygons'] == 0
    assert dota_eval({}, gts)['map'] == 0.0


def test_polygon_iou_matches_shapely():
    rng = np.random.default_rng(3)
    c = rng.uniform(0, 30, (5000, 1, 2)); wh = rng.uniform(1, 20, (5000, 1, 2)); th = rng.uniform(-3, 3, 5000)
    u = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / 2 * wh
    R = np.stack([np.stack([np.cos(th), -np.sin(th)], 1), np.stack([np.sin(th), np.cos(th)], 1)], 1)
    q = (c + np.einsum('nij,nkj->nki', R, u)).reshape(-1, 8)
    a, b = q[:2500], q[2500:]
    ref = shapely.area(shapely.intersection(shapely.polygons(a.reshape(-1, 4, 2)), shapely.polygons(b.reshape(-1, 4, 2))))
    assert np.abs(convex_intersection_area(a, b) - ref).max() < 1e-9
    assert np.abs(intersection_area(a, b) - ref).max() < 1e-9
    m = poly_iou(a[:40], b[:60]).numpy()
    i, j = 7, 11
    pa, pb = shapely.polygons(a[i].reshape(4, 2)), shapely.polygons(b[j].reshape(4, 2))
    inter = shapely.area(shapely.intersection(pa, pb))
    assert m[i, j] == pytest.approx(inter / (pa.area + pb.area - inter), abs=1e-12)


def _hand(tmp_path):
    ann = tmp_path/'labelTxt'; ann.mkdir()
    (ann/'P1.txt').write_text('imagesource:GoogleEarth\ngsd:0.1\n'
                              '0 0 12 0 12 12 0 12 plane 0\n100 0 110 0 110 10 100 10 plane 1\n0 50 10 50 10 60 0 60 ship 0\n')
    det = tmp_path/'det'; det.mkdir()
    # IoU exactly 0.5 (12x12 squares shifted by 4), a duplicate, a detection of the difficult plane
    (det/'Task1_plane.txt').write_text('P1 0.9 4 0 16 0 16 12 4 12\nP1 0.8 4 0 16 0 16 12 4 12\nP1 0.7 100 0 110 0 110 10 100 10\n')
    return det, ann


def test_cli_strict_threshold_nulls_and_missing_files(tmp_path, capsys):
    det, ann = _hand(tmp_path)
    assert main(['eval-dota', '--det', str(det), '--ann', str(ann), '--json', str(tmp_path/'r.json')]) == 0
    r = json.loads((tmp_path/'r.json').read_text())
    assert r['ap']['plane'] == 0.0 and r['ap']['ship'] == 0.0 and r['ap']['harbor'] is None   # IoU 0.5 is not > 0.5
    assert r['num_gt']['plane'] == 1 and r['map'] == 0.0 and 'ship' in r['missing_result_files']
    assert main(['eval-dota', '--det', str(det), '--ann', str(ann), '--inclusive', '--json', str(tmp_path/'r2.json')]) == 0
    r2 = json.loads((tmp_path/'r2.json').read_text())
    assert r2['ap']['plane'] == pytest.approx(1.0) and r2['num_tp']['plane'] == 1 and r2['map'] == pytest.approx(0.5)  # the duplicate is a FP after the TP
    out = capsys.readouterr().out
    assert 'mAP' in out and 'IoU > 0.5' in out and 'IoU >= 0.5' in out and 'no result file' in out


@pytest.mark.parametrize('line, what', [
    ('P1 0.9 4 0 16 0 16 12 4', 'expected 10 fields'),
    ('P1 0.9 4 0 16 0 16 12 4 12 7', 'expected 10 fields'),
    ('P1 high 4 0 16 0 16 12 4 12', 'non-numeric'),
    ('P1 0.9 4 0 16 0 16 nan 4 12', 'NaN or Inf'),
    ('P1 0.9 4 0 16 0 16 inf 4 12', 'NaN or Inf'),
])
def test_bad_result_lines_are_named(tmp_path, line, what):
    det, ann = _hand(tmp_path)
    (det/'Task1_plane.txt').write_text('P1 0.5 0 0 12 0 12 12 0 12\n' + line + '\n')
    with pytest.raises(DataFormatError, match=rf'Task1_plane\.txt:2: .*{what}'):
        eval_dota(det, ann)
    assert main(['eval-dota', '--det', str(det), '--ann', str(ann)]) == 2


def test_unknown_image_class_and_missing_folders(tmp_path):
    det, ann = _hand(tmp_path)
    (det/'Task1_plane.txt').write_text('P9 0.5 0 0 12 0 12 12 0 12\n')
    with pytest.raises(DataFormatError, match=r"image 'P9' has no ground-truth label file"):
        eval_dota(det, ann)
    (det/'Task1_plane.txt').write_text('')
    assert eval_dota(det, ann)['ap']['plane'] == 0.0          # an empty result file: no detections (the devkit crashes)
    (det/'Task1_airship.txt').write_text('')
    with pytest.raises(DataFormatError, match=r"unknown classes \['airship'\]"):
        eval_dota(det, ann)
    (det/'Task1_airship.txt').unlink()
    with pytest.raises(DataNotFoundError, match='detections folder not found'):
        eval_dota(tmp_path/'nope', ann)
    with pytest.raises(DataNotFoundError, match='label folder not found'):
        eval_dota(det, tmp_path/'nope')
    (ann/'P2.txt').write_text('0 0 1 0 1 1 0 1 airship 0\n')
    with pytest.raises(DataFormatError, match=r'P2\.txt:1: class'):
        read_dota_gt(ann)


def test_read_write_round_trip(tmp_path):
    df = pd.DataFrame([['P0001', 0.25, *range(8)], ['P0002', 1.0, *np.arange(8) + .5]], columns=list(TASK1_COLUMNS))
    write_task1(tmp_path, {'plane': df})
    back = read_task1_file(tmp_path/'Task1_plane.txt')
    assert back['image'].tolist() == ['P0001', 'P0002'] and np.allclose(back.iloc[:, 1:].to_numpy(float), df.iloc[:, 1:].to_numpy(float))
    assert len(read_task1_file(tmp_path/'Task1_ship.txt')) == 0 and (tmp_path/'Task1_ship.txt').stat().st_size == 0


@needs_dota
def test_bench_harness_beside_a_devkit(oracle):
    r = bench_dota_eval(DOTA/'labelTxt', devkit=oracle[0], images=12, iou_thrs=(0.5,))
    row = r['rows'][0]
    assert r['images'] == 12 and r['detections'] > 500 and row['classes_compared'] >= 5
    assert row['identical'] or row['max_abs_ap_diff'] < 1e-12
    md = format_dota_bench(r, 'md')
    assert '| iou_thr |' in md and 'speedup' in md


def test_poly_nms_matches_a_plain_greedy_loop():
    rng = np.random.default_rng(5)
    n = 300
    c = rng.uniform(0, 200, (n, 1, 2)); wh = rng.uniform(5, 40, (n, 1, 2)); th = rng.uniform(-3, 3, n)
    u = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / 2 * wh
    R = np.stack([np.stack([np.cos(th), -np.sin(th)], 1), np.stack([np.sin(th), np.cos(th)], 1)], 1)
    p = (c + np.einsum('nij,nkj->nki', R, u)).reshape(-1, 8)
    s = rng.random(n); g = rng.integers(0, 3, n)
    for thr in (0.1, 0.3, 0.5):
        full = poly_iou(p, p).numpy()
        order, keep = list(np.argsort(-s, kind='stable')), []
        while order:
            i = order.pop(0); keep.append(i)
            order = [j for j in order if not (g[j] == g[i] and full[i, j] > thr)]
        from rsrepro.rotated import poly_nms
        assert poly_nms(p, s, thr, g).tolist() == keep, thr


@needs_dota
def test_split_then_merge_recovers_the_real_objects():
    """Split the real DOTA samples into 512-px tiles (gap 128), treat every cut piece as a detection scored by the
    fraction of its object the tile holds, merge: every object that some tile holds whole, and that no other object
    of its class overlaps at IoU > 0.1 (the merge NMS threshold), comes back exactly (within the devkit's 1-px
    truncation), once."""
    from PIL import Image
    from rsrepro.rotated import hbb, merge_tiles, split_image, tile_origins
    gts = read_dota_gt(DOTA/'labelTxt')
    checked = 0
    for name, g in gts.items():
        w, h = Image.open(DOTA/'images'/f'{name}.png').size
        rows = {}
        for tname, tile, o in split_image(np.zeros((h, w), np.uint8), g, name, size=512, gap=128):
            assert tile.shape == (min(512, h), min(512, w))
            assert (o['polygons'] >= 0).all() and (o['polygons'] <= 512).all()
            for q, l, f in zip(o['polygons'].reshape(-1, 8), o['label'], o['fraction']):
                rows.setdefault(DOTA_CLASSES[l], []).append([tname, f, *q])
        merged = merge_tiles({c: pd.DataFrame(r, columns=list(TASK1_COLUMNS)) for c, r in rows.items()})
        P, L = g['polygons'].numpy().reshape(-1, 8), g['label'].numpy()
        box_ = hbb(P)
        whole = np.zeros(len(P), bool)
        for left in tile_origins(w, 512, 128):
            for up in tile_origins(h, 512, 128):
                whole |= (box_[:, 0] >= left) & (box_[:, 1] >= up) & (box_[:, 2] <= min(left + 512, w - 1)) & \
                         (box_[:, 3] <= min(up + 512, h - 1))
        for k in np.nonzero(whole)[0]:
            same = np.nonzero(L == L[k])[0]
            if (poly_iou(P[k:k + 1], P[same[same != k]]).numpy() > 0.1).any(): continue
            X = merged[DOTA_CLASSES[L[k]]][list(TASK1_COLUMNS[2:])].to_numpy()
            assert (np.abs(X - P[k]).max(1) < 1).sum() == 1, (name, k, P[k])
            checked += 1
        assert sum(len(d) for d in merged.values()) < sum(len(r) for r in rows.values())   # copies were merged
    assert checked > 550


@needs_dota
def test_split_dota_writes_tiles_and_resumes(tmp_path):
    from rsrepro.detection_data import DOTA as DOTAReader
    from rsrepro.rotated import split_dota
    src = tmp_path/'src'; (src/'images').mkdir(parents=True); (src/'labelTxt').mkdir()
    for k in ('P0075', 'P1888'):
        shutil.copy(DOTA/'images'/f'{k}.png', src/'images'); shutil.copy(DOTA/'labelTxt'/f'{k}.txt', src/'labelTxt')
    n = split_dota(src, tmp_path/'dst', size=512, gap=128, progress=False)
    tiles = sorted((tmp_path/'dst'/'labelTxt').glob('*.txt'))
    assert n == len(tiles) == len(list((tmp_path/'dst'/'images').glob('*.png'))) == 2 + 4   # P0075: 1 x 2, P1888: 2 x 2
    ds = DOTAReader(tmp_path/'dst')                     # the tiles read back with rsrepro's own DOTA reader
    s = ds[0]
    assert s['image'].shape[1:] == (512, 451) and len(s['label']) == len(s['polygons'])
    before = {p: p.stat().st_mtime_ns for p in tiles}
    (tiles[0]).unlink()                                 # an interrupted run: one tile's label is missing
    assert split_dota(src, tmp_path/'dst', size=512, gap=128, progress=False) == n
    assert tiles[0].is_file() and all(p.stat().st_mtime_ns == before[p] for p in tiles[1:])
    (src/'images'/'P1888.png').unlink()
    with pytest.raises(DataNotFoundError, match=r'P1888\.txt: no image P1888\.png'):
        split_dota(src, tmp_path/'dst2', progress=False)


def test_split_reader_writes_dota_layout_tiles_of_any_reader(tmp_path):
    "A DIOR-R sample split by `split_reader` reads back with the DOTA reader and DIOR classes; every object lands in a tile."
    from rsrepro.detection_data import DIOR_CLASSES, DIORR, DOTA
    from rsrepro.rotated import split_reader
    root = Path(__file__).resolve().parents[2]/'shared'/'data'/'DIOR-R'
    if not root.is_dir(): pytest.skip('the real DIOR-R sample is absent')
    r = DIORR(root=root, split='trainval')
    n = split_reader(r, tmp_path, DIOR_CLASSES, 400, 100, progress=False)
    t = DOTA(root=tmp_path, classes=DIOR_CLASSES)
    assert n == len(t) == 9 and t.classes == DIOR_CLASSES
    labels = {int(l) for v in t.targets.values() for l in v['label']}
    assert labels == {int(l) for l in r.targets['00001']['label']}
    img = t[0]['image']; assert img.shape[1:] == (400, 400)
    assert split_reader(r, tmp_path, DIOR_CLASSES, 400, 100, progress=False) == 9          # resumable: kept
