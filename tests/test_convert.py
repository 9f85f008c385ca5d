"""The ARS-DETR weight converter (`rsrepro.convert`, `rsrepro convert`): rsrepro's `ARSDETR` (and `MutDet`) <-> the
official (httle/ARS-DETR, floatingstarZ/MutDet; mmrotate 0.x) state-dict names, checked against the official key lists
written out below from the official module code, round trips key for key and output for output, the official
two-way attention block recomputed from the converted weights, and the errors."""
import itertools
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from rsrepro.ars_detr import ARSDETR
from rsrepro.convert import (RULES, ConversionError, Fused, OneSided, Rename, active_rules, convert_checkpoint,
                             detect_layout, from_official, official_keys, to_official)
from rsrepro.mutdet import MutDet

# ---------------------------------------------------------------------------------------------------------------------
# The official R50 DN-ARS-DETR (configs/ars_detr/dn_arw_arm_arcsl_rdetr_r50_dota.py), read from the code:
# - mmdet 2.x ResNet-50 (Bottleneck: conv1..3 / bn1..3, downsample.0 / .1 in the first block of each stage), BN =
#   nn.BatchNorm2d with num_batches_tracked; ChannelMapper(512, 1024, 2048 -> 256, GN, num_outs=4): ConvModule
#   `conv` (bias=False before a norm) + `gn`, one extra 3x3 conv on C5;
# - DNARSDeformableDETRHead (ARSDeformableDETRHead._init_layers + label_embedding(num_classes, 256)): with_box_refine,
#   as_two_stage -> cls/reg/angle branches cloned 6 + 1 = 7 times, reg = Sequential(Linear, ReLU, Linear, ReLU,
#   Linear) -> linears 0, 2, 4; no query_embedding (two-stage), no input_proj/fc_cls (_init_layers overridden);
# - DNARSRotatedDeformableDetrTransformer: level_embeds (num_feature_levels=5 rows, the default no config changes; the
#   forward reads rows 0..3 for the 4 neck levels), enc_output(_norm), pos_trans(_norm) (built, unused),
#   query_embed(300, 256); encoder = DetrTransformerEncoder (post-norm order, so no post_norm) of BaseTransformerLayer
#   (attentions.0 = MultiScaleDeformableAttention, ffns.0 = FFN: layers.0.0 and layers.1, norms.0..1);
#   decoder = DNARSDeformableDetrTransformerDecoder: ref_point_head and angle_head (build_MLP, 2 layers: .0, .2),
#   norm; layers of DetrTransformerDecoderLayer (attentions.0 = mmcv MultiheadAttention wrapping nn.MultiheadAttention
#   as .attn, attentions.1 = RotatedMultiScaleDeformableAttention, ffns.0, norms.0..2).
# `{a..b}` is an integer range, `{x|y}` alternatives.
BN = '{weight|bias|running_mean|running_var|num_batches_tracked}'
W = '{weight|bias}'
T = 'bbox_head.transformer.'
MSDA = '{sampling_offsets|attention_weights|value_proj|output_proj}.' + W
R50_BACKBONE_NECK = [
    'backbone.conv1.weight', 'backbone.bn1.' + BN,
    'backbone.layer1.{0..2}.conv{1..3}.weight', 'backbone.layer1.{0..2}.bn{1..3}.' + BN,
    'backbone.layer1.0.downsample.0.weight', 'backbone.layer1.0.downsample.1.' + BN,
    'backbone.layer2.{0..3}.conv{1..3}.weight', 'backbone.layer2.{0..3}.bn{1..3}.' + BN,
    'backbone.layer2.0.downsample.0.weight', 'backbone.layer2.0.downsample.1.' + BN,
    'backbone.layer3.{0..5}.conv{1..3}.weight', 'backbone.layer3.{0..5}.bn{1..3}.' + BN,
    'backbone.layer3.0.downsample.0.weight', 'backbone.layer3.0.downsample.1.' + BN,
    'backbone.layer4.{0..2}.conv{1..3}.weight', 'backbone.layer4.{0..2}.bn{1..3}.' + BN,
    'backbone.layer4.0.downsample.0.weight', 'backbone.layer4.0.downsample.1.' + BN,
    'neck.convs.{0..2}.conv.weight', 'neck.convs.{0..2}.gn.' + W,
    'neck.extra_convs.0.conv.weight', 'neck.extra_convs.0.gn.' + W,
]
OFFICIAL_DN_ARS_DETR_R50 = R50_BACKBONE_NECK + [
    'bbox_head.label_embedding.weight',
    'bbox_head.cls_branches.{0..6}.' + W,
    'bbox_head.reg_branches.{0..6}.{0|2|4}.' + W,
    'bbox_head.angle_branches.{0..6}.' + W,
    T + 'level_embeds',
    T + 'enc_output.' + W, T + 'enc_output_norm.' + W,
    T + 'pos_trans.' + W, T + 'pos_trans_norm.' + W,
    T + 'query_embed.weight',
    T + 'encoder.layers.{0..5}.attentions.0.' + MSDA,
    T + 'encoder.layers.{0..5}.ffns.0.layers.{0.0|1}.' + W,
    T + 'encoder.layers.{0..5}.norms.{0..1}.' + W,
    T + 'decoder.layers.{0..5}.attentions.0.attn.{in_proj_weight|in_proj_bias}',
    T + 'decoder.layers.{0..5}.attentions.0.attn.out_proj.' + W,
    T + 'decoder.layers.{0..5}.attentions.1.' + MSDA,
    T + 'decoder.layers.{0..5}.ffns.0.layers.{0.0|1}.' + W,
    T + 'decoder.layers.{0..5}.norms.{0..2}.' + W,
    T + 'decoder.ref_point_head.{0|2}.' + W,
    T + 'decoder.angle_head.{0|2}.' + W,
    T + 'decoder.norm.' + W,
]
# MutDet's copy (mmrotate/models/utils/dn_ars_rotated_transformer.py) comments out pos_trans, pos_trans_norm, angle_head
MUTDET_ONLY_LACKS = [T + 'pos_trans.' + W, T + 'pos_trans_norm.' + W, T + 'decoder.angle_head.{0|2}.' + W]

