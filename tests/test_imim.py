"Tests of rsrepro.imim: conventional and interactive (cross-attention) MIM with a Swin encoder."
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import rsrepro.imim  # noqa: F401  (registers the imim models)
from rsrepro.core import MODELS, create_model
from rsrepro.imim import InteractionModule, InteractiveMIMSwin, token_mask_from_patch_mask

TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
NAMES = ('imim_swin_tiny_conventional', 'imim_swin_tiny_interactive', 'imim_swin_tiny_interactive_qunmasked')


def tiny(**kw):
    return InteractiveMIMSwin(**{**TINY, 'img_size': 64, **kw})


def pixel_mask(mask, C, factor=4):
    "[B, h, w] -> [B, C, h*factor, w*factor]"
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None].expand(-1, C, -1, -1)


# (1) no leak ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cfg', [dict(), dict(mask_query='encoder'), dict(mask_patch_size=16, img_size=128),
                                 dict(mask_patch_size=16, img_size=128, token_mask_rule='majority'),
                                 dict(query='unmasked'), dict(interactive=False)])
def test_no_leak_from_masked_pixels(cfg):
    torch.manual_seed(0)
    m = tiny(in_chans=4, **cfg).eval()
    S = m.img_size[0]
    x = torch.randn(2, 4, S, S)
    mask = m.random_mask(2, torch.Generator().manual_seed(1))
    a = m(x, mask=mask, return_features=True)
    tm = a['token_mask']
    assert tm.any() and (~tm).any()
    tpix = pixel_mask(tm, 4, 32)                                  # pixels of the masked stage-4 tokens
    # new values at the masked pixels: nothing changes at all (they are replaced before the encoder)
    b = m(torch.where(pixel_mask(mask, 4), torch.randn_like(x) * 10, x), mask=mask, return_features=True)
    assert torch.allclose(a['pred'][tpix], b['pred'][tpix], atol=1e-5)
    assert torch.allclose(a['features'][tm], b['features'][tm], atol=1e-5)
    if a['cross'] is not None:
        assert torch.allclose(a['cross'][tm], b['cross'][tm], atol=1e-5)
    # new values at the unmasked pixels: the reconstruction of the masked tokens changes
    c = m(torch.where(pixel_mask(mask, 4), x, x + torch.randn_like(x)), mask=mask, return_features=True)
    assert (a['pred'][tpix] - c['pred'][tpix]).abs().max() > 1e-3


def test_masked_outputs_read_only_unmasked_features():
    "Eq. 1: the outputs at masked positions depend on K_u, V_u only, not on the features at masked positions."
    torch.manual_seed(0)
    for mq in ('learned', 'encoder'):
        im = InteractionModule(32, (4, 4), num_heads=4, depth=2, mask_query=mq).eval()
        f = torch.randn(3, 16, 32)
        tm = torch.rand(3, 16) < 0.6
        tm[:, 0], tm[:, 1] = True, False
        merged, z = im(f, tm)
        assert torch.equal(merged[~tm], f[~tm]) and torch.equal(merged[tm], z[tm])
        f2 = f.clone(); f2[tm] = torch.randn_like(f2[tm]) * 10
        if mq == 'learned':
            assert torch.allclose(im(f2, tm)[0][tm], merged[tm], atol=1e-5)
        f3 = f.clone(); f3[~tm] = f3[~tm] + torch.randn_like(f3[~tm])
        assert (im(f3, tm)[0][tm] - merged[tm]).abs().max() > 1e-3
    # Q unmasked: outputs kept at unmasked positions, encoder features at masked ones; they read K_m, V_m
    im = InteractionModule(32, (4, 4), num_heads=4, query='unmasked').eval()
    merged, z = im(f, tm)
    assert torch.equal(merged[tm], f[tm]) and torch.equal(merged[~tm], z[~tm])
    f4 = f.clone(); f4[tm] = f4[tm] + torch.randn_like(f4[tm])
    assert (im(f4, tm)[0][~tm] - merged[~tm]).abs().max() > 1e-3


