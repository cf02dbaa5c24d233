"""Retrieval machinery: indexes vs brute force, exclusion, persistence, the memory bank, the SupCon loss, and
the synthetic MMSA generator."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmsenti.data.synthetic_mmsa import MMSA_SPLITS, generate_synthetic_mmsa, make_synthetic_mmsa
from mmsenti.retrieval import (
    CrossModalSupConLoss,
    FaissIndex,
    MemoryBank,
    RetrievalError,
    TorchIndex,
    VectorIndex,
    build_index,
    faiss_available,
    load_index,
    save_index,
)
from mmsenti.retrieval.losses import sentiment_classes

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def _clustered(n: int, dim: int, n_centers: int = 40, seed: int = 0, spread: float = 0.35) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_centers, dim, generator=g)
    return centers[torch.randint(0, n_centers, (n,), generator=g)] + spread * torch.randn(n, dim, generator=g)


def _brute_force(bank: torch.Tensor, queries: torch.Tensor, k: int, metric: str,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float64 scores, a full stable sort (ties -> lower row), the excluded row masked out."""
    b, q = bank.double(), queries.double()
    if metric == "cosine":
        b, q = F.normalize(b, dim=1), F.normalize(q, dim=1)
    s = q @ b.T
    if exclude is not None:
        for i, r in enumerate(exclude.tolist()):
            if r >= 0:
                s[i, r] = -torch.inf
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order).float(), order


# ------------------------------------------------------------------------------------------------ indexes


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("kind", ["torch", pytest.param("flat", marks=needs_faiss)])
def test_exact_indexes_match_brute_force(kind, metric):
    bank, queries = torch.randn(3000, 24), torch.randn(70, 24)
    index = build_index(kind, 24, metric, **({"chunk_size": 451} if kind == "torch" else {}))
    index.add(bank[:1700])
    index.add(bank[1700:])  # two adds: rows keep counting
    assert len(index) == 3000
    scores, rows = index.search(queries, 10)
    ref_s, ref_i = _brute_force(bank, queries, 10, metric)
    assert isinstance(index, VectorIndex)
    assert rows.dtype == torch.long and rows.shape == (70, 10)
    assert torch.equal(rows, ref_i)
    torch.testing.assert_close(scores, ref_s, atol=1e-4, rtol=1e-4)


@needs_faiss
def test_faiss_flat_equals_torch_cosine():
    bank, queries = _clustered(2000, 32), _clustered(64, 32, seed=1)
    t, f = build_index("torch", 32, "cosine"), build_index("flat", 32, "cosine")
    t.add(bank)
    f.add(bank)
    (ts, ti), (fs, fi) = t.search(queries, 15), f.search(queries, 15)
    assert isinstance(f, FaissIndex) and isinstance(t, TorchIndex)
    assert torch.equal(ti, fi)
    torch.testing.assert_close(ts, fs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["torch", pytest.param("flat", marks=needs_faiss)])
def test_exact_ties_go_to_lower_row_and_chunking_does_not_matter(kind):
    """Duplicate bank vectors (posts with the same tags) tie exactly: both exact indexes keep the lower rows, as an
    exported graph's TopK does (FAISS alone keeps its own choice)."""
    # Integer-valued vectors: exact float arithmetic, so duplicates score exactly equal whatever the chunk.
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (30, 8), generator=g).float()
    bank = torch.cat([base, base, base])  # rows r, r+30, r+60 identical
    queries = torch.randint(-3, 4, (12, 8), generator=g).float()
    ref_s, ref_i = _brute_force(bank, queries, 9, "ip")
    for chunk in (7, 30, 64, 1000) if kind == "torch" else (None,):
        index = TorchIndex(8, "ip", chunk_size=chunk) if kind == "torch" else build_index(kind, 8, "ip")
        index.add(bank)
        s, i = index.search(queries, 9)
        assert torch.equal(i, ref_i), chunk
        assert torch.equal(s, ref_s)
        s, i = index.search(queries, 9, exclude=torch.zeros(12, dtype=torch.long))  # fetches one more
        ref_s, ref_i = _brute_force(bank, queries, 9, "ip", torch.zeros(12, dtype=torch.long))
        assert torch.equal(i, ref_i) and torch.equal(s, ref_s)
        ref_s, ref_i = _brute_force(bank, queries, 9, "ip")


