"""The one trainer every model uses, on one process or several (``torchrun``, DistributedDataParallel).

Model selection and early stopping read the **dev** split only; the test split is scored once, at the end, with
the selected weights. ``last`` and ``best`` checkpoints are written atomically and hold everything a resumed
run needs to continue exactly where a killed one stopped, mid-epoch included: the order of every epoch's
batches is a function of (seed, epoch), and the RNG states (of every process) are restored, so a resumed run
ends with the same metrics as an uninterrupted one.

Structure: :func:`~mmsenti.train.workbench.build_workbench` builds data, processor and model (the path
``evaluate`` and ``cache`` share); :meth:`Trainer.prepare` adds the run directory, optimiser, schedule, checkpoint and the DDP
wrapper; :meth:`Trainer.fit` runs the loop. With several processes each takes its shard of every global batch
(:class:`~mmsenti.distributed.ShardedBatchSampler`), the losses share negatives through the gather hook, and rank
0 alone writes the run directory. The trainer talks to the unwrapped model (``self.model``) for losses,
``info`` and hooks; only the training forward goes through ``self.train_step`` (DDP when distributed).
"""

from __future__ import annotations

import contextlib
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
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmsenti.config import Config, config_from_json, resume_config, save_config
from mmsenti.distributed import (
    Distributed,
    ProcessGroupError,
    ShardedBatchSampler,
    is_process_failure,
    no_sync,
    shard_weight,
)
from mmsenti.errors import ConfigError, DataError, UserError
from mmsenti.losses import total_loss
from mmsenti.metrics import format_table, higher_is_better
from mmsenti.models.base import MultimodalModel
from mmsenti.models.folder import MODEL_SUBDIR, ModelFolder
from mmsenti.train.checkpoint import atomic_save, load_checkpoint
from mmsenti.train.lock import hold_run_dir
from mmsenti.train.optim import build_optimizer, build_scheduler
from mmsenti.train.sampler import EpochBatchSampler, build_batch_sampler, sample_lengths  # noqa: F401 (re-export)
from mmsenti.train.workbench import (  # noqa: F401 - re-exported: their home was this module
    ListDataset,
    Workbench,
    build_dataset,
    build_workbench,
    open_split_cache,
    select_metric,
)
from mmsenti.utils import (
    autocast,
    git_revision,
    move,
    rng_state,
    set_rng_state,
    setup_logging,
    show_progress,
)

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Raised by the test hook ``Trainer.interrupt_after_step`` to simulate a killed run."""


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (or next to start)
    batch: int = 0  # micro-batches of `epoch` already done
    step: int = 0  # optimiser steps so far
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    # Mid-epoch checkpoints: each process's sums of the epoch's loss terms so far ({"count", "sums"}), so that a
    # resumed epoch's mean train loss is over all its batches, as in the uninterrupted run.
    partial: list[dict] = field(default_factory=list)


class TrainStep(nn.Module):
    """``forward(batch) -> loss terms``: the model's forward and its loss in one module, the unit DDP wraps.

    The losses read parameters the forward does not (e.g. GAM's temperature) and run the cross-process gathers;
    inside DDP's forward they are part of the graph DDP tracks (unused-parameter detection sees them).
    """

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.model.compute_loss(self.model(batch), batch)


class Trainer:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from ``run_dir/checkpoints/last.pt``.

    Args:
        cfg: the run's config; with ``resume``, None (the run's own ``config.json``) or the config asked for, which
            may differ from the run's only in :data:`mmsenti.config.RESUME_OVERRIDES` (as may ``overrides``).
        dist: this process's place in the process group (default: a single process); see
            :meth:`mmsenti.distributed.Distributed.from_env`.
    """

    interrupt_after_step: int | None = None  # test hook: raise TrainingInterrupted after this optimiser step

    def __init__(self, cfg: Config | None, run_dir: str | Path, resume: bool = False, dist: Distributed | None = None,
                 overrides: list[str] | tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.dist = dist or Distributed()
        self.resume_changes: dict[str, tuple] = {}  # setting → (in the run, now): what this resume changed
        if resume:
            saved = self.run_dir / "config.json"
            if not saved.is_file():
                raise DataError(f"cannot resume: {saved} not found (was {self.run_dir} a training run?)")
            # A resumed run continues with the config it started with; `cfg` (--config) or `overrides` (--set) may
            # change only what cannot change the training (config.RESUME_OVERRIDES), else a ConfigError.
            cfg, self.resume_changes = resume_config(config_from_json(saved), cfg, overrides)
        elif cfg is None:
            raise ValueError("Trainer: a new run needs a config (or resume=True)")
        self.cfg: Config = cfg
        self.device = self.dist.device(cfg.run.device)
        self._prepared = False
        self._saved_step: int | None = None  # optimiser step of the last `last` checkpoint
        self._epoch_sums: dict[str, torch.Tensor] = {}  # the epoch in progress: its loss terms summed so far
        self._epoch_count = 0

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, dist: Distributed | None = None, config: Config | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> Trainer:
        """Continue the (killed) run in ``run_dir`` with the config it started with.

        Args:
            config, overrides: the command's ``--config`` (loaded with its ``--set``s) or its ``--set``s alone; they
                may differ from the run's config only in :data:`mmsenti.config.RESUME_OVERRIDES` (recorded in
                ``run_info.json`` and the log); any other difference is a :class:`ConfigError`.
        """
        return cls(config, run_dir, resume=True, dist=dist, overrides=overrides)

    # ------------------------------------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Everything :meth:`fit` needs: run directory, data, model, optimiser, schedule, checkpoint, DDP.

        Idempotent; :meth:`fit` calls it. Rank 0 alone creates and writes the run directory.
        """
        if self._prepared:
            return
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            setup_logging(logfile=self.run_dir / "train.log")
            if not self.resume:
                save_config(cfg, self.run_dir / "config.json")
                info = {"git_revision": git_revision(), "command": sys.argv, "python": platform.python_version(),
                        "torch": torch.__version__, "device": str(self.device), "world_size": dist.world_size,
                        "started": time.strftime("%F %T")}
                (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        else:
            setup_logging(logging.WARNING)  # one log: the other processes only report problems (to stderr)
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        if dist.enabled:
            log.info("distributed training: %d process%s (%s)", dist.world_size, "es" if dist.world_size > 1 else "",
                     self.device)

        if self.resume and cfg.data.root and not Path(cfg.data.root).expanduser().exists():
            raise DataError(f"cannot resume {self.run_dir}: its data.root {cfg.data.root} does not exist (moved, or the "
                            "run folder comes from another machine?); give the data's directory: the same command "
                            "plus --set data.root=DIR")
        proc_dir = self.run_dir / "processor"
        processor = None
        if self.resume and proc_dir.is_dir():
            from mmsenti.data.processing import Processor

            processor = Processor.load(proc_dir, cfg.model)  # cfg: what a run of an older mmsenti did not record
        self.bench: Workbench = build_workbench(cfg, dist=dist, processor=processor)
        if processor is None and dist.is_main:
            self.bench.processor.save(proc_dir)
            save_config(cfg, self.run_dir / "config.json")  # with what the model took from the data (adopt_data)
        self.bundle, self.processor, self.model = self.bench.bundle, self.bench.processor, self.bench.model
        if cfg.run.compile:
            from mmsenti.train.compile import compile_model

            compile_model(self.model)  # in place (state_dict keys unchanged); eager with a warning if unavailable
        self.info, self.metric, self.amp_dtype = self.bench.info, self.bench.metric, self.bench.amp_dtype
        log.info("device %s, %s", self.device,
                 f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp_dtype else "fp32")
        train = self.bundle.split("train")
        if not train:
            raise DataError(f"dataset '{self.bundle.name}': the train split is empty")
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model %s: %.2fM trainable parameters; data %s: %s", cfg.model.name, n_params / 1e6,
                 self.bundle.name, ", ".join(f"{k} {len(v)}" for k, v in self.bundle.splits.items()))

        first = self._train_sampler(0)
        if first.skipped:
            log.warning("%d global batch(es) per epoch hold fewer samples than the %d processes and are skipped",
                        first.skipped, dist.world_size)
        self.batches_per_epoch = len(first)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.optim.grad_accum)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.optim.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        if self.resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")
            if dist.is_main:
                self._record_resume()
        # After loading: every process starts from the same weights, and DDP's start-up broadcast agrees.
        self.train_step = dist.wrap(TrainStep(self.model), self.device, cfg.run.find_unused_parameters)
        self.tb = self._tensorboard() if dist.is_main else None
        self._prepared = True

    def _record_resume(self) -> None:
        """This resume (once it has loaded its checkpoint) in ``run_info.json`` (time, command, changed settings)
        and the log; config.json keeps the config the run started with."""
        for key, (was, now) in self.resume_changes.items():
            log.log(logging.WARNING if key == "data.missing_images" else logging.INFO,
                    "resuming with %s = %r (the run started with %r)%s", key, now, was,
                    ": posts whose images are missing are handled so from here on" if key == "data.missing_images"
                    else "")
        path = self.run_dir / "run_info.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        info.setdefault("resumes", []).append({
            "time": time.strftime("%F %T"), "command": sys.argv, "world_size": self.dist.world_size,
            "changes": {k: list(v) for k, v in self.resume_changes.items()}})
        path.write_text(json.dumps(info, indent=2) + "\n")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a core dependency, but a broken install must not stop training
            log.warning("tensorboard not importable; metrics go to metrics.csv only")
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def _train_sampler(self, epoch: int, start: int = 0) -> ShardedBatchSampler:
        """This process's shards of the global batches of ``epoch`` (shuffled by seed + epoch, length-bucketed
        with ``data.bucket_by_length``), from ``start``."""
        train, data = self.bundle.split("train"), self.cfg.data
        # tokenized once; every process computes the same lengths, hence batches
        lengths = self.bench.sample_lengths("train") if data.bucket_by_length else None
        global_batches = build_batch_sampler(len(train), data.batch_size, self.cfg.run.seed, epoch, 0, lengths,
                                             data.bucket_pool)
        return ShardedBatchSampler(global_batches, self.dist.rank, self.dist.world_size, start)

    def loader(self, split: str, epoch: int | None = None, start: int = 0) -> DataLoader:
        """Training batches for ``epoch`` (this process's shards, from batch ``start``) or, with epoch None, this
        process's share of the ordered evaluation batches."""
        if epoch is None:
            return self.bench.eval_loader(split)
        return self.bench.data_loader(split, self._train_sampler(epoch, start))

    def collate_fn(self, split: str, training: bool = True):
        return self.bench.collate_fn(split, training)

    @property
    def feature_cache(self) -> dict[str, object]:
        return self.bench.stores

    @property
    def use_cache(self) -> bool:
        return self.bench.feature_cache

    # ---------------------------------------------------------------------------------------- checkpoints
    def _save(self, name: str) -> None:
        """Every process calls this (the RNG states are gathered); rank 0 writes."""
        self.dist.average_norm_statistics(self.model)
        partial = ({"count": self._epoch_count, "sums": {k: float(v) for k, v in self._epoch_sums.items()}}
                   if self.state.batch else None)  # float(): the double sums exactly
        gathered = self.dist.all_gather_object((rng_state(), partial))
        rng = [g[0] for g in gathered]
        self.state.partial = [g[1] for g in gathered] if partial is not None else []
        if self.dist.is_main:
            atomic_save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "state": self.state.__dict__, "rng": rng, "config": self.cfg.to_dict(),
            }, self.run_dir / "checkpoints" / f"{name}.pt", checksum=True)
        if name == "last":
            self._saved_step = self.state.step

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        self._saved_step = self.state.step
        rng = ckpt["rng"]
        rng = [rng] if isinstance(rng, dict) else rng  # one state per process (older checkpoints: one)
        if len(rng) != self.dist.world_size:
            log.warning("the checkpoint was written by %d process(es), resuming with %d: training continues, "
                        "but not bit for bit as the uninterrupted run", len(rng), self.dist.world_size)
        set_rng_state(rng[min(self.dist.rank, len(rng) - 1)])
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.state.epoch + 1, self.state.batch,
                 self.state.step)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train, select on dev, score the selected model on dev and test; returns ``metrics.json``'s content.

        The run directory is locked for the whole run by rank 0 (one writer per run, :mod:`mmsenti.train.lock`),
        and an error that stops the run is written to its ``train.log`` too, so the folder keeps the evidence.

        Raises:
            ProcessGroupError: (several processes) another process died, failed or this one was stopped; the
                message names the other's error, or the last checkpoint and how to continue.
        """
        with contextlib.ExitStack() as stack:
            self._lock_run_dir(stack)
            try:
                self.prepare()
                return self._fit()
            except BaseException as e:
                if self.dist.enabled and is_process_failure(e):
                    where = (f"the last checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'} "
                             f"(step {self._saved_step})" if self._saved_step is not None
                             else "no checkpoint was written yet")
                    msg = self.dist.failure_message(e, where)
                    log.error(msg, extra={"file_only": True})
                    raise ProcessGroupError(msg) from None
                if isinstance(e, Exception):
                    self.dist.report_error(e)  # the other processes say that this one failed, and why
                    # The CLI prints a user's error as one line on stderr; the log file gets it once as well.
                    one_line = isinstance(e, UserError)
                    log.error("run stopped: %s", e if one_line else f"{type(e).__name__}: {e}",
                              exc_info=None if one_line else e, extra={"file_only": True})
                raise

    def _lock_run_dir(self, stack: contextlib.ExitStack) -> None:
        """Rank 0 takes the run-directory lock; with several processes all of them stop if it cannot."""
        error = None
        if self.dist.is_main:
            try:
                stack.enter_context(hold_run_dir(self.run_dir))
            except DataError as e:  # RunDirLocked: a live run holds the folder
                error = e
        if self.dist.enabled:
            error = self.dist.broadcast_object(error)
        if error is not None:
            raise error

    def _fit(self) -> dict:
        cfg, st = self.cfg, self.state
        t0 = time.time()
        while st.epoch < cfg.optim.epochs:
            if st.batch == 0:  # mid-epoch resume: the state the hook built is in the checkpoint already
                self._hook("on_train_epoch_start")
            train_terms = self._train_epoch()
            self.dist.average_norm_statistics(self.model)  # every process evaluates (and encodes) with one model
            self._hook("on_train_epoch_end")
            dev = self.bench.evaluate("dev")
            self._end_epoch(train_terms, dev)
            if cfg.run.patience and st.bad_epochs >= cfg.run.patience:
                log.info("early stop: no dev %s improvement for %d epochs", self.metric, st.bad_epochs)
                break
        log.info("training took %.1fs; best dev %s %.4f at epoch %d", time.time() - t0, self.metric,
                 st.best if st.best is not None else float("nan"), st.best_epoch + 1)
        return self._finish()

    def _hook(self, name: str) -> None:
        """Let a model refresh state from the training data or follow the optimiser.

        ``model.on_train_epoch_start(trainer)`` runs before each epoch, ``on_train_epoch_end(trainer)`` after it,
        before dev evaluation (so selection and the saved model see the state matching the weights), and
        ``on_optimizer_step(trainer)`` after every optimiser step (e.g. INFIG's momentum encoders). State the hooks
        build must live in the model's state_dict, so checkpoints and saved models carry it. With several
        processes every process runs every hook (``trainer.dist`` gathers what they build).
        """
        fn = getattr(self.model, name, None)
        if fn is not None:
            fn(self)

    def _train_epoch(self) -> dict[str, float]:
        cfg, st, world = self.cfg, self.state, self.dist.world_size
        accum = cfg.optim.grad_accum
        n = self.batches_per_epoch
        self.model.train()
        # On the device: no host sync per batch (read at the epoch's end, or by a mid-epoch checkpoint).
        sums: dict[str, torch.Tensor] = {}
        count = 0
        if st.batch:  # resumed mid-epoch: the sums of the batches before the checkpoint
            mine = st.partial[self.dist.rank] if len(st.partial) == world else None
            if mine is None:
                log.warning("the checkpoint holds no partial sums of epoch %d's loss for %d process(es): its train "
                            "loss in metrics.csv is the mean over the batches after the resume", st.epoch + 1, world)
            else:
                count = int(mine["count"])
                sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in mine["sums"].items()}
        self._epoch_sums, self._epoch_count = sums, count
        bar = tqdm(total=n, initial=st.batch, desc=f"epoch {st.epoch + 1}/{cfg.optim.epochs}", leave=False,
                   disable=not (self.dist.is_main and show_progress(cfg.run.quiet)), dynamic_ncols=True)
        loader = self.loader("train", st.epoch, st.batch)
        global_sizes = loader.batch_sampler.global_sizes
        for j, batch in enumerate(loader):
            i = st.batch
            group = min(accum, n - (i // accum) * accum)  # the last accumulation group may be short
            last_in_group = (i + 1) % accum == 0 or i + 1 == n
            # Each process's share of the global batch: DDP averages gradients over processes, so the average is
            # the global batch's gradient also when the shards differ in size.
            weight = shard_weight(len(batch["ids"]), global_sizes[j], world)
            batch = move(batch, self.device)
            with no_sync(self.train_step, skip=not last_in_group):  # all-reduce once per optimiser step
                with autocast(self.device, self.amp_dtype):
                    terms = self.train_step(batch)
                    loss = total_loss(terms)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at epoch {st.epoch + 1}, batch {i}: "
                                             + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
                scaled = loss * weight / group if world > 1 else loss / group
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if count == 0 and self.dist.enabled and not cfg.run.find_unused_parameters:
                self._check_all_parameters_trained()
            for k, v in (*terms.items(), ("loss", loss)):
                v = v.detach().double()
                sums[k] = sums[k] + v if k in sums else v
            count += 1
            self._epoch_count = count
            st.batch += 1
            bar.update(1)
            if last_in_group:
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
        self._epoch_sums, self._epoch_count = {}, 0
        # The epoch's mean terms over all processes (each process's mean over its micro-batches).
        return self.dist.mean({k: float(v) / max(1, count) for k, v in sums.items()})

    def _check_all_parameters_trained(self) -> None:
        # Without unused-parameter detection DDP waits forever for a gradient that never comes: say so at once.
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise ConfigError(f"run.find_unused_parameters: {len(unused)} trainable parameter(s) get no gradient in "
                              f"training ({', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}); "
                              "set --set run.find_unused_parameters=true to train with several processes")

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
        self._hook("on_optimizer_step")

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
        if self.dist.is_main:
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
        self.dist.barrier()  # rank 0 has written best.pt
        best = self.run_dir / "checkpoints" / "best.pt"
        self.model.load_state_dict(load_checkpoint(best)["model"])
        # Saved before scoring: should scoring fail (an image that only fails to decode), the model is kept and
        # `mmsenti evaluate RUN_DIR` can score it once the data is fixed.
        if self.dist.is_main:
            ModelFolder.save(self.run_dir / MODEL_SUBDIR, self.model, self.processor, self.cfg)
        # Per-post predictions of the selected model: what paired significance tests (mmsenti experiment) need.
        results = {split: self.bench.evaluate(split, save_predictions=self.run_dir / "predictions" / f"{split}.npz")
                   for split in ("dev", "test") if split in self.bundle.splits}
        if self.dist.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
            log.info("results (selected on dev %s, epoch %d):\n%s", self.metric, self.state.best_epoch + 1,
                     format_table(results))
            log.info("model saved to %s", self.run_dir / MODEL_SUBDIR)
        if self.tb:
            self.tb.close()
        self.dist.barrier()  # the saved model is complete before any process returns
        return results
