"""The two-way wake-up between a host task and its worker thread.

One hop of the bridge is "the worker has a message, wake the host" and then
"the host has the reply, wake the worker".  How a thread is woken decides
what a hop costs, and ``threading.Lock`` is the wrong tool here, measured
(a bare ping-pong between two threads, ``/proc`` context switches per round
trip, 2-core machine):

=================  ====================  =====================
primitive          CPython 3.11 (GIL)    CPython 3.14t (no GIL)
=================  ====================  =====================
threading.Lock     12-23 us, ~5 csw      290-320 us, 74-80 csw
eventfd            ~10 us, 2 csw         ~8.5 us, 2 csw
=================  ====================  =====================

* With the GIL, a Lock is released by a thread that still holds the GIL: the
  woken thread runs, finds the GIL taken, sleeps again, and is woken a
  second time when the releaser blocks.  ``os.eventfd_write()`` drops the GIL
  *before* the wake-up system call, so the woken thread takes it at once.
* Without the GIL, a contended ``PyMutex`` spins with ``sched_yield()``
  before it parks, which on a busy 2-core machine turns one hand-off into
  dozens of context switches.  A read on an eventfd sleeps in the kernel
  and is woken exactly once.

So each channel is a pair of eventfds (Linux), with the Lock pair as the
fallback elsewhere or when file descriptors run out.  Channels are reused
(a free list, LIFO) because creating two file descriptors per call would
cost more than the hop; a channel that may hold a stale wake-up (a call that
ended abnormally) is closed, once neither thread can touch it, instead of
reused.  Counts: an eventfd is a
counter and exactly one message is in flight per direction, so it only ever
holds 0 or 1.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Union

__all__ = ["Channel", "Wake", "get", "new_wake", "put", "reset_after_fork", "trim"]

_HAS_EVENTFD = hasattr(os, "eventfd") and hasattr(select, "poll")


class _EventfdChannel:
    __slots__ = ("__weakref__", "_poll", "_to_host", "_to_worker", "_worker_poll")

    def __init__(self) -> None:
        # the host never blocks in read(): it polls with a timeout, then
        # reads without blocking; the worker blocks in read()
        self._to_host = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._to_worker = os.eventfd(0, os.EFD_CLOEXEC)
        except OSError:
            os.close(self._to_host)
            raise
        self._poll = select.poll()
        self._poll.register(self._to_host, select.POLLIN)
        self._worker_poll = select.poll()
        self._worker_poll.register(self._to_worker, select.POLLIN)

    # -- worker side -------------------------------------------------------

    def signal_host(self) -> None:
        os.eventfd_write(self._to_host, 1)

    def wait_reply(self, timeout: float) -> bool:
        """Block until the host's reply, for at most ``timeout`` seconds."""
        if not self._worker_poll.poll(int(timeout * 1000)):
            return False
        os.eventfd_read(self._to_worker)
        return True

    # -- host side -----------------------------------------------------------

    def take_message(self) -> bool:
        """Consume the worker's wake-up if it is there; never blocks."""
        try:
            os.eventfd_read(self._to_host)
        except BlockingIOError:
            return False
        return True

    def wait_message(self, timeout: float) -> bool:
        """Block until the worker's wake-up, for at most ``timeout`` seconds
        (negative: no bound)."""
        if self.take_message():
            return True
        if timeout == 0:
            return False
        ms = -1 if timeout < 0 else max(1, int(timeout * 1000 + 0.5))
        if not self._poll.poll(ms):
            return False
        return self.take_message()

    def signal_worker(self) -> None:
        os.eventfd_write(self._to_worker, 1)

    def close(self) -> None:
        fds, self._to_host, self._to_worker = (self._to_host, self._to_worker), -1, -1
        for fd in fds:
            if fd >= 0:
                _count_fds(-1)
                try:
                    os.close(fd)
                except OSError:
                    pass


class _LockChannel:
    """The portable fallback: the same interface on two locks."""

    __slots__ = ("__weakref__", "_to_host", "_to_worker")

    def __init__(self) -> None:
        self._to_host = threading.Lock()
        self._to_host.acquire()
        self._to_worker = threading.Lock()
        self._to_worker.acquire()

    def signal_host(self) -> None:
        self._to_host.release()

    def wait_reply(self, timeout: float) -> bool:
        return self._to_worker.acquire(True, timeout)

    def take_message(self) -> bool:
        return self._to_host.acquire(False)

    def wait_message(self, timeout: float) -> bool:
        if timeout == 0:
            return self._to_host.acquire(False)
        return self._to_host.acquire(True, timeout)

    def signal_worker(self) -> None:
        self._to_worker.release()

    def close(self) -> None:
        pass