@pytest.mark.parametrize("kind", ["torch", pytest.param("flat", marks=needs_faiss)])
def test_exclusion_drops_only_the_named_row_even_with_duplicates(kind):
    # +-1 vectors: exact arithmetic, and x.y <= 8 with equality only for y == x, so a query's copies rank first.
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 2, (50, 8), generator=g).float() * 2 - 1
    bank = torch.cat([base, base])  # each vector twice: rows r and r + 50
    index = build_index(kind, 8, "ip")
    index.add(bank)
    exclude = torch.arange(100)
    exclude[::7] = -1  # -1: nothing excluded for those queries
    scores, rows = index.search(bank, 5, exclude=exclude)
    ref_s, ref_i = _brute_force(bank, bank, 5, "ip", exclude)
    assert not (rows == exclude[:, None]).any()
    assert torch.equal(scores, ref_s) and torch.equal(rows, ref_i)
    # The copy of an excluded query is still found, with the top score.
    copy = (torch.arange(100) + 50).remainder(100)
    excluded = exclude >= 0
    assert scores[excluded, 0].eq(8).all()
    assert (rows[excluded] == copy[excluded, None]).any(1).all()


@needs_faiss
@pytest.mark.parametrize("kind, params", [("ivf", {"nlist": 32, "nprobe": 4}), ("hnsw", {"M": 16})])
def test_approximate_indexes_recall_and_exclusion(kind, params):
    bank, queries = _clustered(4000, 32), _clustered(200, 32, seed=2)
    exact, approx = build_index("torch", 32, "cosine"), build_index(kind, 32, "cosine", **params)
    exact.add(bank)
    approx.add(bank)
    k = 10
    _, ei = exact.search(queries, k)
    _, ai = approx.search(queries, k)
    recall = np.mean([len(set(a.tolist()) & set(e.tolist())) / k for a, e in zip(ai, ei, strict=True)])
    assert recall > 0.8, recall
    _, self_rows = approx.search(bank[:100], k, exclude=torch.arange(100))
    assert not (self_rows == torch.arange(100)[:, None]).any()


@pytest.mark.parametrize("kind", ["torch", pytest.param("flat", marks=needs_faiss),
                                  pytest.param("ivf", marks=needs_faiss), pytest.param("hnsw", marks=needs_faiss)])
def test_index_save_load_round_trip(tmp_path, kind):
    bank, queries = _clustered(1500, 16), _clustered(40, 16, seed=3)
    params = {"ivf": {"nlist": 16, "nprobe": 3}, "hnsw": {"M": 8, "ef_search": 20}}.get(kind, {})
    index = build_index(kind, 16, "cosine", **params)
    index.add(bank)
    exclude = torch.randint(-1, 1500, (40,))
    before = index.search(queries, 7, exclude=exclude)
    save_index(index, tmp_path / "ix.safetensors")
    loaded = load_index(tmp_path / "ix.safetensors")
    after = loaded.search(queries, 7, exclude=exclude)
    assert type(loaded) is type(index) and len(loaded) == 1500 and loaded.metric == "cosine"
    assert torch.equal(before[1], after[1]) and torch.equal(before[0], after[0])
    # The class-level load returns the same index, and refuses a file of another kind.
    cls, other = (TorchIndex, FaissIndex) if kind == "torch" else (FaissIndex, TorchIndex)
    assert torch.equal(cls.load(tmp_path / "ix.safetensors").search(queries, 7, exclude=exclude)[1], before[1])
    with pytest.raises(RetrievalError, match=f"not a {other.__name__}"):
        other.load(tmp_path / "ix.safetensors")


def test_small_bank_pads_and_bad_arguments_raise():
    index = TorchIndex(4, "ip")
    assert index.search(torch.randn(2, 4), 3)[1].eq(-1).all()  # empty bank
    index.add(torch.randn(3, 4))
    s, i = index.search(torch.randn(2, 4), 5, exclude=torch.tensor([0, -1]))
    assert i[0, 2:].eq(-1).all() and i[1, 3:].eq(-1).all() and torch.isinf(s[0, 2:]).all()
    assert set(i[0, :2].tolist()) == {1, 2}
    with pytest.raises(RetrievalError):
        index.search(torch.randn(2, 5), 1)
    with pytest.raises(RetrievalError):
        build_index("annoy", 4)
    with pytest.raises(RetrievalError):
        build_index("torch", 4, nlist=3)


