"Tests of rsrepro.detector: Swin + YOLOv5 through ultralytics, pre-training checkpoints into it, training, inference, AP."
import json, math, os, re, shutil, socket, time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rsrepro.detector as det_mod
from rsrepro.detector import (BASELINES, DetectorConfig, DetectorRun, SwinBackbone, build_detector, evaluate,
                              load_backbone, load_detector, model_cfg, predict, swin_yolov5_cfg, train_detector,
                              ultralytics_offline)

ultralytics_offline()        # before anything below imports ultralytics: offline env, rsrepro layers registered

import rsrepro.detection_data as dd
from rsrepro.core import DataFormatError, DataNotFoundError, RsreproError
from rsrepro.data import find_shared_data
from rsrepro.imim import imim_swin_tiny_interactive
from rsrepro.train import CKPT_FORMAT, TrainConfig, fit

SHARED = find_shared_data()
VEDAI_ROOT = SHARED/'VEDAI' if SHARED else None
needs_vedai = pytest.mark.skipif(VEDAI_ROOT is None or not VEDAI_ROOT.is_dir(), reason='no shared VEDAI sample')
S = 224          # pre-training size = detector input size: Swin's 7x7 windows are the same in both


def swin_stages(enc, x):
    "P3, P4, P5 (NCHW) of a timm SwinTransformer (the pre-training encoder): stages 2, 3, 4 before the final norm."
    y, out = enc.patch_embed(x), []
    for i, layer in enumerate(enc.layers):
        y = layer(y)
        if i >= 1: out.append(y.permute(0, 3, 1, 2))
    return out


# ---------------------------------------------------------------- fixtures
NET_ATTEMPTS = []     # (what, address) of every network access tried while this module runs


@pytest.fixture(scope='module', autouse=True)
def no_network():
    "Refuse (and record) every DNS lookup and non-local socket connection: ultralytics must stay offline here."
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    def lookup(host, *a, **k):
        NET_ATTEMPTS.append(('getaddrinfo', host)); raise socket.gaierror(-2, 'network blocked by tests/test_detector.py')
    def guard(real):
        def connect(self, address):
            if self.family == getattr(socket, 'AF_UNIX', None): return real(self, address)
            NET_ATTEMPTS.append(('connect', address)); raise OSError('network blocked by tests/test_detector.py')
        return connect
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, 'getaddrinfo', lookup)
        mp.setattr(socket.socket, 'connect', guard(real_connect))
        mp.setattr(socket.socket, 'connect_ex', guard(real_connect_ex))
        yield NET_ATTEMPTS


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    "A real `fit` checkpoint of the 4-band interactive MIM model (one AdamW step on random images) and the model."
    torch.manual_seed(0)
    pre = imim_swin_tiny_interactive(img_size=S, in_chans=4, mask_patch_size=32)
    out = tmp_path_factory.mktemp('pretrain')
    data = [{'image': torch.rand(4, S, S)} for _ in range(2)]
    summary = fit(pre, data, TrainConfig(max_steps=1, batch_size=2, lr=1e-3, device='cpu', out_dir=str(out),
                                         progress=False, log_every=1))
    ck = Path(summary['checkpoint'])
    assert ck == out/'checkpoint.pt' and ck.is_file()
    return pre.eval(), ck


@pytest.fixture(scope='module')
def det4():
    "A fresh 4-band Swin-YOLOv5n (random weights); tests must not change it."
    return build_detector('swin_yolov5', nc=8, in_chans=4, scale='n')[0].eval()


@pytest.fixture(scope='module')
def vedai4_yaml(tmp_path_factory):
    if VEDAI_ROOT is None or not VEDAI_ROOT.is_dir(): pytest.skip('no shared VEDAI sample')
    return dd.vedai_to_yolo(dd.VEDAI(root=VEDAI_ROOT, modalities=('rgb', 'ir')), tmp_path_factory.mktemp('yolo4'))


