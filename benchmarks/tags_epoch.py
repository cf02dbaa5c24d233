"""What a text + tags training epoch costs against text only (issue 26), on HFM's attribute words.

    python benchmarks/tags_epoch.py                   # HFM (../shared/data), 24 timed steps per row
    python benchmarks/tags_epoch.py --steps 40 --threads 1

Every row trains INFIG-lite's text side as the text-only row does (MiniLM, top 2 layers fine-tuned, the frozen lower
layers and the frozen tag embeddings from the feature cache, batches bucketed by length), on the same training
posts in the same batches, from the same text weights. Rows take turns a few steps at a time in one process, so
a change in the machine's load slows them alike and the ratios stay fair. An epoch is the same number of steps in
every row, so the ratio of step times is the ratio of epoch times (evaluation aside). Printed: ms per step and the
ratio to text only per row, and for the full INFIG row where its time goes (phases; GAM and HFAM replayed alone).
Needs HFM in ../shared/data (or --data-root): its attribute words are what is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed as ts  # noqa: E402  (the step timing, workload and variant machinery)

ROWS = [  # (workload name, config, label): each its own config, so its own initial weights (the text's are MiniLM's)
    ("hfm-text", "configs/lite/hfm-text.yaml", "text only"),
    ("hfm-tags", "configs/tags/hfm-infig.yaml", "INFIG-lite text + tags (GAM + HFAM)"),
    ("hfm-tags-no-gam", "configs/tags/hfm-infig-no-gam.yaml", "  w/o GAM"),
    ("hfm-tags-no-hfam", "configs/tags/hfm-infig-no-hfam.yaml", "  w/o HFAM"),
    ("hfm-tags-no-gam-hfam", "configs/tags/hfm-infig-no-gam-hfam.yaml", "  w/o GAM and HFAM"),
    ("hfm-late-fusion", "configs/tags/hfm-late-fusion.yaml", "late fusion text + tags"),
]
ts.WORKLOADS.update({name: {"config": config, "data": "hfm", "fallback": [], "label": label}
                     for name, config, label in ROWS})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ts.ROOT.parent / "shared" / "data"))
    p.add_argument("--samples", type=int, default=2048, help="training samples used (and cached)")
    p.add_argument("--steps", type=int, default=24, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8, help="rows take turns in this many rounds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: physical cores)")
    p.add_argument("--cache-dir", default=None, help="feature-cache directory (default: the trainer's)")
    args = p.parse_args()
    args.set, args.compile_warmup = [], 0
    if not (Path(args.data_root) / "hfm").is_dir():
        sys.exit(f"tags_epoch.py: no HFM data in {args.data_root} (give --data-root DIR holding hfm/)")

    import logging

    import torch

    import mmsenti  # noqa: F401  (compat shims before transformers)

    logging.basicConfig(level=logging.WARNING)
    args.threads = args.threads or ts.physical_cores()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load:.2f} at start")
    print(ts.describe_cpu())
    workloads: dict[str, ts.Workload] = {}
    variants = []
    for name, _, label in ROWS:
        ts.progress(f"loading {name}")
        workloads[name] = ts.Workload(name, args)
        ts.progress(f"building and warming up '{label}'")
        variants.append(ts.Variant(workloads[name], label, []))
        variants[-1].warm()
    per_round = -(-args.steps // args.rounds)
    for r in range(args.rounds):
        ts.progress(f"timing round {r + 1}/{args.rounds}")
        for v in variants[r % len(variants):] + variants[: r % len(variants)]:
            v.timed(per_round)
    results = [(v, v.result()) for v in variants]
    base = results[0][1]["ms_step"]
    wl = workloads["hfm-text"]
    print(f"\n## {wl.label}: {len(wl.samples)} training posts, batch {wl.shipped.data.batch_size}, "
          f"{results[0][1]['steps']} timed steps per row after {args.warmup} warm-up\n")
    print("| row | ms/step | × text only |")
    print("|---|---|---|")
    for v, res in results:
        print(f"| {v.label} | {res['ms_step']:.0f} | {res['ms_step'] / base:.2f} |")
    full, res = results[1]
    print(f"\nwhere the time of '{full.label}' goes ({res['ms_step']:.0f} ms/step):\n")
    print("| part | ms/step |")
    print("|---|---|")
    for k, t in res["phases"].items():
        print(f"| {k} | {1000 * t / res['steps']:.1f} |")
    for k, t in ts.alignment_times(full).items():
        print(f"| (replayed alone) {k} | {1000 * t:.1f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} at end")


if __name__ == "__main__":
    main()
