"""Training batch samplers: global batches (lists of dataset indices) as a pure function of (seed, epoch).

Both samplers give every sample of the split exactly once per epoch, in ``ceil(n / batch_size)`` batches, and
can start at batch ``start`` (a mid-epoch resume replays exactly the batches a killed run had not seen). They
never touch the global RNG. A rank-sharding wrapper (multi-process training) can split their global batches.

:class:`LengthBucketBatchSampler` groups texts of similar length, so a batch pads to a length close to its
members' own: tweets average 24 word pieces while random batches of 32 pad to about 52, so half of every
step's tokens would be padding. :func:`ordered_batches` does the same for passes that need no shuffling
(evaluation, the feature cache, RAHP's memory bank): longest first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochBatchSampler:
    """Shuffled batches whose order depends only on (seed, epoch), optionally starting at batch ``start``."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def batches(self) -> list[list[int]]:
        perm = torch.randperm(self.n, generator=_generator(self.seed, self.epoch)).tolist()
        return [perm[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def __iter__(self):
        return iter(self.batches()[self.start :])

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)


class LengthBucketBatchSampler(EpochBatchSampler):
    """Batches of samples of similar length, in a seeded order.

    Each epoch: a random permutation (seed, epoch) is cut into pools of ``pool_batches`` batches; each pool is
    sorted by length (stably, so ties keep their random order) and cut into batches; then the batches' order is
    shuffled. A batch is thus a random draw among the samples of about its length, the epoch still holds every
    sample once, and only the last pool can give a short batch (as without bucketing, one at most).

    Args:
        lengths: the length of each sample (e.g. its number of word pieces after truncation).
        pool_batches: batches per sorted pool; larger pools pad less but make batches more alike in length
            from one epoch to the next.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, epoch: int, start: int = 0,
                 pool_batches: int = 64):
        super().__init__(len(lengths), batch_size, seed, epoch, start)
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.pool_batches = pool_batches

    def batches(self) -> list[list[int]]:
        g = _generator(self.seed, self.epoch)
        perm = torch.randperm(self.n, generator=g)
        pool = self.pool_batches * self.batch_size
        out: list[list[int]] = []
        for i in range(0, self.n, pool):
            chunk = perm[i : i + pool]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices].tolist()
            out += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[j] for j in order]


def sample_lengths(processor, samples: Sequence) -> list[int] | None:
    """Each sample's padded-dimension length as the processor will collate it, or None when nothing varies.

    Text: word pieces after truncation to the processor's ``max_length``; feature sequences (MMSA audio/vision):
    their time steps. A sample's length is the largest of its modalities'.
    """
    lengths = [0] * len(samples)
    found = False
    if getattr(processor, "tokenizer", None) is not None and "text" in processor.modalities:
        texts = [s.text if s.text is not None else "" for s in samples]
        for i in range(0, len(texts), 4096):
            enc = processor.tokenizer(texts[i:i + 4096], truncation=True, max_length=processor.max_length)
            for j, ids in enumerate(enc["input_ids"]):
                lengths[i + j] = len(ids)
        found = True
    for m in getattr(processor, "feature_modalities", ()):
        for j, s in enumerate(samples):
            x = (s.features or {}).get(m)
            lengths[j] = max(lengths[j], len(x) if x is not None else 0)
        found = True
    return lengths if found else None


def build_batch_sampler(n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                        lengths: Sequence[int] | None = None, pool_batches: int = 64) -> EpochBatchSampler:
    """Length-bucketed batches when ``lengths`` are given, else plain shuffled ones (same count and samples)."""
    if lengths is None:
        return EpochBatchSampler(n, batch_size, seed, epoch, start)
    if len(lengths) != n:
        raise ValueError(f"got {len(lengths)} lengths for {n} samples")
    return LengthBucketBatchSampler(lengths, batch_size, seed, epoch, start, pool_batches)


def ordered_batches(n: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Batches of ``range(n)`` for a pass that needs no shuffling (evaluation, a feature cache, a memory bank).

    With ``lengths``: longest first, so each batch pads to lengths like its own (on HFM's tweets the padded tokens
    drop 2.5x against batches in file order) and an out-of-memory batch shows at once; without: in order.
    """
    if lengths is None:
        order = list(range(n))
    else:
        if len(lengths) != n:
            raise ValueError(f"got {len(lengths)} lengths for {n} samples")
        order = sorted(range(n), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