# MutDet's pre-training model (configs/Step2_DetectionPretraining_Mutdet/MutDet_DOTA_Pretrain.py), read from the code:
# - DETRegRotatedDETRFast: a RotatedSingleStageDetector (backbone, neck, bbox_head; no swav_model: the embeddings are
#   read from disk); backbone frozen_stages=4 (still nn.BatchNorm2d, so num_batches_tracked); encoder / decoder 2 + 2;
#   256 pseudo-classes; the decoder is MutDet's DNARSDeformableDetrTransformerDecoder (no angle_head);
# - DETReg_DNARSDeformableDETRHeadv7 = DNARSDeformableDETRHead + feature_embed = MLP(256, 256, 256, 2) (`layers.0`,
#   `layers.1`); branches cloned 2 + 1 = 3 times;
# - DNARSRotatedDeformableDetrTransformerTemplateMatching: MutDet's DN transformer (no pos_trans) + feature_enhance =
#   TwoWayTransformer(depth=3, 256, 8 heads, mlp_dim=2048): layers.N = TwoWayAttentionBlock(self_attn, norm1,
#   cross_attn_token_to_image, norm2, mlp = MLPBlock(lin1, lin2), norm3, norm4, cross_attn_image_to_token), each
#   attention SAM's Attention(q_proj, k_proj, v_proj, out_proj; downsample_rate 1); patch_enc_output (Linear),
#   patch_enc_output_norm (LayerNorm), patch_enc_decode = Sequential(Linear(256, 1024), ReLU, Linear(1024, 256)).
SAM_ATTN = '{q_proj|k_proj|v_proj|out_proj}.' + W
OFFICIAL_MUTDET_PRETRAIN_R50 = R50_BACKBONE_NECK + [
    'bbox_head.label_embedding.weight',
    'bbox_head.cls_branches.{0..2}.' + W,
    'bbox_head.reg_branches.{0..2}.{0|2|4}.' + W,
    'bbox_head.angle_branches.{0..2}.' + W,
    'bbox_head.feature_embed.layers.{0|1}.' + W,
    T + 'level_embeds',
    T + 'enc_output.' + W, T + 'enc_output_norm.' + W,
    T + 'query_embed.weight',
    T + 'encoder.layers.{0..1}.attentions.0.' + MSDA,
    T + 'encoder.layers.{0..1}.ffns.0.layers.{0.0|1}.' + W,
    T + 'encoder.layers.{0..1}.norms.{0..1}.' + W,
    T + 'decoder.layers.{0..1}.attentions.0.attn.{in_proj_weight|in_proj_bias}',
    T + 'decoder.layers.{0..1}.attentions.0.attn.out_proj.' + W,
    T + 'decoder.layers.{0..1}.attentions.1.' + MSDA,
    T + 'decoder.layers.{0..1}.ffns.0.layers.{0.0|1}.' + W,
    T + 'decoder.layers.{0..1}.norms.{0..2}.' + W,
    T + 'decoder.ref_point_head.{0|2}.' + W,
    T + 'decoder.norm.' + W,
    T + 'feature_enhance.layers.{0..2}.{self_attn|cross_attn_token_to_image|cross_attn_image_to_token}.' + SAM_ATTN,
    T + 'feature_enhance.layers.{0..2}.norm{1..4}.' + W,
    T + 'feature_enhance.layers.{0..2}.mlp.{lin1|lin2}.' + W,
    T + 'patch_enc_output.' + W, T + 'patch_enc_output_norm.' + W,
    T + 'patch_enc_decode.{0|2}.' + W,
]


def expand(patterns):
    out = []
    for p in patterns:
        parts = re.split(r'\{([^{}]*)\}', p)
        choices = []
        for i, s in enumerate(parts):
            if i % 2 == 0: choices.append([s])
            elif '..' in s:
                a, b = map(int, s.split('..')); choices.append([str(n) for n in range(a, b + 1)])
            else: choices.append(s.split('|'))
        out += [''.join(c) for c in itertools.product(*choices)]
    assert len(out) == len(set(out))
    return out


SMALL = dict(num_classes=15, dim=64, num_heads=4, enc_layers=2, dec_layers=2, ffn=128, num_queries=50, backbone='resnet18')
SMALL_MUTDET = dict(num_classes=8, dim=64, num_heads=4, enc_layers=1, dec_layers=1, ffn=128, num_queries=20,
                    backbone='resnet18', depth=1, mlp_dim=128)


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return ARSDETR(**SMALL, dropout=0.0).eval()


@pytest.fixture(scope='module')
def r50():
    torch.manual_seed(0)
    return ARSDETR()


@pytest.fixture(scope='module')
def small_mutdet():
    torch.manual_seed(0)
    return MutDet(**SMALL_MUTDET).eval()


def _same(a, b):
    assert list(a) == list(b)
    for k in a: assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('which', ['small', 'r50'])
@pytest.mark.parametrize('layout', ['dn_ars_detr', 'mutdet'])
def test_round_trip_is_the_identity(which, layout, request):
    sd = request.getfixturevalue(which).state_dict()
    off = to_official(sd, layout=layout)
    assert detect_layout(off) == layout
    _same(from_official(off), sd)                   # every key, in order, every tensor and dtype
    _same(from_official(off, reference=request.getfixturevalue(which)), sd)


def test_official_names_of_the_r50_dn_ars_detr(r50):
    official = expand(OFFICIAL_DN_ARS_DETR_R50)
    off = to_official(r50.state_dict())
    assert set(off) == set(official), (sorted(set(off) - set(official))[:5], sorted(set(official) - set(off))[:5])
    mut = to_official(r50.state_dict(), layout='mutdet')
    assert set(mut) == set(official) - set(expand(MUTDET_ONLY_LACKS))
    assert official_keys(ARSDETR()) == {k: tuple(v.shape) for k, v in off.items()}
    sh = lambda k: tuple(off[k].shape)
    H, L, P, D = 8, 4, 4, 256
    assert sh(T + 'encoder.layers.0.attentions.0.sampling_offsets.weight') == (H * L * P * 2, D)
    assert sh(T + 'decoder.layers.5.attentions.1.sampling_offsets.weight') == (H * L * P * 2, D)
    assert sh(T + 'decoder.layers.5.attentions.1.attention_weights.weight') == (H * L * P, D)
    assert sh(T + 'decoder.layers.0.attentions.0.attn.in_proj_weight') == (3 * D, D)
    assert sh(T + 'encoder.layers.3.ffns.0.layers.0.0.weight') == (1024, D)
    assert sh(T + 'encoder.layers.3.ffns.0.layers.1.weight') == (D, 1024)
    assert sh(T + 'level_embeds') == (L + 1, D) and sh(T + 'query_embed.weight') == (300, D)
    assert torch.equal(off[T + 'level_embeds'][:L], r50.level_embed) and not off[T + 'level_embeds'][L].any()
    assert sh(T + 'decoder.ref_point_head.0.weight') == (D, 2 * D) and sh(T + 'decoder.ref_point_head.2.weight') == (D, D)
    assert sh(T + 'pos_trans.weight') == (2 * D, 2 * D) and not off[T + 'pos_trans.weight'].any()
    assert sh(T + 'decoder.angle_head.0.weight') == (D, D)
    assert sh('neck.convs.0.conv.weight') == (D, 512, 1, 1) and sh('neck.extra_convs.0.conv.weight') == (D, 2048, 3, 3)
    assert sh('bbox_head.label_embedding.weight') == (15, D)
    assert sh('bbox_head.angle_branches.6.weight') == (180, D) and sh('bbox_head.reg_branches.6.4.weight') == (4, D)
    assert sh('bbox_head.cls_branches.0.weight') == (15, D) and sh('backbone.layer3.5.conv2.weight') == (256, 256, 3, 3)
    assert off['backbone.layer2.0.bn1.num_batches_tracked'].dtype == torch.long
    assert torch.equal(off['bbox_head.label_embedding.weight'], r50.label_embedding.weight)   # no copy, no reshape


