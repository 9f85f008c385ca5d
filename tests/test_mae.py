"Tests of rsrepro.mae: the MAE baseline for any channel count."
import time

import pytest
import torch

from rsrepro.core import MODELS, create_model
from rsrepro.mae import ENCODER_PREFIXES, MaskedAutoencoderViT
from rsrepro.masking import patchify


def tiny(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return MaskedAutoencoderViT(**{**cfg, **kw})


@pytest.mark.parametrize('C', [1, 4, 13])
def test_any_channel_count(C):
    torch.manual_seed(0)
    m = tiny(in_chans=C)
    x = torch.randn(2, C, 32, 32)
    out = m({'image': x})
    assert set(out) == {'loss', 'pred', 'mask'}
    assert out['pred'].shape == (2, 16, 64 * C) and out['mask'].shape == (2, 16) and out['mask'].dtype == torch.bool
    assert out['loss'].ndim == 0 and torch.isfinite(out['loss'])
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    assert m.unpatchify(out['pred']).shape == (2, C, 32, 32)


@pytest.mark.parametrize('ratio,n_masked', [(0.75, 12), (0.5, 8), (0.9, 15), (0.0, 0)])
def test_exact_number_of_masked_tokens(ratio, n_masked):
    m = tiny(mask_ratio=ratio)
    out = m(torch.randn(3, 3, 32, 32))
    assert (out['mask'].sum(1) == n_masked).all()
    # override per call
    assert (m(torch.randn(2, 3, 32, 32), mask_ratio=0.25)['mask'].sum(1) == 4).all()


def test_loss_only_on_masked_patches():
    torch.manual_seed(0)
    for norm in (True, False):
        m = tiny(in_chans=2, img_size=(32, 48), norm_pix_loss=norm)
        x = torch.randn(2, 2, 32, 48)
        out = m(x, generator=torch.Generator().manual_seed(1))
        pred, mask = out['pred'].detach(), out['mask']
        p2 = pred.clone(); p2[~mask] = torch.randn_like(p2[~mask]) * 100
        assert torch.equal(m.forward_loss(x, p2, mask), m.forward_loss(x, pred, mask))
        p3 = pred.clone(); p3[mask] += 1.0
        assert not torch.allclose(m.forward_loss(x, p3, mask), m.forward_loss(x, pred, mask))
        # the returned loss is the masked MSE against the (normalised) patches
        t = patchify(x, 8)
        if norm: t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** .5
        ref = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
        assert torch.allclose(out['loss'], ref, atol=1e-5)


def test_visible_patches_get_no_gradient_from_loss():
    m = tiny()
    out = m(torch.randn(2, 3, 32, 32))
    g, = torch.autograd.grad(out['loss'], out['pred'])
    assert (g[~out['mask']] == 0).all() and (g[out['mask']] != 0).any()


def test_same_generator_same_mask_and_input_checks():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    a = m(x, generator=torch.Generator().manual_seed(3))
    b = m(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a['mask'], b['mask']) and torch.equal(a['loss'], b['loss'])
    with pytest.raises(ValueError, match='in_chans=3'):
        m(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match='img_size'):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(KeyError, match='image'):
        m({'rgb': x})
    with pytest.raises(ValueError, match='float'):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_registry_names_build():
    expect = {'mae_vit_tiny_patch16': (192, 3), 'mae_vit_small_patch16': (384, 6), 'mae_vit_base_patch16': (768, 12)}
    for name, (dim, heads) in expect.items():
        assert name in MODELS
        m = create_model(name, img_size=32, in_chans=5, decoder_depth=1, mask_ratio=0.5, input_key='s2')
        assert m.cls_token.shape[-1] == dim and len(m.blocks) == 12 and m.blocks[0].attn.num_heads == heads
        assert m.patch_embed.proj.in_channels == 5 and m.patch_size == 16 and m.input_key == 's2'
        assert m.decoder_pred.out_features == 16 * 16 * 5 and len(m.decoder_blocks) == 1
        assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad


def test_encoder_state_dict_loads_into_timm_vit():
    import timm
    torch.manual_seed(0)
    m = tiny(in_chans=13).eval()
    sd = m.encoder_state_dict()
    assert all(k.split('.')[0] in ENCODER_PREFIXES for k in sd) and not any(k.startswith('decoder') for k in sd)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, in_chans=13, embed_dim=32,
                                                           depth=2, num_heads=2, num_classes=0).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 13, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), m.forward_features(x), atol=1e-5)


def test_few_steps_reduce_loss():
    "20 AdamW steps on a fixed batch of near-constant images (masked patches predictable from visible ones)."
    torch.manual_seed(0)
    t0 = time.time()
    m = tiny(in_chans=4, norm_pix_loss=False)
    x = torch.randn(4, 4, 1, 1) + 0.1 * torch.randn(4, 4, 32, 32)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    eval_loss = lambda: m(x, generator=torch.Generator().manual_seed(123))['loss'].item()   # same mask each time
    before = eval_loss()
    for _ in range(20):
        loss = m(x)['loss']
        opt.zero_grad(); loss.backward(); opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    assert time.time() - t0 < 30, 'a tiny model must train in seconds (generous bound for a loaded CPU)'
