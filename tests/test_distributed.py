"""Multi-process training on CPU with gloo: 2 processes, each with its shard of a global batch, against 1 process
with the global batch.

* The gather contract, sharding and the momentum update, without processes.
* Spawned pairs of processes (one spawn for all unit-level checks), on global batches that split unevenly (4+4,
  1+2, 2+3, RAHP also 1+1), RAHP with a process that holds no anchor (its sample's only present modality has no
  positive) and a step where no process does: loss terms and gradients of INFIG (GAM + HFAM) and RAHP (SupCon +
  memory bank) equal one process's within TOLERANCE at every step (the figures are printed: ``pytest -s``); GAM
  queues identical on both ranks and equal to one process's after the steps; batch-norm statistics averaged.
* ``torchrun`` end to end on scenes INFIG: 2 processes give one process's metrics and one run directory; a killed
  rank ends the job with a clear message and ``--resume`` finishes with the uninterrupted run's metrics; two
  launchers with ``--nnodes 2`` (c10d rendezvous on 127.0.0.1) agree with one launcher of 2 processes. On tiny RAHP:
  an error in the code of one rank is named by the other and by torchrun's summary, without advice to resume.

Dropout is off and the small CNN is frozen (batch norm in training mode normalises each process's own batch, as
in any DDP run without SyncBatchNorm, so it is not equivalent by design).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from serving_fixtures import free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from mmsenti.config import load_config
from mmsenti.distributed import (
    Distributed,
    ShardedBatchSampler,
    attach_gather,
    round_robin,
    shard,
    shard_weight,
    unwrap_model,
)
from mmsenti.losses import total_loss
from mmsenti.models.base import TaskInfo, build_model
from mmsenti.models.encoders import build_processor
from mmsenti.train.checkpoint import load_checkpoint
from mmsenti.train.trainer import EpochBatchSampler, Trainer, TrainStep
from mmsenti.train.workbench import build_dataset

NO_DROPOUT = ["model.dropout=0", "model.text_encoder.arch={hidden_dropout_prob: 0, attention_probs_dropout_prob: 0}"]
# HFAM over two layers (its token gather across processes), on a frozen CNN (see above).
INFIG_MODEL = ["model.name=infig-tiny", "model.image_layers=2", "model.hfam_layers=2", "model.text_encoder.num_layers=2",
               "model.image_encoder.freeze=true", *NO_DROPOUT]
INFIG = [*INFIG_MODEL, "model.queue_size=20", "data.num_train=32", "data.num_dev=8", "data.num_test=8"]
# index=torch: `auto` picks an index per process by a timing, and FAISS's scores round differently from torch's.
RAHP = [
    "data.name=synthetic-mmsa", "data.n_train=48", "data.n_valid=8", "data.n_test=8", "data.eval_batch_size=10",
    "model.name=rahp-tiny", "model.modalities=[text,audio,vision]", "model.text_input=features",
    "model.feature_dims={text: 32, audio: 16, vision: 24}", "model.lambda_ret=0.5", "model.index=torch", *NO_DROPOUT,
]
# Global batches of the spawned checks (indices into the training split), one optimiser step each. Shards of 2
# processes: 4+4, 1+2, 4+4 and a short last batch 2+3; 24 keys wrap GAM's queue of 20.
INFIG_BATCHES = [list(range(0, 8)), [8, 9, 10], list(range(11, 19)), list(range(19, 24))]
# Loss terms and gradients of 2 processes vs 1 differ by float32 rounding only: the same sums taken in another order
# (per-process partial sums weighted by the shares, gathered rows, DDP's mean over the processes). With terms up to ~3
# and gradients up to ~2 that is a few ulps (2.4e-7 at that size; the test prints what it measures). 1e-5, about 40
# ulps, leaves room for other CPUs' kernels (AVX2 and AVX-512 block their sums differently) and stays far below what a
# real mismatch moves (a share weighted wrongly, a key missed or counted twice: the shards' own terms differ by more
# than 1e-3, which the test checks).
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------ without processes
def test_shards_are_disjoint_ordered_slices_of_each_global_batch():
    batches = EpochBatchSampler(23, 8, seed=3, epoch=1).batches()  # 8, 8, 7
    for world in (1, 2, 3):
        shards = [list(ShardedBatchSampler(batches, r, world)) for r in range(world)]
        for j, b in enumerate(batches):
            parts = [s[j] for s in shards]
            assert sum(parts, []) == b  # rank order restores the global batch, in order: disjoint and complete
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(shard(list(range(7)), r, 2)) for r in range(2)] == [3, 4]
    # One process: exactly the global sampler, resume included.
    assert list(ShardedBatchSampler(EpochBatchSampler(23, 8, 3, 1), start=1)) == list(EpochBatchSampler(23, 8, 3, 1, 1))


def test_global_batches_smaller_than_the_world_are_skipped_everywhere():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8]]  # the last global batch cannot give each of 2 ranks a sample
    s0, s1 = ShardedBatchSampler(batches, 0, 2), ShardedBatchSampler(batches, 1, 2)
    assert list(s0) == [[0, 1], [4, 5]] and list(s1) == [[2, 3], [6, 7]]
    assert s0.skipped == s1.skipped == 1 and len(s0) == len(s1) == 2 and s0.global_sizes == [4, 4]
    assert list(ShardedBatchSampler(batches, 1, 2, start=1)) == [[6, 7]]  # start counts kept batches
    mixed = [[0], [1, 2, 3], [4, 5]]
    assert list(ShardedBatchSampler(mixed, 1, 2, start=0)) == [[2, 3], [5]]
    assert ShardedBatchSampler(mixed, 0, 2, start=1).global_sizes == [2]
    assert round_robin(list(range(7)), 1, 3) == [1, 4]


def test_gather_hook_reaches_every_loss_and_single_process_gather_is_identity():
    d = Distributed()
    x = torch.randn(3, 2)
    y, off = d.all_gather(x)
    assert y is x and off == 0 and d.is_main and not d.enabled
    bundle = build_dataset(load_config(None, INFIG))
    cfg = load_config(None, INFIG)
    model = build_model(cfg.model, TaskInfo(bundle.task, bundle.label_names),
                        build_processor(cfg.model, [s.text for s in bundle.split("train")], bundle.task))
    assert attach_gather(model, d.all_gather) == 2
    assert model.gam_loss.gather == d.all_gather and model.hfam_loss.gather == d.all_gather


def test_momentum_encoders_move_once_per_optimizer_step_with_grad_accumulation(tmp_path, monkeypatch):
    """grad_accum=2: each optimiser step applies one EMA step, and nothing moves the momentum encoders between
    steps (a per-forward update would apply it twice: momentum m², the bug this guards against)."""
    from mmsenti.models.infig.model import Infig

    m = 0.5
    overrides = INFIG + ["model.image_encoder.freeze=false", "data.batch_size=8", "optim.grad_accum=2",
                         "optim.epochs=1", f"model.momentum={m}", "run.quiet=true", "run.feature_cache=false"]
    steps = []
    original = Infig.on_optimizer_step

    def spy(self, trainer=None):
        snap = lambda mod: [p.detach().clone() for p in mod.parameters()]  # noqa: E731
        before, online = snap(self.image_encoder_m), snap(self.image_encoder)
        original(self, trainer)
        steps.append((before, online, snap(self.image_encoder_m)))

    monkeypatch.setattr(Infig, "on_optimizer_step", spy)
    trainer = Trainer(load_config(None, overrides), tmp_path)
    trainer.fit()
    assert len(steps) == trainer.state.step == 2  # 32 samples / 8 per micro-batch / 2 micro-batches per step
    for s, (before, online, after) in enumerate(steps):
        for b, o, a in zip(before, online, after, strict=True):
            torch.testing.assert_close(a, m * b + (1 - m) * o)
        if s:
            assert all(torch.equal(b, a) for b, a in zip(before, steps[s - 1][2], strict=True))
    assert not torch.equal(steps[0][0][0], steps[1][0][0])  # the EMA did move them


def test_nproc_checks_the_config_before_starting_processes_and_summarises_a_failure(monkeypatch, capsys,
                                                                                    tmp_path):
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from mmsenti.cli import main

    started = []
    monkeypatch.setattr(torchrun, "run", lambda args: started.append(args))
    assert main(["train", "--set", "optim.lr=fast", "--nproc", "2"]) == 2
    assert "optim.lr: expected a number" in capsys.readouterr().err and not started
    assert main(["-v", "train", "--set", "optim.epochs=1", "--nproc", "2", "--quiet"]) == 0
    args = started[0]
    assert args.nproc_per_node == "2" and args.standalone and args.module and args.training_script == "mmsenti"
    assert args.training_script_args == ["-v", "train", "--set", "optim.epochs=1", "--quiet"]

    def fail(args):
        failure = ProcessFailure(local_rank=1, pid=123, exitcode=-9, error_file="/nonexistent")
        raise ChildFailedError("mmsenti", {1: failure})

    monkeypatch.setattr(torchrun, "run", fail)
    assert main(["train", "--nproc", "2"]) == 1
    assert "training process 1 of 2 failed (signal SIGKILL)" in capsys.readouterr().err

    def fail_with_error(args, error_file=tmp_path / "error.json"):
        # Process 1 stopped on an error and left it in its error file (Distributed.report_error); process 0 then
        # lost it and exited 1, later or in the same second.
        error_file.write_text(json.dumps({"message": {"message": "ValueError: injected", "extraInfo": {
            "py_callstack": "Traceback ...", "timestamp": str(int(time.time()))}}}))
        failures = {0: ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file="/nonexistent"),
                    1: ProcessFailure(local_rank=1, pid=2, exitcode=1, error_file=str(error_file))}
        raise ChildFailedError("mmsenti", failures)

    monkeypatch.setattr(torchrun, "run", fail_with_error)
    assert main(["train", "--nproc", "2"]) == 1
    err = capsys.readouterr().err
    assert "training process 1 of 2 failed with an error: ValueError: injected; the others were stopped" in err


def test_ddp_without_unused_parameter_detection_names_the_parameters_that_get_no_gradient(tmp_path, tiny_overrides):
    from mmsenti.config import ConfigError

    trainer = Trainer(load_config(None, tiny_overrides), tmp_path)
    trainer.prepare()
    trainer.model.unused = torch.nn.Linear(2, 2)
    batch = next(iter(trainer.loader("train", 0)))
    total_loss(trainer.train_step(batch)).backward()
    with pytest.raises(ConfigError, match=r"2 trainable parameter\(s\) get no gradient .*unused.weight, unused.bias"):
        trainer._check_all_parameters_trained()
    compiled = torch.nn.Module()
    compiled._orig_mod = trainer.model  # what torch.compile's wrapper holds
    assert unwrap_model(compiled) is trainer.model


# ------------------------------------------------------------------------------ spawned pairs of processes
def _build(overrides, processor=None):
    cfg = load_config(None, overrides)
    bundle = build_dataset(cfg)
    if processor is None:
        processor = build_processor(cfg.model, [s.text or "" for s in bundle.split("train")], bundle.task)
    torch.manual_seed(0)
    model = build_model(cfg.model, TaskInfo(bundle.task, bundle.label_names), processor)
    return cfg, bundle, processor, model


def _bank_batches(cfg, bundle, processor):
    train, size = bundle.split("train"), cfg.data.eval_batch_size
    return [processor(train[i:i + size]) for i in range(0, len(train), size)]


def _rahp_batches(bundle) -> tuple[list[list[int]], list[int]]:
    """RAHP's global batches (shards 4+4, 1+2, 1+1, 2+3) and the samples whose audio and vision are blanked.

    In the 1+2 batch process 0's only sample has text alone and a sentiment sign no other sample of the batch has:
    a process without anchors while process 1 has some (the early return that crashed gloo). In the 1+1 batch
    neither sample has a positive: no anchor on any process.
    """
    signs = [s.label >= 0 for s in bundle.split("train")]
    pos = [i for i in range(8, len(signs)) if signs[i]]
    neg = [i for i in range(8, len(signs)) if not signs[i]]
    alone, other = pos[0], neg[:2]  # 1+2: rank 0 holds `alone`
    pair = [pos[1], neg[2]]  # 1+1
    rest = [i for i in range(8, len(signs)) if i not in {alone, *other, *pair}][:5]
    return [list(range(8)), [alone, *other], pair, rest], [alone, *pair]


def _run_steps(overrides, processor, d: Distributed, batches: list[list[int]], blank: list[int]) -> dict:
    """One optimiser step per global batch of ``batches`` (this rank's shard when ``d`` is distributed, weighted by
    its share as the trainer weights it); the samples in ``blank`` lose their audio and vision (an empty modality).

    SGD, not AdamW: Adam normalises each gradient by its own size, so where the true gradient is ~0 it turns float
    rounding into full-size steps and later steps would compare different weights.
    """
    cfg, bundle, _, model = _build(overrides, processor)
    train = bundle.split("train")
    if d.enabled:
        assert attach_gather(model, d.all_gather) == (2 if cfg.model.name == "infig" else 1)
    if cfg.model.name == "rahp":
        model.refresh_bank(round_robin(_bank_batches(cfg, bundle, processor), d.rank, d.world_size), "cpu",
                           d if d.enabled else None)
    step = d.wrap(TrainStep(model), torch.device("cpu"), find_unused_parameters=False)
    assert unwrap_model(step).model is model and isinstance(step, DDP) == d.enabled
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out: dict = {"terms": [], "grads": [], "rows": []}
    for global_batch in batches:
        ids = shard(global_batch, d.rank, d.world_size)
        batch = processor([train[i] for i in ids])
        for row, i in enumerate(ids):
            if i in blank:
                batch["audio_mask"][row] = batch["vision_mask"][row] = 0
        terms = step(batch)
        (total_loss(terms) * shard_weight(len(ids), len(global_batch), d.world_size)).backward()
        out["terms"].append({k: float(v.detach()) for k, v in terms.items()})
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        out["rows"].append(len(ids))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "on_optimizer_step"):
            model.on_optimizer_step()
    if cfg.model.name == "infig":
        # Evaluation of a fresh model: whole batches of 3 (3, 3, 2) spread round-robin, gathered back in order.
        from mmsenti.train.evaluate import evaluate

        _, _, _, fresh = _build(overrides, processor)
        dev = bundle.split("dev")
        eval_batches = [processor(dev[i:i + 3]) for i in range(0, len(dev), 3)]
        out["eval"] = evaluate(fresh, round_robin(eval_batches, d.rank, d.world_size), torch.device("cpu"),
                               dist=d if d.enabled else None)
        q = model.gam_loss
        out["queues"] = {k: getattr(q, k).features() for k in ("image_queue", "text_queue")}
        out["queue_ids"] = q.image_queue.sample_ids()
    else:
        out["bank"] = {m: model.bank.indexes[m].state()[1] for m in model.modalities}
        out["bank_ids"] = list(model.bank.ids)
    return out


def _worker(rank: int, world: int, init: str, out_dir: str, processors: dict, plans: dict) -> None:
    import datetime

    import torch.distributed as tdist

    torch.set_num_threads(1)
    # A collective mismatch can deadlock instead of failing: a timeout turns that into an error.
    tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=120))
    d = Distributed.from_group()
    result: dict = {}
    # The gather contract: uneven rows and trailing sizes, rank order, offset, gradients summed over ranks.
    x = torch.full((rank + 1, rank + 2), float(rank + 1), requires_grad=True)
    x_all, offset = d.all_gather(x)
    weights = torch.arange(x_all.numel(), dtype=torch.float32).reshape(x_all.shape)
    (x_all * weights).sum().backward()
    mask_all, _ = d.all_gather(torch.ones(rank + 1, rank + 2, dtype=torch.bool))
    result["gather"] = {"x_all": x_all.detach(), "offset": offset, "grad": x.grad, "mask_all": mask_all}
    # Batch-norm statistics from different batches, averaged.
    bn = torch.nn.BatchNorm1d(3).train()
    bn(torch.randn(6, 3, generator=torch.Generator().manual_seed(rank)) * (rank + 1))
    d.average_norm_statistics(bn)
    result["bn"] = (bn.running_mean.clone(), bn.running_var.clone())
    for name, overrides in (("infig", INFIG), ("rahp", RAHP)):
        result[name] = _run_steps(overrides, processors[name], d, *plans[name])
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    d.close()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One process with each global batch (in this process) and 2 spawned processes with its shards, for INFIG
    and RAHP."""
    out = tmp_path_factory.mktemp("spawn")
    built = {name: _build(o) for name, o in (("infig", INFIG), ("rahp", RAHP))}
    processors = {name: b[2] for name, b in built.items()}
    plans = {"infig": (INFIG_BATCHES, []), "rahp": _rahp_batches(built["rahp"][1])}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned processes: the printed differences do not depend on OMP_NUM_THREADS
    try:
        single = {name: _run_steps(o, processors[name], Distributed(), *plans[name])
                  for name, o in (("infig", INFIG), ("rahp", RAHP))}
    finally:
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(_worker, args=(2, str(out / "init"), str(out), processors, plans), nprocs=2,
                                join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks


def test_gather_contract_across_processes(spawned):
    _, ranks = spawned
    g0, g1 = ranks[0]["gather"], ranks[1]["gather"]
    # Rank 0: 1 row of width 2; rank 1: 2 rows of width 3. Rank order, zero-padded to width 3.
    expect = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]])
    assert torch.equal(g0["x_all"], expect) and torch.equal(g1["x_all"], expect)
    assert (g0["offset"], g1["offset"]) == (0, 1)
    weights = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    # Both ranks' losses read every row: each row's gradient is the sum over ranks (2 × weight), unpadded.
    assert torch.equal(g0["grad"], 2 * weights[:1, :2]) and torch.equal(g1["grad"], 2 * weights[1:, :3])
    assert g0["mask_all"].dtype == torch.bool and g0["mask_all"].sum() == 2 + 6
    # Batch norm: the mean of the two processes' running statistics, on both.
    assert torch.equal(ranks[0]["bn"][0], ranks[1]["bn"][0])
    means = []
    for r in range(2):
        bn = torch.nn.BatchNorm1d(3).train()
        bn(torch.randn(6, 3, generator=torch.Generator().manual_seed(r)) * (r + 1))
        means.append(bn.running_mean)
    torch.testing.assert_close(ranks[0]["bn"][0], (means[0] + means[1]) / 2)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["infig", "rahp"])
