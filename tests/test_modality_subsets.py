"""Every multimodal model accepts every non-empty subset of its modalities, forward and backward (issue "Reliability", §5).

One parametrized test over (model, subset) pairs generated from each model's modality list. A missing modality is
represented the way each model's code reads it:
- `dict`: the key is left out of the batch (incomplete's models, crossscale's method, baselines and heads); a key set
  to `None` must mean the same, and incomplete's `present=` mask (the modality passed but marked absent) too;
- `bands`: imim's models and detector are built for a band set (RGB 3, IR 1, RGB+IR 4 channels stacked in that order)
  and take the stacked image; a band the model was not built for is refused with an error naming `in_chans`.
Each case checks: finite outputs and loss; gradients on the input stem of every present modality that reached the
network (per-modality patch embeddings, or a stacked stem's input-channel slice) and none on an absent one's; and the
outputs do not depend on an absent modality's data.
"""
from __future__ import annotations
import copy

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn

from rsrepro.core import create_model
from rsrepro.crossscale import (BIGEARTHNET_MODALITIES, C2SEG_BW_MODALITIES, SEN12MS_MODALITIES, CrossScaleEncoder,
                                FusMAEEncoder, MultiLabelClassifier, SceneClassifier, Segmenter, StackedViT)
from rsrepro.incomplete import (DFC2023_MODALITIES, QUADRUPLET_MODALITIES, IncompletePretrain, IncompleteSegmenter,
                                Modality, modality_combinations)
from rsrepro.mask2former import Mask2FormerHead

B = 2


# ---------------------------------------------------------------- data, scalars, stems
def make_batch(modalities: dict, names, size: int, seed: int = 0) -> dict:
    "Random data for `names` only: float `[B, C, size, size]`, or class indices `[B, size, size]` for a map."
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        m = modalities[n]
        if isinstance(m, Modality) and m.kind == 'map': out[n] = torch.randint(0, m.classes, (B, size, size), generator=g)
        else: out[n] = torch.randn(B, m.channels if isinstance(m, Modality) else m, size, size, generator=g)
    return out


def weighted(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    "A fixed random weighting of `t` (a plain sum of LayerNorm outputs has no gradient)."
    return (t.float() * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))).sum()


def channels(modalities: dict) -> dict[str, int]:
    return {n: (m.classes if m.kind == 'map' else m.channels) if isinstance(m, Modality) else int(m)
            for n, m in modalities.items()}


def slices(modalities: dict) -> dict[str, slice]:
    "Input-channel slice of each modality in a stem that stacks the modalities as channels (absent ones zero)."
    out, i = {}, 0
    for n, c in channels(modalities).items(): out[n] = slice(i, i + c); i += c
    return out


def per_modality_stems(embed: nn.ModuleDict) -> dict[str, list]:
    "Every parameter of each modality's own patch embedding."
    return {n: [(p, None) for p in e.parameters()] for n, e in embed.items()}


def stacked_stem(weight: nn.Parameter, modalities: dict) -> dict[str, list]:
    return {n: [(weight, s)] for n, s in slices(modalities).items()}


def grad_of(p: nn.Parameter, s: slice | None) -> torch.Tensor | None:
    if p.grad is None: return None
    return p.grad if s is None else p.grad[:, s]


# ---------------------------------------------------------------- the cases
@dataclass
class Case:
    "A model family: its modalities, a tiny model, how a batch with a subset runs, its stems."
    modalities: dict
    build: Callable                # subset -> model (most ignore the subset)
    run: Callable                  # (model, batch, subset, **kw) -> dict with 'scalar' and comparable tensors
    stems: Callable                # model -> {modality: [(param, channel slice or None)]}
    size: int
    kind: str = 'dict'             # 'dict' (absent = key left out) or 'bands' (model built for the stacked band set)
    present_mask: bool = False     # also accepts the absent modality with `present=False`
    active: Callable | None = None  # (model, out, subset) -> present modalities that reached the network this step
    extra: Callable | None = None  # (batch, subset) -> batch entries that are not modalities (targets)
    names: list = field(default_factory=list)

    def __post_init__(self): self.names = list(self.modalities)


