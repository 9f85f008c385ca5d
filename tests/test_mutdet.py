"MutDet: preparation (boxes, crops, pseudo-classes), the mutual enhancement module, the alignment loss, the siamese head."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsrepro.core import DataFormatError, DataNotFoundError
from rsrepro.mutdet import (FileBoxes, MutDet, MutualEnhancement, PseudoClasses, SAMBoxes, SelectiveSearchBoxes,
                            contrastive_alignment, embedding_mse, fit_pseudo_classes, mask_polygons, rotated_crops)

DATA = __import__('pathlib').Path(__file__).resolve().parents[2]/'shared'/'data'
SMALL = dict(num_classes=8, dim=64, num_heads=4, enc_layers=1, dec_layers=1, ffn=128, num_queries=20, backbone='resnet18',
             depth=1, enhancement_heads=4, mlp_dim=128)


def _batch(n_obj=(3, 2), dim=64, classes=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tg = [{'labels': torch.randint(0, classes, (n,), generator=g), 'boxes': torch.rand(n, 4, generator=g) * 0.4 + 0.2,
           'angles': torch.rand(n, generator=g) * 2 - 1, 'embeddings': F.normalize(torch.randn(n, dim, generator=g), dim=-1)}
          for n in n_obj]
    return {'image': torch.randn(len(n_obj), 3, 96, 96, generator=g), 'targets': tg}


def test_info_nce_at_a_known_value():
    "Orthogonal unit pairs, τ 0.2: each direction's CE is log(1 + e^-5); the official scale 4τ·mean gives 0.8·log(1 + e^-5)."
    q = torch.tensor([[1., 0.], [0., 1.]])
    assert torch.isclose(contrastive_alignment(q, q), torch.tensor(0.8 * math.log1p(math.exp(-5))), atol=1e-6)
    # three pairs at 60° apart in 2-d, by hand
    a = torch.tensor([[1., 0.], [math.cos(2 * math.pi / 3), math.sin(2 * math.pi / 3)], [math.cos(4 * math.pi / 3), math.sin(4 * math.pi / 3)]])
    ce = -math.log(math.exp(5) / (math.exp(5) + 2 * math.exp(-2.5)))
    assert torch.isclose(contrastive_alignment(a, a), torch.tensor(0.8 * ce), atol=1e-5)
    assert contrastive_alignment(a, a.roll(1, 0)) > 5 and embedding_mse(a, 2 * a) < 1e-10


def test_mutual_enhancement_is_bidirectional_and_per_image():
    "The embeddings change the memory and the memory changes the embeddings; another image's objects change nothing."
    torch.manual_seed(0)
    me = MutualEnhancement(dim=32, depth=3, num_heads=4, mlp_dim=64).eval()
    e, f = torch.randn(1, 6, 32), torch.randn(1, 50, 32)
    e1, f1 = me(e, f)
    _, f2 = me(e + 0.5 * torch.randn_like(e), f)
    e3, _ = me(e, f + 0.5 * torch.randn_like(f))
    assert not torch.allclose(f1, f2, atol=1e-4) and not torch.allclose(e1, e3, atol=1e-4)
    # permuting the objects permutes the enhanced embeddings and leaves the memory unchanged (no position embeddings)
    perm = torch.randperm(6)
    e4, f4 = me(e[:, perm], f)
    assert torch.allclose(e4, e1[:, perm], atol=1e-5) and torch.allclose(f4, f1, atol=1e-5)


def test_siamese_head_shares_weights_and_sees_the_raw_memory():
    "One decoder: the siamese pass has no parameters of its own, its loss trains the shared decoder, and the enhanced memory never reaches it."
    torch.manual_seed(0)
    m = MutDet(**SMALL)
    plain = MutDet(calibration=None, **SMALL)
    assert {n for n, _ in m.named_parameters()} == {n for n, _ in plain.named_parameters()}     # no extra head
    out = m(_batch())
    m.zero_grad(); out['s_loss'].backward()
    assert m.detector.decoder[0].cross.sampling_offsets.weight.grad.abs().sum() > 0
    assert m.detector.cls_branches[0].weight.grad.abs().sum() > 0
    assert m.mutual_enhancement.layers[-1].cross_attn_memory_to_embed.q.weight.grad is None
    assert m.memory_proj.weight.grad is not None                     # through the enhanced embeddings it aligns with
    # with the enhanced memory changed by hand, the siamese outputs do not move
    det = m.detector.eval(); b = _batch()
    with torch.no_grad():
        enc = det.encode(b['image'])
        s1 = det.decode(enc['memory'], enc['shapes'])
        s2 = det.decode(enc['memory'], enc['shapes'])
    assert torch.equal(s1['logits'], s2['logits'])


def test_backbone_frozen_and_table7_switches():
    "The backbone gets no gradient; DETReg (no switches) has no enhancement module; every calibration trains."
    torch.manual_seed(0)
    b = _batch()
    for cal in MutDet.CALIBRATIONS:
        m = MutDet(calibration=cal, **SMALL)
        L = m(b); L['loss'].backward()
        assert torch.isfinite(L['loss']) and all(p.grad is None for p in m.detector.backbone.parameters())
    d = MutDet(contrastive=False, enhanced_embedding=False, enhanced_feature=False, encoder_loss=False, calibration=None, **SMALL)
    assert d.mutual_enhancement is None and 'enc_align' not in d(b)
    with pytest.raises(ValueError, match='calibration'): MutDet(calibration='bogus', **SMALL)
    bad = _batch(dim=32)
    with pytest.raises(ValueError, match='64-d'): MutDet(**SMALL)(bad)


def test_rotated_crop_by_hand():
    "An axis-aligned square at 1 px per output pixel is the exact slice; 90° is a quarter-turn of it."
    torch.manual_seed(0)
    im = torch.rand(3, 40, 60)
    sq = rotated_crops(im, torch.tensor([[30., 20., 8., 8., 0.], [30., 20., 8., 8., math.pi / 2]]), size=8, enlarge=1.0)
    assert torch.allclose(sq[0], im[:, 16:24, 26:34], atol=1e-5)
    assert torch.allclose(sq[1], torch.rot90(sq[0], k=1, dims=(1, 2)), atol=1e-5)
    big = rotated_crops(im, torch.tensor([[30., 20., 8., 8., 0.]]), size=12, enlarge=1.5)
    assert torch.allclose(big[0], im[:, 14:26, 24:36], atol=1e-5)    # enlarged 1.5x


def test_mask_polygons_and_box_sources(tmp_path):
    import cv2
    m = np.zeros((100, 120), np.uint8)
    cv2.fillPoly(m, [cv2.boxPoints(((60, 50), (60, 20), 30)).astype(np.int32)], 1)
    (cx, cy), (w, h), _ = cv2.minAreaRect(mask_polygons(m[None].astype(bool))[0])
    assert abs(cx - 60) < 1.5 and abs(cy - 50) < 1.5 and abs(max(w, h) - 60) < 2 and abs(min(w, h) - 20) < 2
    with pytest.raises(DataNotFoundError, match='never downloads'): SAMBoxes(tmp_path/'sam_vit_h.pth')
    (tmp_path/'a.txt').write_text('1 2 3 4 5 6 7 8 plane 0\n10 10 20 10 20 20 10 20\n')
    (tmp_path/'b.txt').write_text('1 2 3 4 x 6 7 8\n')
    fb = FileBoxes(tmp_path)
    assert fb(None, 'a').shape == (2, 4, 2)
    with pytest.raises(DataFormatError, match='b.txt:1'): fb(None, 'b')
    with pytest.raises(DataNotFoundError, match='c.txt'): fb(None, 'c')


@pytest.mark.skipif(not (DATA/'DOTA'/'images').is_dir(), reason='the real DOTA samples are absent')
def test_selective_search_on_a_real_dota_tile_recalls_objects():
    "On a real 256-px DOTA crop, some selective-search box overlaps at least half of the labelled vehicles at IoU >= 0.3."
    from rsrepro.io import read_image
    from rsrepro.rotated import poly_iou, read_dota_gt
    img = read_image(DATA/'DOTA'/'images'/'P1888.png')[..., :3]
    g = read_dota_gt(DATA/'DOTA'/'labelTxt')['P1888']
    allp = np.asarray(g['polygons'], np.float64).reshape(-1, 4, 2)
    def inside(y0, x0):
        p = allp - (x0, y0)
        return (p.reshape(-1, 8).min(1) >= 0) & (p[..., 0].max(1) < 256) & (p[..., 1].max(1) < 256)
    H, W = img.shape[:2]
    y0, x0 = max(((y, x) for y in range(0, H - 255, 128) for x in range(0, W - 255, 128)), key=lambda t: inside(*t).sum())
    keep = inside(y0, x0); polys = allp - (x0, y0)
    assert keep.sum() >= 5
    crop = np.ascontiguousarray(img[y0:y0 + 256, x0:x0 + 256])
    boxes = SelectiveSearchBoxes(scale=100, min_size=20)(crop)
    assert 10 < len(boxes) <= 1000
    iou = np.asarray(poly_iou(polys[keep].reshape(-1, 8), boxes.reshape(-1, 8).astype(np.float64)))
    assert (iou.max(1) >= 0.3).mean() >= 0.5, iou.max(1)


def test_pseudo_classes_fit_assign_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    X = np.concatenate([c + rng.normal(0, 0.1, (30, 40)) for c in rng.normal(0, 3, (4, 40))])
    pc = fit_pseudo_classes(X, dim=6, k=4)
    lab = pc.assign(pc.embed(X))
    assert all(len(set(lab[i * 30:(i + 1) * 30])) == 1 for i in range(4)) and len(set(lab)) == 4
    assert np.allclose(np.linalg.norm(pc.centroids, axis=1), 1)
    with pytest.raises(ValueError, match='at least 256'): fit_pseudo_classes(X, dim=6, k=256)
    (tmp_path/'bad.npz').write_bytes(b'nonsense')
    with pytest.raises(DataFormatError, match='bad.npz'): PseudoClasses.load(tmp_path/'bad.npz')


# ------------------------------------------------------------------ the protocol's pieces
def test_rbox_targets_by_hand():
    from rsrepro.mutdet_protocol import rbox_targets
    sq = np.array([[[10, 20], [50, 20], [50, 40], [10, 40]]], np.float32)          # 40 x 20, axis-aligned
    t = rbox_targets(sq, [3], (100, 200))
    assert torch.allclose(t['boxes'], torch.tensor([[30 / 200, 30 / 100, 40 / 200, 20 / 100]]), atol=1e-6)
    assert abs(float(t['angles'][0])) < 1e-6 and t['labels'].tolist() == [3]
    assert rbox_targets(np.zeros((0, 4, 2)), [], (8, 8))['boxes'].shape == (0, 4)


@pytest.mark.skipif(not (DATA/'DIOR-R').is_dir(), reason='the real DIOR-R sample is absent')
def test_ground_truth_as_detections_scores_100_through_the_whole_path():
    "Targets of the real DIOR-R image, resized to 256 px, turned back into Task1 detections: AP50 = AP75 = 100 (no coordinate slip)."
    from rsrepro.detection_data import DIOR_CLASSES, DIORR
    from rsrepro.mutdet_protocol import DetectionSamples, task1_frames
    from rsrepro.rotated import dota_eval
    r = DIORR(root=DATA/'DIOR-R', split='trainval')
    ds = DetectionSamples(r, 256)
    s = ds[0]; t = s['targets']
    det = [{'scores': torch.ones(len(t['labels'])), 'labels': t['labels'], 'rboxes': torch.cat([t['boxes'], t['angles'][:, None]], 1)}]
    frames = task1_frames(det, [s['id']], [s['scale']], 256, DIOR_CLASSES)
    g = r.targets[s['id']]
    gts = {s['id']: {'polygons': np.asarray(g['polygons'], np.float64).reshape(-1, 8), 'label': np.asarray(g['label']),
                     'difficult': np.asarray(g['difficult']).astype(bool)}}
    for thr in (0.5, 0.75):
        assert dota_eval(frames, gts, DIOR_CLASSES, thr)['map'] == pytest.approx(1.0)


def test_pretrain_settings_keys_and_validation():
    from rsrepro.mutdet_protocol import Finetune, Pretrain
    rows = [Pretrain.detreg(), Pretrain('mutdet', True, False, False, False, None), Pretrain('mutdet', True, True, False, False, None),
            Pretrain('mutdet', True, True, True, False, None), Pretrain('mutdet', True, True, True, True, None), Pretrain(),
            Pretrain(calibration='encoder_distillation'), Pretrain(coder='csl'), Pretrain.detreg(coder='regression')]
    keys = [p.key for p in rows]
    assert len(set(keys)) == len(keys)
    with pytest.raises(ValueError, match='detreg'): Pretrain('detreg')
    with pytest.raises(ValueError, match='coder'): Pretrain(coder='psc')
    with pytest.raises(ValueError, match='fraction'): Finetune(fraction=0)
    assert Finetune(Pretrain(), epochs=12).key != Finetune(Pretrain(), epochs=24).key != Finetune(None).key


def test_load_pretrained_copies_matching_tensors(tmp_path):
    "As mmcv's load_from: same name and shape are copied; the pseudo-class heads and the missing layers keep their init."
    from rsrepro.ars_detr import ARSDETR
    from rsrepro.mutdet_protocol import load_pretrained
    torch.manual_seed(0)
    pre = MutDet(**SMALL)                                                 # 8 pseudo-classes, 1 + 1 layers
    torch.save({'model': pre.state_dict()}, tmp_path/'w.pt')
    det = ARSDETR(num_classes=3, dim=64, num_heads=4, enc_layers=2, dec_layers=2, ffn=128, num_queries=20, backbone='resnet18')
    n = load_pretrained(det, tmp_path/'w.pt')
    assert n['loaded'] > 0 and n['kept_initial'] > 0
    assert torch.equal(det.encoder[0].attn.sampling_offsets.weight, pre.detector.encoder[0].attn.sampling_offsets.weight)
    assert not torch.equal(det.encoder[1].attn.value_proj.weight, pre.detector.encoder[0].attn.value_proj.weight)
    assert det.cls_branches[0].weight.shape == (3, 64)                    # the class head was not copied
    torch.save({'model': {'x': torch.zeros(1)}}, tmp_path/'bad.pt')
    with pytest.raises(DataFormatError, match='bad.pt'): load_pretrained(det, tmp_path/'bad.pt')


def test_prepare_pseudo_labels_is_resumable(tmp_path):
    "One atomic .npz per image; a second call keeps what is there; features have the embedder's width."
    from rsrepro.mutdet_protocol import prepare_pseudo_labels
    class Two(torch.utils.data.Dataset):
        def __len__(self): return 2
        def __getitem__(self, k): return {'image': torch.rand(3, 64, 64), 'id': f'img{k}'}
    (tmp_path/'boxes').mkdir()
    for k in range(2): (tmp_path/'boxes'/f'img{k}.txt').write_text('10 10 40 10 40 30 10 30\n5 5 20 5 20 20 5 20\n')
    emb = __import__('rsrepro.mutdet', fromlist=['ObjectEmbedder']).ObjectEmbedder(arch='resnet18', size=32)
    out = prepare_pseudo_labels(Two(), FileBoxes(tmp_path/'boxes'), emb, tmp_path/'labels')
    z = np.load(out/'img0.npz'); assert z['polygons'].shape == (2, 4, 2) and z['features'].shape == (2, 512)
    t = (out/'img1.npz').stat().st_mtime_ns
    prepare_pseudo_labels(Two(), FileBoxes(tmp_path/'boxes'), emb, tmp_path/'labels')
    assert (out/'img1.npz').stat().st_mtime_ns == t and not list(out.glob('*.tmp'))


def test_lr_groups_reach_the_model_fit_builds():
    "The x0.1 group is given by names, so it claims the sampling offsets (and, in fine-tuning, the backbone) of any instance."
    from rsrepro.ars_detr import ARSDETR
    from rsrepro.mutdet_protocol import FinetuneModel, _param_groups
    from rsrepro.train import TrainConfig, build_param_groups
    mk = lambda: FinetuneModel(ARSDETR(num_classes=3, dim=32, num_heads=2, enc_layers=1, dec_layers=1, ffn=64, num_queries=10, backbone='resnet18'))
    groups = build_param_groups(mk(), TrainConfig(max_steps=1), _param_groups(mk(), finetune=True))
    slow = [n for g in groups if g['lr_mult'] == 0.1 for n in g['names']]
    assert slow and all('sampling_offsets' in n or '.backbone.' in f'.{n}' for n in slow)
    assert any('sampling_offsets' in n for n in slow) and any(n.startswith('detector.backbone.') for n in slow)
    fast = [n for g in groups if g['lr_mult'] == 1.0 for n in g['names']]
    assert not any('sampling_offsets' in n for n in fast)


def test_imagenet_checkpoints_are_loaded_from_the_weights_folder(tmp_path, monkeypatch):
    "A profile that names ImageNet checkpoints initialises the detector backbone and the embedder from them; a missing one is named."
    import dataclasses, torchvision
    from rsrepro.mutdet import ObjectEmbedder
    from rsrepro.mutdet_protocol import MutdetExperiment
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    torch.save(r18.state_dict(), tmp_path/'r18.pth')
    monkeypatch.setenv('RSREPRO_WEIGHTS', str(tmp_path))
    ex = MutdetExperiment('smoke', out_dir=tmp_path/'out', device='cpu')
    ex.profile = dataclasses.replace(ex.profile, imagenet={'resnet50': 'r18.pth'})       # smoke stands resnet50 in with resnet18
    det = ex.build_detector(3, 'ar_csl', (1, 1), 1)
    assert torch.equal(dict(det.backbone.named_parameters())['layer3.0.conv1.weight'], r18.layer3[0].conv1.weight)
    emb = ObjectEmbedder(tmp_path/'r18.pth', arch='resnet18')
    assert emb.pretrained and torch.equal(emb.net.layer1[0].conv1.weight, r18.layer1[0].conv1.weight)
    ex.profile = dataclasses.replace(ex.profile, imagenet={'resnet50': 'nothere.pth'})
    with pytest.raises(DataNotFoundError, match='nothere.pth'): ex.build_detector(3, 'ar_csl', (1, 1), 1)
    with pytest.raises(DataNotFoundError, match='sam_vit_h'): ex.checkpoint('sam_vit_h_4b8939.pth', 'SAM ViT-H')


def test_random_embedder_depends_on_its_seed_only():
    "Without ImageNet weights the embedder is random, but seeded: smoke pseudo-labels are the same in every run."
    from rsrepro.mutdet import ObjectEmbedder
    torch.manual_seed(123); a = ObjectEmbedder(arch='resnet18', size=32, seed=0)
    torch.manual_seed(456); b = ObjectEmbedder(arch='resnet18', size=32, seed=0)
    c = ObjectEmbedder(arch='resnet18', size=32, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    torch.manual_seed(7); x = torch.rand(3); torch.manual_seed(7); ObjectEmbedder(arch='resnet18', size=32); y = torch.rand(3)
    assert torch.equal(x, y), "building the embedder must not consume the caller's RNG"
