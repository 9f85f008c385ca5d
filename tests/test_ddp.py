"""DDP through torchrun (2 CPU processes, gloo): identical weights on both ranks, equal to one process with batch 2b,
and an interrupted-then-resumed DDP run equals an uninterrupted one."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker as W  # noqa: E402

from rsrepro.train import fit  # noqa: E402


def launch(out, mode):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get('PYTHONPATH', '')]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--standalone',
           str(HERE / 'ddp_worker.py'), str(out), mode]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f'torchrun {mode} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    launch(out, 'plain')
    launch(out, 'resume')
    return out


def load(out, name):
    return [torch.load(out / f'{name}_rank{r}.pt', weights_only=True) for r in (0, 1)]


def test_ranks_end_identical_and_only_rank0_writes(runs):
    for name in ('plain', 'drop', 'resumed'):
        a, b = load(runs, name)
        assert all(torch.equal(a[k], b[k]) for k in a), f'{name}: ranks disagree'
    s = json.loads((runs / 'summary.json').read_text())
    assert s['world_size'] == 2 and s['steps_per_epoch'] == 2         # 40 samples / 2 ranks / (4 x 2)
    assert [r['step'] for r in s['history']] == [2, 4, 6]
    rows = [json.loads(l) for l in (runs / 'plain' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [2, 4, 6]                       # one writer: no duplicated rows


def test_ddp_equals_single_process_with_double_batch(runs):
    ddp = load(runs, 'plain')[0]
    m = W.model(0.0, init_seed=0)
    res = fit(m, W.Data(), W.config(runs / 'single', batch_size=8))
    assert res['world_size'] == 1 and res['steps_per_epoch'] == 2
    assert any(not torch.equal(v, W.model(0.0).state_dict()[k]) for k, v in m.state_dict().items())
    for k, v in m.state_dict().items():
        assert torch.allclose(v, ddp[k], rtol=0, atol=1e-6), k


def test_ddp_resume_is_exact(runs):
    drop, resumed = load(runs, 'drop')[0], load(runs, 'resumed')[0]
    assert all(torch.equal(drop[k], resumed[k]) for k in drop)
    ck = torch.load(runs / 'resumed' / 'checkpoint.pt', weights_only=True)
    assert ck['world_size'] == 2 and len(ck['rng']) == 2 and ck['step'] == 6
    assert not torch.equal(ck['rng'][0]['torch'], ck['rng'][1]['torch']), 'each rank keeps its own RNG stream'
