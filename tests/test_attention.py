"Tests of rsrepro.attention: masked SDPA attention, blocks and the Zorro-style modality mask."
import math

import pytest
import torch

from rsrepro.attention import (Attention, Block, CrossAttention, CrossAttentionBlock, masked_sdpa,
                               modality_block_mask)


def _by_hand(q, k, v, allowed=None):
    "softmax(QK^T / sqrt(d)) V with explicit loops over the softmax (single head, no batching)."
    d = q.shape[-1]
    out = torch.zeros(q.shape[0], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        js = [j for j in range(k.shape[0]) if allowed is None or allowed[i, j]]
        if not js: continue
        s = torch.tensor([float(q[i] @ k[j]) / math.sqrt(d) for j in js], dtype=torch.float64)
        w = torch.exp(s - s.max()); w = w / w.sum()
        for wj, j in zip(w, js): out[i] += wj * v[j].double()
    return out.float()


@torch.no_grad()
def test_attention_matches_hand_written_reference():
    torch.manual_seed(0)
    att = Attention(12, num_heads=3).eval()
    x = torch.randn(2, 6, 12)
    mask = torch.rand(2, 6, 6) > 0.4
    mask[1, 3] = False                                             # one query attends to nothing
    for m in (None, mask):
        out = att(x, m)
        q, k, v = att.qkv(x).reshape(2, 6, 3, 3, 4).permute(2, 0, 3, 1, 4)
        heads = torch.stack([torch.stack([_by_hand(q[b, h], k[b, h], v[b, h], None if m is None else m[b])
                                          for h in range(3)]) for b in range(2)])
        ref = att.proj(heads.transpose(1, 2).reshape(2, 6, 12))
        assert torch.allclose(out, ref, atol=1e-5)


@torch.no_grad()
def test_cross_attention_reference_and_kv_dim():
    torch.manual_seed(1)
    ca = CrossAttention(8, num_heads=1, kv_dim=5).eval()
    q, kv = torch.randn(1, 3, 8), torch.randn(1, 4, 5)
    allowed = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    k, v = ca.kv(kv).chunk(2, -1)
    ref = ca.proj(_by_hand(ca.q(q)[0], k[0], v[0], allowed)[None])
    assert torch.allclose(ca(q, kv, allowed), ref, atol=1e-5)


def test_empty_rows_no_nan_in_forward_or_backward():
    att = Attention(8, 2)
    x = torch.randn(2, 4, 8, requires_grad=True)
    m = torch.zeros(2, 1, 4, 4, dtype=torch.bool)                   # nobody attends to anything
    out = att(x, m)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, att.proj.bias.expand_as(out))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()
    q = torch.randn(1, 2, 3, 4)
    assert (masked_sdpa(q, q, q, torch.zeros(3, 3, dtype=torch.bool)) == 0).all()


def test_mask_shape_errors():
    att = Attention(8, 2)
    with pytest.raises(ValueError, match='does not broadcast'):
        att(torch.randn(1, 4, 8), torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match='not divisible'):
        Attention(10, 3)


def test_modality_block_mask_values():
    g = torch.tensor([0, 1, 1, 2])
    m = modality_block_mask(g, full_access_groups=[2])
    assert m.tolist() == [[True, False, False, False],
                          [False, True, True, False],
                          [False, True, True, False],
                          [True, True, True, True]]
    mb = modality_block_mask(torch.stack([g, torch.tensor([2, 0, 0, 1])]), 2)
    assert mb.shape == (2, 1, 4, 4) and mb[1, 0, 0].all() and mb[1, 0, 3].tolist() == [False, False, False, True]


def _stack(blocks, x, mask):
    for b in blocks: x = b(x, mask)
    return x


def test_masked_self_attention_isolates_modalities():
    torch.manual_seed(0)
    groups = torch.tensor([0] * 5 + [1] * 4 + [2] * 6)               # modality A, modality B, fusion tokens
    mask = modality_block_mask(groups, full_access_groups=2)
    blocks = torch.nn.ModuleList([Block(32, 4) for _ in range(4)]).eval()
    x1 = torch.randn(3, 15, 32)
    x2 = x1.clone(); x2[:, 5:9] = torch.randn(3, 4, 32) * 3        # change modality B's inputs only
    with torch.no_grad():
        y1, y2 = _stack(blocks, x1, mask), _stack(blocks, x2, mask)
        n1, n2 = _stack(blocks, x1, None), _stack(blocks, x2, None)
    assert (y1[:, :5] - y2[:, :5]).abs().max() < 1e-6, 'group A must not see group B'
    assert (y1[:, 9:] - y2[:, 9:]).abs().max() > 1e-2, 'fusion tokens see group B'
    assert (n1[:, :5] - n2[:, :5]).abs().max() > 1e-2, 'without the mask group A does change'
    # a change of the fusion tokens does not reach the modality tokens either
    x3 = x1.clone(); x3[:, 9:] += 1.0
    with torch.no_grad():
        y3 = _stack(blocks, x3, mask)
    assert (y1[:, :9] - y3[:, :9]).abs().max() < 1e-6


def test_per_sample_group_mask_in_cross_attention_block():
    torch.manual_seed(0)
    blk = CrossAttentionBlock(16, 2, kv_dim=8).eval()
    qg = torch.tensor([0, 1])                                      # one query per modality (class tokens)
    kvg = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])         # per-sample layout of the key tokens
    mask = modality_block_mask(qg.expand(2, -1), (), kv_group_ids=kvg)
    assert mask.shape == (2, 1, 2, 5)
    q, kv = torch.randn(2, 2, 16), torch.randn(2, 5, 8)
    kv2 = kv.clone(); kv2[0, 2:] = torch.randn(3, 8); kv2[1, 1:] = torch.randn(4, 8)   # change modality-1 keys only
    with torch.no_grad():
        a, b = blk(q, kv, mask), blk(q, kv2, mask)
    assert (a[:, 0] - b[:, 0]).abs().max() < 1e-6 and (a[:, 1] - b[:, 1]).abs().max() > 1e-3


def test_blocks_train_and_drop_path():
    blk = CrossAttentionBlock(16, 4, self_attn=True, drop_path=0.1, attn_drop=0.1)
    q = torch.randn(2, 3, 16, requires_grad=True)
    out = blk(q, torch.randn(2, 5, 16), torch.ones(3, 5, dtype=torch.bool), torch.eye(3, dtype=torch.bool))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
