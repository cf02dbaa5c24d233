"""Time INFIG's fine-grained (HFAM) loss: the vectorised implementation against naive Python loops.

    PYTHONPATH=src python benchmarks/fine_grained.py                  # B=32, N_i=49, N_t=40, D=256, 3 layers
    PYTHONPATH=src python benchmarks/fine_grained.py --naive token    # the per-token loop (much slower)
    PYTHONPATH=src python benchmarks/fine_grained.py --device cuda --batch 128 --chunk-size 32

Both sides compute L_f forward + backward (``--no-backward``: forward only) on the same random inputs, with texts
padded to random lengths, and the script checks that they agree before printing times. The naive baselines:

* ``pair``: a Python loop over every (image, text) pair, each pair's similarity matrix and top-j vectorised;
* ``token``: additionally a loop over every visual and every text token (the formula as written).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmsenti.models.infig.alignment import FineGrainedAlignmentLoss


def naive_loss(img_layers, txt_layers, mask, top_j: int, tau: float, per_token: bool) -> torch.Tensor:
    batch = mask.shape[0]
    targets = torch.arange(batch, device=mask.device)
    losses = []
    for img, txt in zip(img_layers, txt_layers, strict=True):
        p2q_rows, q2p_rows = [], []
        for a in range(batch):
            v = F.normalize(img[a], dim=-1)
            p2q_row, q2p_row = [], []
            for b in range(batch):
                w = F.normalize(txt[b][mask[b]], dim=-1)
                sim = v @ w.T  # (n_i, n_t)
                j_t, j_i = min(top_j, sim.shape[1]), min(top_j, sim.shape[0])
                if per_token:
                    p2q = sum(sim[k].topk(j_t).values.sum() for k in range(sim.shape[0]))
                    q2p = sum(sim[:, t].topk(j_i).values.sum() for t in range(sim.shape[1]))
                else:
                    p2q = sim.topk(j_t, dim=1).values.sum()
                    q2p = sim.topk(j_i, dim=0).values.sum()
                p2q_row.append(p2q / (j_t * sim.shape[0]))
                q2p_row.append(q2p / (j_i * sim.shape[1]))
            p2q_rows.append(torch.stack(p2q_row))
            q2p_rows.append(torch.stack(q2p_row))
        s_p2q, s_q2p = torch.stack(p2q_rows), torch.stack(q2p_rows)
        losses.append(0.5 * (F.cross_entropy(s_p2q / tau, targets) + F.cross_entropy(s_q2p.T / tau, targets)))
    return torch.stack(losses).mean()


def make_inputs(args, device: torch.device, requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    img = [torch.randn(args.batch, args.n_img, args.dim, generator=g) for _ in range(args.layers)]
    txt = [torch.randn(args.batch, args.n_txt, args.dim, generator=g) for _ in range(args.layers)]
    lengths = torch.randint(1, args.n_txt + 1, (args.batch,), generator=g)
    mask = torch.arange(args.n_txt)[None, :] < lengths[:, None]
    img = [x.to(device).requires_grad_(requires_grad) for x in img]
    txt = [x.to(device).requires_grad_(requires_grad) for x in txt]
    return img, txt, mask.to(device)


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device, backward: bool) -> tuple[list[float], float]:
    def step() -> float:
        loss = fn()
        if backward:
            loss.backward()
        return float(loss.detach())

    value = step()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-img", type=int, default=49, help="visual tokens per image (7x7 map)")
    p.add_argument("--n-txt", type=int, default=40, help="padded text length")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=3, help="HFAM layers (the paper's M)")
    p.add_argument("--top-j", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--naive", choices=["pair", "token"], default="pair")
    p.add_argument("--repeats", type=int, default=20, help="timed runs of the vectorised loss")
    p.add_argument("--naive-repeats", type=int, default=3, help="timed runs of the naive loop")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backward = not args.no_backward
    tau = 0.07
    img, txt, mask = make_inputs(args, device, backward)
    loss_fn = FineGrainedAlignmentLoss(top_j=args.top_j, chunk_size=args.chunk_size)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fast_times, fast_value = timed(lambda: loss_fn(img, txt, mask, tau)["loss_f"], args.repeats, device, backward)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    slow_times, slow_value = timed(lambda: naive_loss(img, txt, mask, args.top_j, tau, args.naive == "token"),
                                   args.naive_repeats, device, backward)
    if abs(fast_value - slow_value) > 1e-4 * max(1.0, abs(slow_value)):
        raise SystemExit(f"implementations disagree: vectorised {fast_value:.6f} vs naive {slow_value:.6f}")

    # The minimum is the least noisy estimate on a shared machine (as timeit advises); the median is shown too.
    fast, slow = min(fast_times), min(slow_times)
    what = "forward+backward" if backward else "forward"
    print(f"fine-grained loss ({what}), B={args.batch} N_i={args.n_img} N_t={args.n_txt} D={args.dim} "
          f"layers={args.layers} j={args.top_j} chunk={args.chunk_size} device={device} "
          f"threads={torch.get_num_threads()}")
    print(f"  L_f = {fast_value:.6f} (naive {slow_value:.6f})")
    print(f"  vectorised        : {fast * 1e3:9.2f} ms (min of {args.repeats}; median "
          f"{statistics.median(fast_times) * 1e3:.2f})" + (f", peak GPU memory {peak:.1f} MiB" if peak is not None else ""))
    print(f"  naive {args.naive + '-loop':<12}: {slow * 1e3:9.2f} ms (min of {args.naive_repeats}; median "
          f"{statistics.median(slow_times) * 1e3:.2f})")
    print(f"  speed-up          : {slow / fast:9.1f}x (min/min)")


if __name__ == "__main__":
    main()
