"Tests of rsrepro.imim_protocol: settings, profiles, the pre-training view, and the full profile's data guard."
import os
from pathlib import Path

import pytest
import torch

from rsrepro.core import DataNotFoundError
from rsrepro.data import find_shared_data
from rsrepro.imim_protocol import (ASSUMPTIONS, Finetune, ImimExperiment, MIMImages, Pretrain, get_profile,
                                   smoke_aviid_root)
from rsrepro.published import load

SHARED = find_shared_data()
needs_vedai = pytest.mark.skipif(SHARED is None or not (SHARED/'VEDAI').is_dir(), reason='no shared VEDAI sample')


def test_settings_validate():
    with pytest.raises(ValueError, match='mask_size'): Pretrain('dior', 'rgb', 'interactive', 48)
    with pytest.raises(ValueError, match='RGB only'): Pretrain('dior', 'rgbir')
    with pytest.raises(ValueError, match='data='): Pretrain('imagenet')
    with pytest.raises(ValueError, match='cannot start'): Finetune('swin_yolov5', 'rgb', Pretrain('vedai', 'rgbir'))
    with pytest.raises(ValueError, match='only swin_yolov5'): Finetune('yolov5s', 'rgb', Pretrain('vedai', 'rgb'))
    # distinct settings never share a run folder; equal settings always do
    keys = {Finetune('swin_yolov5', 'rgbir', Pretrain('aviid3_expanded', 'rgbir', 'interactive', m), fold=f).key
            for m in (16, 32, 64) for f in (1, 2)}
    assert len(keys) == 6
    assert Pretrain('dior').key == Pretrain('dior', 'rgb', 'interactive', 32).key


def test_full_profile_follows_the_paper():
    full = get_profile('full')
    assert (full.finetune.optimizer, full.finetune.lr0, full.finetune.weight_decay) == ('AdamW', 1e-5, 0.005)
    assert full.folds == tuple(range(1, 11))              # overall evaluation: all 10 folds
    assert full.require_full_data and not get_profile('smoke').require_full_data
    # every mask size of Table IV divides the pre-training size (exact ratio needs whole blocks)
    assert all(full.pretrain_size % m == 0 for m in (16, 32, 64))
    with pytest.raises(Exception, match='profile'): get_profile('medium')


def test_assumptions_cover_what_the_notebooks_cite():
    import json
    for nb in Path(__file__).parents[1].joinpath('nbs', 'papers', 'imim').glob('*.ipynb'):
        src = ''.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'])
        assert 'not claims' in src, f'{nb.name} must say smoke numbers are not claims'
        for k in ASSUMPTIONS:
            if f"'{k}'" in src: assert ASSUMPTIONS[k]


def test_table_rows_match_published_names():
    "Rows the notebooks record must be rows of the published tables (else they would not line up)."
    pub = set(load('imim', 'II')['row'])
    assert {'Training from scratch (w/o pre-training)', 'MAE pre-training on VEDAI', 'MAE pre-training on DIOR',
            'Cross-attention MIM on DIOR, Q masked', 'Cross-attention MIM on DIOR, Q unmasked'} == pub
    assert {f'Mask size / {m}' for m in (16, 32, 64)} == set(load('imim', 'IV')['column'])


def test_mim_images_view():
    class Toy(torch.utils.data.Dataset):
        def __len__(self): return 2
        def __getitem__(self, i): return {'image': torch.rand(4, 300, 200), 'id': str(i)}
    torch.manual_seed(0)
    v = MIMImages(Toy(), 64)
    x = v[0]['image']
    assert x.shape == (4, 64, 64) and 0 <= x.min() and x.max() <= 1 and set(v[1]) == {'image'}


@needs_vedai
def test_smoke_aviid_stand_in_and_full_guard(tmp_path):
    root = smoke_aviid_root(tmp_path/'AVIID-3')
    assert len(list((root/'rgb').glob('*.png'))) == 3 == len(list((root/'ir').glob('*.png')))
    from rsrepro.detection_data import AVIID3, VEDAI
    a = AVIID3(root=root, split='all', expand=True)
    v = VEDAI(split='all')
    assert len(a) == 12 and a[0]['image'].shape == (4, 256, 256)
    # the stand-in holds VEDAI's own pixels (uint8 round trip)
    full = AVIID3(root=root, split='all')[0]['image']
    assert torch.allclose(full, v[v.ids.index(AVIID3(root=root, split='all')[0]['id'])]['image'], atol=1 / 255)
    # the full profile refuses to run on the small samples and says what to do
    ex = ImimExperiment('full', out_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match='full dataset'):
        ex.vedai('test', 'rgbir', 1) if (SHARED/'VEDAI'/'fold01.txt').exists() else ex.vedai('all', 'rgbir', 1)