def test_loaded_round_trip_gives_the_same_outputs(small, tmp_path):
    x = torch.randn(2, 3, 128, 128)
    twin = ARSDETR(**SMALL, dropout=0.0).eval()
    twin.load_state_dict(from_official(to_official(small.state_dict())), strict=True)
    with torch.no_grad(): a, b = small(x), twin(x)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    # through files, as mmcv writes them: {'meta', 'state_dict', 'optimizer'}
    torch.save({'model': small.state_dict(), 'step': 7}, tmp_path/'ours.pth')
    r = convert_checkpoint(tmp_path/'ours.pth', tmp_path/'official.pth')
    ck = torch.load(tmp_path/'official.pth', weights_only=True)
    assert r['layout'] == 'dn_ars_detr' and set(ck) == {'meta', 'state_dict'} and r['tensors'] == len(ck['state_dict'])
    ck['meta'].update(CLASSES=('plane', 'ship')); ck['optimizer'] = {'state': {}, 'param_groups': []}
    torch.save(ck, tmp_path/'official.pth')
    r = convert_checkpoint(tmp_path/'official.pth', tmp_path/'back.pth', 'from_official')
    assert r['set_aside'] == ['meta', 'optimizer'] and r['layout'] == 'dn_ars_detr'
    back = torch.load(tmp_path/'back.pth', weights_only=True)
    assert back['meta']['classes'] == ['plane', 'ship']
    third = ARSDETR(**SMALL, dropout=0.0).eval()
    third.load_state_dict(back['model'], strict=True)
    with torch.no_grad(): c = third(x)
    assert all(torch.equal(a[k], c[k]) for k in a if torch.is_tensor(a[k]))
    # rsrepro.io.load_weights takes the converter as its rename: an official file loads strictly in one call
    from rsrepro.io import load_weights
    fourth = ARSDETR(**SMALL, dropout=0.0).eval()
    rep = load_weights(fourth, tmp_path/'official.pth', rename=from_official)
    assert not rep.missing and not rep.unused
    _same(fourth.state_dict(), small.state_dict())


def test_unknown_keys_are_errors_that_name_them(small):
    sd = dict(small.state_dict()); sd['mystery.weight'] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r'mystery\.weight') as e: to_official(sd)
    assert e.value.keys == ['mystery.weight']
    off = to_official(small.state_dict())
    extra = T + 'feature_enhance.layers.0.self_attn.q_proj.weight'          # MutDet's pre-training module
    with pytest.raises(ConversionError, match=re.escape(extra)): from_official({**off, extra: torch.zeros(2)})
    with pytest.warns(UserWarning, match='feature_enhance'):
        _same(from_official({**off, extra: torch.zeros(2)}, allow=[r'bbox_head\.transformer\.feature_enhance']),
              small.state_dict())
    # an mmcv checkpoint: known extras set aside, others named
    _same(from_official({'meta': {'epoch': 36}, 'state_dict': off, 'optimizer': {}}), small.state_dict())
    with pytest.raises(ConversionError, match='ema_state'): from_official({'state_dict': off, 'ema_state': {}})
    # a missing official tensor shows against a reference
    with pytest.raises(ConversionError, match=r'missing: decoder_norm\.weight'):
        from_official({k: v for k, v in off.items() if k != T + 'decoder.norm.weight'}, reference=small)


def test_a_fresh_model_converts_without_allow():
    "The neck has no biases on either side: a freshly initialised ARSDETR converts, nothing dropped, nothing warned."
    torch.manual_seed(0)
    m = ARSDETR(**SMALL)
    assert not any(re.fullmatch(r'neck\.\d\.0\.bias', k) for k in m.state_dict()) and 'neck.3.0.weight' in m.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        off = to_official(m.state_dict())
        _same(from_official(off), m.state_dict())
    assert not any(re.match(r'neck\.(convs|extra_convs)\.\d\.conv\.bias', k) for k in off)


def test_the_level_embedding_has_the_official_fifth_row():
    "The official level_embeds is [5, dim] (num_feature_levels=5), the neck reads 4: a zero row out, the row dropped back."
    torch.manual_seed(0)
    m = ARSDETR(**SMALL)
    off = to_official(m.state_dict())
    assert off[T + 'level_embeds'].shape == (5, 64) and not off[T + 'level_embeds'][4].any()
    trained = {**off, T + 'level_embeds': torch.cat([m.level_embed.detach(), torch.randn(1, 64)])}  # never-read row
    assert torch.equal(from_official(trained)['level_embed'], m.level_embed)
    with pytest.raises(ConversionError, match='level_embeds has 4 rows'):
        from_official({**off, T + 'level_embeds': off[T + 'level_embeds'][:4]})
    three = ARSDETR(**{**SMALL, 'enc_layers': 1, 'dec_layers': 1}, num_levels=3)
    with pytest.raises(ConversionError, match='level_embed has 3 levels'): to_official(three.state_dict())


