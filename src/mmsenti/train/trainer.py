"""The one trainer every model uses.

Model selection and early stopping read the **dev** split only; the test split is scored once, at the end, with
the selected weights. ``last`` and ``best`` checkpoints are written atomically and hold everything a resumed
run needs to continue exactly where a killed one stopped, mid-epoch included: the order of every epoch's
batches is a function of (seed, epoch), and the RNG states are restored, so a resumed run ends with the same
metrics as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmsenti.config import Config, config_from_json, save_config
from mmsenti.data.base import DataError, DatasetBundle, Sample
from mmsenti.losses import total_loss
from mmsenti.metrics import format_table, higher_is_better
from mmsenti.models.base import MultimodalModel, TaskInfo, build_model, save_pretrained
from mmsenti.train.checkpoint import atomic_save, load_checkpoint
from mmsenti.train.evaluate import evaluate, move
from mmsenti.train.optim import build_optimizer, build_scheduler
from mmsenti.train.sampler import EpochBatchSampler, build_batch_sampler, sample_lengths  # noqa: F401 (re-export)
from mmsenti.utils import (
    autocast,
    autocast_dtype,
    git_revision,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_logging,
    show_progress,
)

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised by the test hook ``Trainer.interrupt_after_step`` to simulate a killed run."""


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
    missing = [m for m in cfg.model.modalities if m not in bundle.modalities]
    if missing:
        raise DataError(
            f"dataset '{bundle.name}' has no {', '.join(missing)} (it has: {', '.join(bundle.modalities)}); "
            f"switch that branch off with --set model.modalities=[{','.join(m for m in cfg.model.modalities if m not in missing)}]"
        )
    return bundle


