"""The retrieval memory bank: the training set's retrieval embeddings, one vector index per modality.

A retrieval-augmented model looks up, for each sample and target modality, the top-k most similar *training*
samples by their embedding of the same modality (in-modality) or of another one (cross-modal: a text embedding
searched against the audio index finds samples whose audio resembles this text, which the cross-modal
contrastive loss makes meaningful). Besides the indexes the bank holds the per-sample *payload* the prompts are
built from (e.g. pooled features per modality, labels), aligned with the index rows, and the sample ids.

Life cycle::

    bank = MemoryBank(["text", "audio"], dim=128, index="auto")
    bank.refresh({"text": e_t, "audio": e_a}, payload={"text": f_t, "audio": f_a, "labels": y}, ids=ids)
    nb = bank.query(q_text, "audio", k=8, exclude_rows=bank.rows_for_ids(batch_ids))  # training: never itself
    nb.payload["labels"]  # (B, 8)

Refresh it from the current encoder once per epoch (or from a momentum encoder). It is saved with the model
(:meth:`MemoryBank.state_dict` is a flat dict of tensors, so it can sit in the model's safetensors file), which
makes inference independent of the batch a sample comes in and deterministic. Torch and FAISS-flat banks load
without FAISS (as exact torch indexes, same neighbours); IVF and HNSW banks need FAISS to load.

The authors' in-batch retrieval is the special case of a bank refreshed from the current batch and queried with
``exclude_rows=torch.arange(B)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmsenti.retrieval.index import Metric, RetrievalError, VectorIndex, build_index, index_from_state

BANK_FILE = "memory_bank.safetensors"
_FORMAT_VERSION = 1


@dataclass
class Neighbours:
    """Retrieved bank rows for a batch of queries.

    Attributes:
        scores: ``(B, k)`` similarities, best first (``-inf`` in padding slots).
        rows: ``(B, k)`` bank rows, ``-1`` in padding slots (only when the bank holds fewer than ``k`` rows).
        payload: each payload tensor of the bank gathered at ``rows``: ``(B, k, ...)`` (zeros in padding slots).
    """

    scores: torch.Tensor
    rows: torch.Tensor
    payload: dict[str, torch.Tensor]

    @property
    def mask(self) -> torch.Tensor:
        """``(B, k)`` True where a slot holds a real neighbour (for attention key-padding masks)."""
        return self.rows >= 0


class MemoryBank:
    """Per-modality vector indexes over one set of samples, with the payload of each sample.

    Args:
        modalities: the modalities the bank indexes (each gets its own index).
        dim: retrieval-embedding width (shared by all modalities).
        index: index kind for :func:`~mmsenti.retrieval.index.build_index` (``"auto"``, ``"torch"``,
            ``"flat"``, ``"ivf"``, ``"hnsw"``). ``"auto"`` times the candidates at each refresh and keeps the
            fastest suitable one (:attr:`index_choice` records the decision).
        metric: ``"cosine"`` (default) or ``"ip"``.
        device: where payload (and a torch index) live; payload is moved to the query's device on lookup.
        **index_params: passed to ``build_index`` (``nlist``, ``nprobe``, ``M``, ``ef_search``, ...).
    """

    def __init__(self, modalities: Sequence[str], dim: int, index: str = "auto", metric: Metric = "cosine",
                 device: str | torch.device | None = None, **index_params: Any):
        if not modalities:
            raise RetrievalError("a memory bank needs at least one modality")
        if len(set(modalities)) != len(modalities):
            raise RetrievalError(f"duplicate modalities: {list(modalities)}")
        self.modalities = tuple(modalities)
        self.dim, self.index_kind, self.metric = int(dim), index, metric
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.index_params = dict(index_params)
        build_index(index, self.dim, metric, device=self.device, **self.index_params)  # fail early on bad options
        self.indexes: dict[str, VectorIndex] = {}
        # index: auto: per modality, which index the timing at build chose and why (saved with the bank)
        self.index_choice: dict[str, dict[str, Any]] = {}
        self.payload: dict[str, torch.Tensor] = {}
        self.ids: list[str] = []
        self._row_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.ids) if self.indexes else 0

    @property
    def is_built(self) -> bool:
        return bool(self.indexes)

    # ------------------------------------------------------------------------------------------ building

    @torch.no_grad()
    def refresh(self, embeddings: Mapping[str, torch.Tensor], payload: Mapping[str, torch.Tensor] | None = None,
                ids: Sequence[str] | None = None) -> None:
        """Replace the bank's contents: row ``i`` of every embedding, payload tensor and ``ids`` is sample ``i``.

        Args:
            embeddings: ``{modality: (N, dim)}`` for every modality of the bank.
            payload: ``{name: (N, ...)}`` tensors returned with the neighbours (stored detached on ``device``).
            ids: ``N`` unique sample ids (default ``"0"``, ``"1"``, ...), for :meth:`rows_for_ids`.
        """
        missing = [m for m in self.modalities if m not in embeddings]
        if missing:
            raise RetrievalError(f"refresh is missing embeddings for modalities {missing}")
        n = embeddings[self.modalities[0]].shape[0]
        for name, t in [*((f"embeddings[{m}]", embeddings[m]) for m in self.modalities),
                        *((f"payload[{k}]", v) for k, v in (payload or {}).items())]:
            if t.ndim == 0 or t.shape[0] != n:
                raise RetrievalError(f"{name} has {t.shape[0] if t.ndim else 0} rows, expected {n}")
        ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(ids) != n:
            raise RetrievalError(f"got {len(ids)} ids for {n} rows")
        row_of = {s: i for i, s in enumerate(ids)}
        if len(row_of) != n:
            raise RetrievalError("sample ids in a memory bank must be unique")

        indexes = {}
        for m in self.modalities:
            index = build_index(self.index_kind, self.dim, self.metric, device=self.device, **self.index_params)
            index.add(embeddings[m].detach())
            indexes[m] = index
        self.indexes = indexes
        self.index_choice = {m: ix.choice for m, ix in indexes.items() if getattr(ix, "choice", None)}
        self.payload = {k: v.detach().to(self.device).contiguous() for k, v in (payload or {}).items()}
        self.ids, self._row_of = ids, row_of

    def rows_for_ids(self, ids: Sequence[str]) -> torch.Tensor:
        """Bank rows of the given sample ids (``-1`` for ids not in the bank): the ``exclude_rows`` of a batch."""
        return torch.tensor([self._row_of.get(str(i), -1) for i in ids], dtype=torch.long)

    # ------------------------------------------------------------------------------------------ lookup

    @torch.no_grad()
    def query(self, query_emb: torch.Tensor, source_modality: str, k: int,
              exclude_rows: torch.Tensor | None = None) -> Neighbours:
        """Top-``k`` bank samples whose ``source_modality`` embedding is most similar to ``query_emb``.

        Args:
            query_emb: ``(B, dim)`` retrieval embeddings of any modality.
            source_modality: which of the bank's indexes to search.
            k: neighbours per query.
            exclude_rows: ``(B,)`` bank row each query must not get back (``-1``: none), e.g. the sample itself.

        Returns:
            :class:`Neighbours` on the query's device. Retrieval is not differentiable: gradients reach the
            retrieval embeddings through the contrastive loss, not through the lookup.
        """
        if not self.indexes:
            raise RetrievalError("the memory bank is empty: call refresh() first")
        if source_modality not in self.indexes:
            raise RetrievalError(f"the bank has no modality '{source_modality}' (has: {', '.join(self.modalities)})")
        scores, rows = self.indexes[source_modality].search(query_emb.detach(), k, exclude=exclude_rows)
        safe = rows.clamp_min(0)
        payload = {}
        for name, t in self.payload.items():
            picked = t[safe.to(t.device)].to(query_emb.device)
            valid = (rows >= 0).reshape(*rows.shape, *([1] * (picked.ndim - 2)))
            payload[name] = picked.masked_fill(~valid, 0) if picked.dtype != torch.bool else picked & valid
        return Neighbours(scores=scores, rows=rows, payload=payload)

    def query_all(self, query_emb: torch.Tensor, k: int, exclude_rows: torch.Tensor | None = None,
                  modalities: Sequence[str] | None = None) -> dict[str, Neighbours]:
        """:meth:`query` against each of ``modalities`` (default: all of the bank's)."""
        return {m: self.query(query_emb, m, k, exclude_rows) for m in (modalities or self.modalities)}

    # ------------------------------------------------------------------------------------------ persistence

    def _meta(self) -> dict[str, Any]:
        return {"version": _FORMAT_VERSION, "modalities": list(self.modalities), "dim": self.dim,
                "index": self.index_kind, "metric": self.metric, "index_params": self.index_params,
                "ids": self.ids, "payload": sorted(self.payload), "built": self.is_built,
                "index_meta": {m: ix.state()[0] for m, ix in self.indexes.items()}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat dict of CPU tensors (indexes, payload, and the metadata as UTF-8 JSON bytes under ``"meta"``).

        Being tensors only, it can be merged into a model's state (e.g. under a ``"bank."`` prefix) and saved
        with safetensors, no pickle involved.
        """
        out: dict[str, torch.Tensor] = {"meta": _encode_json(self._meta())}
        for m, ix in self.indexes.items():
            for name, t in ix.state()[1].items():
                out[f"index.{m}.{name}"] = t.cpu().contiguous()
        for name, t in self.payload.items():
            out[f"payload.{name}"] = t.cpu().contiguous()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` into this bank (its modalities and width must match)."""
        meta = _decode_json(state["meta"])
        if meta.get("version") != _FORMAT_VERSION:
            raise RetrievalError(f"unsupported memory-bank format version {meta.get('version')!r}")
        if tuple(meta["modalities"]) != self.modalities or meta["dim"] != self.dim:
            raise RetrievalError(f"saved bank has modalities {meta['modalities']} and dim {meta['dim']}; "
                                 f"this one {list(self.modalities)} and {self.dim}")
        self.index_kind, self.metric, self.index_params = meta["index"], meta["metric"], meta["index_params"]
        self.indexes = {}
        for m, imeta in meta["index_meta"].items():
            prefix = f"index.{m}."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            self.indexes[m] = index_from_state(imeta, tensors, device=self.device)
        self.index_choice = {m: imeta["auto"] for m, imeta in meta["index_meta"].items() if imeta.get("auto")}
        self.payload = {name: state[f"payload.{name}"].to(self.device) for name in meta["payload"]}
        self.ids = list(meta["ids"])
        self._row_of = {s: i for i, s in enumerate(self.ids)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor],
                        device: str | torch.device | None = None) -> MemoryBank:
        meta = _decode_json(state["meta"])
        bank = cls(meta["modalities"], meta["dim"], index="torch", metric=meta["metric"], device=device)
        bank.load_state_dict(state)
        return bank

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/memory_bank.safetensors``; returns its path."""
        path = Path(directory) / BANK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device | None = None) -> MemoryBank:
        path = Path(directory) / BANK_FILE
        if not path.is_file():
            raise RetrievalError(f"no memory bank at {path}")
        return cls.from_state_dict(load_file(str(path)), device=device)


def _encode_json(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).clone()


def _decode_json(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.cpu().numpy().tobytes()).decode("utf-8"))
