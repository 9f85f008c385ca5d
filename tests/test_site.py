"""The site: stage executed notebooks, render `_quarto.yml` with the pure-Python renderer, check pages and links.

One small project (the repository's own `_quarto.yml`, `index.qmd` and README, with synthetic notebooks) is built once
per module; `table_I` of imim is executed for real with nbclient (a matplotlib PNG and a pandas table). A second test
builds the repository itself against an empty results folder.
"""
import html.parser, json, re, shutil
from pathlib import Path

import nbformat
import pytest

from rsrepro.core import RsreproError
from rsrepro.site import NOT_EXECUTED, build_site, check_site, render, sidebar, site_pages, stage

REPO = Path(__file__).resolve().parents[1]
new_md, new_code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

NARRATIVE = ['papers/imim/table_IV.ipynb', 'papers/imim/table_I.ipynb', 'papers/imim/table_II.ipynb',
             'papers/imim/figure_2.ipynb', 'papers/mutdet/table_10.ipynb', 'papers/mutdet/table_2.ipynb',
             'tutorials/mae_sentinel2.ipynb']
API = ['api/00_core.ipynb', 'api/10_site.ipynb']


def _write_nb(path: Path, title: str, *cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    params = new_code("profile = 'smoke'\nseed = 0")
    params.metadata['tags'] = ['parameters']
    nbformat.write(nbformat.v4.new_notebook(cells=[new_md(f'# {title}\n\n> what {title} shows'), params, *cells],
                                            metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3',
                                                                     'language': 'python'}}), path)


class _Links(html.parser.HTMLParser):
    "Collect the hrefs of <a> inside <nav id='sidebar'>."
    def __init__(self):
        super().__init__(); self.depth, self.hrefs = 0, []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'nav' and a.get('id') == 'sidebar': self.depth = 1
        elif tag == 'nav' and self.depth: self.depth += 1
        if tag == 'a' and self.depth: self.hrefs.append(a['href'])
    def handle_endtag(self, tag):
        if tag == 'nav' and self.depth: self.depth -= 1


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    nbclient = pytest.importorskip('nbclient')
    root = tmp_path_factory.mktemp('proj')
    for f in ('_quarto.yml', 'index.qmd', 'README.md'): shutil.copy(REPO/f, root/f)
    shutil.copytree(REPO/'bench', root/'bench')               # the performance page and its tables
    (root/'README.md').write_text((root/'README.md').read_text() + '\n\nSee [Table I](nbs/papers/imim/table_I.ipynb).\n')
    for rel in NARRATIVE + API:
        stem = Path(rel).stem
        kind, _, ident = stem.partition('_')
        _write_nb(root/'nbs'/rel, f'{kind.capitalize()} {ident}' if rel.startswith('papers') else ident,
                  new_code('#| export\ndef f(): return 1' if rel.startswith('api') else 'x = 1'),
                  new_code('#| hide\nsecret_cell = 1'))
    # the executed copy of imim Table I, written where the runner writes it
    src = nbformat.read(root/'nbs/papers/imim/table_I.ipynb', as_version=4)
    src.cells += [
        new_md('## Ours beside the published numbers'),
        new_code("import matplotlib.pyplot as plt, pandas as pd\n"
                 "fig, ax = plt.subplots(figsize=(3, 2)); ax.bar(['published', 'ours'], [41.3, 12.5]); plt.show()"),
        new_code("pd.DataFrame({'method': ['IMIM', 'ours (smoke)'], 'mAP50': [80.1, 12.5]}).set_index('method')"),
        new_code("#| echo: false\nprint('output of a code-hidden cell')"),
        new_code("print('tagged ' + 'remove-input')", metadata={'tags': ['remove-input']}),
        new_code("#| include: false\nprint('never shown')"),
    ]
    nbclient.NotebookClient(src, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(root)}}).execute()
    results = tmp_path_factory.mktemp('results')
    (results/'notebooks/papers/imim').mkdir(parents=True)
    nbformat.write(src, results/'notebooks/papers/imim/table_I.ipynb')
    # summary.json as rsrepro.runner writes it: run metadata and one record per notebook (paths relative to nbs/)
    (results/'summary.json').write_text(json.dumps({
        'profile': 'smoke', 'device': 'cpu', 'seed': 0, 'git_commit': 'abc123', 'started': '2026-01-01T00:00:00+00:00',
        'runs': [{'notebook': 'papers/imim/table_I.ipynb', 'status': 'ok', 'seconds': 4.25, 'error': ''},
                 {'notebook': 'papers/mutdet/table_2.ipynb', 'status': 'failed', 'seconds': 1.0, 'failed_cell': 3,
                  'error': 'DataNotFoundError: DOTA-v1.0 not found in /data/dota'}],
        'n_ok': 1, 'n_failed': 1}))
    site = build_site(results, root, root/'_site', renderer='python')
    return root, results, site


