"""incomplete's backbone and pre-training: stream isolation (on/off), the mask token, exact Dirichlet counts, padding
invariance, the contrastive pooling's masks, Eq. 4's losses by hand, and every modality subset."""
import pytest
import torch
import torch.nn.functional as F

from rsrepro.core import create_model
from rsrepro.incomplete import (DFC2023_MODALITIES, QUADRUPLET_MODALITIES, IncompleteMultimodalViT, IncompletePretrain,
                                IncompleteSegmenter, Modality, count_parameters, dirichlet_token_mask,
                                incomplete_vit_tiny_patch16, modality_combinations, reconstruction_loss)
from rsrepro.mask2former import Mask2FormerHead
from rsrepro.masking import patchify

SIZE = 32   # 2x2 patches of 16


def small(mods=DFC2023_MODALITIES, **kw):
    torch.manual_seed(0)
    return IncompleteMultimodalViT(mods, img_size=SIZE, embed_dim=16, depth=2, num_heads=2, **kw).eval()


def batch(mods=DFC2023_MODALITIES, B=3, seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randint(0, m.classes, (B, size, size), generator=g) if m.kind == 'map'
                else torch.randn(B, m.channels, size, size, generator=g)) for n, m in mods.items()}


def perturb(b, name, seed=1):
    g = torch.Generator().manual_seed(seed); x = b[name]
    new = torch.randint(0, int(x.max()) + 2, x.shape, generator=g) if not x.is_floating_point() else torch.randn(x.shape, generator=g)
    return dict(b, **{name: new.clamp_max(8) if not x.is_floating_point() else new})


def streams(model, b, **kw):
    with torch.no_grad():
        out = model(b, **kw)
        return {n: model.modality_stream(out, n)[0] for n in model.names}, out['fusion']


@pytest.mark.parametrize('mods', [DFC2023_MODALITIES, QUADRUPLET_MODALITIES], ids=['dfc2023', 'quadruplets'])
def test_isolation_with_masked_attention_and_its_failure_without(mods):
    b = batch(mods)
    for masked in (True, False):
        model = small(mods, masked_attention=masked)
        s0, f0 = streams(model, b)
        for changed in model.names:
            s1, f1 = streams(model, perturb(b, changed))
            assert not torch.allclose(f0, f1, atol=1e-4), 'the fusion stream must see every modality'
            assert not torch.allclose(s0[changed], s1[changed], atol=1e-4)
            others = [n for n in model.names if n != changed]
            if masked:
                for n in others: assert torch.allclose(s0[n], s1[n], atol=1e-6), f'{changed} leaked into {n}'
            else:
                assert any(not torch.allclose(s0[n], s1[n], atol=1e-4) for n in others), 'MultiViT streams mix'


def test_isolation_holds_under_token_masks():
    model = small()
    b = batch(); tm = {n: torch.rand(3, 4, generator=torch.Generator().manual_seed(i)) < 0.5 for i, n in enumerate(model.names)}
    s0, _ = streams(model, b, token_mask=tm); s1, _ = streams(model, perturb(b, 'sar'), token_mask=tm)
    assert torch.allclose(s0['rgb'], s1['rgb'], atol=1e-6) and torch.allclose(s0['dsm'], s1['dsm'], atol=1e-6)