def test_layouts_are_told_apart_and_non_dn_checkpoints_refused(small):
    off = to_official(small.state_dict())
    mut = to_official(small.state_dict(), layout='mutdet')
    assert detect_layout(off) == 'dn_ars_detr' and detect_layout({'state_dict': mut}) == 'mutdet'
    pre = {**mut, 'bbox_head.transformer.patch_enc_output.weight': torch.zeros(1)}
    assert detect_layout(pre) == 'mutdet_pretrain'
    with pytest.raises(ConversionError, match=r'patch_enc_output\.weight'):     # a MutDet module in an ARS-DETR layout
        from_official({**off, 'bbox_head.transformer.patch_enc_output.weight': torch.zeros(1)})
    # arcsl_detr_r50_dota (ARSDeformableDETRHead): pos_trans used, no label_embedding / query_embed / ref_point_head
    non_dn = {k: v for k, v in off.items() if not re.match(
        r'bbox_head\.(label_embedding|transformer\.(query_embed|decoder\.(ref_point_head|angle_head|norm)))\.', k)}
    with pytest.raises(ConversionError, match='non-DN'): detect_layout(non_dn)
    with pytest.raises(ConversionError, match='non-DN'): from_official(non_dn)
    with pytest.raises(ConversionError, match=r'pos_trans'): from_official(non_dn, layout='mutdet')
    with pytest.raises(ConversionError, match='unknown layout'): to_official(small.state_dict(), layout='dino')


def test_rules_extend_fused_and_reshaped_tensors():
    "The kinds of rule a later module appends: a fused projection, a Linear stored as a 1x1 conv, overlaps refused."
    extra = [Fused('mutual.{i:\\d+}.qkv.weight', ('bbox_head.mutual.{i}.q.weight', 'bbox_head.mutual.{i}.k.weight',
                                                   'bbox_head.mutual.{i}.v.weight')),
             Rename('siamese.proj.weight', 'bbox_head.siamese.proj.weight', to_official=lambda w: w[..., None, None],
                    from_official=lambda w: w.flatten(1))]
    sd = {'mutual.0.qkv.weight': torch.randn(12, 4), 'mutual.1.qkv.weight': torch.randn(12, 4),
          'siamese.proj.weight': torch.randn(5, 4)}
    off = to_official(sd, rules=RULES + extra)
    assert off['bbox_head.mutual.1.k.weight'].shape == (4, 4) and torch.equal(off['bbox_head.mutual.1.k.weight'], sd['mutual.1.qkv.weight'][4:8])
    assert off['bbox_head.siamese.proj.weight'].shape == (5, 4, 1, 1)
    _same(from_official(off, layout='mutdet', rules=RULES + extra), sd)
    with pytest.raises(ConversionError, match='missing parts'):
        from_official({k: v for k, v in off.items() if k != 'bbox_head.mutual.0.v.weight'}, layout='mutdet', rules=RULES + extra)
    with pytest.raises(ConversionError, match='overlap'):
        to_official({'query_embed.weight': torch.zeros(2, 2), 'q2.weight': torch.zeros(2, 2)},
                    rules=RULES + [Rename('q2.weight', T + 'query_embed.weight')])
    with pytest.raises(ValueError, match='placeholders'): Rename('a.{i}', 'b')
    with pytest.raises(ValueError, match='anchor'): OneSided('official', 'x.{i}', 'y', torch.zeros_like)


def test_every_rsrepro_parameter_has_an_official_name(small, small_mutdet):
    "No ARSDETR or MutDet tensor (label_embedding included) is left to a one-sided rule: each is renamed or fused."
    for model, layout in ((small, 'dn_ars_detr'), (small, 'mutdet'), (small_mutdet, 'mutdet_pretrain')):
        named = set(_renamed(model, layout))
        assert [k for k in model.state_dict() if k not in named] == [], layout


def _renamed(model, layout):
    from rsrepro.convert import _match
    rules = active_rules(layout)
    for k in model.state_dict():
        if any(isinstance(r, (Rename, Fused)) and _match(r.ours, k) is not None for r in rules): yield k


def test_cli_convert(small, tmp_path, capsys):
    from rsrepro.cli import main
    torch.save(small.state_dict(), tmp_path/'ours.pth')
    assert main(['convert', '--src', str(tmp_path/'ours.pth'), '--dst', str(tmp_path/'off.pth'), '--to', 'official',
                 '--layout', 'mutdet']) == 0
    assert 'official layout mutdet' in capsys.readouterr().out
    assert main(['convert', '--src', str(tmp_path/'off.pth'), '--dst', str(tmp_path/'back.pth'), '--to', 'rsrepro']) == 0
    _same(torch.load(tmp_path/'back.pth', weights_only=True)['model'], small.state_dict())
    torch.save({**small.state_dict(), 'stray.bias': torch.zeros(1)}, tmp_path/'bad.pth')
    assert main(['convert', '--src', str(tmp_path/'bad.pth'), '--dst', str(tmp_path/'x.pth'), '--to', 'official']) == 2
    assert 'stray.bias' in capsys.readouterr().err and not (tmp_path/'x.pth').exists()
    assert main(['convert', '--src', str(tmp_path/'nope.pth'), '--dst', str(tmp_path/'x.pth'), '--to', 'official']) == 2


# ---------------------------------------------------------------------------------------------------------------------
# MutDet's pre-training layout


@pytest.fixture(scope='module')
def mutdet_r50():
    torch.manual_seed(0)
    return MutDet(num_classes=256, enc_layers=2, dec_layers=2)


def test_mutdet_round_trip_is_the_identity(small_mutdet):
    sd = small_mutdet.state_dict()
    off = to_official(sd, layout='mutdet_pretrain')
    assert detect_layout(off) == 'mutdet_pretrain' and not any(k.startswith('detector.') for k in off)
    _same(from_official(off), sd)                   # every key, in order, every tensor and dtype
    _same(from_official({'meta': {}, 'state_dict': off}, reference=small_mutdet), sd)


