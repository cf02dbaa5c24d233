"""The one build path that ``train``, ``evaluate`` and ``cache`` share: data, processor, model, device, loaders.

A :class:`Workbench` is a dataset, its processor and a model on this process's device, with what feeds and scores
them: :func:`build_workbench` makes one from a config (what a training run works at), :func:`load_workbench` from a
trained model directory (what ``mmsenti evaluate`` scores). A workbench knows its place in the process group (a :class:`~mmsenti.distributed.Distributed`): evaluation batches are spread over the
processes and gathered back, and the frozen-feature cache is built once, by rank 0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from mmsenti.config import Config
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.distributed import Distributed, attach_gather, round_robin
from mmsenti.models.base import MultimodalModel, TaskInfo, build_model
from mmsenti.train.sampler import ordered_batches, sample_lengths
from mmsenti.utils import autocast_dtype, seed_everything, show_progress

log = logging.getLogger(__name__)


class ListDataset(Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


def build_dataset(cfg: Config) -> DatasetBundle:
    from mmsenti.registry import DATASETS

    bundle = DATASETS.get(cfg.data.name).builder(cfg.data)
    if cfg.run.cv_folds:  # cross-validation: train+dev pooled and cut into folds; the test split is not loaded
        from mmsenti.data.splits import fold_bundle

        bundle = fold_bundle(bundle, cfg.run.cv_folds, cfg.run.cv_fold, cfg.run.cv_seed)
    missing = [m for m in cfg.model.data_modalities() if m not in bundle.modalities]
    if "tags" in missing:
        raise DataError(f"dataset '{bundle.name}' has no tags (it has: {', '.join(bundle.modalities)}); the tags image "
                        "encoder reads them (hfm: data.use_attributes=true; tumemo: data.tags=[places,objects]; "
                        "your own files: a 'tags' field)")
    if missing:
        raise DataError(
            f"dataset '{bundle.name}' has no {', '.join(missing)} (it has: {', '.join(bundle.modalities)}); "
            f"switch that branch off with --set model.modalities=[{','.join(m for m in cfg.model.modalities if m not in missing)}]"
        )
    return bundle


def open_split_cache(cfg: Config, model: MultimodalModel, processor, bundle: DatasetBundle, split: str,
                     device: torch.device | str = "cpu"):
    """The frozen-feature cache entry of one split (built when missing or broken); see :mod:`mmsenti.train.cache`."""
    from mmsenti.train.cache import default_cache_dir, open_or_build

    return open_or_build(
        default_cache_dir(cfg.run.cache_dir), model, processor, bundle.split(split), sources=bundle.sources,
        dtype=cfg.run.cache_dtype, device=device, batch_size=cfg.data.eval_batch_size,
        progress=show_progress(cfg.run.quiet), meta={"dataset": bundle.name, "split": split, "model": cfg.model.name},
    )


def select_metric(cfg: Config, task: str) -> str:
    if cfg.run.select_metric != "auto":
        return cfg.run.select_metric
    return "f1_weighted" if task == "classification" else "mae"


@dataclass
class Workbench:
    """A dataset, its processor and a model on this process's device, plus how to feed and score them: what
    training, evaluation and the feature cache work at.

    Attributes:
        feature_cache: whether batches read the frozen-feature cache (``run.feature_cache`` and the model has
            frozen parts); the stores are opened on first use (:meth:`feature_store`).
    """

    cfg: Config
    bundle: DatasetBundle
    processor: object
    model: MultimodalModel
    device: torch.device
    dist: Distributed = field(default_factory=Distributed)
    amp_dtype: torch.dtype | None = None
    feature_cache: bool = False
    stores: dict[str, object] = field(default_factory=dict)  # split → FeatureStore
    _lengths: dict[str, list[int] | None] = field(default_factory=dict, repr=False)

    @property
    def info(self) -> TaskInfo:
        return self.model.info

    @property
    def metric(self) -> str:
        """The dev metric that selects the model."""
        return select_metric(self.cfg, self.info.task)

    # ------------------------------------------------------------------------------------------- loaders
    def data_loader(self, split: str, batch_sampler, training: bool = True) -> DataLoader:
        """A loader of ``split``'s samples in the batches of ``batch_sampler`` (lists of indices); ``training=False``
        builds only the inputs evaluation reads."""
        return DataLoader(ListDataset(self.bundle.split(split)), batch_sampler=batch_sampler,
                          collate_fn=self.collate_fn(split, training), num_workers=self.cfg.data.num_workers,
                          generator=torch.Generator(), pin_memory=self.device.type == "cuda")

    def eval_batches(self, split: str) -> list[list[int]]:
        """The batches of ``data.eval_batch_size`` one process scores: ``split``'s samples longest first (each
        batch pads to lengths like its own; :func:`~mmsenti.train.sampler.ordered_batches`), or in order when
        nothing varies in length. :meth:`evaluate` puts predictions back in the split's order."""
        return ordered_batches(len(self.bundle.split(split)), self.cfg.data.eval_batch_size, self.sample_lengths(split))

    def sample_lengths(self, split: str) -> list[int] | None:
        """Each of ``split``'s samples' padded length as collated (:func:`~mmsenti.train.sampler.sample_lengths`),
        tokenized once per split: training's length buckets and the ordered passes share them."""
        if split not in self._lengths:
            self._lengths[split] = sample_lengths(self.processor, self.bundle.split(split))
        return self._lengths[split]

    def eval_loader(self, split: str) -> DataLoader:
        """This process's round-robin share of :meth:`eval_batches` (all of them for a single process).

        Whole batches are spread, never samples: each batch is scored exactly as one process would score it,
        and :func:`~mmsenti.train.evaluate.evaluate` gathers the results back into the split's order.
        """
        return self.data_loader(split, round_robin(self.eval_batches(split), self.dist.rank, self.dist.world_size),
                                training=False)

    def collate_fn(self, split: str, training: bool = True):
        """The processor (``training=False``: only the inputs evaluation reads), or (model with frozen parts, cache
        on) a collator reading the split's cached features."""
        if not self.feature_cache:
            return self.processor if training else functools.partial(self.processor, training=False)
        from mmsenti.train.cache import CachedCollator

        return CachedCollator(self.processor, self.feature_store(split), self.model.cache_replaces())

    def feature_store(self, split: str):
        """The split's frozen-feature cache entry, built once: by rank 0 while the others wait.

        Then the first process of every other machine opens it (or, without a shared file system, builds its
        own copy), then the remaining processes open it; no two processes ever build the same entry at once.
        """
        if split not in self.stores:
            d = self.dist
            for turn in (d.is_main, d.local_rank == 0 and not d.is_main, d.local_rank != 0):
                if turn:
                    with torch.no_grad():
                        self.stores[split] = open_split_cache(self.cfg, self.model, self.processor, self.bundle,
                                                              split, self.device)
                d.barrier()
        return self.stores[split]

    # -------------------------------------------------------------------------------------------- scoring
    def evaluate(self, split: str, model: MultimodalModel | None = None,
                 save_predictions: str | Path | None = None) -> dict:
        """Metrics of ``model`` (default: this setup's) on ``split``, the same on every process.

        ``save_predictions``: also write the per-post predictions there (``.npz``, by rank 0).
        """
        from mmsenti.train.evaluate import evaluate

        return evaluate(model or self.model, self.eval_loader(split), self.device, self.amp_dtype,
                        save_predictions=save_predictions, dist=self.dist,
                        order=[i for b in self.eval_batches(split) for i in b])


