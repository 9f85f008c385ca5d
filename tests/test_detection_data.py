"Tests of rsrepro.detection_data: VEDAI, DIOR/DIOR-R, DOTA, AVIID-3 readers and the VEDAI -> ultralytics export."
from collections import Counter
from pathlib import Path
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import rsrepro.detection_data as dd
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.data import find_shared_data

SHARED = find_shared_data()
needs = lambda sub: pytest.mark.skipif(SHARED is None or not (SHARED/sub).is_dir(), reason=f'no shared {sub} sample')
VEDAI_ANN = (SHARED/'VEDAI'/'Annotations1024'/'annotation1024.txt') if SHARED else None


def test_registered():
    for n in ('vedai', 'dior', 'dior_r', 'dota', 'aviid3'): assert n in DATASETS.names()


def test_polygon_to_hbb():
    c = torch.tensor([[[0., 0.], [4., 1.], [3., 5.], [-1., 4.]], [[2., 2.], [2., 2.], [2., 2.], [2., 2.]]])
    assert dd.polygon_to_hbb(c).tolist() == [[-1., 0., 4., 5.], [2., 2., 2., 2.]]
    with pytest.raises(ValueError): dd.polygon_to_hbb(torch.zeros(3, 4))


# ---------------------------------------------------------------- VEDAI, real annotation file
@needs('VEDAI')
def test_vedai_parse_all_annotations():
    ann = dd.parse_vedai_annotations(VEDAI_ANN)
    s = dd.vedai_summary(ann)
    assert s['n_images'] == 1246 and s['n_objects'] == 3757
    assert s['dropped'] == {'motorcycle': 4, 'bus': 3, 'plane': 48} and s['n_kept'] == 3757 - 55
    assert s['kept'] == {'car': 1378, 'pickup': 954, 'camping': 397, 'truck': 307, 'other': 204, 'tractor': 190,
                         'boat': 171, 'van': 101}
    # x's then y's: first line of the file "554 605 607 558 1004 996 1016 1021"
    assert ann['00000000']['polygons'][0].tolist() == [[554, 1004], [605, 996], [607, 1016], [558, 1021]]


@needs('VEDAI')
def test_vedai_real_scenes():
    ds = dd.VEDAI()
    assert ds.ids == ['00000000', '00000057', '00000096'] and ds.data_source.startswith(('shared-samples:', 'RSREPRO'))
    ann = dd.parse_vedai_annotations(VEDAI_ANN)
    for k in range(3):
        s = ds[k]
        assert s['image'].shape == (4, 512, 512) and s['image'].dtype == torch.float32
        assert 0 <= float(s['image'].min()) and float(s['image'].max()) <= 1
        b = s['boxes']
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 512).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 512).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        a = ann[s['id']]; keep = np.isin(a['code'], list(dd.VEDAI_CODE_TO_LABEL))
        # centres are the file's (xc, yc) halved (1024 frame -> 512 image)
        assert np.allclose(s['centers'].numpy(), a['centers'][keep] / 2, atol=1e-4)
        # the box encloses the centre and is centred near it (oriented rectangles: within a few pixels)
        mid = (b[:, :2] + b[:, 2:]) / 2
        assert (mid - s['centers']).abs().max() < 3
        assert torch.allclose(s['polygons'].mean(1), s['centers'], atol=3)
    assert ds[0]['boxes'].tolist() == [[277.0, 498.0, 303.5, 510.5]]   # 554..607 / 2, 996..1021 / 2
    assert ds[0]['label'].tolist() == [dd.VEDAI_CLASSES.index('truck')]


@needs('VEDAI')
def test_vedai_class_histogram_by_hand():
    # 00000057: codes 1,5,1,2,1,9,11,11,1,10,23 (file lines), none dropped
    s = dd.VEDAI()[1]
    assert s['id'] == '00000057' and len(s['label']) == 11
    hist = Counter(dd.VEDAI_CLASSES[i] for i in s['label'].tolist())
    assert hist == {'car': 4, 'pickup': 2, 'camping': 1, 'truck': 1, 'van': 1, 'other': 1, 'boat': 1}
    assert s['occluded'].tolist().count(True) == 1     # the 'other' (code 10) is the one occluded object


@needs('VEDAI')
def test_vedai_modalities_and_ir_channel():
    rgb = dd.VEDAI(modalities=('rgb',))[0]['image']
    both = dd.VEDAI()[0]['image']
    assert rgb.shape == (3, 512, 512) and torch.equal(both[:3], rgb)
    ir = np.asarray(Image.open(SHARED/'VEDAI'/'Vehicules512'/'00000000_ir.png'))
    assert torch.allclose(both[3], torch.from_numpy(ir[:, :, 0] / 255.).float())


