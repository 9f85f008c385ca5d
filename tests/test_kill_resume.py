"""kill -9 and resume: `fit` and `rsrepro reproduce` killed with SIGKILL at chosen moments end as if never interrupted.

The kill moments come from a seeded RNG and are taken when the child says it reached them (a line on its stdout, a
file), so the test is not timing-dependent: the child is killed *after* a given step (whatever it does next: a step,
a metrics write, a checkpoint rotation) or *in the middle* of writing a given checkpoint."""
import csv, json, os, random, signal, subprocess, sys, textwrap, time, warnings
from pathlib import Path

import psutil
import pytest
import torch

from rsrepro.core import DataFormatError, RsreproError
from rsrepro.train import (CKPT_NAME, CKPT_PREV_NAME, TRAIN_LOG, TrainConfig, fit, load_checkpoint,
                           resume_checkpoint)

TIMING = ('samples_per_s', 'elapsed_s')          # the only metrics columns that depend on the clock

# ---------------------------------------------------------------------------------------------------------------
# the training child: a tiny MLP with dropout, shuffled data, grad_accum=2, a checkpoint every 2 steps

CHILD = textwrap.dedent('''
    import io, sys, time
    from pathlib import Path
    import torch
    import rsrepro.train as T
    from rsrepro.core import atomic_write

    torch.set_num_threads(1)
    out, mode = sys.argv[1], sys.argv[2]

    sys.path.insert(0, TESTS_DIR)
    from toy_fit import XY, MLP

    if mode.startswith('midsave:'):        # write checkpoint <k> half-way, say so, and wait to be killed
        target, real = int(mode.split(':')[1]), T.atomic_torch_save
        def slow_save(obj, path):
            if obj.get('step') != target: return real(obj, path)
            buf = io.BytesIO(); torch.save(obj, buf); data = buf.getvalue()
            with atomic_write(path, 'wb') as f:
                f.write(data[:len(data) // 2]); f.flush()
                print('MIDSAVE', target, flush=True); time.sleep(120)
                f.write(data[len(data) // 2:])
            return Path(path)
        T.atomic_torch_save = slow_save

    torch.manual_seed(0)
    m = MLP()
    cfg = T.TrainConfig(max_steps=12, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=3, log_every=3, ckpt_every=2,
                        clip_grad=1.0, seed=7, device='cpu', out_dir=out)
    T.fit(m, XY(), cfg, on_step=lambda step, info: print('STEP', step, flush=True))
    torch.save(m.state_dict(), Path(out) / 'final.pt')
    print('DONE', flush=True)
''')
TOTAL = 12


