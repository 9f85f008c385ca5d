"""Published numbers (rsrepro.published): counts hand-counted from the papers, spot checks, and cross-checks between
tables and against the numbers quoted in the papers' prose, which catch transcription slips the counts cannot."""
import re
from pathlib import Path

import pandas as pd
import pytest

from rsrepro import published as P
from rsrepro.core import RsreproError

PAPERS_DIR = Path('/work/shared/papers')

# Hand-counted from the paper texts: rows x numeric columns (mutdet: + one printed gain per non-baseline cell).
EXPECTED_COUNTS = {
    ('imim', 'I'): 8 * 2 * 9,            # 8 models x {RGB, RGB+IR} x (8 classes + mAP.5)
    ('imim', 'II'): 5, ('imim', 'III'): 3, ('imim', 'IV'): 3,
    ('incomplete', 'I'): 7 * 8,          # 7 modality combinations x 4 settings x {ins., sem.}
    ('incomplete', 'II'): 15 * 4,        # 15 combinations x 4 settings
    ('incomplete', 'III'): 7 * 8, ('incomplete', 'IV'): 15 * 4,
    ('crossscale', '2'): 4 * 6, ('crossscale', '3'): 4 * 5, ('crossscale', '6'): 4,
    ('crossscale', '7'): 6, ('crossscale', '8'): 5, ('crossscale', 'abstract'): 3,
    ('mutdet', '1'): 4 * 2 + 3 * 2,      # 4 rows x {AP50, AP75} + gains of 3 rows
    ('mutdet', '2'): 5 * 22,             # 20 DIOR-R classes + AP50 + AP75
    ('mutdet', '3'): 5 * 17,             # 15 DOTA classes + AP50 + AP75
    ('mutdet', '4'): 5 * 12,             # 2 subsets x 2 schedules x 3 metrics
    ('mutdet', '5'): 5 * 8 + 4 * 8,      # {AP50, AP75} x 4 fractions, gains for 4 methods
    ('mutdet', '6'): 5 * 6 + 4 * 6,
    ('mutdet', '7'): 8 * 3 + 7 * 3,
    ('mutdet', '8'): 12 * 3, ('mutdet', '9'): 5 * 6,
}

def test_counts_per_table():
    got = P.load().groupby(['paper', 'table']).size().to_dict()
    assert got == EXPECTED_COUNTS
    assert sum(EXPECTED_COUNTS.values()) == 955

def test_schema_numeric_unique():
    df = P.load()
    assert list(df.columns) == ['paper', 'table', 'row', 'column', 'value', 'note']
    assert df['value'].dtype == float and df['value'].notna().all()
    assert not df.duplicated(['paper', 'table', 'row', 'column']).any()
    assert set(df['paper']) == set(P.PAPERS)
    assert (df['row'] != '').all() and (df['column'] != '').all()

def test_value_ranges():
    df = P.load()
    frac = df[df.paper.isin(['imim', 'incomplete'])]['value']
    assert frac.between(0, 1).all(), 'imim and incomplete print fractions'
    pct = df[(df.paper.isin(['crossscale', 'mutdet'])) & ~df.column.str.endswith('(gain)')]['value']
    assert pct.between(10, 100).all(), 'crossscale and mutdet print percentages; no value rescaled'

