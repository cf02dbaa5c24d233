"""Retrieval machinery: vector indexes, the training-set memory bank and the cross-modal contrastive loss.

Used by retrieval-augmented models (``rahp``); nothing here depends on a model. FAISS is optional: without it
the exact torch search gives the same neighbours. ``index: auto`` picks the index by a timing on the machine.
"""

from mmsenti.retrieval.bank import MemoryBank, Neighbours
from mmsenti.retrieval.index import (
    INDEX_KINDS,
    AutoIndex,
    FaissIndex,
    RetrievalError,
    TorchIndex,
    VectorIndex,
    build_index,
    choose_index,
    faiss_available,
    index_from_state,
    load_index,
    save_index,
)
from mmsenti.retrieval.losses import CrossModalSupConLoss, sentiment_classes

__all__ = [
    "INDEX_KINDS",
    "AutoIndex",
    "CrossModalSupConLoss",
    "FaissIndex",
    "MemoryBank",
    "Neighbours",
    "RetrievalError",
    "TorchIndex",
    "VectorIndex",
    "build_index",
    "choose_index",
    "faiss_available",
    "index_from_state",
    "load_index",
    "save_index",
    "sentiment_classes",
]
