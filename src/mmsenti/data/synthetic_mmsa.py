"""A synthetic text/audio/vision dataset in the MMSA pickle format, built so that retrieval demonstrably helps.

Design (what makes retrieving *other* samples worth it):

* Samples belong to ``n_clusters`` latent clusters (think: clips of one speaker on one topic). Every cluster has
  a true sentiment score ``s_c``; the scores are spread evenly over ``[-score_range, score_range]`` and assigned
  to clusters at random, independently of anything in the features, so a cluster's score is an arbitrary fact
  that can only be looked up, not computed from the features.
* Each sample's label is its cluster's score plus Gaussian label noise (``label_noise``), clipped to [-3, 3]:
  one sample's label is a poor witness of ``s_c``, the mean label of several same-cluster samples a good one.
* Each modality ``m`` has its own random unit prototype ``mu_c^m`` per cluster (unrelated across modalities,
  so matching a text to audio needs a learned cross-modal map). A sample's feature at time ``t`` is
  ``sqrt(D_m) * (signal_m * mu_c^m + nuisance * u_i^m) + noise * eps_t`` with ``u_i^m`` a random unit vector
  fixed per sample (a speaker/recording offset that averaging over time does not remove) and ``eps_t`` white
  noise. Its own features thus only say roughly *which* cluster it resembles and nothing about the score.

A model without retrieval must memorise the cluster -> score table from a handful of noisy labels per cluster;
a model that retrieves similar training samples (in-modality or across modalities) and reads their labels
estimates ``s_c`` by averaging. With the defaults, on the test split a cosine k-NN over time-pooled features
averaging the neighbours' labels has a clearly lower MAE than ridge regression or an MLP on the same features
(``tests/test_retrieval.py`` checks the first). Audio and vision are zero-padded after random lengths (given in
``audio_lengths`` / ``vision_lengths``, as in MMSA's unaligned features); text is full length. ``raw_text``
is a neutral placeholder without signal.

The pickle holds ``{"train", "valid", "test"}``, each a dict with ``text`` (N, T_t, D_t) float32, ``audio``
(N, T_a, D_a), ``vision`` (N, T_v, D_v), ``audio_lengths`` / ``vision_lengths`` (N,) int64,
``regression_labels`` (N,) float32, ``id`` (N,) str and ``raw_text`` (N,) str arrays. Everything is a
deterministic function of ``seed`` and the options.

The dataset ``synthetic-mmsa`` (:class:`SyntheticMMSADataConfig`) generates it in memory: splits train/dev/test,
regression, text/audio/vision all as feature sequences (``Sample.features``), no pickle written.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsenti.config import ConfigError, DataConfig
from mmsenti.data.base import DatasetBundle, Sample
from mmsenti.data.formats.bundle import finish
from mmsenti.registry import DATASETS

MMSA_SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "vision")


@dataclass
class SyntheticMMSAConfig:
    """Generator options (defaults: a small MOSI-like set, fast enough for tests).

    Attributes:
        n_clusters: latent clusters sharing a true score.
        score_range: cluster scores are spread evenly over [-score_range, score_range].
        label_noise: std of the Gaussian noise added to each sample's label.
        seq_len: time steps per modality.
        dims: feature width per modality.
        signal: strength of the cluster prototype per modality (relative to ``nuisance``).
        nuisance: strength of the per-sample constant offset.
        noise: std of the per-time-step white noise.
        min_len_frac: audio/vision lengths are uniform in [ceil(min_len_frac * T), T].
    """

    n_clusters: int = 96
    score_range: float = 2.8
    label_noise: float = 0.8
    seq_len: dict[str, int] = field(default_factory=lambda: {"text": 16, "audio": 24, "vision": 20})
    dims: dict[str, int] = field(default_factory=lambda: {"text": 32, "audio": 16, "vision": 24})
    signal: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "audio": 0.8, "vision": 0.8})
    nuisance: float = 0.8
    noise: float = 1.0
    min_len_frac: float = 0.5

    def __post_init__(self) -> None:
        for name in ("seq_len", "dims", "signal"):
            value = getattr(self, name)
            if set(value) != set(MODALITIES):
                raise ValueError(f"{name} must give a value for each of {MODALITIES}, got {sorted(value)}")
        if self.n_clusters < 1 or not 0 < self.min_len_frac <= 1:
            raise ValueError("need n_clusters >= 1 and 0 < min_len_frac <= 1")


@dataclass
class SyntheticMMSA:
    """The generated data with the ground truth a test may want (never written to the pickle).

    Attributes:
        data: the MMSA-format dict ``{"train", "valid", "test"}``.
        clusters: each split's latent cluster per sample.
        cluster_scores: the true score of each cluster.
        config: the options used.
    """

    data: dict[str, dict[str, np.ndarray]]
    clusters: dict[str, np.ndarray]
    cluster_scores: np.ndarray
    config: SyntheticMMSAConfig


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def generate_synthetic_mmsa(n_train: int = 2000, n_valid: int = 300, n_test: int = 600, seed: int = 0,
                            config: SyntheticMMSAConfig | None = None, **overrides: Any) -> SyntheticMMSA:
    """Generate the dataset in memory (see the module docstring for the design).

    Args:
        n_train, n_valid, n_test: split sizes.
        seed: everything is a deterministic function of it.
        config: generator options; ``overrides`` replace single fields (e.g. ``n_clusters=32``).
    """
    cfg = dataclasses.replace(config or SyntheticMMSAConfig(), **overrides)
    rng = np.random.default_rng(seed)
    scores = rng.permutation(np.linspace(-cfg.score_range, cfg.score_range, cfg.n_clusters))
    protos = {m: _unit(rng, cfg.n_clusters, cfg.dims[m]) for m in MODALITIES}

    data, clusters = {}, {}
    for split, n in zip(MMSA_SPLITS, (n_train, n_valid, n_test), strict=True):
        if n < 0:
            raise ValueError(f"split size for {split} must be >= 0")
        c = rng.integers(0, cfg.n_clusters, size=n)
        labels = np.clip(scores[c] + cfg.label_noise * rng.standard_normal(n), -3.0, 3.0)
        out: dict[str, np.ndarray] = {}
        for m in MODALITIES:
            t_len, dim = cfg.seq_len[m], cfg.dims[m]
            base = np.sqrt(dim) * (cfg.signal[m] * protos[m][c] + cfg.nuisance * _unit(rng, n, dim))
            x = base[:, None, :] + cfg.noise * rng.standard_normal((n, t_len, dim))
            if m == "text":
                lengths = np.full(n, t_len, dtype=np.int64)
            else:
                lengths = rng.integers(int(np.ceil(cfg.min_len_frac * t_len)), t_len + 1, size=n).astype(np.int64)
                out[f"{m}_lengths"] = lengths
            x[np.arange(t_len)[None, :] >= lengths[:, None]] = 0.0  # MMSA zero-pads after the length
            out[m] = x.astype(np.float32)
        out["regression_labels"] = labels.astype(np.float32)
        out["id"] = np.array([f"synth_{split}_{i:06d}" for i in range(n)])
        out["raw_text"] = np.array([f"synthetic clip {i}" for i in range(n)])
        data[split], clusters[split] = out, c
    return SyntheticMMSA(data=data, clusters=clusters, cluster_scores=scores.astype(np.float32), config=cfg)


def make_synthetic_mmsa(path: str | Path, n_train: int = 2000, n_valid: int = 300, n_test: int = 600,
                        seed: int = 0, config: SyntheticMMSAConfig | None = None, **overrides: Any) -> Path:
    """Write the dataset as an MMSA-format pickle at ``path`` (see :func:`generate_synthetic_mmsa`)."""
    synth = generate_synthetic_mmsa(n_train, n_valid, n_test, seed, config, **overrides)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(synth.data, f, protocol=4)
    return path


# ------------------------------------------------------------------------------------------ registered dataset
@dataclass
class SyntheticMMSADataConfig(DataConfig):
    """``synthetic-mmsa``: the generator above, in memory (no files). ``None`` keeps the generator's default."""

    name: str = "synthetic-mmsa"
    n_train: int = 600
    n_valid: int = 200
    n_test: int = 400
    seed: int = 0
    n_clusters: int | None = None
    label_noise: float | None = None
    score_range: float | None = None
    nuisance: float | None = None
    noise: float | None = None