@needs('VEDAI')
def test_vedai_splits_need_fold_files():
    with pytest.raises(DataNotFoundError, match='fold03.txt.*fold03test.txt'): dd.VEDAI(split='train', fold=3)
    with pytest.raises(DataNotFoundError, match='Vehicules1024'): dd.VEDAI(size=1024)


# ---------------------------------------------------------------- VEDAI fixtures
def _vedai_fixture(tmp_path, ids=('00000001', '00000002', '00000003'), ann_lines=None, size=512, frame=1024):
    r = tmp_path/'VEDAI'; (r/f'Vehicules{size}').mkdir(parents=True); (r/f'Annotations{frame}').mkdir()
    for i in ids:
        Image.fromarray(np.full((size, size, 3), 10, np.uint8)).save(r/f'Vehicules{size}'/f'{i}_co.png')
        Image.fromarray(np.full((size, size), 20, np.uint8)).save(r/f'Vehicules{size}'/f'{i}_ir.png')
    lines = ann_lines if ann_lines is not None else [
        '00000001 110 220 0 100 120 120 100 210 210 230 230 001 1 0',
        '00000002 300 300 0 290 310 310 290 290 290 310 310 011 1 0']
    (r/f'Annotations{frame}'/f'annotation{frame}.txt').write_text('\n'.join(lines) + '\n')
    return r


def test_vedai_corrupt_line_names_file_and_line(tmp_path):
    r = _vedai_fixture(tmp_path, ann_lines=['00000001 110 220 0 100 120 120 100 210 210 230 230 001 1 0',
                                            '00000002 300 300 0 290 310 310 290 290 290 310 011 1 0'])
    with pytest.raises(DataFormatError, match=r'annotation1024\.txt:2: expected 15 fields'): dd.VEDAI(root=r)
    (r/'Annotations1024'/'annotation1024.txt').write_text('00000001 1 2 0 1 2 3 4 1 2 3 4 099 1 0\n')
    with pytest.raises(DataFormatError, match=r'annotation1024\.txt:1: unknown VEDAI class code 99'): dd.VEDAI(root=r)
    (r/'Annotations1024'/'annotation1024.txt').write_text('\n00000001 1 2 0 1 2 3 x 1 2 3 4 001 1 0\n')
    with pytest.raises(DataFormatError, match=r'annotation1024\.txt:2: non-numeric'): dd.VEDAI(root=r)


def test_vedai_scale_general(tmp_path):
    # 1024 images with a 1024 annotation: no scaling; 512 images with a 512 annotation: none either
    r = _vedai_fixture(tmp_path, size=1024, frame=1024)
    assert dd.VEDAI(root=r, size=1024)[0]['boxes'].tolist() == [[100., 210., 120., 230.]]
    r2 = _vedai_fixture(tmp_path/'b', size=512, frame=512)
    assert dd.VEDAI(root=r2)[0]['boxes'].tolist() == [[100., 210., 120., 230.]]


def test_vedai_folds_and_leak_guard(tmp_path):
    r = _vedai_fixture(tmp_path)
    a = r/'Annotations1024'
    (a/'fold01.txt').write_text('00000001\n00000002\n')
    (a/'fold01test.txt').write_text('00000003\n')
    tr, te = dd.VEDAI(root=r, split='train'), dd.VEDAI(root=r, split='test')
    assert tr.ids == ['00000001', '00000002'] and te.ids == ['00000003'] and not set(tr.ids) & set(te.ids)
    # a leaking train list (test id 3 also in train, written unpadded as some public copies do)
    (a/'fold01.txt').write_text('00000001\n00000002\n3\n')
    with pytest.warns(UserWarning, match='leak: 1 test id'):
        tr = dd.VEDAI(root=r, split='train')
    assert tr.ids == ['00000001', '00000002'] and tr.leaked == ['00000003']
    with pytest.raises(DataFormatError, match='leak'): dd.VEDAI(root=r, split='train', on_leak='raise')


