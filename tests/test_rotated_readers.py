"""mutdet's extra detection readers (OHD-SJTU-S/L, FAIR1M, HRRSD) and their stand-ins cut from the real DOTA sample:
the readers give back exactly what the builders wrote (and what DOTA has there), honour the split files, and refuse
bad input with an error that names the file."""
import functools, re, shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import rsrepro.detection_data as dd
import rsrepro.standins as S
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.data import find_shared_data, get_dataset

SHARED = find_shared_data()
needs_dota = pytest.mark.skipif(SHARED is None or not (SHARED/'DOTA'/'labelTxt').is_dir(), reason='no shared DOTA sample')
_CROP = re.compile(r'^\s+(\S+) <- DOTA (P\d+)\.png window top=(\d+) left=(\d+) h=(\d+) w=(\d+) \((\d+) objects\)$', re.M)


def test_class_lists():
    assert dd.OHD_SJTU_S_CLASSES == ('ship', 'plane')
    assert len(dd.OHD_SJTU_L_CLASSES) == 6 == len(set(dd.OHD_SJTU_L_CLASSES))
    assert set(dd.OHD_SJTU_L_CLASSES) == {'ship', 'plane', 'small-vehicle', 'large-vehicle', 'harbor', 'helicopter'}
    assert dd.OHD_SJTU_L_CLASSES[:2] == dd.OHD_SJTU_S_CLASSES and dd.OHD_SJTU_CLASSES['S'] == dd.OHD_SJTU_S_CLASSES
    assert len(dd.FAIR1M_CLASSES) == 37 == len(set(dd.FAIR1M_CLASSES)) == len(dd.FAIR1M_CLASS_CATEGORY)
    assert dd.FAIR1M_CATEGORIES == ('Ship', 'Vehicle', 'Airplane', 'Court', 'Road')
    assert [dd.FAIR1M_CLASS_CATEGORY.count(j) for j in range(5)] == [9, 10, 11, 4, 3]
    cat = dict(zip(dd.FAIR1M_CLASSES, dd.FAIR1M_CLASS_CATEGORY))
    assert (cat['Boeing737'], cat['Small Car'], cat['Warship'], cat['Bridge'], cat['Tennis Court']) == (2, 1, 0, 4, 3)
    assert len(dd.HRRSD_CLASSES) == 13 == len(set(dd.HRRSD_CLASSES)) and 'T junction' in dd.HRRSD_CLASSES
    assert {'crossroad', 'parking lot', 'storage tank', 'ground track field'} <= set(dd.HRRSD_CLASSES)


def test_registered():
    names = DATASETS.names()
    for name, cls in (('ohd_sjtu_s', dd.OHDSJTUS), ('ohd_sjtu_l', dd.OHDSJTUL), ('fair1m', dd.FAIR1M), ('hrrsd', dd.HRRSD)):
        assert name in names and DATASETS.get(name) is cls
    assert dd.OHDSJTUS.mutdet_use == dd.OHDSJTU.mutdet_use and '600x600' in dd.OHDSJTU.mutdet_use
    assert 'SAM' in dd.FAIR1M.mutdet_use and 'SAM' in dd.HRRSD.mutdet_use


def test_hbb_to_polygon_roundtrip():
    b = torch.tensor([[1., 2., 5., 9.], [0., 0., 3., 3.]])
    p = dd.hbb_to_polygon(b)
    assert p.shape == (2, 4, 2) and torch.equal(dd.polygon_to_hbb(p), b)
    assert p[0].tolist() == [[1., 2.], [5., 2.], [5., 9.], [1., 9.]]


# ---- stand-ins, built once from the shared DOTA sample ----

@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    if SHARED is None or not (SHARED/'DOTA'/'labelTxt').is_dir(): pytest.skip('no shared DOTA sample')
    d = tmp_path_factory.mktemp('data')
    return {'ohd': S.smoke_ohd_sjtu_root(d/'OHD-SJTU', data_root=SHARED),
            'fair1m': S.smoke_fair1m_root(d/'FAIR1M', data_root=SHARED),
            'hrrsd': S.smoke_hrrsd_root(d/'HRRSD', data_root=SHARED), 'data': d}


