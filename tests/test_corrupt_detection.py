"""A malformed-input corpus for the detection readers (VEDAI, AVIID-3, DIOR, DIOR-R, DOTA, OHD-SJTU-S/L, FAIR1M, HRRSD),
made from copies of the real samples (and the stand-ins cut from them): each case corrupts one file of a fresh copy and
asserts that the reader raises an rsrepro error naming that file and that `check_data` reports it."""
import os, re, shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import rsrepro.standins as S
from rsrepro.check import check_data, check_splits
from rsrepro.core import DATASETS, DataFormatError, DataNotFoundError
from rsrepro.data import find_shared_data

SHARED = find_shared_data()
HAVE = SHARED is not None and all((SHARED/d).is_dir() for d in ('VEDAI', 'DOTA', 'DIOR-R'))
pytestmark = pytest.mark.skipif(not HAVE, reason='no shared VEDAI / DOTA / DIOR-R samples')
DOTA_IDS = ('P0075', 'P1888')          # the two smallest DOTA images: the corpus stays fast


# ---- clean copies: made once; every case gets a tree of links to them and owns only the files it corrupts ----

def _link_tree(src: Path, dst: Path, keep=None) -> Path:
    "`dst` with `src`'s folders and a link to each of its files (`keep(rel)` chooses them)."
    for p in sorted(src.rglob('*')):
        rel = p.relative_to(src)
        if p.is_dir(): (dst/rel).mkdir(parents=True, exist_ok=True)
        elif keep is None or keep(rel):
            (dst/rel).parent.mkdir(parents=True, exist_ok=True); os.symlink(os.path.realpath(p), dst/rel)
    return dst


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
    if not HAVE: pytest.skip('no shared samples')
    d = tmp_path_factory.mktemp('clean')
    roots = {'vedai': _link_tree(SHARED/'VEDAI', d/'VEDAI'), 'dior': _link_tree(SHARED/'DIOR-R', d/'DIOR-R'),
             'dota': _link_tree(SHARED/'DOTA', d/'DOTA', lambda r: r.stem in DOTA_IDS),
             'aviid3': S.smoke_aviid_root(d/'AVIID-3', data_root=SHARED),
             'ohd': S.smoke_ohd_sjtu_root(d/'OHD-SJTU', data_root=SHARED),
             'fair1m': S.smoke_fair1m_root(d/'FAIR1M', data_root=SHARED), 'hrrsd': S.smoke_hrrsd_root(d/'HRRSD', data_root=SHARED)}
    roots['dior_r'] = roots['dior']; roots['ohd_sjtu_s'] = roots['ohd_sjtu_l'] = roots['ohd']
    return roots


def _own(p: Path) -> bytes:
    "Replace a link by a copy of its file (so the corruption never reaches the clean copy); the bytes."
    b = p.read_bytes(); p.unlink(); p.write_bytes(b); return b

