"""Malformed-input corpus for the quadruplet and DFC2023 Track 2 readers (issue 13).

Each case copies the smoke stand-in (real imagery: BigEarthNet-MM pairs and the lidar DEM for the quadruplets, the
VEDAI scenes for DFC2023; see rsrepro.standins) as symlinks, breaks one thing, and checks that (a) the reader raises
DataFormatError / DataNotFoundError naming the broken file when it is built or read, and (b) check_data reports a line
naming it. Skipped when the real samples are absent."""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import rsrepro.multimodal_data as md
from rsrepro.check import check_data, check_splits
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.data import find_shared_data, package_dir
from rsrepro.io import raster_chw, read_image, write_tiff

SHARED = find_shared_data()
HAS_VEDAI = SHARED is not None and (SHARED/'VEDAI'/'Vehicules512').is_dir()
_LIDAR = package_dir('lidar')
HAS_LIDAR = _LIDAR is not None and (_LIDAR/'data'/'dem.tif').is_file()
HAS_BEN = package_dir('bigearthnet_common') is not None
QUAD, DFC = 'quadruplets', 'dfc2023_track2'


# ------------------------------------------------------------------------------------------------ clean copies
@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    "The two stand-ins, written once per module (the DFC one cut to 3 annotated tiles per split to keep it fast)."
    from rsrepro.standins import smoke_dfc2023_root, smoke_quadruplet_root
    base, out = tmp_path_factory.mktemp('clean'), {}
    if HAS_BEN and HAS_LIDAR: out[QUAD] = smoke_quadruplet_root(base/'quad')
    if HAS_VEDAI and HAS_LIDAR:
        d = smoke_dfc2023_root(base/'dfc')
        for split in ('train', 'val'):
            f = d/'annotations'/f'buildings_only_{split}.json'
            coco = json.loads(f.read_text())
            has = {a['image_id'] for a in coco['annotations']}
            keep = [im for im in coco['images'] if im['id'] in has][:3]
            ids = {im['id'] for im in keep}
            coco['images'], coco['annotations'] = keep, [a for a in coco['annotations'] if a['image_id'] in ids]
            f.write_text(json.dumps(coco))
            names = {im['file_name'] for im in keep}
            for p in (d/split).glob('*/*.tif'):
                if p.name not in names: p.unlink()
        out[DFC] = d
    return out


def _copy(clean, name, dest: Path) -> Path:
    "A copy of the clean stand-in `name` made of symlinks (cheap); `_own` turns one into a real file before a change."
    if name not in clean:
        pytest.skip('needs the real samples: bigearthnet-common==2.8.0 and lidar==0.8.4 (quadruplets), '
                    'shared/data/VEDAI and lidar==0.8.4 (DFC2023)')
    src = clean[name]
    for p in sorted(src.rglob('*')):
        q = dest/p.relative_to(src)
        if p.is_dir(): q.mkdir(parents=True, exist_ok=True)
        else: q.parent.mkdir(parents=True, exist_ok=True); q.symlink_to(p)
    return dest


def _own(p: Path) -> Path:
    "Make `p` a real file (a copy of what it links to), so that changing it leaves the clean copy alone."
    if p.is_symlink():
        t = p.resolve(); p.unlink(); shutil.copyfile(t, p)
    return p


def _rewrite(p: Path, data) -> Path:
    "Replace `p` (bytes, text, or a `[C,H,W]` array written as TIFF) without touching the clean copy."
    if p.is_symlink() or p.exists(): p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes): p.write_bytes(data)
    elif isinstance(data, str): p.write_text(data)
    else: write_tiff(p, data)
    return p


def _arr(p: Path) -> np.ndarray: return raster_chw(read_image(p), p)


def _rm(p: Path) -> Path:
    p.unlink(); return p


def _truncate(p: Path, frac: float) -> Path:
    b = p.read_bytes(); return _rewrite(p, b[:int(len(b) * frac)])


# ------------------------------------------------------------------------------------------------ quadruplet breakers
def _qrel(root: Path) -> str:
    "The first training sample (its S2 path relative to the root)."
    return sorted(p.relative_to(root).as_posix() for p in (root/'f1'/'s2_ben').glob('*.tif'))[0]

