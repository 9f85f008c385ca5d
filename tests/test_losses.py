"Tests of rsrepro.losses with hand-computed values."
import math

import pytest
import torch
import torch.nn.functional as F

from rsrepro.losses import info_nce, masked_cross_entropy, masked_l1, masked_mse, normalize_patches


def test_masked_mse_and_l1_by_hand():
    # two samples, two patches of two values; errors per value written out
    pred = torch.tensor([[[1., 1.], [0., 0.]], [[2., 0.], [0., 3.]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[1, 0], [1, 1]])
    # per-patch MSE: [1, 0], [2, 4.5] -> masked mean (1 + 2 + 4.5) / 3 = 2.5
    assert math.isclose(masked_mse(pred, target, mask).item(), 2.5, rel_tol=1e-6)
    # per-patch L1: [1, 0], [1, 1.5] -> (1 + 1 + 1.5) / 3
    assert math.isclose(masked_l1(pred, target, mask).item(), 3.5 / 3, rel_tol=1e-6)
    assert math.isclose(masked_mse(pred, target, mask.bool()).item(), 2.5, rel_tol=1e-6)


def test_unmasked_positions_do_not_matter():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    mask = torch.rand(3, 10) > 0.5
    for fn in (masked_mse, masked_l1):
        for norm in (False, True):
            base = fn(pred, target, mask, norm_pix=norm)
            p2, t2 = pred.clone(), target.clone()
            p2[~mask] = 1e3; t2[~mask] = -7.
            assert torch.allclose(fn(p2, t2, mask, norm_pix=norm), base)
            p3 = pred.clone(); p3[mask] += 1.
            assert not torch.allclose(fn(p3, target, mask, norm_pix=norm), base)
    # gradient is zero at unmasked patches
    p = pred.clone().requires_grad_(True)
    masked_mse(p, target, mask).backward()
    assert (p.grad[~mask] == 0).all() and (p.grad[mask] != 0).any()


def test_normalize_patches_mae_formula():
    t = torch.tensor([[[1., 2., 3., 6.]]])
    # mean 3, unbiased var ((4 + 1 + 0 + 9) / 3) = 14/3
    expect = (t - 3.) / math.sqrt(14 / 3 + 1e-6)
    assert torch.allclose(normalize_patches(t), expect)
    assert torch.allclose(masked_mse(expect, t, None, norm_pix=True), torch.tensor(0.), atol=1e-10)


def test_empty_mask_gives_zero_not_nan():
    p = torch.randn(2, 3, 4, requires_grad=True)
    loss = masked_l1(p, torch.randn(2, 3, 4), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(p.grad).all()


def test_shape_errors():
    with pytest.raises(ValueError, match='pred shape'):
        masked_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), None)
    with pytest.raises(ValueError, match='mask shape'):
        masked_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 3))


def test_masked_cross_entropy_by_hand():
    lg = torch.tensor([[[math.log(2), 0., 0.], [0., 0., 0.]]])   # p = [1/2, 1/4, 1/4], [1/3]*3
    tg = torch.tensor([[1, 2]])
    # both count: (ln 4 + ln 3) / 2 ; only first: ln 4
    assert math.isclose(masked_cross_entropy(lg, tg, torch.tensor([[True, True]])).item(),
                        (math.log(4) + math.log(3)) / 2, rel_tol=1e-6)
    assert math.isclose(masked_cross_entropy(lg, tg, torch.tensor([[True, False]])).item(), math.log(4), rel_tol=1e-6)
    assert math.isclose(masked_cross_entropy(lg, torch.tensor([[0, -100]]), None).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(masked_cross_entropy(lg, torch.tensor([[0, 5]]), None, ignore_index=5).item(), math.log(2),
                        rel_tol=1e-6)


def test_masked_cross_entropy_pixel_layout_patch_mask():
    torch.manual_seed(0)
    lg, tg = torch.randn(2, 4, 6, 9), torch.randint(0, 4, (2, 6, 9))
    pm = torch.zeros(2, 6, dtype=torch.bool); pm[0, 5] = True; pm[1, 0] = True   # 2x3 patch grid of 3x3 px
    ce = F.cross_entropy(lg, tg, reduction='none')
    ref = torch.cat([ce[0, 3:6, 6:9].flatten(), ce[1, 0:3, 0:3].flatten()]).mean()
    assert torch.allclose(masked_cross_entropy(lg, tg, pm), ref, atol=1e-6)
    lg2 = lg.clone(); lg2[0, :, :3, :3] = 100.                     # change an unmasked patch
    assert torch.allclose(masked_cross_entropy(lg2, tg, pm), ref, atol=1e-6)
    with pytest.raises(ValueError, match='does not tile'):
        masked_cross_entropy(lg, tg, torch.ones(2, 5, dtype=torch.bool))


def test_info_nce_by_hand():
    q = torch.tensor([[3., 0.], [0., 0.5]])
    k = torch.tensor([[1., 0.], [-1., 0.]])
    # cosines [[1, -1], [0, 0]], tau = 0.5 -> logits [[2, -2], [0, 0]]
    r0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(-2)))
    r1 = math.log(2)
    assert math.isclose(info_nce(q, k, 0.5).item(), (r0 + r1) / 2, rel_tol=1e-6)
    # key -> query direction: columns [2, 0] (positive 2) and [-2, 0] (positive 0)
    c0 = -math.log(math.exp(2) / (math.exp(2) + 1)); c1 = -math.log(1 / (math.exp(-2) + 1))
    assert math.isclose(info_nce(q, k, 0.5, symmetric=True).item(), ((r0 + r1) / 2 + (c0 + c1) / 2) / 2, rel_tol=1e-6)


def test_info_nce_properties():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    # scale invariance (cosine) and a perfect match beats a random key set
    assert torch.allclose(info_nce(z, 5 * z), info_nce(z, z))
    assert info_nce(z, z, 0.07) < info_nce(z, torch.randn(8, 16), 0.07)
    # extra negatives can only increase the loss
    assert info_nce(z, torch.cat([z, torch.randn(4, 16)])) >= info_nce(z, z)
    with pytest.raises(ValueError, match='symmetric'):
        info_nce(z, torch.randn(9, 16), symmetric=True)
