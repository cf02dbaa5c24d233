"""INFIG alignment maths: vectorised code against naive loops and hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmsenti.models.infig.alignment import (
    FeatureQueue,
    FineGrainedAlignmentLoss,
    GlobalAlignmentLoss,
    LearnableTemperature,
    fine_grained_similarity,
    make_momentum_copy,
    momentum_update,
)

# ---------------------------------------------------------------------------------------------------------------
# Naive references, written from the paper's formulas with Python loops over pairs and tokens
# ---------------------------------------------------------------------------------------------------------------


def _cos(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def naive_similarity(img, txt, mask, j, img_mask=None):
    """S_p2q, S_q2p by explicit loops; j_eff = min(j, number of candidates); only real visual tokens (img_mask)."""
    bi, bt = img.shape[0], txt.shape[0]
    s_p2q, s_q2p = torch.zeros(bi, bt, dtype=torch.float64), torch.zeros(bi, bt, dtype=torch.float64)
    for a in range(bi):
        visual = [img[a, k] for k in range(img.shape[1]) if img_mask is None or img_mask[a, k]]
        for b in range(bt):
            words = [txt[b, t] for t in range(txt.shape[1]) if mask[b, t]]
            if not words or not visual:
                continue
            cos = [[_cos(v, w) for w in words] for v in visual]
            j_t = min(j, len(words))
            s_p2q[a, b] = sum(sum(sorted(row, reverse=True)[:j_t]) for row in cos) / (j_t * len(visual))
            j_i = min(j, len(visual))
            cols = [[cos[k][t] for k in range(len(visual))] for t in range(len(words))]
            s_q2p[a, b] = sum(sum(sorted(col, reverse=True)[:j_i]) for col in cols) / (j_i * len(words))
    return s_p2q, s_q2p


def naive_infonce(logits: torch.Tensor, offset: int = 0) -> float:
    """Mean over rows of -log softmax(row)[offset + row index], with logsumexp written out."""
    total = 0.0
    for r in range(logits.shape[0]):
        row = [float(x) for x in logits[r]]
        top = max(row)
        lse = top + math.log(sum(math.exp(x - top) for x in row))
        total += lse - row[offset + r]
    return total / logits.shape[0]


def _tokens(bi=5, bt=6, ni=7, nt=8, d=6, lengths=(8, 5, 1, 3, 2, 8), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(bi, ni, d, generator=g, dtype=dtype)
    txt = torch.randn(bt, nt, d, generator=g, dtype=dtype)
    mask = torch.arange(nt)[None, :] < torch.tensor(lengths[:bt])[:, None]
    return img, txt, mask


# ---------------------------------------------------------------------------------------------------------------
# Fine-grained similarity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("j", [1, 2, 3])
def test_fine_grained_matches_naive_loop(j):
    img, txt, mask = _tokens()  # texts with 8, 5, 1, 3, 2, 8 real tokens; B_i != B_t
    s_p2q, s_q2p = fine_grained_similarity(img, txt, mask, j)
    ref_p2q, ref_q2p = naive_similarity(img, txt, mask, j)
    assert s_p2q.shape == s_q2p.shape == (5, 6)
    torch.testing.assert_close(s_p2q, ref_p2q, rtol=0, atol=1e-10)
    torch.testing.assert_close(s_q2p, ref_q2p, rtol=0, atol=1e-10)


def test_fine_grained_mask_as_int_and_non_contiguous_padding():
    img, txt, _ = _tokens(seed=1)
    mask = torch.rand(6, 8, generator=torch.Generator().manual_seed(3)) > 0.4  # holes, not just right padding
    mask[:, 0] = True
    ref = naive_similarity(img, txt, mask, 2)
    for m in (mask, mask.long(), mask.float()):
        out = fine_grained_similarity(img, txt, m, 2)
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-10)


def test_padding_values_change_nothing():
    img, txt, mask = _tokens(dtype=torch.float32)
    img.requires_grad_(True)
    ref = fine_grained_similarity(img, txt, mask, 2)
    (grad_ref,) = torch.autograd.grad(ref[0].sum() + ref[1].sum(), img)
    for fill in (1e4, -1e4, float("nan")):  # padding that would win the top-j (or poison the GEMM) if used
        noisy = txt.clone()
        noisy[~mask] = fill
        out = fine_grained_similarity(img, noisy, mask, 2)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        (grad,) = torch.autograd.grad(out[0].sum() + out[1].sum(), img)
        assert torch.equal(grad, grad_ref)


def test_padding_is_really_excluded():
    """Treating padding as real (mask all ones) must change the result, or the test above proves nothing."""
    img, txt, mask = _tokens()
    masked = fine_grained_similarity(img, txt, mask, 2)
    unmasked = fine_grained_similarity(img, txt, torch.ones_like(mask), 2)
    short = ~mask.all(dim=1)
    assert not torch.allclose(masked[0][:, short], unmasked[0][:, short])
    assert not torch.allclose(masked[1][:, short], unmasked[1][:, short])
    torch.testing.assert_close(masked[0][:, ~short], unmasked[0][:, ~short])


@pytest.mark.parametrize("j", [1, 2, 3])
def test_padded_visual_tokens_are_excluded_as_text_padding_is(j):
    """A tags encoder pads its tags: padding visual tokens are never selected or counted, whatever their values;
    an image with one real token sums one match, one with none scores 0."""
    img, txt, mask = _tokens()
    img_mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(4)) > 0.3
    img_mask[1] = False
    img_mask[1, 3] = True  # a single real tag
    img_mask[2] = False  # no tags at all
    ref = naive_similarity(img, txt, mask, j, img_mask)
    noisy = img.clone()
    noisy[~img_mask] = float("nan")
    for chunk in (None, 2):
        out = fine_grained_similarity(noisy, txt, mask, j, chunk, img_mask=img_mask.long())
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-10)
    assert not torch.allclose(fine_grained_similarity(img, txt, mask, j)[1], ref[1])  # the mask matters
    loss = FineGrainedAlignmentLoss(j)(
        [noisy.float().requires_grad_(True)], [txt[:5].float()], mask[:5], 0.1, img_mask=img_mask)["loss_f"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_chunked_equals_unchunked(chunk):
    img, txt, mask = _tokens(bi=6, bt=6, dtype=torch.float32)
    full = fine_grained_similarity(img, txt, mask, 2)
    chunked = fine_grained_similarity(img, txt, mask, 2, chunk_size=chunk)
    torch.testing.assert_close(chunked[0], full[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[1], full[1], rtol=0, atol=1e-6)


def test_j_larger_than_valid_tokens():
    img, txt, mask = _tokens(ni=3)  # j=5 exceeds the 3 visual tokens and most texts' real tokens
    s_p2q, s_q2p = fine_grained_similarity(img, txt, mask, 5)
    ref_p2q, ref_q2p = naive_similarity(img, txt, mask, 5)
    torch.testing.assert_close(s_p2q, ref_p2q, rtol=0, atol=1e-10)
    torch.testing.assert_close(s_q2p, ref_q2p, rtol=0, atol=1e-10)
    # With j covering everything, both scores are the mean cosine over (visual token, real text token) pairs.
    j = 100
    cos = torch.einsum("aid,btd->abit", F.normalize(img, dim=-1), F.normalize(txt, dim=-1))
    mean_cos = (cos * mask[None, :, None, :]).sum(dim=(2, 3)) / (mask.sum(1)[None, :] * img.shape[1])
    s_p2q, s_q2p = fine_grained_similarity(img, txt, mask, j)
    torch.testing.assert_close(s_p2q, mean_cos)
    torch.testing.assert_close(s_q2p, mean_cos)


def test_fine_grained_rejects_bad_inputs():
    img, txt, mask = _tokens()
    with pytest.raises(ValueError, match="widths"):
        fine_grained_similarity(img, txt[..., :3], mask, 2)
    with pytest.raises(ValueError, match="txt_mask"):
        fine_grained_similarity(img, txt, mask[:, :3], 2)
    with pytest.raises(ValueError, match="top_j"):
        fine_grained_similarity(img, txt, mask, 0)


# ---------------------------------------------------------------------------------------------------------------
# Fine-grained loss
# ---------------------------------------------------------------------------------------------------------------


def _layers(n_layers=3, b=5, seed=0, requires_grad=False):
    img_layers, txt_layers = [], []
    for k in range(n_layers):
        img, txt, mask = _tokens(bi=b, bt=b, seed=seed + k, lengths=(8, 5, 1, 3, 2))
        img_layers.append(img.requires_grad_(requires_grad))
        txt_layers.append(txt.requires_grad_(requires_grad))
    return img_layers, txt_layers, mask


def test_fine_grained_loss_matches_formula():
    img_layers, txt_layers, mask = _layers()
    tau = 0.1
    out = FineGrainedAlignmentLoss(top_j=2)(img_layers, txt_layers, mask, torch.tensor(tau, dtype=torch.float64))
    per_layer = []
    for img, txt in zip(img_layers, txt_layers, strict=True):
        s_p2q, s_q2p = naive_similarity(img, txt, mask, 2)
        per_layer.append(0.5 * (naive_infonce(s_p2q / tau) + naive_infonce(s_q2p.T / tau)))
    assert out["loss_f"].item() == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-10)
    for i, value in enumerate(per_layer):
        assert out[f"f_layer{i}"].item() == pytest.approx(value, abs=1e-10)
        assert not out[f"f_layer{i}"].requires_grad
    assert [k for k in out if k.startswith("loss")] == ["loss_f"]


def test_fine_grained_loss_gradients():
    img_layers, txt_layers, mask = _layers(requires_grad=True)
    temp = LearnableTemperature().double()
    out = FineGrainedAlignmentLoss(top_j=2, chunk_size=2)(img_layers, txt_layers, mask, temp())
    out["loss_f"].backward()
    for x in (*img_layers, *txt_layers):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for txt in txt_layers:
        assert torch.all(txt.grad[~mask] == 0)  # padding takes no part
    assert temp.value.grad is not None and torch.isfinite(temp.value.grad)


def test_fine_grained_loss_gather_hook():
    """The gather contract: rows of all processes in rank order, this one's at its offset. As rank 1 after a
    process with 3 pairs, the other process's pairs are extra negatives and the positives sit at 3 + i."""
    img_layers, txt_layers, mask = _layers(n_layers=2)
    other_img, other_txt, other_mask = _tokens(bi=3, bt=3, seed=9, lengths=(2, 8, 4))

    def gather(x):  # the mask (B, N_t), or every layer's image (B, M, 7, D) / text (B, M, 8, D) tokens
        if x.ndim == 2:
            other = other_mask
        else:
            other = torch.stack([other_img if x.shape[2] == 7 else other_txt] * x.shape[1], 1)
        return torch.cat([other.to(x.dtype), x]), 3

    tau = 0.2
    out = FineGrainedAlignmentLoss(top_j=2, gather=gather)(img_layers, txt_layers, mask, tau)
    per_layer = []
    for img, txt in zip(img_layers, txt_layers, strict=True):
        s_p2q, _ = naive_similarity(img, torch.cat([other_txt, txt]), torch.cat([other_mask, mask]), 2)
        _, s_q2p = naive_similarity(torch.cat([other_img, img]), txt, mask, 2)
        per_layer.append(0.5 * (naive_infonce(s_p2q / tau, 3) + naive_infonce(s_q2p.T / tau, 3)))
    assert out["loss_f"].item() == pytest.approx(sum(per_layer) / 2, abs=1e-10)
    # An identity gather (a single process) is the same as no hook.
    no_hook = FineGrainedAlignmentLoss(top_j=2)(img_layers, txt_layers, mask, tau)["loss_f"]
    identity = FineGrainedAlignmentLoss(top_j=2, gather=lambda x: (x, 0))(img_layers, txt_layers, mask, tau)["loss_f"]
    torch.testing.assert_close(identity, no_hook)


