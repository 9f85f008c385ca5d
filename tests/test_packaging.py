"""`pip install .` / a built wheel: the published numbers ship inside it and the `rsrepro` console script is declared."""
import os, subprocess, sys, zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_data_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                        '-w', str(tmp_path/'dist'), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    whl, = (tmp_path/'dist').glob('rsrepro-*.whl')
    names = zipfile.ZipFile(whl).namelist()
    assert 'rsrepro/resources/published.csv' in names and 'rsrepro/resources/catalogue.csv' in names
    ep = next(n for n in names if n.endswith('entry_points.txt'))
    assert 'rsrepro = rsrepro.cli:main' in zipfile.ZipFile(whl).read(ep).decode()
    # Installed from the wheel alone (outside the checkout), the library answers from its packaged data.
    target = tmp_path/'site'
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(whl)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    r = subprocess.run([sys.executable, '-c', 'import rsrepro, sys; print(rsrepro.__file__); '
                        'from rsrepro.cli import main; sys.exit(main(["published", "--format", "csv"]))'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    first, *rows = r.stdout.strip().splitlines()
    assert first.startswith(str(target)), 'imported the installed copy, not the checkout'
    assert rows[0] == 'paper,table,row,column,value' and len(rows) - 1 == 955
    # Outside a checkout the runner says what it needs instead of failing obscurely.
    r = subprocess.run([sys.executable, '-c', 'import sys; from rsrepro.cli import main; sys.exit(main(["reproduce"]))'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and 'checkout' in r.stderr
