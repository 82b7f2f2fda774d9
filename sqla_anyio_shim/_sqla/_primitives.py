"""Loop-safe replacements for the asyncio primitives SQLAlchemy touches from
sync code.

Upstream, the pool's ``AsyncAdaptedQueue`` and the event system's
``AsyncAdaptedLock`` wrap an ``asyncio.Queue`` / ``asyncio.Lock`` and call
their non-blocking methods (``put_nowait``, ``get_nowait``, ``release``)
directly from the sync code.  That is fine in a greenlet, which runs on the
loop thread; from a worker thread it would touch asyncio objects from the
wrong thread.  Routing every ``put_nowait`` through the loop would cost a
round trip per pool checkout and checkin, so instead the state lives behind
a ``threading.Lock`` and only *waiting* happens on the loop: a waiter is a
future (asyncio) or an Event (trio) created on the loop, and it is woken
thread-safely (``call_soon_threadsafe`` / ``run_sync_soon``) when the sync
code on a worker changes the state.  The uncontended path never leaves the
worker thread.

Waiters are woken, not handed the item (asyncio.Queue's own semantics): a
waiter that is cancelled after being woken passes the wake-up on, and the
item stays in the queue (SQLAlchemy issue #13749 and its tests).

Also here: the asyncio-only pieces of ``sqlalchemy.ext.asyncio`` that have an
anyio/trio equivalent (``_run_to_completion``, the exit and cancellation
exception checks) and the module proxy that makes ``asyncio.shield()`` and
``asyncio.get_event_loop()`` called from sync code safe.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import _bridge
from .._bridge import _driver_loop
from .._bridge._wakeups import (
    _abandon,
    _deadline,
    _wait,
    _Waiter,
    _wake_one,
)
from . import _admission

_get_running_loop = asyncio._get_running_loop
_TIMEOUT = object()


def _missing_greenlet() -> BaseException:
    return _bridge.missing_greenlet()


# -- the pool's queue ------------------------------------------------------


class _QueueState:
    __slots__ = ("bound", "getters", "items", "lifo", "maxsize", "mutex", "putters")

    def __init__(self, maxsize: int, lifo: bool) -> None:
        # Reentrant for the garbage collector's sake.  A task of a closed
        # event loop that waited here is a reference cycle once its waiter
        # has been dropped (_wake_one); the cyclic GC finalizes it on
        # whatever thread allocates at that moment -- possibly one inside
        # this very mutex -- and the coroutine's cleanup (_abandon) takes
        # the mutex: with a plain Lock that thread, and the queue with it,
        # would deadlock.  Only _abandon can nest so; it cannot change the
        # items or the lock state, so its decisions agree with those of the
        # section it interrupts, and _wake_one re-checks its deque after
        # every wake-up.
        self.mutex = threading.RLock()
        self.items: deque[Any] = deque()
        self.maxsize = maxsize
        self.lifo = lifo
        self.getters: deque[_Waiter] = deque()
        self.putters: deque[_Waiter] = deque()
        self.bound: Any = None

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self.items)

    def take(self) -> Any:
        item = self.items.pop() if self.lifo else self.items.popleft()
        _wake_one(self.putters)
        return item

    def add(self, item: Any) -> None:
        self.items.append(item)
        _wake_one(self.getters)

    def new_waiter(self, owner: Any) -> _Waiter:
        waiter = _Waiter()
        identity = waiter.loop_identity
        if self.bound is None:
            self.bound = identity
        elif self.bound is not identity:
            raise RuntimeError(f"{owner!r} is bound to a different event loop")
        return waiter


def _queue_state(queue: Any) -> _QueueState:
    state = queue.__dict__.get("_sqla_anyio_shim_state")
    if state is None:
        # dict.setdefault is atomic: two threads racing here get one state
        state = queue.__dict__.setdefault(
            "_sqla_anyio_shim_state",
            _QueueState(queue.maxsize, queue.use_lifo),
        )
    return state  # type: ignore[no-any-return]


async def _queue_get(queue: Any, state: _QueueState, timeout: float | None) -> Any:
    deadline = _deadline(timeout)
    while True:
        with state.mutex:
            if state.items:
                return state.take()
            waiter = state.new_waiter(queue)
            state.getters.append(waiter)
        try:
            woken = await _wait(waiter, deadline)
        except BaseException:
            with state.mutex:
                _abandon(state.getters, waiter, bool(state.items))
            raise
        if not woken:
            with state.mutex:
                _abandon(state.getters, waiter, bool(state.items))
                if state.items:
                    return state.take()
            return _TIMEOUT


def _gate_waited() -> float:
    """Seconds the current call waited at its pool's admission gate, if it
    has not been charged for them yet (once: a second checkout in the same
    call has its whole timeout)."""
    call = _bridge.current_call()
    slot = call.gate_slot if call is not None else None
    if slot is None:
        return 0.0
    waited: float = slot.waited
    if waited:
        slot.waited = 0.0
    return waited


# a call waiting here keeps its admission slot (see _admission)
_admission.pool_wait_codes.add(_queue_get.__code__)


async def _queue_put(queue: Any, state: _QueueState, item: Any, timeout: float | None) -> Any:
    deadline = _deadline(timeout)
    while True:
        with state.mutex:
            if not state.full():
                state.add(item)
                return None
            waiter = state.new_waiter(queue)
            state.putters.append(waiter)
        try:
            woken = await _wait(waiter, deadline)
        except BaseException:
            with state.mutex:
                _abandon(state.putters, waiter, not state.full())
            raise
        if not woken:
            with state.mutex:
                _abandon(state.putters, waiter, not state.full())
                if not state.full():
                    state.add(item)
                    return None
            return _TIMEOUT


def _await_for(queue: Any) -> Callable[[Any], Any]:
    # SQLAlchemy 2.0's queues carry their await function as a staticmethod
    # (await_only or await_fallback); 2.1 uses await_ directly
    return getattr(type(queue), "await_", None) or _bridge.await_


class QueueMethods:
    """Methods installed on ``sqlalchemy.util.queue.AsyncAdaptedQueue``."""

    def empty(self: Any) -> bool:
        return not _queue_state(self).items

    def full(self: Any) -> bool:
        return _queue_state(self).full()

    def qsize(self: Any) -> int:
        return len(_queue_state(self).items)

    def put_nowait(self: Any, item: Any) -> None:
        from sqlalchemy.util.queue import Full

        state = _queue_state(self)
        with state.mutex:
            if state.full():
                raise Full()
            state.add(item)

    def put(self: Any, item: Any, block: bool = True, timeout: float | None = None) -> None:
        from sqlalchemy.util.queue import Full

        if not block:
            return self.put_nowait(item)  # type: ignore[no-any-return]
        # a blocking put is where a pending cancellation lands, even when
        # there is room (see get)
        _bridge.cancellation_point()
        state = _queue_state(self)
        if _await_for(self)(_queue_put(self, state, item, timeout)) is _TIMEOUT:
            raise Full()
        return None

    def get_nowait(self: Any) -> Any:
        from sqlalchemy.util.queue import Empty

        state = _queue_state(self)
        with state.mutex:
            if not state.items:
                raise Empty()
            return state.take()

    def get(self: Any, block: bool = True, timeout: float | None = None) -> Any:
        from sqlalchemy.util.queue import Empty

        state = _queue_state(self)
        if block:
            # a blocking get is where a cancellation of the task that
            # arrived while the sync code ran lands, even when an item is
            # there: under greenlet the get would have been reached first,
            # waited, and been cancelled with the item left in the queue
            # (SQLAlchemy's #13749; _blocking.Blocking.checkpoint)
            _bridge.cancellation_point()
        with state.mutex:
            # an item that's already available is taken without awaiting
            if state.items:
                return state.take()
            if not block:
                raise Empty()
        if timeout is not None:
            # the pool's clock ran while the call waited at the pool's
            # admission gate: pool_timeout covers both waits (_admission)
            timeout -= _gate_waited()
            if timeout <= 0:
                raise Empty()
        result = _await_for(self)(_queue_get(self, state, timeout))
        if result is _TIMEOUT:
            raise Empty()
        return result


# -- the event system's lock -----------------------------------------------


class _LockState:
    __slots__ = ("locked", "mutex", "waiters")

    def __init__(self) -> None:
        # reentrant, for the reason given in _QueueState
        self.mutex = threading.RLock()
        self.locked = False
        self.waiters: deque[_Waiter] = deque()


def _lock_state(lock: Any) -> _LockState:
    state = lock.__dict__.get("_sqla_anyio_shim_state")
    if state is None:
        state = lock.__dict__.setdefault("_sqla_anyio_shim_state", _LockState())
    return state  # type: ignore[no-any-return]


async def _lock_acquire(state: _LockState) -> bool:
    while True:
        with state.mutex:
            if not state.locked:
                state.locked = True
                return True
            waiter = _Waiter()
            state.waiters.append(waiter)
        try:
            await waiter.wait()
        except BaseException:
            with state.mutex:
                _abandon(state.waiters, waiter, not state.locked)
            raise


class LockMethods:
    """Methods installed on ``AsyncAdaptedLock``."""

    def __enter__(self: Any) -> bool:
        if not _bridge.in_greenlet():
            raise _missing_greenlet()
        state = _lock_state(self)
        with state.mutex:
            if not state.locked:
                state.locked = True
                return True
        return _bridge.await_(_lock_acquire(state))

    def __exit__(self: Any, *arg: Any, **kw: Any) -> None:
        state = _lock_state(self)
        with state.mutex:
            state.locked = False
            _wake_one(state.waiters)


# -- ext/asyncio helpers -----------------------------------------------------


def make_run_to_completion(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    async def _run_to_completion(coro: Any) -> Any:
        """Run ``coro`` to completion despite cancellation, re-raising the
        cancellation afterwards (upstream's semantics, on any backend)."""
        if _get_running_loop() is not None:
            return await original(coro)
        import trio

        with trio.CancelScope(shield=True):
            result = await coro
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    _run_to_completion.__wrapped__ = original  # type: ignore[attr-defined]
    return _run_to_completion


def _trio_cancelled() -> type | None:
    trio = sys.modules.get("trio")
    return trio.Cancelled if trio is not None else None


def is_exit_exception(e: BaseException) -> bool:
    # note asyncio.CancelledError and trio.Cancelled are BaseExceptions
    return not isinstance(e, Exception) or isinstance(
        e, (asyncio.TimeoutError, asyncio.CancelledError)
    )


def is_cancellation_exception(e: BaseException) -> bool:
    if isinstance(e, asyncio.CancelledError):
        return True
    cancelled = _trio_cancelled()
    return cancelled is not None and isinstance(e, cancelled)


# -- asyncio functions called from sync code --------------------------------


async def _shielded(awaitable: Any) -> Any:
    if _get_running_loop() is not None:
        return await asyncio.shield(awaitable)
    import trio

    with trio.CancelScope(shield=True):
        result = await awaitable
    await trio.lowlevel.checkpoint_if_cancelled()
    return result


class AsyncioProxy(types.ModuleType):
    """Stands in for the ``asyncio`` module in the globals of SQLAlchemy
    modules whose sync code calls asyncio functions.

    ``asyncio.shield(coro)`` in a worker would create a task from the wrong
    thread; here it returns a coroutine that shields ``coro`` when the host
    awaits it.  ``asyncio.get_event_loop()`` in a worker returns the host's
    loop (aiosqlite's isolation-level setter creates a future on it, which
    the aiosqlite thread completes with ``call_soon_threadsafe``; creating a
    Future object touches no loop state).  Everything else is the real
    asyncio module.
    """

    def __init__(self) -> None:
        super().__init__("asyncio")

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def shield(self, awaitable: Any) -> Any:
        if _driver_loop.current() is not None:
            # in a method of a connection with a loop of its own, which is
            # this thread's running loop for now: the real shield, a task on
            # that loop (as on greenlet's loop thread), awaited there
            return asyncio.shield(awaitable)
        if _bridge.in_greenlet():
            return _shielded(awaitable)
        return asyncio.shield(awaitable)

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = _bridge.current_loop_of_worker()
        if loop is not None:
            return loop  # type: ignore[no-any-return]
        return asyncio.get_event_loop()


asyncio_proxy = AsyncioProxy()
