"Tests of rsrepro.imim_protocol: settings, profiles, the pre-training view, and the full profile's data guard."
import os
from pathlib import Path

import pytest
import torch

from rsrepro.core import DataNotFoundError
from rsrepro.data import find_shared_data
from rsrepro.imim_protocol import ASSUMPTIONS, PROFILES, Finetune, ImimExperiment, MIMImages, Pretrain
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
    full = PROFILES['full']
    assert (full.finetune.optimizer, full.finetune.lr0, full.finetune.weight_decay) == ('AdamW', 1e-5, 0.005)
    assert full.folds == tuple(range(1, 11))              # overall evaluation: all 10 folds
    # every mask size of Table IV divides the pre-training size (exact ratio needs whole blocks)
    assert all(full.pretrain_size % m == 0 for m in (16, 32, 64))


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
