"""Time top-k retrieval from a memory bank: FAISS exact, FAISS approximate (IVF, HNSW), torch brute force, and what
``index: auto`` chooses.

    PYTHONPATH=src python benchmarks/retrieval.py                  # banks of 10k and 100k: random, clustered, real
    PYTHONPATH=src python benchmarks/retrieval.py --size 1000000 --data real   # the 1M x 128 real-embedding bank
    PYTHONPATH=src python benchmarks/retrieval.py --device cuda           # the torch index on a GPU

Banks (d=128, cosine): random unit vectors (no structure: a worst case for approximate indexes); ``clustered``
(around 1,000 centres); ``real``: MiniLM-L6 sentence embeddings (mean-pooled, L2-normalised, as
sentence-transformers' all-MiniLM-L6-v2) of the MOSEI and MVSA texts in ../shared/data, reduced to d by PCA and,
for banks larger than the texts, replicated with Gaussian noise whose norm is the median distance from a text to
its nearest other text, so copies mix with real neighbours instead of forming tight clusters. Its queries are held-out
texts. The embeddings are computed once and kept in ``--embedding-cache``.

Each index is an ``mmsenti.retrieval`` index, so the times include what the memory bank pays on top of the raw
library call (query normalisation, the tie rule, tensor conversion). Query time is the median over ``--batches``
batches of ``--batch`` queries; recall@k is measured against the exact top-k over ``--recall-queries`` queries;
speed-up is against the faster exact index of the same bank.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mmsenti.retrieval.index import VectorIndex, build_index, faiss_available  # noqa: E402


def minilm_embeddings(texts: list[str], batch: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings (batches of similar length)."""
    import mmsenti  # noqa: F401  (compat shims before transformers)
    from mmsenti.backbones import load_text_backbone, load_tokenizer

    model, _ = load_text_backbone("minilm-l6", True)
    tok = load_tokenizer("minilm-l6", True)
    model.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            idx = order[i:i + batch]
            enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
            if (i // batch) % 50 == 0:
                print(f"  embedding texts: {i + len(idx):,}/{len(texts):,}", file=sys.stderr, flush=True)
    return out


def real_texts(root: Path, sources: list[str]) -> list[str]:
    texts: list[str] = []
    for name in sources:
        if name == "mosei":
            with open(root / "mosei" / "label.csv", newline="") as f:
                texts += [r["text"] for r in csv.DictReader(f)]
        else:  # mvsa_single, mvsa_multiple
            for split in ("train", "dev", "test"):
                texts += [r["text"] for r in json.loads((root / name / f"{split}.json").read_text())]
    seen: set[str] = set()
    return [t for t in texts if t and not (t in seen or seen.add(t))]  # distinct texts, in file order


def real_base(args: argparse.Namespace) -> np.ndarray:
    """The real texts' embeddings (cached on disk), one row per distinct text."""
    texts = real_texts(Path(args.data_root), args.real_sources)
    key = hashlib.blake2b("\x00".join(texts).encode(), digest_size=8).hexdigest()
    path = Path(args.embedding_cache).expanduser() / f"minilm-l6-{key}.npy"
    if path.is_file():
        return np.load(path)
    print(f"embedding {len(texts):,} texts of {', '.join(args.real_sources)} with MiniLM-L6 (once; kept in {path})",
          file=sys.stderr, flush=True)
    emb = minilm_embeddings(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def real_bank(base: np.ndarray, n: int, n_queries: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(bank of n, held-out queries): PCA to ``dim``, replicated with noise up to ``n`` rows."""
    g = np.random.default_rng(seed)
    x = torch.from_numpy(base[g.permutation(len(base))])
    queries, pool = x[:n_queries], x[n_queries:]
    mean = pool.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(pool - mean, full_matrices=False)
    project = lambda t: F.normalize((t - mean) @ v[:dim].T, dim=1)  # noqa: E731
    pool, queries = project(pool), project(queries)
    sample = pool[: min(len(pool), 5000)]
    sims = sample @ pool.T
    sims[torch.arange(len(sample)), torch.arange(len(sample))] = -2.0
    nn_dist = (2 - 2 * sims.max(1).values).clamp_min(0).sqrt().median()  # to the nearest other text
    reps = -(-n // len(pool))
    gt = torch.Generator().manual_seed(seed)
    copies = [pool] + [pool + nn_dist / math.sqrt(dim) * torch.randn(pool.shape, generator=gt) for _ in range(reps - 1)]
    bank = torch.cat(copies)[:n]
    return F.normalize(bank, dim=1), queries


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
                bank: torch.Tensor, queries: torch.Tensor, recall_queries: torch.Tensor, ref: dict,
                args: argparse.Namespace, sync: Callable[[], None], exact: bool = False) -> None:
    """Build one index, print a table row per search setting. ``ref`` holds the exact top-k rows (set by the first
    exact index) and the best exact query time (for the speed-up column)."""
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
        if ref.get("rows") is None:
            ref["rows"] = rows
        if exact:
            ref["ms"] = min(ref.get("ms", math.inf), ms)
        rec = recall_at_k(rows, ref["rows"])
        speed = f"{ref['ms'] / ms:.1f}x" if "ms" in ref else "–"
        build_txt = f"{build_s:.2f}" if label == tunings[0][0] else "(same)"
        print(f"| {args.data_now} | {len(bank):,} | {name}{label} | {build_txt} | {ms:.2f} | {speed} | {rec:.3f} |",
              flush=True)
    if getattr(index, "choice", None):
        c = index.choice
        print(f"| {args.data_now} | {len(bank):,} | ↳ auto chose **{c['chosen']}**: {c['reason']} | | | | |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", "--size", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=10, help="timed batches per index")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--data", nargs="+", choices=["random", "clustered", "real"],
                   default=["random", "clustered", "real"])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--real-sources", nargs="+", default=["mosei", "mvsa_single", "mvsa_multiple"],
                   choices=["mosei", "mvsa_single", "mvsa_multiple"], help="texts of the real-embedding bank")
    p.add_argument("--embedding-cache", default="~/.cache/mmsenti/benchmarks")
    p.add_argument("--indexes", nargs="+", choices=["flat", "torch", "ivf", "hnsw", "auto"],
                   default=["flat", "torch", "ivf", "hnsw", "auto"],
                   help="indexes to time; the first exact one is the recall reference")
    p.add_argument("--nlist-factor", type=float, default=1.0, help="IVF lists = factor * sqrt(N)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[64, 128, 256])
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
    data_kinds = list(args.data)
    if "real" in data_kinds and not Path(args.data_root).is_dir():
        print(f"(no real-embedding bank: {args.data_root} not found)")
        data_kinds.remove("real")
    print(f"d={args.dim} k={args.k} batch={args.batch} torch threads={torch.get_num_threads()} "
          f"faiss={'yes' if has_faiss else 'no'} torch device={device}")
    print(f"| data | bank | index | build s | query ms / batch of {args.batch} | speed-up vs exact | recall@{args.k} |")
    print("|---|---|---|---|---|---|---|")

    none: list[tuple[str, Callable[[VectorIndex], None]]] = [("", lambda ix: None)]
    base = real_base(args) if "real" in data_kinds else None
    for data in data_kinds:
        args.data_now = data
        for n in args.sizes:
            n_q = max(args.batch * (args.batches + 1), args.recall_queries)
            if data == "real":
                bank, queries = real_bank(base, n, n_q, args.dim)
            else:
                bank = make_vectors(n, args.dim, data, seed=0)
                queries = make_vectors(n_q, args.dim, data, 1)
            common = (bank, queries, queries[:args.recall_queries])
            ref: dict = {}  # exact top-k rows and the best exact query time
            if "flat" in want:
                bench_index("FAISS flat (exact)", lambda: build_index("flat", args.dim), none, *common, ref, args,
                            sync, exact=True)
            if "torch" in want:
                bench_index(f"torch brute force ({device.type})", lambda: build_index("torch", args.dim, device=device),
                            none, *common, ref, args, sync, exact=True)
            if "ivf" in want:
                nlist = max(1, min(int(args.nlist_factor * math.sqrt(n)), n // 39))
                bench_index(f"FAISS IVF-Flat nlist={nlist}", lambda nl=nlist: build_index("ivf", args.dim, nlist=nl),
                            [(f", nprobe={p}", lambda ix, p=p: setattr(ix, "nprobe", p)) for p in args.nprobe],
                            *common, ref, args, sync)
            if "hnsw" in want:
                if n <= args.hnsw_max_size:
                    bench_index(f"FAISS HNSW M={args.hnsw_m}", lambda: build_index("hnsw", args.dim, M=args.hnsw_m),
                                [(f", efSearch={e}", lambda ix, e=e: setattr(ix, "ef_search", e))
                                 for e in args.hnsw_ef], *common, ref, args, sync)
                else:
                    print(f"| {data} | {n:,} | FAISS HNSW | skipped (> --hnsw-max-size) | | | |", flush=True)
            if "auto" in want and device.type == "cpu":
                bench_index("auto (mmsenti's choice, timing included in build)", lambda: build_index("auto", args.dim),
                            none, *common, ref, args, sync)
            del bank, queries, common
            gc.collect()


if __name__ == "__main__":
    main()
