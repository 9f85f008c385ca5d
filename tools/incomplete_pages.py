"""Write the six narrative pages of *incomplete* (Tables I-IV, Figures 5-6) as py:percent text and convert them to
notebooks with jupytext. The .ipynb files are authoritative afterwards; re-running this script rewrites them.

Usage: .venv/bin/python tools/incomplete_pages.py
"""
import json, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT/'nbs'/'papers'/'incomplete'

PARAMS = '''# %% tags=["parameters"]
profile = 'smoke'      # 'smoke': a few steps on real samples, any CPU, minutes | 'full': the paper's protocol (CUDA, full data)
data_root = None       # folder holding the full datasets (default: $RSREPRO_DATA)
device = 'auto'        # 'auto' (CUDA when there is one) | 'cpu' | 'cuda'
seed = 0
out_dir = 'results'    # where result records, figures and executed notebooks go
'''

SMOKE = '''# > **Smoke profile: these numbers are not claims.** In `smoke` every setting pre-trains for 3 steps and fine-tunes
# > for 4 steps at 128 px with a narrow (64-wide) Mask2Former, on small *stand-ins* built from real bytes that are
# > not the paper's data (see "Data" above), and evaluates on at most 8 validation samples (the DFC2023 stand-in's
# > validation tiles are its training tiles). The smoke run
# > proves that every step of the protocol executes for every modality combination; only `profile='full'` on the
# > full datasets produces numbers comparable to the paper's.'''

DATA_DFC = '''# ## Data
#
# **DFC2023 Track 2** (RGB + SAR + nDSM, building instances in COCO json), in the organisers' layout under
# `$RSREPRO_DATA/DFC_Track_2/` (`annotations/buildings_only_{train,val}.json`, `{split}/{rgb,sar,height}/*.tif`; see
# `nbs/api/18_multimodal_data` for the sources and the accepted alternatives). The paper's 256-px samples and its
# 5,332 / 1,335 split are its authors' own and not published: `full` cuts each of the organisers' 512-px images into
# four 256-px tiles (not resized; 5,332 = 4 x 1,333) and keeps their train / val split.
#
# In `smoke`, when the dataset is absent, a **stand-in** in the same layout is written from real bytes: the 3 VEDAI
# sample scenes (RGB; the VEDAI infrared band in the SAR slot), crops of a real LiDAR DEM from the `lidar` package
# (another place) in the height slot, and VEDAI's vehicles as the instances. It exercises the real reader; it is not
# DFC2023.'''

DATA_QUAD = '''# ## Data
#
# **The quadruplet LULC dataset** (Sentinel-1 VV/VH, Sentinel-2 B02/B03/B04/B08, LiDAR DEM, Dynamic World map,
# UrbanAtlas 2018 labels merged to 7 classes) is not public. Its layout follows the authors' loader
# (`$RSREPRO_DATA/Quadruplets/f<k>/.../*s2_*.tif` with the other modalities beside it; see
# `nbs/api/18_multimodal_data`), with their place split (val = `f2`, `f6`).
#
# In `smoke`, a **stand-in** in that layout is written from the 6 real BigEarthNet-MM Sentinel-1/-2 pairs of
# `bigearthnet-common` (112 px): real S1 and S2; crops of a real LiDAR DEM from the `lidar` package (another place) in
# the DEM slot; and, in the DNW and label slots, classes from a spectral rule on the real S2 bands (neither Dynamic
# World nor UrbanAtlas: combinations with DNW are trivially easy on it).'''

SETUP = '''# %%
import time
import pandas as pd
from rsrepro import published
from rsrepro.incomplete_protocol import ASSUMPTIONS, Finetune, IncompleteExperiment, combo_label, plot_combinations
from rsrepro.incomplete import count_parameters, modality_combinations
from rsrepro.results import ResultRecorder, report

ex = IncompleteExperiment(profile, data_root=data_root, out_dir=out_dir, seed=seed, device=device)
prof = ex.profile
print(f'profile={profile} seed={seed} device={ex.device} image size={prof.img_size}')
print('pre-training:', prof.pretrain)
for d, c in prof.finetune.items(): print(f'fine-tuning ({d}):', c)
'''