def test_mask_token_replaces_every_absent_or_masked_token_in_modality_attention():
    model = small(); b = batch()
    seen = {}
    h = model.modality_attention[0].register_forward_hook(lambda mod, args, out: seen.update(kv=args[1].detach()))
    present = {'sar': torch.tensor([True, False, True]), 'rgb': torch.tensor([True, True, False])}
    tm = {'dsm': torch.tensor([[True, False, False, True]] * 3)}
    with torch.no_grad(): model(b, present=present, token_mask=tm)
    h.remove()
    B, L, M = 3, 4, 3
    kv = seen['kv'].reshape(B, L, M + 1, -1)[:, :, 1:]              # slot 0 is the fusion token itself
    pos = model.pos_embed((2, 2), 'cpu')[0]
    z_mask = (model.mask_token[0] + pos)                             # [L, D]
    with torch.no_grad(): emb = {n: model.embed[n](b[n]) + pos for n in model.names}
    absent = {'sar': ~present['sar'][:, None].expand(B, L), 'rgb': ~present['rgb'][:, None].expand(B, L), 'dsm': tm['dsm']}
    for i, n in enumerate(model.names):
        for bi in range(B):
            for l in range(L):
                want = z_mask[l] if absent[n][bi, l] else emb[n][bi, l]
                assert torch.allclose(kv[bi, l, i], want, atol=1e-6), (n, bi, l)
    # and the mask token matters exactly when something is absent
    with torch.no_grad():
        f_full = model(b)['fusion']; f_part = model(b, present=present)['fusion']
        model.mask_token.add_(torch.randn_like(model.mask_token))   # (a constant would vanish in LayerNorm)
        assert torch.allclose(f_full, model(b)['fusion'], atol=1e-6)
        assert not torch.allclose(f_part, model(b, present=present)['fusion'], atol=1e-4)


def test_padding_does_not_change_a_sample():
    model = small(); b = batch()
    present = {'sar': torch.tensor([False, True, True]), 'rgb': torch.tensor([True, True, False]),
               'dsm': torch.tensor([False, True, True])}
    with torch.no_grad():
        both = model(b, present=present)
        alone = model({'rgb': b['rgb'][:1]})
    assert torch.allclose(both['fusion'][0], alone['fusion'][0], atol=1e-5)
    assert torch.allclose(model.modality_stream(both, 'rgb')[0][0], model.modality_stream(alone, 'rgb')[0][0], atol=1e-5)


@pytest.mark.parametrize('mods,n', [(DFC2023_MODALITIES, 7), (QUADRUPLET_MODALITIES, 15)], ids=['dfc2023', 'quadruplets'])
def test_every_modality_subset_at_inference(mods, n):
    combos = modality_combinations(mods)
    assert len(combos) == n and len(set(combos)) == n and combos[0] == tuple(mods)
    for multivit in (False, True):
        model = small(mods, modality_attention=not multivit, masked_attention=not multivit)
        b = batch(mods, B=2)
        outs = []
        for c in combos:
            with torch.no_grad(): f = model.forward_features({k: b[k] for k in c})
            assert f.shape == (2, 16, 2, 2) and torch.isfinite(f).all()
            outs.append(f)
        assert all(not torch.allclose(outs[0], o) for o in outs[1:])


def test_pretrain_dirichlet_counts_are_exact_per_sample():
    model = small(QUADRUPLET_MODALITIES)
    L = 4
    pre = IncompletePretrain(model, num_visible=7, decoder_dim=16, decoder_heads=2, dirichlet_per_batch=False)
    torch.manual_seed(3)
    res = pre(batch(QUADRUPLET_MODALITIES, B=6))
    vis = torch.stack([~res['token_mask'][n] for n in model.names], 1)       # [B, M, L]
    assert vis.sum((1, 2)).tolist() == [7] * 6
    assert len({tuple(v.sum(1).tolist()) for v in vis}) > 1                    # the split varies across samples
    # absent modalities get no visible token; the count stays exact
    present = {'s1': torch.tensor([True, False, True, True, False, True]), 'dnw': torch.zeros(6, dtype=torch.bool)}
    res = pre(batch(QUADRUPLET_MODALITIES, B=6), present=present)
    assert (~res['token_mask']['dnw']).sum() == 0 and (~res['token_mask']['s1'][[1, 4]]).sum() == 0
    assert sum((~res['token_mask'][n]).sum(1) for n in model.names).tolist() == [7] * 6
    assert 'loss_dnw' not in res
    # the default (the authors' code's variant): one split for the whole batch
    pre.dirichlet_per_batch = True
    res = pre(batch(QUADRUPLET_MODALITIES, B=6))
    counts = torch.stack([(~res['token_mask'][n]).sum(1) for n in model.names], 1)
    assert (counts == counts[0]).all() and counts[0].sum() == 7
    assert IncompletePretrain(model).dirichlet_per_batch and IncompletePretrain(model).num_visible == 8   # 4 x 4 / 2


