"Tests of rsrepro.imim: conventional and interactive (cross-attention) MIM with a Swin encoder."
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import rsrepro.imim  # noqa: F401  (registers the imim models)
from rsrepro.core import MODELS, create_model
from rsrepro.imim import InteractionModule, InteractiveMIMSwin, MIMDecoder, token_mask_from_patch_mask
from rsrepro.masking import simmim_mask

TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2)
TINY = dict(**TINY_SWIN, decoder_dim=32, decoder_num_heads=2)
NAMES = ('imim_swin_tiny_conventional', 'imim_swin_tiny_interactive', 'imim_swin_tiny_interactive_qunmasked')


def tiny(**kw):
    return InteractiveMIMSwin(**{**TINY, 'img_size': 64, **kw})


def pixel_mask(mask, C, factor=4):
    "[B, h, w] -> [B, C, h*factor, w*factor]"
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)[:, None].expand(-1, C, -1, -1)


# (1) no leak ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('cfg', [dict(), dict(mask_query='encoder'), dict(mask_patch_size=16, img_size=128),
                                 dict(mask_patch_size=16, img_size=128, query='unmasked'),
                                 dict(mask_patch_size=16, img_size=128, token_mask_rule='majority',
                                      token_visible_rule='majority'),
                                 dict(mask_patch_size=16, img_size=128, token_visible_rule='all'),
                                 dict(query='unmasked'), dict(interactive=False)])
def test_no_leak_from_masked_pixels(cfg):
    torch.manual_seed(0)
    m = tiny(in_chans=4, **cfg).eval()
    S = m.img_size[0]
    x = torch.randn(2, 4, S, S)
    mask = m.random_mask(2, torch.Generator().manual_seed(1))
    a = m(x, mask=mask, return_features=True)
    tm, tv = a['token_mask'], a['token_visible']
    assert tm.any() and tv.any() and (tm | tv).all()
    tpix = pixel_mask(tm, 4, 32)                                  # pixels of the masked stage-4 tokens
    # new values at the masked pixels: no output changes at all (they are replaced before the encoder)
    b = m(torch.where(pixel_mask(mask, 4), torch.randn_like(x) * 10, x), mask=mask, return_features=True)
    assert torch.allclose(a['pred'], b['pred'], atol=1e-5)
    assert torch.allclose(a['features'], b['features'], atol=1e-5)
    if a['cross'] is not None:
        assert torch.allclose(a['cross'], b['cross'], atol=1e-5)
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


def test_overlapping_token_sets():
    "A token in both sets (partly masked at 16 px) is a query (gets an output) and a key (its feature is read)."
    torch.manual_seed(0)
    f = torch.randn(2, 16, 32)
    tm = torch.zeros(2, 16, dtype=torch.bool); tm[:, :6] = True                # tokens 0-5 masked
    tv = ~tm; tv[:, 4:6] = True                                                 # tokens 4, 5 also unmasked
    for q in ('masked', 'unmasked'):
        im = InteractionModule(32, (4, 4), num_heads=4, query=q).eval()
        merged, z = im(f, tm, tv)
        out_at = tm if q == 'masked' else tv
        assert torch.equal(merged[out_at], z[out_at]) and torch.equal(merged[~out_at], f[~out_at])
        f2 = f.clone(); f2[:, 4] += torch.randn(32)                                  # token 4: a key in both variants
        changed = (im(f2, tm, tv)[0] - merged).abs().amax(-1) > 1e-4
        assert changed[out_at & ~torch.nn.functional.one_hot(torch.tensor(4), 16).bool()].any()
        # the partition (token_visible = ~token_mask) is the default
        assert torch.equal(im(f, tm)[0], im(f, tm, ~tm)[0])


@pytest.mark.parametrize('size', [16, 32, 64])
def test_every_image_has_queries_and_keys(size):
    "512 random masks of 256-px images at ratio 0.6: queries and keys in every image, finite interaction outputs."
    m = tiny(img_size=256, mask_patch_size=size, in_chans=4).eval()
    mask = m.random_mask(512, torch.Generator().manual_seed(size))
    tm, tv = m.token_mask(mask), m.token_visible(mask)
    assert tm.shape == (512, 8, 8)
    for queries, keys in ((tm, tv), (tv, tm)):                                  # Q masked, Q unmasked
        assert (queries.sum((1, 2)) > 0).all() and (keys.sum((1, 2)) > 0).all()
    assert (tm | tv).all()                                                      # every token is in a set
    # every masked pixel lies in a masked token, every visible pixel in an unmasked token
    assert (pixel_mask(tm, 1, 8)[:, 0] >= mask).all() and (pixel_mask(tv, 1, 8)[:, 0] >= ~mask).all()
    if size >= 32: assert torch.equal(tv, ~tm)                                  # aligned masks: a partition
    else:                                                                       # the partition would leave images keyless
        assert ((~tm).sum((1, 2)) == 0).sum() > 50
    torch.manual_seed(0)
    for q in ('masked', 'unmasked'):
        im = InteractionModule(32, (8, 8), num_heads=4, query=q).eval()
        with torch.no_grad(): merged, z = im(torch.randn(512, 64, 32), tm.flatten(1), tv.flatten(1))
        assert torch.isfinite(merged).all() and torch.isfinite(z).all()
        mm = tiny(img_size=256, mask_patch_size=size, in_chans=4, query=q).eval()
        fewest = tv.sum((1, 2)).argsort()[:2] if q == 'masked' else tm.sum((1, 2)).argsort()[:2]
        with torch.no_grad(): out = mm(torch.rand(2, 4, 256, 256), mask=mask[fewest], return_features=True)
        assert torch.isfinite(out['loss']) and torch.isfinite(out['pred']).all() and torch.isfinite(out['cross']).all()