def test_no_visible_token_gives_zero_attention_not_nan():
    im = InteractionModule(32, (2, 2), num_heads=2).eval()
    merged, z = im(torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
    assert torch.isfinite(merged).all()


# (2) loss region -----------------------------------------------------------------------------------------------
def test_loss_covers_masked_pixels_or_all():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for loss_on in ('masked', 'all'):
        m = tiny(loss_on=loss_on, mask_patch_size=16)
        out = m(x, generator=torch.Generator().manual_seed(2))
        pred, mask = out['pred'].detach(), out['mask']
        pm = pixel_mask(mask, 3)
        ref = ((pred - x) ** 2)[pm].mean() if loss_on == 'masked' else F.mse_loss(pred, x)
        assert torch.allclose(out['loss'], ref, atol=1e-6)
        outside = torch.where(pm, pred, pred + 100.0)
        inside = torch.where(pm, pred + 1.0, pred)
        assert not torch.allclose(m.forward_loss(x, inside, mask), out['loss'])
        if loss_on == 'masked':
            assert torch.equal(m.forward_loss(x, outside, mask), m.forward_loss(x, pred, mask))
        else:
            assert not torch.allclose(m.forward_loss(x, outside, mask), out['loss'])
    assert tiny().loss_on == 'all' and tiny().norm_pix_loss is False          # the stated defaults


def test_norm_pix_target_is_blockwise_standardised():
    m = tiny(norm_pix_loss=True, mask_patch_size=32, in_chans=2)
    x = torch.randn(1, 2, 64, 64) * 3 + 5
    t = m.loss_target(x)
    blk = x[0, :, :32, 32:]                                                    # one 32-px block, both channels
    assert torch.allclose(t[0, :, :32, 32:], (blk - blk.mean()) / (blk.var() + 1e-6) ** .5, atol=1e-5)


# (3) mask sizes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [16, 32, 64])
def test_mask_sizes_exact_block_counts(size):
    m = tiny(img_size=128, mask_patch_size=size)
    out = m(torch.randn(3, 3, 128, 128), return_features=True)
    mask = out['mask']
    assert mask.shape == (3, 32, 32)
    k = size // 4
    blocks = mask.reshape(3, 32 // k, k, 32 // k, k).float().mean((2, 4))
    assert ((blocks == 0) | (blocks == 1)).all()                               # whole blocks only
    n = (128 // size) ** 2
    assert (blocks.sum((1, 2)) == math.ceil(n * 0.6)).all()                    # 16: 39/64, 32: 10/16, 64: 3/4
    if size >= 32:                                                             # aligned with the 32-px tokens
        assert torch.equal(out['token_mask'].float(), blocks.repeat_interleave(size // 32, 1).repeat_interleave(size // 32, 2))


def test_token_mask_rules():
    mk = torch.zeros(1, 8, 8, dtype=torch.bool)
    mk[0, :2, :2] = True                     # token (0,0): 1/4 masked
    mk[0, :4, 4:] = True                     # token (0,1): fully masked
    mk[0, 4:, :4] = True; mk[0, 6:, :2] = False    # token (1,0): 3/4 masked
    assert token_mask_from_patch_mask(mk, 4, 'any').tolist() == [[[True, True], [True, False]]]
    assert token_mask_from_patch_mask(mk, 4, 'all').tolist() == [[[False, True], [False, False]]]
    assert token_mask_from_patch_mask(mk, 4, 'majority').tolist() == [[[False, True], [True, False]]]


# (4) channels, registry, errors --------------------------------------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('C', [3, 4])
def test_registered_models_any_channels(name, C):
    assert name in MODELS
    m = create_model(name, img_size=64, in_chans=C, mask_patch_size=16, mask_ratio=0.5, **TINY)
    out = m({'image': torch.randn(2, C, 64, 64)})
    assert set(out) == {'loss', 'pred', 'mask'}
    assert out['pred'].shape == (2, C, 64, 64) and out['mask'].dtype == torch.bool and out['mask'].shape == (2, 16, 16)
    assert (out['mask'].sum((1, 2)) == 8 * 16).all()                           # ceil(16 * 0.5) = 8 blocks of 4x4
    assert out['loss'].ndim == 0 and torch.isfinite(out['loss'])
    assert (m.interaction is None) == (name == NAMES[0])


def test_swin_tiny_defaults_and_errors():
    m = create_model('imim_swin_tiny_interactive', img_size=64)
    assert [len(l.blocks) for l in m.encoder.layers] == [2, 2, 6, 2] and m.encoder.embed_dim == 96
    assert m.mask_patch_size == 32 and m.mask_ratio == 0.6 and m.stride == 32 and m.num_features == 768
    with pytest.raises(ValueError, match='in_chans=3'):
        tiny()(torch.randn(1, 4, 64, 64))
    with pytest.raises(KeyError, match='rgb'):
        tiny(input_key='rgb')({'image': torch.randn(1, 3, 64, 64)})
    with pytest.raises(ValueError, match='query'):
        tiny(query='both')
    with pytest.raises(ValueError, match='stride 32'):
        tiny(img_size=48)
    with pytest.raises(ValueError, match='mask_patch_size'):
        tiny(mask_patch_size=24)
    with pytest.raises(ValueError, match='loss_on'):
        tiny(loss_on='visible')


# (5) encoder weights -------------------------------------------------------------------------------------------
def test_encoder_state_dict_loads_into_timm_swin():
    torch.manual_seed(0)
    m = create_model('imim_swin_tiny_interactive', img_size=64, in_chans=4).eval()
    sd = m.encoder_state_dict()
    assert all(k.split('.')[0] in ('patch_embed', 'layers', 'norm') for k in sd)
    assert not any('mask_token' in k or 'interaction' in k or 'decoder' in k for k in sd)
    sw = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, in_chans=4, img_size=64,
                           num_classes=0).eval()
    sw.load_state_dict(sd, strict=True)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        assert torch.allclose(sw.forward_features(x), m.forward_features(x), atol=1e-5)
        # and the masked forward uses the same weights: an empty mask gives the same features
        assert torch.allclose(m.forward_encoder(x, torch.zeros(1, 16, 16, dtype=torch.bool)), sw.forward_features(x), atol=1e-5)


# (6) training lowers the loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize('name', [NAMES[1], NAMES[0]])
def test_adamw_steps_lower_loss(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, in_chans=4, **TINY)
    x = torch.rand(2, 4, 64, 64)
    mask = m.random_mask(2, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
    with torch.no_grad(): first = m(x, mask=mask)['loss'].item()
    for _ in range(12):
        loss = m({'image': x}, mask=mask)['loss']
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): last = m(x, mask=mask)['loss'].item()
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize('name', NAMES)
def test_every_parameter_gets_a_gradient(name):
    "DDP (find_unused_parameters=False) needs a gradient for every parameter under the default options."
    m = create_model(name, img_size=64, **TINY)
    m(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))['loss'].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    if name != NAMES[0]:
        m = create_model(name, img_size=64, mask_query='encoder', **TINY)
        assert m.interaction.query_embed is None


def test_encoder_state_dict_for_timm_features_only():
    torch.manual_seed(0)
    m = tiny(in_chans=4).eval()
    fl = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, in_chans=4, img_size=64,
                           features_only=True, **TINY).eval()
    fl.load_state_dict(m.encoder_state_dict(features_only=True), strict=True)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        feats = fl(x)
        ref = m.encoder.layers(m.encoder.patch_embed(x))          # stage-4 output before the final norm
    assert len(feats) == 4 and torch.allclose(feats[-1], ref, atol=1e-5)           # timm gives NHWC here