def header(nb: Path) -> str:
    "The title cell of the existing page (title, caption, paper reference)."
    cells = json.loads(nb.read_text())['cells']
    md = [''.join(c['source']) for c in cells if c['cell_type'] == 'markdown']
    title = next(m for m in md if m.startswith('# incomplete'))
    return '\n'.join('# ' + l if l else '#' for l in title.splitlines())


def assumptions(keys) -> str:
    return ('# %%\npd.DataFrame({"assumption": k, "what we do": ASSUMPTIONS[k]} for k in ' + repr(list(keys)) +
            ').style.hide(axis="index")\n')


TABLE = '''# %%
settings = {SETTINGS}
tasks = {TASKS}
results, t_all = {{}}, time.perf_counter()
for col, paradigm in settings.items():
    for task, suffix in tasks.items():
        t0 = time.perf_counter()
        results[(col, suffix)] = ex.evaluate(Finetune('{DATA}', task, paradigm))
        print(f'{{col:<18}} {{task:<9}} all modalities: {{list(results[(col, suffix)].values())[0]:.3f}}   '
              f'({{time.perf_counter() - t0:.0f}} s)')
print(f'total {{time.perf_counter() - t_all:.0f}} s')
print('data:', ex.data_source())

# %%
rec = ResultRecorder(out_dir, 'incomplete', '{TABLE}', profile, ex.data_source(), seed)
for (col, suffix), scores in results.items():
    for combo, v in scores.items(): rec.add(combo, col + suffix, v)
pub = published.load('incomplete', '{TABLE}')
assert set(rec.df['column']) <= set(pub['column']) and set(rec.df['row']) <= set(pub['row']), 'names must match the paper'
ours = pd.DataFrame({{col + suffix: s for (col, suffix), s in results.items()}}).round(3)
ours

# %% [markdown]
# ## Per modality combination
#
# Bars: ours; black ticks: published.

# %%
import matplotlib.pyplot as plt
from pathlib import Path
from rsrepro.core import atomic_write
for suffix, metric in {METRICS}.items():
    o = {{col: results[(col, suffix)] for col in settings}}
    p = {{col: dict(zip(pub[pub.column == col + suffix]['row'], pub[pub.column == col + suffix]['value'])) for col in settings}}
    fig = plot_combinations(o, p, metric, f'incomplete Table {TABLE}{{" " + suffix.strip(" /") if suffix else ""}}', smoke=profile == 'smoke')
    name = f'table_{TABLE}_combinations{{suffix.replace(" / ", "_").replace(".", "")}}.png'
    with atomic_write(Path(out_dir)/'figures'/'incomplete'/name, 'wb') as f: fig.savefig(f, format='png', dpi=110)
    plt.show()

# %% [markdown]
# ## Published beside reproduced

# %%
report('incomplete', '{TABLE}', out_dir=out_dir, profile=profile)
'''

PARAMS_CELL = '''# %% [markdown]
# ## Model size

# %%
from rsrepro.incomplete_protocol import build_segmenter
for name, m in (('this profile', ex.build(Finetune('{DATA}', '{TASK}', 'Sup. Proposed'))),
                ("the paper's (256 px, width 256)", build_segmenter(Finetune('{DATA}', '{TASK}', 'Sup. Proposed')))):
    print(f'{{name:<32}} backbone {{count_parameters(m.backbone) / 1e6:.2f}} M parameters, Mask2Former head '
          f'{{count_parameters(m.head) / 1e6:.2f}} M')
'''

A_TABLE = ['fusion tokens', 'modality attention depth', 'mask token', 'normalisation', 'random modality combination',
           'supervised token mask', 'Dirichlet draw', 'ignored pixels', 'MultiViT', 'Mask2Former pyramid', 'Mask2Former settings', 'fine-tuning optimiser',
           'weights evaluated']
A_PRE = ['visible tokens', 'pre-training data', 'pre-training modalities', 'pre-training schedule',
         'reconstruction targets', 'decoders', 'contrastive loss', 'DINO loss']