def test_vedai_to_yolo(tmp_path):
    import tifffile
    r = _vedai_fixture(tmp_path)
    a = r/'Annotations1024'
    (a/'fold01.txt').write_text('00000001\n00000002\n'); (a/'fold01test.txt').write_text('00000003\n')
    y = dd.vedai_to_yolo({'train': dd.VEDAI(root=r, split='train'), 'val': dd.VEDAI(root=r, split='test')},
                         tmp_path/'yolo')
    txt = y.read_text()
    assert 'channels: 4' in txt and 'train: images/train' in txt and 'val: images/val' in txt
    assert '  1: pickup' in txt and txt.count('\n  ') == 8
    with tifffile.TiffFile(tmp_path/'yolo'/'images'/'train'/'00000001.tiff') as t:
        pages = [p.asarray() for p in t.pages]
    assert len(pages) == 4 and [int(p[0, 0]) for p in pages] == [10, 10, 10, 20] and pages[0].shape == (512, 512)
    # box 100..120 x 210..230 in the 1024 frame -> 50..60 x 105..115 in 512 -> normalised
    lab = (tmp_path/'yolo'/'labels'/'train'/'00000001.txt').read_text().split()
    assert lab[0] == '0' and np.allclose([float(v) for v in lab[1:]], [55/512, 110/512, 10/512, 10/512], atol=1e-6)
    assert (tmp_path/'yolo'/'labels'/'train'/'00000002.txt').read_text().startswith('1 ')
    assert (tmp_path/'yolo'/'labels'/'val'/'00000003.txt').read_text() == ''      # no objects: empty label file
    assert not list((tmp_path/'yolo').rglob('*.tmp'))


# ---------------------------------------------------------------- DIOR / DIOR-R
@needs('DIOR-R')
def test_dior_r_real_sample():
    o = dd.DIORR(root=SHARED/'DIOR-R', split='trainval')[0]
    assert o['id'] == '00001' and o['image'].shape == (3, 800, 800)
    assert o['polygons'].tolist() == [[[133., 237.], [684., 237.], [684., 672.], [133., 672.]]]
    assert o['boxes'].tolist() == [[133., 237., 684., 672.]] and o['angle'].tolist() == [0.0]
    assert dd.DIOR_CLASSES[int(o['label'][0])] == 'golffield' and o['difficult'].tolist() == [False]
    h = dd.DIOR(root=SHARED/'DIOR-R', split='trainval')[0]
    assert h['boxes'].tolist() == o['boxes'].tolist() and 'polygons' not in h
    with pytest.raises(DataNotFoundError, match='train.txt'): dd.DIOR(root=SHARED/'DIOR-R', split='train')


def _dior_xml(objs, oriented):
    body = ''
    for name, v in objs:
        if oriented:
            cs = ''.join(f'<x_{c}>{x}</x_{c}><y_{c}>{y}</y_{c}>' for c, (x, y) in zip(dd._OBB_CORNERS, v))
            body += f'<object><name>{name}</name><difficult>0</difficult><robndbox>{cs}</robndbox><angle>30</angle></object>'
        else:
            body += (f'<object><name>{name}</name><bndbox><xmin>{v[0]}</xmin><ymin>{v[1]}</ymin>'
                     f'<xmax>{v[2]}</xmax><ymax>{v[3]}</ymax></bndbox></object>')
    return f'<annotation><size><width>8</width><height>6</height><depth>3</depth></size>{body}</annotation>'


def test_dior_fixture_classes_and_errors(tmp_path):
    r = tmp_path/'DIOR'
    for d in ('JPEGImages-test', 'Annotations/Horizontal Bounding Boxes', 'Annotations/Oriented Bounding Boxes',
              'ImageSets/Main'):
        (r/d).mkdir(parents=True)
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(r/'JPEGImages-test'/'11726.jpg')
    (r/'ImageSets/Main/test.txt').write_text('11726\n')
    (r/'Annotations/Horizontal Bounding Boxes/11726.xml').write_text(
        _dior_xml([('Expressway-Service-area', (1, 1, 4, 5)), ('windmill', (0, 0, 2, 2))], False))
    (r/'Annotations/Oriented Bounding Boxes/11726.xml').write_text(
        _dior_xml([('vehicle', ((1, 0), (5, 2), (4, 4), (0, 2)))], True))
    h = dd.DIOR(root=r, split='test')[0]
    assert h['label'].tolist() == [7, 19] and h['boxes'].tolist() == [[1, 1, 4, 5], [0, 0, 2, 2]]
    o = dd.DIORR(root=r, split='test')[0]
    assert o['boxes'].tolist() == [[0, 0, 5, 4]] and o['label'].tolist() == [18] and o['angle'].tolist() == [30.]
    (r/'Annotations/Horizontal Bounding Boxes/11726.xml').write_text(_dior_xml([('tank', (1, 1, 4, 5))], False))
    with pytest.raises(DataFormatError, match=r"11726\.xml: unknown DIOR class 'tank'"): dd.DIOR(root=r, split='test')
    (r/'Annotations/Horizontal Bounding Boxes/11726.xml').write_text('<annotation><object>')
    with pytest.raises(DataFormatError, match=r'11726\.xml: cannot parse the XML'): dd.DIOR(root=r, split='test')