def test_torch_fallback_without_faiss(monkeypatch, tmp_path):
    bank, queries = _clustered(1200, 16), _clustered(30, 16, seed=4)
    reference = build_index("auto", 16, "cosine")
    reference.add(bank)
    ref = reference.search(queries, 8, exclude=torch.arange(30))
    if faiss_available():
        save_index(reference, tmp_path / "flat.safetensors")  # saved by FAISS, loaded below without it

    monkeypatch.setitem(sys.modules, "faiss", None)  # "import faiss" now raises ImportError
    assert not faiss_available()
    fallback = build_index("auto", 16, "cosine")
    assert isinstance(fallback, TorchIndex)
    fallback.add(bank)
    got = fallback.search(queries, 8, exclude=torch.arange(30))
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=0)
    with pytest.raises(ImportError, match="faiss"):
        build_index("hnsw", 16)
    if (tmp_path / "flat.safetensors").exists():
        loaded = load_index(tmp_path / "flat.safetensors")
        assert isinstance(loaded, TorchIndex)
        assert torch.equal(loaded.search(queries, 8, exclude=torch.arange(30))[1], ref[1])


# ------------------------------------------------------------------------------------------------ memory bank


def _filled_bank(kind: str = "auto", n: int = 300, dim: int = 16) -> tuple[MemoryBank, dict]:
    g = torch.Generator().manual_seed(5)
    emb = {m: torch.randn(n, dim, generator=g) for m in ("text", "audio")}
    payload = {"text": torch.randn(n, 6, generator=g), "audio": torch.randn(n, 4, 3, generator=g),
               "labels": torch.randn(n, generator=g), "cls": torch.randint(0, 3, (n,), generator=g)}
    bank = MemoryBank(["text", "audio"], dim, index=kind)
    bank.refresh(emb, payload, ids=[f"s{i}" for i in range(n)])
    return bank, {"emb": emb, "payload": payload}


def test_bank_query_returns_neighbours_payload_cross_modal():
    bank, d = _filled_bank()
    q = torch.randn(9, 16)
    for source in ("text", "audio"):
        nb = bank.query(q, source, k=4)
        _, ref_rows = _brute_force(d["emb"][source], q, 4, "cosine")
        assert torch.equal(nb.rows, ref_rows)  # searched the index of `source`, not the query's modality
        for name, t in d["payload"].items():
            assert torch.equal(nb.payload[name], t[ref_rows])
        assert nb.payload["audio"].shape == (9, 4, 4, 3) and nb.mask.all()
    both = bank.query_all(q, k=4)
    assert set(both) == {"text", "audio"} and not torch.equal(both["text"].rows, both["audio"].rows)


def test_bank_training_query_never_returns_itself():
    bank, d = _filled_bank()
    ids = ["s5", "s17", "unknown", "s299"]
    rows = bank.rows_for_ids(ids)
    assert rows.tolist() == [5, 17, -1, 299]
    # Each sample queries with its own embedding: without exclusion it finds itself first.
    q = d["emb"]["text"][rows.clamp_min(0)]
    assert bank.query(q, "text", k=3).rows[[0, 1, 3], 0].tolist() == [5, 17, 299]
    nb = bank.query(q, "text", k=3, exclude_rows=rows)
    assert not (nb.rows == rows[:, None]).any()
    assert nb.rows[2, 0] == 0  # "unknown" excludes nothing: it finds row 0, which it is


def test_bank_pads_missing_neighbours_with_zero_payload():
    bank = MemoryBank(["text"], 4, index="torch")
    bank.refresh({"text": torch.randn(3, 4)}, {"feat": torch.ones(3, 2), "flag": torch.ones(3, dtype=torch.bool)})
    nb = bank.query(torch.randn(2, 4), "text", k=5)
    assert nb.mask.sum(1).tolist() == [3, 3]
    assert nb.payload["feat"][~nb.mask].eq(0).all() and nb.payload["feat"][nb.mask].eq(1).all()
    assert not nb.payload["flag"][~nb.mask].any()