# ---------------------------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------------------------


def test_temperature_init_and_clamp():
    temp = LearnableTemperature()
    assert temp().item() == pytest.approx(0.07)
    with torch.no_grad():
        temp.value.fill_(3.0)  # as an optimizer step might leave it
    assert temp().item() == pytest.approx(0.5) and temp.value.item() == pytest.approx(0.5)
    with torch.no_grad():
        temp.value.fill_(-1.0)
    assert temp().item() == pytest.approx(0.001)
    fixed = LearnableTemperature(0.1, learnable=False)
    assert list(fixed.parameters()) == [] and fixed().item() == pytest.approx(0.1)
    with pytest.raises(ValueError):
        LearnableTemperature(0.7)


def test_temperature_shared_by_two_losses_in_one_step():
    """Calling it twice in one graph (GAM + HFAM) must not break backward; the gradient is the sum of both."""
    temp = LearnableTemperature(0.2)
    x = torch.tensor(2.0)
    loss = x / temp() + 3 * x / temp()
    loss.backward()
    assert temp.value.grad.item() == pytest.approx(-(2.0 + 6.0) / 0.2**2)


# ---------------------------------------------------------------------------------------------------------------
# Feature queue
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[4, 4, 4, 3], [3, 5, 2, 7, 1], [12], [4, 11, 2], [10, 10]])
def test_queue_matches_reference_fifo(sizes):
    q, dim = 10, 3
    queue = FeatureQueue(q, dim)
    seen = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        batch = torch.randn(n, dim, generator=g, requires_grad=True)
        queue.enqueue(batch, ids=torch.arange(len(seen), len(seen) + n))
        seen.extend(F.normalize(batch.detach(), dim=-1))
        assert queue.size == min(len(seen), q)
        assert int(queue.ptr) == len(seen) % q
        # The r-th row ever enqueued sits in slot r mod Q; only the newest Q survive.
        expect = {r % q: row for r, row in list(enumerate(seen))[-q:]}
        assert sorted(expect) == list(range(queue.size))
        feats, ids = queue.features(), queue.sample_ids()
        assert feats.shape == (queue.size, dim) and not feats.requires_grad
        for slot, row in expect.items():
            torch.testing.assert_close(feats[slot], row)
            assert int(ids[slot]) >= len(seen) - q and int(ids[slot]) % q == slot
    torch.testing.assert_close(queue.features().norm(dim=-1), torch.ones(queue.size))