def test_official_names_of_the_mutdet_pretraining_model(mutdet_r50):
    official = expand(OFFICIAL_MUTDET_PRETRAIN_R50)
    off = to_official(mutdet_r50.state_dict(), layout='mutdet_pretrain')
    assert set(off) == set(official), (sorted(set(off) - set(official))[:5], sorted(set(official) - set(off))[:5])
    assert official_keys(mutdet_r50, 'mutdet_pretrain') == {k: tuple(v.shape) for k, v in off.items()}
    # the detector part is the fine-tuning layout's, so a pre-trained detector fine-tunes as MutDet's load_from does
    det = to_official(mutdet_r50.detector.state_dict(), layout='mutdet')
    assert set(det) == {k for k in off if not re.match(
        r'bbox_head\.(feature_embed|transformer\.(feature_enhance|patch_enc_))', k)}
    sh = lambda k: tuple(off[k].shape)
    D, FE = 256, T + 'feature_enhance.layers.'
    for a in ('self_attn', 'cross_attn_token_to_image', 'cross_attn_image_to_token'):   # SAM's Attention, downsample 1
        for x in 'qkv': assert sh(f'{FE}2.{a}.{x}_proj.weight') == (D, D) and sh(f'{FE}2.{a}.{x}_proj.bias') == (D,)
        assert sh(f'{FE}2.{a}.out_proj.weight') == (D, D)
    assert sh(FE + '0.mlp.lin1.weight') == (2048, D) and sh(FE + '0.mlp.lin2.weight') == (D, 2048)
    assert sh(T + 'patch_enc_decode.0.weight') == (1024, D) and sh(T + 'patch_enc_decode.2.weight') == (D, 1024)
    assert sh(T + 'patch_enc_output.weight') == (D, D) and sh(T + 'patch_enc_output_norm.weight') == (D,)
    assert sh('bbox_head.feature_embed.layers.1.weight') == (D, D) and sh('bbox_head.label_embedding.weight') == (256, D)
    assert sh(T + 'level_embeds') == (5, D) and sh('bbox_head.cls_branches.2.weight') == (256, D)
    assert off['backbone.layer4.0.bn1.num_batches_tracked'].dtype == torch.long


def test_the_fused_projections_split_q_first(small_mutdet):
    "Rows [0:d] are q, [d:2d] k, [2d:3d] v (Attention's reshape(B, L, 3, heads, hd)); kv: rows [0:d] k."
    sd, d = dict(small_mutdet.state_dict()), 64
    qkv = torch.arange(3 * d * d, dtype=torch.float32).reshape(3 * d, d)
    kv = -torch.arange(2 * d * d, dtype=torch.float32).reshape(2 * d, d)
    M = 'mutual_enhancement.layers.0.'
    sd[M + 'self_attn.qkv.weight'], sd[M + 'self_attn.qkv.bias'] = qkv, torch.arange(3 * d, dtype=torch.float32)
    sd[M + 'cross_attn_memory_to_embed.kv.weight'] = kv
    off = to_official(sd, layout='mutdet_pretrain')
    FE = T + 'feature_enhance.layers.0.'
    for i, x in enumerate('qkv'):
        assert torch.equal(off[f'{FE}self_attn.{x}_proj.weight'], qkv[i * d:(i + 1) * d])
        assert torch.equal(off[f'{FE}self_attn.{x}_proj.bias'], torch.arange(i * d, (i + 1) * d, dtype=torch.float32))
    assert torch.equal(off[FE + 'cross_attn_image_to_token.k_proj.weight'], kv[:d])
    assert torch.equal(off[FE + 'cross_attn_image_to_token.v_proj.weight'], kv[d:])
    assert torch.equal(off[FE + 'cross_attn_image_to_token.q_proj.weight'], sd[M + 'cross_attn_memory_to_embed.q.weight'])
    _same(from_official(off), sd)
    with pytest.raises(ConversionError, match='missing parts'):
        from_official({k: v for k, v in off.items() if k != FE + 'self_attn.k_proj.bias'})


def _sam_attention(sd, pre, q, k, v, heads):
    "AlignRotate/models/utils/transformer.py's Attention.forward, on the official tensors."
    lin = lambda x, n: F.linear(x, sd[f'{pre}.{n}.weight'], sd[f'{pre}.{n}.bias'])
    sep = lambda x: x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)
    q, k, v = sep(lin(q, 'q_proj')), sep(lin(k, 'k_proj')), sep(lin(v, 'v_proj'))
    attn = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
    out = attn @ v
    return lin(out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1), 'out_proj')


def _two_way_block(sd, pre, queries, keys, heads):
    "TwoWayAttentionBlock.forward (MLPBlock with ReLU, as TwoWayTransformer passes it), on the official tensors."
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[f'{pre}.{n}.weight'], sd[f'{pre}.{n}.bias'])
    queries = ln(queries + _sam_attention(sd, pre + '.self_attn', queries, queries, queries, heads), 'norm1')
    queries = ln(queries + _sam_attention(sd, pre + '.cross_attn_token_to_image', queries, keys, keys, heads), 'norm2')
    mlp = F.linear(F.relu(F.linear(queries, sd[pre + '.mlp.lin1.weight'], sd[pre + '.mlp.lin1.bias'])),
                   sd[pre + '.mlp.lin2.weight'], sd[pre + '.mlp.lin2.bias'])
    queries = ln(queries + mlp, 'norm3')
    keys = ln(keys + _sam_attention(sd, pre + '.cross_attn_image_to_token', keys, queries, queries, heads), 'norm4')
    return queries, keys