@pytest.mark.parametrize("kind", ["torch", pytest.param("flat", marks=needs_faiss),
                                  pytest.param("ivf", marks=needs_faiss), pytest.param("hnsw", marks=needs_faiss)])
def test_bank_save_load_round_trip(tmp_path, kind):
    params = {"ivf": {"nlist": 8, "nprobe": 2}, "hnsw": {"M": 8}}.get(kind, {})
    bank = MemoryBank(["text", "audio"], 16, index=kind, **params)
    _, d = _filled_bank()
    bank.refresh(d["emb"], d["payload"], ids=[f"s{i}" for i in range(300)])
    q, exclude = torch.randn(11, 16), torch.randint(-1, 300, (11,))
    path = bank.save(tmp_path / "model")
    loaded = MemoryBank.load(tmp_path / "model")
    assert path.name == "memory_bank.safetensors" and len(loaded) == 300 and loaded.ids == bank.ids
    assert loaded.index_kind == kind and loaded.modalities == ("text", "audio")
    for m in ("text", "audio"):
        a, b = bank.query(q, m, 6, exclude), loaded.query(q, m, 6, exclude)
        assert torch.equal(a.rows, b.rows) and torch.equal(a.scores, b.scores)
        for name in d["payload"]:
            assert torch.equal(a.payload[name], b.payload[name])
    # The state dict is tensors only, so it can be merged into a model's safetensors file.
    assert all(isinstance(v, torch.Tensor) for v in bank.state_dict().values())


def test_bank_validates_inputs():
    bank = MemoryBank(["text", "audio"], 4, index="torch")
    with pytest.raises(RetrievalError, match="empty"):
        bank.query(torch.randn(1, 4), "text", 1)
    with pytest.raises(RetrievalError, match="missing"):
        bank.refresh({"text": torch.randn(3, 4)})
    with pytest.raises(RetrievalError, match="rows"):
        bank.refresh({"text": torch.randn(3, 4), "audio": torch.randn(3, 4)}, {"y": torch.randn(2)})
    with pytest.raises(RetrievalError, match="unique"):
        bank.refresh({"text": torch.randn(2, 4), "audio": torch.randn(2, 4)}, ids=["a", "a"])
    bank.refresh({"text": torch.randn(2, 4), "audio": torch.randn(2, 4)})
    with pytest.raises(RetrievalError, match="no modality"):
        bank.query(torch.randn(1, 4), "vision", 1)


# ------------------------------------------------------------------------------------------------ SupCon loss


def _naive_supcon(z: torch.Tensor, classes: torch.Tensor, present: torch.Tensor, t: float) -> torch.Tensor:
    """Khosla et al. L_out with explicit loops over anchors, positives and the denominator."""
    b, m, _ = z.shape
    z = F.normalize(z.double(), dim=-1)
    items = [(i, a) for i in range(b) for a in range(m) if present[i, a]]
    losses = []
    for i, a in items:
        others = [(j, c) for j, c in items if (j, c) != (i, a)]
        positives = [(j, c) for j, c in others if classes[j] == classes[i]]
        if not positives:
            continue
        denom = sum(torch.exp(z[i, a] @ z[j, c] / t) for j, c in others)
        total = sum(torch.log(torch.exp(z[i, a] @ z[j, c] / t) / denom) for j, c in positives)
        losses.append(-total / len(positives))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_supcon_equals_naive_formula(task):
    g = torch.Generator().manual_seed(6)
    b, m = 7, 3
    z = torch.randn(b, m, 5, generator=g)
    if task == "classification":
        labels = torch.tensor([0, 1, 2, 1, 0, 0, 2])
    else:
        labels = torch.tensor([-1.2, 0.0, 2.5, -0.3, 0.0, 1.0, -2.9])
    present = torch.ones(b, m, dtype=torch.bool)
    present[2, 1] = present[4, 0] = False
    loss = CrossModalSupConLoss(task, temperature=0.3)
    got = loss({"text": z[:, 0], "audio": z[:, 1], "vision": z[:, 2]}, labels, present)["loss_ret"]
    ref = _naive_supcon(z, sentiment_classes(labels, task), present, 0.3)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    if task == "regression":  # 0 counts as non-negative by default; "separate" gives zeros their own class
        assert sentiment_classes(labels, task).tolist() == [0, 1, 1, 0, 1, 1, 0]
        sep = CrossModalSupConLoss(task, temperature=0.3, zero="separate")(z, labels, present)["loss_ret"]
        torch.testing.assert_close(sep.double(), _naive_supcon(z, torch.sign(labels), present, 0.3),
                                   atol=1e-5, rtol=1e-5)
        rounded = CrossModalSupConLoss(task, 0.3, regression_classes="rounded")(z, labels, present)["loss_ret"]
        assert sentiment_classes(labels, task, regression_classes="rounded").tolist() == [-1, 0, 2, 0, 0, 1, -3]
        torch.testing.assert_close(rounded.double(), _naive_supcon(
            z, sentiment_classes(labels, task, regression_classes="rounded"), present, 0.3), atol=1e-5, rtol=1e-5)