# ---------------------------------------------------------------- (1) 4-band pre-training checkpoint -> detector
def test_pretrain_checkpoint_round_trip(pretrained):
    pre, path = pretrained
    ck = torch.load(path, map_location='cpu', weights_only=True)
    assert ck['format'] == CKPT_FORMAT and ck['step'] == 1
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in ck['model'].items())   # the file holds `pre`
    det, rep = build_detector('swin_yolov5', nc=8, in_chans=4, scale='n', checkpoint=path)
    bb = det.model[0]
    assert isinstance(bb, SwinBackbone) and bb.in_chans == 4
    own = bb.body.state_dict()
    assert rep.source == str(path) and rep.missing == [] and rep.resized == []
    assert rep.loaded == sorted(own) and len(own) == 169
    assert f'loaded {len(own)}/{len(own)} backbone tensors' in str(rep)
    # what the file holds besides the encoder (decoder, interaction module, mask token, the encoder's final norm,
    # which a features_only Swin does not have) is reported as not used
    non_encoder = {k for k in pre.state_dict() if not k.startswith('encoder.')}
    assert {'mask_token', 'decoder.0.weight', 'interaction.norm.weight'} <= non_encoder and len(non_encoder) == 22
    assert set(rep.unused) == non_encoder | {'encoder.norm.weight', 'encoder.norm.bias'}
    assert f'in the file but not used: {len(rep.unused)} ' in str(rep)
    # every backbone tensor is the pre-trained encoder's (timm features_only names)
    enc = pre.encoder_state_dict(features_only=True)
    assert set(own) == set(enc) and all(torch.equal(own[k], enc[k]) for k in own)
    # the backbone computes what the pre-training encoder computes, at all three scales
    det.eval()
    x = torch.rand(2, 4, S, S, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, ref = bb(x), swin_stages(pre.encoder, x)
        p5 = pre.encoder.layers(pre.encoder.patch_embed(x)).permute(0, 3, 1, 2)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 28, 28), (2, 384, 14, 14), (2, 768, 7, 7)]
    assert torch.allclose(feats[2], p5, atol=1e-5, rtol=0)
    for f, r in zip(feats, ref): assert torch.allclose(f, r, atol=1e-5, rtol=0)
    # ... and a freshly initialised detector does not (the comparison can fail)
    fresh = build_detector('swin_yolov5', nc=8, in_chans=4, scale='n')[0].eval()
    with torch.no_grad(): assert (fresh.model[0](x)[2] - p5).abs().max() > 1e-2


# ---------------------------------------------------------------- (2) checkpoints that do not fit
def test_checkpoint_errors(tmp_path, det4):
    torch.manual_seed(0)
    pre3 = imim_swin_tiny_interactive(img_size=S, in_chans=3, mask_patch_size=32)
    p3 = tmp_path/'rgb_checkpoint.pt'
    torch.save({'format': CKPT_FORMAT, 'step': 1, 'model': pre3.state_dict()}, p3)       # a `fit` checkpoint, 3 bands
    with pytest.raises(DataFormatError) as e:
        build_detector('swin_yolov5', nc=8, in_chans=4, scale='n', checkpoint=p3)
    msg = str(e.value)
    assert str(p3) in msg and '4-band' in msg
    assert 'patch_embed.proj.weight' in msg and '(96, 3, 4, 4)' in msg and '(96, 4, 4, 4)' in msg
    # nothing is loaded when one tensor does not fit
    before = {k: v.clone() for k, v in det4.state_dict().items()}
    with pytest.raises(DataFormatError, match=re.escape(str(p3))): load_backbone(det4, p3)
    with pytest.raises(DataFormatError, match='a state dict'): load_backbone(det4, {'model': pre3.state_dict()})
    # a path that does not exist
    gone = tmp_path/'nope'/'checkpoint.pt'
    with pytest.raises(DataNotFoundError) as e: build_detector('swin_yolov5', nc=8, in_chans=4, scale='n', checkpoint=gone)
    assert str(gone) in str(e.value)
    # a weights file without Swin tensors
    p = tmp_path/'cnn.pt'
    torch.save({'format': CKPT_FORMAT, 'model': {'backbone.conv.weight': torch.zeros(8, 4, 3, 3)}}, p)
    with pytest.raises(DataFormatError, match='no Swin encoder weights') as e: load_backbone(det4, p)
    assert str(p) in str(e.value)
    # not a weights file / not a dict
    (tmp_path/'junk.pt').write_bytes(b'this is not a checkpoint')
    with pytest.raises(DataFormatError, match='cannot be read'): load_backbone(det4, tmp_path/'junk.pt')
    torch.save([torch.zeros(1)], tmp_path/'list.pt')
    with pytest.raises(DataFormatError, match='not a dict'): load_backbone(det4, tmp_path/'list.pt')
    # a detector without a Swin backbone
    yolo, _ = build_detector('yolov5n', nc=8, in_chans=4)
    with pytest.raises(RsreproError, match='no SwinBackbone'): load_backbone(yolo, {'model': pre3.state_dict()})
    with pytest.raises(RsreproError, match='no Swin backbone'): build_detector('yolov5n', nc=8, in_chans=4, checkpoint=p3)
    after = det4.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- (3) ultralytics reads what our reader reads
