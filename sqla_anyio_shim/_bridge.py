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
import logging
import sys
import threading
import time
import types
import weakref
from typing import Any, Awaitable, Callable, Dict, List, Optional, TypeVar

from . import _channel, _workers

_T = TypeVar("_T")

_perf_counter = time.perf_counter
_get_running_loop = asyncio._get_running_loop
_set_running_loop = asyncio._set_running_loop
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

#: Whether every ``greenlet_spawn()`` on asyncio starts with a checkpoint
#: (set while sync drivers are enabled).  A sync driver's query runs in the
#: worker and never suspends the task, so without it a task looping on
#: queries would hold the loop, and a cancellation pending on it (a
#: deadline) would not be delivered before its next statement or commit.
#: Under trio every call is a checkpoint (trio's own convention).
checkpoint_calls = False

#: Whether a host stops blocking its loop on its worker while other calls
#: are in flight on the same loop.  With the GIL only one thread runs
#: Python at a time, so blocking the loop costs no parallelism and saves the
#: switches of waking the loop (measured: 100 tasks, 0.75x greenlet blocking
#: against 0.54x not blocking); without the GIL it would keep every other
#: call's worker waiting for this one, so the loop keeps serving them.
_ADAPTIVE = not getattr(sys, "_is_gil_enabled", lambda: True)()

#: A call whose sync code holds the event loop longer than this, in one
#: stretch (the host blocking its thread on the worker, hop after hop,
#: without the loop running in between), is reported at WARNING on the
#: ``sqla_anyio_shim`` logger, as asyncio's debug mode reports slow
#: callbacks.  Set by install(slow_call_warning=...); None: never.
slow_hold_threshold: Optional[float] = 0.1

_log = logging.getLogger("sqla_anyio_shim")

# counters for stats(); guarded by _stats_lock (several loops in several
# threads may run calls at once, and without the GIL += is not atomic)
_stats_lock = threading.Lock()
_in_flight = 0
_longest_hold = 0.0

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


HOST_GONE_MESSAGE = (
    "the task awaiting greenlet_spawn() is gone: its coroutine was closed "
    "mid-call (typically the event loop was closed, or the task dropped, "
    "while this sync code ran), so nothing can be awaited any more"
)


class HostGone(BaseException):
    """Raised in the sync code at ``await_()`` when the task that awaited
    ``greenlet_spawn()`` no longer exists -- the thread analogue of the
    ``GreenletExit`` greenlet raises in a greenlet that is garbage-collected
    while suspended.  A BaseException, so that cleanup code catching
    ``Exception`` does not swallow it."""


def _exc() -> Any:
    # imported lazily: importing this package must not import SQLAlchemy
    # (the pytest plugin has to put a source tree's lib/ on sys.path first)
    from sqlalchemy import exc

    return exc


