"""One-shot wake-ups for tasks waiting on state that worker threads change:
the waiters behind the pool's queue, the event lock, and calls waiting for a
worker (``max_workers``).

A waiter is a future (asyncio) or an Event (trio) created on the loop by the
waiting task; any thread wakes it thread-safely.  Its own module so that the
bridge (which waits for workers) and the primitives (which wait for queue
items and the lock) share it without importing each other.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Any

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