@functools.lru_cache(maxsize=None)
def _dota():
    return dd.DOTA(root=SHARED/'DOTA')


@functools.lru_cache(maxsize=None)
def _dota_image(i):
    ds = _dota(); return ds[ds.ids.index(i)]['image']


def _crops(source: Path) -> dict[str, tuple]:
    "The crop lines of a SOURCE.txt: file -> (DOTA id, top, left, h, w, n objects)."
    text = source.read_text()
    return {m[0]: (m[1], *map(int, m[2:])) for m in _CROP.findall(text)}


def _expected(src, r, c, h, w, mapping):
    "DOTA objects of mapped classes entirely inside the window, shifted: polygons, target class names, difficult."
    t = _dota().targets[src]
    poly = t['polygons'].double().numpy()
    names = [mapping.get(dd.DOTA_CLASSES[j]) for j in t['label'].tolist()]
    x, y = poly[..., 0], poly[..., 1]
    m = (np.array([n is not None for n in names]) & (x >= c).all(1) & (x < c + w).all(1) & (y >= r).all(1)
         & (y < r + h).all(1))
    return poly[m] - (c, r), [n for n, k in zip(names, m) if k], t['difficult'].numpy()[m]


@needs_dota
def test_standins_are_marked_and_idempotent(roots, tmp_path):
    for k in ('ohd', 'fair1m', 'hrrsd'):
        src = (roots[k]/'SOURCE.txt').read_text()
        assert src.startswith(S.SMOKE_MARKER) and 'NOT ' in src and 'classes (DOTA -> this dataset)' in src
    assert 'head point is NOT annotated' in (roots['ohd']/'OHD-SJTU-L'/'SOURCE.txt').read_text()
    for ds in (dd.OHDSJTUS(root=roots['ohd']), dd.OHDSJTUL(root=roots['ohd']), dd.FAIR1M(root=roots['fair1m']),
               dd.HRRSD(root=roots['hrrsd'])):
        assert S.is_standin(ds.root) and len(ds) > 0
    assert S.smoke_hrrsd_root(roots['hrrsd'], data_root=SHARED) == roots['hrrsd']      # complete: returned as it is
    r = _copy(roots['fair1m'], tmp_path, 'again')                                 # interrupted before SOURCE.txt
    (r/'SOURCE.txt').unlink()
    x = r/'train'/'part1'/'labelXml'/'0.xml'; before = (x.stat().st_mtime_ns, x.read_text())
    assert S.smoke_fair1m_root(r, data_root=SHARED) == r and S.is_standin(r)
    assert (x.stat().st_mtime_ns, x.read_text()) == before                        # existing files are kept


@needs_dota
@pytest.mark.parametrize('version', ['S', 'L'])
def test_ohd_sjtu_reads_back_dota(roots, version):
    sub = roots['ohd']/f'OHD-SJTU-{version}'
    classes = dd.OHD_SJTU_CLASSES[version]
    mapping = {c: c for c in classes}
    crops = _crops(sub/'SOURCE.txt')
    ds = dd.OHDSJTU(root=roots['ohd'], split='all', version=version)
    assert sorted(ds.ids) == sorted(f.replace('/images/', '/').removesuffix('.jpg') for f in crops)
    assert ds.root == sub and ds.classes == classes
    n_obj = 0
    for f, (src, r, c, h, w, n) in crops.items():
        s = ds[ds.ids.index(f.replace('/images/', '/').removesuffix('.jpg'))]
        poly, names, diff = _expected(src, r, c, h, w, mapping)
        assert len(s['label']) == n == len(names) > 0
        assert torch.allclose(s['polygons'].double(), torch.from_numpy(poly), atol=1e-4)
        assert [classes[j] for j in s['label'].tolist()] == names and s['difficult'].numpy().tolist() == diff.tolist()
        assert torch.allclose(s['head'], (s['polygons'][:, 0] + s['polygons'][:, 1]) / 2)   # the stand-in's head point
        assert torch.equal(s['boxes'], dd.polygon_to_hbb(s['polygons']))
        ref = _dota_image(src)[:, r:r + h, c:c + w]
        assert s['image'].shape == ref.shape and (s['image'] - ref).abs().mean() < 0.02      # JPEG of the real pixels
        # the text the builder wrote, parsed independently
        part, stem = f.split('/images/')
        rows = [l.split() for l in (sub/part/'rotation_txt'/f'{stem[:-4]}.txt').read_text().splitlines()]
        assert [r_[10] for r_ in rows] == names
        assert np.allclose(np.array([[float(v) for v in r_[:10]] for r_ in rows]),
                           torch.cat([s['polygons'].reshape(-1, 8), s['head']], 1).numpy())
        n_obj += n
    assert n_obj > 100


