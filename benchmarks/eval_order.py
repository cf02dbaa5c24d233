"""Passes that need no shuffling, in file order against longest first: the frozen-feature cache build, a RAHP
memory-bank refresh and an evaluation pass (where a RAHP text + tags epoch spends its time besides training steps).

    python benchmarks/eval_order.py                       # HFM (../shared/data): RAHP, text + attribute words
    python benchmarks/eval_order.py --samples 4096 --threads 1 --rounds 3

Each pass runs over the same training posts in batches of ``data.eval_batch_size``, once in file order (how every
such pass ran before) and once longest first (``mmsenti.train.sampler.ordered_batches``, what they run now). The
orders take turns, a round at a time, so a change in the machine's load slows both alike. Printed: the padded
tokens of each order, seconds per pass and the ratio, and a check that both orders computed the same numbers.
Needs HFM in ../shared/data (or --data-root): its tweets' lengths are what is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (CPU description, core count, progress lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tags/hfm-rahp.yaml")
    p.add_argument("--data-root", default=str(ts.ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=2048, help="training posts per pass")
    p.add_argument("--rounds", type=int, default=3, help="each order runs each pass this many times")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: physical cores)")
    args = p.parse_args()
    if not (Path(args.data_root) / "hfm").is_dir():
        sys.exit(f"eval_order.py: no HFM data in {args.data_root} (give --data-root DIR holding hfm/)")

    import logging

    import torch

    import mmsenti  # noqa: F401  (compat shims before transformers)
    from mmsenti.config import load_config
    from mmsenti.train.cache import CachedCollator, build_store
    from mmsenti.train.evaluate import evaluate
    from mmsenti.train.sampler import ordered_batches, sample_lengths
    from mmsenti.train.workbench import build_workbench

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads or ts.physical_cores())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f} at start")
    print(ts.describe_cpu())
    tmp = Path(tempfile.mkdtemp(prefix="eval-order-"))
    cfg = load_config(str(ts.ROOT / args.config), [f"data.root={Path(args.data_root) / 'hfm'}",
                                                   f"run.cache_dir={tmp / 'trainer-cache'}", "run.quiet=true"])
    ts.progress(f"building {cfg.model.name} on {cfg.data.name}")
    bench = build_workbench(cfg, feature_cache=False)
    model, proc = bench.model, bench.processor
    model.eval()
    samples = bench.bundle.split("train")[: args.samples]
    size = cfg.data.eval_batch_size
    lengths = sample_lengths(proc, samples)
    orders = {"file order": ordered_batches(len(samples), size), "longest first": ordered_batches(len(samples), size,
                                                                                                  lengths)}
    padded = {k: sum(max(lengths[i] for i in b) * len(b) for b in v) for k, v in orders.items()}
    spec = model.cache_spec()
    seconds: dict[tuple[str, str], list[float]] = {}
    stores, banks, metrics = {}, {}, {}

    def timed(pass_name: str, order: str, fn, *fn_args, **fn_kwargs):
        t0 = time.perf_counter()
        out = fn(*fn_args, **fn_kwargs)
        seconds.setdefault((pass_name, order), []).append(time.perf_counter() - t0)
        return out

    def passes(order: str, r: int) -> None:
        batches = orders[order]
        stores[order] = timed("feature-cache build", order, build_store, tmp / f"{order.replace(' ', '-')}-{r}",
                              model, (proc([samples[i] for i in b]) for b in batches), spec, {"split": "train"},
                              dtype=cfg.run.cache_dtype)
        collate = CachedCollator(proc, stores[order], model.cache_replaces())
        if cfg.model.name.startswith("rahp") and cfg.model.retrieval == "bank":
            timed("memory-bank refresh", order, model.refresh_bank, (collate([samples[i] for i in b]) for b in batches))
            banks[order] = model.bank
        metrics[order] = timed("evaluation", order, evaluate, model, (collate([samples[i] for i in b]) for b in batches),
                               bench.device)

    for r in range(args.rounds):
        for order in list(orders)[r % 2:] + list(orders)[: r % 2]:
            ts.progress(f"round {r + 1}/{args.rounds}: {order}")
            passes(order, r)

    print(f"\n## {cfg.model.name} ({args.config}), {len(samples)} HFM training posts, batches of {size}, "
          f"{args.rounds} rounds\n")
    print(f"padded text tokens: file order {padded['file order']:,}, longest first {padded['longest first']:,} "
          f"({padded['file order'] / padded['longest first']:.2f}x fewer); real tokens {sum(lengths):,}\n")
    print("| pass | file order s | longest first s | speed-up |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(k[0] for k in seconds):
        f, s = (min(seconds[(name, o)]) for o in orders)
        print(f"| {name} | {f:.1f} | {s:.1f} | {f / s:.2f}x |")
    m0, m1 = (metrics[o] for o in orders)
    print(f"\nsame numbers: evaluation loss {m0['loss']:.6f} vs {m1['loss']:.6f} (each order reads its own cache "
          "entry; these are training posts, scored against a bank that holds them)")
    if banks:
        x, y = (banks[o] for o in orders)
        print(f"memory bank: {len(x)} vs {len(y)} rows, same ids {sorted(x.ids) == sorted(y.ids)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(the best of {args.rounds} rounds per cell; load average {load:.2f} at end)")


if __name__ == "__main__":
    main()
