"Tests of rsrepro.detector: anchor-based Swin + YOLOv5 and the YOLO baselines, pre-training checkpoints, training, inference, AP."
import json, math, os, re, shutil, socket, time
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rsrepro.detector as det_mod
from rsrepro.detector import (ANCHOR_FREE, ARCHS, BASELINES, EVAL_CONVENTIONS, IMIM_EVAL, DetectorConfig, DetectorRun,
                              SwinBackbone, YOLOv5Detector, build_detector, eval_convention, evaluate, load_backbone,
                              load_detector, model_cfg, predict, swin_yolov5_cfg, train_detector, ultralytics_offline,
                              yolov5_cfg, yolov5_hyp, yolov5_offline, YOLOV5_ANCHORS)

yolov5_offline()             # before anything below imports ultralytics: offline env, rsrepro layers registered

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
    "A fresh 4-band anchor-based Swin-YOLOv5n (random weights); tests must not change it."
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
    assert rep.source == str(path) and rep.missing == [] and rep.adapted == []
    assert rep.loaded == sorted(own) and len(own) == 169
    assert f'loaded {len(own)}/{len(own)} tensors' in str(rep)
    # what the file holds besides the encoder (decoder, interaction module, mask token, the encoder's final norm,
    # which a features_only Swin does not have) is reported as not used
    non_encoder = {k for k in pre.state_dict() if not k.startswith('encoder.')}
    assert {'mask_token', 'decoder.pred.weight', 'interaction.norm.weight'} <= non_encoder and len(non_encoder) == 50
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
    yolo, _ = build_detector('yolov5n_v7', nc=8, in_chans=4)
    with pytest.raises(RsreproError, match='no SwinBackbone'): load_backbone(yolo, {'model': pre3.state_dict()})
    with pytest.raises(RsreproError, match='no Swin backbone'): build_detector('yolov5s', nc=8, in_chans=4, checkpoint=p3)
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
    # the trainer rebuilt the model from the checkpoint's model dict and copied every tensor of our model into it
    m = re.search(r'Transferred (\d+)/(\d+) items', run.transferred)
    assert m, run.transferred
    assert int(m.group(1)) == int(m.group(2)) == len(det.state_dict())
    # the trained weights (lr0 = 0: unchanged) come back; ultralytics stores the EMA model in fp16
    model = load_detector(run.weights)
    assert isinstance(model, YOLOv5Detector) and not model.training and next(model.parameters()).dtype == torch.float32
    bb = model.model[0]
    assert isinstance(bb, SwinBackbone) and bb.in_chans == 4 and model.stride.tolist() == [8., 16., 32.]
    assert model.hyp == yolov5_hyp(8, 3, S)            # the trainer set v5.0's gains for 8 classes at 224 px
    assert torch.allclose(model.model[-1].anchors * model.stride.view(-1, 1, 1),       # YOLOv5's anchors, in pixels
                          torch.tensor(YOLOV5_ANCHORS, dtype=torch.float32).view(3, 3, 2))
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
        assert n <= 300 and bool((p['scores'] > 0.001).all() and (p['scores'] <= 1).all())
        assert bool(((p['labels'] >= 0) & (p['labels'] < 8)).all())
        assert bool((p['boxes'] >= 0).all() and (p['boxes'] <= 512).all())
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
    # the state a kill during ultralytics' final step leaves: init.pt and the stripped last.pt, no done.json
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


class Interrupt(Exception):
    pass


