"""Multi-process (DDP) training on this machine's CPU: samples/s of 1 vs 2 processes, and the all-gather's share.

INFIG training steps (forward with GAM + HFAM + the tiny CLIP, loss, backward, AdamW: the trainer's ``TrainStep``)
on one fixed global batch, in fresh processes:

* 1 process, 1 thread;  1 process, all cores' threads;  2 processes × 1 thread (DDP over gloo, each process half
  of the global batch, global negatives through the differentiable all-gather).

For the 2-process run it also reports the loss gathers' time (GAM keys and ids, HFAM token states and masks,
SupCon: forward all-gathers and the backward all-reduce of their gradients; ``torch.profiler`` ranges
``mmsenti.all_gather*``) as a share of the step, and the gradient all-reduce's cost (the step minus the same step
under DDP's ``no_sync``). Batches are collated before timing; data loading is not measured.

    python benchmarks/ddp.py                       # configs/infig/scenes.yaml, global batch 32
    python benchmarks/ddp.py --batch 64 --steps 30 --set model.width=128

On a machine with 2 cores, 2 processes of 1 thread can at best match 1 process using both cores for its
intra-op threads: the figure to read is how much of that the communication costs, not a speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(rank: int, world: int, threads: int, init: str, opts: dict, out: str) -> None:
    import torch
    import torch.distributed as tdist

    from mmsenti.config import load_config
    from mmsenti.data.scenes import build_scenes
    from mmsenti.distributed import PROFILE_GATHER, PROFILE_GATHER_BACKWARD, Distributed, attach_gather, shard
    from mmsenti.losses import total_loss
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.train.optim import build_optimizer
    from mmsenti.train.trainer import TrainStep

    torch.set_num_threads(threads)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    d = Distributed.from_group()
    b, pool = opts["batch"], 4
    cfg = load_config(opts["config"], [f"data.num_train={b * pool}", "data.num_dev=1", "data.num_test=1",
                                       *opts["overrides"]])
    data = build_scenes(cfg.data)
    samples = data.splits["train"]
    proc = build_processor(cfg.model, [s.text for s in samples], data.task)
    batches = [proc([samples[i] for i in shard(list(range(k * b, (k + 1) * b)), d.rank, d.world_size)])
               for k in range(pool)]
    torch.manual_seed(0)
    model = build_model(cfg.model, TaskInfo(data.task, data.label_names), proc).train()
    if d.enabled:
        attach_gather(model, d.all_gather)
    step_module = d.wrap(TrainStep(model), torch.device("cpu"), cfg.run.find_unused_parameters)
    opt = build_optimizer(model, cfg.optim)

    def step(k: int, sync: bool = True) -> float:
        d.barrier()  # every process starts the step together: the time is the slowest process's
        t0 = time.perf_counter()
        with step_module.no_sync() if (d.enabled and not sync) else contextlib.nullcontext():
            total_loss(step_module(batches[k % pool])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.on_optimizer_step()
        d.barrier()
        return time.perf_counter() - t0

    for k in range(opts["warmup"]):
        step(k)
    times = [step(k) for k in range(opts["steps"])]
    result = {"step_s": statistics.median(times), "world": world, "threads": threads}
    if d.enabled:
        result["no_sync_step_s"] = statistics.median([step(k, sync=False) for k in range(opts["steps"])])
        n_prof = min(5, opts["steps"])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for k in range(n_prof):
                step(k)
            wall = time.perf_counter() - t0
        events = {e.key: e for e in prof.key_averages()}
        us = {name: events[name].cpu_time_total if name in events else 0.0
              for name in (PROFILE_GATHER, PROFILE_GATHER_BACKWARD)}
        result.update(profiled_step_s=wall / n_prof, gather_fwd_s=us[PROFILE_GATHER] / 1e6 / n_prof,
                      gather_bwd_s=us[PROFILE_GATHER_BACKWARD] / 1e6 / n_prof,
                      gather_calls=events[PROFILE_GATHER].count // n_prof if PROFILE_GATHER in events else 0)
    if d.is_main:
        Path(out).write_text(json.dumps(result))
    d.close()


def run(world: int, threads: int, opts: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(worker, args=(world, threads, str(Path(tmp) / "init"), opts, str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/infig/scenes.yaml"))
    ap.add_argument("--batch", type=int, default=32, help="global batch (each of 2 processes takes half)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cores = os.cpu_count() or 1
    opts = {"config": args.config, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
            "overrides": list(args.set)}
    load0 = os.getloadavg()[0]
    variants = [("1 process × 1 thread", 1, 1), (f"1 process × {cores} threads", 1, cores),
                ("2 processes × 1 thread (DDP, gloo)", 2, 1)]
    rows = [(name, run(world, threads, opts)) for name, world, threads in variants]
    load1 = os.getloadavg()[0]

    print(f"INFIG ({Path(args.config).name}{', ' + ', '.join(args.set) if args.set else ''}), global batch "
          f"{args.batch}, median of {args.steps} steps; {cores} CPU cores, load average {load0:.2f} → {load1:.2f}")
    base = rows[0][1]["step_s"]
    print("\n| run | step ms | samples/s | vs 1 process × 1 thread |\n|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {1000 * r['step_s']:.1f} | {args.batch / r['step_s']:.1f} | {base / r['step_s']:.2f}× |")
    ddp = rows[-1][1]
    g = ddp["gather_fwd_s"] + ddp["gather_bwd_s"]
    allreduce = max(0.0, ddp["step_s"] - ddp["no_sync_step_s"])
    print(f"\n2 processes: the loss gathers ({ddp['gather_calls']} all-gathers per step, forward + backward) take "
          f"{1000 * g:.2f} ms of a {1000 * ddp['profiled_step_s']:.1f} ms profiled step "
          f"({100 * g / ddp['profiled_step_s']:.1f}%: forward {1000 * ddp['gather_fwd_s']:.2f} ms, backward "
          f"{1000 * ddp['gather_bwd_s']:.2f} ms); DDP's gradient all-reduce adds {1000 * allreduce:.1f} ms "
          f"({100 * allreduce / ddp['step_s']:.1f}% of the step; step without it {1000 * ddp['no_sync_step_s']:.1f} ms).")
    print(f"2 processes × 1 thread vs 1 process × {cores} threads: "
          f"{rows[1][1]['step_s'] / ddp['step_s']:.2f}× the samples/s.")


if __name__ == "__main__":
    main()
