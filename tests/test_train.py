"Tests of rsrepro.train: exact resume, schedules, gradient accumulation, checkpoint errors, metrics files."
import csv, json, math

import pytest
import torch
from torch import nn

from rsrepro.core import DataFormatError, RsreproError, atomic_torch_save
from rsrepro.train import CKPT_NAME, TrainConfig, fit, load_checkpoint, lr_factor


class XY(torch.utils.data.Dataset):
    "Fixed random regression data."
    def __init__(self, n=40, d=6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.y = self.x @ torch.randn(d, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'x': self.x[i], 'y': self.y[i], 'idx': i}


class MLP(nn.Module):
    def __init__(self, p_drop=0.2, d=6):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Dropout(p_drop), nn.Linear(32, 32), nn.GELU(),
                                 nn.Dropout(p_drop), nn.Linear(32, 2))
        self.cls_token = nn.Parameter(torch.zeros(32))
    def forward(self, b):
        mse = ((self.net(b['x']) - b['y']) ** 2).mean()
        return {'loss': mse, 'rmse': mse.detach().sqrt()}


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw)


def cfg(out, **kw):
    base = dict(max_steps=14, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=3, log_every=3, device='cpu',
                out_dir=str(out) if out else None, seed=7, weight_decay=0.05, clip_grad=1.0)
    base.update(kw)
    return TrainConfig(**base)


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "An uninterrupted 14-step run: 40 samples / (4 x 2) = 5 steps per epoch, so ~3 epochs."
    m = make()
    res = fit(m, XY(), cfg(tmp_path_factory.mktemp('ref')))
    assert res['steps_per_epoch'] == 5 and res['step'] == 14 and not res['stopped_early']
    return m, res


def test_training_changes_weights_and_lowers_loss(reference):
    m, res = reference
    assert not same(m, make())
    assert res['history'][-1]['loss'] < res['history'][0]['loss']


def test_resume_after_stop_is_bit_identical(reference, tmp_path):
    # stop after 7 steps = in the middle of epoch 1 (5 steps per epoch), with shuffling, dropout and grad_accum=2
    m1 = make()
    r1 = fit(m1, XY(), cfg(tmp_path, stop_after=7))
    assert r1['stopped_early'] and r1['step'] == 7
    ck = load_checkpoint(tmp_path / CKPT_NAME)
    assert ck['step'] == 7 and ck['epoch'] == 1 and ck['batches_in_epoch'] == 4 and ck['sampler']['start'] == 16
    assert not same(m1, reference[0])
    m2 = make(seed=123)                                      # a differently initialised model: the checkpoint wins
    r2 = fit(m2, XY(), cfg(tmp_path))
    assert r2['resumed_from'] == 7 and r2['step'] == 14
    assert same(m2, reference[0]), 'resumed weights differ from the uninterrupted run'
    # the logged losses of the full windows after the resume are those of the uninterrupted run, exactly
    ref = {r['step']: r['loss'] for r in reference[1]['history']}
    for r in r2['history']:
        if r['step'] in (12, 14): assert r['loss'] == ref[r['step']]