@needs_vedai
def test_nominal_batch_one_step_and_resume(vedai4_yaml, tmp_path, monkeypatch):
    "nbs = batch: the one batch of epoch 1 updates the weights; an interrupted run resumes from its last.pt."
    torch.manual_seed(0)
    det, _ = build_detector('swin_yolov5', nc=8, in_chans=4, scale='n')
    init = {k: v.clone() for k, v in det.state_dict().items()}
    cfg = DetectorConfig(epochs=2, imgsz=S, batch=3, nbs=3, lr0=1e-3, warmup_epochs=0, device='cpu', mosaic=0.0)
    assert cfg.train_args('cpu')['nbs'] == 3 and DetectorConfig().train_args('cpu')['nbs'] == 64
    Trainer = det_mod._detector_trainer()
    saves = []
    def save_then_interrupt(self):                      # a kill right after epoch 1 was saved
        out = Trainer.__mro__[1].save_model(self); saves.append(self.epoch)
        if len(saves) == 1: raise Interrupt('killed after epoch 1')
        return out
    monkeypatch.setattr(Trainer, 'save_model', save_then_interrupt)
    run_dir = tmp_path/'run'
    with pytest.raises(Interrupt): train_detector(det, vedai4_yaml, cfg, run_dir)
    last = run_dir/'weights'/'last.pt'
    ck = torch.load(last, map_location='cpu', weights_only=False)
    assert ck['epoch'] == 0 and ck['optimizer'] is not None and not (run_dir/'done.json').exists()
    assert ck['train_args']['nbs'] == 3 and ck['train_args']['lrf'] == 0.2 and ck['train_args']['cos_lr'] is True
    # one epoch of one batch stepped the optimizer: the (EMA) weights moved away from the initial ones
    after = ck['ema'].float().state_dict()
    moved = [k for k, v in init.items() if v.is_floating_point() and not torch.allclose(after[k], v, atol=1e-4)]
    weights = [k for k in init if k.endswith('.weight')]
    assert len(set(moved) & set(weights)) > len(weights) // 2, f'{len(moved)} tensors moved'
    # resuming finishes epoch 2 from there, in the same folder
    run = train_detector(det, vedai4_yaml, cfg, run_dir)
    assert run.resumed and saves == [0, 1] and re.fullmatch(r'Transferred (\d+)/\1 items from pretrained weights', run.transferred)
    assert (run_dir/'done.json').is_file() and not det_mod._resumable(run.weights)
    rows = (run_dir/'results.csv').read_text().strip().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['1', '2'] and 'metrics/mAP50(B)' in rows[0]
    assert isinstance(load_detector(run.weights), YOLOv5Detector)


# ---------------------------------------------------------------- (5) predict maps boxes back to image pixels
class FakeDetect(nn.Module):
    "Returns a fixed raw ultralytics Detect output `[B, 4 + nc, N]` (xywh in the network-input frame + class scores)."
    def __init__(self, raw):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))           # predict() reads the device from the parameters
        self.register_buffer('raw', raw)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.raw.expand(x.shape[0], -1, -1).clone()


class FakeYOLOv5(YOLOv5Detector):
    "Returns a fixed decoded YOLOv5 output `[B, N, 5 + nc]` (xywh, objectness, class probabilities) in eval mode."
    def __init__(self, decoded):
        nn.Module.__init__(self)
        self.w = nn.Parameter(torch.zeros(()))
        self.register_buffer('decoded', decoded)

    def forward(self, x):
        return self.decoded.expand(x.shape[0], -1, -1).clone(), []