@needs_vedai
@pytest.mark.parametrize('modalities', [('rgb', 'ir'), ('rgb',)], ids=['rgb+ir', 'rgb'])
def test_ultralytics_sees_our_pixels_and_boxes(tmp_path, modalities):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import DEFAULT_CFG
    ds = dd.VEDAI(root=VEDAI_ROOT, modalities=modalities)
    C = 3 + ('ir' in modalities)
    y = dd.vedai_to_yolo(ds, tmp_path/'yolo')
    data = check_det_dataset(str(y))
    assert data['channels'] == C and data['nc'] == 8 and list(data['names'].values()) == list(dd.VEDAI_CLASSES)
    uds = build_yolo_dataset(get_cfg(DEFAULT_CFG, dict(imgsz=512, rect=False)), data['train'], 2, data, mode='val')
    assert not uds.augment and len(uds) == len(ds) == 3
    ours = {ds.ids[k]: ds[k] for k in range(len(ds))}
    for k in range(len(uds)):
        it = uds[k]
        s = ours[Path(it['im_file']).stem]
        ref = (s['image'] * 255).round().to(torch.uint8)
        img = it['img']
        assert img.dtype == torch.uint8 and img.shape == (C, 512, 512) and it['ori_shape'] == (512, 512)
        for c in range(C): assert torch.equal(img[c], ref[c]), f"{s['id']}: band {c} differs"
        # the bands differ from each other, so a swapped order (BGR, IR first) would have been caught
        assert not torch.equal(ref[0], ref[2]) and (C == 3 or not any(torch.equal(ref[3], ref[c]) for c in range(3)))
        # boxes: normalised xywh (ultralytics) vs xyxy pixels (ours), same order, same classes
        b = s['boxes']
        xywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1) / 512
        assert it['bboxes'].shape == xywh.shape and len(b) > 0
        assert torch.allclose(it['bboxes'].float(), xywh, atol=1e-3, rtol=0)
        assert it['cls'].view(-1).long().tolist() == s['label'].tolist()


# ---------------------------------------------------------------- (4) through ultralytics' trainer and back
@pytest.fixture(scope='module')
def trained(pretrained, vedai4_yaml, tmp_path_factory):
    pre, path = pretrained
    det, rep = build_detector('swin_yolov5', nc=8, in_chans=4, scale='n', checkpoint=path)
    assert not rep.missing
    cfg = DetectorConfig(epochs=1, imgsz=S, batch=3, lr0=0.0, warmup_epochs=0, device='cpu', mosaic=0.0)
    run_dir = tmp_path_factory.mktemp('runs')/'swin_n'
    run = train_detector(det, vedai4_yaml, cfg, run_dir)
    return pre, det, cfg, run


