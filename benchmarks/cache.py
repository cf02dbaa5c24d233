"""Frozen-feature cache: one training epoch of INFIG-lite with and without the cache, on real CM-Off-Meme data.

All runs start from the same weights with the same seed and the same batches (the config's sampler: length-bucketed
in the lite preset), so their losses must agree to float tolerance (the cache only changes *where* the frozen
outputs come from); the fp16 entry rounds the cached states to half precision, and its loss difference says what
that costs. The cache build (once per split, reused by later epochs, seeds and ablations) is timed separately.
Every other setting is the config's (attention, AdamW kernel, bucketing: the shipped defaults).

    python benchmarks/cache.py                             # 1,000 samples, configs/lite/cm-memes.yaml
    python benchmarks/cache.py --samples 256 --set model.text_encoder.trainable_layers=1
    python benchmarks/cache.py --set data.bucket_by_length=false --set model.attention=mha  # the earlier path
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run_epochs(paths: dict, batches, grad_clip: float, amp=None) -> dict[str, tuple[float, float]]:
    """One epoch per path, interleaved batch by batch (so a change in the machine's load hits every path alike).

    ``paths``: name → (model, optimizer, collate). Returns name → (seconds, data loading included; mean loss).
    """
    import torch

    from mmsenti.losses import total_loss
    from mmsenti.utils import autocast

    seconds = dict.fromkeys(paths, 0.0)
    losses: dict[str, list] = {name: [] for name in paths}
    for model, _, _ in paths.values():
        model.train()
    rng = {name: torch.Generator().manual_seed(0).get_state() for name in paths}
    for samples in batches:
        for name, (model, opt, collate) in paths.items():
            torch.set_rng_state(rng[name])  # each path sees its own, identical stream of dropout masks
            t0 = time.perf_counter()
            batch = collate(samples)
            with autocast(torch.device("cpu"), amp):
                loss = total_loss(model.compute_loss(model(batch), batch))
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hasattr(model, "on_optimizer_step"):  # INFIG: the momentum encoders' EMA step
                model.on_optimizer_step()
            seconds[name] += time.perf_counter() - t0
            rng[name] = torch.get_rng_state()
            losses[name].append(loss.detach())
    return {name: (seconds[name], float(torch.stack(losses[name]).mean())) for name in paths}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/lite/cm-memes.yaml"))
    p.add_argument("--root", default=str(ROOT.parent / "shared/data/cm_memes"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override a.b=v")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"],
                   help="cache entries to compare")
    args = p.parse_args()

    import torch

    from mmsenti.config import load_config
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.registry import DATASETS
    from mmsenti.train.cache import CachedCollator, open_or_build
    from mmsenti.train.optim import build_optimizer
    from mmsenti.train.sampler import build_batch_sampler, sample_lengths
    from mmsenti.utils import autocast_dtype

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"data.root={args.root}", *args.set])
    bundle = DATASETS.get(cfg.data.name).builder(cfg.data)
    samples = [s for split in ("train", "dev", "test") for s in bundle.splits.get(split, [])][: args.samples]
    proc = build_processor(cfg.model, [s.text or "" for s in samples], bundle.task)
    torch.manual_seed(0)
    model = build_model(cfg.model, TaskInfo(bundle.task, bundle.label_names), proc)
    init = copy.deepcopy(model.state_dict())
    lengths = sample_lengths(proc, samples) if cfg.data.bucket_by_length else None
    sampler = build_batch_sampler(len(samples), args.batch, 0, 0, 0, lengths, cfg.data.bucket_pool)
    batches = [[samples[i] for i in b] for b in sampler]

    print(f"INFIG-lite on {len(samples)} {cfg.data.name} samples, batch {args.batch}, {torch.get_num_threads()} "
          f"threads; text {cfg.model.text_encoder.name} (top {cfg.model.text_encoder.trainable_layers} layers "
          f"trained), image {cfg.model.image_encoder.name} (frozen={cfg.model.image_encoder.freeze})")
    print(f"settings: bucket_by_length={cfg.data.bucket_by_length}, attention={cfg.model.attention}, "
          f"AdamW={cfg.optim.implementation}, precision={cfg.run.precision}")
    print(f"cached features: {', '.join(model.cache_spec()) or 'none (nothing frozen)'}")

    paths = {"none": (model, build_optimizer(model, cfg.optim), proc)}
    builds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            m = build_model(cfg.model, TaskInfo(bundle.task, bundle.label_names), proc)
            m.load_state_dict(init)
            t0 = time.perf_counter()
            store = open_or_build(tmp, m, proc, samples, sources=bundle.sources, batch_size=64, dtype=dtype)
            size = sum(f.stat().st_size for f in store.directory.iterdir()) / 2**20
            builds[dtype] = (time.perf_counter() - t0, size)
            print(f"{dtype} cache build (once): {builds[dtype][0]:.1f} s, {size:.0f} MB on disk", flush=True)
            paths[dtype] = (m, build_optimizer(m, cfg.optim), CachedCollator(proc, store, m.cache_replaces()))
        amp = autocast_dtype(cfg.run.precision, torch.device("cpu"))
        epochs = run_epochs(paths, batches, cfg.optim.grad_clip, amp)
    t_plain, loss_plain = epochs["none"]
    rows = [(dtype, *builds[dtype], *epochs[dtype]) for dtype in args.dtypes]
    print(f"epoch without cache: {t_plain:.1f} s, mean loss {loss_plain:.6f}")
    for dtype, _, _, t_cached, loss_cached in rows:
        print(f"epoch with the {dtype} cache: {t_cached:.1f} s, mean loss {loss_cached:.6f}")
    print("\n| cache entry | epoch without cache | epoch with cache | speed-up | build (once) | size | "
          "loss difference |")
    print("|---|---|---|---|---|---|---|")
    for dtype, t_build, size, t_cached, loss_cached in rows:
        diff = abs(loss_plain - loss_cached)
        print(f"| {dtype} | {t_plain:.1f} s | {t_cached:.1f} s | **{t_plain / t_cached:.1f}×** | {t_build:.1f} s | "
              f"{size:.0f} MB | {diff:.1e} (relative {diff / abs(loss_plain):.1e}) |")
    t_build, t_cached = rows[0][1], rows[0][3]
    print(f"\nthe build pays for itself after {t_build / max(1e-9, t_plain - t_cached):.1f} epochs")


if __name__ == "__main__":
    main()
