"Tests of rsrepro.bench: exact FLOP counts, the benchmark table, the matmul peak."
import math

import pytest
import torch

from rsrepro.bench import BENCH_COLUMNS, bench, count_flops, format_bench, matmul_peak
from rsrepro.core import MODELS, RsreproError


def test_linear_flops_forward_and_backward():
    B, i, o = 8, 48, 24
    lin, x = torch.nn.Linear(i, o), torch.randn(B, i, requires_grad=True)
    assert count_flops(lin, x) == 2 * B * i * o
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * B * i * o
    # no input gradient: the backward is the weight gradient only
    assert count_flops(lambda: lin(x.detach()).sum().backward()) == 2 * 2 * B * i * o


def test_cpu_attention_is_counted():
    B, H, N, D = 2, 4, 16, 8
    q = torch.randn(B, H, N, D, requires_grad=True)
    fwd = 2 * (2 * B * H * N * N * D)                         # q k^T and attn v
    assert count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q) == fwd
    bwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert count_flops(bwd) == fwd + 5 * 2 * B * H * N * N * D  # torch's formula: 5 matmuls in the backward


class Standin(torch.nn.Module):
    "A stand-in MAE: a linear 'decoder' whose input needs no gradient."
    def __init__(self, img_size=16, in_chans=3):
        super().__init__(); self.f = torch.nn.Linear(in_chans * img_size * img_size, 32)
    def forward(self, b): return {'loss': self.f(b['image'].flatten(1)).pow(2).mean()}


if 'test_bench_standin' not in MODELS: MODELS.register('test_bench_standin')(Standin)


def test_bench_table_on_a_standin():
    df = bench(['test_bench_standin'], device='cpu', batch_size=4, img_size=16, in_chans=2, steps=2, warmup=1)
    assert list(df.columns) == BENCH_COLUMNS and len(df) == 1
    r = df.iloc[0]
    assert r['gflop_per_step'] * 1e9 == 4 * 4 * (2 * 16 * 16) * 32       # fwd 2BIO + weight grad 2BIO
    for c in ('step_time_s', 'images_per_s', 'achieved_tflops', 'peak_tflops', 'mfu', 'params_M'):
        assert r[c] > 0 and math.isfinite(r[c]), c
    assert r['images_per_s'] == pytest.approx(4 / r['step_time_s'])
    assert r['mfu'] == pytest.approx(r['achieved_tflops'] / r['peak_tflops'])
    assert r['dtype'] == 'fp32' and r['threads'] == torch.get_num_threads() and r['torch'] == torch.__version__
    assert 'test_bench_standin' in format_bench(df) and 'TFLOP/s' in format_bench(df)


def test_bench_real_mae_tiny_config():
    pytest.importorskip('rsrepro.mae')
    dfs = [bench(['mae_vit_tiny_patch16'], device='cpu', batch_size=b, img_size=32, in_chans=4, steps=1, warmup=1)
           for b in (1, 2)]
    a, b = dfs[0].iloc[0], dfs[1].iloc[0]
    assert b['gflop_per_step'] == pytest.approx(2 * a['gflop_per_step'], rel=1e-12)   # FLOPs linear in the batch
    assert a['gflop_per_step'] > 0 and a['images_per_s'] > 0 and 0 < a['mfu']
    assert a['in_chans'] == 4 and a['img_size'] == 32


def test_matmul_peak_and_errors():
    p = matmul_peak('cpu', n=128, iters=2)
    assert p > 0 and p == matmul_peak('cpu', n=128, iters=2)               # cached
    with pytest.raises(RsreproError, match='unknown model'):
        bench(['no_such_model'], device='cpu')
