"""Vector indexes for the retrieval memory bank: an exact torch search and FAISS (exact, IVF, HNSW).

Every index scores by inner product; ``metric="cosine"`` L2-normalises the vectors it stores and the queries it
is given, so cosine search is inner-product search on unit vectors. ``search`` returns ``(scores, indices)`` of
shape ``(B, k)``, best first; slots beyond the bank's size are padded with index ``-1`` and score ``-inf``.

``exclude[i]`` names one bank row that query ``i`` must never get back (the sample itself while training on the
bank of the training set; ``-1`` for none). It is applied by over-fetching ``k + 1`` and dropping that row, which
stays correct when the bank holds duplicates: only the named row is dropped, an identical copy of it is not.

FAISS is optional and imported lazily. ``build_index("auto", ...)`` decides by measurement when it is first
filled (:class:`AutoIndex`): the faster exact index on this machine for this bank (FAISS flat or torch, which
return the same neighbours up to ties in float rounding), or an approximate IVF index when the bank is large
enough for it to pay and its recall@k on the bank's own embeddings reaches ``min_recall``. Without FAISS it is
:class:`TorchIndex`.

An index serialises to a flat dict of tensors plus a JSON-able dict of metadata (:meth:`VectorIndex.state`), so
it can live inside a safetensors file next to a model's weights (:func:`save_index` / :func:`load_index`).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

Metric = Literal["ip", "cosine"]
IndexKind = Literal["auto", "torch", "flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = ("auto", "torch", "flat", "ivf", "hnsw")
_META_KEY = "mmsenti_index"


class RetrievalError(ValueError):
    """Bad index or memory-bank arguments, or an unreadable saved index."""


def _import_faiss() -> ModuleType | None:
    """FAISS, or None when it is not installed (a ``sys.modules["faiss"] = None`` patch counts as absent)."""
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def faiss_available() -> bool:
    return _import_faiss() is not None


def _require_faiss() -> ModuleType:
    faiss = _import_faiss()
    if faiss is None:
        raise ImportError("this index kind needs FAISS: pip install 'mmsenti[faiss]' (or faiss-cpu / faiss-gpu)")
    return faiss


@runtime_checkable
class VectorIndex(Protocol):
    """What the memory bank needs from an index."""

    dim: int
    metric: Metric

    def add(self, vectors: torch.Tensor) -> None:
        """Append ``(N, dim)`` vectors; they get the next ``N`` row numbers."""

    def search(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` by score: ``(scores (B, k) float32, indices (B, k) int64)``, on the queries' device."""

    def reset(self) -> None:
        """Drop every vector (and, for IVF, the trained coarse quantiser)."""

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(metadata, tensors)`` from which :func:`index_from_state` rebuilds an identical index."""

    def __len__(self) -> int: ...


# --------------------------------------------------------------------------------------------------- helpers


def _as_matrix(x: torch.Tensor | np.ndarray, dim: int, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise RetrievalError(f"{what} must have shape (N, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise RetrievalError(f"{what} must be floating point, got {x.dtype}")
    return x.detach().float()


def _check_exclude(exclude: torch.Tensor | None, n_queries: int) -> torch.Tensor | None:
    """Exclusion rows as a (B,) int64 CPU tensor, or None when nothing is excluded."""
    if exclude is None:
        return None
    exclude = torch.as_tensor(exclude).detach().to("cpu", torch.long).reshape(-1)
    if exclude.numel() != n_queries:
        raise RetrievalError(f"exclude must hold one row per query ({n_queries}), got {exclude.numel()}")
    return exclude if bool((exclude >= 0).any()) else None


def _drop_excluded(
    scores: torch.Tensor, indices: torch.Tensor, exclude: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``k + 1`` ranked results per row, drop the excluded row (if it is there) else the last one."""
    if exclude is None:
        return scores[:, :k], indices[:, :k]
    exclude = exclude.to(indices.device)
    hit = (indices == exclude[:, None]) & (exclude[:, None] >= 0)
    # A stable sort on the 0/1 flag moves the (at most one) hit to the end and keeps the ranking of the rest.
    order = torch.sort(hit.to(torch.uint8), dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def _pad(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape[1] >= k:
        return scores, indices
    b, missing = scores.shape[0], k - scores.shape[1]
    scores = torch.cat([scores, scores.new_full((b, missing), -math.inf)], 1)
    indices = torch.cat([indices, indices.new_full((b, missing), -1)], 1)
    return scores, indices


def _rank(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of a small candidate set, by score then lower index (two stable sorts: a lexicographic sort)."""
    by_index = torch.sort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index.indices), by_index.values
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk`` over the columns of ``scores`` (B, n) where ties at the cut-off go to the lower column.

    ``torch.topk`` makes no promise about which of several equal scores it keeps; a full stable sort would, but
    costs far more than topk on a large bank. So: topk of ``k + 1``; only when some row's k-th and (k+1)-th
    scores are equal (a tie straddles the cut-off) is that selection rebuilt with the lowest-numbered tied columns.
    """
    n = scores.shape[1]
    vals, cols = torch.topk(scores, min(k + 1, n), dim=1)
    if n > k and bool((vals[:, k] == vals[:, k - 1]).any()):
        kth = vals[:, k - 1:k]
        greater = scores > kth
        tied = scores == kth
        slots = k - greater.sum(1, keepdim=True)
        chosen = greater | (tied & (tied.cumsum(1) <= slots))
        cols = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # exactly k per row, in ascending column order
        vals = scores.gather(1, cols)
    return _rank(vals[:, :k], cols[:, :k], k)


class _SavedIndex:
    """``save``/``load`` of one concrete index class, through :func:`save_index` / :func:`load_index`."""

    def save(self, path: str | Path) -> None:
        save_index(self, path)

    @classmethod
    def load(cls, path: str | Path):
        index = load_index(path)
        if not isinstance(index, cls):
            raise RetrievalError(f"{path} holds a '{index.kind}' index, not a {cls.__name__}")
        return index


# --------------------------------------------------------------------------------------------------- torch


class TorchIndex(_SavedIndex):
    """Exact inner-product search with torch matmuls, chunked over the bank.

    Memory stays at ``B x chunk_size`` scores whatever the bank size. Equal scores are broken by the lower row
    number, so results are deterministic. (BLAS may round the scores of two identical bank vectors a unit in
    the last place apart when they fall at different offsets of a chunk; such near-ties follow the scores.)

    Args:
        dim: vector width.
        metric: ``"ip"`` or ``"cosine"`` (vectors and queries are L2-normalised).
        device: where the bank lives and the search runs (``None``: CPU).
        chunk_size: bank rows scored per step.
    """

    kind = "torch"

    def __init__(self, dim: int, metric: Metric = "cosine", device: str | torch.device | None = None,
                 chunk_size: int = 65536):
        if metric not in ("ip", "cosine"):
            raise RetrievalError(f"unknown metric '{metric}' (known: ip, cosine)")
        if chunk_size < 1:
            raise RetrievalError("chunk_size must be >= 1")
        self.dim, self.metric, self.chunk_size = int(dim), metric, int(chunk_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._parts: list[torch.Tensor] = []
        self._data: torch.Tensor | None = None

    @property
    def vectors(self) -> torch.Tensor:
        """The stored (normalised, for cosine) vectors as one ``(N, dim)`` tensor."""
        if self._data is None:
            self._data = torch.cat(self._parts) if self._parts else torch.empty(0, self.dim, device=self.device)
            self._parts = [self._data]
        return self._data

    def __len__(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    def reset(self) -> None:
        self._parts, self._data = [], None

    def add(self, vectors: torch.Tensor) -> None:
        v = _as_matrix(vectors, self.dim, "vectors").to(self.device)
        if self.metric == "cosine":
            v = F.normalize(v, dim=1)
        self._parts.append(v.contiguous())
        self._data = None

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = _as_matrix(queries, self.dim, "queries")
        out_device = q.device
        q = q.to(self.device)
        if self.metric == "cosine":
            q = F.normalize(q, dim=1)
        exclude = _check_exclude(exclude, q.shape[0])
        if k < 1:
            raise RetrievalError("k must be >= 1")
        fetch = k + (exclude is not None)
        bank = self.vectors
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=self.device)
        for start in range(0, bank.shape[0], self.chunk_size):
            s = q @ bank[start:start + self.chunk_size].T
            cs, ci = _topk_lowest_index(s, min(fetch, s.shape[1]))
            best_s, best_i = _rank(torch.cat([best_s, cs], 1), torch.cat([best_i, ci + start], 1), fetch)
        scores, indices = _pad(best_s, best_i, fetch)
        scores, indices = _drop_excluded(scores, indices, exclude, k)
        return scores.to(out_device), indices.to(out_device)

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"kind": self.kind, "dim": self.dim, "metric": self.metric, "chunk_size": self.chunk_size}
        return meta, {"vectors": self.vectors.cpu().contiguous()}

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   device: str | torch.device | None = None) -> TorchIndex:
        index = cls(meta["dim"], meta["metric"], device=device, chunk_size=meta.get("chunk_size", 65536))
        vectors = tensors["vectors"].to(index.device)
        if len(vectors):
            index._parts, index._data = [vectors], vectors  # already normalised when saved: store as is
        return index


# --------------------------------------------------------------------------------------------------- FAISS


class FaissIndex(_SavedIndex):
    """A FAISS inner-product index: ``"flat"`` (exact), ``"ivf"`` (inverted lists) or ``"hnsw"`` (graph).

    Args:
        dim: vector width.
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        metric: ``"ip"`` or ``"cosine"`` (vectors and queries are L2-normalised).
        nlist: IVF lists; ``None`` picks ``4 * sqrt(N)`` (at most ``N / 39``, FAISS's points-per-centroid
            minimum) when the index is first filled. IVF trains its coarse quantiser on that first ``add``.
        nprobe: IVF lists visited per query (recall/speed trade-off).
        M: HNSW graph degree.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (raised to ``k + 1`` when smaller).

    Results are re-ordered by score then lower row number, so equal scores come back in a fixed order.
    """

    def __init__(self, dim: int, kind: str = "flat", metric: Metric = "cosine", *, nlist: int | None = None,
                 nprobe: int = 16, M: int = 32, ef_construction: int = 80, ef_search: int = 64):
        if kind not in ("flat", "ivf", "hnsw"):
            raise RetrievalError(f"unknown FAISS index kind '{kind}' (known: flat, ivf, hnsw)")
        if metric not in ("ip", "cosine"):
            raise RetrievalError(f"unknown metric '{metric}' (known: ip, cosine)")
        self._faiss = _require_faiss()
        self.dim, self.kind, self.metric = int(dim), kind, metric
        self.nlist, self.nprobe, self.M = nlist, int(nprobe), int(M)
        self.ef_construction, self.ef_search = int(ef_construction), int(ef_search)
        self.index: Any = None
        self.reset()

    def _new(self, n_train: int = 0) -> Any:
        faiss = self._faiss
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)

    def __len__(self) -> int:
        return int(self.index.ntotal) if self.index is not None else 0

    def reset(self) -> None:
        # IVF is built on the first add, once the data to train its quantiser is known.
        self.index = None if self.kind == "ivf" else self._new()

    def _prepare(self, x: torch.Tensor) -> np.ndarray:
        if self.metric == "cosine":
            x = F.normalize(x, dim=1)
        return np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)

    def add(self, vectors: torch.Tensor) -> None:
        v = self._prepare(_as_matrix(vectors, self.dim, "vectors"))
        if self.index is None:
            if len(v) == 0:
                return
            self.index = self._new(len(v))
            if self.index.nlist > len(v):
                raise RetrievalError(f"IVF with nlist={self.index.nlist} needs at least that many vectors to train")
            self.index.train(v)
            self.nlist = int(self.index.nlist)
        self.index.add(v)

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = _as_matrix(queries, self.dim, "queries")
        out_device = q.device
        exclude = _check_exclude(exclude, q.shape[0])
        if k < 1:
            raise RetrievalError("k must be >= 1")
        fetch = k + (exclude is not None)
        if len(self) == 0:
            scores, indices = _pad(torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.long), fetch)
        else:
            if self.kind == "ivf":
                self.index.nprobe = min(self.nprobe, self.index.nlist)
            elif self.kind == "hnsw":
                self.index.hnsw.efSearch = max(self.ef_search, fetch)
            d, i = (self._search_flat if self.kind == "flat" else self.index.search)(self._prepare(q), fetch)
            scores, indices = torch.from_numpy(d), torch.from_numpy(i).long()
            scores = scores.masked_fill(indices < 0, -math.inf)
            scores, indices = _rank(scores, indices.masked_fill(indices < 0, np.iinfo(np.int64).max), fetch)
            indices = indices.masked_fill(indices == np.iinfo(np.int64).max, -1)  # padding sorts last
        scores, indices = _drop_excluded(scores, indices, exclude, k)
        return scores.to(out_device), indices.to(out_device)

    def _search_flat(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact search, ties at the cut-off to the lower rows. FAISS keeps its own choice among equal scores;
        the torch index and an exported graph (ONNX TopK) keep the lower rows, and duplicate bank vectors (posts
        with the same tags) make such ties common. So one more is fetched, and a query whose last kept score equals
        the next one is searched again exactly (torch), ties to the lower row."""
        n = len(self)
        if fetch >= n:  # every row is returned (the rest padding): nothing is cut off
            return self.index.search(queries, fetch)
        d, i = self.index.search(queries, fetch + 1)
        tied = np.nonzero(d[:, fetch - 1] == d[:, fetch])[0]
        d, i = d[:, :fetch].copy(), i[:, :fetch].copy()
        if len(tied):
            vectors = torch.from_numpy(self.index.reconstruct_n(0, n))
            s, rows = _topk_lowest_index(torch.from_numpy(queries[tied]) @ vectors.T, fetch)
            d[tied], i[tied] = s.numpy(), rows.numpy()
        return d, i

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"kind": self.kind, "dim": self.dim, "metric": self.metric, "nlist": self.nlist,
                "nprobe": self.nprobe, "M": self.M, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search}
        if self.kind == "flat":
            # A flat index is just its vectors: store them plainly so a machine without FAISS can load it.
            vectors = self.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)
            return meta, {"vectors": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))}
        tensors = {}
        if self.index is not None:
            tensors["faiss"] = torch.from_numpy(self._faiss.serialize_index(self.index).copy())
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FaissIndex:
        params = {k: meta[k] for k in ("nlist", "nprobe", "M", "ef_construction", "ef_search") if k in meta}
        index = cls(meta["dim"], meta["kind"], meta["metric"], **params)
        if "vectors" in tensors and len(tensors["vectors"]):
            index.index.add(np.ascontiguousarray(tensors["vectors"].numpy(), dtype=np.float32))  # stored normalised
        if "faiss" in tensors:
            index.index = index._faiss.deserialize_index(np.ascontiguousarray(tensors["faiss"].numpy()))
        return index


# --------------------------------------------------------------------------------------------------- auto


def _search_ms(index: VectorIndex, queries: torch.Tensor, k: int, exclude: torch.Tensor, reps: int = 3) -> float:
    """Best of ``reps`` timed searches (after one untimed), in milliseconds."""
    import time

    index.search(queries, k, exclude=exclude)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        index.search(queries, k, exclude=exclude)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def _recall(rows: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a.tolist()) & set(e.tolist()) - {-1}) for a, e in zip(rows, exact, strict=True))
    return hits / max(1, int((exact >= 0).sum()))


def choose_index(vectors: torch.Tensor, dim: int, metric: Metric = "cosine", *,
                 device: str | torch.device | None = None, k: int = 10, num_queries: int = 128,
                 min_recall: float = 0.95, ann_min_size: int = 100_000, ann_min_speedup: float = 1.5,
                 chunk_size: int = 65536, nlist: int | None = None) -> tuple[VectorIndex, dict[str, Any]]:
    """The fastest suitable index for ``vectors``, filled with them, and a record of how it was chosen.

    A short timing on this machine: ``num_queries`` of the bank's own rows (each excluding itself, as a training
    query does) are searched for their top ``k`` in every exact candidate (torch; FAISS flat when installed and
    the bank is on the CPU) and the faster wins. From ``ann_min_size`` vectors an IVF index is also built; its
    ``nprobe`` is raised until recall@k against the exact top-k reaches ``min_recall``, and it is chosen only if
    it is then ``ann_min_speedup`` times faster than the best exact index.

    Returns:
        ``(index, record)``; the record (``chosen``, ``query_ms`` per candidate, ``recall`` of the approximate
        candidate, ``n``, ``reason``) is JSON-able and saved with the index.
    """
    n = len(vectors)
    on_cpu = device is None or torch.device(device).type == "cpu"
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(n, generator=g)[:num_queries]
    queries = vectors[rows].detach().float()
    k = max(1, min(k, n - 1))
    candidates: dict[str, VectorIndex] = {"torch": TorchIndex(dim, metric, device=device, chunk_size=chunk_size)}
    if faiss_available() and on_cpu:
        candidates["flat"] = FaissIndex(dim, "flat", metric)
    timings: dict[str, float] = {}
    for name, index in candidates.items():
        index.add(vectors)
        timings[name] = _search_ms(index, queries, k, rows)
    exact_name = min(timings, key=timings.__getitem__)
    chosen, record = candidates[exact_name], {"chosen": exact_name, "n": n, "k": k, "query_ms": dict(timings)}
    record["reason"] = f"fastest exact index for {n} vectors here"
    if faiss_available() and on_cpu and n >= ann_min_size:
        exact_rows = chosen.search(queries, k, exclude=rows)[1]
        # sqrt(N) lists (not FaissIndex's 4 sqrt(N)): k-means at every bank build must stay short; nprobe is tuned.
        ivf = FaissIndex(dim, "ivf", metric, nlist=nlist or max(1, min(int(math.sqrt(n)), n // 39)))
        ivf.add(vectors)
        nprobe, recall = 1, 0.0
        while True:
            ivf.nprobe = nprobe
            recall = _recall(ivf.search(queries, k, exclude=rows)[1], exact_rows)
            if recall >= min_recall or nprobe >= ivf.nlist:
                break
            nprobe = min(2 * nprobe, ivf.nlist)
        name = f"ivf(nlist={ivf.nlist},nprobe={nprobe})"
        timings[name] = _search_ms(ivf, queries, k, rows)
        record.update(query_ms=dict(timings), recall={name: recall})
        if recall >= min_recall and timings[name] * ann_min_speedup <= timings[exact_name]:
            chosen = ivf
            record.update(chosen="ivf", nlist=ivf.nlist, nprobe=nprobe,
                          reason=f"IVF reaches recall@{k} {recall:.3f} >= {min_recall} and is "
                                 f"{timings[exact_name] / timings[name]:.1f}x faster than exact {exact_name}")
        else:
            record["reason"] += (f"; IVF not chosen (recall@{k} {recall:.3f} at nprobe {nprobe}, "
                                 f"{timings[exact_name] / timings[name]:.1f}x the exact speed)")
    elif n < ann_min_size:
        record["reason"] += f"; below {ann_min_size} vectors no approximate index is tried"
    for index in candidates.values():
        if index is not chosen:
            index.reset()
    log.info("retrieval index auto: %s (%s; query ms %s)", record["chosen"], record["reason"],
             {k_: round(v, 2) for k_, v in timings.items()})
    return chosen, record


class AutoIndex(_SavedIndex):
    """``index: auto``: on its first ``add`` it measures which index serves these vectors fastest on this machine
    (:func:`choose_index`) and from then on is that index. ``choice`` records the decision; it is saved with the
    index (``state()``'s metadata, under ``"auto"``), and a saved auto index loads as the index it chose.

    Args:
        dim, metric, device: as for the other indexes.
        k: neighbours per query in the timing (the bank's users ask for about this many).
        min_recall: recall@k an approximate index must reach on the bank's own rows.
        ann_min_size: smallest bank for which an approximate index is tried.
        ann_min_speedup: how much faster than exact an approximate index must be to be chosen.
    """

    kind = "auto"

    def __init__(self, dim: int, metric: Metric = "cosine", device: str | torch.device | None = None, *,
                 k: int = 10, min_recall: float = 0.95, ann_min_size: int = 100_000, ann_min_speedup: float = 1.5,
                 chunk_size: int = 65536, nlist: int | None = None):
        if metric not in ("ip", "cosine"):
            raise RetrievalError(f"unknown metric '{metric}' (known: ip, cosine)")
        if not 0.0 < min_recall <= 1.0:
            raise RetrievalError(f"min_recall must be in (0, 1], got {min_recall}")
        self.dim, self.metric, self.device = int(dim), metric, device
        self.options = {"k": k, "min_recall": min_recall, "ann_min_size": ann_min_size,
                        "ann_min_speedup": ann_min_speedup, "chunk_size": chunk_size, "nlist": nlist}
        self.chosen: VectorIndex | None = None
        self.choice: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.chosen) if self.chosen is not None else 0

    def reset(self) -> None:
        self.chosen, self.choice = None, {}

    def add(self, vectors: torch.Tensor) -> None:
        v = _as_matrix(vectors, self.dim, "vectors")
        if self.chosen is not None:
            self.chosen.add(v)
        elif len(v):
            self.chosen, self.choice = choose_index(v, self.dim, self.metric, device=self.device, **self.options)

    def search(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.chosen if self.chosen is not None else TorchIndex(self.dim, self.metric, device=self.device)
        return index.search(queries, k, exclude=exclude)

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        index = self.chosen if self.chosen is not None else TorchIndex(self.dim, self.metric, device=self.device)
        meta, tensors = index.state()
        return {**meta, "auto": self.choice}, tensors


# --------------------------------------------------------------------------------------------------- factory, I/O


def build_index(kind: str = "auto", dim: int = 0, metric: Metric = "cosine", *,
                device: str | torch.device | None = None, **params: Any) -> VectorIndex:
    """An empty index.

    Args:
        kind: ``"auto"`` (:class:`AutoIndex`: chosen by a timing when first filled; :class:`TorchIndex` without
            FAISS or for a GPU bank), ``"torch"``, or a FAISS kind ``"flat"`` / ``"ivf"`` / ``"hnsw"`` (these
            raise ``ImportError`` without FAISS).
        dim: vector width.
        metric: ``"cosine"`` or ``"ip"``.
        device: torch index only: where the bank lives (a CUDA bank is searched on the GPU).
        **params: kind-specific options (``chunk_size``; ``nlist``, ``nprobe``; ``M``, ``ef_construction``,
            ``ef_search``).
    """
    if dim < 1:
        raise RetrievalError("dim must be >= 1")
    if kind not in INDEX_KINDS:
        raise RetrievalError(f"unknown index kind '{kind}' (known: {', '.join(INDEX_KINDS)})")
    auto_only = {"k", "min_recall", "ann_min_size", "ann_min_speedup"}
    if kind == "auto":
        if faiss_available() and (device is None or torch.device(device).type == "cpu"):
            _no_params(kind, {k: v for k, v in params.items() if k not in auto_only | {"chunk_size", "nlist"}})
            return AutoIndex(dim, metric, device=device, **{k: v for k, v in params.items() if k != "nprobe"})
        kind = "torch"
        log.debug("retrieval index: using the exact torch search (FAISS not installed or a GPU bank)")
        params = {k: v for k, v in params.items() if k not in auto_only | {"nlist", "nprobe"}}
    if kind == "torch":
        chunk = {"chunk_size": params.pop("chunk_size")} if "chunk_size" in params else {}
        _no_params(kind, params)
        return TorchIndex(dim, metric, device=device, **chunk)
    params.pop("chunk_size", None)  # accepted for "auto" configs that may land on either backend
    allowed = {"flat": set(), "ivf": {"nlist", "nprobe"}, "hnsw": {"M", "ef_construction", "ef_search"}}[kind]
    _no_params(kind, {k: v for k, v in params.items() if k not in allowed})
    return FaissIndex(dim, kind, metric, **params)


def _no_params(kind: str, params: dict[str, Any]) -> None:
    if params:
        raise RetrievalError(f"index kind '{kind}' takes no option(s) {', '.join(sorted(params))}")


def index_from_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     device: str | torch.device | None = None) -> VectorIndex:
    """Rebuild an index from :meth:`VectorIndex.state` output."""
    kind = meta.get("kind")
    if kind == "torch":
        return TorchIndex.from_state(meta, tensors, device=device)
    if kind == "flat" and not faiss_available():
        log.info("loading a FAISS flat index without FAISS: using the exact torch search (same neighbours)")
        return TorchIndex.from_state(meta, tensors, device=device)
    if kind in ("flat", "ivf", "hnsw"):
        return FaissIndex.from_state(meta, tensors)
    raise RetrievalError(f"unknown saved index kind {kind!r}")


def save_index(index: VectorIndex, path: str | Path) -> None:
    """One safetensors file: the index's tensors, its metadata as JSON in the header."""
    meta, tensors = index.state()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={_META_KEY: json.dumps(meta)})


def load_index(path: str | Path, device: str | torch.device | None = None) -> VectorIndex:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"no saved index at {path}")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if _META_KEY not in header:
        raise RetrievalError(f"{path} is not an mmsenti index (no '{_META_KEY}' metadata)")
    return index_from_state(json.loads(header[_META_KEY]), load_file(str(path)), device=device)