def test_resume_after_crash_from_periodic_checkpoint(reference, tmp_path):
    class Crash(Exception): pass
    def boom(step, info):
        if step == 8: raise Crash
    with pytest.raises(Crash):
        fit(make(), XY(), cfg(tmp_path, ckpt_every=3), on_step=boom)
    assert load_checkpoint(tmp_path / CKPT_NAME)['step'] == 6     # the last periodic checkpoint before the crash
    # the metrics files left by the crash are complete and parse
    rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [3, 6]
    with open(tmp_path / 'metrics.csv') as f: assert [int(r['step']) for r in csv.DictReader(f)] == [3, 6]
    m = make(seed=5)
    res = fit(m, XY(), cfg(tmp_path, ckpt_every=3))
    assert res['resumed_from'] == 6 and same(m, reference[0])
    assert [r['step'] for r in res['history']] == [3, 6, 9, 12, 14]
    assert [json.loads(l)['step'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()] == [3, 6, 9, 12, 14]
    # a finished run returns at once, with the final weights loaded and no further training
    m3 = make(seed=9)
    res3 = fit(m3, XY(), cfg(tmp_path, ckpt_every=3))
    assert res3['step'] == 14 and res3['resumed_from'] == 14 and res3['elapsed_s'] == 0.0 and same(m3, reference[0])


def test_same_seed_same_weights_and_resume_false(reference, tmp_path):
    m = make()
    fit(m, XY(), cfg(tmp_path))
    assert same(m, reference[0])
    m2 = make()
    fit(m2, XY(), cfg(tmp_path, seed=8), resume=False)          # another seed: another data order and dropout
    assert not same(m2, reference[0])


def test_schedules_hit_hand_computed_values(tmp_path):
    seen = {}
    record = lambda step, info: seen.__setitem__(step - 1, info['group_lrs'])
    groups = [{'prefix': 'net.0', 'lr_mult': 0.1}]
    # cosine: total 20, warmup 4, lr 1e-2, min_lr 1e-3
    fit(make(0.0), XY(), cfg(None, max_steps=20, warmup_steps=4, lr=1e-2, min_lr=1e-3, grad_accum=1, out_dir=None),
        param_groups=groups, on_step=record)
    want = {0: 2.5e-3, 1: 5e-3, 3: 1e-2, 4: 1e-2, 12: 1e-3 + 9e-3 * 0.5, 8: 1e-3 + 9e-3 * (1 + math.cos(math.pi / 4)) / 2}
    for s, lr in want.items():
        lrs = sorted(set(round(x, 15) for x in seen[s]))
        assert lrs == pytest.approx([0.1 * lr, lr], rel=1e-12, abs=0), (s, lrs)
    # step (incomplete's fine-tuning): x0.1 at 50% and 75% of 20 steps, after a 2-step warmup
    seen.clear()
    fit(make(0.0), XY(), cfg(None, max_steps=20, warmup_steps=2, lr=1e-2, schedule='step', milestones=(0.5, 0.75),
                             gamma=0.1, grad_accum=1, out_dir=None), on_step=record)
    got = {s: max(seen[s]) for s in (0, 1, 2, 9, 10, 14, 15, 19)}
    assert got == pytest.approx({0: 5e-3, 1: 1e-2, 2: 1e-2, 9: 1e-2, 10: 1e-3, 14: 1e-3, 15: 1e-4, 19: 1e-4},
                                rel=1e-12, abs=0)
    # constant with warmup in epochs: 40 / 4 = 10 steps per epoch, warmup_epochs 0.5 -> 5 steps
    seen.clear()
    fit(make(0.0), XY(), cfg(None, max_steps=12, warmup_epochs=0.5, warmup_steps=None, lr=2e-3, schedule='constant',
                             grad_accum=1, out_dir=None), on_step=record)
    assert [max(seen[s]) for s in range(7)] == pytest.approx([4e-4, 8e-4, 1.2e-3, 1.6e-3, 2e-3, 2e-3, 2e-3])
    # the pure function agrees
    assert lr_factor(12, 20, 4, 'cosine', 0.1) == pytest.approx(0.55)


def test_scale_lr_and_epochs(tmp_path):
    res = fit(make(0.0), XY(), cfg(None, max_steps=None, epochs=2, lr=1e-3, scale_lr=True, out_dir=None))
    assert res['step'] == 10 and res['effective_batch'] == 8 and res['peak_lr'] == pytest.approx(1e-3 * 8 / 256)


def test_grad_accum_equals_bigger_batch(tmp_path):
    # deterministic model (no dropout): accumulating 2 x 4 samples = one batch of 8 (same data order by construction)
    ma, mb = make(p_drop=0.0), make(p_drop=0.0)
    ra = fit(ma, XY(), cfg(tmp_path / 'a', max_steps=10, batch_size=4, grad_accum=2, clip_grad=None))
    rb = fit(mb, XY(), cfg(tmp_path / 'b', max_steps=10, batch_size=8, grad_accum=1, clip_grad=None))
    assert ra['steps_per_epoch'] == rb['steps_per_epoch'] == 5
    for (k, a), b in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), k
    assert not same(ma, make(p_drop=0.0))
    for x, y in zip(ra['history'], rb['history']): assert x['loss'] == pytest.approx(y['loss'], rel=1e-5)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    fit(make(), XY(), cfg(tmp_path, stop_after=2))
    path = tmp_path / CKPT_NAME
    path.write_bytes(path.read_bytes()[:1000])                     # a partial write
    with pytest.raises(DataFormatError, match=str(path)):
        fit(make(), XY(), cfg(tmp_path))
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(DataFormatError, match='checkpoint.pt'):
        fit(make(), XY(), cfg(tmp_path))
    atomic_torch_save({'model': {}}, path)                         # readable, but not ours
    with pytest.raises(DataFormatError, match='not an rsrepro.train checkpoint'):
        fit(make(), XY(), cfg(tmp_path))
    with pytest.raises(RsreproError, match='no such checkpoint file'):
        fit(make(), XY(), cfg(tmp_path), resume=str(tmp_path / 'nope.pt'))


