"Tests of rsrepro.masking: sin-cos embeddings, patchify, MAE / SimMIM / Dirichlet masking."
import math

import numpy as np
import pytest
import torch

from rsrepro.masking import (dirichlet_masking, get_1d_sincos_pos_embed, get_2d_sincos_pos_embed, mask_to_ids,
                             num_masked_blocks, num_visible_tokens, patchify, random_masking, random_modality_subsets,
                             simmim_mask, unpatchify)


def test_sincos_values_by_hand():
    # D=4 -> per axis D/2=2 channels: omega = [1], [sin(p), cos(p)]
    pe = get_2d_sincos_pos_embed(4, (2, 3))
    assert pe.shape == (6, 4)
    r, c = 1, 2                                    # token index r*3 + c = 5
    expect = torch.tensor([math.sin(c), math.cos(c), math.sin(r), math.cos(r)])
    assert torch.allclose(pe[5], expect, atol=1e-6)
    pe = get_2d_sincos_pos_embed(8, 2, cls_token=True)
    assert pe.shape == (5, 8) and (pe[0] == 0).all()
    # D=8: omega = [1, 1/100] on 4 channels per axis
    one = get_1d_sincos_pos_embed(4, 3)
    assert torch.allclose(one[2], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]), atol=1e-6)


def test_sincos_bad_dim():
    with pytest.raises(ValueError, match='multiple of 4'):
        get_2d_sincos_pos_embed(6, 4)