def _qp(root: Path, kind: str) -> Path: return root/md.quadruplet_path(_qrel(root), kind)

def _set(p: Path, fn) -> Path:
    "Rewrite the raster `p` as `fn(its [C,H,W] array)`."
    return _rewrite(p, fn(_arr(p)))

def q_nan_s2(r):
    def f(a): a = a.astype(np.float32); a[1, 5, 5] = np.nan; return a
    return _set(_qp(r, 's2'), f)

def q_inf_s1(r):
    def f(a): a = a.copy(); a[0, 3, 3] = -np.inf; return a
    return _set(_qp(r, 's1'), f)

def q_dnw_value(r):
    def f(a): a = a.copy(); a[9, 0, 0] = 9; return a            # band 10 is the label: 9 is not a class
    return _set(_qp(r, 'dnw'), f)

def q_unknown_colour(r):
    def f(a): a = a.copy(); a[:, 2, 2] = (1, 2, 3); return a
    return _set(_qp(r, 'alt'), f)

def q_split_line(r):
    _rewrite(r/'splits'/'train.txt', 'f1\nf9\n'); return 'splits/train.txt:2'

def q_empty_s2_dir(r):
    for p in (r/'f2').glob('*/*.tif'): p.unlink()
    return 'f2/s2_ben'

def q_empty_place(r):
    (r/'f3').mkdir(); _rewrite(r/'splits'/'train.txt', 'f1\nf3\n'); return '/f3: empty place folder'

def q_empty_unlisted_place(r):
    (r/'f7').mkdir(); return '/f7: empty place folder'           # in no split: found by split='other'

QUAD_CASES = {
    'truncated_s2': lambda r: _truncate(_qp(r, 's2'), 0.5),
    'truncated_label': lambda r: _truncate(_qp(r, 'alt'), 0.9),
    'zero_byte_s1': lambda r: _rewrite(_qp(r, 's1'), b''),
    'text_as_tiff_dem': lambda r: _rewrite(_qp(r, 'dem'), 'elevation: 42 m\n'),
    'text_as_tiff_dnw': lambda r: _rewrite(_qp(r, 'dnw'), '<html>404 Not Found</html>'),
    'one_band_s1': lambda r: _set(_qp(r, 's1'), lambda a: a[:1]),
    'two_band_dem': lambda r: _set(_qp(r, 'dem'), lambda a: np.concatenate([a, a])),
    'three_band_s2': lambda r: _set(_qp(r, 's2'), lambda a: a[:3]),
    'dem_other_grid': lambda r: _set(_qp(r, 'dem'), lambda a: a[:, :100, :100]),
    's2_other_grid': lambda r: _set(_qp(r, 's2'), lambda a: a[:, :96, :96]),
    'nan_in_s2': q_nan_s2,
    'inf_in_s1': q_inf_s1,
    'dnw_not_a_class': q_dnw_value,
    'label_unknown_colour': q_unknown_colour,
    'label_float_colours': lambda r: _set(_qp(r, 'alt'), lambda a: a.astype(np.float32)),
    'missing_s1': lambda r: _rm(_qp(r, 's1')),
    'missing_label': lambda r: _rm(_qp(r, 'alt')),
    'missing_s2_partners_left': lambda r: _rm(_qp(r, 's2')),
    'split_names_absent_place': q_split_line,
    'split_list_not_utf8': lambda r: _rewrite(r/'splits'/'val.txt', b'f2\xff\xfe\n'),
    'split_list_empty': lambda r: _rewrite(r/'splits'/'train.txt', ''),
    'empty_s2_folder': q_empty_s2_dir,
    'empty_place_folder': q_empty_place,
    'empty_unlisted_place': q_empty_unlisted_place,
}


# ------------------------------------------------------------------------------------------------ DFC2023 breakers
def _dimg(r: Path) -> str:
    return json.loads((r/'annotations'/'buildings_only_train.json').read_text())['images'][0]['file_name']

def _dp(r: Path, m: str) -> Path: return r/'train'/m/_dimg(r)

