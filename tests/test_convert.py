"""The ARS-DETR weight converter (`rsrepro.convert`, `rsrepro convert`): rsrepro's `ARSDETR` <-> the official
(httle/ARS-DETR, floatingstarZ/MutDet; mmrotate 0.x) state-dict names, checked against the official key list written
out below from the official module code, round trips key for key and output for output, and the errors."""
import itertools
import re

import pytest
import torch

from rsrepro.ars_detr import ARSDETR
from rsrepro.convert import (RULES, ConversionError, Fused, OneSided, Rename, convert_checkpoint, detect_layout,
                             from_official, official_keys, to_official)

# ---------------------------------------------------------------------------------------------------------------------
# The official R50 DN-ARS-DETR (configs/ars_detr/dn_arw_arm_arcsl_rdetr_r50_dota.py), read from the code:
# - mmdet 2.x ResNet-50 (Bottleneck: conv1..3 / bn1..3, downsample.0 / .1 in the first block of each stage), BN =
#   nn.BatchNorm2d with num_batches_tracked; ChannelMapper(512, 1024, 2048 -> 256, GN, num_outs=4): ConvModule
#   `conv` (bias=False before a norm) + `gn`, one extra 3x3 conv on C5;
# - DNARSDeformableDETRHead (ARSDeformableDETRHead._init_layers + label_embedding(num_classes, 256)): with_box_refine,
#   as_two_stage -> cls/reg/angle branches cloned 6 + 1 = 7 times, reg = Sequential(Linear, ReLU, Linear, ReLU,
#   Linear) -> linears 0, 2, 4; no query_embedding (two-stage), no input_proj/fc_cls (_init_layers overridden);
# - DNARSRotatedDeformableDetrTransformer: level_embeds, enc_output(_norm), pos_trans(_norm) (built, unused),
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
OFFICIAL_DN_ARS_DETR_R50 = [
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


def _zero_neck_bias(m):
    with torch.no_grad():
        for s in m.neck: s[0].bias.zero_()
    return m


@pytest.fixture(scope='module')
def small():
    torch.manual_seed(0)
    return _zero_neck_bias(ARSDETR(**SMALL, dropout=0.0).eval())


@pytest.fixture(scope='module')
def r50():
    torch.manual_seed(0)
    return _zero_neck_bias(ARSDETR())


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
    # official_keys needs no zero biases: names and shapes only
    assert official_keys(ARSDETR()) == {k: tuple(v.shape) for k, v in off.items()}
    sh = lambda k: tuple(off[k].shape)
    H, L, P, D = 8, 4, 4, 256
    assert sh(T + 'encoder.layers.0.attentions.0.sampling_offsets.weight') == (H * L * P * 2, D)
    assert sh(T + 'decoder.layers.5.attentions.1.sampling_offsets.weight') == (H * L * P * 2, D)
    assert sh(T + 'decoder.layers.5.attentions.1.attention_weights.weight') == (H * L * P, D)
    assert sh(T + 'decoder.layers.0.attentions.0.attn.in_proj_weight') == (3 * D, D)
    assert sh(T + 'encoder.layers.3.ffns.0.layers.0.0.weight') == (1024, D)
    assert sh(T + 'encoder.layers.3.ffns.0.layers.1.weight') == (D, 1024)
    assert sh(T + 'level_embeds') == (L, D) and sh(T + 'query_embed.weight') == (300, D)
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


def test_a_nonzero_neck_bias_is_not_dropped_silently():
    torch.manual_seed(0)
    m = ARSDETR(**SMALL)                                # PyTorch's default init: non-zero conv biases
    with pytest.raises(ConversionError, match=r'neck\.0\.0\.bias.*ChannelMapper') as e: to_official(m.state_dict())
    assert set(e.value.keys) == {f'neck.{i}.0.bias' for i in range(4)}
    with pytest.warns(UserWarning, match='neck'):
        off = to_official(m.state_dict(), allow=[r'neck\.\d\.0\.bias'])
    back = from_official(off)
    assert not back['neck.2.0.bias'].any() and torch.equal(back['neck.2.0.weight'], m.state_dict()['neck.2.0.weight'])


def test_layouts_are_told_apart_and_non_dn_checkpoints_refused(small):
    off = to_official(small.state_dict())
    mut = to_official(small.state_dict(), layout='mutdet')
    assert detect_layout(off) == 'dn_ars_detr' and detect_layout({'state_dict': mut}) == 'mutdet'
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


def test_every_rsrepro_parameter_has_an_official_name(small):
    "No ARSDETR parameter (label_embedding included) is left to a one-sided rule except the neck biases."
    one_sided = [k for k in small.state_dict() if k not in {v for v in _renamed(small)}]
    assert sorted(one_sided) == [f'neck.{i}.0.bias' for i in range(4)]


def _renamed(model):
    from rsrepro.convert import _match
    for k in model.state_dict():
        if any(isinstance(r, Rename) and _match(r.ours, k) is not None for r in RULES): yield k


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