# incomplete: the multimodal ViT with fusion tokens, MultiViT, pre-training, Mask2Former segmenter
INC = dict(img_size=32, embed_dim=16, depth=1, num_heads=2)


def inc_backbone(name, mods):
    def build(subset):
        torch.manual_seed(0)
        return create_model(name, modalities=mods, **INC).train()
    return build


def inc_vit_run(model, batch, subset, present=None, seed=0):
    out = model(batch, present=present)
    f = out['fusion']
    streams = {n: model.modality_stream(out, n)[0] for n in subset}
    return dict(scalar=weighted(f) + sum(weighted(s, i + 1) for i, s in enumerate(streams.values())), fusion=f,
                **{f'stream_{n}': s for n, s in streams.items()})


def inc_pretrain(mods, contrastive):
    def build(subset):
        torch.manual_seed(0)
        bb = create_model('incomplete_vit_tiny_patch16', modalities=mods, **INC)
        # 2 of the 4 tokens of a modality visible: something to reconstruct for every subset (the default, half of all
        # modality tokens, leaves nothing masked when a single modality is present)
        return IncompletePretrain(bb, num_visible=2, contrastive=contrastive, decoder_dim=16, decoder_depth=1,
                                  decoder_heads=2).train()
    return build


def inc_pretrain_run(model, batch, subset, present=None, seed=0):
    res = model(batch, present=present, generator=torch.Generator().manual_seed(seed))
    vis = {n: ~res['token_mask'][n] for n in subset}
    return dict(scalar=res['loss'], loss=res['loss'], _visible=vis, **{k: v for k, v in res.items() if k.startswith('pred_')})


def inc_segmenter(mods, task):
    def build(subset):
        torch.manual_seed(0)
        bb = create_model('incomplete_vit_tiny_patch16', modalities=mods, **INC)
        head = Mask2FormerHead(in_channels=16, num_classes=2, num_queries=2, task='instance' if task == 'instance' else 'semantic',
                               hidden_dim=32, pixel_decoder_layers=1, decoder_layers=1, num_heads=2, dim_feedforward=32,
                               encoder_feedforward_dim=32, train_num_points=64)
        return IncompleteSegmenter(bb, head, task=task, num_visible=2).train()
    return build


def inc_segmenter_run(model, batch, subset, present=None, seed=0):
    out = model(batch, present=present, generator=torch.Generator().manual_seed(seed))
    pres = out['present']
    vis = {n: pres[n][:, None] & ~out['token_mask'][n] for n in subset}
    return dict(scalar=out['loss'], loss=out['loss'], class_logits=out['class_logits'], mask_logits=out['mask_logits'],
                _visible=vis, _present=pres)


def seg_targets(task):
    def extra(batch, subset):
        g = torch.Generator().manual_seed(5)
        if task == 'instance':
            masks = torch.rand(B, 2, 32, 32, generator=g) > 0.5
            return {'instances': [dict(masks=m, labels=torch.tensor([0, 1])) for m in masks]}
        return {'mask': torch.randint(0, 2, (B, 32, 32), generator=g)}
    return extra


def visible_active(model, out, subset):
    "Under the spatial mask, the present modalities with at least one visible token."
    return {n for n in subset if bool(out['_visible'][n].any())}


# crossscale: the method (and its Table 6 ablations), DINO-MM, SatViT, Fus-MAE; the downstream heads
VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
DINO = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, global_crop_size=16, local_crop_size=8, n_local_crops=2)


def registered(name, mods, **kw):
    def build(subset):
        torch.manual_seed(0)
        return create_model(name, modalities=mods, **VIT, **kw).train()
    return build


def pretrain_run(model, batch, subset, seed=0):
    out = model(batch, generator=torch.Generator().manual_seed(seed))
    return dict(scalar=out['loss'], loss=out['loss'], **{k: v for k, v in out.items() if k.startswith('pred_')})


