"""Training-speed switches (issue #19): each one leaves the loss and gradients unchanged or within a stated tolerance.

* length bucketing: same samples per epoch, order a function of (seed, epoch), exact resume, less padding;
* SDPA attention: equal to ``nn.MultiheadAttention`` (outputs, per-head weights, gradients) and weight-compatible;
* fused / foreach AdamW: the same update as the per-tensor loop (1e-6);
* torch.compile: losses and gradients as close to the exact (float64) values as eager fp32's, a clean eager
  fallback when the compiler is missing;
* bf16 autocast on CPU (opt-in): the loss within what bf16's 8 significant bits allow for the matmuls that ran.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmsenti.config import load_config
from mmsenti.data.scenes import ScenesConfig, build_scenes
from mmsenti.losses import total_loss
from mmsenti.metrics import Predictions
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.models.layers import MultiheadAttention, TransformerBlock, build_attention
from mmsenti.train.evaluate import evaluate
from mmsenti.train.sampler import (
    EpochBatchSampler,
    LengthBucketBatchSampler,
    build_batch_sampler,
    ordered_batches,
    sample_lengths,
)
from mmsenti.train.workbench import build_workbench

INFIG = ["model.name=infig-tiny"]


# ------------------------------------------------------------------------------------------ length bucketing
def _lengths(n=500, seed=0):
    return torch.randint(3, 65, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_bucketed_batches_hold_every_sample_once_in_a_seeded_resumable_order():
    lengths = _lengths()
    a = LengthBucketBatchSampler(lengths, 32, seed=1, epoch=2, pool_batches=4).batches()
    assert a == LengthBucketBatchSampler(lengths, 32, seed=1, epoch=2, pool_batches=4).batches()
    assert a != LengthBucketBatchSampler(lengths, 32, seed=1, epoch=3, pool_batches=4).batches()
    assert a != LengthBucketBatchSampler(lengths, 32, seed=2, epoch=2, pool_batches=4).batches()
    assert sorted(i for b in a for i in b) == list(range(500))  # the epoch's sample set is unchanged
    assert len(a) == len(EpochBatchSampler(500, 32, 1, 2).batches()) == 16
    assert sorted(len(b) for b in a)[:2] == [500 % 32, 32]  # one short batch at most, as without bucketing
    resumed = LengthBucketBatchSampler(lengths, 32, seed=1, epoch=2, start=5, pool_batches=4)
    assert list(resumed) == a[5:] and len(resumed) == len(a) - 5


def test_bucketing_cuts_padding_and_keeps_batches_random():
    lengths = _lengths(4096)
    plain = EpochBatchSampler(4096, 32, seed=0, epoch=0).batches()
    bucketed = LengthBucketBatchSampler(lengths, 32, seed=0, epoch=0).batches()

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(bucketed) < 0.6 * padded(plain)  # uniform lengths 3..64: random batches pad to ~62
    assert padded(bucketed) < 1.1 * sum(lengths)
    firsts = [lengths[b[0]] for b in bucketed]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)  # batch order is shuffled


def test_build_batch_sampler_without_lengths_is_the_plain_sampler():
    assert build_batch_sampler(50, 8, 1, 2).batches() == EpochBatchSampler(50, 8, 1, 2).batches()
    with pytest.raises(ValueError, match="lengths"):
        build_batch_sampler(50, 8, 1, 2, lengths=[1] * 49)
    from mmsenti.train.trainer import EpochBatchSampler as FromTrainer  # the old import keeps working

    assert FromTrainer is EpochBatchSampler


def _mixed_length_data(tmp_path, n=64):
    words = "good bad film actor plot scene music ending story cast".split()
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        k = int(torch.randint(1, 30, (1,), generator=g))
        rows.append({"id": f"s{i}", "text": " ".join(words[(i + j) % len(words)] for j in range(k)),
                     "label": ["neg", "pos"][i % 2], "split": "train" if i < n - 16 else ("dev" if i % 2 else "test")})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trainer_buckets_by_token_length_and_resumes_exactly(tmp_path, tiny_overrides):
    from mmsenti.train.trainer import Trainer, TrainingInterrupted

    data = _mixed_length_data(tmp_path)
    tiny = [o for o in tiny_overrides if not o.startswith("data.num_")]
    overrides = tiny + ["model.name=text-only-tiny", "data.name=jsonl",
                                  f"data.root={data}", "data.batch_size=8", "data.bucket_by_length=true",
                                  "data.bucket_pool=3", "run.checkpoint_every=2", "optim.epochs=2"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "probe")
    trainer.prepare()
    lengths = sample_lengths(trainer.processor, trainer.bundle.split("train"))
    loader = trainer.loader("train", epoch=1)
    assert list(loader.batch_sampler) == LengthBucketBatchSampler(lengths, 8, 0, 1, pool_batches=3).batches()
    padded = [b["attention_mask"].numel() for b in loader]
    trainer.cfg.data.bucket_by_length = False
    plain = [b["attention_mask"].numel() for b in trainer.loader("train", epoch=1)]
    assert len(plain) == len(padded)
    assert sum(padded) < 0.85 * sum(plain)

    full = Trainer(load_config(None, overrides), tmp_path / "full").fit()
    cut = Trainer(load_config(None, overrides), tmp_path / "cut")
    cut.interrupt_after_step = 4  # mid-epoch 1 (6 batches per epoch)
    with pytest.raises(TrainingInterrupted):
        cut.fit()
    assert Trainer(None, tmp_path / "cut", resume=True).fit() == full


# --------------------------------------------------------------------------------------------- attention
def _block_pair(dim=32, heads=4, dropout=0.0):
    torch.manual_seed(0)
    new = TransformerBlock(dim, heads, dropout=dropout, attention="sdpa")
    torch.manual_seed(0)
    old = TransformerBlock(dim, heads, dropout=dropout, attention="mha")
    return new, old


def test_sdpa_attention_has_the_same_init_keys_outputs_weights_and_gradients_as_torch_mha():
    new, old = _block_pair()
    assert list(new.state_dict()) == list(old.state_dict())  # saved models load into either
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values(), strict=True))
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = pad[2, 1:] = True
    for need_weights in (False, True):
        (ya, wa), (yb, wb) = new(x, pad, need_weights), old(x, pad, need_weights)
        torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
        if need_weights:  # per-head (B, heads, L, L), padding never attended
            assert wa.shape == (3, 4, 7, 7)
            torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)
            assert wa[2, :, :, 1:].abs().max() == 0
        else:
            assert wa is None and wb is None
    grads = []
    for m in (new, old):
        m.zero_grad()
        (m(x, pad)[0] ** 2).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_sdpa_cross_attention_equals_torch_mha():
    torch.manual_seed(0)
    new = MultiheadAttention(16, 2)
    old = build_attention(16, 2, impl="mha")
    old.load_state_dict(new.state_dict())
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 4:] = True
    for need_weights in (False, True):
        (a, wa), (b, wb) = new(q, kv, kv, pad, need_weights), old(q, kv, kv, key_padding_mask=pad,
                                                                     need_weights=need_weights)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wa, wb, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)


@pytest.fixture(scope="module")
def scenes():
    return build_scenes(ScenesConfig(num_train=16, num_dev=4, num_test=4, image_size=32))


def _model(scenes, *overrides, seed=0):
    cfg = load_config(None, INFIG + list(overrides))
    proc = build_processor(cfg.model, [s.text for s in scenes.splits["train"]], "classification")
    torch.manual_seed(seed)
    return build_model(cfg.model, TaskInfo("classification", scenes.label_names), proc), proc, cfg


def test_infig_attention_maps_and_weights_are_the_same_with_either_attention(scenes):
    new, proc, _ = _model(scenes, "model.attention=sdpa")
    old, _, _ = _model(scenes, "model.attention=mha")
    old.load_state_dict(new.state_dict(), strict=True)  # a model saved with either loads into the other
    batch = proc(scenes.splits["train"][:4])
    new.eval()
    old.eval()
    with torch.no_grad():
        a, b = new(batch, return_attention=True), old(batch, return_attention=True)
    torch.testing.assert_close(a["attention"], b["attention"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("impl", ["fused", "foreach", "auto"])
def test_fused_and_foreach_adamw_make_the_same_update_as_the_loop(scenes, impl):
    """Same gradients in → same parameters out (1e-6); training losses agree (1e-5 relative).

    Parameters are compared under given gradients: some of the model's own gradients are pure rounding noise
    (an attention key bias shifts every score of a row equally, so its true gradient is 0), and Adam normalises
    noise to full-size steps whose sign differs with the kernel's summation order.
    """
    from mmsenti.train.optim import build_optimizer

    params, losses = {}, {}
    for kind in ("for-loop", impl):
        model, proc, cfg = _model(scenes, "model.dropout=0.0", f"optim.implementation={kind}", "optim.lr=1e-2")
        opt = build_optimizer(model, cfg.optim)
        assert opt.defaults["fused"] == (kind in ("fused", "auto")) and opt.defaults["foreach"] == (kind == "foreach")
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        params[kind] = {n: p.detach().clone() for n, p in model.named_parameters()}
        model, proc, cfg = _model(scenes, "model.dropout=0.0", f"optim.implementation={kind}", "optim.lr=1e-3")
        opt = build_optimizer(model, cfg.optim)
        model.train()
        losses[kind] = []
        for i in range(3):
            batch = proc(scenes.splits["train"][i * 5:i * 5 + 5])
            loss = total_loss(model.compute_loss(model(batch), batch))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[kind].append(float(loss))
    for n, p in params["for-loop"].items():
        torch.testing.assert_close(params[impl][n], p, atol=1e-6, rtol=1e-5, msg=n)
    assert losses[impl] == pytest.approx(losses["for-loop"], rel=1e-5)


def test_unshuffled_passes_go_longest_first_and_predictions_come_back_in_split_order(tmp_path):
    """Evaluation, the feature cache and RAHP's bank read batches longest first (less padding); evaluation's
    predictions and metrics are those of batches in file order, in the split's order."""
    lengths = _lengths(300)
    batches = ordered_batches(300, 32, lengths)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
    in_order = ordered_batches(300, 32)
    assert in_order == [list(range(i, min(i + 32, 300))) for i in range(0, 300, 32)]

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    assert padded(batches) < 0.6 * padded(in_order)

    cfg = load_config(None, [*INFIG, "data.num_train=16", "data.num_dev=4", "data.num_test=40",
                             "data.eval_batch_size=8", f"run.cache_dir={tmp_path / 'cache'}", "run.quiet=true"])
    bench = build_workbench(cfg)
    test = bench.bundle.split("test")
    assert bench.eval_batches("test") != ordered_batches(len(test), 8)  # the texts differ in length
    got = bench.evaluate("test", save_predictions=tmp_path / "sorted.npz")
    plain = evaluate(bench.model, bench.data_loader("test", ordered_batches(len(test), 8), training=False),
                     bench.device, save_predictions=tmp_path / "plain.npz")
    a, b = Predictions.load(tmp_path / "sorted.npz"), Predictions.load(tmp_path / "plain.npz")
    assert list(a.ids) == list(b.ids) == [s.id for s in test] and (a.labels == b.labels).all()
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    assert got["accuracy"] == plain["accuracy"] and got["loss"] == pytest.approx(plain["loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------- compile
def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = total_loss(model.compute_loss(model(batch), batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients(scenes):
    """Compiled blocks compute the same function in fp32, fused and summed in another order: their loss and gradients
    are as close to the exact values (the eager model in float64) as eager fp32's are, within an order of magnitude
    (10x eager's largest error; the loss's floored at fp32's unit roundoff, as eager's may be 0 by luck)."""
    from mmsenti.train.compile import compile_available, compile_model

    if not compile_available()[0]:
        pytest.skip(f"torch.compile unavailable here: {compile_available()[1]}")
    overrides = ("model.modalities=[text]", "model.fusion_layers=1", "model.text_encoder.num_layers=1")
    eager, proc, _ = _model(scenes, *overrides)
    compiled, _, _ = _model(scenes, *overrides)
    exact, _, _ = _model(scenes, *overrides)
    exact.double()
    for m in (*eager.modules(), *compiled.modules(), *exact.modules()):  # compiled dropout draws other masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    keys = list(compiled.state_dict())
    names = compile_model(compiled)
    assert "fusion.0" in names and list(compiled.state_dict()) == keys  # compiled in place: same checkpoints
    for m in (eager, compiled, exact):
        m.train()
    u = torch.finfo(torch.float32).eps / 2
    for i in range(2):  # two text lengths: the second is traced with dynamic shapes or recompiled
        batch = proc(scenes.splits["train"][i * 6:i * 6 + 6 + i])
        (la, ga), (lb, gb) = _loss_and_grads(eager, batch), _loss_and_grads(compiled, batch)
        l64, g64 = _loss_and_grads(exact, {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                           for k, v in batch.items()})
        assert ga.keys() == gb.keys() == g64.keys()
        loss_error = max(abs(float(la) - float(l64)), u * abs(float(l64)))
        assert abs(float(lb) - float(l64)) <= 10 * loss_error
        eager_error = max(float((ga[n].double() - g64[n]).abs().max()) for n in ga)
        compiled_error = max(float((gb[n].double() - g64[n]).abs().max()) for n in ga)
        assert compiled_error <= 10 * eager_error, (compiled_error, eager_error)


def test_compile_falls_back_to_eager_with_a_message_when_the_compiler_is_missing(scenes, monkeypatch, caplog):
    import torch._inductor.config as inductor_config

    from mmsenti.train import compile as compile_mod

    torch._dynamo.reset()  # forget graphs compiled by earlier tests (the probe function's would be reused)
    compile_mod.compile_available.cache_clear()
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/bin/g++",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)  # else an earlier run's binary is reused
    try:
        ok, why = compile_mod.compile_available()
        assert not ok and why
        model, proc, _ = _model(scenes, "model.use_gam=false", "model.use_hfam=false")
        with caplog.at_level(logging.WARNING, logger="mmsenti.train.compile"):
            assert compile_mod.compile_model(model) == []
        assert "torch.compile is not available here" in caplog.text
        batch = proc(scenes.splits["train"][:4])
        model(batch)  # runs eagerly
    finally:
        compile_mod.compile_available.cache_clear()
        torch._dynamo.reset()


# -------------------------------------------------------------------------------------------------- bf16
class _Bf16Matmuls(TorchDispatchMode):
    """Counts the matmuls and convolutions that run on bf16 inputs (below autocast, which casts their inputs)."""

    OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_bf16_on_cpu_only_when_asked_and_close_to_fp32(scenes):
    """bf16 autocast runs only when asked, really runs in bf16, and moves the loss by no more than bf16 allows.

    Bound: bf16 keeps 8 significant bits, so a matmul that rounds both inputs to bf16 is off by at most 2^-8 of its
    result (relative); to first order each of the forward's D bf16 matmuls (counted as they run) moves the loss by
    at most that fraction of it, and errors in sequence add: |Δloss| <= D · 2^-8 · |loss|. bf16 rounding is exact
    (round to nearest even) on every CPU, with or without bf16 instructions; only the fp32 sums' order differs.
    """
    from mmsenti.utils import autocast, autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    model, proc, _ = _model(scenes, "model.dropout=0.0", "model.use_gam=false")
    model.train()
    batch = proc(scenes.splits["train"][:8])
    fp32 = float(total_loss(model.compute_loss(model(batch), batch)))
    with autocast(cpu, torch.bfloat16), _Bf16Matmuls() as matmuls:
        out = model(batch)
        bf16 = float(total_loss(model.compute_loss(out, batch)))
    assert out["logits"].dtype == torch.bfloat16 and matmuls.count > 0  # it ran in bf16 ...
    assert 0 < abs(bf16 - fp32) <= matmuls.count * 2.0 ** -8 * abs(fp32)  # ... and changed the loss within that


def test_the_speed_benchmark_names_the_cpu_flags_that_decide_bf16():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    avx2 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\n"
    assert bench.cpu_flags(avx2) == ("Some CPU", {"avx2": True, "avx512f": False, "avx512_bf16": False,
                                                  "amx_bf16": False})
    assert bench.describe_cpu(avx2).endswith("(bf16 autocast: no bf16 dot products, expect it slower than fp32)")
    sapphire = avx2.replace("fma", "fma avx512f avx512_bf16 amx_tile amx_bf16")
    assert "avx512_bf16 yes, amx_bf16 yes (bf16 autocast: expect it fast here)" in bench.describe_cpu(sapphire)
