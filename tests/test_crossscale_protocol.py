"""crossscale's other downstream tasks (SEN12MS, C2Seg-BW, Globe230k): settings, data preparation, sliding-window
inference, metrics and short end-to-end runs on the stand-ins."""
from types import SimpleNamespace

import pytest
import torch

from rsrepro.crossscale import Segmenter
from rsrepro.crossscale_protocol import (DATA, SCENE_METRICS, SEGMENTATION_METRICS, CrossscaleExperiment, Finetune,
                                         Prepared, Pretrain, band_stats, build_downstream)
from rsrepro.multimodal_data import IGNORE_INDEX
from rsrepro.train import TrainConfig


# ------------------------------------------------------------------ settings
def test_bigearthnet_keys_are_unchanged_and_other_data_get_their_own():
    "Table 2's cached runs keep their folders; a pre-training on C2Seg-BW or Globe230k never shares one with BigEarthNet."
    assert Pretrain().key == 'crossscale_caf_cmf_lam0p5_crop0p4_0p6'
    assert Finetune().key == 'crossscale_caf_cmf_lam0p5_crop0p4_0p6__s1s2_lab100'
    assert Finetune(Pretrain('satvit'), 'S1', 0.01).key == 'satvit__s1_lab1'
    keys = {Pretrain('fusmae', data=d).key for d in ('bigearthnet', 'c2seg_bw', 'globe230k')}
    assert len(keys) == 3
    f = Finetune(Pretrain('fusmae'), 'S1+S2', data='sen12ms')
    assert f.key.startswith('sen12ms__') and f.key != Finetune(Pretrain('fusmae')).key
    assert Finetune(Pretrain(data='c2seg_bw'), 'HSI+MSI+SAR', data='c2seg_bw').modalities == ('hsi', 'msi', 'sar')


@pytest.mark.parametrize('kw, msg', [
    (dict(sensors='HSI', data='bigearthnet'), 'sensors'),
    (dict(sensors='S1+S1'), 'sensors'),
    (dict(sensors='RGB+SAR', data='globe230k', pretrain=Pretrain(data='globe230k')), 'sensors'),
    (dict(sensors='HSI+MSI', data='c2seg_bw'), "pre-training on 'c2seg_bw'"),
    (dict(sensors='S1+S2', data='sen12ms', pretrain=Pretrain(data='c2seg_bw')), "pre-training on 'bigearthnet'"),
    (dict(data='dfc2023'), 'data='),
])
def test_finetune_refuses_sensors_or_pretraining_of_another_dataset(kw, msg):
    with pytest.raises(ValueError, match=msg): Finetune(**kw)


def test_pretrain_data_and_switches_are_checked():
    with pytest.raises(ValueError, match='pre-training data'): Pretrain(data='sen12ms')
    with pytest.raises(ValueError, match='switches'): Pretrain('satvit', contrastive_weight=1.0, data='c2seg_bw')


@pytest.mark.parametrize('data, sensors, head', [('sen12ms', 'S1+S2', 'SceneClassifier'),
                                                 ('c2seg_bw', 'HSI+MSI+SAR', 'Segmenter'),
                                                 ('globe230k', 'RGB+NDVI', 'Segmenter')])
def test_each_dataset_gets_its_task_head_and_class_count(data, sensors, head):
    from rsrepro.crossscale_protocol import PROFILES
    ex = CrossscaleExperiment('smoke', out_dir='unused', device='cpu')
    s = ex.setting(data)
    f = Finetune(Pretrain('crossscale', data=DATA[data]['pretrain']), sensors, data=data)
    m = build_downstream(f, s['model'], s['pretrain_modalities'])
    assert type(m).__name__ == head and m.head.out_features == DATA[data]['classes'] if head != 'Segmenter' \
        else m.classifier.out_channels == DATA[data]['classes']
    assert set(m.backbone.names) == set(s['pretrain_modalities'])
    assert PROFILES['full'].downstream['globe230k']['modalities'] == ('rgb', 'ndvi', 'dem', 'vvvh')