def test_two_processes_give_one_process_loss_terms_and_gradients(spawned, name):
    single, ranks = spawned
    one, two = single[name], [r[name] for r in ranks]
    loss_diff = grad_diff = 0.0
    for s, global_terms in enumerate(one["terms"]):
        rows = [two[r]["rows"][s] for r in range(2)]
        # Each rank's term is its share of the global batch: weighted by the ranks' sample counts (as the trainer
        # weights them), the ranks' terms give the single-process term.
        terms = {k: sum(two[r]["terms"][s][k] * rows[r] for r in range(2)) / sum(rows) for k in global_terms}
        loss_keys = {k for k in terms if k.startswith("loss")}
        assert loss_keys == ({"loss_sc", "loss_g", "loss_f"} if name == "infig" else {"loss_reg", "loss_ret"})
        for k in loss_keys:
            loss_diff = max(loss_diff, abs(terms[k] - global_terms[k]))
        # DDP's averaged gradients (through the differentiable gathers) are the single-process gradients.
        assert two[0]["grads"][s].keys() == one["grads"][s].keys() and len(one["grads"][s]) > 20
        grad_diff = max(grad_diff, _max_diff(two[0]["grads"][s], one["grads"][s]),
                        _max_diff(two[1]["grads"][s], one["grads"][s]))
    assert [[t["rows"][s] for t in two] for s in range(len(one["terms"]))] == (
        [[4, 4], [1, 2], [4, 4], [2, 3]] if name == "infig" else [[4, 4], [1, 2], [1, 1], [2, 3]])
    first = "loss_sc" if name == "infig" else "loss_reg"
    assert two[0]["terms"][0][first] != pytest.approx(two[1]["terms"][0][first], abs=1e-3)  # the shards differ
    if name == "rahp":  # the cases of the plan: rank 0 without anchors, then no anchor anywhere
        assert two[0]["terms"][1]["loss_ret"] == 0.0 and two[1]["terms"][1]["loss_ret"] > 0.1
        assert one["terms"][2]["loss_ret"] == two[0]["terms"][2]["loss_ret"] == two[1]["terms"][2]["loss_ret"] == 0
    size = max(abs(v) for t in one["terms"] for k, v in t.items() if k.startswith("loss"))
    grad_size = max(float(g.abs().max()) for grads in one["grads"] for g in grads.values())
    print(f"\n{name}: 2 processes vs 1 over {len(one['terms'])} steps (shards 4+4, 1+2, ..., 2+3): "
          f"max |loss term difference| {loss_diff:.2g} (terms up to {size:.2g}), max |gradient difference| "
          f"{grad_diff:.2g} (gradients up to {grad_size:.2g}); asserted < {TOLERANCE:g}")
    assert loss_diff < TOLERANCE and grad_diff < TOLERANCE