def test_every_page_has_html(built):
    root, _, site = built
    pages = site_pages(root/'_proc')
    assert len(pages) == 2 + len(NARRATIVE) + len(API)           # index, performance, every notebook, nothing else
    assert set(pages) == {'index.qmd', 'bench/performance.qmd', *(f'nbs/{r}' for r in NARRATIVE + API)}
    for p in pages: assert (site/p.replace('.ipynb', '.html').replace('.qmd', '.html')).is_file(), p
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob('*.html')) == \
        sorted(p.rsplit('.', 1)[0] + '.html' for p in pages)
    search = json.loads((site/'search.json').read_text())
    assert len(search) == len(pages) and all((site/r['href']).is_file() for r in search)
    assert check_site(site, root/'_proc') == {'pages': len(pages), 'sidebar_links': len(pages) * len(pages)}


def test_executed_page(built):
    _, _, site = built
    page = (site/'nbs/papers/imim/table_I.html').read_text()
    assert re.search(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/]{200,}', page), 'the matplotlib figure is embedded'
    assert re.search(r'<table[^>]*class="dataframe', page) and '80.1' in page, 'the pandas table is kept as HTML'
    assert NOT_EXECUTED not in page and '(profile smoke, device cpu, seed 0, commit <code>abc123</code>): status ok, 4.2 s' in page
    assert 'output of a code-hidden cell' in page and "print('output of a code-hidden cell')" not in page
    assert 'tagged remove-input' in page and "'tagged ' + 'remove-input'" not in page
    assert 'never shown' not in page and 'secret_cell' not in page and '#|' not in page
    assert '<h1 class="title">Table I</h1>' in page and 'what Table I shows' in page


def test_banners(built):
    _, _, site = built
    for rel in NARRATIVE:
        page = (site/'nbs'/rel.replace('.ipynb', '.html')).read_text()
        assert (NOT_EXECUTED in page) == (rel != 'papers/imim/table_I.ipynb'), rel
    banner = re.search(r'<div class="callout callout-warning">\s*<div class="callout-title">Warning</div>\s*<p>(.*?)</p>\s*</div>',
                       (site/'nbs/papers/imim/table_II.html').read_text(), re.S)
    assert banner and f'<strong>{NOT_EXECUTED}</strong>' in banner[1], 'the banner text is inside the callout box'
    failed = (site/'nbs/papers/mutdet/table_2.html').read_text()
    assert 'Execution failed in this build</strong> in cell 3' in failed and 'DataNotFoundError: DOTA-v1.0 not found' in failed
    for rel in API: assert NOT_EXECUTED not in (site/'nbs'/rel.replace('.ipynb', '.html')).read_text()


