"""The worker threads that run SQLAlchemy's synchronous code.

A worker is a plain :class:`threading.Thread` that waits on its own wake-up
for a job, runs it, and goes back to the idle stack.  Why not
``concurrent.futures`` or ``anyio.to_thread``: the bridge needs to hand a job
to a *specific* thread and wake it with the cheapest primitive the platform
has (an eventfd on Linux, a ``threading.Lock`` elsewhere: see _channel), and
it needs the worker to mark itself idle
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
event loop, for a worker to come free -- except calls that work on a
checked-out connection (the admission gate tells them apart), which may be
the ones to return it: they get a worker beyond the cap.

What keeps the pool usable for the life of the process
-------------------------------------------------------
The pool is process-wide and outlives every event loop, so nothing one loop
does may break it for the next:

* A worker thread never dies from an exception: whatever escapes a job (say,
  a wake-up posted to an event loop that was closed mid-call) is logged at
  ERROR on the ``sqla_anyio_shim`` logger, with its traceback, and the
  worker keeps serving.  A worker is never taken from the idle stack unless
  its thread is alive.
* A waiter for a free worker (``max_workers`` reached) whose event loop is
  gone is dropped and the next waiter is woken instead; the releasing worker
  is not affected.
* A worker is counted only once its thread has started: a failed
  ``Thread.start()`` (``can't start new thread``) frees its slot and raises
  a RuntimeError naming the fix.
* After ``os.fork()`` the child starts from an empty pool: the parent's
  threads do not exist there, and the parent's lock may have been held by
  one of them at the moment of the fork.
* On CPython 3.12 no thread can be started once the interpreter has begun
  to shut down -- in ``atexit`` handlers, where greenlet runs a query as
  anywhere else (3.10, 3.11 and 3.13+ allow it).  There the pool keeps one
  worker in reserve from ``install()`` on (``keep_reserve``): the last idle
  worker does not retire, and a forked child starts its own.

Thread safety (also without the GIL, on free-threaded CPython)
--------------------------------------------------------------
* Every shared structure of the pool -- the idle stack, the set of workers,
  the count of threads being started, the waiter queue and each worker's
  ``released`` flag -- is read and written only under the pool's lock;
  nothing relies on a list, set or deque operation being atomic.
* A job is handed over through the worker's own wake-up: the submitter
  writes ``_job`` and then signals it, the worker waits on it and then
  reads ``_job``; the wake-up (a system call or a lock) orders the two.
* ``configure()`` writes the settings under the pool's lock; a worker reads
  ``idle_timeout`` without it, where an old or a new value are both fine.
* Wake-up callables of waiters are called under the pool's lock, so they
  must not call back into the pool (``_Waiter.wake`` only posts to a loop).
* The lock is reentrant only for the garbage collector's sake: it may close
  an abandoned waiter's coroutine inside the lock, on the same thread, and
  the coroutine's cleanup calls ``remove_waiter()``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from . import _channel

__all__ = ["PoolStats", "WorkerPool", "pool"]

_log = logging.getLogger("sqla_anyio_shim")

#: the name of every worker thread (tests and thread dumps look for it)
THREAD_NAME = "sqla-anyio-shim-worker"

#: the job that ends a worker thread (pool shutdown, retirement)
STOP = object()

#: CPython 3.12 refuses ``Thread.start()`` from the moment finalization
#: begins, atexit handlers included (3.13 lets them start threads again)
NO_THREADS_AT_EXIT = sys.version_info[:2] == (3, 12)

#: a wake-up for a call waiting for a free worker.  It returns False (or
#: raises) when the waiting call can never run again -- its event loop is
#: closed -- and the pool then wakes the next waiter instead.
WakeUp = Callable[[], object]


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of the worker pool (see :meth:`WorkerPool.stats`)."""

    #: worker threads started and not yet retired
    total: int
    #: workers running a call (a call parked in ``await_()`` keeps its worker)
    busy: int
    #: workers on the idle stack, ready for the next call
    idle: int
    #: calls waiting for a worker because ``max_workers`` is reached
    waiters: int