def test_gam_queues_are_identical_on_every_rank_and_equal_one_process(spawned):
    single, ranks = spawned
    one, two = single["infig"], [r["infig"] for r in ranks]
    assert one["queues"]["image_queue"].shape[0] == 20  # 24 keys through a queue of 20: it wrapped
    for k in ("image_queue", "text_queue"):
        assert torch.equal(two[0]["queues"][k], two[1]["queues"][k])
    diff = _max_diff(two[0]["queues"], one["queues"])
    print(f"\ninfig: GAM queues after {len(one['terms'])} steps bitwise identical on both processes, max |difference| "
          f"from one process's {diff:.2g} (asserted < {TOLERANCE:g})")
    assert diff < TOLERANCE
    assert torch.equal(two[0]["queue_ids"], one["queue_ids"]) and torch.equal(two[1]["queue_ids"], one["queue_ids"])


def test_evaluation_spread_over_processes_gives_exactly_one_process_metrics(spawned):
    single, ranks = spawned
    # 3 batches over 2 processes (2 + 1): none lost, none counted twice, the loss weighted by batch size.
    assert ranks[0]["infig"]["eval"] == ranks[1]["infig"]["eval"] == single["infig"]["eval"]
    assert sum(map(sum, single["infig"]["eval"]["confusion_matrix"])) == 8