SPOT = [  # (paper, table, row, column, value) read off the paper text by hand
    ('imim', 'I', 'YOLOv3 (RGB)', 'Car', 0.83), ('imim', 'I', 'YOLOv4 (RGB+IR)', 'Van', 0.55),
    ('imim', 'I', 'YOLOv5l (RGB+IR)', 'Tractor', 0.63), ('imim', 'I', 'YOLOrs (RGB)', 'Boat', 0.19),
    ('imim', 'I', 'Ours (RGB)', 'mAP.5', 0.64), ('imim', 'I', 'Ours (RGB+IR)', 'Pickup', 0.79),
    ('imim', 'II', 'Training from scratch (w/o pre-training)', 'mAP@.5', 0.50),
    ('imim', 'II', 'MAE pre-training on VEDAI', 'mAP@.5', 0.42),
    ('imim', 'II', 'Cross-attention MIM on DIOR, Q unmasked', 'mAP@.5', 0.60),
    ('imim', 'III', 'Training from scratch (w/o pre-training)', 'mAP@.5', 0.63),
    ('imim', 'III', 'Cross-attention MIM on AVIID original, Q masked', 'mAP@.5', 0.64),
    ('imim', 'III', 'Cross-attention MIM on AVIID data expansion, Q masked', 'mAP@.5', 0.68),
    ('imim', 'IV', 'mAP@.5', 'Mask size / 16', 0.63), ('imim', 'IV', 'mAP@.5', 'Mask size / 32', 0.68),
    ('imim', 'IV', 'mAP@.5', 'Mask size / 64', 0.61),
    ('incomplete', 'I', 'SAR, RGB, DSM', 'Sup. MultiViT / ins.', 0.071),
    ('incomplete', 'I', 'SAR', 'Sup. Proposed / sem.', 0.577),
    ('incomplete', 'I', 'DSM', 'Fine. w/ G. & C. / sem.', 0.758),
    ('incomplete', 'II', 'S1, S2, DEM, DNW', 'Sup. Proposed', 0.278),
    ('incomplete', 'II', 'S2, DEM', 'Fine. w/ G.', 0.257), ('incomplete', 'II', 'DEM', 'Fine. w/ G.', 0.017),
    ('incomplete', 'III', 'SAR, RGB', 'w/o Mask / ins.', 0.218), ('incomplete', 'III', 'SAR', 'w/o Random / ins.', 0.002),
    ('incomplete', 'III', 'DSM', 'w/o Attention / seg.', 0.697),
    ('incomplete', 'IV', 'S1, DEM', 'w/o Random', 0.149), ('incomplete', 'IV', 'DEM', 'w/o Mask', 0.032),
    ('incomplete', 'IV', 'DNW', 'w/o Attention', 0.220),
    ('crossscale', '2', 'Dino-MM (2022)', 'mAP-100% labels / S1', 69.7),
    ('crossscale', '2', 'SatViT (2022)', 'mAP-1% labels / S1+S2', 58.0),
    ('crossscale', '2', 'This article', 'mAP-1% labels / S2', 70.6),
    ('crossscale', '3', 'Dino-MM (2022)', 'Recall', 58.8), ('crossscale', '3', 'Fus-MAE (2024)', 'Top3-Acc', 92.4),
    ('crossscale', '3', 'Fus-MAE (2024)', 'Precision', 75.2), ('crossscale', '3', 'This article', 'F1-score', 63.9),
    ('crossscale', '6', 'w/o CAF', 'mAP-100% labels', 86.9), ('crossscale', '6', 'w/o CMF', 'mAP-100% labels', 88.7),
    ('crossscale', '6', 'This article', 'mAP-100% labels', 90.4),
    ('crossscale', '7', '0.3', 'mAP-100% labels', 86.7), ('crossscale', '7', '0.4', 'mAP-100% labels', 90.1),
    ('crossscale', '7', 'Random (0.4~0.6)', 'mAP-100% labels', 90.4),
    ('crossscale', '8', '0.3', 'mAP-100% labels', 89.8), ('crossscale', '8', '1.0', 'mAP-100% labels', 90.0),
    ('crossscale', '8', '2.0', 'mAP-100% labels', 88.4),
    ('crossscale', 'abstract', 'This article', 'Globe230k / mIoU', 79.01),
    ('crossscale', 'abstract', 'This article', 'Globe230k / OA', 92.56),
    ('crossscale', 'abstract', 'This article', 'Globe230k / mF1', 88.05),
    ('mutdet', '1', 'w/o calibration', 'AP50', 69.4), ('mutdet', '1', 'Decoder Cross Distillation', 'AP75', 50.8),
    ('mutdet', '1', 'Auxilary Siamese Head', 'AP50 (gain)', 1.3),
    ('mutdet', '2', 'Pre-training free', 'APL', 67.3), ('mutdet', '2', 'UP-DETR', 'DAM', 33.9),
    ('mutdet', '2', 'MutDet (Ours)', 'WM', 72.4), ('mutdet', '2', 'AlignDet', 'AP75', 45.8),
    ('mutdet', '3', 'UP-DETR', 'PL', 80.1), ('mutdet', '3', 'DETReg', 'SBF', 49.2), ('mutdet', '3', 'MutDet (Ours)', 'HC', 60.8),
    ('mutdet', '4', 'Pre-training free', 'OHD-SJTU-S / 1x / AP50', 89.89),
    ('mutdet', '4', 'AlignDet', 'OHD-SJTU-S / 3x / AP50', 90.40),
    ('mutdet', '4', 'MutDet (Ours)', 'OHD-SJTU-L / 3x / AP50:95', 41.68),
    ('mutdet', '5', 'AlignDet', 'AP50 / 10%', 37.9), ('mutdet', '5', 'AlignDet', 'AP50 / 10% (gain)', 0.0),
    ('mutdet', '5', 'AlignDet', 'AP75 / 25% (gain)', -1.0), ('mutdet', '5', 'MutDet (Ours)', 'AP75 / 50%', 48.4),
    ('mutdet', '6', 'AlignDet', '12 Epoch / AP50', 54.3), ('mutdet', '6', 'AlignDet', '12 Epoch / AP75 (gain)', -1.5),
    ('mutdet', '6', 'UP-DETR', '24 Epoch / AP75', 46.8),
    ('mutdet', '7', 'DETReg (baseline, no component)', '#Epoch / 12', 62.1),
    ('mutdet', '7', 'Row 6: three of the five components', '#Epoch / 24', 66.7),
    ('mutdet', '7', 'All five components (MutDet)', '#Epoch / 36 (gain)', 2.8),
    ('mutdet', '8', 'Pre-training free (Swin-Tiny; fine-tune DIOR)', '#Epoch / 12', 58.1),
    ('mutdet', '8', 'MutDet (Ours) (Swin-Tiny; pre-train RSDet4; fine-tune DIOR)', '#Epoch / 24', 70.5),
    ('mutdet', '8', 'DETReg (ResNet-50; pre-train DOTA-v1.0; fine-tune DOTA-v1.0)', '#Epoch / 12', 70.0),
    ('mutdet', '9', 'Pre-training free', 'Rotated D-DETR / AP50', 38.3),
    ('mutdet', '9', 'AlignDet', 'CSL D-DETR / AP75', 41.3), ('mutdet', '9', 'MutDet (Ours)', 'AR-CSL D-DETR / AP75', 47.6),
]

