"""incomplete's protocol: the full profile follows the paper, the paradigms switch what they say, the full profile
refuses stand-ins, scores match hand cases, and a smoke run is cached and resumable."""
import json

import pytest
import torch

from rsrepro.core import DataNotFoundError
from rsrepro.incomplete_protocol import (CLASSES, PARADIGMS, PROFILES, QUERIES, Finetune, IncompleteExperiment, Pretrain,
                                         build_segmenter, combo_label, score)


def test_full_profile_is_the_papers_protocol():
    p = PROFILES['full']
    assert p.img_size == 256 and p.require_full_data
    pt = p.pretrain
    assert (pt.epochs, pt.batch_size, pt.lr, pt.weight_decay, pt.warmup_epochs) == (1600, 40, 1e-4, 0.05, 40)
    dfc, quad = p.finetune['dfc2023'], p.finetune['quadruplets']
    assert (dfc.epochs, dfc.batch_size, quad.epochs, quad.batch_size) == (50, 10, 30, 30)
    for c in (dfc, quad):
        assert (c.lr, c.weight_decay, c.schedule, tuple(c.milestones), c.gamma) == (1e-4, 0.05, 'step', (0.9, 0.95), 0.1)
    assert QUERIES == {'instance': 100, 'semantic': 2, 'lulc': 9} and CLASSES['lulc'] == 7


@pytest.mark.parametrize('paradigm', list(PARADIGMS))
def test_paradigms_switch_what_they_say(paradigm):
    m = build_segmenter(Finetune('dfc2023', 'semantic', paradigm), img_size=64, hidden_dim=32)
    bb = m.backbone
    assert bb.masked_attention == (paradigm not in ('w/o Mask', 'Sup. MultiViT'))
    assert bb.img_size == 64
    assert (bb.modality_attention is not None) == (paradigm not in ('w/o Attention', 'Sup. MultiViT'))
    assert m.random_modalities == (paradigm not in ('w/o Random', 'Sup. MultiViT'))
    f = Finetune('dfc2023', 'semantic', paradigm)
    assert (f.pretrain is not None) == paradigm.startswith('Fine.')
    if paradigm == 'Fine. w/ G. & C.': assert f.pretrain == Pretrain('dfc2023', contrastive=True)


def test_settings_validation_and_keys():
    with pytest.raises(ValueError, match='task'): Finetune('quadruplets', 'instance')
    with pytest.raises(ValueError, match='paradigm'): Finetune('dfc2023', 'semantic', 'Sup. ViT')
    with pytest.raises(ValueError, match='data'): Pretrain('dfc2024')
    keys = {Finetune(d, t, p).key for d, ts in (('dfc2023', ('instance', 'semantic')), ('quadruplets', ('lulc',)))
            for t in ts for p in PARADIGMS}
    assert len(keys) == 3 * len(PARADIGMS)
    assert combo_label(('s1', 's2', 'dem', 'dnw')) == 'S1, S2, DEM, DNW'


def test_random_modalities_draw_subsets_in_training_only():
    m = build_segmenter(Finetune('dfc2023', 'semantic'), img_size=64, hidden_dim=32).train()
    b = {'sar': torch.zeros(64, 1, 64, 64), 'rgb': torch.zeros(64, 3, 64, 64), 'dsm': torch.zeros(64, 1, 64, 64)}
    torch.manual_seed(0)
    combos = set()
    for _ in range(64):                         # one subset per step, the same for every sample of the batch
        pres = m._present(b, None)
        rows = {tuple(bool(pres[n][i]) for n in ('sar', 'rgb', 'dsm')) for i in range(64)}
        assert len(rows) == 1
        combos |= rows
    assert len(combos) == 7 and (False, False, False) not in combos
    m.combination = 'sample'
    pres = m._present(b, None)
    assert len({tuple(bool(pres[n][i]) for n in ('sar', 'rgb', 'dsm')) for i in range(64)}) == 7
    assert m.eval()._present(b, None) is None