def open_split_cache(cfg: Config, model: MultimodalModel, processor, bundle: DatasetBundle, split: str,
                     device: torch.device | str = "cpu"):
    """The frozen-feature cache entry of one split (built when missing or broken); see :mod:`mmsenti.cache`."""
    from mmsenti.cache import default_cache_dir, open_or_build

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
class TrainState:
    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # micro-batches of `epoch` already done
    step: int = 0  # optimiser steps so far
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from ``run_dir/checkpoints/last.pt``."""

    interrupt_after_step: int | None = None  # test hook: raise TrainingInterrupted after this optimiser step

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = resume
        if resume:
            saved = self.run_dir / "config.json"
            if not saved.is_file():
                raise DataError(f"cannot resume: {saved} not found (was {self.run_dir} a training run?)")
            cfg = config_from_json(saved)  # a resumed run continues with the config it started with
        self.cfg = cfg
        self.device = resolve_device(cfg.run.device)
        self.amp_dtype = autocast_dtype(cfg.run.precision, self.device)

    # ------------------------------------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        setup_logging(logfile=self.run_dir / "train.log")
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        if not self.resume:
            save_config(cfg, self.run_dir / "config.json")
            info = {"git_revision": git_revision(), "command": sys.argv, "python": platform.python_version(),
                    "torch": torch.__version__, "device": str(self.device), "started": time.strftime("%F %T")}
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        seed_everything(cfg.run.seed)

        self.bundle = build_dataset(cfg)
        self.info = TaskInfo(self.bundle.task, self.bundle.label_names)
        self.metric = select_metric(cfg, self.info.task)
        train = self.bundle.split("train")
        if not train:
            raise DataError(f"dataset '{self.bundle.name}': the train split is empty")
        proc_dir = self.run_dir / "processor"
        if self.resume and proc_dir.is_dir():
            from mmsenti.data.processing import Processor

            self.processor = Processor.load(proc_dir)
        else:
            from mmsenti.models.encoders import build_processor

            self.processor = build_processor(cfg.model, [s.text or "" for s in train], self.info.task)
            self.processor.save(proc_dir)
        self.model: MultimodalModel = build_model(cfg.model, self.info, self.processor).to(self.device)
        if cfg.run.compile:
            from mmsenti.train.compile import compile_model

            compile_model(self.model)  # in place (state_dict keys unchanged); eager with a warning if unavailable
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model %s: %.2fM trainable parameters; data %s: %s", cfg.model.name, n_params / 1e6,
                 self.bundle.name, ", ".join(f"{k} {len(v)}" for k, v in self.bundle.splits.items()))

        self.feature_cache: dict[str, object] = {}  # split → FeatureStore, built on first use
        self._lengths: dict[str, list[int] | None] = {}  # split → sample lengths, for length bucketing
        self.use_cache = bool(cfg.run.feature_cache and self.model.cache_spec())
        self.batches_per_epoch = math.ceil(len(train) / cfg.data.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.optim.grad_accum)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.optim.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        if self.resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")
        self.tb = self._tensorboard()

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a core dependency, but a broken install must not stop training
            log.warning("tensorboard not importable; metrics go to metrics.csv only")
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def loader(self, split: str, epoch: int | None = None, start: int = 0) -> DataLoader:
        """Training batches for ``epoch`` (shuffled by seed+epoch) or, with epoch None, ordered eval batches."""
        samples = ListDataset(self.bundle.split(split))
        common = {"collate_fn": self.collate_fn(split), "num_workers": self.cfg.data.num_workers,
                  "generator": torch.Generator(), "pin_memory": self.device.type == "cuda"}
        if epoch is None:
            return DataLoader(samples, batch_size=self.cfg.data.eval_batch_size, shuffle=False, **common)
        data = self.cfg.data
        lengths = None
        if data.bucket_by_length:  # tokenized once per split; the order stays a function of (seed, epoch)
            if split not in self._lengths:
                self._lengths[split] = sample_lengths(self.processor, samples.samples)
            lengths = self._lengths[split]
        sampler = build_batch_sampler(len(samples), data.batch_size, self.cfg.run.seed, epoch, start, lengths,
                                      data.bucket_pool)
        return DataLoader(samples, batch_sampler=sampler, **common)

    def collate_fn(self, split: str):
        """The processor, or (model with frozen parts, cache on) a collator reading the split's cached features."""
        if not self.use_cache:
            return self.processor
        from mmsenti.cache import CachedCollator

        if split not in self.feature_cache:
            self.feature_cache[split] = open_split_cache(self.cfg, self.model, self.processor, self.bundle, split,
                                                         self.device)
        return CachedCollator(self.processor, self.feature_cache[split], self.model.cache_replaces())

    # ---------------------------------------------------------------------------------------- checkpoints
    def _save(self, name: str) -> None:
        atomic_save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "state": self.state.__dict__, "rng": rng_state(), "config": self.cfg.to_dict(),
        }, self.run_dir / "checkpoints" / f"{name}.pt")

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.state.epoch + 1, self.state.batch,
                 self.state.step)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train, select on dev, score the selected model on dev and test; returns ``metrics.json``'s content."""
        self._setup()
        cfg, st = self.cfg, self.state
        t0 = time.time()
        while st.epoch < cfg.optim.epochs:
            if st.batch == 0:  # mid-epoch resume: the state the hook built is in the checkpoint already
                self._hook("on_train_epoch_start")
            train_terms = self._train_epoch()
            self._hook("on_train_epoch_end")
            dev = evaluate(self.model, self.loader("dev"), self.device, self.amp_dtype)
            self._end_epoch(train_terms, dev)
            if cfg.run.patience and st.bad_epochs >= cfg.run.patience:
                log.info("early stop: no dev %s improvement for %d epochs", self.metric, st.bad_epochs)
                break
        log.info("training took %.1fs; best dev %s %.4f at epoch %d", time.time() - t0, self.metric,
                 st.best if st.best is not None else float("nan"), st.best_epoch + 1)
        return self._finish()

    def _hook(self, name: str) -> None:
        """Let a model refresh epoch-level state (e.g. a retrieval memory bank) from the training data.

        ``model.on_train_epoch_start(trainer)`` runs before each epoch, ``on_train_epoch_end(trainer)`` after it,
        before dev evaluation (so selection and the saved model see the state matching the weights). State the
        hooks build must live in the model's state_dict, so checkpoints and saved models carry it.
        """
        fn = getattr(self.model, name, None)
        if fn is not None:
            fn(self)

    def _train_epoch(self) -> dict[str, float]:
        cfg, st = self.cfg, self.state
        accum = cfg.optim.grad_accum
        n = self.batches_per_epoch
        self.model.train()
        sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per batch (read at the epoch's end)
        count = 0
        bar = tqdm(total=n, initial=st.batch, desc=f"epoch {st.epoch + 1}/{cfg.optim.epochs}", leave=False,
                   disable=not show_progress(cfg.run.quiet), dynamic_ncols=True)
        for batch in self.loader("train", st.epoch, st.batch):
            i = st.batch
            group = min(accum, n - (i // accum) * accum)  # the last accumulation group may be short
            batch = move(batch, self.device)
            with autocast(self.device, self.amp_dtype):
                terms = self.model.compute_loss(self.model(batch), batch)
                loss = total_loss(terms)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {st.epoch + 1}, batch {i}: "
                                         + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            scaled = loss / group
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for k, v in (*terms.items(), ("loss", loss)):
                v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
            count += 1
            st.batch += 1
            bar.update(1)
            if st.batch % accum == 0 or st.batch == n:
                self._optimizer_step()
                if not bar.disable:  # reading the loss is a host sync: only for a visible progress bar
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if st.step % cfg.run.log_every == 0:
                    self._log_step(terms, loss.detach())
                if st.batch < n and cfg.run.checkpoint_every and st.step % cfg.run.checkpoint_every == 0:
                    self._save("last")
                if self.interrupt_after_step is not None and st.step >= self.interrupt_after_step:
                    bar.close()
                    raise TrainingInterrupted(f"interrupted after step {st.step}")
        bar.close()
        return {k: float(v) / max(1, count) for k, v in sums.items()}

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1

    def _log_step(self, terms: dict, loss: torch.Tensor) -> None:
        st = self.state
        parts = " ".join(f"{k} {float(v.detach()):.4f}" for k, v in terms.items())
        log.info("epoch %d batch %d/%d step %d: loss %.4f (%s) lr %.2e", st.epoch + 1, st.batch,
                 self.batches_per_epoch, st.step, float(loss), parts, self.scheduler.get_last_lr()[0])
        if self.tb:
            self.tb.add_scalar("train/loss", float(loss), st.step)
            for k, v in terms.items():
                self.tb.add_scalar(f"train/{k}", float(v.detach()), st.step)

    def _end_epoch(self, train_terms: dict, dev: dict) -> None:
        st = self.state
        value = dev[self.metric]
        improved = st.best is None or (value > st.best if higher_is_better(self.metric) else value < st.best)
        row = {"epoch": st.epoch + 1, "step": st.step, "lr": self.scheduler.get_last_lr()[0]}
        row.update({f"train_{k}": v for k, v in train_terms.items()})
        row.update({f"dev_{k}": v for k, v in dev.items() if isinstance(v, (int, float))})
        st.history.append(row)
        terms = " ".join(f"{k} {v:.4f}" for k, v in train_terms.items() if k != "loss")
        log.info("epoch %d: train loss %.4f (%s) | dev %s%s", st.epoch + 1, train_terms.get("loss", float("nan")),
                 terms, " ".join(f"{k} {v:.4f}" for k, v in dev.items() if isinstance(v, float)),
                 " (best)" if improved else "")
        if self.tb:
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, st.epoch + 1)
            self.tb.flush()
        st.epoch += 1
        st.batch = 0
        if improved:
            st.best, st.best_epoch, st.bad_epochs = value, st.epoch - 1, 0
            self._save("best")
        else:
            st.bad_epochs += 1
        self._save("last")
        self._write_csv()

    def _write_csv(self) -> None:
        # Rewritten from the checkpointed history each epoch, so a resumed run's CSV has every epoch once.
        keys: list[str] = []
        for row in self.state.history:
            keys += [k for k in row if k not in keys]
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.state.history)

    def _finish(self) -> dict:
        best = self.run_dir / "checkpoints" / "best.pt"
        self.model.load_state_dict(load_checkpoint(best)["model"])
        results = {split: evaluate(self.model, self.loader(split), self.device, self.amp_dtype)
                   for split in ("dev", "test") if split in self.bundle.splits}
        (self.run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        save_pretrained(self.run_dir / "model", self.model, self.processor, self.cfg)
        if self.tb:
            self.tb.close()
        log.info("results (selected on dev %s, epoch %d):\n%s", self.metric, self.state.best_epoch + 1,
                 format_table(results))
        log.info("model saved to %s", self.run_dir / "model")
        return results