class _Worker:
    __slots__ = ("__weakref__", "_job", "_pool", "_wake", "released", "thread")

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        # set by whoever hands us a job, waited on by the worker: an eventfd
        # where there is one (a Lock spins under contention on free-threaded
        # builds; see _channel)
        self._wake = _channel.new_wake()
        self._job: Callable[[], None] | object | None = None
        # whether the running job has already handed this worker back to
        # the pool (guarded by the pool's lock; see WorkerPool.release)
        self.released = False
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def submit(self, job: Callable[[], None] | object) -> None:
        """Hand ``job`` to this worker (``STOP`` ends the thread)."""
        self._job = job
        self._wake.set()

    def resubmit(self, job: Callable[[], None], started: Callable[[], bool]) -> None:
        """``submit(job)`` was cut short at a point unknown -- a signal
        handler (Ctrl-C) raised inside it, on the loop thread: make sure the
        worker gets ``job``, and only once.  ``started()``: whether the job
        has begun running (it stays true once it has).

        The job stays in ``_job`` until the worker is released (see
        _release_locked), so ``None`` there means either that the assignment
        never happened or that the job is over; ``started()`` tells the two
        apart -- asked *after* ``_job`` is read: a job that was over by then
        had begun before, while asked first, a job that begins and ends
        between the two reads would be run twice.  The wake-up is given
        again in every case: a worker woken with no job waits again."""
        current = self._job
        if current is None and not started():
            self._job = job
        self._wake.set()

    def _run(self) -> None:
        pool = self._pool
        wake = self._wake
        try:
            while True:
                if not wake.wait(pool.idle_timeout):
                    verdict = pool._retire(self)
                    if verdict is _RETIRED:
                        return
                    if verdict is _KEPT:
                        continue
                    # somebody took us off the idle stack at the same moment
                    # and is about to hand us a job: wait for it
                    wake.wait()
                job = self._job
                if job is None:
                    # a wake-up given twice (resubmit): nothing to run
                    continue
                if job is STOP:
                    return
                try:
                    job()  # type: ignore[operator]
                except BaseException:
                    # a dead worker would strand the next call handed to it
                    # (and everything that call holds): report and go on
                    _log.error(
                        "a job raised in worker thread %r; the worker stays in service",
                        self.thread.name,
                        exc_info=True,
                    )
                # release our reference before idling so that nothing the
                # job referenced outlives it (checked by a weakref test);
                # ``_job`` itself is cleared when the worker is released
                del job
                pool._job_done(self)
        finally:
            # however the thread ends, it is no longer a worker (and nobody
            # can hand it a job any more: it is on no list)
            pool._forget(self)
            wake.close()


