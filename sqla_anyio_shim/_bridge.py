"""The thread bridge: ``greenlet_spawn()`` / ``await_()`` without greenlet.

How it works (the thread analogue of SQLAlchemy's greenlet driver loop)
-----------------------------------------------------------------------
``greenlet_spawn(fn)`` is awaited by a task on the event loop (the *host*).
It hands ``fn`` to a worker thread (:mod:`._workers`) and then runs a small
message loop, exactly like the ``while not context.dead`` loop of upstream:

1. The worker runs ``fn``.  When the sync code calls ``await_(aw)``, the
   worker puts ``aw`` in the call's *outbox*, releases the call's ``ready``
   lock and blocks on its ``reply`` lock.
2. The host awaits ``aw`` *itself*, inside its own task, cancel scopes and
   context, puts the value or the exception in the *inbox* and releases
   ``reply``.  The worker returns the value from ``await_()`` or raises the
   exception there, with its traceback.
3. When ``fn`` returns or raises, the worker marks itself idle (so the next
   call reuses it) and delivers the outcome; ``greenlet_spawn()`` returns it.

The hand-off
------------
While the worker runs, the host first waits on ``ready`` *blocking its
thread*, for at most :data:`handoff_timeout`: exactly one of the two threads
runs at a time, as with greenlet (which runs the sync code on the loop
thread, blocking the loop), and a hop costs two thread wake-ups with no
event-loop iteration and no GIL contention.  If the sync code runs longer
(a cold statement compile, a sync driver doing I/O), the host stops
blocking and waits through the event loop instead; the worker then also
posts a one-way wake-up (``call_soon_threadsafe`` / ``run_sync_soon``), so
other tasks never stall behind a long stretch of sync code.

Context variables
-----------------
greenlet runs the sync code in the *same* context as the awaiting task.  A
thread cannot share a Context object (a Context can only be entered by one
thread at a time), so the bridge keeps two in step on every hop, the way
asgiref's ``_restore_context`` does: the worker runs in a copy of the host's
context; before the host awaits ``aw`` it copies into its own context every
variable whose value differs, and it sends a snapshot of its context back
with the reply, which the worker applies the same way.  Context objects are
immutable maps compared by identity first, so an unchanged context costs one
pointer comparison per hop.

Cancellation
------------
With greenlet, a task can only be cancelled where it is suspended, which is
always at an ``await_()``.  Here the host may also be suspended while the
worker runs plain Python (past the blocking hand-off); a cancellation that
arrives then cannot interrupt that Python code, and the host keeps waiting
for the worker (no thread is ever abandoned with work in flight).

* On asyncio the ``CancelledError`` is caught and re-armed on the task just
  before the host awaits the worker's next awaitable, which then runs up to
  its first suspension and is cancelled there, exactly as asyncio delivers a
  cancel at an await point under greenlet; the sync code sees the
  ``CancelledError`` at that ``await_()`` and SQLAlchemy's cleanup runs.  If
  the sync code returns without another ``await_()``, the outcome is
  returned and the cancellation lands at the caller's next await -- raising
  it instead would lose the outcome (say, a connection just checked out),
  something greenlet never does.
* On trio the wait is uncancellable and trio's level-triggered cancellation
  lands at the next checkpoint by itself: the next awaited awaitable, or the
  caller's next checkpoint.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
from typing import Any, Awaitable, Callable, Optional, TypeVar

from . import _workers

_T = TypeVar("_T")

_get_running_loop = asyncio._get_running_loop
_copy_context = contextvars.copy_context
_CancelledError = asyncio.CancelledError
_current_task = asyncio.current_task

#: set by the pytest plugin's ``await_points`` replacement: called with each
#: awaitable the host is about to await, returns the awaitable to await
_await_hook: Optional[Callable[[Any], Any]] = None

#: How long the host blocks its thread waiting for the worker's next message
#: before it lets the event loop run.  Within this time the hand-off is a
#: direct thread-to-thread switch with no event-loop iteration, and the loop
#: is blocked exactly as it is while a greenlet runs sync code; past it, the
#: host waits through the loop so that long stretches of sync code (or a
#: sync driver's blocking I/O) never stall other tasks.  Set by install()
#: (-1: no bound, the loop is blocked until the next await point).
handoff_timeout = 0.002

#: worker-thread state: ``_local.call`` is the :class:`_Call` running here
_local = threading.local()

_MISSING = object()
_DONE = object()

# messages of the SQLAlchemy line in use; set by _patching
MISSING_GREENLET_MESSAGE = (
    "greenlet_spawn has not been called; can't call await_() "
    "here. Was IO attempted in an unexpected place?"
)
AWAIT_REQUIRED_MESSAGE = (
    "The current operation required an async execution but none was "
    "detected. This will usually happen when using a non compatible "
    "DBAPI driver. Please ensure that an async DBAPI is used."
)


def _exc() -> Any:
    # imported lazily: importing this package must not import SQLAlchemy
    # (the pytest plugin has to put a source tree's lib/ on sys.path first)
    from sqlalchemy import exc

    return exc


def _apply_context(source: contextvars.Context) -> None:
    """Set, in the current context, every variable whose value in
    ``source`` differs."""
    for var, value in source.items():
        if var.get(_MISSING) is not value:
            var.set(value)


def _safe_close(awaitable: Any) -> None:
    # close a coroutine we refuse to await, so that no "coroutine was never
    # awaited" warning leaks out (upstream's _safe_cancel_awaitable)
    if asyncio.iscoroutine(awaitable):
        awaitable.close()


class _Call:
    """One ``greenlet_spawn()`` in flight: the thread analogue of
    ``_AsyncIoGreenlet``."""

    __slots__ = (
        "fn",
        "args",
        "kwargs",
        "context",
        "worker",
        "outbox",
        "inbox",
        "ready",
        "reply",
        "async_waiting",
        "waiter",
        "post",
        "result",
        "error",
        "loop",
        "task",
        "sync_io",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        post: Callable[[Callable[[], None]], Any],
        loop: Optional[asyncio.AbstractEventLoop],
    ) -> None:
        self.loop = loop
        self.task: Any = None
        self.sync_io = False
        self.worker: Any = None
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = _copy_context()
        self.outbox: Any = None
        self.inbox: Any = None
        # worker -> host: released when the outbox holds a message
        self.ready = threading.Lock()
        self.ready.acquire()
        # host -> worker: released when the inbox holds the reply
        self.reply = threading.Lock()
        self.reply.acquire()
        # True while the host waits through the event loop rather than on
        # ``ready``: the worker must then also post a wake-up to the loop
        self.async_waiting = False
        self.waiter: Any = None
        self.post = post
        self.result: Any = None
        self.error: Optional[BaseException] = None

    # -- worker side -------------------------------------------------------

    def run(self) -> None:
        _local.call = self
        try:
            self.result = self.context.run(self.fn, *self.args, **self.kwargs)
        except BaseException as err:
            self.error = err
        finally:
            _local.call = None
            # drop what the job referenced before anything else can wait on
            # this thread
            self.fn = self.args = self.kwargs = None
        worker, self.worker = self.worker, None
        # mark ourselves idle *before* delivering, so that the caller's next
        # greenlet_spawn() finds this warm thread
        _workers.pool.release(worker)
        self.deliver(_DONE)

    def deliver(self, message: Any) -> None:
        self.outbox = message
        self.ready.release()
        # read *after* the release: if the host switched to waiting through
        # the loop before this read, it gets a wake-up; if after, its own
        # non-blocking acquire of ``ready`` sees the release
        if self.async_waiting:
            self.post(self.wakeup)

    def switch(self, awaitable: Any) -> Any:
        """``await_()`` in the worker: hand ``awaitable`` to the host and
        block until it has been awaited."""
        self.deliver(awaitable)
        self.reply.acquire()
        value, error, snapshot = self.inbox
        self.inbox = None
        if snapshot is not None:
            _apply_context(snapshot)
        if error is not None:
            try:
                raise error
            finally:
                del error
        return value

    # -- host side ---------------------------------------------------------

    def send(self, value: Any, error: Optional[BaseException]) -> None:
        snapshot = _copy_context()
        self.inbox = (
            value,
            error,
            None if snapshot == self.context else snapshot,
        )
        self.reply.release()

    def take(self) -> Any:
        """The message the worker delivered; syncs the context first."""
        message, self.outbox = self.outbox, None
        context = self.context
        if _copy_context() != context:
            _apply_context(context)
        return message

    def wakeup(self) -> None:
        """Runs on the loop thread, posted by the worker."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if self.loop is not None:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                import trio

                trio.lowlevel.reschedule(waiter)


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
        return loop.run_until_complete(awaitable)  # type: ignore[arg-type]
    return call.switch(awaitable)  # type: ignore[no-any-return]


