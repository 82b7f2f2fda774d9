"""The thread bridge's entry points: ``greenlet_spawn()`` / ``await_()``
without greenlet, and what SQLAlchemy's patched modules call.

Where the mechanism lives (see docs/principle.md for the why):

* :mod:`._handoff` -- one call's hand-off between the host task and its
  worker thread (messages, context variables, Ctrl-C, settings);
* :mod:`._channel` -- the wake-up primitive of one hop (eventfd);
* :mod:`._host_asyncio` / :mod:`._host_trio` -- the host loop per backend,
  and where cancellation is delivered;
* :mod:`._loop_proxy` -- the asyncio loop as sync code in a worker sees it;
* :mod:`._workers` -- the worker threads.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from . import _admission, _host_asyncio, _host_trio, _workers
from ._handoff import (  # re-exported for _patching, _primitives and stats()
    AWAIT_REQUIRED_MESSAGE as AWAIT_REQUIRED_MESSAGE,
    HOST_GONE_MESSAGE as HOST_GONE_MESSAGE,
    HostGone as HostGone,
    _Call as _Call,
    _exc as _exc,
    _local as _local,
    _mailbox_for,
    _safe_close as _safe_close,
    call_stats as call_stats,
    reset_longest_hold as reset_longest_hold,
    run_call,
)
from ._loop_proxy import _OnLoop
from ._waiters import _Waiter

_T = TypeVar("_T")

_get_running_loop = asyncio._get_running_loop
_current_task = asyncio.current_task

#: Whether every ``greenlet_spawn()`` on asyncio starts with a checkpoint
#: (set while sync drivers are enabled).  A sync driver's query runs in the
#: worker and never suspends the task, so without it a task looping on
#: queries would hold the loop, and a cancellation pending on it (a
#: deadline) would not be delivered before its next statement or commit.
#: Under trio every call is a checkpoint (trio's own convention).
checkpoint_calls = False

# messages of the SQLAlchemy line in use; set by _patching
MISSING_GREENLET_MESSAGE = (
    "greenlet_spawn has not been called; can't call await_() "
    "here. Was IO attempted in an unexpected place?"
)


def run_on_loop_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``fn`` on the host's event-loop thread when called from a bridge
    worker whose host runs asyncio; call it here otherwise."""
    call = getattr(_local, "call", None)
    if call is None or call.loop is None:
        return fn(*args, **kwargs)
    return call.switch(_OnLoop(fn, args, kwargs))  # type: ignore[no-any-return]


def on_loop_thread(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Wrap ``fn`` (a driver's non-thread-safe sync call, such as asyncpg's
    ``terminate()``) so that, from a worker, it runs on the loop thread."""

    def wrapper(*args: Any, **kwargs: Any) -> _T:
        return run_on_loop_thread(fn, *args, **kwargs)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    wrapper.__qualname__ = getattr(fn, "__qualname__", "wrapper")
    wrapper.__doc__ = getattr(fn, "__doc__", None)
    return wrapper


def in_greenlet() -> bool:
    """True when called from sync code that runs inside ``greenlet_spawn``
    (that is, in a bridge worker thread)."""
    return getattr(_local, "call", None) is not None


def await_(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` from sync code running inside
    :func:`greenlet_spawn`, returning its result."""
    call = getattr(_local, "call", None)
    if call is None:
        _safe_close(awaitable)
        raise _exc().MissingGreenlet(MISSING_GREENLET_MESSAGE)
    return call.switch(awaitable)  # type: ignore[no-any-return]


def await_fallback(awaitable: Awaitable[_T]) -> _T:
    """SQLAlchemy 2.0's ``await_fallback``: like :func:`await_`, but outside
    a bridge it runs the awaitable on the thread's event loop if that loop
    is not running."""
    call = getattr(_local, "call", None)
    if call is None:
        loop = _get_running_loop()
        if loop is None:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        if loop.is_running():
            _safe_close(awaitable)
            raise _exc().MissingGreenlet(
                "greenlet_spawn has not been called and asyncio event "
                "loop is already running; can't call await_fallback() here. "
                "Was IO attempted in an unexpected place?"
            )
        return loop.run_until_complete(awaitable)
    return cast(_T, call.switch(awaitable))


@types.coroutine
def _yield() -> Any:
    """One trip through the asyncio loop (``asyncio.sleep(0)`` without the
    call): other tasks run, and a pending cancellation is delivered here."""
    yield


async def greenlet_spawn(
    fn: Callable[..., _T],
    *args: Any,
    _require_await: bool = False,
    **kwargs: Any,
) -> _T:
    """Run the sync callable ``fn`` in a worker thread; every
    :func:`await_` it performs is awaited by the calling task."""
    # calls contending for pool connections beyond max_pool_waiters wait
    # here, in the loop, without a thread (see _admission)
    slot = _admission.try_admit()
    if slot is None:
        slot = await _admission.admit(fn, args)
    loop = _get_running_loop()
    if loop is not None:
        try:
            if checkpoint_calls:
                await _yield()
            worker = _workers.pool.try_acquire()
            if worker is None:
                worker = await _wait_for_worker()
        except BaseException:
            if slot:
                _admission.release()
            raise
        mailbox = _mailbox_for(loop, loop.call_soon_threadsafe)
        call = _Call(fn, args, kwargs, mailbox, loop)
        call.task = _current_task(loop)
        call.gate_slot = slot
        return cast(_T, await run_call(call, worker, _host_asyncio.drive, loop, _require_await))
    return cast(
        _T, await _host_trio.spawn(fn, args, kwargs, _require_await, _wait_for_worker, slot)
    )


async def _wait_for_worker() -> _workers._Worker:
    """max_workers is reached: wait, without blocking the loop, for a worker
    to come free (either backend)."""
    pool = _workers.pool
    while True:
        waiter = _Waiter()
        worker = pool.add_waiter(waiter.wake)
        if worker is not None:
            return worker
        try:
            await waiter.wait()
        except BaseException:
            pool.remove_waiter(waiter.wake)
            raise
        worker = pool.try_acquire()
        if worker is not None:
            return worker


def current_task(loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """``asyncio.current_task()`` that, in a bridge worker, returns the task
    awaiting the bridge -- the task that is current for the sync code under
    greenlet (``async_scoped_session(..., scopefunc=current_task)`` relies
    on it)."""
    call = getattr(_local, "call", None)
    if call is not None and call.loop is not None and (loop is None or loop is call.loop):
        return call.task
    return _current_task(loop)


def note_sync_io() -> None:
    """Called by a sync-driver dialect in a worker: this call did its I/O
    in the worker, so ``_require_await`` is satisfied."""
    call = getattr(_local, "call", None)
    if call is not None:
        call.sync_io = True


def host_is_trio() -> bool:
    """True in a bridge worker whose host task runs under trio."""
    call = getattr(_local, "call", None)
    return call is not None and call.loop is None


def current_loop_of_worker() -> Any:
    """The asyncio loop of the host of the current worker thread, or None
    (not in a worker, or the host is not asyncio)."""
    call = getattr(_local, "call", None)
    if call is None:
        return None
    return call.loop
