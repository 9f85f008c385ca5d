"""rsrepro.io: the one image reader/writer: clear errors naming the file, round trips, the multi-band TIFF layouts."""
from pathlib import Path

import numpy as np
import pytest
import tifffile

from rsrepro.core import DataFormatError, DataNotFoundError
from rsrepro.io import raster_chw, read_bands, read_image, resample_band, write_png, write_tiff


def test_corrupt_tif_names_file(tmp_path):
    bad = tmp_path/'S2X_B02.tif'
    bad.write_bytes(b'II*\x00' + b'\x07' * 50)
    with pytest.raises(DataFormatError, match='S2X_B02.tif'):
        read_image(bad)
    good = tmp_path/'good.tif'
    tifffile.imwrite(good, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    trunc = tmp_path/'truncated.tif'
    trunc.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataFormatError, match='truncated.tif'):
        read_image(trunc)
    junk = tmp_path/'junk.png'
    junk.write_bytes(b'hello world, not an image')
    with pytest.raises(DataFormatError, match='junk.png'):
        read_image(junk)
    j2 = tmp_path/'real.jp2'
    j2.write_bytes(b'\x00\x00\x00\x0cjP  \r\n\x87\n' + b'\x00' * 20)
    with pytest.raises(DataFormatError, match='JPEG 2000'):
        read_image(j2)
    with pytest.raises(DataNotFoundError, match='absent.tif'):
        read_image(tmp_path/'absent.tif')


def test_read_image_roundtrip(tmp_path):
    from PIL import Image
    rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    Image.fromarray(rgb).save(tmp_path/'x.png')
    assert np.array_equal(read_image(tmp_path/'x.png'), rgb)
    a = np.random.default_rng(0).integers(0, 9999, (3, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path/'x.jp2', a)        # a GeoTIFF-like file behind a .jp2 name is read by content
    assert np.array_equal(read_image(tmp_path/'x.jp2'), a)


def test_resample_band():
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    up = resample_band(b, (6, 8), 'nearest')
    assert np.array_equal(up, b.repeat(2, 0).repeat(2, 1))
    lin = resample_band(b, (6, 8))
    assert lin.dtype == np.float32 and np.isclose(lin.mean(), b.mean(), atol=1e-5)
    const = resample_band(np.full((20, 20), 7.0), (120, 120), 'bicubic')
    assert np.allclose(const, 7.0, atol=1e-4)



@pytest.mark.parametrize('pages', [False, True])
@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32])
def test_write_tiff_round_trip_keeps_every_band(tmp_path, pages, dtype):
    "Both layouts come back as [C,H,W]: a page-per-band file used to read back as its first band only."
    a = (np.arange(4 * 5 * 6) % 200).astype(dtype).reshape(4, 5, 6)
    p = write_tiff(tmp_path/'x.tif', a, pages=pages)
    got = raster_chw(read_image(p), p)
    assert got.shape == (4, 5, 6) and got.dtype == dtype and np.array_equal(got, a)
    assert read_bands(p, 'test', lambda c: c == 4, '4').shape == (4, 5, 6)
    with pytest.raises(DataFormatError, match=r'x\.tif: the test file has 4 band\(s\), expected 3'):
        read_bands(p, 'test', lambda c: c == 3, '3')


def test_page_per_band_tiff_is_what_opencv_reads_as_channels(tmp_path):
    "ultralytics decodes TIFFs with OpenCV: pages become channels; a band-planar file would be read as one band."
    cv2 = pytest.importorskip('cv2')
    a = (np.arange(4 * 5 * 6) % 251).astype(np.uint8).reshape(4, 5, 6)
    ok, frames = cv2.imdecodemulti(np.fromfile(write_tiff(tmp_path/'p.tif', a, pages=True), np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and np.array_equal(np.stack(frames), a)
    ok, frames = cv2.imdecodemulti(np.fromfile(write_tiff(tmp_path/'s.tif', a), np.uint8), cv2.IMREAD_UNCHANGED)
    assert ok and len(frames) == 1 and frames[0].shape == (5, 6)


def test_single_band_and_png(tmp_path):
    b = np.arange(30, dtype=np.uint8).reshape(5, 6)
    assert np.array_equal(read_image(write_tiff(tmp_path/'b.tif', b[None])), b)
    assert np.array_equal(read_image(write_png(tmp_path/'b.png', b)), b)
    with pytest.raises(ValueError, match='expected'):
        write_tiff(tmp_path/'bad.tif', np.zeros((1, 2, 3, 4)))



def test_load_weights_one_loader_for_every_case(tmp_path):
    "fit checkpoints, weights.pt files and dicts; a prefix part, a rename and an adapt hook; errors name the file."
    import torch
    from rsrepro.io import LoadReport, load_weights
    src = torch.nn.ModuleDict({'encoder': torch.nn.Linear(3, 4), 'decoder': torch.nn.Linear(4, 2)})
    p = tmp_path/'weights.pt'
    torch.save({'model': src.state_dict(), 'setting': {}, 'steps': 3}, p)
    whole = torch.nn.ModuleDict({'encoder': torch.nn.Linear(3, 4), 'decoder': torch.nn.Linear(4, 2)})
    r = load_weights(whole, p)
    assert isinstance(r, LoadReport) and len(r.loaded) == 4 and not r.missing and not r.unused
    part = torch.nn.Linear(3, 4)
    r = load_weights(part, p, prefix='encoder.', strict=False)
    assert torch.equal(part.weight, src['encoder'].weight) and r.unused == ['decoder.bias', 'decoder.weight']
    with pytest.raises(DataFormatError, match=r'weights\.pt does not fit Linear: missing \[bias, weight\]'):
        load_weights(torch.nn.Linear(3, 4), p)
    # rename + adapt: a tensor of another shape is resampled by the hook, not refused
    big = torch.nn.Linear(3, 8)
    r = load_weights(big, {'enc.weight': torch.ones(4, 3), 'enc.bias': torch.ones(4)}, prefix='enc.',
                     adapt=lambda k, v, own: torch.nn.functional.interpolate(v.T[None], size=own.shape[0])[0].T
                     if v.ndim == 2 else v.repeat(2))
    assert r.adapted == ['bias', 'weight'] and torch.equal(big.weight, torch.ones(8, 3))
    with pytest.raises(DataFormatError, match=r'weight: \(4, 3\) in the file vs \(8, 3\)'):
        load_weights(torch.nn.Linear(3, 8), p, prefix='encoder.')
    with pytest.raises(DataFormatError, match='no nothing.\\* tensors'): load_weights(part, p, prefix='nothing.')
    (tmp_path/'junk.pt').write_bytes(b'not a pickle')
    with pytest.raises(DataFormatError, match=r'junk\.pt cannot be read'): load_weights(part, tmp_path/'junk.pt')
    with pytest.raises(DataNotFoundError, match=r'absent\.pt does not exist'): load_weights(part, tmp_path/'absent.pt')