async def greenlet_spawn(
    fn: Callable[..., _T],
    *args: Any,
    _require_await: bool = False,
    **kwargs: Any,
) -> _T:
    """Run the sync callable ``fn`` in a worker thread; every
    :func:`await_` it performs is awaited by the calling task."""
    loop = _get_running_loop()
    if loop is not None:
        call = _Call(fn, args, kwargs, loop.call_soon_threadsafe, loop)
        call.task = _current_task(loop)
        worker = _workers.pool.try_acquire()
        if worker is None:
            worker = await _wait_for_worker()
        call.worker = worker
        worker.submit(call.run)
        return await _drive_asyncio(call, loop, _require_await)
    return await _greenlet_spawn_trio(fn, args, kwargs, _require_await)


async def _drive_asyncio(
    call: _Call, loop: asyncio.AbstractEventLoop, require_await: bool
) -> Any:
    switched = False
    cancelled: Optional[BaseException] = None
    ready = call.ready
    while True:
        if not ready.acquire(True, handoff_timeout):
            # the sync code runs longer than a hand-off: let the loop run
            call.async_waiting = True
            while not ready.acquire(False):
                waiter = call.waiter = loop.create_future()
                try:
                    await waiter
                except _CancelledError as err:
                    # the worker is running plain Python and cannot be
                    # interrupted
                    call.waiter = None
                    if _is_anyio_cancellation(err):
                        # level-triggered: anyio delivers it again at the
                        # next await inside its scope, so it must not be
                        # re-armed (it would escape the scope); wait out the
                        # worker shielded, so that anyio does not retry on
                        # every loop iteration meanwhile
                        native = await _wait_shielded(call, loop)
                        if native is not None:
                            cancelled = native
                        break
                    # asyncio's own, edge-triggered: deliver it at the
                    # worker's next await_() (or the caller's next await)
                    cancelled = err
            call.async_waiting = False
        awaitable = call.take()
        if awaitable is _DONE:
            break
        switched = True
        if cancelled is not None:
            # deliver the cancellation that arrived while the sync code ran
            # plain Python exactly as asyncio would have delivered it here:
            # re-arm it on our task and await the awaitable, which then runs
            # up to its first suspension and is cancelled there (so that,
            # e.g., asyncio.shield() still starts its inner task, as it does
            # under greenlet).  The count of cancel requests stays balanced.
            _rearm(call.task, cancelled)
            cancelled = None
        await _serve(call, awaitable)
        del awaitable
    return _finish(call, cancelled, switched, require_await)


