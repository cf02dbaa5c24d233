"""Micro-batching: posts of concurrent requests share model calls, which run in one thread off the event loop.

That thread owns the model: predictions and explanations (:meth:`MicroBatcher.run_on_model_thread`) run on it one
after another, never at the same time, so an explanation's hooks (Captum adds forward hooks to the embedding
layer) never reach a prediction, and a prediction never runs inside an explanation's forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class MicroBatcher:
    """Queue items; a background task hands up to ``max_batch_size`` of them at a time to ``fn`` (in a thread).

    While the model is busy, new items wait and form the next batch, so under load batches grow by themselves;
    an idle model waits ``max_wait_ms`` after the first item for others to join. ``fn(items) -> results`` must
    return one result per item. A call that raises or returns another number of results is retried item by item,
    so one bad item fails only its own request; the batcher keeps serving whatever ``fn`` does.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32, max_wait_ms: float = 5.0):
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self._pending: deque[tuple[Any, asyncio.Future]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One worker: everything submitted here (batches, explanations) runs on the same thread, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsenti-model")
        self.batches = 0  # model calls so far (and their sizes, for the benchmark and tests)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.failed_calls = 0  # model calls that raised or returned the wrong number of results

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="mmsenti-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for _, fut in self._pending:
            if not fut.done():
                fut.set_exception(RuntimeError("the service is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False)

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Results of ``items``, in order (they may be spread over several model calls); the first item's error
        if any failed."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._wake.set()
        # Every future is awaited (no "exception never retrieved" for a second failed item), then the first error.
        results = await asyncio.gather(*futures, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    async def run_on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the model's thread, between two batches: work that runs the model outside the batcher
        (an explanation) so that nothing ever runs the model concurrently. Batches wait while it runs."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _call(self, items: list[Any]) -> list[Any]:
        """``fn(items)`` checked to give one result per item (in the model thread)."""
        results = list(self.fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(items)} posts")
        return results

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.max_wait and len(self._pending) < self.max_batch_size:
                await asyncio.sleep(self.max_wait)  # let concurrent requests join an idle model's batch
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch_size))]
            if not self._pending:
                self._wake.clear()
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # client went away
            if not batch:
                continue
            try:
                await self._serve(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a bug here must not stop the loop: fail this batch, go on
                log.exception("batcher error on a batch of %d", len(batch))
                _fail(batch, e)

    async def _serve(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self._call, items)
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests; the loop goes on
            self.failed_calls += 1
            if len(batch) == 1:
                log.error("model call failed for one post: %s: %s", type(e).__name__, e)
                _fail(batch, e)
                return
            # One bad post must not fail its batch-mates: retry each on its own.
            log.warning("model call failed for a batch of %d (%s: %s); retrying its posts one by one",
                        len(batch), type(e).__name__, e)
            for one in batch:
                await self._serve([one])
            return
        self.batches += 1
        self.batch_sizes.append(len(batch))
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)


def _fail(batch: list[tuple[Any, asyncio.Future]], error: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(error)
