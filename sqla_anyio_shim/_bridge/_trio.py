"""The trio backend: ``greenlet_spawn()`` in a trio run, and the trio side
of its host (:class:`TrioHost`, see _host.Host).

trio's cancellation is level-triggered, so the waits for the worker are
uncancellable and a cancellation lands at the next checkpoint by itself
(the next awaitable, or the caller's next checkpoint) -- or at the sync
code's next blocking call, a running one interrupted (see _blocking).  A
cancellation that arrived while the sync code ran its last stretch of plain
Python stays pending in trio's cancel scope and lands at the caller's next
checkpoint: raising it at the end of the call would lose the outcome.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import _ki
from ._call import _Call
from ._host import Slot, give_back, place, run_call, serve_nested, take_worker
from ._wakeups import mailbox_for


@_ki.protect
async def spawn(
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    require_await: bool,
    slot: Slot | None,
) -> Any:
    """greenlet_spawn() under trio, admitted (``slot``: what the gate gave
    it, see _host.Slot)."""
    trio = sys.modules.get("trio")
    token = None
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
    if token is None:
        give_back(slot)
        raise RuntimeError(
            "greenlet_spawn() must be awaited in a task of an asyncio or "
            "trio event loop (sqla-anyio-shim supports both through anyio)"
        )
    # a checkpoint, as every trio async function is: a cancelled scope
    # stops here before any sync code runs, and a task looping on queries
    # lets the others run
    assert trio is not None
    holder = slot is not None and slot.holder
    # on the main thread, Ctrl-C is kept out of the bridge's bookkeeping
    # from here on (_ki; trio's own handler is the one wrapped)
    guarded = _ki.enter()
    try:
        try:
            await trio.lowlevel.checkpoint()
        except BaseException:
            give_back(slot)
            raise
        worker = await take_worker(holder, slot)
        call = _Call(fn, args, kwargs, mailbox_for(token, token.run_sync_soon), None)
        if not holder:
            call.gate_slot = slot
        place(call, slot)
        return await run_call(call, worker, TrioHost(trio, token), require_await)
    finally:
        if guarded:
            _ki.close(None)


class TrioHost:
    """The trio side of one call's host."""

    __slots__ = ("_failed", "_reschedule", "_token", "_wait", "task", "waiter")

    def __init__(self, trio: Any, token: Any) -> None:
        self._token = token
        self._reschedule = trio.lowlevel.reschedule
        self._wait = trio.lowlevel.wait_task_rescheduled
        self._failed = trio.lowlevel.Abort.FAILED
        self.task = trio.lowlevel.current_task()
        self.waiter: Any = None

    async def wait_for_message(self, call: _Call) -> None:
        channel = call.channel
        failed = self._failed

        def abort(raise_cancel: Any) -> Any:
            # the worker runs plain Python, which cannot be interrupted: the
            # wait is uncancellable and trio delivers the cancellation at
            # the next checkpoint, the sync code's next await_().  Or it runs
            # a blocking call (a sync driver's statement): that is
            # interrupted, and it and every later one raises trio's
            # cancellation (``raise_cancel``, called in the worker only
            # there, so that a Ctrl-C it would carry stays pending
            # otherwise) -- see _blocking.  trio calls this again at each
            # wait inside the cancelled scope; the interruption fires once.
            call.blocking().cancel(raise_cancel, level=True)
            return failed

        while not channel.take_message():
            self.waiter = self.task
            await self._wait(abort)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            self._reschedule(waiter)

    def forget(self) -> None:
        self.waiter = None

    def alive(self) -> bool:
        try:
            self._token.run_sync_soon(_noop)  # RunFinishedError once the run is over
        except RuntimeError:
            return False
        return True

    def run_nested(self, awaitable: Any, finish: Callable[[Any], None]) -> None:
        trio = sys.modules["trio"]
        self._token.run_sync_soon(trio.lowlevel.spawn_system_task, serve_nested, awaitable, finish)

    def before_serve(self, call: _Call) -> None:
        pass

    def after_last(self, call: _Call) -> None:
        pass


def _noop() -> None:
    pass