def test_no_visible_token_gives_zero_attention_not_nan():
    im = InteractionModule(32, (2, 2), num_heads=2).eval()
    merged, z = im(torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
    assert torch.isfinite(merged).all()


# (1b) the three schemes differ only in the interaction ------------------------------------------------------------
@pytest.mark.parametrize('depth', [2, 0])
def test_q_unmasked_changes_masked_pixel_reconstruction(depth):
    "(a) Q unmasked: new interaction weights move the prediction at masked pixels (not with a per-token decoder)."
    torch.manual_seed(0)
    m = tiny(query='unmasked', decoder_depth=depth).eval()                     # 32-px masks: tokens fully (un)masked
    x = torch.randn(2, 3, 64, 64)
    mask = m.random_mask(2, torch.Generator().manual_seed(3))
    mp = pixel_mask(mask, 3)
    with torch.no_grad():
        a = m(x, mask=mask, return_features=True)
        assert torch.equal(a['token_visible'], ~a['token_mask'])
        for p in m.interaction.parameters(): p.add_(torch.randn_like(p) * 0.5)
        b = m(x, mask=mask)
    moved = (a['pred'] - b['pred'])[mp].abs().max().item()
    if depth > 0: assert moved > 1e-3, moved
    else: assert moved == 0.0, moved                                            # the old SimMIM-style decoder's failure


def test_conventional_prediction_has_no_interaction():
    "(b) conventional MIM: decoder(encoder); an interactive model with its weights and no interaction matches it exactly."
    torch.manual_seed(0)
    conv = tiny(interactive=False).eval()
    assert conv.interaction is None
    assert {k.split('.')[0] for k, _ in conv.named_parameters()} == {'encoder', 'mask_token', 'decoder'}
    x = torch.randn(2, 3, 64, 64)
    mask = conv.random_mask(2, torch.Generator().manual_seed(3))
    mp = pixel_mask(mask, 3)
    with torch.no_grad():
        ref = conv(x, mask=mask, return_features=True)
        assert ref['cross'] is None
        assert torch.equal(ref['pred'], conv.forward_decoder(conv.forward_encoder(x, mask)))
        for q in ('masked', 'unmasked'):
            m = tiny(query=q).eval()
            missing, unexpected = m.load_state_dict(conv.state_dict(), strict=False)
            assert not unexpected and missing and all(k.startswith('interaction.') for k in missing)
            with_interaction = m(x, mask=mask)['pred']
            assert (with_interaction - ref['pred'])[mp].abs().max() > 1e-3      # the interaction matters ...
            m.interaction = None                                                # ... and is the only difference
            assert torch.equal(m(x, mask=mask)['pred'], ref['pred'])


@pytest.mark.parametrize('size', [16, 32])
@pytest.mark.parametrize('query', ['masked', 'unmasked'])
def test_merged_features_keep_the_encoder_outside_the_queries(size, query):
    "(c) The merged map is the encoder's features where there is no query, the cross-attention outputs where there is."
    torch.manual_seed(0)
    m = tiny(img_size=128, mask_patch_size=size, query=query).eval()
    x = torch.randn(4, 3, 128, 128)
    mask = m.random_mask(4, torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = m(x, mask=mask, return_features=True)
        enc = m.forward_encoder(x, mask)
    queries = out['token_mask'] if query == 'masked' else out['token_visible']
    assert queries.any() and (~queries).any()
    assert torch.equal(out['features'][~queries], enc[~queries])
    assert torch.equal(out['features'][queries], out['cross'][queries])
    assert (out['features'][queries] - enc[queries]).abs().max() > 1e-3


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
        assert torch.equal(out['token_visible'], ~out['token_mask'])
    else:                                                                      # 2x2 blocks per token: any masked / any visible
        per_tok = blocks.reshape(3, 4, 2, 4, 2).sum((2, 4))
        assert torch.equal(out['token_mask'], per_tok > 0) and torch.equal(out['token_visible'], per_tok < 4)


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
    assert m.token_mask_rule == 'any' and m.token_visible_rule == 'any' and m.loss_on == 'all'
    assert isinstance(m.decoder, MIMDecoder) and len(m.decoder.blocks) == 2 and m.decoder.embed.out_features == 256
    assert m.decoder.blocks[0].attn.num_heads == 8 and m.decoder.pred.out_features == 32 * 32 * 3
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
    with pytest.raises(ValueError, match='token_visible_rule'):
        tiny(token_visible_rule='some')
    with pytest.raises(ValueError, match='decoder_dim'):
        tiny(decoder_dim=30, decoder_num_heads=4)
    with pytest.raises(ValueError, match='decoder_depth'):
        tiny(decoder_depth=-1)


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
@pytest.mark.parametrize('name', NAMES)
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
    for loss_on in ('all', 'masked'):
        m = create_model(name, img_size=64, loss_on=loss_on, **TINY)
        m(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))['loss'].backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, (loss_on, missing)
    if name != NAMES[0]:
        m = create_model(name, img_size=64, mask_query='encoder', **TINY)
        assert m.interaction.query_embed is None


def test_encoder_state_dict_for_timm_features_only():
    torch.manual_seed(0)
    m = tiny(in_chans=4).eval()
    fl = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, in_chans=4, img_size=64,
                           features_only=True, **TINY_SWIN).eval()
    fl.load_state_dict(m.encoder_state_dict(features_only=True), strict=True)
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        feats = fl(x)
        ref = m.encoder.layers(m.encoder.patch_embed(x))          # stage-4 output before the final norm
    assert len(feats) == 4 and torch.allclose(feats[-1], ref, atol=1e-5)           # timm gives NHWC here