def build_workbench(cfg: Config, *, dist: Distributed | None = None, processor=None, load_weights: bool = True,
                    feature_cache: bool | None = None) -> Workbench:
    """Build the dataset, the processor (unless given) and the model of ``cfg`` on this process's device.

    The processor is built by rank 0 (a from-scratch tokenizer learns its vocabulary here) and sent to the
    others, so every process tokenizes alike. Every process builds the model from the same seed, so they start
    identical; with more than one process the losses get the process group's gather hook and ranks > 0 then
    reseed (``seed + rank``) so that dropout differs between processes.

    Args:
        feature_cache: read frozen features from the cache; default ``cfg.run.feature_cache`` (when the model has
            frozen parts).
    """
    dist = dist or Distributed()
    device = dist.device(cfg.run.device)
    amp_dtype = _amp_dtype(cfg, device)
    seed_everything(cfg.run.seed)
    bundle = build_dataset(cfg)
    cfg.model.adopt_data(bundle)  # before the processor and model are built from cfg.model
    info = TaskInfo(bundle.task, bundle.label_names)
    if processor is None:
        if dist.is_main:
            from mmsenti.models.encoders import build_processor

            processor = build_processor(cfg.model, [s.text or "" for s in bundle.split("train")], info.task)
        processor = dist.broadcast_object(processor)
    model = build_model(cfg.model, info, processor, load_weights=load_weights).to(device)
    if cfg.run.sync_batchnorm and dist.enabled:
        if device.type != "cuda":
            from mmsenti.config import ConfigError

            raise ConfigError("run.sync_batchnorm: SyncBatchNorm needs CUDA; on CPU each process normalises "
                              "with its own batch")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dist.enabled:
        attach_gather(model, dist.all_gather)
        if dist.rank > 0:
            seed_everything(cfg.run.seed + dist.rank)
    use_cache = cfg.run.feature_cache if feature_cache is None else feature_cache
    return Workbench(cfg, bundle, processor, model, device, dist, amp_dtype,
                 feature_cache=bool(use_cache and model.cache_spec()))


def _amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.precision`` on ``device``; fp16 where it does not run is an error, not fp32."""
    if cfg.run.precision == "fp16" and device.type != "cuda":
        from mmsenti.config import ConfigError

        raise ConfigError(f"run.precision=fp16: fp16 autocast runs on CUDA only, this run is on {device.type}; "
                          "use run.precision=bf16 (fast on CPUs with AVX512-BF16 or AMX) or fp32")
    return autocast_dtype(cfg.run.precision, device)


def load_workbench(path: str | Path, *, device: str = "auto", dist: Distributed | None = None,
                   root: str | None = None) -> Workbench:
    """A trained model directory (or run directory) with the data it was trained on, for evaluation.

    Args:
        root: the dataset directory, if it moved since training.
    """
    from mmsenti.models.folder import ModelFolder

    dist = dist or Distributed()
    dev = dist.device(device)
    folder = ModelFolder.open(path)
    model, processor, cfg = folder.load_model(dev), folder.processor, folder.config
    if root:
        cfg.data.root = root
    elif cfg.data.root and not Path(cfg.data.root).expanduser().exists():  # a run folder moved to another machine
        raise DataError(f"{path}: the data it was trained on is not at data.root {cfg.data.root} (moved, or the "
                        "folder comes from another machine?); give the data's directory with --root DIR")
    if dist.enabled:
        attach_gather(model, dist.all_gather)
    # fp32 and no feature cache: one pass over a split gains nothing from caching it first.
    bundle = build_dataset(cfg)
    cfg.model.adopt_data(bundle)  # refuses data made otherwise than the model's (e.g. other extraction settings)
    return Workbench(cfg, bundle, processor, model, dev, dist, None, feature_cache=False)