def test_mutdet_strict_reload_and_the_official_computation(small_mutdet):
    "A strict reload after the round trip gives identical outputs; the official modules on the converted tensors agree."
    torch.manual_seed(1)
    x, E = torch.randn(1, 3, 96, 96), torch.randn(1, 7, 64)
    twin = MutDet(**SMALL_MUTDET).eval()
    off = to_official(small_mutdet.state_dict(), layout='mutdet_pretrain')
    twin.load_state_dict(from_official(off), strict=True)

    def run(m):
        with torch.no_grad():
            F0 = m.detector.encode(x)['memory']
            Fp = m.memory_norm(m.memory_proj(F0))
            e, f = m.mutual_enhancement(E, Fp)
            return F0, Fp, e, f, m.encoder_embed(f), m.feature_embed(e)
    ours, back = run(small_mutdet), run(twin)
    assert all(torch.equal(a, b) for a, b in zip(ours, back))
    # the official computation (patch_enc_output(_norm), feature_enhance, patch_enc_decode, feature_embed)
    F0, Fp, e, f, g, h = ours
    lin = lambda x, n: F.linear(x, off[n + '.weight'], off[n + '.bias'])
    Fp_off = F.layer_norm(lin(F0, T + 'patch_enc_output'), (64,), off[T + 'patch_enc_output_norm.weight'],
                          off[T + 'patch_enc_output_norm.bias'])
    heads = small_mutdet.mutual_enhancement.layers[0].self_attn.num_heads
    e_off, f_off = _two_way_block(off, T + 'feature_enhance.layers.0', E, Fp_off, heads)
    g_off = lin(F.relu(lin(f_off, T + 'patch_enc_decode.0')), T + 'patch_enc_decode.2')
    h_off = lin(F.relu(lin(e_off, 'bbox_head.feature_embed.layers.0')), 'bbox_head.feature_embed.layers.1')
    for a, b in ((Fp, Fp_off), (e, e_off), (f, f_off), (g, g_off), (h, h_off)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mutdet_layout_errors(small, small_mutdet):
    sd = small_mutdet.state_dict()
    with pytest.raises(ConversionError, match="layout='mutdet_pretrain'"): to_official(sd)    # the default layout
    with pytest.raises(ConversionError, match="ARSDETR state dict takes layout 'mutdet'"):
        to_official(small.state_dict(), layout='mutdet_pretrain')
    off = to_official(sd, layout='mutdet_pretrain')
    # a DETReg-style checkpoint with its frozen embedding network: named, dropped only when allowed
    swav = {**off, 'swav_model.conv1.weight': torch.zeros(2)}
    with pytest.raises(ConversionError, match=r'swav_model\.conv1\.weight'): from_official(swav)
    with pytest.warns(UserWarning, match='swav_model'): _same(from_official(swav, allow=[r'swav_model\.']), sd)
    # the pre-trained detector alone, for fine-tuning: the MutDet modules dropped by allow
    allow = [r'bbox_head\.feature_embed', r'bbox_head\.transformer\.feature_enhance', r'bbox_head\.transformer\.patch_enc_']
    with pytest.warns(UserWarning, match='feature_enhance'):
        _same(from_official(off, layout='mutdet', allow=allow), small_mutdet.detector.state_dict())


def test_mutdet_checkpoint_files(small_mutdet, tmp_path):
    torch.save({'model': small_mutdet.state_dict()}, tmp_path/'ours.pth')
    r = convert_checkpoint(tmp_path/'ours.pth', tmp_path/'official.pth', layout='mutdet_pretrain')
    assert r['layout'] == 'mutdet_pretrain' and 'backbone.bn1.num_batches_tracked' in r['made']
    r = convert_checkpoint(tmp_path/'official.pth', tmp_path/'back.pth', 'from_official')
    assert r['layout'] == 'mutdet_pretrain'
    _same(torch.load(tmp_path/'back.pth', weights_only=True)['model'], small_mutdet.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# MutDet's Swin-Tiny models (Table 8: configs/Step2_DetectionPretraining_Mutdet/base_ars_detr_E2D2_swin.py,
# configs/Step3_Finetuning/base_ars_detr_E2D2_swin.py). Their SwinTransformerNew (AlignRotate/models/backbones/
# swin_new.py) is not in the published repository; its config arguments are those of mmdet 2.x's SwinTransformer
# (mmdet/models/backbones/swin.py, vendored there), whose keys, read from the code, are:
# - patch_embed = PatchEmbed: projection (Conv2d(3, 96, 4, stride 4), with bias), norm (LN; patch_norm=True);
# - stages.i = SwinBlockSequence(depth (2, 2, 6, 2)[i], 96·2^i channels, (3, 6, 12, 24)[i] heads): blocks.j = SwinBlock
#   (norm1; attn = ShiftWindowMSA whose w_msa = WindowMSA: relative_position_bias_table [(2·7 - 1)², heads], the
#   persistent buffer relative_position_index [49, 49], qkv (qkv_bias=True), proj; norm2; ffn = mmcv FFN: layers.0.0,
#   layers.1) and, for i < 3, downsample = PatchMerging (an nn.Unfold sampler, no tensors; norm over 4C; reduction =
#   Linear(4C, 2C, bias=False));
# - norm{i} = LN(96·2^i) for i in out_indices = (1, 2, 3), after the stages; no absolute_pos_embed (use_abs_pos_embed=False).
#   rsrepro's ARSDETR(backbone='swin_t') has the same output norms as backbone_norms.norm{1..3}.
SWIN_BLOCK = ['{norm1|norm2}.' + W, 'attn.w_msa.{qkv|proj}.' + W, 'attn.w_msa.relative_position_bias_table',
              'attn.w_msa.relative_position_index', 'ffn.layers.{0.0|1}.' + W]
SWIN_T_BACKBONE = (['backbone.patch_embed.{projection|norm}.' + W]
                   + [f'backbone.stages.{s}.blocks.{{0..{d - 1}}}.' + b for s, d in enumerate((2, 2, 6, 2)) for b in SWIN_BLOCK]
                   + ['backbone.stages.{0..2}.downsample.norm.' + W, 'backbone.stages.{0..2}.downsample.reduction.weight',
                      'backbone.norm{1..3}.' + W])
SMALL_SWIN = dict(num_classes=3, dim=32, num_heads=2, enc_layers=1, dec_layers=1, ffn=64, num_queries=10)
OUT_NORMS = {f'backbone_norms.norm{n}.{p}': f'backbone.norm{n}.{p}' for n in (1, 2, 3) for p in ('weight', 'bias')}


@pytest.fixture(scope='module')
def small_swin():
    torch.manual_seed(0)
    return ARSDETR(**SMALL_SWIN, backbone='swin_t').eval()


def _with_random_out_norms(sd):
    "`sd` with its Swin output norms randomised (a fresh LayerNorm's ones and zeros would hide a weight / bias mix-up)."
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) if k.removeprefix('detector.') in OUT_NORMS else v
            for k, v in sd.items()}