# ------------------------------------------------------------------ sliding windows
class _EchoSegmenter:
    "Logits = the input's first channel (class 0) and its negative (class 1): stitching must give the input back."
    num_classes = 2
    backbone = SimpleNamespace(names=['a'])
    def __init__(self): self.tiles = []
    def __call__(self, batch):
        x = batch['a'][:, :1]; self.tiles.append(tuple(x.shape[-2:]))
        return {'logits': torch.cat([x, -x], 1)}


@pytest.mark.parametrize('hw, window, stride, n_tiles', [((40, 40), 16, 10, 16), ((40, 24), 16, None, 6),
                                                         ((10, 13), 16, None, 1), ((16, 16), 16, 8, 1)])
def test_sliding_windows_cover_the_image_and_stitch_back(hw, window, stride, n_tiles):
    m = _EchoSegmenter()
    x = torch.arange(2 * hw[0] * hw[1], dtype=torch.float32).reshape(1, 2, *hw)
    out = Segmenter.slide(m, {'a': x}, window, stride)
    assert out.shape == (1, 2, *hw)
    torch.testing.assert_close(out[:, 0], x[:, 0]); torch.testing.assert_close(out[:, 1], -x[:, 0])
    assert len(m.tiles) == n_tiles and set(m.tiles) == {(window, window)}


def test_sliding_windows_average_where_they_overlap():
    "Tiles that disagree are averaged: a pixel seen by two tiles gets the mean of their logits."
    class TileIndex(_EchoSegmenter):
        def __call__(self, batch):
            self.tiles.append(None); v = float(len(self.tiles))
            return {'logits': torch.full((batch['a'].shape[0], 2, 4, 4), v)}
    out = Segmenter.slide(TileIndex(), {'a': torch.zeros(1, 1, 4, 6)}, 4, 2)   # tiles at x = 0 and 2
    assert out[0, 0, 0].tolist() == [1, 1, 1.5, 1.5, 2, 2]


# ------------------------------------------------------------------ data preparation
class _Ramp(torch.utils.data.Dataset):
    def __init__(self, n=3, hw=(20, 30)): self.n, self.hw = n, hw
    def __len__(self): return self.n
    def __getitem__(self, i):
        H, W = self.hw; idx = torch.arange(H * W).reshape(H, W)
        return {'a': torch.stack([idx.float(), idx.float() + 1000 * i]), 'b': idx[None].float() * 2,
                'mask': idx % 7, 'label': torch.tensor(i)}


@pytest.mark.parametrize('crop', [8, 25])
def test_random_crops_keep_every_modality_and_the_mask_aligned(crop):
    torch.manual_seed(0)
    ds = Prepared(_Ramp(), ('a', 'b'), crop=crop)
    for i in range(len(ds)):
        s = ds[i]
        assert s['a'].shape == (2, crop, crop) and s['b'].shape == (1, crop, crop) and s['mask'].shape == (crop, crop)
        inside = s['mask'] != IGNORE_INDEX
        torch.testing.assert_close(s['b'][0], 2 * s['a'][0])
        assert torch.equal(s['mask'][inside], s['a'][0][inside].long() % 7)
        if crop > 20: assert (~inside).sum() == crop * crop - 20 * crop and (s['a'][:, 20:] == 0).all()   # padded rows


def test_standardisation_resize_and_targets():
    stats = {'a': ([1.0, 2.0], [2.0, 4.0])}
    s = Prepared(_Ramp(), ('a', 'b'), stats=stats, resize=10, targets=False)[1]
    assert s['a'].shape == (2, 10, 10) and 'mask' not in s and 'label' not in s
    raw = _Ramp()[1]['a']
    want = torch.nn.functional.interpolate(((raw - torch.tensor([1., 2.])[:, None, None]) / torch.tensor([2., 4.])[:, None, None])[None],
                                           size=(10, 10), mode='bilinear', align_corners=False)[0]
    torch.testing.assert_close(s['a'], want)


def test_band_stats_by_hand():
    ds = _Ramp(n=3)
    st = band_stats(ds, ('a',), n=10)
    x = torch.stack([ds[i]['a'] for i in range(3)]).double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(torch.tensor(st['a'][0]), x.mean(1).float())
    torch.testing.assert_close(torch.tensor(st['a'][1]), x.std(1, unbiased=False).float())