@needs_vedai
def test_train_detector_round_trip(trained, vedai4_yaml):
    pre, det, cfg, run = trained
    assert isinstance(run, DetectorRun) and not run.skipped and not run.resumed
    assert run.weights == run.run_dir/'weights'/'last.pt' and run.weights.is_file() and run.seconds > 0
    done = json.loads((run.run_dir/'done.json').read_text())
    assert Path(done['weights']) == run.weights and done['transferred'] == run.transferred
    # ultralytics rebuilt the model from its yaml and copied every tensor of our model into it
    m = re.search(r'Transferred (\d+)/(\d+) items', run.transferred)
    assert m, run.transferred
    assert int(m.group(1)) == int(m.group(2)) == len(det.state_dict())
    # the trained weights (lr0 = 0: unchanged) come back; ultralytics stores the EMA model in fp16
    model = load_detector(run.weights)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    bb = model.model[0]
    assert isinstance(bb, SwinBackbone) and bb.in_chans == 4 and model.stride.tolist() == [8., 16., 32.]
    got, enc = bb.body.state_dict(), pre.encoder_state_dict(features_only=True)
    assert set(got) == set(enc)
    for k in enc: assert torch.allclose(got[k], enc[k], atol=1e-3, rtol=1e-3), k
    ref = dict(det.named_parameters())
    for k, p in model.named_parameters(): assert torch.allclose(p, ref[k], atol=1e-3, rtol=1e-3), k
    # a finished run is not trained again
    t = time.perf_counter()
    again = train_detector(det, vedai4_yaml, cfg, run.run_dir)
    assert time.perf_counter() - t < 5
    assert again.skipped and again.weights == run.weights and again.transferred == run.transferred
    # inference on the three scenes and AP in the imim convention
    ds = dd.VEDAI(root=VEDAI_ROOT)
    samples = [ds[k] for k in range(len(ds))]
    preds = predict(model, [s['image'] for s in samples], imgsz=S)
    assert len(preds) == 3
    for p in preds:
        n = len(p['scores'])
        assert p['boxes'].shape == (n, 4) and p['boxes'].dtype == torch.float32
        assert p['scores'].dtype == torch.float32 and p['labels'].dtype == torch.int64 and p['labels'].shape == (n,)
        assert n <= 300 and bool((p['scores'] >= 0.001).all() and (p['scores'] <= 1).all())
        assert bool(((p['labels'] >= 0) & (p['labels'] < 8)).all())
    res = evaluate(preds, samples, dd.VEDAI_CLASSES)
    assert list(res) == [*dd.VEDAI_CLASSES, 'mAP']
    present = {int(c) for s in samples for c in s['label']}
    for j, name in enumerate(dd.VEDAI_CLASSES):
        assert math.isnan(res[name]) == (j not in present), name
        if j in present: assert 0 <= res[name] <= 1
    assert 0 <= res['mAP'] <= 1


@needs_vedai
def test_train_detector_after_kill_before_done_json(trained, vedai4_yaml, tmp_path, monkeypatch):
    pre, det, cfg, run = trained
    monkeypatch.chdir(tmp_path)        # a fallback to a new ultralytics run would write runs/detect/train* here
    killed = tmp_path/'killed'
    (killed/'weights').mkdir(parents=True)
    # the state a kill during ultralytics' final validation leaves: init.pt and the stripped last.pt, no done.json
    det_mod.save_init_checkpoint(det, killed/'init.pt')
    shutil.copy(run.weights, killed/'weights'/'last.pt')
    n0 = len(NET_ATTEMPTS)
    try: out = train_detector(det, vedai4_yaml, cfg, killed)   # must not start a new (coco8) run
    finally: tried = NET_ATTEMPTS[n0:]; del NET_ATTEMPTS[n0:]
    assert not tried, tried
    assert out.weights.is_file() and (killed/'done.json').is_file()
    model = load_detector(out.weights)
    assert model.model[0].in_chans == 4 and len(model.names) == 8
    assert not (tmp_path/'runs').exists()


# ---------------------------------------------------------------- (5) predict maps boxes back to image pixels
class FakeDetect(nn.Module):
    "Returns a fixed raw Detect output `[B, 4 + nc, N]` (xywh in the network-input frame + class scores)."
    def __init__(self, raw):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))           # predict() reads the device from the parameters
        self.register_buffer('raw', raw)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.raw.expand(x.shape[0], -1, -1).clone()


