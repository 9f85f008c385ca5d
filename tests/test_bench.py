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


# ---- every method, the variants, the side-by-side with the official MAE, the GPU script ----
import os, subprocess, sys, textwrap
from pathlib import Path

from rsrepro.bench import (BENCH_METHODS, CUDA_ONLY, VARIANTS, bench_reference, bench_variants, device_slug,
                           format_reference, load_reference_mae)
from rsrepro.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_every_method_of_the_papers_is_benched():
    papers = {m.paper for m in BENCH_METHODS.values()}
    assert {'reference', 'imim', 'incomplete', 'crossscale'} <= papers
    assert {'mae', 'imim_conventional', 'imim_interactive', 'incomplete', 'crossscale'} <= set(BENCH_METHODS)


@pytest.mark.parametrize('name', ['imim_interactive', 'incomplete', 'crossscale'])
def test_a_method_step_runs_and_counts_flops(name):
    r = bench([name], device='cpu', batch_size=1, steps=1, warmup=1).iloc[0]
    m = BENCH_METHODS[name]
    assert r['paper'] == m.paper and r['img_size'] == m.img_size and r['gflop_per_step'] > 1 and r['images_per_s'] > 0


def test_variants_each_switch_alone_and_together():
    assert set(VARIANTS) == {'fp32', 'bf16', 'compile', 'fused_adamw', 'flash', 'all'}
    assert VARIANTS['all'] == {k: v for d in VARIANTS.values() for k, v in d.items()}   # 'all' is every switch
    df = bench_variants(['test_bench_standin'], skip_cuda_only=True, device='cpu', batch_size=2, img_size=16,
                        in_chans=3, steps=1)
    assert list(df['variant']) == ['fp32', 'fused_adamw']                  # bf16, compile and flash need CUDA
    assert (df['dtype'] == 'fp32').all() and not any(k in VARIANTS['fused_adamw'] for k in CUDA_ONLY)
    assert df['gflop_per_step'].nunique() == 1                             # a switch never changes the work
    md = format_bench(df, 'md')
    assert md.count('| fp32 | fp32 |') == 1 and md.count('| fused_adamw | fp32 |') == 1 and '|---|' in md
    with pytest.raises(RsreproError, match='unknown variant'): bench_variants(['mae'], ['fast'])
    with pytest.raises(RsreproError, match='needs CUDA'): bench_variants(['mae'], ['bf16', 'flash'], skip_cuda_only=True)


def test_device_slug_is_a_file_name():
    s = device_slug('cpu')
    assert s.startswith('cpu_') and all(c.isalnum() or c == '_' for c in s)


STUB = '''
"""A stand-in for facebookresearch/mae's models_mae.py: its constructor and forward signature, the timm Block with
qk_scale and np.float (util/pos_embed.py) that the real file needs shims for."""
import torch, numpy as np
from timm.models.vision_transformer import Block
from util.pos_embed import grid

class MaskedAutoencoderViT(torch.nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4., norm_layer=None,
                 norm_pix_loss=False):
        super().__init__()
        assert (img_size, patch_size, embed_dim, depth, decoder_embed_dim, decoder_depth) == (224, 16, 192, 12, 128, 2)
        assert norm_pix_loss and norm_layer is not None
        self.p, self.grid = patch_size, grid(img_size // patch_size)
        self.embed = torch.nn.Linear(patch_size * patch_size * in_chans, embed_dim)
        self.block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
        self.pred = torch.nn.Linear(embed_dim, patch_size * patch_size * in_chans)
    def forward(self, imgs, mask_ratio=0.75):
        x = imgs.unfold(2, self.p, self.p).unfold(3, self.p, self.p).flatten(2, 3).permute(0, 2, 1, 3, 4).flatten(2)
        pred = self.pred(self.block(self.embed(x)))
        mask = torch.ones(x.shape[:2])
        return ((pred - x) ** 2).mean(), pred, mask
'''


def _stub_reference(d: Path) -> Path:
    (d/'util').mkdir(parents=True)
    (d/'models_mae.py').write_text(textwrap.dedent(STUB))
    (d/'util'/'__init__.py').write_text('')
    (d/'util'/'pos_embed.py').write_text('import numpy as np\ndef grid(n): return np.arange(n, dtype=np.float)\n')
    return d


def test_reference_side_by_side_with_a_stub_snapshot(tmp_path):
    ref = _stub_reference(tmp_path/'mae')
    model, shims = load_reference_mae(ref)
    assert any('np.float' in s for s in shims) and any('qk_scale' in s for s in shims)
    import numpy as np
    assert not hasattr(np, 'float')                                        # the alias is gone again after building
    r = bench_reference(ref, device='cpu', batch_size=2, steps=2, warmup=1)
    assert set(r['step_time_s']) == {'rsrepro', 'official'}
    assert r['ratio'] == pytest.approx(r['step_time_s']['official'] / r['step_time_s']['rsrepro'])
    assert r['gflop_per_step']['rsrepro'] > r['gflop_per_step']['official'] > 0   # the stub is one block, ours 14
    text, md = format_reference(r), format_reference(r, 'md')
    assert 'ratio' in text and '| official |' in md and '| rsrepro |' in md and 'Ratio' in md


def test_reference_refuses_a_folder_that_is_not_the_official_repo(tmp_path):
    with pytest.raises(RsreproError, match='not a facebookresearch/mae snapshot'): load_reference_mae(tmp_path)


def test_cli_bench_md_with_reference(tmp_path, capsys):
    ref, out = _stub_reference(tmp_path/'mae'), tmp_path/'perf'/'bench.md'
    assert main(['bench', '--device', 'cpu', '--models', 'test_bench_standin', '--img-size', '16', '--batch-size', '2',
                 '--steps', '1', '--reference', str(ref), '--reference-batch-size', '2', '--format', 'md',
                 '--out', str(out)]) == 0
    text = out.read_text()
    assert '| official |' in text and '| test_bench_standin |' in text and text in capsys.readouterr().out + '\n'


@pytest.mark.skipif(sys.platform != 'linux', reason='bash script')
def test_gpu_script_runs_on_cpu(tmp_path):
    ref = _stub_reference(tmp_path/'mae')
    env = {**os.environ, 'BENCH_OUT': str(tmp_path/'out'), 'PYTHON': sys.executable}
    p = subprocess.run(['bash', str(REPO/'bench'/'gpu.sh'), '--cpu', '--reference', str(ref)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = tmp_path/'out'
    sw, methods, reference = ((out/f).read_text() for f in ('switches.md', 'methods.md', 'reference.md'))
    assert '| fp32 | fp32 | mae |' in sw and '| fused_adamw | fp32 | imim_interactive |' in sw and 'flash' not in sw
    assert all(f'| {m} |' in methods for m in BENCH_METHODS)
    assert reference.count('| official |') == 2 and 'switches: fused AdamW' in reference
    help_ = subprocess.run(['bash', str(REPO/'bench'/'gpu.sh'), '--help'], capture_output=True, text=True)
    assert 'What it measures' in help_.stdout and 'MFU' in help_.stdout
