"""The bridge's entry points: ``greenlet_spawn()`` / ``await_()`` without
greenlet, and the helpers SQLAlchemy's patched modules call.

``greenlet_spawn()`` admits the call (the pool gate, see _host.Gate) and
hands it to its backend (:mod:`._asyncio` or :mod:`._trio`), which starts it
on a worker and serves it through the one host loop, _host.run_call.  In
the worker, ``await_()`` hands each awaitable back to that host
(_call._Call.switch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from .. import _options
from . import _asyncio, _host, _trio
from ._call import _local, safe_close, sqlalchemy_exc
from ._driver_loop import DriverLoop
from ._loop_proxy import _LoopProxy, _OnLoop

_T = TypeVar("_T")

_get_running_loop = asyncio._get_running_loop
_current_task = asyncio.current_task
_all_tasks = asyncio.all_tasks

# the message of the SQLAlchemy line in use (set_missing_greenlet_message)
_missing_greenlet_message = (
    "greenlet_spawn has not been called; can't call await_() "
    "here. Was IO attempted in an unexpected place?"
)


def set_missing_greenlet_message(message: str) -> None:
    """``MissingGreenlet``'s message as the installed SQLAlchemy line
    words it (set by _sqla._patching)."""
    global _missing_greenlet_message
    _missing_greenlet_message = message


def missing_greenlet() -> BaseException:
    """The ``MissingGreenlet`` that ``await_()`` outside a bridge raises."""
    return sqlalchemy_exc().MissingGreenlet(_missing_greenlet_message)  # type: ignore[no-any-return]


def run_on_loop_thread(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``fn`` on the host's event-loop thread when called from a bridge
    worker whose host runs asyncio; call it here otherwise."""
    call = getattr(_local, "call", None)
    if call is None or call.loop is None or getattr(_local, "driver", None) is not None:
        # (in a driver-loop connection's method the driver's loop is this
        # thread's: it is not running now, so its calls are safe here)
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
        safe_close(awaitable)
        raise missing_greenlet()
    driver = getattr(_local, "driver", None)
    if driver is not None:
        # a method of a connection with a loop of its own (_driver_loop)
        return cast(_T, driver.run(call, awaitable))
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
            safe_close(awaitable)
            raise sqlalchemy_exc().MissingGreenlet(
                "greenlet_spawn has not been called and asyncio event "
                "loop is already running; can't call await_fallback() here. "
                "Was IO attempted in an unexpected place?"
            )
        return loop.run_until_complete(awaitable)
    driver = getattr(_local, "driver", None)
    if driver is not None:
        return cast(_T, driver.run(call, awaitable))
    return cast(_T, call.switch(awaitable))


async def greenlet_spawn(
    fn: Callable[..., _T],
    *args: Any,
    _require_await: bool = False,
    **kwargs: Any,
) -> _T:
    """Run the sync callable ``fn`` in a worker thread; every
    :func:`await_` it performs is awaited by the calling task."""
    # calls contending for pool connections beyond max_pool_waiters wait
    # here, in the loop, without a thread (see _sqla._admission)
    gate = _host.gate
    slot: Any = gate.try_admit(fn, args)
    if slot is gate.WAIT:
        slot = await gate.admit(fn, args)
    loop = _get_running_loop()
    if loop is not None:
        return cast(_T, await _asyncio.spawn(loop, fn, args, kwargs, _require_await, slot))
    return cast(_T, await _trio.spawn(fn, args, kwargs, _require_await, slot))


def current_task(loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """``asyncio.current_task()`` that, in a bridge worker, returns the task
    awaiting the bridge -- the task that is current for the sync code under
    greenlet (``async_scoped_session(..., scopefunc=current_task)`` relies
    on it)."""
    call = getattr(_local, "call", None)
    if call is not None and call.loop is not None and (loop is None or loop is call.loop):
        if loop is None and _in_driver_loop():
            # a driver connection's own loop runs here (_driver_loop): its
            # task is current (asyncio.timeout() inside the driver needs it)
            return _current_task()
        return call.task
    return _current_task(loop)


def _in_driver_loop() -> bool:
    """Whether this worker thread is running a driver connection's loop."""
    running = asyncio._get_running_loop()
    return running is not None and running.is_running() and not isinstance(running, _LoopProxy)


def all_tasks(loop: asyncio.AbstractEventLoop | None = None) -> set[asyncio.Task[Any]]:
    """``asyncio.all_tasks()`` that, in a bridge worker, lists the tasks of
    the host's loop -- the calling task included -- as it would on
    greenlet's loop thread.  It is read on the loop thread (the task
    registry is the loop's, not thread-safe), which costs a hop."""
    call = getattr(_local, "call", None)
    if call is not None and call.loop is not None and (loop is None or loop == call.loop):
        if loop is None and _in_driver_loop():
            return _all_tasks()
        return cast("set[asyncio.Task[Any]]", call.switch(_OnLoop(_all_tasks, (call.loop,), {})))
    return _all_tasks(loop)


def note_sync_io() -> None:
    """Called by a sync-driver dialect in a worker: this call did its I/O
    in the worker, so ``_require_await`` is satisfied."""
    call = getattr(_local, "call", None)
    if call is not None:
        call.sync_io = True


def run_blocking(interrupter: Callable[[], None] | None, fn: Callable[..., _T], *args: Any) -> _T:
    """Call ``fn(*args)``, a blocking call of the sync code (a sync driver's
    statement), as an await point: a cancellation of the task that awaits
    the bridge is raised there -- at once if it arrived before, when ``fn``
    returns if it arrives meanwhile, after calling ``interrupter()`` (from
    another thread) to make ``fn`` return early.  Outside a worker it is
    just ``fn(*args)``.  See _blocking."""
    call = getattr(_local, "call", None)
    if call is None:
        return fn(*args)
    return call.blocking().run(interrupter, fn, args)  # type: ignore[no-any-return]


def cancellation_point() -> None:
    """In a worker: raise a cancellation of the calling task that arrived
    while the sync code ran plain Python, if one is pending (see
    _blocking.Blocking.checkpoint).  Outside a worker: nothing."""
    call = getattr(_local, "call", None)
    if call is not None:
        call.checkpoint()


def ended_cleanly(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation that :func:`run_blocking` raised in
    the current worker in place of an outcome the blocking call produced by
    itself (it returned, raised an Exception, or never started): the
    connection it used is in order, not abandoned mid-protocol."""
    call = getattr(_local, "call", None)
    return call is not None and call.blocking().clean is exc


def host_is_trio() -> bool:
    """True in a bridge worker whose host task runs under trio."""
    call = getattr(_local, "call", None)
    return call is not None and call.loop is None


def current_loop_of_worker() -> Any:
    """The asyncio loop the sync code of the current worker thread sees:
    its driver connection's own (_driver_loop) in one of that connection's
    methods, else its host's; None (not in a worker, or the host is not
    asyncio)."""
    call = getattr(_local, "call", None)
    if call is None:
        return None
    driver = getattr(_local, "driver", None)
    if driver is not None:
        return driver.loop
    return call.loop


def driver_loops_in_force() -> bool:
    """Whether a driver connection made now, in this worker, gets a loop of
    its own (_host.driver_loops_on)."""
    call = getattr(_local, "call", None)
    return call is not None and _host.driver_loops_on(_options.current, call.loop)


def new_driver_loop() -> DriverLoop:
    """A loop for a driver connection about to be made (see _driver_loop)."""
    return DriverLoop()