def test_predict_scales_boxes_to_image_pixels():
    nc, imgsz = 3, 256
    raw = torch.zeros(1, 4 + nc, 2)
    raw[0, :4, 0] = torch.tensor([128., 64., 32., 16.])    # xyxy (112, 56, 144, 72) in the 256x256 input
    raw[0, 4:, 0] = torch.tensor([0.05, 0.02, 0.9])         # class 2, score 0.9
    raw[0, :4, 1] = torch.tensor([10., 10., 4., 4.])
    raw[0, 4:, 1] = 1e-4                                    # below conf=0.001: dropped
    im_a = torch.zeros(3, 512, 384); im_a[..., 192:] = 1.   # H=512, W=384: left half 0, right half 1
    im_b = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    model = FakeDetect(raw)
    out = predict(model, [im_a, im_b], imgsz=imgsz)
    assert len(model.inputs) == 1
    x = model.inputs[0]
    assert x.shape == (2, 3, imgsz, imgsz)
    assert torch.allclose(x[1], im_b, atol=1e-6)                               # already at imgsz: untouched
    assert x[0][..., :120].abs().max() < 1e-6 and (x[0][..., 136:] - 1).abs().max() < 1e-6   # W squeezed, not H
    assert len(out) == 2 and all(len(o['boxes']) == 1 for o in out)
    # x * W/imgsz = x * 1.5, y * H/imgsz = y * 2 for image a; image b is at imgsz already
    assert torch.allclose(out[0]['boxes'], torch.tensor([[168., 112., 216., 144.]]), atol=1e-4)
    assert torch.allclose(out[1]['boxes'], torch.tensor([[112., 56., 144., 72.]]), atol=1e-4)
    for o in out:
        assert o['labels'].tolist() == [2] and o['labels'].dtype == torch.int64
        assert torch.allclose(o['scores'], torch.tensor([0.9]))
    # one image per batch gives the same
    one = predict(FakeDetect(raw), [im_a, im_b], imgsz=imgsz, batch_size=1)
    for a, b in zip(out, one): assert torch.equal(a['boxes'], b['boxes']) and torch.equal(a['labels'], b['labels'])
    with pytest.raises(ValueError, match='multiple of 32'): predict(model, [im_b], imgsz=100)


# ---------------------------------------------------------------- (6) evaluate: AP by hand
def test_evaluate_all_points_by_hand():
    gts = [{'boxes': torch.tensor([[0., 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]]), 'label': torch.tensor([0, 0, 1])},
           {'boxes': torch.tensor([[0., 0, 10, 10]]), 'label': torch.tensor([0])}]
    preds = [{'boxes': torch.tensor([[0., 0, 10, 10],        # car, .9 -> TP (GT 0 of image 0)
                                     [100., 100, 110, 110],   # car, .8 -> FP (no overlap)
                                     [0.5, 0, 10.5, 10],      # car, .6 -> FP (duplicate of GT 0, already taken)
                                     [52., 50, 72, 70],       # truck, .5 -> TP: IoU 360/440 = 0.82
                                     [20., 20, 30, 30]]),     # truck, .4 -> FP: that GT is a car (class-aware)
              'scores': torch.tensor([.9, .8, .6, .5, .4]), 'labels': torch.tensor([0, 0, 0, 1, 1])},
             {'boxes': torch.tensor([[0., 0, 10, 10], [0., 0, 10, 10]]),   # car .7 TP; truck .95 FP (no truck here)
              'scores': torch.tensor([.7, .95]), 'labels': torch.tensor([0, 1])}]
    # car: 3 GT; by score .9 TP, .8 FP, .7 TP, .6 FP -> recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2
    #      all-points (envelope) AP = 1/3 * 1 + (2/3 - 1/3) * 2/3 + (1 - 2/3) * 0 = 5/9
    # truck: 1 GT; .95 FP, .5 TP, .4 FP -> recall 0, 1, 1; precision 0, 1/2, 1/3 -> AP = 1 * 1/2 = 1/2
    # boat: no GT, no prediction -> NaN, left out of the mAP = (5/9 + 1/2) / 2 = 19/36
    r = evaluate(preds, gts, ['car', 'truck', 'boat'], method='all_points')
    assert list(r) == ['car', 'truck', 'boat', 'mAP']
    assert r['car'] == pytest.approx(5 / 9, abs=1e-9) and r['truck'] == pytest.approx(0.5, abs=1e-9)
    assert math.isnan(r['boat']) and r['mAP'] == pytest.approx(19 / 36, abs=1e-9)
    # a stricter IoU threshold turns the truck TP (IoU 0.82) into a FP: AP 0
    assert evaluate(preds, gts, ['car', 'truck', 'boat'], iou_thr=0.85, method='all_points')['truck'] == 0.0
    # gts may say 'labels' as well as 'label'; the default method is the imim (ultralytics) one
    r2 = evaluate(preds, [{'boxes': g['boxes'], 'labels': g['label']} for g in gts], ['car', 'truck', 'boat'])
    assert r2['car'] == pytest.approx(evaluate(preds, gts, ['car', 'truck', 'boat'], method='ultralytics')['car'])
    with pytest.raises(ValueError): evaluate(preds, gts, ['car'])                 # label 1 outside [0, 1)