def test_incompatible_checkpoint_is_refused_clearly(tmp_path):
    fit(make(), XY(), cfg(tmp_path, stop_after=2))
    class Other(MLP):
        def __init__(self):
            super().__init__(); self.net[-1] = nn.Linear(32, 2, bias=False); self.extra = nn.Linear(2, 2)
    with pytest.raises(RsreproError) as e:
        fit(Other(), XY(), cfg(tmp_path))
    msg = str(e.value)
    assert 'checkpoint.pt' in msg and 'extra.weight' in msg and 'net.6.bias' in msg
    with pytest.raises(RsreproError, match='batch_size: 4 in checkpoint vs 8 now'):
        fit(make(), XY(), cfg(tmp_path, batch_size=8))


def test_contract_and_config_errors(tmp_path):
    class NoLoss(nn.Module):
        def __init__(self): super().__init__(); self.l = nn.Linear(6, 2)
        def forward(self, b): return self.l(b['x'])
    with pytest.raises(RsreproError, match="must return a dict with a scalar 'loss'"):
        fit(NoLoss(), XY(), cfg(None, out_dir=None))
    # loss_fn overrides the model's own loss
    m = NoLoss()
    res = fit(m, XY(), cfg(None, out_dir=None, max_steps=3),
              loss_fn=lambda model, b: {'loss': (model(b) - b['y']).abs().mean()})
    assert res['step'] == 3 and 'loss' in res['history'][-1]
    with pytest.raises(RsreproError, match='no full optimizer step'):
        fit(make(), XY(n=5), cfg(None, out_dir=None))
    with pytest.raises(RsreproError, match='exactly one of max_steps / epochs'):
        fit(make(), XY(), cfg(None, epochs=2))


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_autocast_paths_train_and_resume_on_cpu(amp, tmp_path):
    # CUDA uses bf16 by default; here the same code path runs under CPU autocast (fp16 adds a GradScaler to the state)
    c = lambda out, **kw: cfg(out, amp=amp, max_steps=10, log_every=2, **kw)
    m_ref = make()
    ref = fit(m_ref, XY(), c(tmp_path / 'ref'))
    fit(make(), XY(), c(tmp_path / 'run', stop_after=5))
    assert (load_checkpoint(tmp_path / 'run' / CKPT_NAME)['scaler'] is not None) == (amp == 'fp16')
    m = make(seed=4)
    res = fit(m, XY(), c(tmp_path / 'run'))
    assert res['resumed_from'] == 5 and res['step'] == 10 and same(m, m_ref)
    full = fit(make(), XY(), cfg(None, max_steps=10, log_every=2, out_dir=None))      # fp32
    assert [r['loss'] for r in ref['history']] == pytest.approx([r['loss'] for r in full['history']], rel=0.02)
    assert not same(m_ref, make())


def test_dropped_samples_go_to_the_run_log(tmp_path):
    "A reader that dropped samples (on_missing='skip') has a `drop_message`; fit writes it to the run's train.log."
    from rsrepro.core import drop_warning
    from rsrepro.train import TRAIN_LOG
    ds = XY()
    with pytest.warns(UserWarning, match='dropped 2 sample'):
        ds.drop_message = drop_warning('xy', ['a.tif', 'b.tif'], 'the partner file is missing')
    fit(make(), ds, cfg(tmp_path, max_steps=2))
    log = (tmp_path/TRAIN_LOG).read_text()
    assert 'xy: dropped 2 sample(s) because the partner file is missing: a.tif, b.tif' in log
    # found through the usual wrappers too
    from rsrepro.train import drop_messages
    wrapped = torch.utils.data.ConcatDataset([torch.utils.data.Subset(ds, range(20)), XY()])
    assert drop_messages(wrapped) == [ds.drop_message]
