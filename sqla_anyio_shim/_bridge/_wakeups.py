"""Waking a task from a worker thread: the two ways the package does it.

* :class:`_Mailbox`: a worker whose host waits through the event loop wakes
  it here (see _host.run_call), coalesced per loop.
* :class:`_Waiter`: a one-shot wake-up for a task waiting on state that
  worker threads change -- the pool's queue and the event lock
  (``_sqla._primitives``), admission (``_sqla._admission``) and a free worker
  (``max_workers``, _host.acquire_worker).  A future (asyncio) or an Event
  (trio) created on the loop by the waiting task; any thread wakes it
  thread-safely.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._call import _Call

_get_running_loop = asyncio._get_running_loop


def _set_result_unless_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Waiter:
    """A one-shot wake-up created on the loop, settable from any thread."""

    __slots__ = ("_event", "_fut", "_loop", "_token", "notified")

    def __init__(self) -> None:
        self.notified = False
        self._loop: asyncio.AbstractEventLoop | None = _get_running_loop()
        self._fut: asyncio.Future[None] | None = None
        self._token: Any = None  # trio's, when the waiter is on trio
        self._event: Any = None
        if self._loop is not None:
            self._fut = self._loop.create_future()
        else:
            import trio

            self._token = trio.lowlevel.current_trio_token()
            self._event = trio.Event()

    @property
    def loop_identity(self) -> Any:
        return self._loop if self._loop is not None else self._token

    def wake(self) -> bool:
        """Wake the waiter; callable from any thread (the primitive's mutex
        is held by the caller).

        Returns False, having woken nothing, when the waiter's event loop is
        closed (asyncio) or its run has finished (trio): the task that waits
        there can never run again, so the caller must wake the next waiter
        instead, or the wake-up is lost and waiters on live loops hang."""
        # set before posting: the woken task may run (and read it) before
        # this thread returns from the post
        self.notified = True
        loop, fut = self._loop, self._fut
        try:
            if loop is not None and fut is not None:
                if loop.is_closed():
                    self.notified = False
                    return False
                # direct only from inside the waiter's own running loop: the
                # loop's thread may run a later, different loop by now
                if _get_running_loop() is loop:
                    _set_result_unless_done(fut)
                else:
                    loop.call_soon_threadsafe(_set_result_unless_done, fut)
            elif _in_trio_run(self._token):
                self._event.set()
            else:
                self._token.run_sync_soon(self._event.set)
        except RuntimeError as err:
            # the loop was closed after the check above ("Event loop is
            # closed"), or trio's run has finished (trio.RunFinishedError is
            # a RuntimeError); any other RuntimeError is a real error
            gone = loop.is_closed() if loop is not None else _is_run_finished(err)
            if not gone:
                raise
            self.notified = False
            return False
        return True

    async def wait(self) -> None:
        if self._fut is not None:
            await self._fut
        else:
            await self._event.wait()


def _in_trio_run(token: Any) -> bool:
    """Whether the caller runs inside the trio run that ``token`` belongs to."""
    import trio

    try:
        return trio.lowlevel.current_trio_token() is token
    except RuntimeError:  # not in a trio run at all
        return False


def _is_run_finished(err: BaseException) -> bool:
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(err, trio.RunFinishedError)


def _wake_one(waiters: deque[_Waiter]) -> None:
    """Wake the first waiter whose event loop can still run it; waiters of
    closed loops are dropped on the way."""
    while waiters:
        if waiters.popleft().wake():
            return


def _abandon(waiters: deque[_Waiter], waiter: _Waiter, can_pass: bool) -> None:
    """A waiter is leaving (cancelled, timed out): if it had been woken,
    pass the wake-up on so that it is not lost."""
    if waiter.notified:
        if can_pass:
            _wake_one(waiters)
    else:
        try:
            waiters.remove(waiter)
        except ValueError:
            pass


async def _wait(waiter: _Waiter, deadline: float | None) -> bool:
    """Wait for ``waiter``; False if ``deadline`` passed first."""
    if deadline is None:
        await waiter.wait()
        return True
    import anyio

    with anyio.move_on_at(deadline):
        await waiter.wait()
        return True
    return waiter.notified


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    import anyio

    return anyio.current_time() + max(timeout, 0.0)


# -- host wake-ups -------------------------------------------------------------


class _Mailbox:
    """The worker -> loop wake-ups of one event loop (asyncio) or trio run,
    coalesced.

    A worker whose host waits through the loop must wake the loop thread,
    which costs a write to the loop's self-pipe and a trip out of its
    ``select()``.  Under load many workers finish a stretch of sync code
    while the loop thread is busy or asleep; they all go in one list here
    and only the first schedules a drain, which wakes every host at once,
    in the order their messages arrived."""

    __slots__ = ("__weakref__", "_calls", "_lock", "_schedule", "_scheduled")

    def __init__(self, schedule: Callable[[Callable[[], None]], Any]) -> None:
        self._lock = threading.Lock()
        self._calls: list[_Call] = []
        self._scheduled = False
        self._schedule = schedule

    def post(self, call: _Call) -> None:
        """Called by a worker thread: wake ``call``'s host."""
        with self._lock:
            self._calls.append(call)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._schedule(self._drain)
        except RuntimeError:
            # the loop is closed: nobody is left to wake (the host's
            # coroutine is closed with it; see _host._abandon)
            with self._lock:
                self._calls.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for call in calls:
            call.host.wake()


#: per host thread: (loop or trio token, its mailbox) of the last call
_hosts = threading.local()


def mailbox_for(key: Any, schedule: Callable[[Callable[[], None]], Any]) -> _Mailbox:
    """The mailbox of the event loop (or trio run) ``key``, made on first
    use; ``schedule`` runs a callable on its thread, thread-safely."""
    cached = getattr(_hosts, "last", None)
    if cached is not None and cached[0] is key:
        return cached[1]  # type: ignore[no-any-return]
    boxes = getattr(_hosts, "boxes", None)
    if boxes is None:
        boxes = _hosts.boxes = weakref.WeakKeyDictionary()
    try:
        mailbox = boxes.get(key)
        if mailbox is None:
            mailbox = boxes[key] = _Mailbox(schedule)
    except TypeError:  # not weak-referenceable: one mailbox per call
        return _Mailbox(schedule)
    _hosts.last = (key, mailbox)
    return mailbox
