"""The shared experiment base (rsrepro.protocol), checked once for every paper that has a protocol: profiles, the one
device decision, the full-data guard, the stand-in label, and cached runs and evaluations."""
import json
from pathlib import Path

import pytest
import torch

from rsrepro.core import DataNotFoundError, RsreproError
from rsrepro.protocol import PROFILES, RUNTIME_FIELDS, Experiment, Profile, get_profile, register_profiles
from rsrepro.standins import SMOKE_MARKER
from rsrepro.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _experiment(paper):
    "(Experiment class, assumptions) of `paper`'s protocol module."
    if paper == 'imim':
        from rsrepro.imim_protocol import ASSUMPTIONS, ImimExperiment
        return ImimExperiment, ASSUMPTIONS
    if paper == 'crossscale':
        from rsrepro.crossscale_protocol import ASSUMPTIONS, CrossscaleExperiment
        return CrossscaleExperiment, ASSUMPTIONS
    if paper == 'mutdet':
        from rsrepro.mutdet_protocol import ASSUMPTIONS, MutdetExperiment
        return MutdetExperiment, ASSUMPTIONS
    from rsrepro.incomplete_protocol import ASSUMPTIONS, IncompleteExperiment
    return IncompleteExperiment, ASSUMPTIONS


def _first_data_access(paper, ex):
    "Touch the paper's first dataset as its pages do."
    if paper == 'imim': return ex.vedai('test', 'rgbir', 1)
    if paper == 'crossscale': return ex.dataset('train')
    if paper == 'mutdet': return ex.reader('dior_r', 'train')
    return ex.dataset('dfc2023', 'train')


PAPERS = ['imim', 'incomplete', 'crossscale', 'mutdet']


@pytest.mark.parametrize('paper', PAPERS)
def test_profiles_are_registered_on_the_base(paper):
    Ex, _ = _experiment(paper)
    smoke, full = get_profile(paper, 'smoke'), get_profile(paper, 'full')
    assert isinstance(smoke, Profile) and isinstance(full, Profile) and set(PROFILES[paper]) == {'smoke', 'full'}
    assert full.require_full_data and not smoke.require_full_data
    with pytest.raises(RsreproError, match=f"{paper}: profile='medium'"): get_profile(paper, 'medium')
    assert issubclass(Ex, Experiment) and Ex.paper == paper


@pytest.mark.parametrize('paper', PAPERS)
def test_one_device_decision(paper, tmp_path):
    Ex, _ = _experiment(paper)
    assert str(Ex('smoke', out_dir=tmp_path, device='cpu').device) == 'cpu'
    assert Ex('smoke', out_dir=tmp_path).device.type == ('cuda' if torch.cuda.is_available() else 'cpu')   # 'auto'
    if not torch.cuda.is_available():
        with pytest.raises(RsreproError, match='no CUDA device'): Ex('smoke', out_dir=tmp_path, device='cuda')


@pytest.mark.parametrize('paper', PAPERS)
def test_full_profile_refuses_samples_and_stand_ins(paper, tmp_path, monkeypatch):
    "With no full dataset anywhere, `full` refuses what `smoke` accepts (shared samples or a stand-in)."
    monkeypatch.setenv('RSREPRO_DATA', str(tmp_path/'nothing'))
    Ex, _ = _experiment(paper)
    with pytest.raises(DataNotFoundError): _first_data_access(paper, Ex('full', out_dir=tmp_path))
    ex = Ex('smoke', out_dir=tmp_path, device='cpu')
    try: _first_data_access(paper, ex)
    except DataNotFoundError as e: pytest.skip(f'no smoke data here: {e}')
    src = ex.data_source()
    assert any(t in src for t in ('shared-samples', 'package-samples', 'smoke-standin')), src


@pytest.mark.parametrize('paper', PAPERS)
def test_pages_cite_assumptions_that_exist_and_say_smoke_is_not_a_claim(paper):
    _, assumptions = _experiment(paper)
    pages = sorted((ROOT/'nbs'/'papers'/paper).glob('*.ipynb'))
    assert pages
    for nb in pages:
        src = ''.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'])
        if 'not reproduced yet' in src: continue        # a placeholder claims nothing
        if nb.stem == 'learning_check': assert "not the paper's protocol" in src, f'{nb.name} must say its settings are its own'
        else: assert 'not claims' in src or 'not comparable' in src, f'{nb.name} must say smoke numbers are not claims'
        assert "device = 'auto'" in src, f"{nb.name}: the parameter cell's device default is 'auto'"
    for k, v in assumptions.items(): assert k and v and 'the paper' not in k