@needs_dota
def test_ohd_sjtu_splits(roots):
    tv, te = dd.OHDSJTUL(root=roots['ohd'], split='trainval'), dd.OHDSJTUL(root=roots['ohd'], split='test')
    assert dd.OHDSJTUL(root=roots['ohd'], split='train').ids == tv.ids          # OHD-SJTU has no val: train = trainval
    assert tv.ids == sorted(p.stem for p in (roots['ohd']/'OHD-SJTU-L'/'trainval'/'images').glob('*.jpg'))
    assert te.ids == sorted(p.stem for p in (roots['ohd']/'OHD-SJTU-L'/'test'/'images').glob('*.jpg'))
    assert tv.ids and te.ids and not set(tv.ids) & set(te.ids)
    assert len(dd.OHDSJTUL(root=roots['ohd']/'OHD-SJTU-L', split='all')) == len(tv) + len(te)
    with pytest.raises(ValueError, match='val'): dd.OHDSJTUS(root=roots['ohd'], split='val')
    with pytest.raises(ValueError, match="'S' or 'L'"): dd.OHDSJTU(root=roots['ohd'], version='M')


@needs_dota
def test_fair1m_reads_back_dota(roots):
    crops = _crops(roots['fair1m']/'SOURCE.txt')
    mapping = S._DOTA_TO['fair1m']
    tr, va, te = (dd.FAIR1M(root=roots['fair1m'], split=s) for s in ('train', 'val', 'test'))
    assert tr.ids == ['part1/0', 'part1/1', 'part1/2'] and va.ids == ['3'] and te.ids == ['4']
    for f, (src, r, c, h, w, n) in crops.items():
        ds, i = (te, f.split('/')[-1][:-4]) if f.startswith('test/') else \
                (va, f.split('/')[-1][:-4]) if f.startswith('validation/') else (tr, 'part1/' + f.split('/')[-1][:-4])
        s = ds[ds.ids.index(i)]
        assert torch.equal(s['image'], _dota_image(src)[:, r:r + h, c:c + w])              # TIFF: lossless
        if ds is te:
            assert set(s) == {'image', 'id'}; continue
        poly, names, _ = _expected(src, r, c, h, w, mapping)
        assert len(names) == n > 0 and [dd.FAIR1M_CLASSES[j] for j in s['label'].tolist()] == names
        assert torch.allclose(s['polygons'].double(), torch.from_numpy(poly), atol=1e-4)
        assert s['category'].tolist() == [dd.FAIR1M_CLASS_CATEGORY[j] for j in s['label'].tolist()]
        assert not s['difficult'].any() and torch.equal(s['boxes'], dd.polygon_to_hbb(s['polygons']))


@needs_dota
def test_hrrsd_reads_back_dota_and_split_files(roots, tmp_path):
    opt = roots['hrrsd']/'OPT2017'
    crops = _crops(roots['hrrsd']/'SOURCE.txt')
    lists = {s: (opt/'ImageSets'/'Main'/f'{s}.txt').read_text().split() for s in ('train', 'val', 'trainval', 'test')}
    for s, ids in lists.items(): assert dd.HRRSD(root=roots['hrrsd'], split=s).ids == ids
    assert sorted(lists['train'] + lists['val']) == lists['trainval'] and not set(lists['trainval']) & set(lists['test'])
    ds = dd.HRRSD(root=opt, split='all')                                            # OPT2017 itself as root
    assert ds.ids == sorted(f.split('/')[-1][:-4] for f in crops)
    for f, (src, r, c, h, w, n) in crops.items():
        s = ds[ds.ids.index(f.split('/')[-1][:-4])]
        poly, names, diff = _expected(src, r, c, h, w, S._DOTA_TO['hrrsd'])
        box = np.concatenate([np.floor(poly.min(1)), np.ceil(poly.max(1))], 1)
        assert len(names) == n > 0 and [dd.HRRSD_CLASSES[j] for j in s['label'].tolist()] == names
        assert np.array_equal(s['boxes'].numpy(), box) and s['difficult'].numpy().tolist() == diff.tolist()
        assert torch.equal(s['polygons'], dd.hbb_to_polygon(s['boxes']))
        assert (s['image'] - _dota_image(src)[:, r:r + h, c:c + w]).abs().mean() < 0.02
    # a split file is what decides: edit it and the reader follows
    root = _copy(roots['hrrsd'], tmp_path, 'HRRSD_split')
    (root/'OPT2017'/'ImageSets'/'Main'/'train.txt').write_text(f"{lists['train'][-1]}\n")
    assert dd.HRRSD(root=root, split='train').ids == [lists['train'][-1]]
    (root/'OPT2017'/'ImageSets'/'Main'/'val.txt').write_text('99999\n')
    with pytest.raises(DataNotFoundError, match=r'99999\.xml'): dd.HRRSD(root=root, split='val')