def test_predict_scales_boxes_to_image_pixels():
    nc, imgsz = 3, 256
    raw = torch.zeros(1, 4 + nc, 2)
    raw[0, :4, 0] = torch.tensor([128., 64., 32., 16.])    # xyxy (112, 56, 144, 72) in the 256x256 input
    raw[0, 4:, 0] = torch.tensor([0.05, 0.02, 0.9])         # class 2 .9, class 0 .05, class 1 .02: all above 0.001
    raw[0, :4, 1] = torch.tensor([10., 10., 4., 4.])
    raw[0, 4:, 1] = 1e-4                                    # below conf=0.001: dropped
    im_a = torch.zeros(3, 512, 384); im_a[..., 192:] = 1.   # H=512, W=384: left half 0, right half 1
    im_b = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))
    model = FakeDetect(raw)
    out = predict(model, [im_a, im_b], imgsz=imgsz, convention='ultralytics_8.4')
    assert len(model.inputs) == 1
    x = model.inputs[0]
    assert x.shape == (2, 3, imgsz, imgsz)
    assert torch.allclose(x[1], im_b, atol=1e-6)                               # already at imgsz: untouched
    assert x[0][..., :120].abs().max() < 1e-6 and (x[0][..., 136:] - 1).abs().max() < 1e-6   # W squeezed, not H
    # multi-label NMS: the box is kept once per class above the threshold, in descending score
    assert len(out) == 2 and all(len(o['boxes']) == 3 for o in out)
    # x * W/imgsz = x * 1.5, y * H/imgsz = y * 2 for image a; image b is at imgsz already
    assert torch.allclose(out[0]['boxes'], torch.tensor([[168., 112., 216., 144.]]).expand(3, 4), atol=1e-4)
    assert torch.allclose(out[1]['boxes'], torch.tensor([[112., 56., 144., 72.]]).expand(3, 4), atol=1e-4)
    for o in out:
        assert o['labels'].tolist() == [2, 0, 1] and o['labels'].dtype == torch.int64
        assert torch.allclose(o['scores'], torch.tensor([0.9, 0.05, 0.02]))
    # one image per batch gives the same
    one = predict(FakeDetect(raw), [im_a, im_b], imgsz=imgsz, batch_size=1, convention='ultralytics_8.4')
    for a, b in zip(out, one): assert torch.equal(a['boxes'], b['boxes']) and torch.equal(a['labels'], b['labels'])
    with pytest.raises(ValueError, match='multiple of 32'): predict(model, [im_b], imgsz=100)
    with pytest.raises(ValueError, match='convention'): predict(model, [im_b], imgsz=256, convention='yolov5')


def test_predict_anchor_based_nms():
    # YOLOv5's NMS: confidence = objectness x class probability; multi-label; IoU 0.6 (v5.0) vs 0.7 (ultralytics)
    dec = torch.zeros(1, 4, 5 + 2)
    dec[0, 0] = torch.tensor([100., 100., 40., 40., .9, .8, .5])     # A: conf .72 (class 0), .45 (class 1)
    dec[0, 1] = torch.tensor([104., 100., 40., 40., .8, .8, .0])     # B: IoU with A = 36*40/(44*40) = 0.818 -> suppressed
    dec[0, 2] = torch.tensor([112., 100., 40., 40., .9, .7, .0])     # C: IoU with A = 28/52 = 0.538 -> kept at 0.6
    dec[0, 3] = torch.tensor([10., 10., 8., 8., .001, 1., 0.])       # D: conf .001, not above the threshold
    img = torch.zeros(3, 256, 256)
    out = predict(FakeYOLOv5(dec), [img], imgsz=256)[0]
    assert out['labels'].tolist() == [0, 0, 1] and torch.allclose(out['scores'], torch.tensor([.72, .63, .45]))
    assert torch.allclose(out['boxes'][0], torch.tensor([80., 80., 120., 120.]))
    assert torch.allclose(out['boxes'][1], torch.tensor([92., 80., 132., 120.]))
    # a 0.5 IoU threshold would suppress C as well
    strict = det_mod.EvalConvention('t', 'test', 0.001, 0.5, True, 300, 'score', 'all_points')
    assert predict(FakeYOLOv5(dec), [img], imgsz=256, convention=strict)[0]['labels'].tolist() == [0, 1]