def head_case(head, backbone_cls, mods):
    def build(subset):
        torch.manual_seed(0)
        kw = dict(VIT, pool='cls') if backbone_cls is StackedViT else dict(VIT)
        bb = backbone_cls(modalities=mods, **kw)
        if head == 'segmenter': return Segmenter(bb, num_classes=3, channels=16).train()
        return (MultiLabelClassifier(bb, num_classes=5) if head == 'multilabel' else SceneClassifier(bb, num_classes=4)).train()
    return build


def head_run(model, batch, subset, seed=0):
    out = model(batch)
    return dict(scalar=out['loss'], loss=out['loss'], logits=out['logits'])


def head_targets(head):
    def extra(batch, subset):
        g = torch.Generator().manual_seed(5)
        if head == 'multilabel': return {'label': (torch.rand(B, 5, generator=g) < .5).float()}
        if head == 'scene': return {'label': torch.tensor([0, 3])}
        return {'mask': torch.randint(0, 3, (B, 16, 16), generator=g)}
    return extra


def encoder_stems(model):
    enc = model.encoder if hasattr(model, 'encoder') else model.backbone
    return per_modality_stems(enc.patch_embed)


def head_stems(model):
    bb = model.backbone
    if isinstance(bb, StackedViT): return stacked_stem(bb.vit.patch_embed.proj.weight, bb.modalities)
    return per_modality_stems(bb.patch_embed)


# imim: RGB, IR, RGB+IR (the bands stacked in this order), pre-training models and the Swin-YOLOv5 detector
IMIM_BANDS = {'rgb': 3, 'ir': 1}
TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, decoder_dim=32,
                 decoder_num_heads=2)


def band_count(subset): return sum(IMIM_BANDS[n] for n in subset)


def stacked(batch, subset): return torch.cat([batch[n] for n in subset], 1)


def imim_build(name):
    def build(subset):
        torch.manual_seed(0)
        return create_model(name, img_size=64, in_chans=band_count(subset), mask_patch_size=16, mask_ratio=0.5,
                            **TINY_SWIN).train()
    return build


def imim_run(model, batch, subset, seed=0):
    out = model({'image': stacked(batch, subset)}, generator=torch.Generator().manual_seed(seed))
    return dict(scalar=out['loss'], loss=out['loss'], pred=out['pred'])


def imim_stems(model, subset):
    return {n: [(model.encoder.patch_embed.proj.weight, s)] for n, s in slices({k: IMIM_BANDS[k] for k in subset}).items()}


def detector_build(subset):
    from rsrepro.detector import build_detector, yolov5_hyp
    torch.manual_seed(0)
    m, _ = build_detector('swin_yolov5', nc=2, in_chans=band_count(subset), scale='n')
    m.hyp = yolov5_hyp(2, 3, 64)
    return m.train()


def detector_run(model, batch, subset, seed=0):
    img = stacked(batch, subset)
    preds = model(img)
    loss, _ = model({'img': img, 'batch_idx': torch.tensor([0., 1.]), 'cls': torch.tensor([[1.], [0.]]),
                     'bboxes': torch.tensor([[.5, .5, .3, .2], [.3, .4, .2, .3]])}, preds)
    return dict(scalar=loss.sum(), loss=loss, **{f'p{i}': p for i, p in enumerate(preds)})


def detector_stems(model, subset):
    from rsrepro.detector import SwinBackbone
    bb = next(m for m in model.modules() if isinstance(m, SwinBackbone))
    return {n: [(bb.body.patch_embed.proj.weight, s)] for n, s in slices({k: IMIM_BANDS[k] for k in subset}).items()}


def imim_case(build, run, stems):
    return Case(IMIM_BANDS, build, run, stems, size=64, kind='bands')