@needs_dota
def test_get_dataset_and_data_root(roots):
    d = roots['data']
    for name, split, n in (('ohd_sjtu_s', 'trainval', 2), ('ohd_sjtu_l', 'test', 2), ('fair1m', 'val', 1),
                           ('hrrsd', 'test', 2)):
        ds = get_dataset(name, split=split, data_root=d)                          # found as <data_root>/<DataSpec.subdir>
        assert len(ds) == n and ds.data_source.startswith('data-root:') and S.is_standin(ds.root)
        assert get_dataset(name, root=ds.root, split=split, transforms=lambda x: {**x, 't': 1})[0]['t'] == 1


@needs_dota
def test_fair1m_interleaved_tiff_and_size_check(roots, tmp_path):
    root = _copy(roots['fair1m'], tmp_path, 'FAIR1M_tif')
    p = root/'validation'/'images'/'3.tif'
    ref = dd.FAIR1M(root=root, split='val')[0]['image']
    tifffile.imwrite(p, (ref * 255).round().byte().permute(1, 2, 0).numpy(), photometric='rgb')   # FAIR1M's own layout
    assert tifffile.TiffFile(p).series[0].axes == 'YXS' and torch.equal(dd.FAIR1M(root=root, split='val')[0]['image'], ref)
    x = root/'validation'/'labelXml'/'3.xml'
    x.write_text(x.read_text().replace('<width>512</width>', '<width>500</width>'))
    with pytest.raises(DataFormatError, match=r'3\.tif: image is \(512, 512\).*3\.xml says \(512, 500\)'):
        dd.FAIR1M(root=root, split='val')[0]


# ---- bad input: an error that names the file ----

def _copy(src: Path, tmp: Path, name: str) -> Path:
    "A copy of the stand-in root `src` to corrupt (the module's roots stay intact)."
    dst = tmp/name/src.name
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn):
    path.write_text(fn(path.read_text()))
    return path


@needs_dota
def test_ohd_sjtu_bad_input(roots, tmp_path):
    lab = lambda r: r/'OHD-SJTU-L'/'trainval'/'rotation_txt'/'P0.txt'
    r = _copy(roots['ohd'], tmp_path, 'OHD_class')
    f = _edit(lab(r), lambda t: t.replace(' plane ', ' storage-tank ', 1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r":\d+: class 'storage-tank' is not one of the 6"):
        dd.OHDSJTUL(root=r)
    r = _copy(roots['ohd'], tmp_path, 'OHD_s')                                           # an L class in an S file
    f = _edit(r/'OHD-SJTU-S'/'trainval'/'rotation_txt'/'P0.txt', lambda t: t.replace(' plane ', ' harbor ', 1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r":1: class 'harbor' is not one of the 2"):
        dd.OHDSJTUS(root=r)
    r = _copy(roots['ohd'], tmp_path, 'OHD_trunc')                                       # one coordinate missing
    f = _edit(lab(r), lambda t: '\n'.join([' '.join(t.splitlines()[0].split()[1:])] + t.splitlines()[1:]) + '\n')
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r':1: expected .* got 9 number\(s\) before the class'):
        dd.OHDSJTUL(root=r)
    r = _copy(roots['ohd'], tmp_path, 'OHD_img')
    (r/'OHD-SJTU-L'/'trainval'/'images'/'P0.jpg').unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(str(lab(r))) + r': no image P0\.<jpg'):
        dd.OHDSJTUL(root=r)
    r = _copy(roots['ohd'], tmp_path, 'OHD_lab')
    lab(r).unlink()
    with pytest.raises(DataNotFoundError, match=r'P0\.jpg: no annotation file P0\.\* in .*rotation_txt'):
        dd.OHDSJTUL(root=r)


