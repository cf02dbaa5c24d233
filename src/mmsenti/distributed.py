"""Process-group concerns of multi-process training, in one place: who am I, the gather contract, sharding.

mmsenti trains on PyTorch's own engine: ``torchrun`` starts the processes and ``torch.distributed`` connects them
(NCCL between GPUs, gloo on CPU). Everything a process needs to know about the others goes through a
:class:`Distributed` object, which the trainer creates once and passes on (to the losses as a gather hook, to the
evaluation and the memory bank as object gathers); nothing here is looked up globally. A single process uses
``Distributed()`` (rank 0 of 1), for which every method is a cheap identity.

**The gather contract** (:data:`GatherFn`), used by every loss that contrasts against other samples::

    x_all, offset = gather(x)    # x: (n, ...) this process's rows

``x_all`` holds every process's rows in **rank order** (rank 0's first), so the concatenation is exactly the global
batch one process would have seen, and this process's rows are ``x_all[offset : offset + n]``: positives of local
anchor ``i`` sit at ``offset + i``. Processes may hold different numbers of rows, and trailing dimensions may
differ (e.g. text lengths): they are zero-padded to the largest (pad a mask with it and the padding is masked
out). Floating-point tensors are gathered differentiably: the backward pass sums every process's gradient for a
row and returns it to the process that owns the row, so a loss over gathered features trains every process's
encoder as one process with the global batch would. Rank order (rather than "this rank's rows first") is what
keeps MoCo-style queues identical on every process and equal to a single process's.

**Every process runs the same collectives in the same order**, whatever its shard holds (no anchor, no positive,
a missing modality): a loss that gathers may not return early on some processes. A gathered floating-point tensor
must be part of every process's loss graph, because its backward pass is itself a collective (an all-reduce or
reduce-scatter) that every process has to join; mask what this process does not use instead of skipping it.

**Global batches and shards**: a batch sampler yields *global* batches (lists of dataset indices, a function of
(seed, epoch)); :class:`ShardedBatchSampler` gives each process its disjoint, contiguous slice of each, so the
gathered features of a step are the global batch in its original order.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from mmsenti.errors import ProcessGroupError
from mmsenti.utils import resolve_device

log = logging.getLogger(__name__)

GatherFn = Callable[[Tensor], tuple[Tensor, int]]
"""``gather(x) -> (x of all processes in rank order, offset of this process's rows)``; see the module docstring."""

# Long enough for rank 0 to build a feature cache while the others wait at a barrier.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)
ENV_TIMEOUT = "MMSENTI_DIST_TIMEOUT"  # seconds, overrides DEFAULT_TIMEOUT


class Terminated(BaseException):
    """SIGTERM while in a process group (torchrun stops the survivors this way when one process fails)."""


# Profiler ranges (benchmarks/ddp.py reads them): the loss gathers' forward and backward communication.
PROFILE_GATHER, PROFILE_GATHER_BACKWARD = "mmsenti.all_gather", "mmsenti.all_gather.backward"

# Process-group store key under which a process that stops on an error of its own leaves that error for the others.
ERROR_KEY = "mmsenti/error/rank{}"


# ------------------------------------------------------------------------------------------ differentiable gather
class _AllGather(torch.autograd.Function):
    """(W, *shape) stack of every rank's equally shaped tensor; backward sums the gradients over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world_size)]
        tdist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    @torch.profiler.record_function(PROFILE_GATHER_BACKWARD)
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if grad.is_cuda:  # NCCL: a reduce-scatter moves 1/W of the data of an all-reduce
            out = torch.empty_like(grad[ctx.rank])
            tdist.reduce_scatter_tensor(out, grad)
        else:  # gloo has no reduce-scatter
            tdist.all_reduce(grad)
            out = grad[ctx.rank]
        return out, None, None


class Distributed:
    """This process's place in the process group, and the collectives mmsenti needs.

    ``Distributed()`` is a single process; :meth:`from_env` joins the group ``torchrun`` describes.

    Attributes:
        rank: global rank (0 … world_size − 1).
        world_size: number of processes.
        local_rank: rank on this machine (the GPU index under torchrun).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, group: bool | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        # In a process group: several processes, or one started by torchrun (then DDP and the collectives run on a
        # single process too, e.g. to check NCCL on one GPU).
        self.group = world_size > 1 if group is None else group

    def __repr__(self) -> str:
        return (f"Distributed(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"group={self.group})")

    # --------------------------------------------------------------------------------------------- set-up
    @classmethod
    def from_env(cls) -> Distributed:
        """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
        ``MASTER_ADDR``/``MASTER_PORT``); a single process when ``WORLD_SIZE`` is unset or 1.

        CPU tensors communicate over gloo and CUDA tensors over NCCL (both are set up when CUDA is available;
        each process then uses GPU ``LOCAL_RANK``). SIGTERM, which torchrun sends to the survivors when one
        process fails, raises :class:`Terminated` so the trainer can say how to resume.
        """
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:  # not started by torchrun
            return cls()
        world_size = int(os.environ["WORLD_SIZE"])
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not tdist.is_initialized():
            backend = "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)
                backend = "cpu:gloo,cuda:nccl"
            timeout = datetime.timedelta(seconds=float(os.environ[ENV_TIMEOUT])) if os.environ.get(ENV_TIMEOUT) \
                else DEFAULT_TIMEOUT
            tdist.init_process_group(backend, timeout=timeout)
        signal.signal(signal.SIGTERM, _raise_terminated)
        return cls(rank, world_size, local_rank, group=True)

    @classmethod
    def from_group(cls) -> Distributed:
        """The already initialised default process group (tests, notebooks, other launchers)."""
        if not tdist.is_initialized():
            return cls()
        return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", tdist.get_rank())),
                   group=True)

    def close(self, clean: bool = True) -> None:
        """Leave the process group (a no-op for a single process).

        Args:
            clean: every process got here normally. After a failure (another process died) nothing is waited
                for: the process is about to exit with an error anyway.
        """
        if not (self.enabled and clean and tdist.is_initialized()):
            return
        tdist.barrier()
        # gloo's worker threads free each finished collective, which can need the GIL; the group's destructor joins
        # them while holding it. Let them finish first (a deadlock at exit otherwise, seen under load).
        time.sleep(0.2)
        tdist.destroy_process_group()

    @property
    def enabled(self) -> bool:
        """In a process group (more than one process, or one under torchrun): collectives and DDP run."""
        return self.group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints, metrics and the saved model."""
        return self.rank == 0

    def device(self, name: str = "auto") -> torch.device:
        """``run.device`` resolved for this process (:func:`~mmsenti.utils.resolve_device`), where ``auto``/``cuda``
        mean this process's GPU under torchrun."""
        dev = resolve_device(name)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
        return dev

    # --------------------------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_gather(self, x: Tensor) -> tuple[Tensor, int]:
        """The gather contract (:data:`GatherFn`): every process's rows in rank order, and this one's offset.

        Differentiable for floating-point tensors; rows and trailing dimensions may differ between processes
        (zero-padded to the largest trailing sizes; every process's true row count is kept).
        """
        if not self.enabled:
            return x, 0
        with torch.profiler.record_function(PROFILE_GATHER):
            return self._all_gather(x)

    def _all_gather(self, x: Tensor) -> tuple[Tensor, int]:
        shapes = self._shapes(x)
        rows = [s[0] for s in shapes]
        # Pad every dimension to the largest size over processes (dim 0 only for transport: cut off again below).
        pad: list[int] = []
        for d in reversed(range(x.ndim)):
            pad += [0, max(s[d] for s in shapes) - x.shape[d]]
        # bool travels as uint8: padding and not every backend support it.
        wire = x.to(torch.uint8) if x.dtype == torch.bool else x
        if any(pad):
            wire = nn.functional.pad(wire, pad)
        if x.is_floating_point():
            stacked = _AllGather.apply(wire, self.rank, self.world_size)
        else:  # ids, labels, masks: no gradient
            parts = [torch.empty_like(wire) for _ in range(self.world_size)]
            tdist.all_gather(parts, wire.contiguous())
            stacked = torch.stack(parts).to(x.dtype)
        out = torch.cat([stacked[r, : rows[r]] for r in range(self.world_size)])
        return out, sum(rows[: self.rank])

    def _shapes(self, x: Tensor) -> list[list[int]]:
        shape = torch.tensor([x.shape[0], *x.shape[1:]], dtype=torch.long, device=x.device)
        parts = [torch.empty_like(shape) for _ in range(self.world_size)]
        tdist.all_gather(parts, shape)
        shapes = [p.tolist() for p in parts]
        if any(len(s) != len(shapes[0]) for s in shapes):
            raise ValueError(f"all_gather: tensors of different ranks on different processes: {shapes}")
        return shapes

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` (any picklable object)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every process (others pass anything, e.g. None)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over processes (same keys on every process)."""
        if not self.enabled or not values:
            return dict(values)
        keys = list(values)  # the same insertion order on every process (the same code built the dict)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        tdist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def gather_interleaved(self, items: Sequence[Any]) -> list[Any]:
        """Undo :func:`round_robin`: every process's items back in their global order (item j of rank r is
        global item ``r + j·world_size``), on every process."""
        if not self.enabled:
            return list(items)
        per_rank = self.all_gather_object(list(items))
        out = []
        for j in range(max(len(p) for p in per_rank)):
            out += [p[j] for p in per_rank if j < len(p)]
        return out

    def average_norm_statistics(self, model: nn.Module) -> None:
        """Average BatchNorm running statistics over processes (timm's ``distribute_bn``).

        DDP runs here with ``broadcast_buffers=False`` so that GAM's feature queues are never overwritten; batch
        norm then updates its running mean/variance from each process's own batches, and they drift apart. The
        trainer averages them before evaluating and before saving, so every process evaluates the same model.
        """
        if not self.enabled:
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
                for buf in (m.running_mean, m.running_var):
                    tdist.all_reduce(buf)
                    buf.div_(self.world_size)

    # ------------------------------------------------------------------------------------------- failures
    def report_error(self, e: BaseException) -> None:
        """This process stops on an error of its own (not a lost peer): leave it where the others and the launcher
        find it. The others only see this process vanish; they read the error from the process group's store
        (:meth:`failure_message`), and torchrun's failure summary from its error file (``TORCHELASTIC_ERROR_FILE``).
        Call it from the ``except`` block that handles ``e``.
        """
        if not self.enabled or is_process_failure(e):
            return
        with contextlib.suppress(Exception):  # best effort: the process is stopping anyway
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            _store().set(ERROR_KEY.format(self.rank), f"{type(e).__name__}: {first_line}")
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(e)

    def peer_error(self) -> tuple[int, str] | None:
        """``(rank, error)`` that another process left with :meth:`report_error` before it stopped; None when the
        others were lost without one (killed, out of memory, a lost machine, a crash in native code) or when the
        store went with them."""
        if not self.enabled:
            return None
        try:
            store = _store()
            for r in range(self.world_size):
                if r != self.rank and store.check([ERROR_KEY.format(r)]):
                    return r, store.get(ERROR_KEY.format(r)).decode()
        except Exception:  # the store lived in a process that is gone
            return None
        return None

    def failure_message(self, e: BaseException, checkpoint: str) -> str:
        """What a process says when it lost the others (``is_process_failure(e)``), one line.

        Another process stopped on an error of its own: that error, and no advice to resume (a resumed run would
        meet it again). Otherwise (a process was killed or its machine lost): resume from ``checkpoint`` (a
        description of the last checkpoint).
        """
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:
            # torchrun stops the survivors with SIGTERM: it must not interrupt the writing of this message.
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
        who = f"rank {self.rank} of {self.world_size}"
        peer = self.peer_error()
        if peer is not None:
            rank, error = peer
            return (f"{who}: stopped because rank {rank} raised an error (not a lost process): {error}; resuming "
                    f"would meet it again, fix its cause first (rank {rank}'s traceback is in its output)")
        return (f"{who}: lost the other training processes ({describe_failure(e)}); {checkpoint}: "
                "continue with the same command plus --resume")

    # ------------------------------------------------------------------------------------------- wrapping
    def wrap(self, module: nn.Module, device: torch.device, find_unused_parameters: bool = True) -> nn.Module:
        """``module`` in DistributedDataParallel (itself for a single process).

        Buffers are not broadcast from rank 0 at every forward: GAM's queues are kept identical by every process
        enqueuing the same gathered keys, and batch-norm statistics are averaged at evaluation and checkpoints
        (:meth:`average_norm_statistics`).
        """
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        params = inspect.signature(DDP.__init__).parameters
        no_broadcast = {"forward_sync_buffers": False} if "forward_sync_buffers" in params \
            else {"broadcast_buffers": False}
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters, **no_broadcast)


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``mmsenti train --nproc N``: run ``python -m mmsenti ARGV`` in ``nproc`` processes on this machine with
    torchrun's own launcher (``torchrun --standalone --nproc-per-node N -m mmsenti ARGV``).

    Returns 0 when every process succeeded.

    Raises:
        ProcessGroupError: (exit code 1 on the command line) which process failed and how: the error it stopped on
            (see :meth:`Distributed.report_error`), or the signal or exit code of a process that left none.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "mmsenti", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        # The first process that left its error (the others then failed because they lost it), else the first.
        reported = {r: f for r, f in e.failures.items() if isinstance(f.message, dict)}
        rank = min(reported, key=lambda r: (reported[r].timestamp, r)) if reported else e.get_first_failure()[0]
        failure = e.failures[rank]
        if rank in reported:
            how = f"with an error: {failure.message.get('message', '?')}"
        else:
            how = f"(signal {failure.signal_name()})" if failure.exitcode < 0 else f"(exit code {failure.exitcode})"
        raise ProcessGroupError(f"training process {rank} of {nproc} failed {how}; the others were stopped") from None
    return 0


def _raise_terminated(signum, frame) -> None:
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def _store() -> tdist.Store:
    """The default process group's key-value store (torchrun's agent holds it, so it outlives a failed worker)."""
    return tdist.distributed_c10d._get_default_store()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def attach_gather(model: nn.Module, gather: GatherFn | None) -> int:
    """Give every loss module of ``model`` that shares negatives across processes (it has a ``gather``
    attribute: GAM, HFAM, the retrieval SupCon loss) the gather hook; returns how many took it."""
    n = 0
    for m in model.modules():
        if "gather" in vars(m):  # an instance attribute, as the losses set it; not a method of some module
            m.gather = gather
            n += 1
    return n


def is_process_failure(e: BaseException) -> bool:
    """An error that means another process is gone (its sockets closed, a collective failed or timed out)."""
    if isinstance(e, (Terminated, ProcessGroupError)):
        return True
    dist_error = getattr(tdist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "Socket Timeout"))


def describe_failure(e: BaseException) -> str:
    """One short line for a process failure (gloo's messages start with a source location and run on)."""
    if isinstance(e, Terminated):
        return f"{e}: the launcher stops the other processes when one fails"
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:537] Read error ..."
    return text.split(". ")[0][:160]


# ------------------------------------------------------------------------------------------------- sharding
def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous slice of a global batch of n: ``[r·n // W, (r+1)·n // W)``.

    Slices are disjoint, cover the batch, keep its order (so gathering in rank order restores it) and differ in
    size by at most one when n is not a multiple of W.
    """
    n = len(batch)
    return list(batch[rank * n // world_size: (rank + 1) * n // world_size])


def shard_weight(n_local: int, n_global: int, world_size: int) -> float:
    """The factor on a process's loss (a mean over its ``n_local`` samples) that makes DDP's average over processes
    the loss of the global batch of ``n_global``: its share of the samples times the number of processes (1 for
    even shards)."""
    return n_local * world_size / n_global


def round_robin(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items ``rank, rank + W, rank + 2W, ...``: how evaluation batches are spread (see ``gather_interleaved``)."""
    return list(items[rank::world_size])


class ShardedBatchSampler:
    """This process's share of every global batch of ``sampler`` (any iterable of index lists, e.g. a batch
    sampler whose order is a function of (seed, epoch)), starting at (kept) global batch ``start``.

    Each global batch is split by :func:`shard`. Uneven splits are weighted by the trainer (each process's loss
    times its share of the samples, :func:`shard_weight`), so the averaged gradient is the global batch's. A global batch with fewer
    samples than processes is **skipped** on every process: a process with no sample cannot take part in the
    step, and padding it with a duplicate would change the gradient and the contrastive negatives. Skipped
    batches are counted in ``skipped`` (and do not count towards ``start``).

    With one process this is the global sampler itself.
    """

    def __init__(self, sampler: Iterable[Sequence[int]], rank: int = 0, world_size: int = 1, start: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        batches = [list(b) for b in sampler]
        self.batches = [b for b in batches if len(b) >= world_size]
        self.skipped = len(batches) - len(self.batches)
        self.rank, self.world_size, self.start = rank, world_size, start

    @property
    def global_sizes(self) -> list[int]:
        """Sizes of the global batches this sampler still yields shares of, in order."""
        return [len(b) for b in self.batches[self.start:]]

    def __iter__(self):
        for b in self.batches[self.start:]:
            yield shard(b, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)


@contextlib.contextmanager
def no_sync(module: nn.Module, skip: bool):
    """DDP's ``no_sync()`` (gradients accumulate locally, no all-reduce) when ``skip`` and ``module`` is DDP."""
    if skip and isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    else:
        yield
