"""Ctrl-C and the host's own bookkeeping: keep a KeyboardInterrupt from
escaping between two of the host's steps.

Python has no atomic section.  A Ctrl-C is raised by the SIGINT handler at
whatever bytecode the main thread is running, and the host's code has steps
that must happen together: a worker taken from the pool must be handed its
call; a message taken from the worker must get its reply.  An interrupt
raised in between leaves the worker waiting for ever (on greenlet the sync
code runs on the loop thread, and there is nothing in between to lose).
Where the host *waits* it already turns an interrupt into one for the sync
code (_host._acquire_blocking, _host._start); these are the steps between
the waits.

The fix is trio's (``trio/_core/_ki.py``): while the bridge has a call in
flight on the main thread, the SIGINT handler is wrapped by :func:`_guard`,
which looks at the frame the signal interrupted.  In the bridge's own code
(a chain of this package's frames up to :func:`_host.run_call` or a
backend's ``spawn``) the interrupt is *deferred*: the call records it
(``call.interrupt``), and the host delivers it at its next wait -- into the
sync code, as greenlet would have -- and greenlet_spawn() raises it when
the sync code is done.  Anywhere else (the loop, a driver's coroutine the
host awaits, the caller's code) the wrapped handler runs as it would have.

Only the main thread gets signals, so calls on loops of other threads are
not counted.  The wrapper is put in when the first main-thread call starts
and taken out after the last one ends (under asyncio at the loop's next
iteration, see :func:`leave`): outside the bridge, the process's
handler is exactly the one it set (asyncio.run() checks for Python's
default handler before putting in its own, and puts the default back only
if its own is still there).  Under trio, trio's own handler is wrapped the
same way: its delivery of a Ctrl-C (raising KeyboardInterrupt in an
unprotected task's frame) is what would otherwise escape the host.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # C; no stubs
import os
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

__all__ = ["close", "deferred", "enter", "leave", "protect"]

_SIGINT = _signal.SIGINT
_get_ident = threading.get_ident
_main_ident = threading.main_thread().ident

#: this package's source directory: frames of files under it are the
#: bridge's own (the walk in _protected_root passes through them)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

#: the code objects whose frames own a call: run_call and the backends'
#: spawn() (registered by protect())
_roots: set[CodeType] = set()

#: calls in flight on the main thread (only the main thread changes it)
_active = 0
#: the handler the guard wraps while _active > 0; None: not installed
_wrapped: Callable[[int, Any], Any] | None = None

#: interrupts deferred in a spawn() before its call existed; it takes them
#: over (or raises them) -- main thread only
_early: list[BaseException] = []


def protect(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` (a function whose frame has a local ``call`` once it owns
    one) as a root of the bridge's protected code."""
    _roots.add(fn.__code__)
    return fn


def enter() -> bool:
    """A call starts on this thread: put the guard in if it is the main
    thread's first.  Returns whether :func:`leave` must be called."""
    global _active, _wrapped
    if _get_ident() != _main_ident:
        return False
    _active += 1
    if _active == 1 and _wrapped is None:
        current = _signal.getsignal(_SIGINT)
        if callable(current) and current is not _guard:
            try:
                _signal.signal(_SIGINT, _guard)
            except ValueError:
                # the main thread of a subinterpreter: only the main
                # interpreter's gets signals, so there is nothing to guard
                return True
            _wrapped = current
    return True


def leave(schedule: Callable[[Callable[[], None]], Any] | None) -> None:
    """The call started by a True :func:`enter` is over.  After the last
    one the guard is taken out -- at the loop's next iteration if
    ``schedule`` (asyncio's ``loop.call_soon``) is given: a task making one
    call after another would otherwise swap the process's handler twice a
    call (two ``signal.signal()`` calls, ~2 us), and the next call usually
    starts before the loop iterates."""
    global _active, _restore_scheduled
    _active = max(_active - 1, 0)
    if _active or _wrapped is None:
        return
    if schedule is None:
        _restore()
    elif not _restore_scheduled:
        _restore_scheduled = True
        try:
            schedule(_restore_when_idle)
        except RuntimeError:  # the loop is closed
            _restore_scheduled = False
            _restore()


#: a _restore_when_idle is scheduled
_restore_scheduled = False


def _restore_when_idle() -> None:
    global _restore_scheduled
    _restore_scheduled = False
    if not _active:
        _restore()


def _restore() -> None:
    """Put the wrapped handler back (if nobody replaced the guard)."""
    global _wrapped
    wrapped, _wrapped = _wrapped, None
    if wrapped is not None and _signal.getsignal(_SIGINT) is _guard:
        _signal.signal(_SIGINT, wrapped)


def close(schedule: Callable[[Callable[[], None]], Any] | None) -> None:
    """The last step of a spawn() that :func:`enter` guarded: :func:`leave`,
    then raise a Ctrl-C the guard deferred where no call could take it any
    more (before the call existed, or after its outcome was settled) --
    nothing is owed now.  Inside this function an interrupt is not deferred
    at all (_protected_root)."""
    leave(schedule)
    late = deferred()
    if late is not None:
        raise late


def deferred() -> BaseException | None:
    """An interrupt deferred in spawn() before its call existed, if any
    (taken: the caller delivers it)."""
    return _early.pop() if _early else None


def _guard(signum: int, frame: FrameType | None) -> Any:
    wrapped = _wrapped
    if wrapped is None:  # pragma: no cover -- taken out as the signal came
        return _signal.default_int_handler(signum, frame)
    try:
        return wrapped(signum, frame)
    except BaseException as exc:  # KeyboardInterrupt, or what the handler raises
        # (with no call in flight -- the guard not taken out yet -- the
        # walk finds no root either)
        root = _protected_root(frame)
        if root is None:
            raise
        call = root.f_locals.get("call")
        if call is None or call.settled:
            # spawn() before its call exists, or the call's outcome is
            # settled: spawn() raises it (or run_call(), starting, takes
            # it over)
            _early.append(exc)
        elif call.interrupt is None:
            call.interrupt = exc
            call.interrupt_pending = True
            _deliver_now(call)
        return None


def _deliver_now(call: Any) -> None:
    """Carry a deferred interrupt into the sync code now, if the call's
    lock can be had: the host may be blocked waiting for the worker (it
    would not reach its next wait until the worker's next message).  The
    interrupted code may hold that lock itself -- then the host delivers it
    at its next wait (_host.deliver_deferred)."""
    from . import _interrupts

    if not call.state.acquire(timeout=0.05):
        return
    try:
        if call.interrupt_pending:
            call.interrupt_pending = False
            _interrupts.inject_locked(call, type(call.interrupt))
    finally:
        call.state.release()


def _protected_root(frame: FrameType | None) -> FrameType | None:
    """The frame of run_call / spawn whose bookkeeping ``frame`` belongs
    to, if the chain from ``frame`` to it is all the bridge's own code."""
    while frame is not None:
        code = frame.f_code
        if code is _CLOSE_CODE:
            return None  # spawn() is past its call: nothing is owed any more
        if code in _roots:
            return frame
        if not code.co_filename.startswith(_PACKAGE_DIR):
            return None
        frame = frame.f_back
    return None


_CLOSE_CODE = close.__code__