@pytest.mark.parametrize('layout', ['dn_ars_detr', 'mutdet'])
def test_swin_round_trip_is_exact(small_swin, layout):
    "No allow and no warning, both ways, the output norms included: every key, in order, every tensor and dtype."
    sd = _with_random_out_norms(small_swin.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        off = to_official(sd, layout=layout)
        assert detect_layout(off) == layout
        back = from_official(off, reference=small_swin)
    _same(back, sd)


def test_swin_output_norms_map_one_to_one(small_swin, tmp_path):
    "rsrepro's backbone_norms.norm{1..3} are the official backbone.norm{1..3}: the same tensors, both directions."
    sd = _with_random_out_norms(small_swin.state_dict())
    assert set(OUT_NORMS) <= set(sd)
    off = to_official(sd, layout='mutdet')
    for ours, theirs in OUT_NORMS.items():
        assert off[theirs].dtype == sd[ours].dtype and torch.equal(off[theirs], sd[ours]), theirs
    assert [off[f'backbone.norm{n}.weight'].shape[0] for n in (1, 2, 3)] == [192, 384, 768]
    keys = list(off)                                      # mmdet's order: the stages, then norm1..3, then the neck
    last_stage = max(i for i, k in enumerate(keys) if k.startswith('backbone.stages.'))
    first_neck = min(i for i, k in enumerate(keys) if k.startswith('neck.'))
    assert all(last_stage < keys.index(k) < first_neck for k in OUT_NORMS.values())
    # from an official checkpoint whose norms differ from the model's: they arrive unchanged, the model loads them strictly
    g = torch.Generator().manual_seed(2)
    official = {k: torch.randn(v.shape, generator=g) if k in OUT_NORMS.values() else v for k, v in off.items()}
    ours = from_official(official, reference=small_swin)
    for o, t in OUT_NORMS.items(): assert torch.equal(ours[o], official[t]), o
    twin = ARSDETR(**SMALL_SWIN, backbone='swin_t')
    twin.load_state_dict(ours, strict=True)
    for o, t in OUT_NORMS.items(): assert torch.equal(twin.state_dict()[o], official[t]), o
    # an official Swin checkpoint without the output norms is not the model's: the reference check names the keys
    with pytest.raises(ConversionError, match=r'missing: .*backbone_norms\.norm1\.weight') as e:
        from_official({k: v for k, v in off.items() if k not in OUT_NORMS.values()}, reference=small_swin)
    assert sorted(e.value.keys) == sorted(OUT_NORMS)
    # and, through files, nothing made, dropped or allowed
    torch.save({'model': sd}, tmp_path/'ours.pth')
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        r = convert_checkpoint(tmp_path/'ours.pth', tmp_path/'off.pth', layout='mutdet')
        assert r['made'] == [] and r['dropped'] == [] and r['allowed'] == [] and 'inexact' not in r
        r = convert_checkpoint(tmp_path/'off.pth', tmp_path/'back.pth', 'from_official')
        assert r['layout'] == 'mutdet' and r['made'] == [] and r['dropped'] == [] and r['allowed'] == []
    _same(torch.load(tmp_path/'back.pth', weights_only=True)['model'], sd)


def test_official_names_of_the_swin_t_models(small_swin):
    off = to_official(small_swin.state_dict(), layout='mutdet')
    backbone = {k for k in off if k.startswith('backbone.')}
    official = set(expand(SWIN_T_BACKBONE))
    assert backbone == official, (sorted(backbone - official)[:5], sorted(official - backbone)[:5])
    torch.manual_seed(0)                                  # neck, transformer and heads: the ResNet model's names
    r18 = to_official(ARSDETR(**SMALL_SWIN, backbone='resnet18').state_dict(), layout='mutdet')
    assert set(off) - backbone == {k for k in r18 if not k.startswith('backbone.')}
    assert official_keys(small_swin, 'mutdet') == {k: tuple(v.shape) for k, v in off.items()}
    sh = lambda k: tuple(off[k].shape)
    assert sh('backbone.patch_embed.projection.weight') == (96, 3, 4, 4) and sh('backbone.patch_embed.norm.weight') == (96,)
    for s, (depth, heads) in enumerate(zip((2, 2, 6, 2), (3, 6, 12, 24))):
        C, B = 96 * 2 ** s, f'backbone.stages.{s}.blocks.{depth - 1}.'
        assert sh(B + 'attn.w_msa.qkv.weight') == (3 * C, C) and sh(B + 'attn.w_msa.proj.weight') == (C, C)
        assert sh(B + 'attn.w_msa.relative_position_bias_table') == (169, heads)
        assert sh(B + 'attn.w_msa.relative_position_index') == (49, 49)
        assert sh(B + 'ffn.layers.0.0.weight') == (4 * C, C) and sh(B + 'ffn.layers.1.weight') == (C, 4 * C)
        if s < 3:
            D = f'backbone.stages.{s}.downsample.'
            assert sh(D + 'norm.weight') == (4 * C,) and sh(D + 'reduction.weight') == (2 * C, 4 * C)
        if s > 0: assert sh(f'backbone.norm{s}.weight') == (C,)
    assert sh('neck.convs.0.conv.weight') == (32, 192, 1, 1) and sh('neck.extra_convs.0.conv.weight') == (32, 768, 3, 3)
    assert set(_renamed(small_swin, 'mutdet')) == set(small_swin.state_dict())    # every rsrepro tensor has a name


def test_swin_in_the_mutdet_pretraining_layout(small_swin):
    "MutDet_swin_RSDet4.py: the Swin detector under detector.*, the backbone keys unprefixed on the official side."
    mut = MutDet(detector=small_swin, depth=1, mlp_dim=128).eval()
    sd = _with_random_out_norms(mut.state_dict())
    assert {'detector.' + k for k in OUT_NORMS} <= set(sd)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        pre = to_official(sd, layout='mutdet_pretrain')
        assert detect_layout(pre) == 'mutdet_pretrain'
        assert {k for k in pre if k.startswith('backbone.')} == set(expand(SWIN_T_BACKBONE))
        for ours, theirs in OUT_NORMS.items(): assert torch.equal(pre[theirs], sd['detector.' + ours]), theirs
        _same(from_official(pre, reference=mut), sd)


def _official_patch_merging(x, hw, sd, pre):
    "mmdet/models/utils/transformer.py's PatchMerging.forward (kernel_size 2, stride 2, padding 'corner'), official tensors."
    B, L, C = x.shape
    H, W = hw
    x = x.view(B, H, W, C).permute([0, 3, 1, 2])
    pad_h = max((math.ceil(H / 2) - 1) * 2 + (2 - 1) * 1 + 1 - H, 0)   # AdaptivePadding.get_pad_shape
    pad_w = max((math.ceil(W / 2) - 1) * 2 + (2 - 1) * 1 + 1 - W, 0)
    x = F.pad(x, [0, pad_w, 0, pad_h])
    H, W = x.shape[-2:]
    x = torch.nn.Unfold(kernel_size=2, dilation=1, padding=0, stride=2)(x)
    out_hw = ((H - 1 * (2 - 1) - 1) // 2 + 1, (W - 1 * (2 - 1) - 1) // 2 + 1)
    x = x.transpose(1, 2)
    x = F.layer_norm(x, (4 * C,), sd[pre + 'norm.weight'], sd[pre + 'norm.bias'])
    return F.linear(x, sd[pre + 'reduction.weight']), out_hw


def test_swin_patch_merging_matches_the_official_unfold_layer():
    "torchvision's cat(x0, x1, x2, x3) against mmdet's nn.Unfold order: equal outputs after conversion, odd sizes too."
    from torchvision.models.swin_transformer import PatchMerging
    torch.manual_seed(0)
    C = 12
    tv = PatchMerging(C).eval()
    with torch.no_grad(): tv.norm.weight.normal_(); tv.norm.bias.normal_()       # so that the norm's order shows
    ours = {f'backbone.features.4.{k}': v for k, v in tv.state_dict().items()}
    off = to_official(ours, layout='mutdet')
    pre = 'backbone.stages.1.downsample.'
    assert set(off) == {pre + 'norm.weight', pre + 'norm.bias', pre + 'reduction.weight'}
    plain = {pre + k[len('backbone.features.4.'):]: v for k, v in ours.items()}  # the names alone, no reordering
    for H, W in ((8, 10), (7, 9), (6, 5)):
        x = torch.randn(2, H, W, C)
        with torch.no_grad():
            a = tv(x)                                                            # [B, H/2, W/2, 2C]
            b, (h, w) = _official_patch_merging(x.reshape(2, H * W, C), (H, W), off, pre)
            c, _ = _official_patch_merging(x.reshape(2, H * W, C), (H, W), plain, pre)
        assert a.shape == (2, h, w, 2 * C)
        torch.testing.assert_close(a.reshape(2, h * w, 2 * C), b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a.reshape(2, h * w, 2 * C), c, atol=1e-2)
    # mmdet's swin_converter (mmdet/models/utils/ckpt_convert.py) does the same to the original Swin's (= torchvision's) order
    def correct_unfold_reduction_order(x):
        out_channel, in_channel = x.shape
        x = x.reshape(out_channel, 4, in_channel // 4)
        return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)

    def correct_unfold_norm_order(x):
        in_channel = x.shape[0]
        x = x.reshape(4, in_channel // 4)
        return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)
    assert torch.equal(off[pre + 'reduction.weight'], correct_unfold_reduction_order(tv.reduction.weight))
    for p in ('weight', 'bias'): assert torch.equal(off[pre + 'norm.' + p], correct_unfold_norm_order(getattr(tv.norm, p)))
    _same(from_official(off, layout='mutdet'), ours)


def _mmdet_relative_position_index(Wh, Ww):
    "WindowMSA.__init__'s buffer (mmdet/models/backbones/swin.py: double_step_seq, then flip)."
    def double_step_seq(step1, len1, step2, len2):
        seq1 = torch.arange(0, step1 * len1, step1)
        seq2 = torch.arange(0, step2 * len2, step2)
        return (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    rel_index_coords = double_step_seq(2 * Ww - 1, Wh, 1, Ww)
    return (rel_index_coords + rel_index_coords.T).flip(1).contiguous()


def _official_window_msa(x, sd, pre, heads, window=(7, 7)):
    "WindowMSA.forward without a mask (a non-shifted window), on the official tensors."
    B, N, C = x.shape
    qkv = F.linear(x, sd[pre + 'qkv.weight'], sd[pre + 'qkv.bias']).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    bias = sd[pre + 'relative_position_bias_table'][sd[pre + 'relative_position_index'].view(-1)].view(
        window[0] * window[1], window[0] * window[1], -1)
    attn = torch.softmax(attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0), dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), sd[pre + 'proj.weight'], sd[pre + 'proj.bias'])


def test_swin_window_attention_and_its_index():
    "torchvision's window attention = mmdet's WindowMSA on the converted tensors; the index is mmdet's, made if absent."
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    torch.manual_seed(0)
    C, heads = 24, 3
    tv = ShiftedWindowAttention(C, [7, 7], [0, 0], heads).eval()
    with torch.no_grad(): tv.relative_position_bias_table.normal_()
    ours = {f'backbone.features.3.1.attn.{k}': v for k, v in tv.state_dict().items()}
    off = to_official(ours, layout='mutdet')
    pre = 'backbone.stages.1.blocks.1.attn.w_msa.'
    assert set(off) == {pre + k for k in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias',
                                          'relative_position_bias_table', 'relative_position_index')}
    assert torch.equal(off[pre + 'relative_position_index'], _mmdet_relative_position_index(7, 7))
    x = torch.randn(2, 7, 7, C)
    with torch.no_grad():
        torch.testing.assert_close(tv(x).reshape(2, 49, C), _official_window_msa(x.reshape(2, 49, C), off, pre, heads),
                                   rtol=1e-5, atol=1e-5)
    _same(from_official(off, layout='mutdet'), ours)
    # a checkpoint saved without the buffer: made from the bias table's size
    _same(from_official({k: v for k, v in off.items() if not k.endswith('index')}, layout='mutdet'), ours)
    with pytest.raises(ConversionError, match="not Swin's index"):
        from_official({**off, pre + 'relative_position_index': off[pre + 'relative_position_index'].T}, layout='mutdet')