def _apply_context(
    source: contextvars.Context, tokens: Dict[contextvars.ContextVar[Any], Any]
) -> None:
    """Make the current context agree with ``source``: set every variable
    whose value in ``source`` differs, and remove the variables that
    ``source`` no longer has.

    A variable can only be removed with the Token of the ``set()`` that
    gave it its first value *in this context*, so ``tokens`` keeps the
    tokens of the sets done here on variables that had no value: a variable
    the other side set and then reset (a before/after hook pair) is unset
    here again, as it is in greenlet's one shared context."""
    for var, value in source.items():
        if var.get(_MISSING) is not value:
            token = var.set(value)
            if token.old_value is contextvars.Token.MISSING:
                tokens[var] = token
    if tokens:
        for var in [var for var in tokens if var not in source]:
            token = tokens.pop(var)
            if var.get(_MISSING) is not _MISSING:
                try:
                    var.reset(token)
                except (RuntimeError, ValueError):
                    pass  # used already, or the context changed: keep it


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
        "channel",
        "finished",
        "abandoned",
        "host_gone",
        "async_waiting",
        "waiter",
        "mailbox",
        "result",
        "error",
        "loop",
        "task",
        "sync_io",
        "cancel_count",
        "host_tokens",
        "worker_tokens",
        "thread_id",
        "interrupt",
        "loop_thread",
        "hold",
        "fn_name",
        "state",
        "user_running",
        "injected",
        "worker_done",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        mailbox: "_Mailbox",
        loop: Optional[asyncio.AbstractEventLoop],
    ) -> None:
        self.loop = loop
        self.task: Any = None
        self.sync_io = False
        self.cancel_count = 0
        self.host_tokens: Dict[contextvars.ContextVar[Any], Any] = {}
        self.worker_tokens: Dict[contextvars.ContextVar[Any], Any] = {}
        self.thread_id = 0
        # created by the host, on the loop thread
        self.loop_thread = threading.get_ident()
        # seconds the host has blocked the loop in the current stretch
        self.hold = 0.0
        self.fn_name = getattr(fn, "__qualname__", None)
        # guards user_running / injected (see _inject)
        self.state = threading.Lock()
        self.user_running = False
        self.injected = False
        # the worker has delivered its last message (see release_channel)
        self.worker_done = False
        # KeyboardInterrupt / SystemExit that hit the host while it waited
        self.interrupt: Optional[BaseException] = None
        self.worker: Any = None
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = _copy_context()
        self.outbox: Any = None
        self.inbox: Any = None
        # worker -> host: "the outbox holds a message";
        # host -> worker: "the inbox holds the reply"
        self.channel = _channel.get()
        # set by the host once it has taken the final message: the channel
        # is then clean and can be reused
        self.finished = False
        # the host's coroutine was closed mid-call (see HostGone)
        self.host_gone = False
        # the host left the channel to the worker (see release_channel)
        self.abandoned = False
        # True while the host waits through the event loop rather than on
        # ``ready``: the worker must then also post a wake-up to the loop
        self.async_waiting = False
        self.waiter: Any = None
        self.mailbox = mailbox
        self.result: Any = None
        self.error: Optional[BaseException] = None

    # -- worker side -------------------------------------------------------

    def run(self) -> None:
        _local.call = self
        self.thread_id = threading.get_ident()
        loop = self.loop
        if loop is not None:
            # asyncio.get_running_loop() / get_event_loop() / create_task()
            # in the sync code see the host's loop, as on greenlet's loop
            # thread; every call that is not thread-safe hops to the loop
            # thread (see _LoopProxy)
            _set_running_loop(_LoopProxy(loop, self.loop_thread))
        try:
            self.enter_user()
            try:
                self.result = self.context.run(self.fn, *self.args, **self.kwargs)
            finally:
                self.leave_user()
        except BaseException as err:
            self.error = err
        finally:
            _local.call = None
            if loop is not None:
                _set_running_loop(None)
            # drop what the job referenced before anything else can wait on
            # this thread
            self.fn = self.args = self.kwargs = None
        worker, self.worker = self.worker, None
        # mark ourselves idle *before* delivering, so that the caller's next
        # greenlet_spawn() finds this warm thread
        _workers.pool.release(worker)
        self.deliver(_DONE)
        with self.state:
            self.worker_done = True
            abandoned = self.abandoned
        if abandoned:
            # the host is gone and left the channel to us
            _channel.put(self.channel, False)

    def enter_user(self) -> None:
        with self.state:
            self.user_running = True

    def leave_user(self) -> None:
        """The worker leaves the caller's code for the bridge's: an
        interrupt injected but not raised yet is withdrawn (it is delivered
        at the await_() instead, by the host)."""
        with self.state:
            self.user_running = False
            if self.injected:
                self.injected = False
                _set_async_exc(_c_thread_id(self.thread_id), None)

    def release_channel(self) -> None:
        """Host side, when greenlet_spawn() ends.  A clean channel goes back
        to the free list; after an abandoned call, whichever of the two
        threads is last done with the channel closes it."""
        if self.finished:
            _channel.put(self.channel, True)
            return
        with self.state:
            self.abandoned = True
            worker_done = self.worker_done
        if worker_done:
            _channel.put(self.channel, False)

    def deliver(self, message: Any) -> None:
        self.outbox = message
        self.channel.signal_host()
        # read *after* the release: if the host switched to waiting through
        # the loop before this read, it gets a wake-up; if after, its own
        # non-blocking acquire of ``ready`` sees the release
        if self.async_waiting:
            self.mailbox.post(self)

    def switch(self, awaitable: Any) -> Any:
        """``await_()`` in the worker: hand ``awaitable`` to the host and
        block until it has been awaited."""
        self.leave_user()
        if self.host_gone:
            _safe_close(awaitable)
            raise HostGone(HOST_GONE_MESSAGE)
        self.deliver(awaitable)
        self.channel.wait_reply()
        self.enter_user()
        value, error, snapshot = self.inbox
        self.inbox = None
        if snapshot is not None:
            _apply_context(snapshot, self.worker_tokens)
        if error is not None:
            try:
                _reraise(error)
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
        self.channel.signal_worker()

    def take(self) -> Any:
        """The message the worker delivered; syncs the context first."""
        message, self.outbox = self.outbox, None
        context = self.context
        if _copy_context() != context:
            _apply_context(context, self.host_tokens)
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


