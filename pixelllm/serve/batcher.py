"""Dynamic batching: requests of the same task gathered into one call of the model.

    batcher = Batcher(run, max_batch=8, max_wait_s=0.005, max_queue=32, metrics=metrics)
    await batcher.start()
    with batcher.admission():                      # QueueFull when max_queue requests are in
        answer = await batcher.submit("caption", payload)

``run(task, payloads)`` runs in one worker thread, one batch at a time (the model is neither
thread-safe nor faster with two batches fighting for the same cores), and returns one answer per
payload; an answer that is an exception is raised to that request alone, an exception out of
``run`` is raised to every request of the batch as ``BatchFailed``. A batch closes when it holds
``max_batch`` requests or its oldest request has waited ``max_wait_s``; while one batch runs, the
next one fills. Cancelling the task that awaits ``submit`` (a timeout, a client gone) abandons the
request: a queued one is dropped before it runs, a running one's answer is thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pixelllm.serve.metrics import Metrics

log = logging.getLogger("pixelllm.serve")


class QueueFull(Exception):
    """``max_queue`` requests are already admitted; ``retry_after`` estimates seconds until a place frees."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


class BatchFailed(Exception):
    """The batch a request was in raised an exception (a fault of the program, not of the request)."""


@dataclass(eq=False)
class _Job:
    task: str
    payload: Any
    future: asyncio.Future
    arrived: float


class Batcher:
    def __init__(self, run: Callable[[str, list], list], *, max_batch: int, max_wait_s: float, max_queue: int,
                 metrics: Metrics):
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queues: dict[str, deque[_Job]] = {}
        self._admitted = 0
        self._arrived = asyncio.Event()
        self._batch_seconds: deque[float] = deque(maxlen=32)
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pixelllm-batch")
        self._scheduler = asyncio.create_task(self._schedule(), name="pixelllm-batcher")

    async def stop(self) -> None:
        self._scheduler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._scheduler
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """A place in the queue for the duration of the block, or ``QueueFull``."""
        if self._admitted >= self.max_queue:
            raise QueueFull(self.retry_after())
        self._admitted += 1
        self.metrics.queue_depth.set(self._admitted)
        try:
            yield
        finally:
            self._admitted -= 1
            self.metrics.queue_depth.set(self._admitted)

    def retry_after(self) -> int:
        """Whole seconds for the admitted requests to drain at the recent pace of batches (at least 1)."""
        per_batch = sum(self._batch_seconds) / len(self._batch_seconds) if self._batch_seconds else 1.0
        return max(1, math.ceil(self._admitted / self.max_batch * per_batch))

    async def submit(self, task: str, payload: Any) -> Any:
        """Queue ``payload`` for ``task`` and wait for its answer."""
        loop = asyncio.get_running_loop()
        job = _Job(task, payload, loop.create_future(), loop.time())
        self._queues.setdefault(task, deque()).append(job)
        self._arrived.set()
        return await job.future

    # -- the scheduler -------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            task = await self._oldest_task()
            await self._fill(task)
            jobs = self._take(task)
            if jobs:
                await self._execute(task, jobs)

    async def _oldest_task(self) -> str:
        """The task whose oldest live request arrived first (waits for one)."""
        while True:
            waiting = [(self._live(task)[0].arrived, task) for task in self._queues if self._live(task)]
            if waiting:
                return min(waiting)[1]
            self._arrived.clear()
            await self._arrived.wait()

    async def _fill(self, task: str) -> None:
        """Wait until ``task`` has ``max_batch`` live requests or its oldest has waited ``max_wait_s``."""
        loop = asyncio.get_running_loop()
        queue = self._live(task)
        closes = queue[0].arrived + self.max_wait_s if queue else loop.time()
        while len(self._live(task)) < self.max_batch and (left := closes - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _live(self, task: str) -> deque[_Job]:
        """``task``'s queue without the requests abandoned while waiting."""
        queue = self._queues[task]
        if any(job.future.done() for job in queue):
            queue = self._queues[task] = deque(job for job in queue if not job.future.done())
        return queue

    def _take(self, task: str) -> list[_Job]:
        queue = self._live(task)
        return [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]

    async def _execute(self, task: str, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.batch_size.labels(task).observe(len(jobs))
        started = loop.time()
        try:
            answers = await loop.run_in_executor(self._executor, self.run, task, [job.payload for job in jobs])
            if len(answers) != len(jobs):
                raise RuntimeError(f"{len(answers)} answers to a batch of {len(jobs)}")
        except Exception as exc:
            log.exception("a batch of %d %s request(s) failed", len(jobs), task)
            answers = [BatchFailed(f"the batch failed: {type(exc).__name__}: {exc}") for _ in jobs]
        self._batch_seconds.append(loop.time() - started)
        self.metrics.batch_seconds.labels(task).observe(self._batch_seconds[-1])
        for job, answer in zip(jobs, answers, strict=True):
            if job.future.done():  # abandoned while its batch ran
                continue
            if isinstance(answer, Exception):
                job.future.set_exception(answer)
            else:
                job.future.set_result(answer)