# ------------------------------------------------------------------ end to end on the stand-ins
@pytest.fixture(scope='module')
def ex(tmp_path_factory):
    return CrossscaleExperiment('smoke', out_dir=tmp_path_factory.mktemp('cs'), device='cpu')


def test_scene_scores_on_the_sen12ms_standin(ex):
    "Weighted recall is accuracy by construction: the property the published Table 3 shows (recall = Top-1)."
    s = ex.scores(Finetune(Pretrain('satvit'), 'S1+S2', data='sen12ms'))
    assert tuple(s) == SCENE_METRICS and all(0 <= v <= 100 for v in s.values())
    assert s['Recall'] == pytest.approx(s['Top1-Acc']) and s['Top3-Acc'] >= s['Top1-Acc']
    assert 'SEN12MS: smoke-standin' in ex.data_source()


@pytest.mark.parametrize('data, sensors', [('c2seg_bw', 'HSI+MSI+SAR'), ('globe230k', 'RGB+NDVI')])
def test_segmentation_scores_on_the_standins(ex, data, sensors):
    s = ex.scores(Finetune(Pretrain('crossscale', data=data), sensors, data=data))
    assert tuple(s) == SEGMENTATION_METRICS and all(0 <= v <= 100 for v in s.values())
    assert (ex.root/'pretrain'/f'{data}-crossscale_caf_cmf_lam0p5_crop0p4_0p6'/'done.json').is_file()


def test_the_segmenter_overfits_a_real_standin_image(ex):
    "Not a silent zero: on one C2Seg-BW stand-in image (real S1/S2 bytes) the segmentation head learns its labels."
    f = Finetune(Pretrain('crossscale', data='c2seg_bw'), 'HSI+MSI+SAR', data='c2seg_bw')
    ds = torch.utils.data.Subset(ex.prepared('c2seg_bw', 'train', train=False), [0])
    s = ex.setting('c2seg_bw')
    build = lambda: build_downstream(f, s['model'], s['pretrain_modalities'])
    cfg = TrainConfig(max_steps=60, batch_size=1, lr=3e-3, weight_decay=0., warmup_steps=0, schedule='constant',
                      log_every=1, amp='none')
    from rsrepro.data import collate_multimodal
    from rsrepro.io import load_weights
    from rsrepro.metrics import SegmentationMeter
    w = ex.train(build, ds, cfg, ex.root/'check'/'overfit_seg', {'check': 'segmenter'}, collate_fn=collate_multimodal)
    model = build(); load_weights(model, w); model.eval()
    sample = ds[0]
    pred = ex.segment(f, model, sample)
    r = SegmentationMeter(DATA['c2seg_bw']['classes'], IGNORE_INDEX).update(pred[None], sample['mask'][None]).compute()
    losses = [h['loss'] for h in ex.history(ex.root/'check'/'overfit_seg') if 'loss' in h]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert r["oa"] > 0.8 and r["miou"] > 0.4, r


def test_the_scene_classifier_overfits_the_sen12ms_standin(ex):
    "Not a silent zero: on the SEN12MS stand-in's training patches (real S1/S2 bytes) the scene head learns its labels."
    from rsrepro.data import collate_multimodal
    from rsrepro.io import load_weights
    f = Finetune(Pretrain('crossscale'), 'S1+S2', data='sen12ms')
    ds = ex.prepared('sen12ms', 'train')
    s = ex.setting('sen12ms')
    build = lambda: build_downstream(f, s['model'], s['pretrain_modalities'])
    cfg = TrainConfig(max_steps=100, batch_size=len(ds), lr=3e-3, weight_decay=0., warmup_steps=0, schedule='constant',
                      log_every=1, amp='none')
    w = ex.train(build, ds, cfg, ex.root/'check'/'overfit_scene', {'check': 'scene'}, collate_fn=collate_multimodal)
    model = build(); load_weights(model, w); model.eval()
    logits, y = ex.predict(model, ds, f.modalities)
    losses = [h['loss'] for h in ex.history(ex.root/'check'/'overfit_scene') if 'loss' in h]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert (logits.argmax(1) == y).all(), (logits.argmax(1), y)