class _Mailbox:
    """The worker -> loop wake-ups of one event loop (asyncio) or trio run,
    coalesced.

    A worker whose host waits through the loop must wake the loop thread,
    which costs a write to the loop's self-pipe and a trip out of its
    ``select()``.  Under load many workers finish a stretch of sync code
    while the loop thread is busy or asleep; they all go in one list here
    and only the first schedules a drain, which wakes every host at once,
    in the order their messages arrived.  Also counts the calls in flight
    on this loop (loop thread only), which decides whether a host may block
    the loop waiting for its worker (see _drive_asyncio)."""

    __slots__ = ("_lock", "_calls", "_scheduled", "_schedule", "active", "__weakref__")

    def __init__(self, schedule: Callable[[Callable[[], None]], Any]) -> None:
        self._lock = threading.Lock()
        self._calls: List[_Call] = []
        self._scheduled = False
        self._schedule = schedule
        self.active = 0

    def post(self, call: _Call) -> None:
        """Called by a worker thread: wake ``call``'s host."""
        with self._lock:
            self._calls.append(call)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._schedule(self._drain)
        except RuntimeError:
            # the loop is closed: nobody is left to wake (the host's
            # coroutine is closed with it; see _drive_asyncio)
            with self._lock:
                self._calls.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for call in calls:
            call.wakeup()


#: per host thread: (loop or trio token, its mailbox) of the last call
_hosts = threading.local()


def _mailbox_for(key: Any, schedule: Callable[[Callable[[], None]], Any]) -> _Mailbox:
    cached = getattr(_hosts, "last", None)
    if cached is not None and cached[0] is key:
        return cached[1]  # type: ignore[no-any-return]
    boxes = getattr(_hosts, "boxes", None)
    if boxes is None:
        boxes = _hosts.boxes = weakref.WeakKeyDictionary()
    try:
        mailbox = boxes.get(key)
        if mailbox is None:
            mailbox = boxes[key] = _Mailbox(schedule)
    except TypeError:  # not weak-referenceable: one mailbox per call
        return _Mailbox(schedule)
    _hosts.last = (key, mailbox)
    return mailbox  # type: ignore[no-any-return]