# ---------------------------------------------------------------- (6) evaluate: AP by hand, conventions
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
    assert evaluate(preds, gts, ['car', 'truck', 'boat'], convention='voc')['car'] == pytest.approx(5 / 9, abs=1e-9)
    # a stricter IoU threshold turns the truck TP (IoU 0.82) into a FP: AP 0
    assert evaluate(preds, gts, ['car', 'truck', 'boat'], iou_thr=0.85, method='all_points')['truck'] == 0.0
    # gts may say 'labels' as well as 'label'; the default is imim's convention, YOLOv5 v5.0
    r2 = evaluate(preds, [{'boxes': g['boxes'], 'labels': g['label']} for g in gts], ['car', 'truck', 'boat'])
    assert IMIM_EVAL == 'yolov5_v5.0'
    assert r2['car'] == pytest.approx(evaluate(preds, gts, ['car', 'truck', 'boat'], convention='yolov5_v5.0')['car'])
    # car in v5.0's formula: curve (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2) and the sentinel (2/3 + 0.01, 0);
    # envelope 1, 2/3, 2/3, 1/2, 0. Sampled at 0, 0.01, ..., 1: 1 up to 0.33, 2/3 from 0.34 to 0.66 (at 1/3 the later
    # point counts, but 1/3 is no sample), then at 0.67 the fall from (2/3, 1/2) to (0.67667, 0): 1/2 * (1 - 0.3333)
    y67 = .5 * (1 - (.67 - 2 / 3) / .01)
    by_hand = .33 + .01 * (1 + 2 / 3) / 2 + .32 * 2 / 3 + .01 * (2 / 3 + y67) / 2 + .01 * y67 / 2
    assert r2['car'] == pytest.approx(by_hand, abs=1e-12)
    with pytest.raises(ValueError): evaluate(preds, gts, ['car'])                 # label 1 outside [0, 1)
    with pytest.raises(ValueError, match='convention'): evaluate(preds, gts, ['car', 'truck'], convention='coco')


def test_conventions_are_named_and_described():
    assert set(EVAL_CONVENTIONS) == {'yolov5_v5.0', 'yolov5_v7.0', 'ultralytics_8.4', 'voc07', 'voc'}
    c = eval_convention(IMIM_EVAL)
    assert (c.conf, c.iou, c.multi_label, c.max_det, c.matching, c.ap_method) == (0.001, 0.6, True, 300, 'score', 'yolov5_v5.0')
    u = eval_convention('ultralytics_8.4')
    assert (u.iou, u.matching, u.ap_method) == (0.7, 'score_unclaimed', 'ultralytics_8.4')
    d = c.describe()
    assert 'YOLOv5 v5.0' in d and '0.001' in d and 'IoU 0.6' in d and '+ 0.01' in d
    assert eval_convention(c) is c
    with pytest.raises(ValueError, match='matching'): det_mod.EvalConvention('x', 'x', .1, .5, True, 9, 'greedy', 'all_points')


def test_recalibrate_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.03), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    ims = [torch.rand(3, 48, 40) for _ in range(6)]
    det_mod.recalibrate_bn(net, ims, imgsz=32, batch_size=3)          # two batches of 3: the average of their statistics
    x = torch.stack([torch.nn.functional.interpolate(i[None], size=(32, 32), mode='bilinear', antialias=True)[0] for i in ims])
    z = net[0](x)
    means = torch.stack([z[:3].mean((0, 2, 3)), z[3:].mean((0, 2, 3))]).mean(0)
    assert torch.allclose(net[1].running_mean, means, atol=1e-5) and int(net[1].num_batches_tracked) == 2
    assert net[1].momentum == 0.03 and net[4].momentum == 0.1 and not net.training and not net[1].training
    with pytest.raises(ValueError, match='multiple of 32'): det_mod.recalibrate_bn(net, ims, imgsz=30)
    with pytest.raises(ValueError, match='no images'): det_mod.recalibrate_bn(net, [], imgsz=32)
    # a YOLOv5 model: every BatchNorm re-estimated, the weights untouched
    m, _ = build_detector('yolov5n_v7', nc=2, in_chans=3)
    w = {k: v.clone() for k, v in m.state_dict().items() if 'running' not in k and 'num_batches' not in k}
    det_mod.recalibrate_bn(m, ims[:2], imgsz=64)
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(int(b.num_batches_tracked) == 1 and b.momentum == 0.03 for b in bns)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in w.items())