def _json(r: Path, fn) -> str:
    "Change the train json with `fn(coco)` (NaN allowed, as Python's json writes it)."
    f = r/'annotations'/'buildings_only_train.json'
    coco = json.loads(f.read_text()); fn(coco); _rewrite(f, json.dumps(coco))
    return 'annotations/buildings_only_train.json'

def _ann(k, **kw):
    def f(coco): coco['annotations'][k].update(kw)
    return f

def d_poly(value):
    def f(coco): coco['annotations'][0]['segmentation'][0][3] = value
    return f

def d_outside(coco):
    a = coco['annotations'][0]; a['segmentation'] = [[v + 1000 for v in a['segmentation'][0]]]

def d_nan_sar(r):
    def f(a): a = a.copy(); a[0, 7, 7] = np.nan; return a
    return _set(_dp(r, 'sar'), f)

def d_inf_height(r):
    def f(a): a = a.copy(); a[0, 0, 0] = np.inf; return a
    return _set(_dp(r, 'height'), f)

def d_not_json(r):
    f = r/'annotations'/'buildings_only_train.json'; _truncate(_own(f), 0.6); return 'buildings_only_train.json:1'

def d_not_utf8(r):
    f = r/'annotations'/'buildings_only_train.json'
    _rewrite(f, f.read_text().replace('VEDAI', 'V\u00e9DAI').encode('latin-1')); return 'buildings_only_train.json'

def d_absent_image_file(r):
    _json(r, lambda c: c['images'].append({'id': 999, 'file_name': 'P_gone.tif', 'height': 256, 'width': 256}))
    return 'train/rgb/P_gone.tif'

def d_empty_rgb(r):
    for p in (r/'train'/'rgb').glob('*.tif'): p.unlink()
    return 'train/rgb/'

def d_no_file_name(r):
    _json(r, lambda c: c['images'][0].pop('file_name')); return 'buildings_only_train.json: an image entry lacks'

J = 'annotations/buildings_only_train.json'
DFC_CASES = {
    'truncated_rgb': lambda r: _truncate(_dp(r, 'rgb'), 0.5),
    'truncated_height': lambda r: _truncate(_dp(r, 'height'), 0.99),
    'zero_byte_sar': lambda r: _rewrite(_dp(r, 'sar'), b''),
    'text_as_tiff_height': lambda r: _rewrite(_dp(r, 'height'), 'nDSM not available\n'),
    'grey_rgb': lambda r: _set(_dp(r, 'rgb'), lambda a: a[:1]),
    'int16_rgb': lambda r: _set(_dp(r, 'rgb'), lambda a: a.astype(np.int16)),
    'two_band_sar': lambda r: _set(_dp(r, 'sar'), lambda a: np.concatenate([a, a])),
    'sar_other_grid': lambda r: _set(_dp(r, 'sar'), lambda a: a[:, :128, :128]),
    'nan_in_sar': d_nan_sar,
    'inf_in_height': d_inf_height,
    'missing_height': lambda r: _rm(_dp(r, 'height')),
    'json_not_json': d_not_json,
    'json_not_utf8': d_not_utf8,
    'json_no_images': lambda r: (_json(r, lambda c: c.update(images=[])), J)[1],
    'json_image_without_file_name': d_no_file_name,
    'annotation_absent_image_id': lambda r: (_json(r, _ann(0, image_id=12345)), J)[1],
    'annotation_unknown_category': lambda r: (_json(r, _ann(0, category_id=3)), J)[1],
    'bbox_not_numeric': lambda r: (_json(r, _ann(1, bbox=['a', 0, 1, 1])), J)[1],
    'bbox_nan': lambda r: (_json(r, _ann(1, bbox=[float('nan'), 0, 1, 1])), J)[1],
    'polygon_not_numeric': lambda r: (_json(r, d_poly('12,5')), J)[1],
    'polygon_nan': lambda r: (_json(r, d_poly(float('nan'))), J)[1],
    'polygon_outside_image': lambda r: (_json(r, d_outside), J)[1],
    'json_names_absent_image': d_absent_image_file,
    'empty_rgb_folder': d_empty_rgb,
}


