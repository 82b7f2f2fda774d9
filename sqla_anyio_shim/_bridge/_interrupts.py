"""Ctrl-C in the sync code: raise an exception in a worker thread at its
next line of Python code.

Used for one thing only: a Ctrl-C (or the runner's teardown cancel) that hit
the event loop thread while a worker runs the caller's sync code.  On
greenlet that sync code runs on the loop thread, where the signal lands in
it directly; here the interrupt has to be carried over to the worker
(:func:`inject`), and only while the worker runs the caller's code, never
the bridge's (``_Call.enter_user`` / ``leave_user``).

Two mechanisms, chosen by interpreter:

* ``PyThreadState_SetAsyncExc`` (every CPython but 3.13): the exception is
  raised at the worker's next eval-breaker check.
* ``sys.monitoring`` LINE events (CPython 3.13): there the eval-breaker check
  of a loop's backward jump can sit outside the exception table of the
  enclosing ``try`` (a compiler bug, fixed in 3.14; see CPython issues
  gh-139622 and gh-148278), so an exception raised there skips the sync
  code's own ``except`` / ``finally`` -- a ``while ...: pass`` loop inside
  ``try`` loses its cleanup about four times in five.  A LINE event fires
  at the start of a line, which the ``try`` always covers.  The events are
  switched on only while an interrupt is pending, and only for this
  package's own tool id, so a debugger or coverage tool is not disturbed.

Both are best effort by nature: code blocked in a C call sees the exception
only when it returns to Python (the bridge then also delivers the interrupt
at the next ``await_()``, see _host._next_message).
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._call import _Call

__all__ = ["available", "inject", "inject_locked", "raise_in_thread", "withdraw"]

_TOOL_NAME = "sqla-anyio-shim"

try:
    import ctypes

    _set_async_exc: Any = ctypes.pythonapi.PyThreadState_SetAsyncExc
    _c_thread_id: Any = ctypes.c_ulong
    _py_object: Any = ctypes.py_object
except (ImportError, AttributeError):  # pragma: no cover -- not CPython
    _set_async_exc = None

# typed Any: sys.monitoring exists from 3.12 on, and only 3.13 uses it
_monitoring: Any = getattr(sys, "monitoring", None)
_use_monitoring = (
    sys.version_info[:2] == (3, 13)
    and sys.implementation.name == "cpython"
    and _monitoring is not None
)

# thread id -> exception type waiting for that thread's next LINE event
_pending: dict[int, type] = {}
_lock = threading.Lock()
_tool_id: int | None = None


def available() -> bool:
    """Whether this interpreter can raise in another thread at all."""
    return _use_monitoring or _set_async_exc is not None


def raise_in_thread(thread_id: int, exc_type: type) -> None:
    """Make ``exc_type`` be raised in thread ``thread_id`` at its next line
    (monitoring) or bytecode (async exception) of Python code."""
    if _use_monitoring and _monitoring_tool() is not None:
        with _lock:
            _pending[thread_id] = exc_type
            # switched on while the lock is held: withdraw() switching it off
            # cannot interleave
            _monitoring.set_events(_tool_id, _monitoring.events.LINE)
        return
    if _set_async_exc is not None:
        _set_async_exc(_c_thread_id(thread_id), _py_object(exc_type))


def withdraw(thread_id: int) -> None:
    """Cancel an exception requested by raise_in_thread() that has not been
    raised yet (the thread left the code it was meant for)."""
    if _use_monitoring and _tool_id is not None:
        with _lock:
            if _pending.pop(thread_id, None) is not None and not _pending:
                _monitoring.set_events(_tool_id, 0)
        return
    if _set_async_exc is not None:
        _set_async_exc(_c_thread_id(thread_id), None)
        if _SHARED_ASYNC_EXC_FLAG:
            _clear_async_exc_flag()


class _ClearFlag(BaseException):
    """Raised in the withdrawing thread only, and caught right there."""


# Before 3.13 the "an async exception is pending" flag of the eval breaker
# is the interpreter's, not the thread's, and only a thread that finds an
# exception of its own clears it.  A withdrawn exception is found by no one,
# so the flag stays set for good: on 3.10 and 3.12 every thread then runs
# the eval breaker's slow path at each backward jump and call (pure-Python
# loops ~20% slower), and on 3.11 a call made under sys.setprofile() or
# sys.settrace() re-runs its RESUME forever -- the process hangs at the next
# profiled or traced function call (this hung CI in tests/test_tracing.py
# after test_edges' withdrawn interrupts).  Raising one exception of our own
# in this thread, and catching it, clears the flag.  (Like CPython's own
# handling, that also clears it for another thread's pending exception,
# which then lands at the next signal rather than at once: the interrupts
# are best effort, and a second one is delivered at the next await_().)
_SHARED_ASYNC_EXC_FLAG = sys.version_info < (3, 13)


def _clear_async_exc_flag() -> None:
    # a trace or profile function the worker follows (_tracing) is set
    # aside meanwhile: raised inside it, the exception would make CPython
    # drop it for the rest of the call
    trace, profile = sys.gettrace(), sys.getprofile()
    if trace is not None:
        sys.settrace(None)
    if profile is not None:
        sys.setprofile(None)
    try:
        _set_async_exc(_c_thread_id(threading.get_ident()), _py_object(_ClearFlag))
        # raised at the eval-breaker check of the loop's first backward jump
        for _ in range(1_000_000):
            pass
    except _ClearFlag:
        pass
    else:  # pragma: no cover -- never on CPython; do not leave it to fire later
        _set_async_exc(_c_thread_id(threading.get_ident()), None)
    finally:
        if trace is not None:
            sys.settrace(trace)
        if profile is not None:
            sys.setprofile(profile)


def _on_line(code: Any, line: int) -> Any:
    """sys.monitoring LINE callback, for every thread while an interrupt is
    pending: raise it in its thread, and nowhere else."""
    ident = threading.get_ident()
    if ident not in _pending:
        return None
    with _lock:
        exc_type = _pending.pop(ident, None)
        if not _pending:
            _monitoring.set_events(_tool_id, 0)
    if exc_type is None:  # withdrawn meanwhile
        return None
    raise exc_type


def _monitoring_tool() -> int | None:
    """This package's sys.monitoring tool id, claimed on first use (a
    free one of the six; None if a debugger, profiler and coverage tool
    took them all, and the async exception is used instead)."""
    global _tool_id
    if _tool_id is not None:
        return _tool_id
    with _lock:
        if _tool_id is None:
            monitoring = _monitoring
            # the ids PEP 669 leaves unassigned first, the named ones last
            for candidate in (3, 4, 0, 1, 2, 5):
                if monitoring.get_tool(candidate) is not None:
                    continue
                try:
                    monitoring.use_tool_id(candidate, _TOOL_NAME)
                except ValueError:  # taken meanwhile
                    continue
                monitoring.register_callback(candidate, monitoring.events.LINE, _on_line)
                _tool_id = candidate
                break
    return _tool_id


def inject(call: _Call, exc_type: type) -> None:
    """Raise ``exc_type`` in ``call``'s worker at its next line, if it is
    running the caller's sync code (never inside the bridge's own code), as
    a signal raises in whatever Python code greenlet's loop thread is
    running."""
    with call.state:
        inject_locked(call, exc_type)


def inject_locked(call: _Call, exc_type: type) -> None:
    """:func:`inject` with ``call.state`` held by the caller."""
    if available() and call.user_running and not call.injected:
        call.injected = True
        raise_in_thread(call.thread_id, exc_type)