@pytest.mark.parametrize('C,H,W,p', [(1, 16, 16, 4), (4, 32, 48, 16), (13, 24, 8, 8)])
def test_patchify_roundtrip(C, H, W, p):
    im = torch.randn(3, C, H, W)
    x = patchify(im, p)
    assert x.shape == (3, H * W // p // p, p * p * C)
    assert torch.equal(unpatchify(x, p, C, (H // p, W // p)), im)
    # a patch holds exactly the pixels of its window
    w = W // p
    i = min(1, H // p - 1) * w + (w - 1)
    r, c = divmod(i, w)
    assert torch.equal(x[0, i], im[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(1, 2, 0).reshape(-1))


def test_unpatchify_errors():
    with pytest.raises(ValueError, match='not a square'):
        unpatchify(torch.zeros(1, 6, 16), 2, 4)
    with pytest.raises(ValueError, match='last dim'):
        unpatchify(torch.zeros(1, 4, 15), 2, 4)


@pytest.mark.parametrize('L,ratio,keep', [(196, 0.75, 49), (100, 0.9, 10), (10, 0.5, 5), (7, 0.5, 3), (64, 0.0, 64)])
def test_random_masking_counts(L, ratio, keep):
    x = torch.randn(5, L, 8)
    xk, m, ids_restore, ids_keep = random_masking(x, ratio, torch.Generator().manual_seed(0))
    assert num_visible_tokens(L, ratio) == keep
    assert xk.shape == (5, keep, 8) and ids_keep.shape == (5, keep)
    assert m.dtype == torch.bool and ((~m).sum(1) == keep).all()
    for b in range(5):
        assert torch.equal(xk[b], x[b, ids_keep[b]])
        assert not m[b, ids_keep[b]].any()
        assert torch.equal(torch.sort(ids_restore[b]).values, torch.arange(L))


def test_random_masking_generator_and_per_sample():
    x = torch.randn(4, 50, 2)
    a = random_masking(x, 0.6, torch.Generator().manual_seed(3))[1]
    b = random_masking(x, 0.6, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 4
    with pytest.raises(ValueError):
        random_masking(x, 1.0)


def test_mask_to_ids_inverts():
    m = torch.tensor([[True, False, True, False], [False, False, True, True]])
    k, r = mask_to_ids(m)
    assert k.tolist() == [[1, 3], [0, 1]]
    seq = torch.arange(4).expand(2, 4)
    shuffled = torch.gather(seq, 1, torch.argsort(r, 1))
    assert torch.equal(torch.gather(shuffled, 1, r), seq)
    with pytest.raises(ValueError, match='different visible counts'):
        mask_to_ids(torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize('size,mps', [(192, 16), (192, 32), (192, 64), ((128, 256), 32)])
def test_simmim_block_mask(size, mps):
    H, W = (size, size) if isinstance(size, int) else size
    m = simmim_mask(4, size, mask_patch_size=mps, model_patch_size=4, mask_ratio=0.6,
                    generator=torch.Generator().manual_seed(1))
    s = mps // 4
    assert m.shape == (4, H // 4, W // 4) and m.dtype == torch.bool
    blocks = m[:, ::s, ::s]
    nb = (H // mps) * (W // mps)
    assert (blocks.flatten(1).sum(1) == math.ceil(nb * 0.6 - 1e-9)).all()
    assert torch.equal(m, blocks.repeat_interleave(s, 1).repeat_interleave(s, 2))


def test_simmim_counts_and_errors():
    assert num_masked_blocks(36, 0.6) == 22 and num_masked_blocks(100, 0.07) == 7 and num_masked_blocks(10, 0.25) == 3
    with pytest.raises(ValueError, match='not divisible by mask_patch_size'):
        simmim_mask(1, 100, 32, 4)
    with pytest.raises(ValueError, match='not a multiple of model_patch_size'):
        simmim_mask(1, 96, 32, 6)


def _visible(ms, names):
    return torch.stack([(~ms[n]).sum(1) for n in names], 1)


def test_dirichlet_exact_total_and_variation():
    L = {'optical': 256, 'sar': 256, 'dem': 256, 'map': 256}
    ms = dirichlet_masking(L, 512, 200, alpha=1.0, generator=torch.Generator().manual_seed(0))
    v = _visible(ms, L)
    assert (v.sum(1) == 512).all()
    # Dir(1,1,1,1): each share has mean 1/4 -> mean visible ~128, large spread
    assert (v.float().mean(0) - 128).abs().max() < 25
    assert v.float().std(0).min() > 40


def test_dirichlet_overflow_redistributed():
    L = {'a': 2, 'b': 5, 'c': 1000}
    ms = dirichlet_masking(L, 300, 300, alpha=1.0, generator=torch.Generator().manual_seed(1))
    v = _visible(ms, L)
    assert (v.sum(1) == 300).all() and (v[:, 0] <= 2).all() and (v[:, 1] <= 5).all()
    # num_visible == all tokens: everything visible
    ms = dirichlet_masking({'a': 3, 'b': 4}, 7, 10)
    assert not ms['a'].any() and not ms['b'].any()


def test_dirichlet_present_and_errors():
    L = {'s1': 64, 's2': 64, 'dem': 64}
    ms = dirichlet_masking(L, 50, 16, present=['s2'], generator=torch.Generator().manual_seed(2))
    assert ms['s1'].all() and ms['dem'].all() and ((~ms['s2']).sum(1) == 50).all()
    pres = random_modality_subsets(L, 64, generator=torch.Generator().manual_seed(3))
    assert (torch.stack(list(pres.values()), 1).any(1)).all(), 'never an empty subset'
    ms = dirichlet_masking(L, 60, 64, present=pres, generator=torch.Generator().manual_seed(4))
    for n in L:
        assert ms[n][~pres[n]].all()
    assert (_visible(ms, L).sum(1) == 60).all()
    with pytest.raises(ValueError, match='exceeds'):
        dirichlet_masking(L, 65, 2, present=['s1'])
    with pytest.raises(ValueError, match='not in tokens_per_modality'):
        dirichlet_masking(L, 10, 2, present=['rgb'])


def test_dirichlet_reproducible_and_alpha_effect():
    L = {'a': 100, 'b': 100}
    a = dirichlet_masking(L, 100, 8, generator=torch.Generator().manual_seed(9))
    b = dirichlet_masking(L, 100, 8, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a[n], b[n]) for n in L)
    # large alpha concentrates the split near 50/50
    ms = dirichlet_masking(L, 100, 100, alpha=1000.0, generator=torch.Generator().manual_seed(0))
    assert ((~ms['a']).sum(1) - 50).abs().max() <= 8


def test_dirichlet_cap_gives_min_of_num_visible_and_present_tokens():
    L = {'a': 16, 'b': 16, 'c': 16}
    pres = {'a': torch.tensor([True, True, True, False]), 'b': torch.tensor([True, True, False, False]),
            'c': torch.tensor([True, False, False, True])}
    ms = dirichlet_masking(L, 24, 4, present=pres, cap=True, generator=torch.Generator().manual_seed(0))
    assert _visible(ms, L).sum(1).tolist() == [24, 24, 16, 16]      # min(24, 16 * present modalities)
    for n in L: assert ms[n][~pres[n]].all()
    with pytest.raises(ValueError, match='cap=True'):                # without cap it is an error, as before
        dirichlet_masking(L, 24, 4, present=pres)


def test_dirichlet_per_batch_one_split_per_batch():
    L = {'a': 64, 'b': 64, 'c': 64}
    splits = []
    for seed in range(40):
        ms = dirichlet_masking(L, 96, 8, per_batch=True, generator=torch.Generator().manual_seed(seed))
        v = _visible(ms, L)
        assert (v == v[0]).all() and v[0].sum() == 96                 # identical counts within the batch
        allm = torch.cat([ms[n] for n in L], 1)
        assert not (allm == allm[0]).all()                             # positions differ per sample
        splits.append(v[0])
    s = torch.stack(splits).float() / 96
    assert s.std(0).min() > 0.1 and (s.mean(0) - 1 / 3).abs().max() < 0.1   # Dir(1,1,1) across batches
    # per-sample presence: the batch's lambda restricted to each sample's modalities, renormalised
    pres = {'a': torch.tensor([True, True, True]), 'b': torch.tensor([True, True, False]), 'c': torch.tensor([True, False, False])}
    ms = dirichlet_masking(L, 48, 3, present=pres, per_batch=True, alpha=1.0, generator=torch.Generator().manual_seed(3))
    v = _visible(ms, L).float()
    assert v.sum(1).tolist() == [48, 48, 48] and v[2].tolist() == [48, 0, 0]
    lam = v[0] / 48                                                   # sample 0 sees all three
    want = lam[:2] / lam[:2].sum() * 48                               # sample 1: a, b only
    assert (v[1, :2] - want).abs().max() <= 1.0