def test_supcon_skips_anchors_without_positives_and_has_gradients():
    # A single sample with a single modality of its class has no positive: the naive formula skips it too.
    z = torch.randn(4, 1, 6, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2])
    got = CrossModalSupConLoss(temperature=0.5)(z, labels)["loss_ret"]
    ref = _naive_supcon(z.detach(), labels, torch.ones(4, 1, dtype=torch.bool), 0.5)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6)
    got.backward()
    assert torch.isfinite(z.grad).all() and z.grad[:2].abs().sum() > 0
    # No anchor with a positive at all: zero loss that still backpropagates.
    z2 = torch.randn(3, 1, 6, requires_grad=True)
    out = CrossModalSupConLoss(weight=2.0)(z2, torch.tensor([0, 1, 2]))["loss_ret"]
    out.backward()
    assert out.item() == 0.0 and z2.grad is not None


@pytest.mark.parametrize("present", [None, "missing"])
def test_supcon_gather_hook_reproduces_full_batch(present):
    """Two simulated ranks (3 and 5 samples) that see each other's embeddings through `gather`: weighted by their
    sample counts (as the trainer weights processes), their terms sum to the full-batch loss, also when the ranks
    hold different numbers of anchors (missing modalities)."""
    g = torch.Generator().manual_seed(7)
    z, labels = torch.randn(8, 2, 5, generator=g), torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    mask = torch.ones(8, 2, dtype=torch.bool)
    if present:
        mask[0, 1] = mask[1, 0] = mask[6, 1] = False
    full = CrossModalSupConLoss(temperature=0.2)(z, labels, mask)["loss_ret"]
    halves = [(slice(0, 3), 0), (slice(3, 8), 6)]  # rank 0: samples 0-2 (6 rows), rank 1: samples 3-7
    flat = {"z": F.normalize(z.reshape(16, 5), dim=1), "cls": labels.repeat_interleave(2), "valid": mask.reshape(16)}

    def flat_for(x):
        return next(v for v in flat.values() if v.dtype == x.dtype and v.shape[1:] == x.shape[1:])

    def anchors(rows):  # valid rows with a positive: another valid row of the same class
        return sum(bool(flat["valid"][r]) and any(bool(flat["valid"][k]) and k != r and flat["cls"][k] == flat["cls"][r]
                                                  for k in range(16)) for r in rows)

    per_rank = torch.tensor([[anchors(range(0, 6)), 3], [anchors(range(6, 16)), 5]])
    assert present is None or per_rank[0, 0] != 6  # the ranks' anchor counts are not proportional to their samples
    total = 0.0
    for sl, offset in halves:
        def gather(x, offset=offset):
            if x.shape == (1, 2):  # the anchor / sample counts of both ranks
                return per_rank, offset // 6
            return flat_for(x), offset
        part = CrossModalSupConLoss(temperature=0.2, gather=gather)(z[sl], labels[sl], mask[sl])["loss_ret"]
        total = total + part * (sl.stop - sl.start) / 8
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-6)