def truncate(p):  b = _own(p); p.write_bytes(b[:len(b) // 2]); return str(p)
def zero(p):      _own(p); p.write_bytes(b''); return str(p)
def text(p):      _own(p); p.write_bytes(b'<html><body>404 Not Found</body></html>\n'); return str(p)
def remove(p):    p.unlink(); return str(p)

def _save(p: Path, a: np.ndarray):
    p.unlink()
    if p.suffix == '.tif': tifffile.imwrite(p, a, photometric='rgb' if a.ndim == 3 else 'minisblack')
    else: Image.fromarray(a).save(p)

def _pixels(p: Path) -> np.ndarray:
    return tifffile.imread(p) if p.suffix == '.tif' else np.asarray(Image.open(p))

def resized(h, w):
    def f(p): a = _pixels(p); _save(p, np.ascontiguousarray(np.resize(a, (h, w) + a.shape[2:]))); return str(p)
    return f

def grey(p):   a = _pixels(p); _save(p, np.ascontiguousarray(a[..., 0] if a.ndim == 3 else a)); return str(p)
def uint16(p): a = _pixels(p); _save(p, (a[..., 0] if a.ndim == 3 else a).astype(np.uint16) * 257); return str(p)

def line(k, fn):
    "Edit line `k` (1-based) of a text file with `fn(str) -> str | bytes`; the needle is `path:k`."
    def f(p):
        ls = _own(p).split(b'\n'); new = fn(ls[k - 1].decode())
        ls[k - 1] = new if isinstance(new, bytes) else new.encode(); p.write_bytes(b'\n'.join(ls)); return f'{p}:{k}'
    return f

def field(j, v): return lambda s: ' '.join(v if i == j else x for i, x in enumerate(s.split()))
short = lambda s: ' '.join(s.split()[:-2])
latin1 = lambda s: s.encode()[:-4] + b'\xe9\xe8 0'          # bytes that are not UTF-8 near the end of the line

def xml(pattern, repl, count=1):
    "Replace `pattern` (regex) in an xml file; the needle is the file."
    def f(p): t = _own(p).decode(); p.write_text(re.sub(pattern, repl, t, count=count)); return str(p)
    return f

def xml_half(p): t = _own(p).decode(); p.write_text(t[:len(t) // 2]); return str(p)
def xml_bytes(p): b = _own(p); p.write_bytes(b.replace(b'</name>', b'\xe9\xff</name>', 1)); return str(p)

def append(s):
    "Append lines to a list file; the needle is `path:first new line`."
    def f(p): b = _own(p) if p.exists() else b''; p.write_bytes(b + s.encode()); return f'{p}:{b.count(10) + 1}'
    return f

def write(s):
    def f(p): p.parent.mkdir(parents=True, exist_ok=True); p.write_text(s); return f'{p}'
    return f

def empty(*dirs):
    "Delete every file under the given folders (relative to the root); the needle is the first folder."
    def f(r):
        for d in dirs:
            for p in (r/d).iterdir(): p.unlink()
        return str(r/dirs[0])
    return f

def both(*fns):
    "Several corruptions of the root; the needle of the last one."
    def f(r):
        out = None
        for rel, fn in fns: out = fn(r/rel)
        return out
    return f


V, VA = 'Vehicules512', 'Annotations1024/annotation1024.txt'
DL, DI = 'labelTxt/P1888.txt', 'images/P1888.png'
HX, OX = 'Annotations/Horizontal Bounding Boxes/00001.xml', 'Annotations/Oriented Bounding Boxes/00001.xml'
OL, OS = 'OHD-SJTU-L/trainval/rotation_txt/P0.txt', 'OHD-SJTU-S/trainval/rotation_txt/P0.txt'
FX, HR = 'train/part1/labelXml/2.xml', 'OPT2017/Annotations/00001.xml'
FOLDS = both(('Annotations1024/fold01test.txt', write('00000096\n')),
             ('Annotations1024/fold01.txt', write('00000000\n00000057\n')), ('Annotations1024/fold01.txt', append('1234\n')))

# (dataset, case, relative path or None for the root, corruption, reader kwargs / split for part (a))
CASES = [
    ('vedai', 'co truncated', f'{V}/00000057_co.png', truncate, {}),
    ('vedai', 'co zero bytes', f'{V}/00000057_co.png', zero, {}),
    ('vedai', 'co text as PNG', f'{V}/00000057_co.png', text, {}),
    ('vedai', 'ir truncated', f'{V}/00000096_ir.png', truncate, {}),
    ('vedai', 'ir zero bytes', f'{V}/00000096_ir.png', zero, {}),
    ('vedai', 'ir text as PNG', f'{V}/00000096_ir.png', text, {}),
    ('vedai', 'ir partner missing', f'{V}/00000057_ir.png', remove, {}),
    ('vedai', 'co partner missing', f'{V}/00000000_co.png', remove, {}),
    ('vedai', 'co wrong size', f'{V}/00000057_co.png', resized(256, 256), {}),
    ('vedai', 'ir wrong size', f'{V}/00000000_ir.png', resized(512, 400), {}),
    ('vedai', 'co one band', f'{V}/00000057_co.png', grey, {}),
    ('vedai', 'ir 16-bit', f'{V}/00000057_ir.png', uint16, {}),
    ('vedai', 'annotation short line', VA, line(5, lambda s: ' '.join(s.split()[:-1])), {}),
    ('vedai', 'annotation non-numeric', VA, line(7, field(5, '12o')), {}),
    ('vedai', 'annotation NaN', VA, line(9, field(2, 'nan')), {}),
    ('vedai', 'annotation unknown class', VA, line(11, field(12, '099')), {}),
    ('vedai', 'annotation out of frame', VA, line(13, field(4, '9000')), {}),
    ('vedai', 'annotation not UTF-8', VA, line(15, lambda s: s.encode()[:-6] + b'\xff\xfe 1 0'), {}),
    ('vedai', 'fold list names an absent image', None, FOLDS, {}),
    ('vedai', 'fold list names an absent image (train)', None, FOLDS, {'split': 'train'}),
    ('vedai', 'empty image folder', None, empty(V), {}),
    ('dota', 'label short line', DL, line(3, short), {}),
    ('dota', 'label non-numeric', DL, line(4, field(1, '37S')), {}),
    ('dota', 'label NaN', DL, line(5, field(6, 'NaN')), {}),
    ('dota', 'label unknown class', DL, line(6, field(8, 'container-crane')), {}),
    ('dota', 'label out of image', DL, line(7, field(0, '71200')), {}),
    ('dota', 'label not UTF-8', DL, line(8, latin1), {}),
    ('dota', 'label bad difficult flag', 'labelTxt/P0075.txt', line(3, field(9, 'yes')), {}),
    ('dota', 'image missing for a label', DI, lambda p: (remove(p), str(p.parent.parent/DL))[1], {}),
    ('dota', 'label missing for an image', DL, lambda p: (remove(p), str(p.parent.parent/DI))[1], {}),
    ('dota', 'empty folders', None, empty('labelTxt', 'images'), {}),
    ('dota', 'image truncated', DI, truncate, {}),
    ('dota', 'image zero bytes', DI, zero, {}),
    ('dota', 'image text as PNG', 'images/P0075.png', text, {}),
    ('dota', 'image 16-bit', 'images/P0075.png', uint16, {}),
    ('dior', 'malformed XML', HX, xml_half, {}),
    ('dior', 'unknown class', HX, xml(r'<name>[^<]*</name>', '<name>golf-course</name>'), {}),
    ('dior', 'non-numeric bndbox', HX, xml(r'<xmin>[^<]*</xmin>', '<xmin>13e</xmin>'), {}),
    ('dior', 'NaN bndbox', HX, xml(r'<ymax>[^<]*</ymax>', '<ymax>nan</ymax>'), {}),
    ('dior', 'not UTF-8', HX, xml_bytes, {}),
    ('dior', 'ImageSets names an absent file', 'ImageSets/Main/trainval.txt', append('00002\n'), {}),
    ('dior', 'image truncated', 'JPEGImages-trainval/00001.jpg', truncate, {}),
    ('dior', 'image wrong size', 'JPEGImages-trainval/00001.jpg', resized(600, 800), {}),
    ('dior_r', 'malformed XML', OX, xml(r'</annotation>', ''), {}),
    ('dior_r', 'unknown class', OX, xml(r'<name>[^<]*</name>', '<name>golf</name>'), {}),
    ('dior_r', 'non-numeric robndbox', OX, xml(r'<y_right_top>[^<]*</y_right_top>', '<y_right_top>2 37</y_right_top>'), {}),
    ('dior_r', 'robndbox out of image', OX, xml(r'<x_right_bottom>[^<]*</x_right_bottom>', '<x_right_bottom>6840</x_right_bottom>'), {}),
    ('dior_r', 'non-numeric angle', OX, xml(r'<angle>[^<]*</angle>', '<angle>zero</angle>'), {}),
    ('dior_r', 'ImageSets names an absent file', 'ImageSets/Main/test.txt', write('00001\n11726\n'), {}),
    ('dior_r', 'image missing for an xml', 'JPEGImages-trainval/00001.jpg', lambda p: (remove(p), str(p.parent.parent/OX))[1], {}),
    ('dior_r', 'image text as JPEG', 'JPEGImages-trainval/00001.jpg', text, {}),
    ('hrrsd', 'malformed XML', HR, xml_half, {}),
    ('hrrsd', 'unknown class', HR, xml(r'<name>[^<]*</name>', '<name>aeroplane</name>'), {}),
    ('hrrsd', 'non-numeric bndbox', HR, xml(r'<xmax>[^<]*</xmax>', '<xmax>x</xmax>'), {}),
    ('hrrsd', 'ImageSets names an absent file', 'OPT2017/ImageSets/Main/val.txt', append('00077\n'), {}),
    ('hrrsd', 'ImageSets names an absent file (val)', 'OPT2017/ImageSets/Main/val.txt', append('00077\n'), {'split': 'val'}),
    ('hrrsd', 'image text as JPEG', 'OPT2017/JPEGImages/00003.jpg', text, {}),
    ('fair1m', 'malformed XML', FX, xml_half, {}),
    ('fair1m', 'not UTF-8', FX, xml_bytes, {}),
    ('fair1m', 'unknown class', FX, xml(r'<name>[^<]*</name>', '<name>Spaceship</name>'), {}),
    ('fair1m', 'non-numeric point', 'validation/labelXml/3.xml', xml(r'<point>[^<]*</point>', '<point>1.0;2.0</point>'), {}),
    ('fair1m', 'image truncated', 'train/part1/images/1.tif', truncate, {}),
    ('fair1m', 'image missing for an xml', 'train/part1/images/2.tif', lambda p: (remove(p), str(p.parent.parent/'labelXml'/'2.xml'))[1], {}),
    ('fair1m', 'empty test folder', None, empty('test/images'), {}),
    ('ohd_sjtu_l', 'rotation_txt short line', OL, line(1, short), {}),
    ('ohd_sjtu_l', 'rotation_txt non-numeric', OL, line(2, field(3, '2S1')), {}),
    ('ohd_sjtu_l', 'rotation_txt NaN', OL, line(3, field(9, 'nan')), {}),
    ('ohd_sjtu_l', 'rotation_txt out of image', OL, line(4, field(8, '-4000')), {}),
    ('ohd_sjtu_l', 'rotation_txt not UTF-8', OL, line(2, latin1), {}),
    ('ohd_sjtu_s', 'rotation_txt unknown class', OS, line(1, field(10, 'harbor')), {}),
    ('ohd_sjtu_s', 'image zero bytes', 'OHD-SJTU-S/test/images/P2.jpg', zero, {}),
    ('aviid3', 'infrared partner missing', 'ir/00000057.png', lambda p: (remove(p), str(p.parent.parent/'rgb'/p.name))[1], {}),
    ('aviid3', 'visible partner missing', 'rgb/00000096.png', lambda p: (remove(p), str(p.parent.parent/'ir'/p.name))[1], {}),
    ('aviid3', 'partners differ in size', 'ir/00000000.png', resized(480, 480), {}),
    ('aviid3', 'visible truncated', 'rgb/00000057.png', truncate, {}),
    ('aviid3', 'infrared text as PNG', 'ir/00000096.png', text, {}),
    ('aviid3', 'infrared 16-bit', 'ir/00000096.png', uint16, {}),
    ('aviid3', 'empty folders', None, empty('rgb', 'ir'), {}),
]


@pytest.mark.parametrize('name,case,rel,corrupt,kw', CASES, ids=[f'{c[0]}: {c[1]}' for c in CASES])
def test_corrupt(clean, tmp_path, name, case, rel, corrupt, kw):
    root = _link_tree(clean[name], tmp_path/'root').resolve()
    needle = corrupt(root if rel is None else root/rel)
    kw = dict(kw); splits = [kw.pop('split')] if 'split' in kw else check_splits(name)
    # (a) the reader raises, when it is built or when every sample is read, an rsrepro error naming the file
    messages = []
    for split in splits:
        try:
            ds = DATASETS.get(name)(root=root, split=split, **kw)
            for i in range(len(ds)): ds[i]
        except (DataFormatError, DataNotFoundError) as e: messages.append(str(e))
    assert any(needle in m for m in messages), (needle, messages)
    # (b) check-data reports it, and nothing it met is a reader bug
    lines = check_data(name, root=root, progress=False, **kw)
    assert any(l.startswith(needle) or needle in l for l in lines), (needle, lines)
    assert not [l for l in lines if 'not an rsrepro error' in l], lines


def test_corpus_covers_every_dataset():
    n = {d: sum(c[0] == d for c in CASES) for d in ('vedai', 'aviid3', 'dior', 'dior_r', 'dota', 'ohd_sjtu_s',
                                                     'ohd_sjtu_l', 'fair1m', 'hrrsd')}
    assert len(CASES) >= 50 and min(n.values()) >= 1, n


@pytest.mark.parametrize('name', ['vedai', 'aviid3', 'dior', 'dior_r', 'dota', 'ohd_sjtu_s', 'ohd_sjtu_l', 'fair1m', 'hrrsd'])
def test_clean_copy_has_no_problems(clean, name):
    assert check_data(name, root=clean[name], progress=False) == []


def test_check_data_reports_every_bad_file(clean, tmp_path):
    "Several problems: one run names each of them, and the images of the good label files are still read."
    root = _link_tree(clean['dota'], tmp_path/'root').resolve()
    bad = [line(3, short)(root/DL), line(4, field(8, 'tank'))(root/DL), zero(root/'images'/'P0075.png')]
    with pytest.raises(DataFormatError) as e: DATASETS.get('dota')(root=root)
    assert all(b in str(e.value) for b in bad[:2]) and e.value.dataset.ids == ['P0075']
    lines = check_data('dota', root=root, progress=False)
    assert len(lines) == 3 and all(any(l.startswith(b) for l in lines) for b in bad), lines


def test_missing_partner_skip_is_logged(clean, tmp_path):
    "on_missing='skip' drops the scenes without their partner, names them in a warning and in drop_message."
    root = _link_tree(clean['vedai'], tmp_path/'vedai').resolve()
    (root/V/'00000057_ir.png').unlink()
    with pytest.warns(UserWarning, match=r'vedai: dropped 1 sample\(s\) .*: 00000057'):
        ds = DATASETS.get('vedai')(root=root, on_missing='skip')
    assert ds.ids == ['00000000', '00000096'] and ds.dropped == ['00000057'] and '00000057' in ds.drop_message
    assert DATASETS.get('vedai')(root=root, modalities=('rgb',)).ids == ['00000000', '00000057', '00000096']
    a = _link_tree(clean['aviid3'], tmp_path/'aviid').resolve()
    (a/'rgb'/'00000000.png').unlink()
    with pytest.warns(UserWarning, match=r'aviid3: dropped 1 sample\(s\) .*00000000\.png'):
        av = DATASETS.get('aviid3')(root=a, on_missing='skip')
    assert [p[0] for p in av.pairs] == ['00000057', '00000096'] and av.drop_message
    assert len(DATASETS.get('aviid3')(root=a, modalities=('ir',))) == 3             # the visible file is not read
    with pytest.raises(ValueError, match='on_missing'): DATASETS.get('aviid3')(root=a, on_missing='ignore')


def test_dota_split_layout_is_checked_whole(clean, tmp_path):
    "The official train/ + val/ layout: split='all' (what check-data reads) takes both, and an empty val/ is reported."
    root = tmp_path/'DOTA'
    for split, i in (('train', 'P0075'), ('val', 'P1888')):
        for sub, ext in (('images', 'png'), ('labelTxt', 'txt')):
            (root/split/sub).mkdir(parents=True); os.symlink(os.path.realpath(clean['dota']/sub/f'{i}.{ext}'), root/split/sub/f'{i}.{ext}')
    assert DATASETS.get('dota')(root=root).ids == ['train/P0075', 'val/P1888'] and check_data('dota', root=root, progress=False) == []
    for p in (root/'val').rglob('*.*'): p.unlink()
    assert check_data('dota', root=root, progress=False) == [f'{root.resolve()}/val/labelTxt: empty folder, no label files '
                                                             f'(and no images in {root.resolve()}/val/images)']