class WorkerPool:
    """A LIFO pool of worker threads with idle retirement."""

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        idle_timeout: float = 10.0,
        max_idle_workers: int | None = None,
    ) -> None:
        # reentrant on purpose: the cyclic GC can finalize an abandoned
        # call's coroutine (a task of a closed loop waiting for a worker) on
        # any thread, at any allocation -- also inside this lock -- and the
        # finalizer calls remove_waiter().  Only remove_waiter() can nest so,
        # and it touches only the waiter queue, whose users re-check it.
        self._lock = threading.RLock()
        self._idle: list[_Worker] = []
        # workers whose thread has started and not ended
        self._all: set[_Worker] = set()
        # threads being started right now: they hold a max_workers slot but
        # are not counted as workers until start() has returned
        self._starting = 0
        # wake-ups of calls that wait for a worker (max_workers reached)
        self._waiters: deque[WakeUp] = deque()
        self.max_workers: int | None = None
        self.idle_timeout = 10.0
        self.max_idle_workers: int | None = None
        # keep one idle worker for good (see the module docstring)
        self.reserve = False
        self.configure(
            max_workers=max_workers,
            idle_timeout=idle_timeout,
            max_idle_workers=max_idle_workers,
        )
        _pools.add(self)

    def configure(
        self,
        *,
        max_workers: int | None,
        idle_timeout: float,
        max_idle_workers: int | None,
    ) -> None:
        """Set the pool's options, checked by install() (_options)."""
        with self._lock:
            self.max_workers = max_workers
            self.idle_timeout = float(idle_timeout)
            self.max_idle_workers = max_idle_workers

    def keep_reserve(self) -> None:
        """From now on keep at least one worker thread, idle or busy, for
        good (called by install() where threads cannot be started at exit,
        :data:`NO_THREADS_AT_EXIT`; ended by shutdown()).  Starts it now if
        there is none."""
        with self._lock:
            self.reserve = True
            if self._all or self._starting or not self._can_start_locked():
                return
            self._starting += 1
        worker = self._start_worker()
        with self._lock:
            self._idle.append(worker)
            self._wake_next_locked()

    # -- introspection (used by tests, the walk-through and stats()) -------

    def stats(self) -> PoolStats:
        """A consistent snapshot of the pool's counts."""
        with self._lock:
            total = len(self._all)
            idle = len(self._idle)
            return PoolStats(total=total, busy=total - idle, idle=idle, waiters=len(self._waiters))

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._all)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)

    @property
    def busy(self) -> int:
        with self._lock:
            return len(self._all) - len(self._idle)

    # -- acquiring and releasing -------------------------------------------

    def try_acquire(self, beyond_cap: bool = False) -> _Worker | None:
        """Return an idle or new worker, or None if max_workers is reached
        (``beyond_cap``: start a new one even then -- for a call that holds
        a pool connection, see _host.acquire_worker).

        Raises RuntimeError if a new worker's thread cannot be started."""
        with self._lock:
            worker = self._take_idle_locked()
            if worker is not None:
                return worker
            if not beyond_cap and not self._can_start_locked():
                return None
            self._starting += 1
        return self._start_worker()

    def add_waiter(self, wake: WakeUp) -> _Worker | None:
        """Register ``wake`` to be called when a worker comes free, unless
        one is free already, in which case it is returned."""
        with self._lock:
            worker = self._take_idle_locked()
            if worker is not None:
                return worker
            if not self._can_start_locked():
                self._waiters.append(wake)
                return None
            self._starting += 1
        return self._start_worker()

    def remove_waiter(self, wake: WakeUp) -> None:
        with self._lock:
            try:
                self._waiters.remove(wake)
            except ValueError:
                # already woken: pass the wake-up on, so that it is not lost
                self._wake_next_locked()

    def release(self, worker: _Worker) -> None:
        """Hand ``worker`` back to the pool.  Called by the job itself,
        before it delivers its last message (see the module docstring); a
        job that does not call it is released when it returns."""
        with self._lock:
            self._release_locked(worker)

    def _job_done(self, worker: _Worker) -> None:
        """Called by the worker thread after each job."""
        with self._lock:
            if not worker.released:
                self._release_locked(worker)
            # ready for the next job; the next release() can only come from
            # that job, which this same thread runs after we return
            worker.released = False

    # -- internals (all *_locked methods run under self._lock) -------------

    def _take_idle_locked(self) -> _Worker | None:
        idle = self._idle
        while idle:
            worker = idle.pop()
            if worker.thread.is_alive():
                return worker
            # cannot happen while _run's handlers hold; should it anyway, a
            # job handed to this worker would never run: drop it
            self._all.discard(worker)
            _log.error("dropped dead worker thread %r from the idle stack", worker.thread.name)
        return None

    def _release_locked(self, worker: _Worker) -> None:
        if worker.released:
            # a second release of the same job would put the worker on the
            # idle stack twice, and two calls would share one thread
            return
        worker.released = True
        if worker not in self._all:
            # its pool was reset at a fork (this is the child, and this is
            # the thread that forked): it is not a worker here
            worker.submit(STOP)
        elif (
            self.max_idle_workers is not None
            and len(self._idle) >= self.max_idle_workers
            and not (self.reserve and len(self._all) == 1)
        ):
            self._all.discard(worker)
            worker.submit(STOP)
        else:
            # the job is over (cleared here, not when the worker took it:
            # see resubmit); the next submit() can come only after this
            worker._job = None
            self._idle.append(worker)
        self._wake_next_locked()

    def _can_start_locked(self) -> bool:
        return self.max_workers is None or len(self._all) + self._starting < self.max_workers

    def _start_worker(self) -> _Worker:
        """Start a new worker in the slot reserved by ``self._starting``."""
        try:
            worker = _Worker(self)
        except BaseException:
            self._unreserve()
            raise
        try:
            worker.thread.start()
        except BaseException as err:
            if worker.thread.is_alive():
                # interrupted (Ctrl-C) after the thread did start: stop it,
                # it is not counted and no job will ever come (the thread
                # closes its wake-up when it ends)
                worker.submit(STOP)
            else:
                worker._wake.close()  # never started: nobody else has it
            running = self._unreserve()
            if isinstance(err, RuntimeError) and "shutdown" in str(err):
                raise RuntimeError(
                    f"sqla-anyio-shim could not start a worker thread ({err}): "
                    f"this Python starts no thread once the interpreter is shutting "
                    f"down (atexit handlers), and the {running} worker thread(s) "
                    f"kept for this are all busy.  Run the calls made at exit one "
                    f"after the other, or make them before the program ends."
                ) from err
            if isinstance(err, RuntimeError):
                raise RuntimeError(
                    f"sqla-anyio-shim could not start a worker thread ({err}) with "
                    f"{running} worker threads running: the process has reached its "
                    f"thread limit.  Bound the number of worker threads with "
                    f"sqla_anyio_shim.install(max_workers=N) -- calls beyond N wait "
                    f"for a free worker without blocking the event loop -- or raise "
                    f"the limit (ulimit -u, the container's pids limit, the memory "
                    f"available for thread stacks)."
                ) from err
            raise
        with self._lock:
            self._starting -= 1
            self._all.add(worker)
            total = len(self._all)
        _log.debug("started worker thread %s (%d workers)", worker.thread.name, total)
        return worker

    def _unreserve(self) -> int:
        """A worker could not be started: free its slot (a waiter may use
        it).  Returns the number of workers running."""
        with self._lock:
            self._starting -= 1
            self._wake_next_locked()
            return len(self._all)

    def _wake_next_locked(self) -> None:
        waiters = self._waiters
        while waiters:
            wake = waiters.popleft()
            try:
                if wake() is not False:
                    return
            except Exception:
                _log.error(
                    "waking a call that waits for a worker failed; waking the next one",
                    exc_info=True,
                )
            # that call can never run again (its event loop is closed): the
            # wake-up goes to the next waiter, or it would be lost

    def _retire(self, worker: _Worker) -> object:
        """An idle worker's wait timed out: retire it (``_RETIRED``), keep
        it as the reserve (``_KEPT``), or ``_TAKEN``: somebody took it off
        the idle stack at the same moment and is handing it a job."""
        with self._lock:
            if worker not in self._idle:
                return _TAKEN
            if self.reserve and len(self._all) == 1:
                return _KEPT
            self._idle.remove(worker)
            self._all.discard(worker)
            total = len(self._all)
        # the burst is over: idle channels beyond the threads left only hold
        # descriptors
        _channel.trim(total)
        _log.debug(
            "worker thread %s retired after %.1f s idle (%d workers)",
            worker.thread.name,
            self.idle_timeout,
            total,
        )
        return _RETIRED

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
            try:
                self._idle.remove(worker)
            except ValueError:
                pass

    def _reset_after_fork(self) -> None:
        # in the child only the forking thread exists: every other worker's
        # thread is gone, and the lock may have been held by one of them
        self._lock = threading.RLock()
        self._idle = []
        self._all = set()
        self._starting = 0
        self._waiters = deque()
        if self.reserve:
            try:
                self.reserve = False
                self.keep_reserve()
            except Exception:
                _log.error("could not start the reserve worker after fork", exc_info=True)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the idle workers and wait for them (busy ones finish their
        call and retire later)."""
        with self._lock:
            self.reserve = False
            idle, self._idle = self._idle, []
            for worker in idle:
                self._all.discard(worker)
        for worker in idle:
            worker.submit(STOP)
        for worker in idle:
            worker.thread.join(timeout)


#: what WorkerPool._retire decided
_RETIRED, _KEPT, _TAKEN = object(), object(), object()

_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _reset_pools_after_fork() -> None:
    for worker_pool in list(_pools):
        worker_pool._reset_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_reset_pools_after_fork)

pool = WorkerPool()
