"""`rsrepro check-data`: every registered dataset checks clean on its real samples (or its labelled stand-in, for the
datasets that have no public sample); the CLI prints one line per problem with no traceback and exits 1 / 0; SHA-256
manifests and publisher checksums catch a changed byte. The per-reader corruption corpus is in tests/test_corrupt_*.py."""
import shutil
from pathlib import Path

import pytest

from rsrepro import standins
from rsrepro.check import (PUBLISHER_CHECKSUMS, check_data, check_splits, file_digest, verify_manifest,
                           verify_publisher, write_manifest)
from rsrepro.cli import main
from rsrepro.core import DATASETS, DataNotFoundError

# datasets with no public sample: the stand-in writer that builds their official layout from real imagery
STANDIN = {'aviid3': standins.smoke_aviid_root, 'dfc2023_track2': standins.smoke_dfc2023_root,
           'quadruplets': standins.smoke_quadruplet_root, 'sen12ms': standins.smoke_sen12ms_root,
           'c2seg_bw': standins.smoke_c2seg_bw_root, 'globe230k': standins.smoke_globe230k_root,
           'ohd_sjtu_s': standins.smoke_ohd_sjtu_root, 'ohd_sjtu_l': standins.smoke_ohd_sjtu_root,
           'fair1m': standins.smoke_fair1m_root, 'hrrsd': standins.smoke_hrrsd_root}


def clean_root(name, tmp_path):
    "The real samples' folder of `name`, or a stand-in written to tmp_path; skip where the samples are not installed."
    if name in STANDIN: return STANDIN[name](tmp_path/name)
    try: return Path(DATASETS.get(name)(split=check_splits(name)[0]).root)   # where the reader finds its samples
    except DataNotFoundError as e: pytest.skip(f'no samples of {name} here: {str(e).splitlines()[0]}')


@pytest.mark.parametrize('name', DATASETS.names())
def test_every_registered_dataset_checks_clean(name, tmp_path, capsys):
    "The acceptance item: check-data exists for every registered dataset and exits 0 on the real samples."
    root = clean_root(name, tmp_path)
    assert check_splits(name), name
    rc = main(['check-data', name, '--root', str(root), '--no-progress'])
    out, err = capsys.readouterr()
    assert rc == 0 and out == '', (name, out)
    assert f'rsrepro check-data {name}: 0 problem(s)' in err


def vedai_copy(tmp_path):
    root = clean_root('vedai', tmp_path)
    dst = tmp_path/'VEDAI'
    shutil.copytree(root, dst)
    return dst


def test_cli_reports_each_problem_by_file_without_traceback(tmp_path, capsys):
    root = vedai_copy(tmp_path)
    png = sorted((root/'Vehicules512').glob('*_co.png'))[0]
    png.write_bytes(png.read_bytes()[:3000])                       # truncated
    rc = main(['check-data', 'vedai', '--root', str(root), '--no-progress'])
    out, err = capsys.readouterr()
    assert rc == 1
    lines = out.splitlines()
    assert lines and all(png.name in l or str(root) in l for l in lines), out
    assert any(str(png) in l for l in lines), out
    assert 'Traceback' not in out + err
    assert check_data('vedai', root=root, progress=False) == lines


def test_manifest_written_only_when_clean_and_verified(tmp_path, capsys):
    root = vedai_copy(tmp_path)
    assert main(['check-data', 'vedai', '--root', str(root), '--no-progress', '--write-manifest']) == 0
    capsys.readouterr()
    m = root/'rsrepro.sha256'
    lines = m.read_text().splitlines()
    assert len(lines) == sum(1 for p in root.rglob('*') if p.is_file()) - 1
    assert all(len(l.split('  ')[0]) == 64 for l in lines)
    assert main(['check-data', 'vedai', '--root', str(root), '--no-progress', '--verify']) == 0
    capsys.readouterr()
    # a re-encoded image still decodes (so the reader accepts it) but the manifest catches it
    from PIL import Image
    png = sorted((root/'Vehicules512').glob('*_ir.png'))[0]
    Image.open(png).save(png, optimize=True, compress_level=1)
    assert check_data('vedai', root=root, progress=False) == []
    assert main(['check-data', 'vedai', '--root', str(root), '--no-progress', '--verify']) == 1
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and str(png) in out and 'sha256' in out
    # a problem blocks a new manifest
    (root/'Annotations1024/annotation1024.txt').write_bytes(b'\xff\xfe garbage\n')
    before = m.read_bytes()
    assert main(['check-data', 'vedai', '--root', str(root), '--no-progress', '--write-manifest']) == 1
    assert m.read_bytes() == before
    assert 'no manifest written' in capsys.readouterr().err


def test_verify_takes_a_publisher_sha512_list(tmp_path):
    (tmp_path/'ROIs1158_spring').mkdir()
    f = tmp_path/'ROIs1158_spring'/'a.tif'
    f.write_bytes(b'abc')
    (tmp_path/'checksums.sha512').write_text(f"{file_digest(f, 'sha512')} *ROIs1158_spring/a.tif\n")
    assert verify_manifest(tmp_path, tmp_path/'checksums.sha512', progress=False) == []
    f.write_bytes(b'abd')
    [p] = verify_manifest(tmp_path, tmp_path/'checksums.sha512', progress=False)
    assert str(f) in p and 'sha512' in p


def test_publisher_checksums_are_md5_of_known_archives(tmp_path):
    assert set(PUBLISHER_CHECKSUMS) <= set(DATASETS.names())
    for name, files in PUBLISHER_CHECKSUMS.items():
        assert all(len(d) == 32 and int(d, 16) >= 0 for d in files.values()), name
    root = tmp_path/'SEN12MS'; root.mkdir()
    (root/'ROIs1970_fall_lc.tar.gz').write_bytes(b'truncated download')
    probs, seen = verify_publisher('sen12ms', root, progress=False)
    assert seen == [root/'ROIs1970_fall_lc.tar.gz'] and 'ROIs1970_fall_lc.tar.gz' in probs[0]


def test_unknown_dataset_is_a_clean_error(capsys):
    assert main(['check-data', 'no_such_dataset', '--no-progress']) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'no_such_dataset'" in err and 'Traceback' not in err


def test_splits_follow_the_layout(tmp_path):
    "DFC2023's test json is checked when the copy has it; SEN12MS's land-cover maps are read by check-data."
    from rsrepro.check import check_kwargs
    root = clean_root('dfc2023_track2', tmp_path)
    assert check_splits('dfc2023_track2', root) == ('train', 'val')
    (root/'annotations'/'buildings_only_test.json').write_text('{}')
    assert check_splits('dfc2023_track2', root) == ('train', 'val', 'test')
    assert 'lc' in check_kwargs('sen12ms')['modalities']
