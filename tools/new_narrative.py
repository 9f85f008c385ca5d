"""Create the first version of a narrative notebook (nbs/papers/<paper>/<table|figure>_<id>.ipynb) from the catalogue.

A new notebook shows the published numbers and states plainly that nothing is reproduced yet; the issue that
reproduces the table replaces its middle with the experiment. Existing notebooks are never overwritten.
Usage: .venv/bin/python tools/new_narrative.py [--paper P] [--force-missing-only]
"""
import argparse, hashlib, sys
from pathlib import Path
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rsrepro.published import catalogue, citation  # noqa: E402
from rsrepro.runner import NOT_REPRODUCED  # noqa: E402

PARAMS = '''profile = 'smoke'      # 'smoke': a few steps on real samples, any CPU, minutes | 'full': the paper's protocol (CUDA, full data)
data_root = None       # folder holding the full datasets (default: $RSREPRO_DATA)
device = 'auto'        # 'auto' (CUDA when there is one) | 'cpu' | 'cuda'
seed = 0
out_dir = 'results'    # where result records, figures and executed notebooks go'''

def notebook(c) -> nbformat.NotebookNode:
    paper, kind, tid, title = c['paper'], c['kind'], str(c['id']), c['title']
    cite = citation(paper)
    head = f"# {paper} · {kind.capitalize()} {tid}\n\n> {title}\n\nPaper: {cite}"
    cells = [new_code_cell(PARAMS, metadata={'tags': ['parameters']}), new_markdown_cell(head)]
    if c['status'] == 'missing_from_extraction':
        cells.append(new_markdown_cell(
            "**This table was lost in the text extraction of the paper.** Its numbers are not transcribed here and are "
            "never invented; `rsrepro.published.load()` raises for it. The experiment can still be run when its "
            "reproduction lands, but there is no published number to stand beside ours."))
    elif kind == 'table':
        cells += [new_markdown_cell("## Published\n\nThe numbers as printed in the paper (`rsrepro.published`)."),
                  new_code_cell(f"from rsrepro import published\npublished.table({paper!r}, {tid!r})")]
    cells.append(new_markdown_cell(
        f"## Reproduction\n\n**{NOT_REPRODUCED}.** This page is in place so that the site lists every table and "
        "figure of the paper; the experiment is added by the issue that reproduces this paper. "
        "Until then nothing on this page is a reproduced number."))
    if kind == 'table' and c['status'] == 'published':
        cells += [new_markdown_cell("## Published beside reproduced"),
                  new_code_cell(f"from rsrepro.results import report\nreport({paper!r}, {tid!r}, out_dir=out_dir, profile=profile)")]
    for i, cell in enumerate(cells):  # stable ids: regenerating a page never churns the diff
        cell['id'] = hashlib.sha1(f'{paper}/{kind}_{tid}:{i}'.encode()).hexdigest()[:8]
    nb = new_notebook(cells=cells)
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3 (rsrepro)', 'language': 'python'}
    nb.metadata['language_info'] = {'name': 'python'}
    return nb

def main(argv=None):
    ap = argparse.ArgumentParser(); ap.add_argument('--paper'); a = ap.parse_args(argv)
    cat = catalogue(a.paper)
    for _, c in cat.iterrows():
        if not isinstance(c['notebook'], str) or not c['notebook']: continue
        dest = ROOT/c['notebook']
        if dest.exists(): continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook(c), dest)
        print('created', dest.relative_to(ROOT))

if __name__ == '__main__': main()