def test_pretrain_losses_cover_masked_tokens_only_and_train():
    model = small(QUADRUPLET_MODALITIES); model.train()
    pre = IncompletePretrain(model, contrastive=True, decoder_dim=16, decoder_heads=2, dirichlet_per_batch=False)
    b = batch(QUADRUPLET_MODALITIES, B=4)
    res = pre(b)
    assert {'loss_s1', 'loss_s2', 'loss_dem', 'loss_dnw'} <= set(res)
    for n in model.names:   # Eq. 4 recomputed by hand from the returned predictions
        m = model.modalities[n]; mask = res['token_mask'][n]
        assert torch.allclose(res[f'loss_{n}'], reconstruction_loss(m, res[f'pred_{n}'], b[n], mask, 16))
    res['loss'].backward()
    assert pre.cls_tokens.grad.abs().sum() > 0 and pre.fusion_cls_token.grad.abs().sum() > 0
    for n in model.names: assert model.embed[n].proj.weight.grad.abs().sum() > 0


def test_reconstruction_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 1, 32, 32, generator=g); pred = torch.randn(1, 4, 256, generator=g)
    mask = torch.tensor([[True, False, False, True]])
    t = patchify(target, 16)
    l1 = (pred[0, [0, 3]] - t[0, [0, 3]]).abs().mean()
    l2 = ((pred[0, [0, 3]] - t[0, [0, 3]]) ** 2).mean()
    assert torch.allclose(reconstruction_loss(Modality(1, 'height'), pred, target, mask, 16), l1)
    assert torch.allclose(reconstruction_loss(Modality(1, 'image'), pred, target, mask, 16), l2)
    # map: cross-entropy over the pixels of the masked patches only
    K = 3; labels = torch.randint(0, K, (1, 32, 32), generator=g); logits_p = torch.randn(1, 4, 256 * K, generator=g)
    logits = logits_p.reshape(1, 2, 2, 16, 16, K).permute(0, 5, 1, 3, 2, 4).reshape(1, K, 32, 32)
    ce = F.cross_entropy(logits, labels, reduction='none')
    want = torch.cat([ce[0, :16, :16].flatten(), ce[0, 16:, 16:].flatten()]).mean()
    assert torch.allclose(reconstruction_loss(Modality(kind='map', classes=K), logits_p, labels, mask, 16), want, atol=1e-6)


def test_contrastive_pooling_sees_only_its_keys():
    model = small()
    pre = IncompletePretrain(model, contrastive=True, decoder_dim=16, decoder_heads=2).eval()
    b = batch()
    tm = {'sar': torch.tensor([[False, True, True, True]] * 3), 'rgb': torch.zeros(3, 4, dtype=torch.bool),
          'dsm': torch.ones(3, 4, dtype=torch.bool)}
    with torch.no_grad():
        out = model(b, token_mask=tm); z = pre.pooled(out)
        out2 = dict(out, fusion=out['fusion'].clone()); out2['fusion'][:, 1:] += torch.randn_like(out2['fusion'][:, 1:])   # change fusion tokens 1..3
        z2 = pre.pooled(out2)
        out3 = dict(out, tokens=out['tokens'].clone()); sel = out['group'] == 1; out3['tokens'][sel] += torch.randn_like(out3['tokens'][sel])   # rgb's tokens
        z3 = pre.pooled(out3)
    M = 3
    assert torch.allclose(z[:, M + 0], z2[:, M + 0])          # z_{f_sar} sees fusion token 0 only (sar visible there)
    assert not torch.allclose(z[:, M + 1], z2[:, M + 1])      # z_{f_rgb} sees all four
    assert torch.allclose(z[:, :M], z2[:, :M])                 # modality vectors never see fusion tokens
    assert not torch.allclose(z[:, 1], z3[:, 1]) and torch.allclose(z[:, 0], z3[:, 0]) and torch.allclose(z[:, M:], z3[:, M:])
    with torch.no_grad(): losses = pre.contrastive_losses(out)
    assert set(losses) == {'sar', 'rgb'}                       # dsm has no visible token: left out