@pytest.mark.parametrize('paper,tb,row,col,v', SPOT)
def test_spot_values(paper, tb, row, col, v):
    assert P.value(paper, tb, row, col) == v

def test_at_least_three_spot_checks_per_table():
    n = pd.Series([(p, t) for p, t, *_ in SPOT]).value_counts()
    assert set(n.index) == set(EXPECTED_COUNTS) and (n >= 3).all()

def test_table_shapes_and_order():
    t = P.table('imim', 'I')
    assert t.shape == (16, 9) and t.index[0] == 'YOLOv3 (RGB)' and t.index[-1] == 'Ours (RGB+IR)'
    assert list(P.table('incomplete', 'II').index)[:3] == ['S1, S2, DEM, DNW', 'S1, S2, DEM', 'S1, S2, DNW']
    assert P.table('incomplete', 'III').shape == (7, 8) and P.table('mutdet', 2).shape == (5, 22)
    assert list(P.table('crossscale', 7).index) == ['0.3', '0.4', '0.5', '0.6', '0.7', 'Random (0.4~0.6)']
    t4 = P.table('mutdet', '4')
    assert list(t4.columns)[:3] == ['OHD-SJTU-S / 1x / AP50', 'OHD-SJTU-S / 1x / AP75', 'OHD-SJTU-S / 1x / AP50:95']
    # int and str ids are the same table
    assert P.table('mutdet', 9).equals(P.table('mutdet', '9'))