def table_page(table, data, settings, tasks, metrics, what, akeys, task_for_size):
    nb = DEST/f'table_{table}.ipynb'
    parts = [PARAMS, '# %% [markdown]\n' + header(nb), '# %% [markdown]\n' + what,
             '# %% [markdown]\n# ## Published\n\n# %%\nfrom rsrepro import published\n' + f"published.table('incomplete', '{table}')",
             '# %% [markdown]\n# ## Protocol and assumptions\n', SETUP, assumptions(akeys),
             '# %% [markdown]\n' + (DATA_DFC if data == 'dfc2023' else DATA_QUAD),
             '# %%\n' + f'val = ex.dataset({data!r}, "val"); print(len(val), "validation samples |", ex.data_source())',
             '# %% [markdown]\n# ## Run\n#\n' + SMOKE,
             TABLE.format(SETTINGS=repr(settings), TASKS=repr(tasks), DATA=data, TABLE=table, METRICS=repr(metrics)),
             PARAMS_CELL.format(DATA=data, TASK=task_for_size)]
    return nb, '\n\n'.join(p.strip('\n') for p in parts) + '\n'


FIGURE = '''# %%
import matplotlib.pyplot as plt
import numpy as np
from pathlib import Path
from rsrepro.core import atomic_write
combos = modality_combinations(ex.build(Finetune('{DATA}', '{TASK}')).backbone.modalities)
vs = ex.val_set('{DATA}')
index = {INDEX}
panels = {{}}
for paradigm in {PARADIGMS}:
    t0 = time.perf_counter()
    f = Finetune('{DATA}', '{TASK}', paradigm)
    ex.evaluate(f)                                   # trains (or reuses) the run of the table
    model = ex.load(f)
    panels[paradigm] = {{combo_label(c): ex.predict(f, c, model, indices=[index])[0][0] for c in combos}}
    print(f'{{paradigm:<18}} ({{time.perf_counter() - t0:.0f}} s)')
sample = vs[index]
print('sample:', sample['id'], '| data:', ex.data_source())
'''

FIG5_DRAW = '''# %%
def show_instances(ax, inst, shape):
    canvas = np.zeros((*shape, 3))
    cmap = plt.get_cmap('tab20')
    for k, m in enumerate(inst):
        canvas[m.numpy()] = cmap(k % 20)[:3]
    ax.imshow(canvas)

rows = ['inputs'] + list(panels)
cols = len(combos)
fig, axes = plt.subplots(len(rows), cols + 1, figsize=(1.9 * (cols + 1), 2.0 * len(rows)), squeeze=False)
for a in axes.flat: a.set_xticks([]); a.set_yticks([])
H, W = sample['mask'].shape
rgb = sample['rgb'].permute(1, 2, 0).numpy(); rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-6)
inputs = [('RGB', rgb), ('SAR', sample['sar'][0].numpy()), ('DSM', sample['dsm'][0].numpy()), ('ground truth', None)]
for c, (name, img) in enumerate(inputs):
    ax = axes[0, c]
    if img is None:
        if '{TASK}' == 'instance': show_instances(ax, sample['instances']['masks'], (H, W))
        else: ax.imshow(sample['mask'].numpy(), cmap='gray', vmin=0, vmax=1)
    else: ax.imshow(img, cmap=None if img.ndim == 3 else 'gray')
    ax.set_title(name, fontsize=8)
for c in range(len(inputs), cols + 1): axes[0, c].axis('off')
for r, paradigm in enumerate(panels, start=1):
    axes[r, 0].text(0.5, 0.5, paradigm, ha='center', va='center', fontsize=8, transform=axes[r, 0].transAxes)
    axes[r, 0].axis('off')
    for c, combo in enumerate(combos, start=1):
        p = panels[paradigm][combo_label(combo)]
        ax = axes[r, c]
        if '{TASK}' == 'instance': show_instances(ax, [m for m, s in zip(p['masks'], p['scores']) if s >= 0.5], (H, W))
        else: ax.imshow(p.numpy(), cmap='gray', vmin=0, vmax=1)
        if r == 1: ax.set_title(combo_label(combo), fontsize=7)
'''

