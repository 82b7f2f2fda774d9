"""The host loop on trio: the task that awaits ``greenlet_spawn()`` serves
its worker's awaitables.  trio's cancellation is level-triggered, so the
waits for the worker are uncancellable and a cancellation lands at the next
checkpoint by itself (the next awaitable, or the caller's next checkpoint)."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

from . import _admission, _workers
from ._handoff import (
    _ANSWERED,
    _DONE,
    _acquire_blocking,
    _Call,
    _end_stretch,
    _finish,
    _mailbox_for,
    _next_message,
    _serve,
    _wait_bound,
    run_call,
)


def _abort_failed(raise_cancel: Any) -> Any:
    import trio

    # the worker runs plain Python that cannot be interrupted: the wait is
    # uncancellable and trio delivers the cancellation at the next
    # checkpoint, which is the next await_() of the sync code
    return trio.lowlevel.Abort.FAILED


async def spawn(
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    require_await: bool,
    wait_for_worker: Callable[[], Awaitable[Any]],
    gate_slot: bool = False,
) -> Any:
    """greenlet_spawn() under trio."""
    trio = sys.modules.get("trio")
    token = None
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
    if token is None:
        if gate_slot:
            _admission.release()
        raise RuntimeError(
            "greenlet_spawn() must be awaited in a task of an asyncio or "
            "trio event loop (sqla-anyio-shim supports both through anyio)"
        )
    # a checkpoint, as every trio async function is: a cancelled scope
    # stops here before any sync code runs, and a task looping on queries
    # lets the others run
    assert trio is not None
    try:
        await trio.lowlevel.checkpoint()
        worker = _workers.pool.try_acquire()
        if worker is None:
            worker = await wait_for_worker()
    except BaseException:
        if gate_slot:
            _admission.release()
        raise
    mailbox = _mailbox_for(token, token.run_sync_soon)
    call = _Call(fn, args, kwargs, mailbox, None)
    call.gate_slot = gate_slot
    return await run_call(call, worker, _host_loop_trio, require_await)


async def _host_loop_trio(call: _Call, require_await: bool) -> Any:
    import trio

    task = trio.lowlevel.current_task()
    wait = trio.lowlevel.wait_task_rescheduled
    channel = call.channel
    switched = False
    first = True
    while True:
        timeout = _wait_bound(first)
        first = False
        if not _acquire_blocking(call, channel, timeout):
            _end_stretch(call)
            call.async_waiting = True
            while not channel.take_message():
                call.waiter = task
                await wait(_abort_failed)
            call.async_waiting = False
        awaitable = _next_message(call)
        if awaitable is _DONE:
            break
        switched = True
        if awaitable is _ANSWERED:
            continue
        await _serve(call, awaitable)
        del awaitable
    # a cancellation that arrived while the sync code ran its last stretch
    # of plain Python stays pending in trio's cancel scope and lands at the
    # caller's next checkpoint: raising it here would lose the outcome
    return _finish(call, switched, require_await)