C = Case
CASES = {
    # incomplete (DFC2023: SAR, RGB, DSM; quadruplets: S1, S2, DEM, Dynamic World map)
    'incomplete_vit/dfc2023': C(DFC2023_MODALITIES, inc_backbone('incomplete_vit_tiny_patch16', DFC2023_MODALITIES),
                                inc_vit_run, lambda m: per_modality_stems(m.embed), 32, present_mask=True),
    'incomplete_vit/quadruplets': C(QUADRUPLET_MODALITIES, inc_backbone('incomplete_vit_tiny_patch16', QUADRUPLET_MODALITIES),
                                    inc_vit_run, lambda m: per_modality_stems(m.embed), 32, present_mask=True),
    'multivit/dfc2023': C(DFC2023_MODALITIES, inc_backbone('multivit_tiny_patch16', DFC2023_MODALITIES),
                          inc_vit_run, lambda m: per_modality_stems(m.embed), 32, present_mask=True),
    'incomplete_pretrain/dfc2023': C(DFC2023_MODALITIES, inc_pretrain(DFC2023_MODALITIES, True), inc_pretrain_run,
                                     lambda m: per_modality_stems(m.backbone.embed), 32, present_mask=True,
                                     active=visible_active),
    'incomplete_pretrain/quadruplets': C(QUADRUPLET_MODALITIES, inc_pretrain(QUADRUPLET_MODALITIES, False), inc_pretrain_run,
                                         lambda m: per_modality_stems(m.backbone.embed), 32, present_mask=True,
                                         active=visible_active),
    'incomplete_segmenter/dfc2023': C(DFC2023_MODALITIES, inc_segmenter(DFC2023_MODALITIES, 'instance'), inc_segmenter_run,
                                      lambda m: per_modality_stems(m.backbone.embed), 32, present_mask=True,
                                      active=visible_active, extra=seg_targets('instance')),
    'incomplete_segmenter/quadruplets': C(QUADRUPLET_MODALITIES, inc_segmenter(QUADRUPLET_MODALITIES, 'lulc'),
                                          inc_segmenter_run, lambda m: per_modality_stems(m.backbone.embed), 32,
                                          present_mask=True, active=visible_active, extra=seg_targets('lulc')),
    # crossscale pre-training on BigEarthNet-MM (S1, S2)
    'crossscale': C(BIGEARTHNET_MODALITIES, registered('crossscale_vit_tiny', BIGEARTHNET_MODALITIES, **DEC),
                    pretrain_run, encoder_stems, 16),
    'crossscale_wo_caf': C(BIGEARTHNET_MODALITIES, registered('crossscale_vit_small_wo_caf', BIGEARTHNET_MODALITIES, **DEC),
                           pretrain_run, encoder_stems, 16),
    'crossscale_wo_cmf': C(BIGEARTHNET_MODALITIES, registered('crossscale_vit_small_wo_cmf', BIGEARTHNET_MODALITIES, **DEC),
                           pretrain_run, encoder_stems, 16),
    'fusmae': C(BIGEARTHNET_MODALITIES, registered('fusmae_vit_tiny', BIGEARTHNET_MODALITIES, **DEC),
                pretrain_run, encoder_stems, 16),
    'satvit': C(BIGEARTHNET_MODALITIES, registered('satvit_vit_tiny', BIGEARTHNET_MODALITIES, **DEC), pretrain_run,
                lambda m: stacked_stem(m.mae.patch_embed.proj.weight, m.modalities), 16),
    'dinomm': C(BIGEARTHNET_MODALITIES, registered('dinomm_vit_tiny', BIGEARTHNET_MODALITIES, **DINO), pretrain_run,
                lambda m: stacked_stem(m.student.vit.patch_embed.proj.weight, m.student.modalities), 16),
    # crossscale downstream: BigEarthNet-MM multi-label, SEN12MS scenes, C2Seg-BW segmentation (HSI, MSI, SAR)
    **{f'{head}/{bb.__name__}': C(mods, head_case(head, bb, mods), head_run, head_stems, 16, extra=head_targets(head))
       for head, mods in (('multilabel', BIGEARTHNET_MODALITIES), ('scene', SEN12MS_MODALITIES),
                          ('segmenter', C2SEG_BW_MODALITIES))
       for bb in (CrossScaleEncoder, FusMAEEncoder, StackedViT)},
    # imim: RGB / IR / RGB+IR
    **{name: imim_case(imim_build(f'imim_swin_tiny_{name.removeprefix("imim_")}'), imim_run, imim_stems)
       for name in ('imim_conventional', 'imim_interactive', 'imim_interactive_qunmasked')},
    'imim_detector': imim_case(detector_build, detector_run, detector_stems),
}