def _child(script: Path, out: Path, mode: str = 'run') -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen([sys.executable, str(script), str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _run_until(p: subprocess.Popen, marker: str | None, timeout: float = 120) -> bool:
    "Read the child's lines until `marker` (then SIGKILL it: True) or its end (False)."
    t0 = time.time()
    for line in p.stdout:
        if marker is not None and line.strip() == marker:
            p.send_signal(signal.SIGKILL); p.wait(); p.stdout.close()
            return True
        assert time.time() - t0 < timeout, f'child did not reach {marker!r} in {timeout} s'
    p.wait(); p.stdout.close()
    assert p.returncode == 0, f'child failed with exit status {p.returncode}'
    return False


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in path.read_text().splitlines()]


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as f: return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / 'child.py'; script.write_text(CHILD.replace('TESTS_DIR', repr(str(Path(__file__).parent))))
    ref, run = tmp_path / 'ref', tmp_path / 'run'
    assert not _run_until(_child(script, ref), None)
    rng = random.Random(1234)
    kills = []
    for i in range(4):                                   # alternate: after a step / in the middle of a checkpoint write
        done = load_checkpoint(run / CKPT_NAME)['step'] if (run / CKPT_NAME).exists() else 0
        if i % 2 == 0:
            k = rng.randrange(done + 1, TOTAL + 1)
            mode, marker = 'run', f'STEP {k}'
        else:
            k = rng.choice([s for s in range(2, TOTAL + 1, 2) if s > done])
            mode, marker = f'midsave:{k}', f'MIDSAVE {k}'
        assert _run_until(_child(script, run, mode), marker), f'kill {i} at {marker!r} never happened'
        kills.append(marker)
        # what a kill leaves is always consistent: both checkpoints read, the metrics files parse, no duplicated row
        latest = load_checkpoint(run / CKPT_NAME)
        if (run / CKPT_PREV_NAME).exists(): assert load_checkpoint(run / CKPT_PREV_NAME)['step'] <= latest['step']
        if marker.startswith('MIDSAVE'):
            assert latest['step'] == k - 2, 'a checkpoint killed while being written never replaces the last one'
            assert list(run.glob(f'.{CKPT_NAME}.*.tmp')), 'the half-written checkpoint stayed a temporary file'
        if (run / 'metrics.jsonl').exists():
            steps = [r['step'] for r in _rows(run / 'metrics.jsonl')]
            assert steps == sorted(set(steps)) and len(_csv_rows(run / 'metrics.csv')) == len(steps)
    assert not _run_until(_child(script, run), None)     # resume to the end
    assert _same_state(torch.load(run / 'final.pt'), torch.load(ref / 'final.pt')), f'weights differ after {kills}'
    assert load_checkpoint(run / CKPT_NAME)['step'] == TOTAL and not (run / CKPT_PREV_NAME).exists()
    # metrics: the same rows with the same values (clock columns aside), none lost, none twice
    assert _rows(run / 'metrics.jsonl') == _rows(ref / 'metrics.jsonl')
    assert [r['step'] for r in _rows(ref / 'metrics.jsonl')] == [3, 6, 9, 12]
    assert _csv_rows(run / 'metrics.csv') == _csv_rows(ref / 'metrics.csv')
    assert not [p.name for p in run.glob('.*.tmp')], 'a resumed run clears what killed writers left'


# ---------------------------------------------------------------------------------------------------------------
# a truncated / corrupt / missing latest checkpoint, in process

from toy_fit import MLP, XY  # noqa: E402 (tests/ is on sys.path under pytest)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp('ref')
    m, _ = _train(out)
    return m.state_dict(), _rows(out / 'metrics.jsonl')


def _train(out, seed=0, on_step=None, resume=True, **kw):
    torch.manual_seed(seed); m = MLP()
    c = TrainConfig(**{**dict(max_steps=12, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=3, log_every=3,
                              ckpt_every=2, seed=7, device='cpu', out_dir=str(out)), **kw})
    return m, fit(m, XY(), c, on_step=on_step, resume=resume)


def _stopped(out):
    "A run stopped after 7 steps: latest checkpoint = step 7, previous = step 6."
    _train(out, stop_after=7)
    assert load_checkpoint(out / CKPT_NAME)['step'] == 7 and load_checkpoint(out / CKPT_PREV_NAME)['step'] == 6


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'missing'])
def test_bad_latest_checkpoint_resumes_from_previous(reference, tmp_path, damage):
    _stopped(tmp_path)
    latest = tmp_path / CKPT_NAME
    if damage == 'truncate': latest.write_bytes(latest.read_bytes()[:len(latest.read_bytes()) // 3])
    elif damage == 'garbage': latest.write_bytes(os.urandom(4096))
    else: latest.unlink()
    prev_seen = {}
    def look(step, info):                       # the good previous checkpoint is kept, the bad latest never rotated in
        if step in (8, 10): prev_seen[step] = load_checkpoint(tmp_path / CKPT_PREV_NAME)['step']
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        m, res = _train(tmp_path, seed=3, on_step=look)
    msgs = [str(x.message) for x in w if str(latest) in str(x.message)]
    assert len(msgs) == 1 and 'resuming from the previous checkpoint' in msgs[0] and str(tmp_path / CKPT_PREV_NAME) in msgs[0]
    assert ('does not exist' if damage == 'missing' else 'cannot be read') in msgs[0]
    assert str(latest) in (tmp_path / TRAIN_LOG).read_text(), 'the warning is in the run log too'
    assert res['resumed_from'] == 6 and prev_seen == {8: 6, 10: 8}
    assert _same_state(m.state_dict(), reference[0]), 'weights differ from the uninterrupted run'
    assert _rows(tmp_path / 'metrics.jsonl') == reference[1]


def test_both_checkpoints_bad_is_a_clear_error(tmp_path):
    _stopped(tmp_path)
    latest, prev = tmp_path / CKPT_NAME, tmp_path / CKPT_PREV_NAME
    latest.write_bytes(latest.read_bytes()[:500]); prev.write_bytes(b'garbage')
    with pytest.raises(DataFormatError) as e: _train(tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, RsreproError) and str(latest) in msg and str(prev) in msg and 'neither' in msg
    latest.unlink()
    with pytest.raises(DataFormatError, match='does not exist'): resume_checkpoint(tmp_path)
    prev.unlink()
    assert resume_checkpoint(tmp_path) == (None, None)


def test_starting_over_drops_a_stale_previous_checkpoint(tmp_path):
    _stopped(tmp_path)
    seen = {}
    _train(tmp_path, seed=1, resume=False, stop_after=3,
           on_step=lambda s, i: seen.setdefault(s, (tmp_path / CKPT_PREV_NAME).exists()))
    assert seen[2] is False, 'the old run\'s previous checkpoint is gone from the first save of the new run'
    assert load_checkpoint(tmp_path / CKPT_PREV_NAME)['step'] == 2 and load_checkpoint(tmp_path / CKPT_NAME)['step'] == 3


# ---------------------------------------------------------------------------------------------------------------
# rsrepro reproduce killed mid-page

PAGE = '''
import os, time
from pathlib import Path
from rsrepro.core import atomic_write
from rsrepro.results import ResultRecorder
rec = ResultRecorder(out_dir, 'imim', '{table}', profile, 'synthetic test page', seed)
rec.add('row a', 'AP', 0.25 + seed)
with atomic_write(Path(out_dir)/'figures'/'imim'/'table_{table}.png', 'wb') as f: f.write(b'not really a png {table}')
Path(out_dir, 'runs', 'imim').mkdir(parents=True, exist_ok=True)
Path(out_dir, 'runs', 'imim', 'trained_{table}.txt').write_text('a finished training run')
if os.environ.get('KILL_TABLE') == '{table}':
    Path(os.environ['KILL_SIGNAL']).write_text('half-way')
    time.sleep(120)
rec.add('row b', 'AP', 0.5)
'''


def _page(path: Path, table: str):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    cells = [new_code_cell("profile = 'smoke'\ndata_root = None\ndevice = 'cpu'\nseed = 0\nout_dir = 'results'",
                           metadata={'tags': ['parameters']}), new_code_cell(PAGE.format(table=table))]
    nb = new_notebook(cells=cells)
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    path.parent.mkdir(parents=True, exist_ok=True); nbformat.write(nb, path)


def _kill_tree(pid: int):
    "SIGKILL a process and everything it started (the papermill kernel runs in its own session)."
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try: p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=30)


def _records(out: Path) -> dict:
    from rsrepro.results import load_results
    df = load_results(out).drop(columns=['created']).sort_values(['table', 'row']).reset_index(drop=True)
    return df.to_dict('records')


def test_reproduce_killed_mid_page_leaves_nothing_partial_and_completes(tmp_path):
    from rsrepro.runner import reproduce
    root = tmp_path / 'repo'
    root.mkdir(); (root / 'settings.ini').write_text('[DEFAULT]\nlib_name = rsrepro\n')
    _page(root / 'nbs/papers/imim/table_I.ipynb', 'I')
    _page(root / 'nbs/papers/imim/table_II.ipynb', 'II')
    ref, out = tmp_path / 'ref', tmp_path / 'out'
    s = reproduce(out=ref, root=root, device='cpu', progress=False)
    assert s['n_ok'] == 2 and len(_records(ref)) == 4

    signal_file = tmp_path / 'half-way'
    env = dict(os.environ, KILL_SIGNAL=str(signal_file), KILL_TABLE='II')
    code = f'from rsrepro.runner import reproduce; reproduce(out={str(out)!r}, root={str(root)!r}, device="cpu", progress=False)'
    p = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not signal_file.exists():                   # table_I passes, table_II is killed half-way
        assert p.poll() is None and time.time() - t0 < 120, 'the runner ended before the page said it was half-way'
        time.sleep(0.1)
    _kill_tree(p.pid)
    # table_II was killed half-way: nothing of it is in the results, and nothing claims it ran; table_I is complete
    assert sorted(p.name for p in (out / 'records/imim').iterdir()) == ['table_I.csv']
    assert sorted(p.name for p in (out / 'figures/imim').iterdir()) == ['table_I.png']
    assert [p.name for p in (out / 'notebooks/papers/imim').iterdir()] == ['table_I.ipynb']
    assert not list(out.rglob('.running.*'))
    runs = json.loads((out / 'summary.json').read_text())['runs']
    assert [(r['notebook'], r['status']) for r in runs] == [('papers/imim/table_I.ipynb', 'ok')]
    assert (out / 'runs/imim/trained_II.txt').is_file(), 'training runs are shared at once: a kill keeps them'
    # the rerun discards the staged half-page, redoes it, and ends as the uninterrupted run
    s = reproduce(out=out, root=root, device='cpu', progress=False)
    assert s['n_ok'] == 2 and s['n_kept'] == 1, 'table_I is kept, table_II reruns'
    assert _records(out) == _records(ref)
    for f in ('figures/imim/table_I.png', 'figures/imim/table_II.png'):
        assert (out / f).read_bytes() == (ref / f).read_bytes()
    nbs = sorted(p.relative_to(out).as_posix() for p in (out / 'notebooks').rglob('*.ipynb'))
    assert nbs == ['notebooks/papers/imim/table_I.ipynb', 'notebooks/papers/imim/table_II.ipynb']
    assert str(out / '.staging') not in (out / 'notebooks/papers/imim/table_I.ipynb').read_text()
    assert [d.name for d in (out / '.staging').iterdir() if d.is_dir()] == []


def test_a_commit_interrupted_half_way_is_finished(tmp_path):
    "A page killed while its (complete) outputs were being moved: the next run finishes the moves from COMMIT."
    from rsrepro.runner import STAGING, recover_staging
    out = tmp_path / 'out'
    st = out / STAGING / 'papers__imim__table_I'
    (st / 'out/records/imim').mkdir(parents=True)
    (st / 'out/records/imim/table_I.csv').write_text('complete\n')
    (out / 'figures/imim').mkdir(parents=True); (out / 'figures/imim/table_I.png').write_bytes(b'moved already')
    (st / 'COMMIT').write_text(json.dumps({'notebook': 'papers/imim/table_I.ipynb', 'status': 'ok',
                                           'moves': [['out/figures/imim/table_I.png', 'figures/imim/table_I.png'],
                                                     ['out/records/imim/table_I.csv', 'records/imim/table_I.csv']]}))
    (out / STAGING / 'papers__imim__table_II' / 'out').mkdir(parents=True)     # a page killed while running
    msgs = recover_staging(out)
    assert (out / 'records/imim/table_I.csv').read_text() == 'complete\n'
    assert (out / 'figures/imim/table_I.png').read_bytes() == b'moved already'
    assert not list((out / STAGING).iterdir())
    assert any('committed' in m and 'table_I' in m for m in msgs) and any('discarded' in m and 'table_II' in m for m in msgs)