# ---------------------------------------------------------------- DOTA
@needs('DOTA')
def test_dota_real_samples():
    ds = dd.DOTA(root=SHARED/'DOTA')
    assert ds.ids == ['P0075', 'P0168', 'P0706', 'P0770', 'P1888']
    n = {i: sum(1 for l in (SHARED/'DOTA'/'labelTxt'/f'{i}.txt').read_text().splitlines()[2:] if l.strip())
         for i in ds.ids}
    assert n['P0075'] == 2 and n['P0706'] == 536
    for i in ds.ids: assert len(ds.targets[i]['label']) == n[i]
    s = ds[0]
    assert s['image'].shape == (3, 839, 451)       # PNG 451 wide x 839 high
    assert s['polygons'][0].tolist() == [[218, 108], [249, 101], [260, 146], [224, 150]]
    assert s['boxes'][0].tolist() == [218, 101, 260, 150]
    assert [dd.DOTA_CLASSES[j] for j in s['label']] == ['swimming-pool', 'roundabout']
    assert abs(s['gsd'] - 0.139152881468) < 1e-12 and s['difficult'].tolist() == [False, False]
    all_lab = torch.cat([ds.targets[i]['label'] for i in ds.ids])
    assert all_lab.min() >= 0 and all_lab.max() < 15


def test_dota_errors(tmp_path):
    r = tmp_path/'DOTA'; (r/'images').mkdir(parents=True); (r/'labelTxt').mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(r/'images'/'P9.png')
    (r/'labelTxt'/'P9.txt').write_text('imagesource:x\ngsd:null\n0 0 2 0 2 2 0 2 plane 1\n0 0 1 0 1 1 0 1 container-crane 0\n')
    with pytest.raises(DataFormatError, match=r"P9\.txt:4: class 'container-crane'"): dd.DOTA(root=r)
    (r/'labelTxt'/'P9.txt').write_text('0 0 2 0 2 2 0 2 plane 1\n')        # no header lines: accepted
    t = dd.DOTA(root=r).targets['P9']
    assert t['difficult'].tolist() == [True] and np.isnan(t['gsd'])
    with pytest.raises(DataNotFoundError, match='train'): dd.DOTA(root=r, split='train')


# ---------------------------------------------------------------- AVIID-3 (fixture in the assumed layout)
def test_aviid3_expand(tmp_path):
    r = tmp_path/'AVIID-3'
    rng = np.random.default_rng(0)
    for split, names in (('train', ['a', 'b']), ('test', ['c'])):
        (r/f'{split}A').mkdir(parents=True); (r/f'{split}B').mkdir()
        for n in names:
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(r/f'{split}A'/f'{n}.png')
            Image.fromarray(rng.integers(0, 255, (512, 512), dtype=np.uint8)).save(r/f'{split}B'/f'{n}.png')
    full = dd.AVIID3(root=r, split='train')
    assert len(full) == 2 and full[0]['image'].shape == (4, 512, 512)
    ex = dd.AVIID3(root=r, split='train', expand=True)
    assert len(ex) == 8 and ex[0]['id'] == 'a:t0'
    img = full[0]['image']     # 512 input: resizing is a no-op, so the 4 tiles are exactly the quadrants
    assert torch.equal(ex[0]['image'], img[:, :256, :256]) and torch.equal(ex[1]['image'], img[:, :256, 256:])
    assert torch.equal(ex[3]['image'], img[:, 256:, 256:])
    assert len(dd.AVIID3(root=r, expand=True)) == 12
    # a 480x480 pair (the paper's stated size) is resized to 512 first
    (r/'trainA'/'d.png').unlink(missing_ok=True)
    Image.fromarray(np.zeros((480, 480, 3), np.uint8)).save(r/'trainA'/'d.png')
    with pytest.raises(DataNotFoundError, match=r'd\.png: no infrared partner d\.\* in .*trainB'): dd.AVIID3(root=r, split='train')
    Image.fromarray(np.zeros((480, 480), np.uint8)).save(r/'trainB'/'d.png')
    ex = dd.AVIID3(root=r, split='train', expand=True)
    assert ex[2 * 4 + 3]['image'].shape == (4, 256, 256) and ex[2 * 4]['id'] == 'd:t0'
    (tmp_path/'empty').mkdir()
    with pytest.raises(DataNotFoundError, match='testA'): dd.AVIID3(root=tmp_path/'empty', split='test')


@needs('DIOR-R')
def test_dior_falls_back_to_dior_r_hbb(monkeypatch):
    monkeypatch.delenv('RSREPRO_DATA', raising=False)
    with pytest.warns(UserWarning, match='horizontal boxes of DIOR-R'):
        ds = dd.DIOR(split='trainval')
    assert 'DIOR-R horizontal boxes' in ds.data_source and ds[0]['boxes'].tolist() == [[133., 237., 684., 672.]]