# ---------------------------------------------------------------- (7) configurations, baselines
def test_configs_and_baselines(det4):
    import ultralytics.nn.tasks as tasks
    assert os.environ['YOLO_OFFLINE'] == '1' and os.environ['YOLO_AUTOINSTALL'] == '0'
    assert tasks.SwinBackbone is SwinBackbone
    with pytest.raises(ValueError, match='scale'): swin_yolov5_cfg(8, scale='q')
    with pytest.raises(ValueError, match='nc=0'): swin_yolov5_cfg(0, scale='n')
    with pytest.raises(ValueError, match='nc=-1'): model_cfg('swin_yolov5', -1, 'n')
    with pytest.raises(ValueError, match='arch'): model_cfg('yolov9', 8)
    c = swin_yolov5_cfg(8, scale='n')
    assert c['nc'] == 8 and c['scales'] == {'n': [0.33, 0.25, 1024]} and c['backbone'][0][2] == 'SwinBackbone'
    # the Swin detector: strides 8/16/32, three backbone maps, 4 bands only
    assert det4.stride.tolist() == [8., 16., 32.]
    bb = det4.model[0]
    with torch.no_grad():
        assert [tuple(f.shape) for f in bb(torch.rand(1, 4, 64, 64))] == [(1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]
        y = det4(torch.rand(1, 4, 64, 64))
    y = y[0] if isinstance(y, (list, tuple)) else y
    assert y.shape == (1, 4 + 8, 8 * 8 + 4 * 4 + 2 * 2)
    with pytest.raises(ValueError, match='3 channels'): bb(torch.rand(1, 3, 64, 64))
    # a baseline on 4-band input
    assert 'yolov5n' in BASELINES
    yolo, rep = build_detector('yolov5n', nc=8, in_chans=4)
    assert rep is None and yolo.stride.tolist() == [8., 16., 32.] and yolo.model[0].conv.weight.shape[1] == 4
    yolo.eval()
    with torch.no_grad(): y = yolo(torch.rand(1, 4, 64, 64))
    y = y[0] if isinstance(y, (list, tuple)) else y
    assert y.shape == (1, 4 + 8, 84)
    named, _ = build_detector('yolov5n', nc=2, in_chans=3, names=['car', 'boat'])
    assert named.names == {0: 'car', 1: 'boat'}
    with pytest.raises(ValueError, match='2 names'): build_detector('yolov5n', nc=3, in_chans=3, names=['car', 'boat'])


# ---------------------------------------------------------------- last: nothing above touched the network
def test_no_network_access_above():
    "Every test above ran with DNS and sockets refused; ultralytics_offline() must have kept ultralytics off them."
    assert NET_ATTEMPTS == []