# ---------------------------------------------------------------- (7) configurations, baselines, devices
@pytest.mark.parametrize('arch', ['yolov5s', 'yolov5n_v7', 'yolov3'])
def test_anchor_models_equal_yolov5_package(arch):
    "Our row parser builds what yolov5's own DetectionModel builds from the same dict: same tensors, same outputs."
    from yolov5.models.yolo import DetectionModel as Y5
    torch.manual_seed(0)
    ours, _ = build_detector(arch, nc=8, in_chans=4)
    ref = Y5(deepcopy(yolov5_cfg(arch, 8)), ch=4, nc=8)
    sd = ours.state_dict()
    assert list(sd) == list(ref.state_dict()) and all(sd[k].shape == v.shape for k, v in ref.state_dict().items())
    ref.load_state_dict(sd)
    ours.eval(); ref.eval()
    x = torch.rand(2, 4, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): a, b = ours(x)[0], ref(x)[0]
    assert a.shape == (2, 3 * (8 * 12 + 4 * 6 + 2 * 3), 13) and torch.allclose(a, b, atol=1e-5)
    assert torch.equal(ours.model[-1].anchors, ref.model[-1].anchors) and ours.stride.tolist() == [8., 16., 32.]
    # YOLOv5's initialisation: BatchNorm momentum 0.03, eps 1e-3; objectness prior log(8 / (640 / 8)^2) on P3
    bn = next(m for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    assert (bn.momentum, bn.eps) == (0.03, 1e-3)
    assert ours.model[-1].m[0].bias.view(3, -1)[:, 4].mean().item() == pytest.approx(math.log(8 / 80 ** 2), abs=0.5)


def test_v50_baseline_architecture():
    c = yolov5_cfg('yolov5s', 8)
    assert c['backbone'][0] == [-1, 1, 'Focus', [64, 3]] and c['backbone'][8] == [-1, 1, 'SPP', [1024, [5, 9, 13]]]
    assert [r[1] for r in c['backbone'] if r[2] == 'C3'] == [3, 9, 9, 3]
    m, _ = build_detector('yolov5s', nc=8, in_chans=4)
    assert type(m.model[0]).__name__ == 'Focus' and m.model[0].conv.conv.weight.shape == (32, 16, 3, 3)  # 4 bands x 4
    assert type(m.model[8]).__name__ == 'SPP' and type(m.model[9]).__name__ == 'C3'
    v7, _ = build_detector('yolov5s_v7', nc=8, in_chans=4)
    assert type(v7.model[0]).__name__ == 'Conv' and type(v7.model[9]).__name__ == 'SPPF'
    # in the COCO configuration (80 classes, RGB) the parameter counts YOLOv5 itself prints for these models:
    # v5.0 yolov5s "7276605 parameters" (its README: 7.3M), 7.0 yolov5s 7235389, 7.0 yolov5n 1872157
    n = lambda arch: sum(p.numel() for p in build_detector(arch, nc=80, in_chans=3)[0].parameters())
    assert (n('yolov5s'), n('yolov5s_v7'), n('yolov5n_v7')) == (7276605, 7235389, 1872157)


def test_loss_is_yolov5_compute_loss():
    "The loss of an ultralytics batch equals yolov5's ComputeLoss on the same targets built by hand (image, class, xywh)."
    from yolov5.utils.loss import ComputeLoss
    torch.manual_seed(0)
    m, _ = build_detector('yolov5n_v7', nc=3, in_chans=3)
    m.hyp = yolov5_hyp(3, 3, 64)
    assert m.hyp['cls'] == pytest.approx(.5 * 3 / 80) and m.hyp['obj'] == pytest.approx((64 / 640) ** 2)
    batch = {'img': torch.rand(2, 3, 64, 64), 'batch_idx': torch.tensor([0., 1., 1.]), 'cls': torch.tensor([[2.], [0.], [1.]]),
             'bboxes': torch.tensor([[.5, .5, .3, .2], [.25, .3, .2, .2], [.7, .6, .4, .5]])}
    loss, items = m(batch)
    targets = torch.tensor([[0, 2, .5, .5, .3, .2], [1, 0, .25, .3, .2, .2], [1, 1, .7, .6, .4, .5]])
    ref, ref_items = ComputeLoss(m)(m(batch['img']), targets)
    assert torch.allclose(loss, ref) and torch.allclose(torch.stack(list(items.values())).view(-1), ref_items)
    assert list(items) == ['box_loss', 'obj_loss', 'cls_loss'] and loss.item() > 0
    loss.backward()
    assert m.model[-1].m[0].weight.grad.abs().sum() > 0
    m.hyp = None; m.criterion = None
    with pytest.raises(RsreproError, match='hyp'): m(batch)


def test_configs_and_baselines(det4):
    import ultralytics.nn.tasks as tasks
    assert os.environ['YOLO_OFFLINE'] == '1' and os.environ['YOLO_AUTOINSTALL'] == '0'
    assert tasks.SwinBackbone is SwinBackbone
    with pytest.raises(ValueError, match='scale'): swin_yolov5_cfg(8, scale='q')
    with pytest.raises(ValueError, match='nc=0'): swin_yolov5_cfg(0, scale='n')
    with pytest.raises(ValueError, match='nc=-1'): model_cfg('swin_yolov5', -1, 'n')
    with pytest.raises(ValueError, match='arch'): model_cfg('yolov9', 8)
    with pytest.raises(TypeError, match='drop_path_rate'): build_detector('yolov5s', nc=8, drop_path_rate=0.0)
    c = swin_yolov5_cfg(8, scale='n')
    assert c['nc'] == 8 and (c['depth_multiple'], c['width_multiple']) == (0.33, 0.25)
    assert c['backbone'][0][2] == 'SwinBackbone' and c['anchors'][0] == [10, 13, 16, 30, 33, 23]
    assert BASELINES == ('yolov3', 'yolov5s', 'yolov5m', 'yolov5l', 'yolov5x') and set(BASELINES) < set(ARCHS)
    # the Swin detector: strides 8/16/32, three backbone maps, 4 bands only, YOLOv5's anchor-based head
    assert isinstance(det4, YOLOv5Detector) and det4.stride.tolist() == [8., 16., 32.]
    bb = det4.model[0]
    with torch.no_grad():
        assert [tuple(f.shape) for f in bb(torch.rand(1, 4, 64, 64))] == [(1, 192, 8, 8), (1, 384, 4, 4), (1, 768, 2, 2)]
        y, raw = det4(torch.rand(1, 4, 64, 64))
    assert y.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 5 + 8) and [r.shape[1:4] for r in raw] == [(3, 8, 8), (3, 4, 4), (3, 2, 2)]
    assert det4.model[-1].na == 3 and det4.model[-1].m[0].in_channels == 64      # P3 of the neck at width 0.25
    with pytest.raises(ValueError, match='3 channels'): bb(torch.rand(1, 3, 64, 64))
    named, _ = build_detector('yolov5n_v7', nc=2, in_chans=3, names=['car', 'boat'])
    assert named.names == {0: 'car', 1: 'boat'}
    with pytest.raises(ValueError, match='2 names'): build_detector('yolov5n_v7', nc=3, in_chans=3, names=['car', 'boat'])
    # the anchor-free ultralytics variants, kept under names ending in _u
    assert set(ANCHOR_FREE) == {'swin_yolov5_u', 'yolov3_u', 'yolov5n_u', 'yolov5s_u', 'yolov5m_u', 'yolov5l_u', 'yolov5x_u'}
    for arch in ('yolov5n_u', 'swin_yolov5_u'):
        u, _ = build_detector(arch, nc=8, in_chans=4, scale='n')
        assert not isinstance(u, YOLOv5Detector) and u.stride.tolist() == [8., 16., 32.]
        u.eval()
        with torch.no_grad(): y = u(torch.rand(1, 4, 64, 64))
        y = y[0] if isinstance(y, (list, tuple)) else y
        assert y.shape == (1, 4 + 8, 84), arch              # no objectness, no anchors: 4 box + 8 classes per cell