def test_swin_unknown_keys_and_files(small_swin, tmp_path):
    "Swin keys no rule knows are errors (the ResNet rule takes conv1, bn1, layer1..4 only); checkpoint files report."
    off = to_official(small_swin.state_dict(), layout='mutdet')
    for k in ('backbone.absolute_pos_embed', 'backbone.norm0.weight', 'backbone.norm4.weight',
              'backbone.stages.0.blocks.0.attn.w_msa.logit_scale'):
        with pytest.raises(ConversionError, match=re.escape(k)): from_official({**off, k: torch.zeros(1)})
    for k in ('backbone.features.1.0.attn.cpb_mlp.0.weight', 'backbone_norms.norm0.weight'):
        with pytest.raises(ConversionError, match=re.escape(k)): to_official({**small_swin.state_dict(), k: torch.zeros(1)})
    # a file round trip of a partial Swin state dict (the output norms and one merging layer): what is reported
    part = {f'backbone_norms.norm{n}.{p}': torch.randn(c) for n, c in ((1, 192), (2, 384), (3, 768)) for p in ('weight', 'bias')}
    part.update({'backbone.features.2.norm.weight': torch.randn(384), 'backbone.features.2.reduction.weight': torch.randn(192, 384)})
    torch.save({'model': part}, tmp_path/'ours.pth')
    r = convert_checkpoint(tmp_path/'ours.pth', tmp_path/'off.pth', layout='mutdet')
    assert r['made'] == [] and r['dropped'] == [] and r['allowed'] == [] and r['tensors'] == len(part)
    off = torch.load(tmp_path/'off.pth', weights_only=True)['state_dict']
    assert set(off) == set(OUT_NORMS.values()) | {'backbone.stages.0.downsample.norm.weight',
                                                  'backbone.stages.0.downsample.reduction.weight'}
    r = convert_checkpoint(tmp_path/'off.pth', tmp_path/'back.pth', 'from_official', layout='mutdet')
    assert r['made'] == [] and r['dropped'] == [] and r['allowed'] == []
    _same(torch.load(tmp_path/'back.pth', weights_only=True)['model'], part)