# ------------------------------------------------------------------ the base on a toy paper
class _Data(torch.utils.data.Dataset):
    def __init__(self, root=None, source=None): self.root, self.data_source = root, source or f'root:{root}'
    def __len__(self): return 4
    def __getitem__(self, i): return {'x': torch.full((2,), float(i))}


class _Lin(torch.nn.Module):
    def __init__(self): super().__init__(); self.l = torch.nn.Linear(2, 1)
    def forward(self, b): return {'loss': (self.l(b['x']) - 1).pow(2).mean()}


@pytest.fixture
def toy():
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class ToyProfile(Profile):
        steps: int = 1
    register_profiles('toy', {'smoke': ToyProfile(name='smoke', require_full_data=False),
                              'full': ToyProfile(name='full')})

    class Toy(Experiment): paper = 'toy'
    yield Toy
    PROFILES.pop('toy')


def test_stand_in_is_labelled_however_it_is_found(toy, tmp_path):
    root = tmp_path/'data'; root.mkdir(); (root/'SOURCE.txt').write_text(SMOKE_MARKER + ' toy\n')
    ex = toy('smoke', out_dir=tmp_path)
    ex.use('Toy', _Data(root, source=f'RSREPRO_DATA:{root}'))
    assert ex.sources['Toy'] == f'smoke-standin:{root.resolve()}'
    with pytest.raises(DataNotFoundError, match='full dataset'): toy('full', out_dir=tmp_path).use('Toy', _Data(root))
    toy('full', out_dir=tmp_path).use('Toy', _Data(tmp_path/'elsewhere', 'RSREPRO_DATA:/data/toy'))   # a full dataset


def test_cached_run_resumes_and_is_reused(toy, tmp_path):
    ex = toy('smoke', out_dir=tmp_path, device='cpu')
    cfg = TrainConfig(max_steps=6, batch_size=2, lr=0.05, log_every=1, amp='none', ckpt_every=2)
    run = ex.root/'run'
    ex.train(_Lin, _Data(), __import__('dataclasses').replace(cfg, stop_after=3), run, {'what': 'toy'})   # interrupted
    assert (run/'checkpoint.pt').is_file() and not ex.finished(run)
    w = ex.train(_Lin, _Data(), cfg, run, {'what': 'toy'})                                 # resumes, finishes
    done = json.loads((run/'done.json').read_text())
    assert ex.finished(run) and done['steps'] == 6 and not (run/'checkpoint.pt').exists()
    ref = toy('smoke', out_dir=tmp_path/'ref', device='cpu')
    wr = ref.train(_Lin, _Data(), cfg, ref.root/'run', {'what': 'toy'})                    # uninterrupted
    a, b = torch.load(w, weights_only=True), torch.load(wr, weights_only=True)
    assert a['setting'] == {'what': 'toy'} and all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    built = []
    assert ex.train(lambda: built.append(1), _Data(), cfg, run, {'what': 'toy'}) == w and not built   # reused
    n = []
    ev = lambda: n.append(1) or {'score': 0.5}
    assert ex.cached(run/'eval.json', ev, after=run/'done.json') == {'score': 0.5}
    assert ex.cached(run/'eval.json', ev, after=run/'done.json') == {'score': 0.5} and len(n) == 1
    (run/'done.json').unlink()
    ex.cached(run/'eval.json', ev, after=run/'done.json'); assert len(n) == 2                # stale without its run


# ------------------------------------------------------------------ content-addressed runs
def _cfg(**kw):
    return TrainConfig(**{'max_steps': 3, 'batch_size': 2, 'lr': 0.05, 'log_every': 1, 'amp': 'none', **kw})