def test_supcon_on_a_rank_without_anchors_keeps_the_gathered_keys_in_its_graph():
    """This rank's only embedding has no positive in the global batch while the other rank has anchors: its share is
    0, but the gathered keys stay in its graph, so it joins the all-reduce of the gather's backward that the other
    rank runs (an early return skipped it: gloo aborted with "Received data size doesn't match expected size")."""
    other = F.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(8)), dim=1)  # rank 1: 2 × class 0
    gathered = []

    def gather(x):  # rank 0 of 2: this rank's rows first, then rank 1's
        if x.is_floating_point():
            gathered.append(torch.cat([x, other]))
            gathered[-1].retain_grad()
            return gathered[-1], 0
        if x.shape == (1, 2):  # anchor and sample counts: none of 1 here, 2 of 2 on rank 1
            return torch.cat([x, torch.tensor([[2, 2]])]), 0
        return torch.cat([x, torch.tensor([0, 0], dtype=torch.long).to(x.dtype)]), 0  # classes 0; both valid

    z = torch.randn(1, 1, 4, requires_grad=True)
    out = CrossModalSupConLoss(temperature=0.5, gather=gather)(z, torch.tensor([1]))["loss_ret"]
    out.backward()
    assert out.item() == 0.0 and len(gathered) == 1
    assert gathered[0].grad is not None and torch.equal(gathered[0].grad, torch.zeros(3, 4))
    assert torch.equal(z.grad, torch.zeros_like(z))


# ------------------------------------------------------------------------------------------------ synthetic MMSA


def test_synthetic_mmsa_pickle_is_valid_and_deterministic(tmp_path):
    path = make_synthetic_mmsa(tmp_path / "synth.pkl", n_train=60, n_valid=20, n_test=30, seed=3)
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert set(data) == set(MMSA_SPLITS)
    sizes = {"train": 60, "valid": 20, "test": 30}
    for split, d in data.items():
        n = sizes[split]
        assert d["text"].shape == (n, 16, 32) and d["audio"].shape == (n, 24, 16) and d["vision"].shape == (n, 20, 24)
        assert all(d[m].dtype == np.float32 for m in ("text", "audio", "vision"))
        assert d["regression_labels"].shape == (n,) and d["regression_labels"].dtype == np.float32
        assert np.abs(d["regression_labels"]).max() <= 3.0
        assert d["id"].shape == (n,) and len(set(d["id"].tolist())) == n and d["raw_text"].shape == (n,)
        for m in ("audio", "vision"):
            lengths, x = d[f"{m}_lengths"], d[m]
            assert lengths.shape == (n,) and lengths.min() >= x.shape[1] // 2 and lengths.max() <= x.shape[1]
            steps = np.arange(x.shape[1])[None, :]
            assert np.all(x[steps >= lengths[:, None]] == 0)  # zero padding after the length...
            assert np.all(np.abs(x[steps < lengths[:, None]]).sum(-1) > 0)  # ...and real data before it
    again = generate_synthetic_mmsa(60, 20, 30, seed=3).data
    other = generate_synthetic_mmsa(60, 20, 30, seed=4).data
    for split in MMSA_SPLITS:
        for key in data[split]:
            assert np.array_equal(data[split][key], again[split][key]), (split, key)
        assert not np.array_equal(data[split]["text"], other[split]["text"])


def _pooled(d: dict) -> np.ndarray:
    parts = []
    for m in ("text", "audio", "vision"):
        lengths = d.get(f"{m}_lengths", np.full(len(d[m]), d[m].shape[1]))
        p = d[m].sum(1) / lengths[:, None]
        parts.append(p / np.linalg.norm(p, axis=1, keepdims=True))
    return np.concatenate(parts, 1)


def test_synthetic_mmsa_retrieval_beats_own_features():
    """k-NN over the training bank (mean of neighbours' labels) beats the best linear model of own features."""
    from sklearn.linear_model import RidgeCV

    synth = generate_synthetic_mmsa(n_train=1500, n_valid=0, n_test=400, seed=0)
    train, test = synth.data["train"], synth.data["test"]
    x_tr, x_te = torch.from_numpy(_pooled(train)), torch.from_numpy(_pooled(test))
    y_tr, y_te = train["regression_labels"], test["regression_labels"]
    bank = MemoryBank(["pooled"], x_tr.shape[1], index="torch")
    bank.refresh({"pooled": x_tr}, {"labels": torch.from_numpy(y_tr)})
    knn = bank.query(x_te, "pooled", k=10).payload["labels"].mean(1).numpy()
    ridge = RidgeCV(alphas=np.logspace(-2, 3, 11)).fit(_pooled(train), y_tr).predict(_pooled(test))
    mae_knn, mae_ridge = np.abs(knn - y_te).mean(), np.abs(ridge - y_te).mean()
    mae_oracle = np.abs(synth.cluster_scores[synth.clusters["test"]] - y_te).mean()  # the label-noise floor
    assert mae_knn < 0.75 * mae_ridge, (mae_knn, mae_ridge)
    assert mae_knn < 1.25 * mae_oracle, (mae_knn, mae_oracle)