FIG6_DRAW = '''# %%
from matplotlib.colors import ListedColormap
from rsrepro.multimodal_data import UA_CLASSES_7
cmap = ListedColormap(plt.get_cmap('tab10').colors[:len(UA_CLASSES_7)])
rows = ['inputs'] + list(panels)
cols = len(combos)
fig, axes = plt.subplots(len(rows), cols + 1, figsize=(1.45 * (cols + 1), 1.6 * len(rows)), squeeze=False)
for a in axes.flat: a.set_xticks([]); a.set_yticks([])
s2 = sample['s2'][[2, 1, 0]].permute(1, 2, 0).numpy(); s2 = (s2 - s2.min()) / max(float(np.ptp(s2)), 1e-6)
gt = np.ma.masked_equal(sample['mask'].numpy(), 255)
inputs = [('S1 VV', sample['s1'][0].numpy(), 'gray'), ('S2 RGB', s2, None), ('DEM', sample['dem'][0].numpy(), 'terrain'),
          ('DNW', sample['dnw'].numpy(), 'tab10'), ('labels', gt, cmap)]
for c, (name, img, cm) in enumerate(inputs):
    axes[0, c].imshow(img, cmap=cm, **({'vmin': 0, 'vmax': len(UA_CLASSES_7) - 1} if name == 'labels' else {}))
    axes[0, c].set_title(name, fontsize=7)
for c in range(len(inputs), cols + 1): axes[0, c].axis('off')
for r, paradigm in enumerate(panels, start=1):
    axes[r, 0].text(0.5, 0.5, paradigm, ha='center', va='center', fontsize=7, transform=axes[r, 0].transAxes)
    axes[r, 0].axis('off')
    for c, combo in enumerate(combos, start=1):
        axes[r, c].imshow(panels[paradigm][combo_label(combo)].numpy(), cmap=cmap, vmin=0, vmax=len(UA_CLASSES_7) - 1)
        if r == 1: axes[r, c].set_title(combo_label(combo), fontsize=6)
handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(UA_CLASSES_7))]
fig.legend(handles, UA_CLASSES_7, loc='lower center', ncol=len(UA_CLASSES_7), fontsize=7, frameon=False)
'''

FIG_SAVE = '''
fig.suptitle(f'incomplete Figure {FIG} (reproduced) | profile={{profile}}, seed={{seed}}, sample {{sample["id"]}}'
             + (' | smoke: not comparable' if profile == 'smoke' else ''), fontsize=9)
fig.tight_layout(rect=(0, 0.04, 1, 1))
with atomic_write(Path(out_dir)/'figures'/'incomplete'/'figure_{FIG}.png', 'wb') as f: fig.savefig(f, format='png', dpi=100)
plt.show()
'''


def figure_page(fig, data, task, what, index_expr, draw):
    nb = DEST/f'figure_{fig}.ipynb'
    par = ['Sup. MultiViT', 'Sup. Proposed', 'Fine. w/ G.', 'Fine. w/ G. & C.']
    parts = [PARAMS, '# %% [markdown]\n' + header(nb), '# %% [markdown]\n' + what, SETUP,
             assumptions(['weights evaluated', 'random modality combination', 'MultiViT',
                          'DFC2023 samples' if data == 'dfc2023' else 'quadruplet classes']),
             '# %% [markdown]\n' + (DATA_DFC if data == 'dfc2023' else DATA_QUAD),
             '# %% [markdown]\n# ## Run\n#\n' + SMOKE + '\n#\n# In smoke the models have trained for a few steps: expect '
             'empty or uniform maps.',
             FIGURE.format(DATA=data, TASK=task, INDEX=index_expr, PARADIGMS=repr(par)),
             draw.replace('{TASK}', task) + FIG_SAVE.format(FIG=fig)]
    return nb, '\n\n'.join(p.strip('\n') for p in parts) + '\n'