def test_missing_tables_raise():
    assert set(P.MISSING) == {('crossscale', '4'), ('crossscale', '5')}
    for p, t in P.MISSING:
        with pytest.raises(RsreproError, match='missing from the extraction'): P.load(p, t)
        with pytest.raises(P.MissingFromExtractionError): P.table(p, int(t))
    assert not ((P.load().paper == 'crossscale') & P.load().table.isin(['4', '5'])).any()

def test_bad_arguments_raise():
    with pytest.raises(RsreproError, match='unknown paper'): P.load('imin')
    with pytest.raises(RsreproError, match='needs a paper'): P.load(table='I')
    with pytest.raises(RsreproError, match='no published table'): P.load('imim', 'V')
    with pytest.raises(RsreproError, match='no row'): P.value('imim', 'IV', 'mAP', 'Mask size / 16')

# ---- cross-checks: the same number printed twice must have been transcribed the same way ----
def test_incomplete_ablation_full_model_matches_main_tables():
    t1, t3 = P.table('incomplete', 'I'), P.table('incomplete', 'III')
    assert (t3['w/ all / ins.'] == t1['Sup. Proposed / ins.']).all() and (t3['w/ all / seg.'] == t1['Sup. Proposed / sem.']).all()
    t2, t4 = P.table('incomplete', 'II'), P.table('incomplete', 'IV')
    d = (t4['w/ all'] - t2['Sup. Proposed']).abs()
    assert (d <= 0.001 + 1e-9).all() and (d > 1e-9).sum() == 5   # the paper itself differs by 0.001 in five rows

def test_mutdet_tables_agree():
    t2, t3, t5, t6, t8 = (P.table('mutdet', i) for i in (2, 3, 5, 6, 8))
    assert (t5['AP50 / 100%'] == t2['AP50']).all() and (t6['36 Epoch / AP50'] == t2['AP50']).all()
    assert (t5['AP75 / 100%'] == t6['36 Epoch / AP75']).all()
    # Table 2 prints AlignDet AP75 45.8 where Tables 5 and 6 print 45.6 (the paper's own inconsistency, noted)
    assert list(t2.index[t2['AP75'] != t6['36 Epoch / AP75']]) == ['AlignDet'] and t2.loc['AlignDet', 'AP75'] == 45.8
    assert 'inconsistency' in P.load('mutdet', 2).query("row == 'AlignDet' and column == 'AP75'")['note'].item()
    for m in ('Pre-training free', 'DETReg', 'MutDet (Ours)'):
        dior = [r for r in t8.index if r.startswith(m + ' (ResNet-50') and r.endswith('fine-tune DIOR)')]
        dota = [r for r in t8.index if r.startswith(m + ' (ResNet-50') and r.endswith('fine-tune DOTA-v1.0)')]
        assert len(dior) == len(dota) == 1
        assert list(t8.loc[dior[0]]) == [t6.loc[m, f'{e} Epoch / AP50'] for e in (12, 24, 36)]
        assert t8.loc[dota[0], '#Epoch / 36'] == t3.loc[m, 'AP50']
    t1 = P.table('mutdet', 1)
    assert t1.loc['Auxilary Siamese Head', 'AP50'] == t2.loc['MutDet (Ours)', 'AP50'] == P.table('mutdet', 7).iloc[-1]['#Epoch / 36']