async def _serve(call: _Call, awaitable: Any) -> None:
    """Await one awaitable for the worker, in the host task, and send the
    outcome back (both backends)."""
    hook = _await_hook
    if hook is not None:
        awaitable = hook(awaitable)
    try:
        value = await awaitable
    except BaseException as err:
        call.send(None, err)
    else:
        call.send(value, None)


def _is_anyio_cancellation(err: BaseException) -> bool:
    """Whether ``err`` was delivered by an anyio cancel scope (whose
    messages start so; anyio's own ``is_anyio_cancellation`` checks the same,
    including the ``__context__`` chain)."""
    while isinstance(err, _CancelledError):
        if err.args and isinstance(err.args[0], str) and err.args[0].startswith(
            "Cancelled via cancel scope "
        ):
            return True
        err = err.__context__  # type: ignore[assignment]
    return False


async def _wait_shielded(
    call: _Call, loop: asyncio.AbstractEventLoop
) -> Optional[BaseException]:
    """Wait for the worker's next message inside a shielded anyio scope.
    Returns a native asyncio cancellation that arrived meanwhile, if any."""
    import anyio

    native: Optional[BaseException] = None
    with anyio.CancelScope(shield=True):
        while not call.ready.acquire(False):
            waiter = call.waiter = loop.create_future()
            try:
                await waiter
            except _CancelledError as err:
                call.waiter = None
                if not _is_anyio_cancellation(err):
                    native = err
    return native