# ------------------------------------------------------------------------------------------------ the corpus
def _reader_messages(name: str, root: Path, **kw) -> list[str]:
    "Build the reader for every split check_data checks and read every sample; the rsrepro errors' messages."
    out = []
    for split in check_splits(name, root):
        try:
            ds = DATASETS.get(name)(root=root, split=split, **kw)
            for i in range(len(ds)): ds[i]
        except (DataFormatError, DataNotFoundError) as e: out.append(str(e))
    return out


def _needle(root: Path, got) -> str:
    return got.relative_to(root).as_posix() if isinstance(got, Path) else got


CASES = [pytest.param(QUAD, k, f, id=f'quad-{k}') for k, f in QUAD_CASES.items()] + \
        [pytest.param(DFC, k, f, id=f'dfc-{k}') for k, f in DFC_CASES.items()]


@pytest.mark.parametrize('name,case,corrupt', CASES)
def test_corrupt_file_is_named(clean, tmp_path, name, case, corrupt):
    root = _copy(clean, name, tmp_path/'copy')
    needle = _needle(root, corrupt(root))
    msgs = _reader_messages(name, root)
    assert any(needle in m for m in msgs), f'{case}: no reader error names {needle!r}: {msgs}'
    lines = check_data(name, root=root, progress=False)
    assert any(needle in ln for ln in lines), f'{case}: check_data does not name {needle!r}: {lines}'
    assert not any('reader bug' in ln for ln in lines), lines


def test_corpus_size():
    assert len(CASES) >= 20


@pytest.mark.parametrize('name', [QUAD, DFC])
def test_clean_copy_checks_clean(clean, tmp_path, name):
    root = _copy(clean, name, tmp_path/'copy')
    assert check_data(name, root=root, progress=False) == []
    assert _reader_messages(name, root) == []


def test_quadruplets_skip_reports_the_drop(clean, tmp_path):
    root = _copy(clean, QUAD, tmp_path/'copy')
    rel = _qrel(root); _qp(root, 's1').unlink(); _qp(root, 'alt').unlink()
    with pytest.raises(DataFormatError) as e: md.Quadruplets(root=root, split='train')
    assert len(e.value.problems) == 2                                 # both missing files, one line each
    with pytest.warns(UserWarning, match=r'dropped 1 sample\(s\) because a modality or label file is missing: ' + rel):
        ds = md.Quadruplets(root=root, split='train', on_missing='skip')
    assert ds.dropped == [rel] and rel in ds.drop_message and len(ds) == 3 and rel[:-4] not in ds.ids
    with warnings.catch_warnings():
        warnings.simplefilter('error')                               # nothing dropped: no warning, no message
        full = md.Quadruplets(root=root, split='train', with_label=False, modalities=('s2', 'dem'))
    assert full.dropped == [] and full.drop_message is None and len(full) == 4


def test_dfc_skip_reports_the_drop(clean, tmp_path):
    root = _copy(clean, DFC, tmp_path/'copy')
    img = _dimg(root); _dp(root, 'sar').unlink()
    with pytest.raises(DataNotFoundError, match=f'train/sar/{img}: missing'): md.DFC2023Track2(root=root)
    with pytest.warns(UserWarning, match=rf'dropped 1 sample\(s\) because a modality file is missing .*{img}'):
        ds = md.DFC2023Track2(root=root, on_missing='skip')
    assert ds.dropped == [img] and img in ds.drop_message and len(ds) == 2 and img[:-4] not in ds.ids
    with pytest.warns(UserWarning, match='dropped 1'):
        assert check_data(DFC, root=root, progress=False, on_missing='skip') == []


def test_every_bad_annotation_reported_at_once(clean, tmp_path):
    "Up-front parsing reports every bad annotation, and check_data still reads the images."
    root = _copy(clean, DFC, tmp_path/'copy')
    _json(root, lambda c: (c['annotations'][0].update(bbox=None), c['annotations'][1].update(category_id=9)))
    _rewrite(_dp(root, 'rgb'), b'')
    lines = check_data(DFC, root=root, progress=False)
    assert sum('buildings_only_train.json' in ln for ln in lines) == 2 and any(_dimg(root) in ln for ln in lines)
