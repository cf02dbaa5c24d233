"""Frozen-feature cache: one training epoch of INFIG-lite with and without the cache, on real CM-Off-Meme data.

Both runs start from the same weights with the same seed and batch order, so their losses must agree to float
tolerance (the cache only changes *where* the frozen outputs come from). The cache build (once per split, reused
by later epochs, seeds and ablations) is timed separately.

    python benchmarks/cache.py                             # 1,000 samples, configs/lite/cm-memes.yaml
    python benchmarks/cache.py --samples 256 --set model.text_encoder.trainable_layers=1
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


def run_epoch(model, opt, batches_fn, n_batches: int) -> tuple[float, float]:
    """Seconds for one epoch (data loading included) and the mean loss."""
    import torch

    from mmsenti.losses import total_loss

    torch.manual_seed(0)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for i in range(n_batches):
        batch = batches_fn(i)
        loss = total_loss(model.compute_loss(model(batch), batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return time.perf_counter() - t0, sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/lite/cm-memes.yaml"))
    p.add_argument("--root", default=str(ROOT.parent / "shared/data/cm_memes"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="config override a.b=v")
    args = p.parse_args()

    import torch

    from mmsenti.cache import CachedCollator, open_or_build
    from mmsenti.config import load_config
    from mmsenti.models.base import TaskInfo, build_model
    from mmsenti.models.encoders import build_processor
    from mmsenti.registry import DATASETS
    from mmsenti.train.optim import build_optimizer

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
    n = -(-len(samples) // args.batch)

    def chunk(i):
        return samples[i * args.batch:(i + 1) * args.batch]

    print(f"INFIG-lite on {len(samples)} {cfg.data.name} samples, batch {args.batch}, {torch.get_num_threads()} "
          f"threads; text {cfg.model.text_encoder.name} (top {cfg.model.text_encoder.trainable_layers} layers "
          f"trained), image {cfg.model.image_encoder.name} (frozen={cfg.model.image_encoder.freeze})")
    print(f"cached features: {', '.join(model.cache_spec()) or 'none (nothing frozen)'}")

    opt = build_optimizer(model, cfg.optim)
    t_plain, loss_plain = run_epoch(model, opt, lambda i: proc(chunk(i)), n)
    print(f"epoch without cache: {t_plain:7.1f} s   mean loss {loss_plain:.6f}")

    model.load_state_dict(init)
    opt = build_optimizer(model, cfg.optim)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = open_or_build(tmp, model, proc, samples, sources=bundle.sources, batch_size=64)
        t_build = time.perf_counter() - t0
        collate = CachedCollator(proc, store, model.cache_replaces())
        size = sum(f.stat().st_size for f in store.directory.iterdir()) / 2**20
        print(f"cache build (once):  {t_build:7.1f} s   {size:.0f} MB on disk")
        t_cached, loss_cached = run_epoch(model, opt, lambda i: collate(chunk(i)), n)
    print(f"epoch with cache:    {t_cached:7.1f} s   mean loss {loss_cached:.6f}")
    print(f"speed-up: {t_plain / t_cached:.1f}x per epoch; |loss difference| {abs(loss_plain - loss_cached):.2e} "
          f"(relative {abs(loss_plain - loss_cached) / abs(loss_plain):.1e})")
    epochs_even = t_build / max(1e-9, t_plain - t_cached)
    print(f"the build pays for itself after {epochs_even:.1f} epochs")


if __name__ == "__main__":
    main()