PAGES = [
    table_page('I', 'dfc2023', {'Sup. MultiViT': 'Sup. MultiViT', 'Sup. Proposed': 'Sup. Proposed',
                                'Fine. w/ G.': 'Fine. w/ G.', 'Fine. w/ G. & C.': 'Fine. w/ G. & C.'},
               {'instance': ' / ins.', 'semantic': ' / sem.'}, {' / ins.': 'AP@50', ' / sem.': 'mIoU'},
               '''# **What is compared.** Building instance (AP@50) and binary building semantic segmentation (mIoU) on DFC2023
# Track 2 with every one of the 7 non-empty combinations of SAR, RGB and DSM at inference, for four paradigms:
# MultiViT (ordinary self-attention, same fusion tokens) and the proposed backbone trained from scratch with random
# modality combinations, and the proposed backbone fine-tuned from reconstruction pre-training (G.) and from
# reconstruction + contrastive pre-training (G. & C.). Each paradigm is one model per task, evaluated 7 times.''',
               A_TABLE + A_PRE + ['DFC2023 samples', 'semantic mIoU (DFC2023)', 'instance AP@50'], 'instance'),
    table_page('II', 'quadruplets', {'Sup. MultiViT': 'Sup. MultiViT', 'Sup. Proposed': 'Sup. Proposed',
                                     'Fine. w/ G.': 'Fine. w/ G.', 'Fine. w/ G. & C.': 'Fine. w/ G. & C.'},
               {'lulc': ''}, {'': 'mIoU'},
               '''# **What is compared.** Land-use / land-cover mapping (mIoU over 7 merged UrbanAtlas classes) on the quadruplet
# dataset with every one of the 15 non-empty combinations of S1, S2, DEM and the Dynamic World map (DNW) at
# inference, for the four paradigms of Table I.''',
               A_TABLE + A_PRE + ['quadruplet classes', 'quadruplet bands'], 'lulc'),
    table_page('III', 'dfc2023', {'w/o Mask': 'w/o Mask', 'w/o Random': 'w/o Random', 'w/o Attention': 'w/o Attention',
                                  'w/ all': 'w/ all'},
               {'instance': ' / ins.', 'semantic': ' / seg.'}, {' / ins.': 'AP@50', ' / seg.': 'mIoU'},
               '''# **What is compared.** Ablations of the proposed backbone, trained from scratch on DFC2023 Track 2: without the
# masked self-attention (every token attends to every token), without the random modality combination (all
# modalities in every training step), without the modality attention (fusion tokens gather only through
# self-attention); "w/ all" is the full model, trained again as its own run (Table I's "Sup. Proposed" setting with
# the next seed, see the assumption "ablations"). 7 combinations each.''',
               A_TABLE + ['ablations', 'DFC2023 samples', 'semantic mIoU (DFC2023)', 'instance AP@50'], 'instance'),
    table_page('IV', 'quadruplets', {'w/o Mask': 'w/o Mask', 'w/o Random': 'w/o Random', 'w/o Attention': 'w/o Attention',
                                     'w/ all': 'w/ all'},
               {'lulc': ''}, {'': 'mIoU'},
               '''# **What is compared.** The ablations of Table III on the quadruplet LULC task, 15 combinations each; "w/ all" is
# the full model trained again as its own run (Table II's "Sup. Proposed" setting with the next seed).''',
               A_TABLE + ['ablations', 'quadruplet classes', 'quadruplet bands'], 'lulc'),
    figure_page('5', 'dfc2023', 'instance', '''# **What is shown.** The paper's Figure 5 shows building predictions of the four paradigms of Table I on DFC2023
# Track 2. We draw, for one validation sample, the inputs and the ground truth, then each paradigm's building
# instances (score >= 0.5) for each of the 7 modality combinations, from the runs of Table I.
#
# **Assumptions.** The paper does not say which samples it shows nor a score threshold: we show the validation
# sample with the most buildings among the first 200 and masks scoring >= 0.5. The figure has no numbers to compare, so nothing is
# recorded; the panels are the result.''',
                '''max(range(min(len(vs), 200)), key=lambda k: len(vs[k]['instances']['labels']))''',
                FIG5_DRAW),
    figure_page('6', 'quadruplets', 'lulc', '''# **What is shown.** The paper's Figure 6 shows LULC maps of the four paradigms of Table II on the quadruplet
# dataset. We draw, for one validation sample, the inputs and the labels, then each paradigm's map for each of the
# 15 modality combinations, from the runs of Table II.
#
# **Assumptions.** The paper does not say which sample it shows: we show the first validation sample. The figure
# has no numbers to compare, so nothing is recorded; the panels are the result.''', '0', FIG6_DRAW),
]


def main():
    jt = str(Path(sys.executable).with_name('jupytext'))
    for nb, text in PAGES:
        with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f: f.write(text)
        update = ['--update'] if nb.is_file() else ['--set-kernel', 'python3']   # --update keeps cell ids: small diffs
        subprocess.run([jt, '--quiet', '--to', 'ipynb', *update, f.name, '-o', str(nb)], check=True)
        print('wrote', nb.relative_to(ROOT))


if __name__ == '__main__':
    main()
