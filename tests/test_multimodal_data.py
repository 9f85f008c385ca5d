"""Tests of rsrepro.multimodal_data: DFC2023 Track 2 and quadruplet readers (official / authors' layouts), COCO
rasterisation, UrbanAtlas merges, and the smoke stand-ins built from real samples (skipped when those are absent)."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import rsrepro.multimodal_data as md
from rsrepro.io import write_tiff
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.data import DATA_SPECS, find_shared_data, get_dataset, package_dir

SHARED = find_shared_data()
HAS_VEDAI = SHARED is not None and (SHARED/'VEDAI'/'Vehicules512').is_dir()
_LIDAR = package_dir('lidar')
HAS_LIDAR = _LIDAR is not None and (_LIDAR/'data'/'dem.tif').is_file()
HAS_BEN = package_dir('bigearthnet_common') is not None
needs_dfc_smoke = pytest.mark.skipif(not (HAS_VEDAI and HAS_LIDAR), reason='needs the shared VEDAI sample '
                                     '(shared/data/VEDAI) and lidar==0.8.4 (pip install --no-deps lidar==0.8.4)')
needs_quad_smoke = pytest.mark.skipif(not (HAS_BEN and HAS_LIDAR), reason='needs bigearthnet-common==2.8.0 and '
                                      'lidar==0.8.4 (pip install --no-deps bigearthnet-common==2.8.0 lidar==0.8.4)')


# ------------------------------------------------------------------------------------------------ fixtures
def _poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _dfc_root(base: Path, height_dir='height', split='train', n=2, hw=8, anns=None) -> Path:
    "Official layout; image 0 holds a pixel-interleaved RGB (as GDAL writes it), the others band-planar ones."
    rng = np.random.default_rng(1)
    for k in range(n):
        name = f'P_{k:04d}.tif'
        rgb = rng.integers(0, 256, (hw, hw, 3), dtype=np.uint8)
        (base/split/'rgb').mkdir(parents=True, exist_ok=True)
        if k == 0: tifffile.imwrite(base/split/'rgb'/name, rgb, photometric='rgb')
        else: write_tiff(base/split/'rgb'/name, rgb.transpose(2, 0, 1))
        write_tiff(base/split/'sar'/name, rng.random((hw, hw), dtype=np.float32))
        write_tiff(base/split/height_dir/name, np.full((hw, hw), 3.0 + k, np.float32))
    if anns is None:
        anns = [{'id': 1, 'image_id': 0, 'category_id': 7, 'iscrowd': 0, 'segmentation': [_poly(0, 0, 3, 2)]},
                {'id': 2, 'image_id': 0, 'category_id': 7, 'iscrowd': 0, 'segmentation': [_poly(2, 1, 5, 4)]},
                {'id': 3, 'image_id': 0, 'category_id': 7, 'iscrowd': 1, 'segmentation': [_poly(6, 6, 8, 8)]}]
    coco = {'images': [{'id': k, 'file_name': f'P_{k:04d}.tif', 'height': hw, 'width': hw} for k in range(n)],
            'annotations': anns, 'categories': [{'id': 7, 'name': 'building'}]}
    (base/'annotations').mkdir(parents=True, exist_ok=True)
    (base/'annotations'/f'buildings_only_{split}.json').write_text(json.dumps(coco))
    return base


def _quad_sample(base: Path, rel: str, s2_bands=12, dnw_bands=10, label='colour', hw=6, dnw_values=None,
                 label_values=None):
    "One sample in the authors' layout; S2 band b holds 100*(b+1), S1 (VV, VH, angle) = (-10, -17, 35)."
    write = lambda kind, a: write_tiff(base/md.quadruplet_path(rel, kind), a)
    write('s2', np.stack([np.full((hw, hw), 100 * (b + 1), np.uint16) for b in range(s2_bands)]))
    write('s1', np.stack([np.full((hw, hw), v, np.float32) for v in (-10, -17, 35)]))
    write('dem', np.full((hw, hw), 42.0, np.float32))
    lab = np.arange(hw * hw).reshape(hw, hw) % 28 if label_values is None else np.asarray(label_values)
    dnw = np.arange(hw * hw).reshape(hw, hw) % 9 if dnw_values is None else np.asarray(dnw_values)
    if dnw_bands == 1: write('dnw', dnw.astype(np.uint8))
    else:
        d = np.zeros((dnw_bands, hw, hw), np.float32); d[9] = dnw; write('dnw', d)
    if label == 'colour': write('alt', np.array(md.UA_COLORS, np.uint8)[lab].transpose(2, 0, 1))
    else: write('alt', lab.astype(np.uint8))
    return lab, dnw


def _rle_string(counts):
    "COCO compressed RLE (pycocotools' rleToString), to test the decoder against."
    out = []
    for i, x in enumerate(counts):
        if i > 2: x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1f; x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more: c |= 0x20
            out.append(chr(c + 48))
    return ''.join(out)


def _rle_counts(mask):
    flat = mask.flatten(order='F').astype(int)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur: counts.append(run); cur, run = v, 0
        run += 1
    counts.append(run)
    return counts


# ------------------------------------------------------------------------------------------------ registry
def test_registered(tmp_path):
    for n in ('dfc2023_track2', 'quadruplets'):
        assert n in DATASETS.names() and n in DATA_SPECS
    ds = get_dataset('dfc2023_track2', root=_dfc_root(tmp_path))
    assert isinstance(ds, md.DFC2023Track2) and len(ds) == 2


def test_lookup_error_names_layout(tmp_path, monkeypatch):
    monkeypatch.setenv('RSREPRO_SHARED_DATA', str(tmp_path/'nothing'))
    monkeypatch.delenv('RSREPRO_DATA', raising=False)
    with pytest.raises(DataNotFoundError, match='buildings_only_train.json'):
        md.DFC2023Track2(data_root=tmp_path)
    with pytest.raises(DataNotFoundError, match='Quadruplets'):
        md.Quadruplets(data_root=tmp_path)


# ------------------------------------------------------------------------------------------------ rasterisation
def test_polygon_rasterises_to_expected_pixels():
    sq = md.polygon_to_mask(_poly(1, 1, 4, 3), 5, 6)
    expect = np.zeros((5, 6), bool); expect[1:3, 1:4] = True
    assert (sq == expect).all()
    tri = md.polygon_to_mask([0, 0, 4.2, 0, 0, 4.2], 4, 4)            # centres with x + y < 4.2
    assert tri.astype(int).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    ell = md.polygon_to_mask([0, 0, 3, 0, 3, 1, 1, 1, 1, 3, 0, 3], 4, 4)   # concave L
    assert ell.astype(int).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    out = md.polygon_to_mask(_poly(-5, -5, 2, 1), 3, 3)                # clipped to the image
    assert out.astype(int).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert md.masks_to_boxes(np.stack([sq, np.zeros_like(sq)])).tolist() == [[1, 1, 4, 3], [0, 0, 0, 0]]


def test_rle_decoding():
    m = np.random.default_rng(3).random((5, 7)) > 0.6
    counts = _rle_counts(m)
    assert (md.rle_to_mask({'size': [5, 7], 'counts': counts}, 5, 7) == m).all()
    assert (md.rle_to_mask({'size': [5, 7], 'counts': _rle_string(counts)}, 5, 7) == m).all()
    with pytest.raises(ValueError): md.rle_to_mask({'size': [5, 7], 'counts': [3, 4]}, 5, 7)


# ------------------------------------------------------------------------------------------------ DFC2023
def test_dfc_sample_in_official_layout(tmp_path):
    root = _dfc_root(tmp_path)
    ds = md.DFC2023Track2(root=root)
    assert ds.modalities == {'rgb': 3, 'sar': 1, 'dsm': 1} and ds.data_source == f'root:{root.resolve()}'
    s = ds[0]
    rgb = tifffile.imread(root/'train'/'rgb'/'P_0000.tif')                # H×W×3 on disk
    assert s['id'] == 'P_0000' and s['rgb'].dtype == torch.float32 and s['rgb'].shape == (3, 8, 8)
    assert torch.allclose(s['rgb'], torch.from_numpy(rgb.transpose(2, 0, 1) / 255.0).float())
    assert torch.equal(s['sar'][0], torch.from_numpy(tifffile.imread(root/'train'/'sar'/'P_0000.tif')))
    assert s['dsm'].shape == (1, 8, 8) and (s['dsm'] == 3.0).all() and (ds[1]['dsm'] == 4.0).all()
    inst = s['instances']
    assert inst['masks'].dtype == torch.bool and inst['masks'].shape == (2, 8, 8)      # crowd one left out
    assert inst['labels'].dtype == torch.long and inst['labels'].tolist() == [0, 0]
    assert inst['boxes'].tolist() == [[0, 0, 3, 2], [2, 1, 5, 4]]
    assert s['mask'].dtype == torch.long and torch.equal(s['mask'], inst['masks'].any(0).long())
    assert int(s['mask'].sum()) == 6 + 9 - 1                             # the two squares overlap in one pixel
    assert ds[1]['instances']['masks'].shape == (0, 8, 8) and ds[1]['mask'].sum() == 0
    sub = md.DFC2023Track2(root=root, modalities=('sar',))
    assert set(sub[0]) == {'id', 'sar', 'mask', 'instances'} and sub.modalities == {'sar': 1}


def test_dfc_rle_instance_and_test_split(tmp_path):
    m = np.zeros((8, 8), bool); m[5:7, 1:4] = True
    anns = [{'id': 1, 'image_id': 1, 'iscrowd': 0, 'segmentation': {'size': [8, 8], 'counts': _rle_string(_rle_counts(m))}}]
    ds = md.DFC2023Track2(root=_dfc_root(tmp_path, anns=anns))
    assert torch.equal(ds[1]['instances']['masks'][0], torch.from_numpy(m)) and ds[1]['instances']['boxes'].tolist() == [[1, 5, 4, 7]]
    root = _dfc_root(tmp_path/'t', split='test')
    d = json.loads((root/'annotations'/'buildings_only_test.json').read_text()); del d['annotations']
    (root/'annotations'/'buildings_only_test.json').write_text(json.dumps(d))
    s = md.DFC2023Track2(root=root, split='test')[0]
    assert 'mask' not in s and 'instances' not in s and s['rgb'].shape == (3, 8, 8)


@pytest.mark.parametrize('folder', ['dsm', 'ndsm'])
def test_dfc_height_folder_alternatives(tmp_path, folder):
    ds = md.DFC2023Track2(root=_dfc_root(tmp_path, height_dir=folder))
    assert ds.dirs['dsm'].name == folder and (ds[0]['dsm'] == 3.0).all()


def test_dfc_tile_and_size_keep_targets_integral(tmp_path):
    root = _dfc_root(tmp_path)
    t = md.DFC2023Track2(root=root, tile=4)
    assert len(t) == 8 and t.ids[:4] == ['P_0000_r0_c0', 'P_0000_r0_c4', 'P_0000_r4_c0', 'P_0000_r4_c4']
    s = t[0]                                                               # both squares reach into the first window
    assert s['rgb'].shape == (3, 4, 4) and s['instances']['boxes'].tolist() == [[0, 0, 3, 2], [2, 1, 4, 4]]
    assert t[1]['instances']['boxes'].tolist() == [[0, 1, 1, 4]]          # column 4 of the second square
    assert t[3]['instances']['masks'].shape == (0, 4, 4) and t[3]['mask'].sum() == 0
    full = md.DFC2023Track2(root=root)[0]
    assert torch.equal(s['mask'], full['mask'][:4, :4])
    for size in (16, 3):
        r = md.DFC2023Track2(root=root, size=size)[0]
        assert r['rgb'].shape == (3, size, size) and r['dsm'].shape == (1, size, size)
        assert r['mask'].dtype == torch.long and set(r['mask'].unique().tolist()) <= {0, 1}
        im = r['instances']
        assert im['masks'].dtype == torch.bool and im['masks'].shape[1:] == (size, size)
        assert torch.equal(r['mask'], im['masks'].any(0).long()) and len(im['labels']) == len(im['masks'])
        assert torch.equal(im['boxes'], torch.from_numpy(md.masks_to_boxes(im['masks'].numpy())))
    with pytest.raises(DataFormatError, match='tile=3'): md.DFC2023Track2(root=root, tile=3)


def test_dfc_normalize_is_finite(tmp_path):
    s = md.DFC2023Track2(root=_dfc_root(tmp_path), normalize=True)[0]
    assert all(torch.isfinite(s[m]).all() for m in ('rgb', 'sar', 'dsm')) and abs(float(s['dsm'].mean())) < 1e-3


def test_dfc_missing_sar_names_the_file(tmp_path):
    root = _dfc_root(tmp_path)
    (root/'train'/'sar'/'P_0001.tif').unlink()
    with pytest.raises(DataNotFoundError, match=str(root/'train'/'sar'/'P_0001.tif')):
        md.DFC2023Track2(root=root)
    assert len(md.DFC2023Track2(root=root, modalities=('rgb', 'dsm'))) == 2      # SAR not asked for


def test_dfc_wrong_band_count_names_the_file(tmp_path):
    root = _dfc_root(tmp_path)
    write_tiff(root/'train'/'rgb'/'P_0001.tif', np.zeros((8, 8), np.uint8))
    ds = md.DFC2023Track2(root=root)
    with pytest.raises(DataFormatError, match=r'P_0001\.tif: the rgb file has 1 band\(s\), expected 3'): ds[1]
    write_tiff(root/'train'/'height'/'P_0000.tif', np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataFormatError, match=r'height/P_0000\.tif: the dsm file has 2 band'): ds[0]


def test_dfc_size_mismatch_names_the_file(tmp_path):
    root = _dfc_root(tmp_path)
    write_tiff(root/'train'/'sar'/'P_0000.tif', np.zeros((4, 4), np.float32))
    with pytest.raises(DataFormatError, match=r'sar/P_0000\.tif: sar of .P_0000. is \(4, 4\) pixels'):
        md.DFC2023Track2(root=root)[0]


def test_dfc_json_referencing_missing_image(tmp_path):
    root = _dfc_root(tmp_path)
    f = root/'annotations'/'buildings_only_train.json'
    d = json.loads(f.read_text())
    d['images'].append({'id': 9, 'file_name': 'P_0009.tif', 'height': 8, 'width': 8}); f.write_text(json.dumps(d))
    with pytest.raises(DataNotFoundError, match=r'rgb/P_0009\.tif: missing') as e: md.DFC2023Track2(root=root)
    assert len(e.value.problems) == 3                         # every modality file is named, one line each
    d['images'].pop(); d['annotations'].append({'id': 5, 'image_id': 77, 'segmentation': [_poly(0, 0, 1, 1)]})
    f.write_text(json.dumps(d))
    with pytest.raises(DataFormatError, match=r'buildings_only_train\.json: annotation 5 refers to image_id 77'):
        md.DFC2023Track2(root=root)
    d['annotations'][-1] = {'id': 6, 'image_id': 0, 'iscrowd': 0, 'segmentation': [[0, 0, 1, 1, 2]]}
    f.write_text(json.dumps(d))
    with pytest.raises(DataFormatError, match='annotation 6'): md.DFC2023Track2(root=root)[0]


# ------------------------------------------------------------------------------------------------ UrbanAtlas / DNW
def test_class_tables():
    assert md.DNW_CLASSES == ('water', 'trees', 'grass', 'flooded_vegetation', 'crops', 'shrub_and_scrub', 'built',
                              'bare', 'snow_and_ice')
    assert len(md.UA_CLASSES_27) == 27 and len(md.UA_CLASSES_7) == 7 and len(md.UA_CLASSES_CODE9) == 9
    assert sorted(md.UA27_TO_7) == list(range(1, 28)) and sorted(md.UA27_TO_CODE9) == list(range(1, 28))


def test_ua_27_to_7_hand_case():
    ua = np.array([[0, 1, 4, 8], [10, 16, 18, 20], [22, 23, 25, 26], [27, 13, 5, 24]])
    # no data, urban fabric, low density fabric, fast roads / railways, green urban, arable, pastures,
    # orchards, forests, open spaces, wetlands / water, mineral sites, very low density, herbaceous
    assert md.merge_ua_labels(ua).tolist() == [[255, 0, 1, 0], [0, 1, 2, 3], [4, 4, 2, 5], [6, 0, 1, 2]]
    assert [md.UA_CLASSES_7[v] for v in md.merge_ua_labels(np.array([1, 20, 23, 27]))] == \
        ['urban', 'grassland', 'trees', 'water']
    assert md.merge_ua_labels(np.array([0, 8, 10, 27]), 'code9').tolist() == [255, 2, 8, 7]
    with pytest.raises(DataFormatError, match=r'src\.tif.*\[28\]'): md.merge_ua_labels(np.array([3, 28]), source='src.tif')
    with pytest.raises(DataFormatError): md.merge_ua_labels(np.array([-1]))
    with pytest.raises(ValueError): md.merge_ua_labels(np.array([1]), 'ua5')


def test_ua_colour_decoding():
    cols = np.array(md.UA_COLORS, np.uint8)[[[0, 27], [23, 1]]].transpose(2, 0, 1)
    assert md.ua_colors_to_index(cols).tolist() == [[0, 27], [23, 1]]
    cols[:, 0, 0] = (1, 2, 3)
    with pytest.raises(DataFormatError, match=r'lab\.tif: 1 pixel.*\(1, 2, 3\)'): md.ua_colors_to_index(cols, 'lab.tif')


# ------------------------------------------------------------------------------------------------ quadruplets
def test_quadruplets_in_the_authors_layout(tmp_path):
    lab, dnw = _quad_sample(tmp_path, 'f1/s2_a/x_s2_1.tif')
    ds = md.Quadruplets(root=tmp_path, split='all')
    assert ds.ids == ['f1/s2_a/x_s2_1'] and (tmp_path/'f1'/'s1_a'/'x_s1_1.tif').is_file()
    assert ds.modalities == {'s1': 2, 's2': 4, 'dem': 1, 'dnw': 1} and ds.map_classes == {'dnw': 9}
    s = ds[0]
    assert s['s2'].dtype == torch.float32 and s['s2'].shape == (4, 6, 6)
    assert s['s2'][:, 0, 0].tolist() == [200, 300, 400, 800]                # bands 2, 3, 4, 8 of the 12-band stack
    assert s['s1'].shape == (2, 6, 6) and s['s1'][:, 0, 0].tolist() == [-10, -17]
    assert s['dem'].shape == (1, 6, 6) and (s['dem'] == 42).all()
    assert s['dnw'].dtype == torch.long and s['dnw'].shape == (6, 6) and torch.equal(s['dnw'], torch.from_numpy(dnw))
    assert s['mask'].dtype == torch.long and torch.equal(s['mask'], torch.from_numpy(md.merge_ua_labels(lab)))
    assert s['mask'][0, 0] == 255
    code9 = md.Quadruplets(root=tmp_path, split='all', label_scheme='code9')[0]['mask']
    assert torch.equal(code9, torch.from_numpy(md.merge_ua_labels(lab, 'code9'))) and code9.max() == 255
    sub = md.Quadruplets(root=tmp_path, split='all', modalities=('s2', 'dnw'), with_label=False)[0]
    assert set(sub) == {'id', 's2', 'dnw'}


def test_quadruplets_alternative_band_layouts(tmp_path):
    lab, dnw = _quad_sample(tmp_path, 'f1/s2_a/y.tif', s2_bands=4, dnw_bands=1, label='index')
    s = md.Quadruplets(root=tmp_path, split='all')[0]
    assert s['s2'][:, 0, 0].tolist() == [100, 200, 300, 400]                # a 4-band file is taken as is
    assert torch.equal(s['dnw'], torch.from_numpy(dnw)) and torch.equal(s['mask'], torch.from_numpy(md.merge_ua_labels(lab)))


def test_quadruplets_splits(tmp_path):
    for p in ('f1', 'f2', 'f6'): _quad_sample(tmp_path, f'{p}/s2_a/z.tif')
    va = md.Quadruplets(root=tmp_path, split='val')
    assert va.ids == ['f2/s2_a/z', 'f6/s2_a/z'] and 'QUADRUPLET_PLACES' in va.split_source
    with pytest.raises(DataNotFoundError, match="'f3'"): md.Quadruplets(root=tmp_path, split='train')
    (tmp_path/'splits').mkdir(); (tmp_path/'splits'/'train.txt').write_text('f1\nf6\n')
    assert md.Quadruplets(root=tmp_path, split='train').ids == ['f1/s2_a/z', 'f6/s2_a/z']
    assert len(md.Quadruplets(root=tmp_path, split='all')) == 3


def test_quadruplets_size_keeps_maps_integral(tmp_path):
    lab, dnw = _quad_sample(tmp_path, 'f1/s2_a/x.tif')
    for size in (3, 12):
        s = md.Quadruplets(root=tmp_path, split='all', size=size)[0]
        assert s['s1'].shape == (2, size, size) and s['s2'].shape == (4, size, size) and s['dem'].shape == (1, size, size)
        assert s['dnw'].dtype == torch.long and s['mask'].dtype == torch.long
        assert set(s['dnw'].unique().tolist()) <= set(dnw.flatten().tolist())
        assert set(s['mask'].unique().tolist()) <= set(md.merge_ua_labels(lab).flatten().tolist())
    n = md.Quadruplets(root=tmp_path, split='all', normalize=True)[0]
    assert all(torch.isfinite(n[m]).all() for m in ('s1', 's2', 'dem'))


def test_quadruplets_missing_file(tmp_path):
    _quad_sample(tmp_path, 'f1/s2_a/x.tif'); _quad_sample(tmp_path, 'f1/s2_a/w.tif')
    p = tmp_path/'f1'/'s1_a'/'w.tif'; p.unlink()
    with pytest.raises(DataNotFoundError, match=str(p)): md.Quadruplets(root=tmp_path, split='all')
    with pytest.warns(UserWarning, match=r'dropped 1 sample\(s\).*f1/s2_a/w\.tif'):
        ds = md.Quadruplets(root=tmp_path, split='all', on_missing='skip')
    assert ds.ids == ['f1/s2_a/x'] and ds.n_skipped == 1 and ds.dropped == ['f1/s2_a/w.tif']
    assert 'dropped 1 sample(s)' in ds.drop_message
    assert len(md.Quadruplets(root=tmp_path, split='all', modalities=('s2', 'dem', 'dnw'))) == 2


def test_quadruplets_bad_files_name_the_file(tmp_path):
    _quad_sample(tmp_path, 'f1/s2_a/x.tif', s2_bands=5)
    with pytest.raises(DataFormatError, match=r's2_a/x\.tif: the s2 file has 5 band'): md.Quadruplets(root=tmp_path, split='all')[0]
    _quad_sample(tmp_path, 'f1/s2_a/x.tif')
    write_tiff(tmp_path/'f1'/'dem_a'/'x.tif', np.zeros((5, 5), np.float32))
    with pytest.raises(DataFormatError, match=r'dem_a/x\.tif: dem of .* is \(5, 5\) pixels'):
        md.Quadruplets(root=tmp_path, split='all')[0]
    _quad_sample(tmp_path, 'f1/s2_a/x.tif', dnw_values=np.full((6, 6), 9))
    with pytest.raises(DataFormatError, match=r'dnw_a/x\.tif: Dynamic World label values must be integers 0\.\.8, found \[9\]'):
        md.Quadruplets(root=tmp_path, split='all')[0]
    _quad_sample(tmp_path, 'f1/s2_a/x.tif', label='index', label_values=np.full((6, 6), 30))
    with pytest.raises(DataFormatError, match=r'alt_a/x\.tif: UrbanAtlas label values'):
        md.Quadruplets(root=tmp_path, split='all')[0]