@needs_dota
def test_fair1m_bad_input(roots, tmp_path):
    xml = lambda r: r/'train'/'part1'/'labelXml'/'2.xml'
    r = _copy(roots['fair1m'], tmp_path, 'F_class')
    f = _edit(xml(r), lambda t: t.replace('<name>Small Car</name>', '<name>Car</name>', 1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r": object \d+: class 'Car' is not one of the 37"):
        dd.FAIR1M(root=r)
    r = _copy(roots['fair1m'], tmp_path, 'F_pts')                                         # a box with 4 of its 5 points
    f = _edit(xml(r), lambda t: re.sub(r'\s*<point>[^<]*</point>', '', t, count=1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r': object 0 \(.*\) has 4 <point>\(s\)'):
        dd.FAIR1M(root=r)
    r = _copy(roots['fair1m'], tmp_path, 'F_open')                                        # the 5th point does not close the box
    f = _edit(xml(r), lambda t: re.sub(r'(<point>[^<]*</point>\s*){4}<point>[^<]*</point>',
                                        lambda m: m[0][:m[0].rindex('<point>')] + '<point>1.0,1.0</point>', t, count=1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r': object 0 .*does not close the box'):
        dd.FAIR1M(root=r)
    r = _copy(roots['fair1m'], tmp_path, 'F_coord')
    f = _edit(xml(r), lambda t: re.sub(r'<point>([^,<]*),[^<]*</point>', r'<point>\1</point>', t, count=1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r': object 0 .*is not "x,y"'):
        dd.FAIR1M(root=r)
    r = _copy(roots['fair1m'], tmp_path, 'F_xml')
    f = _edit(xml(r), lambda t: t[:len(t) // 2])
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + ': cannot parse the XML'):
        dd.FAIR1M(root=r)
    r = _copy(roots['fair1m'], tmp_path, 'F_img')
    (r/'train'/'part1'/'images'/'2.tif').unlink()
    with pytest.raises(DataNotFoundError, match=re.escape(str(xml(r))) + r': no image 2\.<jpg'):
        dd.FAIR1M(root=r)
    with pytest.raises(DataNotFoundError, match='validation'): dd.FAIR1M(root=r/'train', split='val')


@needs_dota
def test_hrrsd_bad_input(roots, tmp_path):
    xml = lambda r: r/'OPT2017'/'Annotations'/'00001.xml'
    r = _copy(roots['hrrsd'], tmp_path, 'H_class')
    f = _edit(xml(r), lambda t: t.replace('<name>airplane</name>', '<name>aeroplane</name>', 1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r": unknown HRRSD class 'aeroplane'; the 13 classes"):
        dd.HRRSD(root=r, split='train')
    r = _copy(roots['hrrsd'], tmp_path, 'H_coord')
    f = _edit(xml(r), lambda t: re.sub(r'<ymax>[^<]*</ymax>', '', t, count=1))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + r': an <object> lacks <ymax>'):
        dd.HRRSD(root=r, split='train')
    r = _copy(roots['hrrsd'], tmp_path, 'H_xml')
    f = _edit(xml(r), lambda t: t.replace('</annotation>', ''))
    with pytest.raises(DataFormatError, match=re.escape(str(f)) + ': cannot parse the XML'):
        dd.HRRSD(root=r, split='trainval')
    r = _copy(roots['hrrsd'], tmp_path, 'H_img')
    (r/'OPT2017'/'JPEGImages'/'00001.jpg').unlink()
    ds = dd.HRRSD(root=r, split='train')
    with pytest.raises(DataNotFoundError, match=r'hrrsd: image 00001\.jpg not found in .*JPEGImages'): ds[0]