def test_memory_bank_is_built_from_every_shard_identically(spawned):
    single, ranks = spawned
    one, two = single["rahp"], [r["rahp"] for r in ranks]
    assert one["bank_ids"] == two[0]["bank_ids"] == two[1]["bank_ids"] and len(one["bank_ids"]) == 48
    for m in one["bank"]:
        for k in one["bank"][m]:
            assert torch.equal(two[0]["bank"][m][k], two[1]["bank"][m][k])
            torch.testing.assert_close(two[0]["bank"][m][k], one["bank"][m][k], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- torchrun runs
E2E = [
    "data.num_train=96", "data.num_dev=32", "data.num_test=32", "data.batch_size=16", "data.eval_batch_size=16",
    *INFIG_MODEL, "model.queue_size=40", "optim.epochs=3", "run.checkpoint_every=2", "run.log_every=1000",
]


def _env(tag: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MMSENTI_TEST_RUN": tag}
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(launcher: list[str], out: Path, cache: Path, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [a for o in E2E + [f"run.cache_dir={cache}"] for a in ("--set", o)]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "mmsenti", "train", *sets,
            "--out", str(out), "--quiet", *extra]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    # Its own session: a hung job is killed with all its processes (the launcher and its workers).
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(job: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"timed out after {timeout}s: {err[-3000:]}")


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    job = _start(cmd, env)
    out, err = _finish(job, timeout)
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "best.pt")["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training on 1 process (in this process) and on 2 (one torchrun launcher)."""
    root = tmp_path_factory.mktemp("runs")
    one = Trainer(load_config(None, E2E + [f"run.cache_dir={root / 'cache1'}", "run.quiet=true"]), root / "one")
    one.fit()
    two = root / "two"  # through `mmsenti train --nproc 2`, which wraps torchrun's launcher
    sets = [a for o in E2E + [f"run.cache_dir={root / 'cache2'}"] for a in ("--set", o)]
    proc = _run([sys.executable, "-m", "mmsenti", "train", *sets, "--out", str(two), "--quiet", "--nproc", "2"], _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    root, proc = runs
    one, two = _metrics(root / "one"), _metrics(root / "two")
    for split in ("dev", "test"):
        for k in ("accuracy", "f1_weighted", "f1_macro", "confusion_matrix"):
            assert one[split][k] == two[split][k], (split, k)
        assert one[split]["loss"] == pytest.approx(two[split]["loss"], abs=1e-4)
    # Every epoch's dev loss, and the weights 18 optimiser steps later, agree up to float rounding of the split
    # batch (amplified by AdamW where the true gradient is 0, e.g. attention key biases: compared in L2 against how
    # far the weights moved in the last two epochs).
    csv = [(root / run / "metrics.csv").read_text().splitlines() for run in ("one", "two")]
    assert csv[0][0] == csv[1][0] and len(csv[0]) == len(csv[1]) == 4  # same columns, 3 epochs
    rows = [[float(x) for line in c[1:] for x in line.split(",")] for c in csv]
    assert max(abs(a - b) for a, b in zip(*rows, strict=True)) < 1e-4
    wa, wb = (load_checkpoint(root / run / "checkpoints" / "last.pt")["model"] for run in ("one", "two"))
    w1 = load_checkpoint(root / "one" / "checkpoints" / "best.pt")["model"]  # after epoch 1
    floats = [k for k in wa if wa[k].is_floating_point()]
    diff = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in floats) ** 0.5
    moved = sum(float((wa[k] - w1[k]).pow(2).sum()) for k in floats) ** 0.5
    assert diff < 1e-2 * moved, (diff, moved)
    # One run directory, written once: one log (no line twice), one model, one event file, rank 0's stdout only.
    log = (root / "two" / "train.log").read_text()
    assert log.count("model infig:") == 1 and log.count("epoch 3: train loss") == 1
    assert "distributed training: 2 processes" in log
    assert (root / "two" / "model" / "model.safetensors").is_file()
    # Per-post predictions gathered back in the split's order (what paired significance tests read).
    from mmsenti.metrics import Predictions

    p1, p2 = (Predictions.load(root / run / "predictions" / "test.npz") for run in ("one", "two"))
    assert list(p1.ids) == list(p2.ids) and len(p1.ids) == 32 and (p1.labels == p2.labels).all()
    assert (p1.logits.argmax(1) == p2.logits.argmax(1)).all()
    assert len(list((root / "two" / "tb").glob("events.out.tfevents.*"))) == 1
    assert proc.stdout.strip() == str(root / "two")
    assert len(load_checkpoint(root / "two" / "checkpoints" / "last.pt")["rng"]) == 2  # one RNG state per rank
    assert json.loads((root / "two" / "run_info.json").read_text())["world_size"] == 2
    # `mmsenti evaluate` on 2 processes scores the saved model exactly as the run's final evaluation did.
    ev = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mmsenti",
               "evaluate", str(root / "two"), "--split", "dev", "test", "--output", str(root / "eval.json")], _env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((root / "eval.json").read_text()) == two and ev.stdout.count("test") == 1


def _worker_pids(tag: str, rank: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MMSENTI_TEST_RUN={tag}".encode() in env and f"RANK={rank}".encode() in env:
            pids.append(int(p.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_killed_rank_stops_the_job_clearly_and_resume_finishes_like_the_uninterrupted_run(runs):
    root, _ = runs
    run, tag = root / "killed", uuid.uuid4().hex
    cmd = _torchrun(["--standalone", "--nproc-per-node=2"], run, root / "cache2")
    job = _start(cmd, _env(tag))
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.pt").exists():  # step 2 of 18: well inside the first epoch
        assert job.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.01)
    victims = _worker_pids(tag, rank=1)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    _, err = _finish(job, 120)
    assert job.returncode != 0
    assert "mmsenti: error: rank 0 of 2: lost the other training processes" in err, err[-3000:]
    assert "continue with the same command plus --resume" in err
    assert not (run / "metrics.json").exists()
    resumed = _run(cmd + ["--resume"], _env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert _metrics(run) == _metrics(root / "two")
    wa, wb = _weights(run), _weights(root / "two")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


FAILING_RANK = """
import os, sys
from mmsenti.retrieval.losses import CrossModalSupConLoss
if os.environ["RANK"] == "1":
    def forward(self, *args, **kwargs):
        raise ValueError("injected bug in the loss of rank 1")
    CrossModalSupConLoss.forward = forward
from mmsenti.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_an_error_in_the_code_of_one_rank_is_named_by_the_others_without_advising_resume(tmp_path):
    """Rank 1 raises in its loss: rank 0, which only sees rank 1 vanish in a collective, names that error and says
    resuming would meet it again (not "continue with --resume"); torchrun's summary names it too."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    sets = [a for o in RAHP + ["data.n_train=12", "data.batch_size=4", "optim.epochs=1"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), "train",
           *sets, "--out", str(tmp_path / "run"), "--quiet"]
    proc = _run(cmd, _env())
    assert proc.returncode != 0
    err = proc.stderr
    assert ("mmsenti: error: rank 0 of 2: stopped because rank 1 raised an error (not a lost process): "
            "ValueError: injected bug in the loss of rank 1; resuming would meet it again") in err, err[-3000:]
    assert "--resume" not in err and "lost the other training processes" not in err
    assert "raise ValueError(\"injected bug in the loss of rank 1\")" in err  # rank 1's own traceback
    root_cause = err[err.index("Root Cause"):]
    assert "ValueError: injected bug in the loss of rank 1" in root_cause
    assert "stopped because rank 1 raised an error" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_two_nodes_agree_with_one_node_of_two_processes(runs):
    root, _ = runs
    run, port = root / "nodes", free_port()
    launcher = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                f"--rdzv-id=mmsenti-test-{port}"]
    nodes = [_start(_torchrun(launcher, run, root / "cache2"), _env()) for _ in range(2)]
    outputs = [_finish(n) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert sorted(o[0].strip() for o in outputs) == ["", str(run)]  # only global rank 0 reports the run
    assert _metrics(run) == _metrics(root / "two")
    wa, wb = _weights(run), _weights(root / "two")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