# ------------------------------------------------------------------------------------------------ index: auto


@needs_faiss
def test_auto_index_picks_the_exact_index_measured_faster(monkeypatch):
    from mmsenti.retrieval import AutoIndex
    from mmsenti.retrieval import index as index_mod

    bank, queries = _clustered(2000, 16), _clustered(20, 16, seed=3)
    auto = build_index("auto", 16, "cosine")
    assert isinstance(auto, AutoIndex) and len(auto) == 0
    auto.add(bank)
    c = auto.choice
    assert set(c["query_ms"]) == {"torch", "flat"} and c["n"] == 2000
    assert c["chosen"] == min(c["query_ms"], key=c["query_ms"].get)  # the faster one, as measured
    assert "no approximate index" in c["reason"]  # 2,000 vectors: below ann_min_size
    _, ref = _brute_force(bank, queries, 7, "cosine")
    assert torch.equal(auto.search(queries, 7)[1], ref)
    for fast in ("torch", "flat"):  # the decision follows the timing, whichever way it goes
        monkeypatch.setattr(index_mod, "_search_ms",
                            lambda index, *a, fast=fast, **kw: 1.0 if index.kind == fast else 5.0)
        chosen = build_index("auto", 16)
        chosen.add(bank)
        assert chosen.choice["chosen"] == fast and chosen.chosen.kind == fast


@needs_faiss
def test_auto_index_goes_approximate_only_when_large_fast_and_accurate_enough(monkeypatch, tmp_path):
    from mmsenti.retrieval import index as index_mod

    bank = _clustered(6000, 16, n_centers=60, spread=0.2)
    real = index_mod._search_ms
    auto = build_index("auto", 16, ann_min_size=5000, min_recall=0.95)
    auto.add(bank)  # really measured: IVF's nprobe is raised until recall@10 on the bank's rows reaches 0.95
    (name, recall), = auto.choice["recall"].items()
    assert name.startswith("ivf(") and recall >= 0.95 and name in auto.choice["query_ms"]

    monkeypatch.setattr(index_mod, "_search_ms", lambda index, *a, **kw: 1.0 if index.kind == "ivf" else 10.0)
    fast = build_index("auto", 16, ann_min_size=5000)
    fast.add(bank)
    assert fast.choice["chosen"] == "ivf" and fast.chosen.kind == "ivf" and "recall@10" in fast.choice["reason"]
    # Found neighbours are (mostly) the exact ones; a saved bank keeps the decision and loads as that IVF index.
    bank_obj = MemoryBank(["text"], 16, index="auto", ann_min_size=5000)
    bank_obj.refresh({"text": bank})
    assert bank_obj.index_choice["text"]["chosen"] == "ivf"
    loaded = MemoryBank.load(bank_obj.save(tmp_path).parent)
    assert loaded.index_choice == bank_obj.index_choice and isinstance(loaded.indexes["text"], FaissIndex)
    q = bank[:50] + 0.01
    assert torch.equal(loaded.query(q, "text", 5).rows, bank_obj.query(q, "text", 5).rows)

    monkeypatch.setattr(index_mod, "_recall", lambda rows, exact: 0.5)  # as fast, but not accurate enough
    low = build_index("auto", 16, ann_min_size=5000)
    low.add(bank)
    assert low.choice["chosen"] in ("torch", "flat") and "not chosen" in low.choice["reason"]
    monkeypatch.setattr(index_mod, "_search_ms", real)
    with pytest.raises(RetrievalError, match="min_recall"):
        build_index("auto", 16, min_recall=1.5)