PAIRS = [(name, subset) for name, case in CASES.items() for subset in modality_combinations(case.names)]
RAISES: dict = {}   # (model, subset) -> (error type, message pattern): subsets a model refuses by design (none)


# ---------------------------------------------------------------- the test
def _zero_grad(model):
    for p in model.parameters(): p.grad = None


def _run(case, model, batch, subset, state=None, **kw):
    "One step; with `state`, from that state (DINO-MM's centre and EMA, BatchNorm statistics move in training)."
    if state is not None: model.load_state_dict(state)
    torch.manual_seed(0)                         # the global RNG too (Mask2Former's loss samples points with it)
    return case.run(model, batch, subset, **kw)


def _close(a: dict, b: dict, what: str):
    for k, v in a.items():
        if k.startswith('_') or not torch.is_tensor(v): continue
        assert torch.allclose(v, b[k], atol=1e-5, rtol=1e-4), f'{what}: {k} changed'


@pytest.mark.parametrize('name,subset', PAIRS, ids=[f'{n}-{"+".join(s)}' for n, s in PAIRS])
def test_every_modality_subset_forward_backward(name, subset):
    case = CASES[name]
    model = case.build(subset)
    absent = [n for n in case.names if n not in subset]
    data = make_batch(case.modalities, case.names, case.size)          # every modality's data; the batch takes a subset
    batch = {n: data[n] for n in subset}
    if case.extra: batch.update(case.extra(batch, subset))
    if (name, subset) in RAISES:
        err, match = RAISES[name, subset]
        with pytest.raises(err, match=match): _run(case, model, batch, subset)
        return

    # forward, backward: finite, the present stems get gradients, the absent ones none
    state = copy.deepcopy(model.state_dict())
    out = _run(case, model, batch, subset)
    for k, v in out.items():
        if torch.is_tensor(v) and v.is_floating_point(): assert torch.isfinite(v).all(), f'{k} is not finite'
    assert out['scalar'].ndim == 0
    out['scalar'].backward()
    stems = case.stems(model, subset) if case.kind == 'bands' else case.stems(model)
    active = case.active(model, out, subset) if case.active else set(subset)
    assert active, 'no present modality reached the network'
    for n, params in stems.items():
        grads = [grad_of(p, s) for p, s in params]
        if n in active:
            assert any(g is not None and bool(g.abs().sum() > 0) for g in grads), f'no gradient reaches {n!r} stem'
            assert all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        else:
            assert all(g is None or bool((g == 0).all()) for g in grads), f'absent/unused {n!r} stem got a gradient'

    # the outputs do not depend on an absent modality's data
    if case.kind == 'bands':
        # a model built for `subset` reads exactly those bands: stacking an absent band in is refused, naming in_chans
        for n in absent:
            with pytest.raises(ValueError, match='in_chans|channels'):
                _run(case, model, {**data}, tuple(m for m in case.names if m in subset or m == n))
        return
    if absent:
        with torch.no_grad():
            _close(out, _run(case, model, {**batch, **{n: None for n in absent}}, subset, state), 'absent key = None')
    if case.present_mask and absent:
        # passed with other data but marked absent: the outputs of the batch without it, and no gradient into its stem
        pres = out.get('_present')
        base = {n: pres[n] for n in subset} if pres is not None else {n: True for n in subset}
        with torch.no_grad(): ref = _run(case, model, batch, subset, state, present=base)
        _zero_grad(model)
        other = make_batch(case.modalities, absent, case.size, seed=1)
        res = _run(case, model, {**batch, **other}, subset, state, present={**base, **{n: False for n in absent}})
        _close(ref, res, f'present=False {absent}')
        res['scalar'].backward()
        for n in absent:
            assert all(g is None or bool((g == 0).all()) for g in (grad_of(p, s) for p, s in stems[n])), \
                f'{n!r} marked absent got a gradient'
