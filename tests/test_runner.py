"""The runner, the CLI and the drift check, on small notebook trees built here (fast)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from rsrepro.cli import main
from rsrepro.runner import find_notebooks, reproduce

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _nb(path: Path, *sources: str):
    cells = [new_code_cell("profile = 'smoke'\ndata_root = None\ndevice = 'cpu'\nseed = 0\nout_dir = 'results'",
                           metadata={'tags': ['parameters']})]
    cells += [new_code_cell(s) for s in sources]
    nb = new_notebook(cells=cells)
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path/'repo'
    root.mkdir(); (root/'settings.ini').write_text('[DEFAULT]\nlib_name = rsrepro\n')
    _nb(root/'nbs/papers/imim/table_I.ipynb', "from pathlib import Path\n"
        "Path(out_dir, 'ran_I.txt').write_text(f'{profile} {device} {seed}')")
    _nb(root/'nbs/papers/imim/table_II.ipynb', "x = 1", "raise ValueError('boom in table II')", "x = 2")
    _nb(root/'nbs/papers/mutdet/table_1.ipynb', "from pathlib import Path\nPath(out_dir, 'ran_m.txt').write_text('m')")
    return root


def test_failure_is_reported_and_others_still_run(tree, tmp_path):
    out = tmp_path/'out'
    s = reproduce(profile='smoke', out=out, root=tree, seed=7, progress=False)
    status = {r['notebook']: r for r in s['runs']}
    assert status['papers/imim/table_I.ipynb']['status'] == 'ok'
    assert status['papers/mutdet/table_1.ipynb']['status'] == 'ok', 'a failure must not stop the other notebooks'
    bad = status['papers/imim/table_II.ipynb']
    assert bad['status'] == 'failed' and 'boom in table II' in bad['error']
    assert bad['failed_cell'] == 2, 'the failing cell index (0 = parameters) is reported'
    assert (out/'ran_I.txt').read_text() == 'smoke cpu 7', 'parameters are injected'
    assert (out/'notebooks/papers/imim/table_II.ipynb').exists(), 'the failed executed notebook is kept'
    assert json.loads((out/'summary.json').read_text())['n_failed'] == 1
    assert 'boom in table II' in (out/'summary.md').read_text()
    assert not list(out.rglob('.running.*')), 'no temporary notebook is left behind'


def test_cli_exit_status_names_the_failure(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tree)
    rc = main(['reproduce', '--paper', 'imim', '--out', str(tmp_path/'o')])
    err = capsys.readouterr().err
    assert rc == 1 and 'table_II' in err and 'cell 2' in err


def test_only_and_kept_unless_inputs_change(tree, tmp_path, monkeypatch, capsys):
    "A page that passed is kept while its notebook, parameters and library are unchanged; any change, or --force, reruns it."
    import rsrepro.runner as runner
    out = tmp_path/'o2'
    assert [p.name for p in find_notebooks(tree, only=['table_1'])] == ['table_1.ipynb']
    with pytest.raises(Exception, match='no notebook'): find_notebooks(tree, only=['table_IX'])
    marker = out/'ran_I.txt'
    def run(**kw):
        if marker.exists(): marker.unlink()
        s = reproduce(out=out, root=tree, only=['imim/table_I'], progress=False, **kw)
        return marker.exists(), s
    ran, s = run()
    assert ran and marker.read_text() == 'smoke cpu 0' and not s['runs'][0]['kept']
    ran, s = run()
    assert not ran and s['runs'][0]['kept'] and s['n_ok'] == 1 and s['n_kept'] == 1, 'unchanged: kept, not rerun'
    assert 'kept   papers/imim/table_I.ipynb' in capsys.readouterr().out
    assert '(kept from' in (out/'summary.md').read_text()
    assert run(force=True)[0], '--force reruns it'
    assert run(seed=1)[0] and marker.read_text() == 'smoke cpu 1', 'changed parameters rerun it'
    assert not run(seed=1)[0]
    monkeypatch.setattr(runner, 'code_version', lambda: 'another-library')
    assert run(seed=1)[0], 'a changed library reruns it'
    nb = tree/'nbs/papers/imim/table_I.ipynb'
    nb.write_text(nb.read_text().replace('ran_I', 'ran_I'), encoding='utf-8')
    assert not run(seed=1)[0]
    nb.write_text(nb.read_text() + '\n', encoding='utf-8')
    assert run(seed=1)[0], 'a changed notebook reruns it'
    reproduce(out=out, root=tree, only=['mutdet/table_1'], seed=1, progress=False)
    kept = {r['notebook'] for r in json.loads((out/'summary.json').read_text())['runs']}
    assert kept == {'papers/imim/table_I.ipynb', 'papers/mutdet/table_1.ipynb'}, 'a partial run keeps the others in the summary'


def test_a_failed_page_is_always_rerun(tree, tmp_path):
    out = tmp_path/'o3'
    s1 = reproduce(out=out, root=tree, only=['imim/table_II'], progress=False)
    s2 = reproduce(out=out, root=tree, only=['imim/table_II'], progress=False)
    assert s1['runs'][0]['status'] == s2['runs'][0]['status'] == 'failed' and not s2['runs'][0]['kept']
    assert s2['runs'][0]['finished'] != '' and s2['n_failed'] == 1


def test_published_cli_csv(capsys):
    assert main(['published', '--format', 'csv']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == 'paper,table,row,column,value'
    papers = {l.split(',')[0] for l in lines[1:]}
    assert papers == {'imim', 'incomplete', 'crossscale', 'mutdet'}


def test_cli_error_is_one_line(capsys):
    assert main(['published', '--paper', 'crossscale', '--table', '4']) == 2
    err = capsys.readouterr().err
    assert 'missing' in err.lower() and 'Traceback' not in err


def _copy_repo(dst: Path):
    for name in ['settings.ini', 'setup.py', 'Makefile', 'pyproject.toml']:
        if (ROOT/name).exists(): shutil.copy2(ROOT/name, dst/name)
    for d in ['nbs/api', 'rsrepro']:
        shutil.copytree(ROOT/d, dst/d, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))


def test_drift_check_fails_when_library_and_notebooks_disagree(tmp_path):
    _copy_repo(tmp_path)
    run = lambda: subprocess.run(['make', '-s', 'check-drift', f'BIN={BIN}'], cwd=tmp_path, capture_output=True, text=True)
    ok = run()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    core = tmp_path/'rsrepro/core.py'
    core.write_text(core.read_text().replace('def seed_everything', '# hand edit\ndef seed_everything'))
    bad = run()
    assert bad.returncode != 0 and 'rsrepro/core.py' in bad.stdout, bad.stdout + bad.stderr
    assert run().returncode == 0, 'the check rewrote the library from the notebook'
    nb = tmp_path/'nbs/api/00_core.ipynb'
    d = json.loads(nb.read_text()); d['cells'][0]['metadata']['scrolled'] = True
    nb.write_text(json.dumps(d))
    bad = run()
    assert bad.returncode != 0 and '00_core.ipynb' in bad.stdout, 'an unclean notebook is drift too'


def test_tables_lists_every_catalogued_item_honestly(capsys):
    from rsrepro.published import catalogue
    from rsrepro.runner import status_table
    df = status_table('/nonexistent-results')
    assert len(df) == len(catalogue())
    st = dict(zip(zip(df.paper, df.kind, df.id), df.status))
    assert st[('crossscale', 'table', '4')] in ('not reproduced yet', 'not run') or 'reproduced' in st[('crossscale', 'table', '4')]
    assert not st[('crossscale', 'table', '5')].startswith('reproduced'), 'a lost table with no rows is never "reproduced"'
    assert st[('crossscale', 'table', '1')] == 'no result to reproduce'  # pseudocode
    assert all(not s.startswith('ran ok') for s in df.status), 'a page that only shows published numbers is not a run'
    assert main(['tables']) == 0 and 'imim' in capsys.readouterr().out