class _EventfdWake:
    """A one-way wake-up: how an idle worker thread waits for its next job
    (the same reasons as above: on 3.14t a contended Lock spins)."""

    __slots__ = ("_fd", "_poll")

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def set(self) -> None:
        os.eventfd_write(self._fd, 1)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for set(), for at most ``timeout`` seconds (None: no bound)."""
        if timeout is not None and not self._poll.poll(max(0, int(timeout * 1000))):
            return False
        os.eventfd_read(self._fd)
        return True

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            _count_fds(-1)
            try:
                os.close(fd)
            except OSError:
                pass


class _LockWake:
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            # set already (a wake-up given twice, _Worker.resubmit): one is
            # as good as two -- the worker finds no job and waits again
            pass

    def wait(self, timeout: float | None = None) -> bool:
        return self._lock.acquire(True, -1 if timeout is None else timeout)

    def close(self) -> None:
        pass


Wake = Union[_EventfdWake, _LockWake]  # noqa: UP007 -- a runtime alias


def new_wake() -> Wake:
    if _HAS_EVENTFD and _take_fds(1):
        try:
            return _EventfdWake()
        except OSError:
            _count_fds(-1)  # out of descriptors
    return _LockWake()


Channel = Union[_EventfdChannel, _LockChannel]  # noqa: UP007 -- a runtime alias on 3.9+ syntax

_lock = threading.Lock()
_free: list[Channel] = []
#: idle channels kept at most (each eventfd channel holds two descriptors)
MAX_FREE = 256


def _fd_budget() -> int:
    """How many descriptors the bridge's eventfds may hold at once: a
    quarter of the process's soft RLIMIT_NOFILE (at most 4,096).  Past it,
    channels and wake-ups fall back to locks -- slower hops, but the
    application's own open() and its database connections never meet
    EMFILE because of the bridge (issue 16, item 6: with a limit of 256, a
    300-task burst took all 256 and the application's open() failed)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 4096
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 4096
    return max(8, min(soft // 4, 4096))


#: see _fd_budget; read once (a process rarely changes its limit)
FD_BUDGET = _fd_budget()
# eventfd descriptors the bridge holds now (guarded by _lock)
_fds = 0


def _take_fds(n: int) -> bool:
    """Reserve ``n`` descriptors of the budget, if they fit."""
    global _fds
    with _lock:
        if _fds + n > FD_BUDGET:
            return False
        _fds += n
        return True


def _count_fds(n: int) -> None:
    global _fds
    with _lock:
        _fds += n


def get() -> Channel:
    """A channel with no pending wake-up in either direction."""
    with _lock:
        if _free:
            return _free.pop()
    if _HAS_EVENTFD and _take_fds(2):
        try:
            return _EventfdChannel()
        except OSError:
            # out of descriptors: the lock pair works too
            _count_fds(-2)
    return _LockChannel()


def trim(keep: int) -> None:
    """Close idle channels beyond ``keep`` (the workers still alive: a call
    in flight needs one channel, so more idle ones only hold descriptors);
    called when a worker retires, so that a burst's channels do not outlive
    its threads."""
    with _lock:
        # the oldest first: the free list is LIFO, its end the warmest
        surplus = max(0, len(_free) - keep)
        extra = _free[:surplus]
        del _free[:surplus]
    for channel in extra:
        channel.close()


def put(channel: Channel, clean: bool) -> None:
    """Give ``channel`` back after a call.  ``clean``: both directions were
    consumed (a normal end), so it is reused; otherwise it is closed.  The
    caller guarantees that neither thread touches it any more (see
    ``_Call.release_channel``): closing it earlier could let a thread write
    to a descriptor number the process has reused since."""
    if clean:
        with _lock:
            if len(_free) < MAX_FREE:
                _free.append(channel)
                return
    channel.close()


def reset_after_fork() -> None:
    """In a forked child: the idle channels' descriptors are copies of the
    parent's (the same eventfds); close the child's copies and start
    afresh."""
    global _lock, _fds
    _lock = threading.Lock()
    for channel in _free:
        channel.close()
    _free.clear()
    # the other descriptors counted were the parent's threads' and calls'
    _fds = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=reset_after_fork)
