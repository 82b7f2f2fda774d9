"""What sync code in a worker sees of the host's asyncio loop.

Under greenlet the sync code runs on the loop thread, so
``asyncio.get_running_loop()``, ``asyncio.create_task()`` or a captured
``loop.call_soon()`` simply work there.  In a worker they would touch the
loop from the wrong thread.  The bridge sets the worker's running loop to a
:class:`_LoopProxy` for the duration of a call: thread-safe methods are
called directly, the others hop to the loop thread (an :class:`_OnLoop`
awaitable the host runs synchronously, inside the calling task) and return
their result, as they would on greenlet's loop thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any


class _OnLoop:
    """An awaitable the worker hands to the host to run ``fn`` *on the loop
    thread*, synchronously, inside the host task (its context, its loop):
    the thread analogue of sync code calling a loop API on greenlet's loop
    thread.  It never suspends, so it is not a cancellation point."""

    __slots__ = ("args", "fn", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __await__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)
        yield  # pragma: no cover -- makes this a generator


# loop methods that are thread-safe or read-only: called directly
_THREADSAFE_LOOP_METHODS = frozenset(
    {
        "call_soon_threadsafe",
        "time",
        "is_running",
        "is_closed",
        "get_debug",
        "get_task_factory",
        "get_exception_handler",
    }
)


class _LoopProxy:
    """What ``asyncio.get_running_loop()`` returns in a worker whose host
    runs an asyncio loop.

    Under greenlet the sync code runs on the loop thread, so it may call any
    loop method.  From a worker, methods that are not thread-safe
    (``call_soon``, ``create_task``, ``create_future``, ...) hop to the loop
    thread and run there inside the host task, synchronously, returning
    their result; thread-safe ones are called directly.  Used from the loop
    thread itself, it is the loop.  Used from any other thread (the proxy
    kept past the call and handed to a foreign thread), a non-thread-safe
    method raises a RuntimeError naming the limitation, instead of
    corrupting the loop."""

    __slots__ = ("_current_call", "_loop", "_loop_thread")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        loop_thread: int,
        current_call: Callable[[], Any],
    ) -> None:
        self._loop = loop
        self._loop_thread = loop_thread
        # the bridge's "which call is this worker running" (no import cycle)
        self._current_call = current_call

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._loop, name)
        if not callable(attr) or name in _THREADSAFE_LOOP_METHODS:
            return attr
        loop_thread = self._loop_thread
        if threading.get_ident() == loop_thread:
            return attr
        loop = self._loop
        current_call = self._current_call

        def method(*args: Any, **kwargs: Any) -> Any:
            call = current_call()
            if call is not None and call.loop is loop:
                return call.switch(_OnLoop(attr, args, kwargs))
            if threading.get_ident() == loop_thread:
                return attr(*args, **kwargs)
            raise RuntimeError(
                f"loop.{name}() was called from a thread that is neither the "
                "event loop's nor a sqla-anyio-shim worker serving it (the "
                "loop object was obtained in sync code and kept past the "
                "call); use loop.call_soon_threadsafe() from other threads"
            )

        method.__name__ = name
        return method

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _LoopProxy):
            other = other._loop
        return other is self._loop

    def __hash__(self) -> int:
        return hash(self._loop)

    def __repr__(self) -> str:
        return f"<sqla-anyio-shim worker view of {self._loop!r}>"