def _rearm(task: Any, cancelled: BaseException) -> None:
    """Put a cancellation we caught (and so consumed) back on ``task``: it
    is then delivered at the task's next suspension, with the same count of
    cancel requests as before."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()
    task.cancel(*cancelled.args[:1])


def _finish(
    call: _Call,
    cancelled: Optional[BaseException],
    switched: bool,
    require_await: bool,
) -> Any:
    error, call.error = call.error, None
    result, call.result = call.result, None
    if cancelled is not None:
        # the cancellation arrived while the sync code ran its last stretch
        # of plain Python.  Under greenlet it could not have arrived before
        # greenlet_spawn() returned, so it must not replace the outcome (a
        # connection the sync code just checked out would be lost with the
        # result): it lands at the caller's next await instead.
        _rearm(call.task, cancelled)
        del cancelled
    if error is not None:
        try:
            raise error
        finally:
            del error
    if require_await and not switched and not call.sync_io:
        raise _exc().AwaitRequired(AWAIT_REQUIRED_MESSAGE)
    return result


async def _wait_for_worker() -> _workers._Worker:
    """max_workers is reached: wait, without blocking the loop, for a worker
    to come free (either backend)."""
    from ._primitives import _Waiter

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


# -- trio ------------------------------------------------------------------


def _abort_failed(raise_cancel: Any) -> Any:
    import trio

    # the worker runs plain Python that cannot be interrupted: the wait is
    # uncancellable and trio delivers the cancellation at the next
    # checkpoint, which is the next await_() of the sync code
    return trio.lowlevel.Abort.FAILED


async def _greenlet_spawn_trio(
    fn: Callable[..., Any], args: Any, kwargs: Any, require_await: bool
) -> Any:
    trio = sys.modules.get("trio")
    token = None
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
    if token is None:
        raise RuntimeError(
            "greenlet_spawn() must be awaited in a task of an asyncio or "
            "trio event loop (sqla-anyio-shim supports both through anyio)"
        )
    call = _Call(fn, args, kwargs, token.run_sync_soon, None)
    pool = _workers.pool
    worker = pool.try_acquire()
    if worker is None:
        worker = await _wait_for_worker()
    call.worker = worker
    worker.submit(call.run)

    task = trio.lowlevel.current_task()
    wait = trio.lowlevel.wait_task_rescheduled
    ready = call.ready
    switched = False
    while True:
        if not ready.acquire(True, handoff_timeout):
            call.async_waiting = True
            while not ready.acquire(False):
                call.waiter = task
                await wait(_abort_failed)
            call.async_waiting = False
        awaitable = call.take()
        if awaitable is _DONE:
            break
        switched = True
        await _serve(call, awaitable)
        del awaitable
    # a cancellation that arrived while the sync code ran its last stretch
    # of plain Python stays pending in trio's cancel scope and lands at the
    # caller's next checkpoint: raising it here would lose the outcome
    return _finish(call, None, switched, require_await)


def current_task(loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
    """``asyncio.current_task()`` that, in a bridge worker, returns the task
    awaiting the bridge -- the task that is current for the sync code under
    greenlet (``async_scoped_session(..., scopefunc=current_task)`` relies
    on it)."""
    call = getattr(_local, "call", None)
    if call is not None and call.loop is not None and (
        loop is None or loop is call.loop
    ):
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