def test_sidebar_links_and_order(built):
    root, _, site = built
    for f in site.rglob('*.html'):
        p = _Links(); p.feed(f.read_text())
        local = [h for h in p.hrefs if not re.match(r'^[a-z]+:', h)]
        assert len(local) == len(NARRATIVE) + len(API) + 2, f      # Home, Performance, every notebook, on every page
        for h in local: assert (f.parent/h).resolve().is_file(), (f, h)
        assert not any(h.startswith('/') for h in p.hrefs), 'links must be relative (file:// and sub-paths)'
    imim = next(s for s in sidebar(root/'_proc') if s['type'] == 'section' and s['text'].startswith('imim'))
    assert [Path(i['path']).stem for i in imim['contents']] == ['table_I', 'table_II', 'table_IV', 'figure_2']
    mutdet = next(s for s in sidebar(root/'_proc') if s['type'] == 'section' and s['text'].startswith('mutdet'))
    assert [i['text'] for i in mutdet['contents']] == ['Table 2', 'Table 10']
    home = (site/'index.html').read_text()
    assert 'href="nbs/papers/imim/table_I.html"' in home, 'README links to notebooks point at their pages'
    assert (site/'site_libs/rsrepro-site.css').is_file() and 'href="../../../site_libs/rsrepro-site.css"' in \
        (site/'nbs/papers/imim/table_I.html').read_text()


def test_missing_page_is_an_error(built, tmp_path):
    root, results, _ = built
    proj = tmp_path/'p'
    shutil.copytree(root, proj, ignore=shutil.ignore_patterns('_site', '_proc'))
    yml = (proj/'_quarto.yml').read_text()
    (proj/'_quarto.yml').write_text(yml.replace('- auto: "nbs/tutorials/*.ipynb"', '- nbs/tutorials/gone.ipynb'))
    with pytest.raises(RsreproError, match=r"_quarto\.yml.*'nbs/tutorials/gone\.ipynb'.*does not exist"):
        render(stage(results, proj), proj/'_site')


def test_repository_site(tmp_path):
    "The repository's own _quarto.yml renders: every listed page exists, every sidebar link resolves."
    empty = tmp_path/'results'; empty.mkdir()
    site = build_site(empty, REPO, tmp_path/'_site', renderer='python', dest=tmp_path/'_proc')
    info = check_site(site, tmp_path/'_proc')
    api = sorted(REPO.glob('nbs/api/*.ipynb'))
    assert info['pages'] == len(site_pages(REPO)) >= 1 + len(api)
    for nb in api: assert (site/'nbs/api'/(nb.stem + '.html')).is_file()
    for nb in REPO.glob('nbs/papers/*/*.ipynb'):
        assert NOT_EXECUTED in (site/'nbs/papers'/nb.parent.name/(nb.stem + '.html')).read_text()
    perf = (site/'bench'/'performance.html').read_text()     # the benchmark tables, included from bench/results
    assert perf.count('<table') >= 2 and 'Ratio (official step time / rsrepro step time)' in perf
    assert 'performance.html' in (site/'index.html').read_text()


def test_quarto_is_used_when_on_path(tmp_path, monkeypatch):
    "renderer='auto' calls `quarto render <staged> --output-dir <out>` when a quarto executable is on the PATH."
    (tmp_path/'bin').mkdir(); log = tmp_path/'args.txt'
    fake = tmp_path/'bin'/'quarto'
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\nmkdir -p "$4" && echo ok > "$4/index.html"\n'); fake.chmod(0o755)
    monkeypatch.setenv('PATH', f"{tmp_path/'bin'}:{__import__('os').environ['PATH']}")
    (tmp_path/'results').mkdir()
    out = build_site(tmp_path/'results', REPO, tmp_path/'_site', dest=tmp_path/'_proc')
    assert log.read_text().split() == ['render', str(tmp_path/'_proc'), '--output-dir', str(tmp_path/'_site')]
    assert (out/'index.html').read_text() == 'ok\n'
    with pytest.raises(RsreproError, match='renderer'): build_site(tmp_path/'results', REPO, tmp_path/'_site', renderer='hugo')