def test_bad_inputs_name_the_modality():
    model = small()
    b = batch()
    with pytest.raises(ValueError, match="'rgb'.*\\[B, 3, H, W\\]"): model(dict(b, rgb=b['rgb'][:, :2]))
    with pytest.raises(ValueError, match='differ in size'): model(dict(b, sar=torch.randn(3, 1, 48, 48)))
    with pytest.raises(ValueError, match='no present modality'):
        model(b, present={n: torch.tensor([True, False, True]) for n in model.names})
    qm = small(QUADRUPLET_MODALITIES); qb = batch(QUADRUPLET_MODALITIES)
    with pytest.raises(ValueError, match="'dnw'.*outside"): qm(dict(qb, dnw=qb['dnw'] + 9))
    with pytest.raises(ValueError, match='no input modality'): model({'image': b['rgb']})


def test_registered_models_and_sizes():
    bb = create_model('incomplete_vit_tiny_patch16', modalities=DFC2023_MODALITIES)
    mv = create_model('multivit_tiny_patch16', modalities=DFC2023_MODALITIES)
    assert bb.embed_dim == 192 and len(bb.blocks) == 12 and bb.blocks[0].attn.num_heads == 3
    assert mv.modality_attention is None and not mv.masked_attention and bb.masked_attention
    # ViT-T body (~5.5 M) + 3 patch projections + modality attention block + fusion tokens
    assert 5.5e6 < count_parameters(bb) < 6.5e6 and count_parameters(mv) < count_parameters(bb)


# ---------------------------------------------------------------- visible tokens: half of all tokens
def test_default_visible_tokens_are_half_of_all_tokens_on_both_datasets():
    "§IV-B5: 'the number of nonmasked tokens ... half of all tokens on the two datasets' (256 px, 16-px patches)."
    for mods, half in ((DFC2023_MODALITIES, 384), (QUADRUPLET_MODALITIES, 512)):
        bb = incomplete_vit_tiny_patch16(modalities=mods)
        assert bb.num_tokens == len(mods) * 256
        assert IncompletePretrain(bb, decoder_dim=16, decoder_heads=2).num_visible == half
        head = Mask2FormerHead(in_channels=192, num_classes=2, num_queries=2, task='semantic', hidden_dim=32)
        assert IncompleteSegmenter(bb, head).num_visible == half
    with pytest.raises(ValueError, match='num_visible'):
        IncompletePretrain(small(), num_visible=13)                 # more than the 12 modality tokens


# ---------------------------------------------------------------- supervised: random combination + Dirichlet mask
def segmenter(mods=DFC2023_MODALITIES, size=SIZE, **kw):
    torch.manual_seed(0)
    bb = IncompleteMultimodalViT(mods, img_size=size, embed_dim=32, depth=1, num_heads=2)
    head = Mask2FormerHead(in_channels=32, num_classes=2, num_queries=2, task='semantic', hidden_dim=32,
                           dim_feedforward=64, encoder_feedforward_dim=64, train_num_points=256)
    return IncompleteSegmenter(bb, head, task='semantic', **kw).train()


def visible_counts(tm, names):
    return torch.stack([(~tm[n]).sum(1) for n in names], 1)          # [B, M]


@pytest.mark.parametrize('mods', [DFC2023_MODALITIES, QUADRUPLET_MODALITIES], ids=['dfc2023', 'quadruplets'])
@pytest.mark.parametrize('per_batch', [True, False])
def test_supervised_visible_count_is_min_of_half_and_present_tokens(mods, per_batch):
    seg = segmenter(mods, size=128, combination='sample', dirichlet_per_batch=per_batch)   # L = 64 per modality
    names, L = seg.backbone.names, 64
    half = len(names) * L // 2
    b = batch(mods, B=64, size=128)
    g = torch.Generator().manual_seed(0)
    present = seg._present(b, None, g)
    tm = seg.token_mask(b, present, g)
    k = torch.stack([present[n] for n in names], 1).sum(1)
    assert len(set(map(tuple, torch.stack([present[n] for n in names], 1).tolist()))) == 2 ** len(names) - 1
    assert visible_counts(tm, names).sum(1).tolist() == torch.clamp(k * L, max=half).tolist()
    for n in names: assert tm[n][~present[n]].all(), f'absent {n} got a visible token'