def test_device_names(tmp_path):
    assert det_mod._ul_device('cpu') == 'cpu'
    assert det_mod._ul_device('auto') == ('0' if torch.cuda.is_available() else 'cpu')
    if torch.cuda.is_available():
        assert det_mod._ul_device('cuda:0') == '0' and det_mod._ul_device('cuda') == str(torch.cuda.current_device())
        return
    for d in ('cuda', 'cuda:1'):                        # rsrepro.core.get_device's error, not ultralytics' own
        with pytest.raises(RsreproError, match='no CUDA'): det_mod._ul_device(d)
        yml = tmp_path/'data.yaml'; yml.write_text('train: images\n')
        with pytest.raises(RsreproError, match='no CUDA'):
            train_detector(nn.Linear(1, 1), yml, DetectorConfig(device=d), tmp_path/'run')



def test_importing_the_detectors_leaves_plotting_and_printing_alone(tmp_path):
    "yolov5 sets matplotlib's Agg backend at import (a notebook's plt.show() then draws nothing) and both packages change"
    "numpy's, torch's and pandas' display options; rsrepro undoes that for the process that imports them."
    import subprocess, sys
    code = ("import matplotlib, numpy as np, pandas as pd, torch\n"
            "matplotlib.use('svg'); before = (np.get_printoptions(), pd.get_option('display.max_columns'), str(torch.tensor([1/3])))\n"
            "from rsrepro.detector import yolov5_offline; yolov5_offline()\n"
            "import yolov5.utils.plots\n"
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
            "assert matplotlib.rcParams['font.size'] == 10.0, matplotlib.rcParams['font.size']\n"
            "after = (np.get_printoptions(), pd.get_option('display.max_columns'), str(torch.tensor([1/3])))\n"
            "assert before == after, (before, after)\n")
    env = {**os.environ, 'YOLO_CONFIG_DIR': str(tmp_path)}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_notebook_still_shows_figures_after_importing_the_detectors(tmp_path):
    "In a Jupyter kernel (as papermill runs the pages), plt.show() after importing yolov5 still gives an image output."
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from rsrepro.detector import yolov5_offline; yolov5_offline()\n"
        "import yolov5.utils.plots, matplotlib.pyplot as plt\n"
        "plt.plot([0, 1], [1, 0]); plt.show()")])
    os.environ.setdefault('YOLO_CONFIG_DIR', str(tmp_path))
    NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    kinds = [k for o in nb.cells[0].outputs for k in o.get('data', {})]
    assert 'image/png' in kinds, nb.cells[0].outputs


# ---------------------------------------------------------------- last: nothing above touched the network
def test_no_network_access_above():
    "Every test above ran with DNS and sockets refused; ultralytics_offline() must have kept ultralytics off them."
    assert NET_ATTEMPTS == []


def test_yolov5_import_leaves_thread_settings_alone():
    "yolov5 sets OMP_NUM_THREADS at import; rsrepro restores it, so kernels started later keep the machine's threads."
    import subprocess, sys
    code = ("import os; from rsrepro.detector import yolov5_offline; yolov5_offline(); import sys; "
            "assert 'yolov5' in sys.modules; print(os.environ.get('OMP_NUM_THREADS'), os.environ.get('NUMEXPR_MAX_THREADS'))")
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'NUMEXPR_MAX_THREADS')}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ['None', 'None'], out.stdout
