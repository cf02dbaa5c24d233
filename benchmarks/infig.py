"""INFIG training-step time and peak memory at batch 32: the full model and each ablation.

Each variant runs in a fresh subprocess so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``,
on CPU the growth of the process's peak resident set over the baseline taken after data and imports are loaded.
Then the HFAM fine-grained loss, vectorised vs the naive per-pair loop (``benchmarks/fine_grained.py``).

    python benchmarks/infig.py                      # scenes.yaml sizes (tiny encoders), CPU
    python benchmarks/infig.py --steps 20 --set model.width=128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "full": [],
    "w/o CLIP": ["model.use_clip=false"],
    "w/o GAM": ["model.use_gam=false"],
    "w/o HFAM": ["model.use_hfam=false"],
    "w/o GAM+HFAM": ["model.use_gam=false", "model.use_hfam=false"],
}


def run_variant(config: str, overrides: list[str], batch: int, steps: int, warmup: int, device: str) -> dict:
    import torch

    from mmsenti.config import load_config
    from mmsenti.data.scenes import build_scenes
    from mmsenti.losses import total_loss
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.train.optim import build_optimizer
    from mmsenti.utils import move

    cfg = load_config(config, [f"data.num_train={batch * 4}", "data.num_dev=1", "data.num_test=1"] + overrides)
    data = build_scenes(cfg.data)
    samples = data.splits["train"]
    proc = build_processor(cfg.model, [s.text for s in samples], data.task)
    batches = [proc(samples[i * batch:(i + 1) * batch]) for i in range(4)]
    dev = torch.device(device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = build_model(cfg.model, TaskInfo(data.task, data.label_names), proc).to(dev).train()
    opt = build_optimizer(model, cfg.optim)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        b = move(batches[step % 4], dev)
        t0 = time.perf_counter()
        loss = total_loss(model.compute_loss(model(b), b))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # ru_maxrss is KiB
    times.sort()
    return {"step_ms": 1000 * times[len(times) // 2], "peak_mb": peak_mb,
            "params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/infig/scenes.yaml"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--skip-fine-grained", action="store_true")
    args = ap.parse_args()

    if args.variant is not None:
        res = run_variant(args.config, VARIANTS[args.variant] + args.set, args.batch, args.steps, args.warmup,
                          args.device)
        print(json.dumps(res))
        return

    print(f"INFIG training step, batch {args.batch}, {args.device}, median of {args.steps} steps "
          f"(config {Path(args.config).name} {' '.join(args.set)})")
    print(f"{'variant':<14} {'params (M)':>10} {'step (ms)':>10} {'peak mem (MB)':>14} {'time vs full':>13}")
    full = None
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--config", args.config, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        for s in args.set:
            cmd += ["--set", s]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res = json.loads(out)
        full = full or res
        print(f"{name:<14} {res['params_m']:>10.2f} {res['step_ms']:>10.1f} {res['peak_mb']:>14.1f} "
              f"{res['step_ms'] / full['step_ms']:>12.2f}x")

    if not args.skip_fine_grained:
        print()
        subprocess.run([sys.executable, str(ROOT / "benchmarks/fine_grained.py")], check=True)


if __name__ == "__main__":
    main()