def test_scores_by_hand():
    # mIoU, 2 classes: building tp 1, fn 1 -> IoU 1/2; background tp 2, fp 1 -> IoU 2/3; mean 7/12
    pred = torch.tensor([[1, 0], [0, 0]]); gt = torch.tensor([[1, 1], [0, 0]])
    assert score('semantic', [pred], [{'mask': gt}]) == pytest.approx(7 / 12)
    # LULC ignores 255
    assert score('lulc', [torch.tensor([[3, 3]])], [{'mask': torch.tensor([[3, 255]])}]) == pytest.approx(1.0)
    # AP50: one GT, a hit ranked below a miss -> precision 1/2 at recall 1 -> COCO 101-point AP 0.5
    g = torch.zeros(1, 4, 4, dtype=torch.bool); g[0, :2, :2] = True
    hit = g.clone(); miss = torch.zeros(1, 4, 4, dtype=torch.bool); miss[0, 3, 3] = True
    p = {'masks': torch.cat([miss, hit]), 'scores': torch.tensor([0.9, 0.8])}
    assert score('instance', [p], [{'instances': {'masks': g}}]) == pytest.approx(0.5, abs=1e-6)


def test_smoke_runs_are_cached_and_resume(tmp_path):
    ex = IncompleteExperiment('smoke', out_dir=tmp_path, device='cpu')
    try: ex.dataset('quadruplets', 'train')
    except DataNotFoundError as e: pytest.skip(f'no smoke stand-in here: {e}')
    f = Finetune('quadruplets', 'lulc', 'Fine. w/ G. & C.')
    s1 = ex.evaluate(f)
    assert len(s1) == 15 and all(0 <= v <= 1 for v in s1.values())
    run = tmp_path/'runs'/'incomplete'
    assert (run/'pretrain'/'quadruplets_gc'/'done.json').is_file() and not (run/'pretrain'/'quadruplets_gc'/'checkpoint.pt').exists()
    done = json.loads((run/'finetune'/f.key/'done.json').read_text())
    assert 'smoke-standin' in done['source']
    mtime = (run/'finetune'/f.key/'weights.pt').stat().st_mtime
    assert IncompleteExperiment('smoke', out_dir=tmp_path, device='cpu').evaluate(f) == s1    # cached
    assert (run/'finetune'/f.key/'weights.pt').stat().st_mtime == mtime


def test_w_all_is_its_own_run():
    "Table III/IV's 'w/ all' is Sup. Proposed's setting trained again (own folder, own seed), not a copy of its numbers."
    a, b = Finetune('quadruplets', 'lulc', 'w/ all'), Finetune('quadruplets', 'lulc', 'Sup. Proposed')
    assert a.key != b.key and PARADIGMS['w/ all'][2].get('seed_offset', 0) != PARADIGMS['Sup. Proposed'][2].get('seed_offset', 0)
    ma, mb = (build_segmenter(f, img_size=64, hidden_dim=32) for f in (a, b))
    assert repr(ma) == repr(mb) and ma.random_modalities and mb.random_modalities


def test_visible_tokens_are_half_of_all_tokens():
    from rsrepro.incomplete import IncompletePretrain, incomplete_vit_tiny_patch16
    from rsrepro.incomplete_protocol import DATA
    nv = {d: IncompletePretrain(incomplete_vit_tiny_patch16(modalities=DATA[d], img_size=PROFILES['full'].img_size)
                                ).num_visible for d in DATA}
    assert nv == {'dfc2023': 384, 'quadruplets': 512}


def test_dfc2023_is_cut_into_256_px_tiles_not_resized(tmp_path):
    "The organisers' 512-px images give four 256-px tiles each, holding the image's own pixels."
    import numpy as np
    from rsrepro.io import write_tiff
    base = tmp_path/'DFC_Track_2'
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for m, c in (('rgb', 3), ('sar', 1), ('height', 1)):
            write_tiff(base/split/m/'P_0000.tif', rng.random((c, 512, 512), dtype=np.float32) * 255)
        (base/'annotations').mkdir(parents=True, exist_ok=True)
        (base/'annotations'/f'buildings_only_{split}.json').write_text(json.dumps(
            {'images': [{'id': 0, 'file_name': 'P_0000.tif', 'height': 512, 'width': 512}], 'annotations': [],
             'categories': [{'id': 1, 'name': 'building'}]}))
    ex = IncompleteExperiment('full', data_root=tmp_path, out_dir=tmp_path/'out', device='cpu')
    ds = ex.dataset('dfc2023', 'train')
    assert len(ds) == 4 and ds[3]['rgb'].shape == (3, 256, 256) and ds[3]['id'].endswith('_r256_c256')
    raw = __import__('rsrepro.multimodal_data', fromlist=['x']).DFC2023Track2(root=base, split='train', normalize=True)[0]
    assert torch.equal(ds[3]['sar'], raw['sar'][:, 256:, 256:])
