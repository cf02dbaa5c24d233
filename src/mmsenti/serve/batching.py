"""Micro-batching: posts of concurrent requests share model calls, which run in one thread off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class MicroBatcher:
    """Queue items; a background task hands up to ``max_batch_size`` of them at a time to ``fn`` (in a thread).

    While the model is busy, new items wait and form the next batch, so under load batches grow by themselves;
    an idle model waits ``max_wait_ms`` after the first item for others to join. ``fn(items) -> results`` must
    return one result per item; if it raises, every item of that batch gets the exception.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32, max_wait_ms: float = 5.0):
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1000.0
        self._pending: deque[tuple[Any, asyncio.Future]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmsenti-model")
        self.batches = 0  # model calls so far (and their sizes, for the benchmark and tests)
        self.batch_sizes: deque[int] = deque(maxlen=1000)

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
        """Results of ``items``, in order (they may be spread over several model calls)."""
        if not self.running:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._wake.set()
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
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
                results = await loop.run_in_executor(self._executor, self.fn, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - reported to every waiting request, the loop goes on
                log.exception("model call failed for a batch of %d", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.batch_sizes.append(len(batch))
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
