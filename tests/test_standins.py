"""rsrepro.standins: smoke stand-ins hold the real samples' own pixels in the official layouts, are idempotent, and are
labelled as stand-ins; the sample test tells them from full datasets."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import rsrepro.multimodal_data as md
import rsrepro.standins as S
from rsrepro.data import find_shared_data, package_dir

SHARED = find_shared_data()
HAS_VEDAI = SHARED is not None and (SHARED/'VEDAI'/'Vehicules512').is_dir()
_LIDAR = package_dir('lidar')
HAS_LIDAR = _LIDAR is not None and (_LIDAR/'data'/'dem.tif').is_file()
HAS_BEN = package_dir('bigearthnet_common') is not None
needs_vedai = pytest.mark.skipif(not HAS_VEDAI, reason='no shared VEDAI sample')
needs_dfc_smoke = pytest.mark.skipif(not (HAS_VEDAI and HAS_LIDAR), reason='needs the shared VEDAI sample '
                                     '(shared/data/VEDAI) and lidar==0.8.4 (pip install --no-deps lidar==0.8.4)')
needs_quad_smoke = pytest.mark.skipif(not (HAS_BEN and HAS_LIDAR), reason='needs bigearthnet-common==2.8.0 and '
                                      'lidar==0.8.4 (pip install --no-deps bigearthnet-common==2.8.0 lidar==0.8.4)')


@pytest.mark.parametrize('source, sample', [
    ('shared-samples:/work/shared/data/VEDAI', True), ('package-samples:bigearthnet-common==2.8.0', True),
    ('smoke-standin:/tmp/x', True), ('RSREPRO_DATA:/data/VEDAI', False), ('data-root:/data/VEDAI', False),
    ('root:/data/VEDAI', False)])
def test_is_sample_source(source, sample):
    assert S.is_sample_source(source) is sample


def test_marker(tmp_path):
    assert not S.is_standin(tmp_path)
    (tmp_path/'SOURCE.txt').write_text('a real dataset\n')
    assert not S.is_standin(tmp_path)
    (tmp_path/'SOURCE.txt').write_text(S.SMOKE_MARKER + ' for a test\n')
    assert S.is_standin(tmp_path)


@needs_dfc_smoke
def test_smoke_dfc2023_root(tmp_path):
    from rsrepro.detection_data import VEDAI
    root = S.smoke_dfc2023_root(tmp_path/'DFC_Track_2')
    src = (root/'SOURCE.txt').read_text()
    assert src.startswith(S.SMOKE_MARKER) and 'NOT SAR' in src and 'lidar==0.8.4' in src
    tr, va = md.DFC2023Track2(root=root, split='train'), md.DFC2023Track2(root=root, split='val')
    assert len(tr) == len(va) == 12 and tr.ids == va.ids and S.is_standin(tr.root)
    assert S.standin_source(tr.root) == f'smoke-standin:{root.resolve()}' and S.is_sample_source(S.standin_source(root))
    ved = VEDAI(split='all')[0]['image']                                  # scene 00000000, first tile = top left
    s = tr[0]
    assert s['id'] == 'P_00000000_00' and s['rgb'].shape == (3, 256, 256)
    assert (s['rgb'] - ved[:3, :256, :256]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(s['sar'][0], ved[3, :256, :256])
    dem = tifffile.imread(_LIDAR/'data'/'dem.tif')
    assert torch.equal(s['dsm'][0], torch.from_numpy(dem[:256, :256].astype(np.float32)))
    n = 0
    for k in range(len(tr)):
        t = tr[k]; m = t['instances']['masks']; n += len(m)
        assert m.flatten(1).any(1).all() and torch.equal(t['mask'], m.any(0).long() if len(m) else t['mask'] * 0)
    assert n > 0
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    S.smoke_dfc2023_root(root)                                           # idempotent: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()} == before


@needs_quad_smoke
def test_smoke_quadruplet_root(tmp_path):
    from rsrepro.data import BigEarthNetMM, bigearthnet_package_samples
    root = S.smoke_quadruplet_root(tmp_path/'Quadruplets')
    src = (root/'SOURCE.txt').read_text()
    assert src.startswith(S.SMOKE_MARKER) and 'NOT Dynamic World' in src and 'NOT UrbanAtlas' in src
    tr, va = md.Quadruplets(root=root, split='train'), md.Quadruplets(root=root, split='val')
    assert (len(tr), len(va)) == (4, 2) and S.is_standin(va.root)
    ben = BigEarthNetMM(root=bigearthnet_package_samples()[0], split='all', normalize=False)
    b, s = ben[0], tr[0]
    assert s['id'] == f'f1/s2_ben/{ben.ids[0]}' and s['s1'].shape == (2, 112, 112)
    assert torch.equal(s['s1'], b['s1'][:, 4:116, 4:116])
    assert torch.equal(s['s2'], b['s2'][[1, 2, 3, 7], 4:116, 4:116].round())
    dnw, ua = S.spectral_rule_classes(s['s2'].numpy())
    assert torch.equal(s['dnw'], torch.from_numpy(dnw)) and torch.equal(s['mask'], torch.from_numpy(md.merge_ua_labels(ua)))
    assert set(torch.cat([tr[k]['mask'].flatten() for k in range(4)]).unique().tolist()) <= set(range(7))


@needs_vedai
def test_smoke_aviid_root(tmp_path):
    root = S.smoke_aviid_root(tmp_path/'AVIID-3')
    assert len(list((root/'rgb').glob('*.png'))) == 3 == len(list((root/'ir').glob('*.png')))
    assert S.is_standin(root) and 'NOT AVIID' in (root/'SOURCE.txt').read_text()
    from rsrepro.detection_data import AVIID3, VEDAI
    a = AVIID3(root=root, split='all', expand=True)
    v = VEDAI(split='all')
    assert len(a) == 12 and a[0]['image'].shape == (4, 256, 256)
    # the stand-in holds VEDAI's own pixels (uint8 round trip)
    full = AVIID3(root=root, split='all')[0]
    assert torch.allclose(full['image'], v[v.ids.index(full['id'])]['image'], atol=1 / 255)