def test_queue_returns_only_filled_slots_and_a_copy():
    queue = FeatureQueue(8, 2)
    assert queue.features().shape == (0, 2)
    queue.enqueue(torch.tensor([[3.0, 4.0]]))
    feats = queue.features()
    torch.testing.assert_close(feats, torch.tensor([[0.6, 0.8]]))
    assert queue.sample_ids().tolist() == [-1]
    feats.zero_()
    torch.testing.assert_close(queue.features(), torch.tensor([[0.6, 0.8]]))
    restored = FeatureQueue(8, 2)
    restored.load_state_dict(queue.state_dict())  # ptr and fill level survive a checkpoint
    assert restored.size == 1 and int(restored.ptr) == 1
    with pytest.raises(ValueError):
        queue.enqueue(torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# Momentum encoders
# ---------------------------------------------------------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_momentum_copy_and_ema_numbers():
    online = _net()
    twin = make_momentum_copy(online)
    assert all(not p.requires_grad for p in twin.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for p, pm in zip(online.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, pm) and p.data_ptr() != pm.data_ptr()
    before = [p.detach().clone() for p in twin.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(5, 3))  # train mode: updates BatchNorm running statistics
    m = 0.9
    momentum_update(online, twin, m)
    for p, pm, b in zip(online.parameters(), twin.parameters(), before, strict=True):
        torch.testing.assert_close(pm, m * b + (1 - m) * p.detach())
    for name, buf in online.named_buffers():
        assert torch.equal(dict(twin.named_buffers())[name], buf)
    momentum_update(online, twin, 0.0)  # m = 0 copies
    for p, pm in zip(online.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(pm, p.detach())
    with pytest.raises(ValueError):
        momentum_update(online, nn.Linear(3, 4), 0.5)


def test_momentum_parameters_get_no_gradient():
    online = _net()
    twin = make_momentum_copy(online)
    x = torch.randn(6, 3)
    (online(x).sum() + twin(x).sum()).backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(p.grad is None for p in twin.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Global alignment loss
# ---------------------------------------------------------------------------------------------------------------


def _global_feats(b=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]


def _prefilled(dim=5, q=6, n=4, seed=1, ids=None) -> GlobalAlignmentLoss:
    loss = GlobalAlignmentLoss(dim, q, temperature=0.1).double()
    g = torch.Generator().manual_seed(seed)
    loss.image_queue.enqueue(torch.randn(n, dim, generator=g, dtype=torch.float64), ids)
    loss.text_queue.enqueue(torch.randn(n, dim, generator=g, dtype=torch.float64), ids)
    return loss


def _tau(loss_fn: GlobalAlignmentLoss) -> float:
    return float(loss_fn.temperature.value.detach())  # 0.1 as stored (float32-rounded before .double())


def _unit(x):
    return x.detach() / x.detach().norm(dim=-1, keepdim=True)


def naive_global(img, txt, img_m, txt_m, queue_i, queue_t, tau, positives=None):
    """0.5·(i2t + t2i), each the mean over rows of -Σ_k target_k log softmax_k, with loops."""
    img, txt, img_m, txt_m = (_unit(x) for x in (img, txt, img_m, txt_m))
    keys_t, keys_i = torch.cat([txt_m, queue_t]), torch.cat([img_m, queue_i])
    total = []
    for query, keys in ((img, keys_t), (txt, keys_i)):
        loss = 0.0
        for r in range(query.shape[0]):
            logits = [float(query[r] @ keys[k]) / tau for k in range(keys.shape[0])]
            lse = math.log(sum(math.exp(x) for x in logits))
            pos = [r] if positives is None else positives[r]
            loss += sum(lse - logits[k] for k in pos) / len(pos)
        total.append(loss / query.shape[0])
    return 0.5 * (total[0] + total[1]), total


def test_global_loss_matches_formula_and_enqueues_after():
    loss_fn = _prefilled()
    img, txt, img_m, txt_m = _global_feats()
    queue_i, queue_t = loss_fn.image_queue.features(), loss_fn.text_queue.features()
    out = loss_fn(img, txt, img_m, txt_m)
    expect, (i2t, t2i) = naive_global(img, txt, img_m, txt_m, queue_i, queue_t, _tau(loss_fn))
    assert out["loss_g"].item() == pytest.approx(expect, abs=1e-10)
    assert out["g_i2t"].item() == pytest.approx(i2t, abs=1e-10) and out["g_t2i"].item() == pytest.approx(t2i, abs=1e-10)
    # The momentum features were enqueued (normalised, detached) after the loss used the old queue.
    assert loss_fn.image_queue.size == 6 and int(loss_fn.image_queue.ptr) == 2
    stored_i, stored_t = loss_fn.image_queue.features(), loss_fn.text_queue.features()
    torch.testing.assert_close(stored_i[4:], _unit(img_m)[:2])
    torch.testing.assert_close(stored_i[:2], _unit(img_m)[2:])  # wrapped around
    torch.testing.assert_close(stored_t[4:], _unit(txt_m)[:2])
    assert not stored_i.requires_grad


def test_global_loss_empty_queue_and_gradients():
    loss_fn = GlobalAlignmentLoss(5, 16).double()
    img, txt, img_m, txt_m = _global_feats()
    out = loss_fn(img, txt, img_m, txt_m)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    assert out["loss_g"].item() == pytest.approx(naive_global(img, txt, img_m, txt_m, empty, empty, _tau(loss_fn))[0], abs=1e-9)
    out["loss_g"].backward()
    assert img.grad is not None and txt.grad is not None and loss_fn.temperature.value.grad is not None
    assert img_m.grad is None and txt_m.grad is None  # momentum features are never differentiated


def test_global_loss_eval_mode_does_not_enqueue():
    loss_fn = _prefilled().eval()
    loss_fn(*_global_feats())
    assert loss_fn.image_queue.size == 4 and int(loss_fn.image_queue.ptr) == 4


def test_global_loss_with_sample_ids():
    """Queue entries with the same id as a batch sample are positives, not negatives."""
    loss_fn = _prefilled(ids=torch.tensor([7, 1, 9, 2]))
    img, txt, img_m, txt_m = _global_feats()
    ids = torch.tensor([1, 2, 3, 1])  # samples 0 and 3 share an id (e.g. two augmentations)
    queue_i, queue_t = loss_fn.image_queue.features(), loss_fn.text_queue.features()
    out = loss_fn(img, txt, img_m, txt_m, ids=ids)
    positives = [[0, 3, 5], [1, 7], [2], [0, 3, 5]]  # key indices: batch 0..3, queue 4..7 holding ids 7, 1, 9, 2
    expect, _ = naive_global(img, txt, img_m, txt_m, queue_i, queue_t, _tau(loss_fn), positives)
    assert out["loss_g"].item() == pytest.approx(expect, abs=1e-10)
    assert loss_fn.image_queue.sample_ids().tolist() == [3, 1, 9, 2, 1, 2]


def test_global_loss_momentum_distillation():
    alpha = 0.4
    loss_fn = GlobalAlignmentLoss(5, 6, temperature=0.1, alpha=alpha).double()
    tau = _tau(loss_fn)
    g = torch.Generator().manual_seed(2)
    loss_fn.image_queue.enqueue(torch.randn(3, 5, generator=g, dtype=torch.float64))
    loss_fn.text_queue.enqueue(torch.randn(3, 5, generator=g, dtype=torch.float64))
    img, txt, img_m, txt_m = _global_feats()
    qi, qt = loss_fn.image_queue.features(), loss_fn.text_queue.features()
    out = loss_fn(img, txt, img_m, txt_m)
    u = [_unit(x) for x in (img, txt, img_m, txt_m)]
    keys_t, keys_i = torch.cat([u[3], qt]), torch.cat([u[2], qi])
    expect = 0.0
    for query, query_m, keys in ((u[0], u[2], keys_t), (u[1], u[3], keys_i)):
        targets = alpha * torch.softmax(query_m @ keys.T / tau, dim=1) + (1 - alpha) * torch.eye(4, keys.shape[0], dtype=torch.float64)
        expect += 0.5 * -(targets * torch.log_softmax(query @ keys.T / tau, dim=1)).sum(1).mean().item()
    assert out["loss_g"].item() == pytest.approx(expect, abs=1e-10)


def test_global_loss_gather_hook_and_shared_temperature():
    other = _unit(torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    temp = LearnableTemperature(0.1).double()
    # This process is rank 1, after a process with 3 pairs: keys in rank order, positives at 3 + i.
    def gather(x):  # the momentum image and text keys side by side, (B, 2·D)
        return torch.cat([torch.cat([other, other], 1), x]), 3

    loss_fn = GlobalAlignmentLoss(5, 20, temperature=temp, gather=gather).double()
    assert loss_fn.temperature is temp
    img, txt, img_m, txt_m = _global_feats()
    out = loss_fn(img, txt, img_m, txt_m)
    empty = torch.zeros(0, 5, dtype=torch.float64)
    # The other process's momentum features are extra negatives, and are enqueued too, in rank order.
    positives = [[3 + r] for r in range(4)]
    expect, _ = naive_global(img, txt, torch.cat([other, img_m]), torch.cat([other, txt_m]), empty, empty,
                             _tau(loss_fn), positives)
    assert out["loss_g"].item() == pytest.approx(expect, abs=1e-10)
    assert naive_global(img, txt, img_m, txt_m, empty, empty, _tau(loss_fn))[0] != pytest.approx(expect)
    assert loss_fn.image_queue.size == 7
    torch.testing.assert_close(loss_fn.image_queue.features()[:3], other)
    torch.testing.assert_close(loss_fn.image_queue.features()[3:], _unit(img_m))