def test_mutdet_printed_gains():
    base = {'1': 'w/o calibration', '5': 'Pre-training free', '6': 'Pre-training free', '7': 'DETReg (baseline, no component)'}
    bad = []
    for t, b in base.items():
        tb = P.table('mutdet', t)
        for c in [c for c in tb.columns if c.endswith(' (gain)')]:
            for r in tb.index.drop(b):
                if abs(tb.loc[r, c[:-7]] - tb.loc[b, c[:-7]] - tb.loc[r, c]) > 1e-6: bad.append((t, r, c))
    # the three inconsistencies printed in the paper itself, each with a note
    assert sorted(bad) == [('5', 'AlignDet', 'AP50 / 100% (gain)'), ('5', 'AlignDet', 'AP75 / 10% (gain)'),
                           ('5', 'UP-DETR', 'AP75 / 25% (gain)')]
    df = P.load('mutdet', 5)
    for _, r, c in bad: assert df[(df.row == r) & (df.column == c)]['note'].item() != ''

def test_mutdet_matches_numbers_quoted_in_the_text():
    v = lambda t, r, c: P.value('mutdet', t, r, c)
    d = lambda t, c, a='MutDet (Ours)', b='DETReg': round(v(t, a, c) - v(t, b, c), 2)
    assert d(2, 'AP50') == 2.8 and d(2, 'AP75') == 2.1 and d(2, 'AP50', b='Pre-training free') == 5.0
    assert d(3, 'AP50', b='Pre-training free') == 1.6
    assert [d(4, f'OHD-SJTU-S / 1x / {m}') for m in ('AP50', 'AP75', 'AP50:95')] == [0.11, 4.86, 2.16]
    assert [d(4, f'OHD-SJTU-L / 1x / {m}') for m in ('AP50', 'AP75', 'AP50:95')] == [2.59, 0.27, 1.47]
    assert d(5, 'AP50 / 10%') == 6.1 and d(5, 'AP75 / 10%') == 4.5
    assert d(6, '12 Epoch / AP50') == 4.8 and d(6, '12 Epoch / AP50', b='Pre-training free') == 11.5
    assert d(6, '24 Epoch / AP50') == 4.7 and d(6, '24 Epoch / AP50', b='Pre-training free') == 8.3
    assert [d(9, f'{x} / AP50') for x in ('Rotated D-DETR', 'CSL D-DETR', 'AR-CSL D-DETR')] == [4.4, 2.4, 3.1]
    t8 = P.table('mutdet', 8)
    sw = lambda m, ft: t8.loc[f'{m} (Swin-Tiny; pre-train RSDet4; fine-tune {ft})']
    assert round(sw('MutDet (Ours)', 'DIOR')['#Epoch / 12'] - sw('DETReg', 'DIOR')['#Epoch / 12'], 2) == 2.8
    assert round(sw('MutDet (Ours)', 'DOTA-v1.0')['#Epoch / 36'] - sw('DETReg', 'DOTA-v1.0')['#Epoch / 36'], 2) == 0.2

def test_imim_and_crossscale_match_text():
    assert P.value('imim', 'II', 'Cross-attention MIM on DIOR, Q masked', 'mAP@.5') == 0.62   # "improves from 0.52 to 0.62"
    assert P.value('imim', 'IV', 'mAP@.5', 'Mask size / 32') == P.value('imim', 'III', 'Cross-attention MIM on AVIID data expansion, Q masked', 'mAP@.5')
    full = P.value('crossscale', 2, 'This article', 'mAP-100% labels / S1+S2')
    assert full == 90.4 == P.value('crossscale', 6, 'This article', 'mAP-100% labels') == P.value('crossscale', 7, 'Random (0.4~0.6)', 'mAP-100% labels') == P.value('crossscale', 8, '0.5', 'mAP-100% labels')
    t3 = P.table('crossscale', 3)
    assert (t3['Recall'] == t3['Top1-Acc']).iloc[:3].all()   # confirms the "588" -> 58.8 reading