class _OnLoop:
    """An awaitable the worker hands to the host to run ``fn`` *on the loop
    thread*, synchronously, inside the host task (its context, its loop):
    the thread analogue of sync code calling a loop API on greenlet's loop
    thread.  It never suspends, so it is not a cancellation point."""

    __slots__ = ("fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __await__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)
        yield  # pragma: no cover -- makes this a generator


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

    __slots__ = ("_loop", "_loop_thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        self._loop = loop
        self._loop_thread = loop_thread

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._loop, name)
        if not callable(attr) or name in _THREADSAFE_LOOP_METHODS:
            return attr
        loop_thread = self._loop_thread
        if threading.get_ident() == loop_thread:
            return attr
        loop = self._loop

        def method(*args: Any, **kwargs: Any) -> Any:
            call = getattr(_local, "call", None)
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


def _count_call(delta: int) -> None:
    global _in_flight
    with _stats_lock:
        _in_flight += delta


def call_stats() -> Dict[str, float]:
    """The bridge's side of sqla_anyio_shim.stats()."""
    with _stats_lock:
        return {"calls_in_flight": _in_flight, "longest_loop_hold": _longest_hold}


def reset_longest_hold() -> None:
    global _longest_hold
    with _stats_lock:
        _longest_hold = 0.0


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
    loop = _get_running_loop()
    if loop is not None:
        if checkpoint_calls:
            await _yield()
        worker = _workers.pool.try_acquire()
        if worker is None:
            worker = await _wait_for_worker()
        mailbox = _mailbox_for(loop, loop.call_soon_threadsafe)
        call = _Call(fn, args, kwargs, mailbox, loop)
        call.task = _current_task(loop)
        call.worker = worker
        mailbox.active += 1
        _count_call(1)
        try:
            worker.submit(call.run)
            return await _drive_asyncio(call, loop, _require_await)
        finally:
            mailbox.active -= 1
            _count_call(-1)
            _end_stretch(call)
            call.release_channel()
    return await _greenlet_spawn_trio(fn, args, kwargs, _require_await)


async def _drive_asyncio(
    call: _Call, loop: asyncio.AbstractEventLoop, require_await: bool
) -> Any:
    switched = False
    cancelled: Optional[BaseException] = None
    channel = call.channel
    mailbox = call.mailbox
    try:
        return await _host_loop_asyncio(call, loop, require_await, channel, mailbox)
    except GeneratorExit:
        _abandon(call)
        raise


async def _host_loop_asyncio(
    call: _Call,
    loop: asyncio.AbstractEventLoop,
    require_await: bool,
    channel: Any,
    mailbox: _Mailbox,
) -> Any:
    switched = False
    cancelled: Optional[BaseException] = None
    while True:
        if handoff_timeout < 0:
            timeout = -1.0
        elif _ADAPTIVE and mailbox.active > 1:
            # other calls in flight and no GIL: do not block the loop on
            # this worker; the loop serves the others meanwhile and their
            # workers run in parallel with this one
            timeout = 0.0
        else:
            timeout = handoff_timeout
        if not _acquire_blocking(call, channel, timeout):
            # the sync code runs longer than a hand-off: let the loop run
            _end_stretch(call)
            call.async_waiting = True
            while not channel.take_message():
                waiter = call.waiter = loop.create_future()
                try:
                    await waiter
                except _CancelledError as err:
                    # the worker is running plain Python and cannot be
                    # interrupted
                    call.waiter = None
                    if _interrupted_by(err) is not None:
                        # the loop is being torn down by a Ctrl-C (the
                        # runner cancels every task while KeyboardInterrupt
                        # propagates): stop the sync code now rather than
                        # when it next awaits, as Ctrl-C would stop it on
                        # greenlet's loop thread
                        _inject(call, _CancelledError)
                    if _is_anyio_cancellation(err):
                        # level-triggered: anyio delivers it again at the
                        # next await inside its scope, so it must not be
                        # re-armed (it would escape the scope); wait out the
                        # worker shielded, so that anyio does not retry on
                        # every loop iteration meanwhile
                        native = await _wait_shielded(call, loop)
                        if native is not None:
                            cancelled = native
                            call.cancel_count = _cancelling(call.task)
                        break
                    # asyncio's own, edge-triggered: deliver it at the
                    # worker's next await_() (or, see _defer, once the task
                    # next suspends)
                    cancelled = err
                    call.cancel_count = _cancelling(call.task)
            call.async_waiting = False
        awaitable = call.take()
        if awaitable is _DONE:
            call.finished = True
            break
        switched = True
        if call.interrupt is not None:
            # Ctrl-C hit the host while the sync code ran: the sync code
            # sees it at this await_() (if the injected one has not
            # landed yet), runs its cleanup, and the interrupt propagates
            _safe_close(awaitable)
            call.send(None, call.interrupt)
            del awaitable
            continue
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


def _abandon(call: _Call) -> None:
    """The host's coroutine is being closed (GeneratorExit: the loop was
    closed with the task pending, or the coroutine was dropped) while the
    worker runs: the sync code gets HostGone at its next await_() -- or
    now, if it is already waiting for a reply -- instead of waiting forever
    for a host that no longer exists, so its cleanup runs and the worker
    goes back to the pool."""
    call.host_gone = True
    call.waiter = None
    if call.channel.take_message():
        # a message was waiting: an awaitable nobody will await (or DONE)
        message, call.outbox = call.outbox, None
        if message is _DONE:
            call.finished = True
            return
        _safe_close(message)
    call.send(None, HostGone(HOST_GONE_MESSAGE))


def _acquire_blocking(call: _Call, channel: Any, timeout: float) -> bool:
    """Wait for the worker's next message blocking this thread, for at most
    ``handoff_timeout``.

    A signal handler raising here (Ctrl-C's KeyboardInterrupt, SystemExit)
    must not abandon the worker, which runs on with the task's connection:
    on greenlet the interrupt would have landed in the sync code itself.
    So it is delivered there (see _inject) and the wait goes on; the sync
    code's cleanup runs and the interrupt propagates from greenlet_spawn()."""
    if timeout == 0:
        try:
            return channel.take_message()  # type: ignore[no-any-return]
        except BaseException as exc:
            return _interrupted(call, exc)
    started = _perf_counter()
    try:
        got = channel.wait_message(timeout)
    except BaseException as exc:
        return _interrupted(call, exc)
    finally:
        call.hold += _perf_counter() - started
    return got  # type: ignore[no-any-return]


def _interrupted(call: _Call, exc: BaseException) -> bool:
    """A signal handler raised while the host waited (see
    _acquire_blocking)."""
    if call.interrupt is None:
        call.interrupt = exc
    _inject(call, type(exc))
    return False


def _end_stretch(call: _Call) -> None:
    """The loop runs again (the host waits through it, or the call ends):
    the stretch during which this call's sync code held the loop is over."""
    global _longest_hold
    hold = call.hold
    if hold == 0.0:
        return
    call.hold = 0.0
    if hold > _longest_hold:
        with _stats_lock:
            if hold > _longest_hold:
                _longest_hold = hold
    threshold = slow_hold_threshold
    if threshold is not None and hold >= threshold:
        _log.warning(
            "greenlet_spawn(%s) held the event loop for %.3f s without "
            "letting it run (threshold %.3f s): its sync code ran between "
            "two await points while the task blocked the loop on it%s",
            call.fn_name or "<sync code>",
            hold,
            threshold,
            " (handoff_timeout=None blocks until the next await point)"
            if handoff_timeout < 0
            else "",
        )


def _interrupted_by(err: BaseException) -> Optional[BaseException]:
    """The KeyboardInterrupt / SystemExit being handled when the
    cancellation ``err`` was thrown into the task, if any (an event-loop
    runner cancelling its tasks on Ctrl-C)."""
    seen = 0
    context = err.__context__
    while context is not None and seen < 8:
        if isinstance(context, (KeyboardInterrupt, SystemExit)):
            return context
        context = context.__context__
        seen += 1
    return None


try:
    import ctypes

    _set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    _c_thread_id = ctypes.c_ulong
    _py_object = ctypes.py_object
except (ImportError, AttributeError):  # pragma: no cover -- not CPython
    _set_async_exc = None


def _inject(call: _Call, exc_type: type) -> None:
    """Raise ``exc_type`` in the worker at its next bytecode, if it is
    running the caller's sync code (never inside the bridge's own code:
    see _Call.enter_user / leave_user), as a signal raises in whatever
    Python code greenlet's loop thread is running."""
    if _set_async_exc is None:
        return
    with call.state:
        if call.user_running and not call.injected:
            call.injected = True
            _set_async_exc(_c_thread_id(call.thread_id), _py_object(exc_type))


async def _serve(call: _Call, awaitable: Any) -> None:
    """Await one awaitable for the worker, in the host task, and send the
    outcome back (both backends)."""
    hook = _await_hook
    if hook is not None and not isinstance(awaitable, _OnLoop):
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
        while not call.channel.take_message():
            waiter = call.waiter = loop.create_future()
            try:
                await waiter
            except _CancelledError as err:
                call.waiter = None
                if not _is_anyio_cancellation(err):
                    native = err
    return native


def _cancelling(task: Any) -> int:
    """The task's count of pending cancel requests (0 before Python 3.11,
    which does not count them)."""
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling is not None else 0


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
    interrupt, call.interrupt = call.interrupt, None
    if interrupt is not None and not isinstance(error, type(interrupt)):
        # the sync code finished before the interrupt reached it: the
        # interrupt still propagates (its outcome is dropped, as Ctrl-C on
        # greenlet's loop thread would have dropped it)
        error = interrupt
    del interrupt
    if cancelled is not None:
        # the cancellation arrived while the sync code ran its last stretch
        # of plain Python.  Under greenlet it could not have arrived before
        # greenlet_spawn() returned, so it must not replace the outcome (a
        # connection the sync code just checked out would be lost with the
        # result): it is requested again once this step of the task is
        # over, unless its requester withdrew it meanwhile (see _defer).
        _defer(call.task, call.loop, cancelled, call.cancel_count)
        del cancelled
    if error is not None:
        try:
            _reraise(error)
        finally:
            del error
    if require_await and not switched and not call.sync_io:
        raise _exc().AwaitRequired(AWAIT_REQUIRED_MESSAGE)
    return result


def _reraise(error: BaseException) -> Any:
    """Raise ``error`` (which came from another thread) as it is.

    A ``raise`` statement inside an ``except`` block of the caller would
    set the caller's exception as ``error.__context__`` ("During handling
    of the above exception, another exception occurred"), which greenlet,
    propagating the sync code's exception through a switch, never does."""
    context = error.__context__
    try:
        raise error
    except BaseException:
        error.__context__ = context
        raise
    finally:
        del error, context


def _defer(
    task: Any,
    loop: Any,
    cancelled: BaseException,
    count: int,
) -> None:
    """Request again, at the next loop iteration, a native asyncio
    cancellation that arrived while the sync code ran plain Python and that
    the sync code finished without reaching another await point.

    Under greenlet the canceller (a timer, another task) could not have run
    before the task's next suspension, because the sync code ran on the
    loop thread.  So:

    * if the task finishes before it next suspends, the cancellation must
      not end it (its result, say a connection just checked out, would be
      dropped): the task is done by the next iteration, nothing happens;
    * if the requester withdraws it first -- ``asyncio.timeout()`` /
      ``wait_for()`` leaving their block call ``task.uncancel()`` -- it must
      not escape the block: the count of cancel requests has dropped below
      the one we saw, nothing happens;
    * otherwise it is delivered where the task next suspends, as greenlet
      would have delivered it.
    """
    args = cancelled.args[:1]
    if loop is None:
        return

    def redeliver() -> None:
        if task.done():
            return
        cancelling = getattr(task, "cancelling", None)
        if cancelling is not None:
            if cancelling() < count:
                return  # withdrawn by its requester
            task.uncancel()  # keep the count balanced: re-request, not add
        task.cancel(*args)

    try:
        loop.call_soon(redeliver)
    except RuntimeError:
        pass  # the loop is closed: nothing left to cancel


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
    # a checkpoint, as every trio async function is: a cancelled scope
    # stops here before any sync code runs, and a task looping on queries
    # lets the others run
    await trio.lowlevel.checkpoint()
    worker = _workers.pool.try_acquire()
    if worker is None:
        worker = await _wait_for_worker()
    mailbox = _mailbox_for(token, token.run_sync_soon)
    call = _Call(fn, args, kwargs, mailbox, None)
    call.worker = worker
    mailbox.active += 1
    _count_call(1)
    try:
        worker.submit(call.run)
        return await _host_loop_trio(call, mailbox, require_await)
    except GeneratorExit:
        _abandon(call)
        raise
    finally:
        mailbox.active -= 1
        _count_call(-1)
        _end_stretch(call)
        call.release_channel()


async def _host_loop_trio(call: _Call, mailbox: _Mailbox, require_await: bool) -> Any:
    import trio

    task = trio.lowlevel.current_task()
    wait = trio.lowlevel.wait_task_rescheduled
    channel = call.channel
    switched = False
    while True:
        if handoff_timeout < 0:
            timeout = -1.0
        elif _ADAPTIVE and mailbox.active > 1:
            timeout = 0.0  # other calls in flight: see _host_loop_asyncio
        else:
            timeout = handoff_timeout
        if not _acquire_blocking(call, channel, timeout):
            _end_stretch(call)
            call.async_waiting = True
            while not channel.take_message():
                call.waiter = task
                await wait(_abort_failed)
            call.async_waiting = False
        awaitable = call.take()
        if awaitable is _DONE:
            call.finished = True
            break
        switched = True
        if call.interrupt is not None:
            _safe_close(awaitable)
            call.send(None, call.interrupt)
            del awaitable
            continue
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
