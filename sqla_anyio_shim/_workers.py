"""The worker threads that run SQLAlchemy's synchronous code.

A worker is a plain :class:`threading.Thread` that waits on its own lock for
a job, runs it, and goes back to the idle stack.  Why not
``concurrent.futures`` or ``anyio.to_thread``: the bridge needs to hand a job
to a *specific* thread and wake it with the cheapest primitive CPython has (a
bare ``threading.Lock`` release), and it needs the worker to mark itself idle
*before* it delivers its last message, so that the next ``greenlet_spawn()``
of the same task, which usually follows at once, finds this warm thread
instead of starting a new one (the same trick as trio's ``_threads.py``).

Idle workers are kept on a LIFO stack (the most recently used thread has the
warmest caches) and retire after ``idle_timeout`` seconds, as in anyio's
worker pool.

The number of workers is not capped by default, on purpose: a call that is
parked in ``await_()`` keeps its thread, exactly as a greenlet keeps its
stack, and a cap lower than the number of calls that wait on each other
(sessions queueing for a pool connection that another session will only
return through another call) could deadlock.  ``max_workers`` exists for
users who know their concurrency; calls beyond it wait, without blocking the
event loop, for a worker to come free.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Deque, List, Optional

__all__ = ["WorkerPool", "pool"]


class _Worker:
    __slots__ = ("_pool", "_wake", "_job", "thread", "__weakref__")

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        # a lock used as a binary semaphore: released by whoever hands us a
        # job, acquired by the worker to wait for one
        self._wake = threading.Lock()
        self._wake.acquire()
        self._job: Optional[Callable[[], None]] = None
        self.thread = threading.Thread(
            target=self._run, name="sqla-anyio-shim-worker", daemon=True
        )

    def submit(self, job: Callable[[], None]) -> None:
        self._job = job
        self._wake.release()

    def _run(self) -> None:
        pool = self._pool
        wake = self._wake
        while True:
            if not wake.acquire(timeout=pool.idle_timeout):
                if pool._retire(self):
                    return
                # somebody took us off the idle stack at the same moment and
                # is about to hand us a job: wait for it
                wake.acquire()
            job = self._job
            self._job = None
            if job is None:  # shutdown request
                return
            job()
            # release our reference before idling so that nothing the job
            # referenced outlives it (checked by a weakref test)
            del job


class WorkerPool:
    """A LIFO pool of worker threads with idle retirement."""

    def __init__(
        self,
        *,
        max_workers: Optional[int] = None,
        idle_timeout: float = 10.0,
        max_idle_workers: Optional[int] = None,
    ) -> None:
        self._lock = threading.Lock()
        self._idle: List[_Worker] = []
        self._all: "set[_Worker]" = set()
        # callables waking calls that wait for a worker (max_workers reached)
        self._waiters: Deque[Callable[[], None]] = deque()
        self.configure(
            max_workers=max_workers,
            idle_timeout=idle_timeout,
            max_idle_workers=max_idle_workers,
        )

    def configure(
        self,
        *,
        max_workers: Optional[int],
        idle_timeout: float,
        max_idle_workers: Optional[int],
    ) -> None:
        if max_workers is not None and (
            not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"max_workers must be a positive integer or None, "
                f"got {max_workers!r}"
            )
        if not isinstance(idle_timeout, (int, float)) or idle_timeout <= 0:
            raise ValueError(
                f"idle_timeout must be a positive number of seconds, "
                f"got {idle_timeout!r}"
            )
        if max_idle_workers is not None and (
            not isinstance(max_idle_workers, int) or max_idle_workers < 0
        ):
            raise ValueError(
                f"max_idle_workers must be a non-negative integer or None, "
                f"got {max_idle_workers!r}"
            )
        self.max_workers = max_workers
        self.idle_timeout = float(idle_timeout)
        self.max_idle_workers = max_idle_workers

    # -- introspection (used by tests and the benchmark runner) ------------

    @property
    def total(self) -> int:
        return len(self._all)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._all) - len(self._idle)

    # -- acquiring and releasing -------------------------------------------

    def try_acquire(self) -> Optional[_Worker]:
        """Return an idle or new worker, or None if max_workers is reached."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self.max_workers is not None and len(self._all) >= (
                self.max_workers
            ):
                return None
            worker = _Worker(self)
            self._all.add(worker)
        worker.thread.start()
        return worker

    def add_waiter(self, wake: Callable[[], None]) -> Optional[_Worker]:
        """Register ``wake`` to be called when a worker comes free, unless
        one is free already, in which case it is returned."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self.max_workers is None or len(self._all) < self.max_workers:
                worker = _Worker(self)
                self._all.add(worker)
            else:
                self._waiters.append(wake)
                return None
        worker.thread.start()
        return worker

    def remove_waiter(self, wake: Callable[[], None]) -> None:
        with self._lock:
            try:
                self._waiters.remove(wake)
            except ValueError:
                # already woken: pass the wake-up on, so that it is not lost
                self._wake_next_locked()

    def release(self, worker: _Worker) -> None:
        """Called by the worker itself when its job is finished."""
        with self._lock:
            if (
                self.max_idle_workers is not None
                and len(self._idle) >= self.max_idle_workers
            ):
                self._all.discard(worker)
                worker._job = None
                worker._wake.release()  # the None job ends the thread
            else:
                self._idle.append(worker)
            self._wake_next_locked()

    def _wake_next_locked(self) -> None:
        if self._waiters:
            self._waiters.popleft()()

    def _retire(self, worker: _Worker) -> bool:
        with self._lock:
            try:
                self._idle.remove(worker)
            except ValueError:
                return False
            self._all.discard(worker)
            return True

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the idle workers and wait for them (busy ones finish their
        call and retire later)."""
        with self._lock:
            idle, self._idle = self._idle, []
            for worker in idle:
                self._all.discard(worker)
        for worker in idle:
            worker.submit(None)  # type: ignore[arg-type]
        for worker in idle:
            worker.thread.join(timeout)


pool = WorkerPool()
