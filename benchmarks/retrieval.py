"""Time top-k retrieval from a memory bank: FAISS exact, FAISS approximate (IVF, HNSW) and torch brute force.

    PYTHONPATH=src python benchmarks/retrieval.py                          # banks of 10k, 100k, 1M; d=128, k=10
    PYTHONPATH=src python benchmarks/retrieval.py --sizes 10000 100000     # shorter
    PYTHONPATH=src python benchmarks/retrieval.py --device cuda            # the torch index on a GPU

Bank and queries are random unit vectors (``--data clustered``: around 1,000 centres, closer to learned
embeddings). Each index is an ``mmsenti.retrieval`` index (cosine metric), so the times include what the memory
bank pays on top of the raw library call (query normalisation, the tie rule, tensor conversion). Query time is
the median over ``--batches`` batches of ``--batch`` queries; recall@k of the approximate indexes is measured
against the exact top-k over ``--recall-queries`` queries. Uniformly random vectors in 128 dimensions have no
structure for an approximate index to exploit, so their recall is a worst case.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmsenti.retrieval.index import VectorIndex, build_index, faiss_available


def make_vectors(n: int, dim: int, data: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if data == "clustered":
        centres = torch.randn(1000, dim, generator=torch.Generator().manual_seed(12345))
        x = centres[torch.randint(0, 1000, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    else:
        x = torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=1)


def time_queries(search: Callable[[torch.Tensor], object], queries: torch.Tensor, batch: int, n_batches: int,
                 sync: Callable[[], None]) -> float:
    """Median seconds per batch (after one warm-up batch)."""
    search(queries[:batch])
    sync()
    times = []
    for i in range(n_batches):
        q = queries[i * batch:(i + 1) * batch]
        t0 = time.perf_counter()
        search(q)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    k = exact.shape[1]
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


def bench_index(name: str, build: Callable[[], VectorIndex], tunings: list[tuple[str, Callable[[VectorIndex], None]]],
                bank: torch.Tensor, queries: torch.Tensor, recall_queries: torch.Tensor,
                exact_rows: torch.Tensor | None, args: argparse.Namespace, sync: Callable[[], None]) -> torch.Tensor:
    """Build one index, print a table row per search setting; returns the recall reference (its rows if none)."""
    t0 = time.perf_counter()
    index = build()
    index.add(bank)
    sync()
    build_s = time.perf_counter() - t0
    for label, tune in tunings:
        tune(index)
        ms = 1000 * time_queries(lambda q: index.search(q, args.k), queries, args.batch, args.batches, sync)
        rows = torch.cat([index.search(recall_queries[i:i + 256], args.k)[1].cpu()
                          for i in range(0, len(recall_queries), 256)])
        if exact_rows is None:
            exact_rows = rows
        rec = recall_at_k(rows, exact_rows)
        build = f"{build_s:.2f}" if label == tunings[0][0] else "(same)"
        print(f"| {len(bank):,} | {name}{label} | {build} | {ms:.2f} | {rec:.3f} |", flush=True)
    return exact_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per index")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--indexes", nargs="+", choices=["flat", "torch", "ivf", "hnsw"],
                   default=["flat", "torch", "ivf", "hnsw"],
                   help="indexes to time; the first exact one is the recall reference")
    p.add_argument("--nlist-factor", type=float, default=1.0, help="IVF lists = factor * sqrt(N)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[64, 256])
    p.add_argument("--hnsw-max-size", type=int, default=100_000,
                   help="skip HNSW above this bank size (its build is slow on few cores)")
    p.add_argument("--device", default="cpu", help="device of the torch index")
    p.add_argument("--threads", type=int, default=0, help="torch/FAISS threads (0: library default)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    has_faiss = faiss_available()
    if has_faiss and args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    want = set(args.indexes)
    if not has_faiss:
        want = {"torch"}
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"d={args.dim} k={args.k} batch={args.batch} data={args.data} torch threads={torch.get_num_threads()} "
          f"faiss={'yes' if has_faiss else 'no'} torch device={device}")
    print(f"| bank | index | build s | query ms / batch of {args.batch} | recall@{args.k} |")
    print("|---|---|---|---|---|")

    none: list[tuple[str, Callable[[VectorIndex], None]]] = [("", lambda ix: None)]
    for n in args.sizes:
        bank = make_vectors(n, args.dim, args.data, seed=0)
        queries = make_vectors(max(args.batch * (args.batches + 1), args.recall_queries), args.dim, args.data, 1)
        common = (bank, queries, queries[:args.recall_queries])
        ref = None  # exact top-k from the first exact index timed
        if "flat" in want:
            ref = bench_index("FAISS flat (exact)", lambda: build_index("flat", args.dim), none, *common, ref,
                              args, sync)
        if "torch" in want:
            ref = bench_index(f"torch brute force ({device.type})",
                              lambda: build_index("torch", args.dim, device=device), none, *common, ref, args, sync)
        if "ivf" in want:
            nlist = max(1, min(int(args.nlist_factor * math.sqrt(n)), n // 39))
            ref = bench_index(f"FAISS IVF-Flat nlist={nlist}", lambda nl=nlist: build_index("ivf", args.dim, nlist=nl),
                              [(f", nprobe={p}", lambda ix, p=p: setattr(ix, "nprobe", p)) for p in args.nprobe],
                              *common, ref, args, sync)
        if "hnsw" in want:
            if n <= args.hnsw_max_size:
                ref = bench_index(f"FAISS HNSW M={args.hnsw_m}", lambda: build_index("hnsw", args.dim, M=args.hnsw_m),
                                  [(f", efSearch={e}", lambda ix, e=e: setattr(ix, "ef_search", e))
                                   for e in args.hnsw_ef], *common, ref, args, sync)
            else:
                print(f"| {n:,} | FAISS HNSW | skipped (> --hnsw-max-size) | | |", flush=True)
        del bank, queries, common
        gc.collect()


if __name__ == "__main__":
    main()