def test_supervised_shares_are_dirichlet_with_mean_one_over_k():
    seg = segmenter(size=128, combination='sample', dirichlet_per_batch=False)
    names, L = seg.backbone.names, 64
    b = batch(B=3000, size=128)
    g = torch.Generator().manual_seed(1)
    present = seg._present(b, None, g)
    v = visible_counts(seg.token_mask(b, present, g), names).float()
    share = v / v.sum(1, keepdim=True)
    pres = torch.stack([present[n] for n in names], 1)
    for subset in set(map(tuple, pres.tolist())):
        rows = (pres == torch.tensor(subset)).all(1)
        k = sum(subset); s = share[rows][:, torch.tensor(subset)]
        assert rows.sum() > 300
        assert (s.mean(0) - 1 / k).abs().max() < 0.03, (subset, s.mean(0))
        if k > 1: assert s.std(0).min() > 0.08, (subset, s.std(0))   # Dirichlet proportions, not a fixed split
    # per batch: one split for all samples of a step, varying between steps, mean 1/3 with all three present
    seg = segmenter(size=128, random_modalities=False)
    assert seg.dirichlet_per_batch
    splits = []
    for step in range(300):
        v = visible_counts(seg.token_mask(batch(B=6, size=128), None, torch.Generator().manual_seed(step)), names)
        assert (v == v[0]).all() and v[0].sum() == 96
        splits.append(v[0].float() / 96)
    s = torch.stack(splits)
    assert (s.mean(0) - 1 / 3).abs().max() < 0.04 and s.std(0).min() > 0.1


def test_training_step_feeds_the_mask_to_the_backbone_and_eval_masks_nothing():
    seg = segmenter(QUADRUPLET_MODALITIES, size=64)                  # L = 16, half = 32
    names = seg.backbone.names
    seen = {}
    seg.backbone.register_forward_hook(lambda mod, args, out: seen.update(vis=out['visible']))
    b = dict(batch(QUADRUPLET_MODALITIES, B=4, size=64), mask=torch.randint(0, 2, (4, 64, 64)))
    combos = set()
    for step in range(12):
        out = seg(b, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(out['loss'])
        for n in names:
            assert torch.equal(seen['vis'][n], out['present'][n][:, None] & ~out['token_mask'][n])
        k = sum(out['present'][n].long() for n in names)
        assert (k == k[0]).all()                                     # combination='step': one subset per step
        assert sum(seen['vis'][n].sum(1) for n in names).tolist() == torch.clamp(k * 16, max=32).tolist()
        combos.add(tuple(bool(out['present'][n][0]) for n in names))
    assert len(combos) > 3
    seg.eval()
    out = seg(b)
    assert 'token_mask' not in out and 'present' not in out
    assert all(seen['vis'][n].all() for n in names)                   # every token of every given modality
    out = seg(b, present={'s1': torch.tensor([True, False, True, True])})
    assert seen['vis']['s1'].sum(1).tolist() == [16, 0, 16, 16] and seen['vis']['s2'].all()
    # switches: no subset draw, no mask
    seg = segmenter(QUADRUPLET_MODALITIES, size=64, random_modalities=False, spatial_mask=False)
    seg.backbone.register_forward_hook(lambda mod, args, out: seen.update(vis=out['visible']))
    out = seg(b)
    assert 'token_mask' not in out and all(seen['vis'][n].all() for n in names)


def test_dirichlet_token_mask_bad_input():
    with pytest.raises(ValueError, match='no present modality'):
        dirichlet_token_mask({'a': torch.tensor([True, False]), 'b': torch.tensor([False, False])}, 4, 4)
    seg = segmenter()
    with pytest.raises(ValueError, match=r"present\['rgb'\]"):
        seg.token_mask(batch(B=3), {'rgb': torch.tensor([True, False])})