def test_a_cached_pretraining_is_reused_by_a_second_page_and_invalidated_when_its_config_changes(toy, tmp_path):
    built = []
    def build(): built.append(1); return _Lin()
    page1 = toy('smoke', out_dir=tmp_path, device='cpu')
    run = page1.root/'pretrain'/'p'
    w = page1.train(build, _Data(), _cfg(), run, {'method': 'toy'})
    assert len(built) == 1 and json.loads((run/'fingerprint.json').read_text())['inputs']['config']['max_steps'] == 3
    page2 = toy('smoke', out_dir=tmp_path, device='cpu')          # another page, another process: same inputs
    assert page2.train(build, _Data(), _cfg(), run, {'method': 'toy'}) == w and len(built) == 1   # reused
    first = torch.load(w, weights_only=True)['steps']
    # a changed config, setting, seed or data source is another run: trained, the old one kept beside it
    for change in [dict(cfg=_cfg(max_steps=4)), dict(setting={'method': 'other'}), dict(seed=1),
                   dict(data=_Data(source='RSREPRO_DATA:/elsewhere'))]:
        n = len(built)
        page2.train(build, change.get('data', _Data()), change.get('cfg', _cfg()), run,
                    change.get('setting', {'method': 'toy'}), seed=change.get('seed'))
        assert len(built) == n + 1, change
    assert torch.load(w, weights_only=True)['steps'] == 3 and first == 3
    assert len(list(run.parent.glob('p@*'))) == 4                  # each earlier run kept under its address
    # back to the first inputs: the kept run comes back, nothing is trained
    n = len(built)
    page2.train(build, _Data(), _cfg(), run, {'method': 'toy'})
    assert len(built) == n and page2.address(run) == page1.fingerprint(
        setting={'method': 'toy'}, config={k: v for k, v in __import__('dataclasses').asdict(
            __import__('dataclasses').replace(_cfg(), seed=0, batch_size=2)).items()
            if k not in RUNTIME_FIELDS}, seed=0, fit={}, parents=[],
        data={'source': 'root:None', 'samples': 4})[0]


def test_a_finetune_is_invalidated_when_its_pretraining_changes(toy, tmp_path):
    ex = toy('smoke', out_dir=tmp_path, device='cpu')
    pre, ft = ex.root/'pretrain'/'p', ex.root/'finetune'/'f'
    built = []
    def build(): built.append(1); return _Lin()
    ck = ex.train(build, _Data(), _cfg(), pre)
    ex.train(build, _Data(), _cfg(), ft, parents=[ck])
    ex.train(build, _Data(), _cfg(), ft, parents=[ck]); assert len(built) == 2
    ck = ex.train(build, _Data(), _cfg(max_steps=2), pre)           # the pre-training changed
    ex.train(build, _Data(), _cfg(), ft, parents=[ck]); assert len(built) == 4


def test_cached_evaluation_follows_its_run(toy, tmp_path):
    ex = toy('smoke', out_dir=tmp_path, device='cpu')
    run = ex.root/'f'
    n = []
    ev = lambda: n.append(1) or {'score': len(n)}
    ex.train(_Lin, _Data(), _cfg(), run)
    assert ex.cached(run/'eval.json', ev, after=run/'done.json')['score'] == 1
    assert ex.cached(run/'eval.json', ev, after=run/'done.json')['score'] == 1
    ex.train(_Lin, _Data(), _cfg(max_steps=2), run)                 # another run in the folder: its score is recomputed
    assert ex.cached(run/'eval.json', ev, after=run/'done.json')['score'] == 2
    ex.train(_Lin, _Data(), _cfg(), run)                            # the first run is back, with its own score
    assert ex.cached(run/'eval.json', ev, after=run/'done.json')['score'] == 1 and len(n) == 2


def test_the_training_code_version_ignores_presentation_modules():
    from rsrepro.core import code_version
    from rsrepro.protocol import PRESENTATION_MODULES
    assert code_version(PRESENTATION_MODULES) != code_version() and 'site.py' in PRESENTATION_MODULES
    assert 'train.py' not in PRESENTATION_MODULES and 'losses.py' not in PRESENTATION_MODULES


def test_dataset_source_finds_the_wrapped_dataset(tmp_path):
    from rsrepro.protocol import dataset_source
    inner = _Data(source='RSREPRO_DATA:/data/x')
    assert dataset_source(torch.utils.data.Subset(inner, [0, 1])) == 'RSREPRO_DATA:/data/x'
    class Wrap(torch.utils.data.Dataset):
        def __init__(self, base): self.base = base
    assert dataset_source(Wrap(Wrap(inner))) == 'RSREPRO_DATA:/data/x' and dataset_source(Wrap(None)) is None