def synthetic_samples(part: dict[str, np.ndarray]) -> list[Sample]:
    """One MMSA-format split → samples with text, audio and vision feature sequences cut to their lengths."""
    samples = []
    for i in range(len(part["regression_labels"])):
        feats = {m: part[m][i, : int(part[f"{m}_lengths"][i])] if f"{m}_lengths" in part else part[m][i]
                 for m in MODALITIES}
        samples.append(Sample(id=str(part["id"][i]), label=float(part["regression_labels"][i]),
                              text=str(part["raw_text"][i]), features=feats))
    return samples


@DATASETS.register("synthetic-mmsa", config=SyntheticMMSADataConfig,
                   description="generated MOSI-like text/audio/vision features where retrieval helps (regression)")
def build_synthetic_mmsa(cfg: SyntheticMMSADataConfig, *, lenient: bool = False) -> DatasetBundle:
    overrides = {k: getattr(cfg, k) for k in ("n_clusters", "label_noise", "score_range", "nuisance", "noise")
                 if getattr(cfg, k) is not None}
    try:
        synth = generate_synthetic_mmsa(cfg.n_train, cfg.n_valid, cfg.n_test, cfg.seed, **overrides)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    splits = {split: synthetic_samples(synth.data[key])
              for split, key in (("train", "train"), ("dev", "valid"), ("test", "test"))}
    return finish("synthetic-mmsa", splits, "regression", None, MODALITIES, lenient=lenient)
