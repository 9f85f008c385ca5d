"""Worker of tests/test_ddp.py, launched by `python -m torch.distributed.run --nproc_per_node=2 --standalone`.

`ddp_worker.py OUT_DIR plain`: no dropout, `fit` joins and leaves the process group itself; each rank saves its
final weights to OUT_DIR/plain_rank{r}.pt.
`ddp_worker.py OUT_DIR resume`: the worker holds the process group; dropout; an uninterrupted run (drop_rank{r}.pt)
and a run stopped after 3 of 6 steps (mid-epoch) then resumed by a second `fit` (resumed_rank{r}.pt). Rank 0 writes
its checkpoints slowly here, so a rank that returned from `fit` before the file is on disk would resume from step 0.
(A process group cannot be re-created in the same process under torchrun, hence two launches.)
"""
import json, os, sys

import torch
import time

import torch.distributed as dist
from torch import nn

import rsrepro.train
from rsrepro.train import TrainConfig, fit


class Data(torch.utils.data.Dataset):
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 5, generator=g); self.y = self.x @ torch.randn(5, 1, generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'x': self.x[i], 'y': self.y[i]}


class Net(nn.Module):
    def __init__(self, p_drop=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(p_drop), nn.Linear(16, 1))
    def forward(self, b): return {'loss': ((self.net(b['x']) - b['y']) ** 2).mean()}


def config(out_dir, batch_size=4, **kw):
    "6 steps of grad_accum=2; 40 samples -> 20 per rank -> 5 micro-batches of 4 -> 2 steps per epoch."
    return TrainConfig(**{**dict(max_steps=6, batch_size=batch_size, grad_accum=2, lr=1e-2, warmup_steps=2,
                                 device='cpu', out_dir=str(out_dir), log_every=2, seed=3), **kw})


def model(p_drop=0.0, init_seed=0):
    torch.manual_seed(init_seed)
    return Net(p_drop)


if __name__ == '__main__':
    out, mode = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if mode == 'plain':
        m = model(0.0, init_seed=rank)            # rank-dependent init: DDP must broadcast rank 0's weights
        res = fit(m, Data(), config(f'{out}/plain'))
        assert not dist.is_initialized(), 'fit must leave the process group it created'
        torch.save(m.state_dict(), f'{out}/plain_rank{rank}.pt')
        if rank == 0:
            with open(f'{out}/summary.json', 'w') as f:
                json.dump({'world_size': res['world_size'], 'steps_per_epoch': res['steps_per_epoch'],
                           'history': res['history']}, f)
    else:
        dist.init_process_group('gloo')
        if rank == 0:
            save = rsrepro.train.atomic_torch_save
            rsrepro.train.atomic_torch_save = lambda *a, **k: (time.sleep(1.0), save(*a, **k))[1]
        m = model(0.1)
        fit(m, Data(), config(f'{out}/drop'))
        torch.save(m.state_dict(), f'{out}/drop_rank{rank}.pt')
        r1 = fit(model(0.1), Data(), config(f'{out}/resumed', stop_after=3))
        m = model(0.1, init_seed=99)
        r2 = fit(m, Data(), config(f'{out}/resumed'))
        assert r1['step'] == 3 and r2['resumed_from'] == 3 and r2['step'] == 6, (r1['step'], r2['resumed_from'])
        torch.save(m.state_dict(), f'{out}/resumed_rank{rank}.pt')
        assert dist.is_initialized(), 'fit must not leave a process group it did not create'
        dist.destroy_process_group()
    # Everything is saved and checked. Skip interpreter teardown: a gloo worker thread that outlives
    # finalization can abort the process there (pytorch/pytorch#179291), which says nothing about fit.
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