def test_ocr_corrections_are_noted():
    df = P.load()
    noted = df[df.note.str.contains('printed')]
    for p, t, r, c in [('crossscale', '3', 'Dino-MM (2022)', 'Recall'), ('crossscale', '3', 'Fus-MAE (2024)', 'Top3-Acc'),
                       ('crossscale', '3', 'Fus-MAE (2024)', 'Precision'), ('crossscale', 'abstract', 'This article', 'Globe230k / mF1')]:
        assert ((noted.paper == p) & (noted.table == t) & (noted.row == r) & (noted.column == c)).sum() == 1

# ---- catalogue ----
EXPECTED_CATALOGUE = {  # every table and figure of the papers (crossscale Figs. 1-2: implied by Fig. 3, captions lost)
    'imim': ({'I', 'II', 'III', 'IV'}, {'1', '2', '3'}),
    'incomplete': ({'I', 'II', 'III', 'IV'}, {'1', '2', '3', '4', '5', '6'}),
    'crossscale': ({'1', '2', '3', '4', '5', '6', '7', '8', 'abstract'}, {'1', '2', '3'}),
    'mutdet': ({str(i) for i in range(1, 10)}, {'1', '2', '3', '4'}),
}

def test_catalogue_complete():
    cat = P.catalogue()
    assert not cat.duplicated(['paper', 'kind', 'id']).any() and cat.status.isin(P.STATUSES).all()
    for p, (tabs, figs) in EXPECTED_CATALOGUE.items():
        c = P.catalogue(p)
        assert set(c[c.kind == 'table'].id) == tabs and set(c[c.kind == 'figure'].id) == figs
    tabs = cat[cat.kind == 'table'].set_index(['paper', 'id'])
    pub = set(map(tuple, P.load()[['paper', 'table']].drop_duplicates().values))
    assert pub == set(tabs[tabs.status == 'published'].index)
    assert set(tabs[tabs.status == 'missing_from_extraction'].index) == set(P.MISSING)
    # every table with numbers, every missing table, and the result figures have a narrative notebook
    for (p, i), r in tabs.iterrows():
        if r.status != 'no_numbers': assert r.notebook == f'nbs/papers/{p}/table_{i}.ipynb'
    figs = cat[(cat.kind == 'figure') & (cat.notebook != '')]
    assert set(zip(figs.paper, figs.id)) == {('imim', '3'), ('incomplete', '5'), ('incomplete', '6'), ('crossscale', '3'),
                                             ('mutdet', '1'), ('mutdet', '4')}
    assert all(n == f'nbs/papers/{p}/figure_{i}.ipynb' for p, i, n in zip(figs.paper, figs.id, figs.notebook))

@pytest.mark.skipif(not PAPERS_DIR.is_dir(), reason='paper extractions not available')
def test_catalogue_covers_every_reference_in_the_papers():
    cat = P.catalogue()
    for p, meta in P.PAPERS.items():
        text = (PAPERS_DIR / meta['file']).read_text()
        tabs = set(re.findall(r'\b(?:TABLE|Table|Tables)\s+([IVX]+|\d+)\b', text)) | set(re.findall(r'Tables [IVX\d]+ and ([IVX\d]+)', text))
        figs = set(re.findall(r'\b(?:Fig\.|Figure|Figs\.)\s*(\d+)', text)) | set(re.findall(r'Figs\. \d+ and (\d+)', text))
        c = cat[cat.paper == p]
        assert tabs and tabs <= set(c[c.kind == 'table'].id), (p, tabs)
        assert figs <= set(c[c.kind == 'figure'].id), (p, figs)

def test_papers_metadata():
    assert set(P.PAPERS) == {'imim', 'incomplete', 'crossscale', 'mutdet'}
    for p, m in P.PAPERS.items():
        assert {'title', 'authors', 'venue', 'file'} <= set(m) and m['file'].endswith('.txt')
        assert m['title'] in P.citation(p)
