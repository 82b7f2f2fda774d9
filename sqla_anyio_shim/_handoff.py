"""The hand-off between a host task and the worker thread running its sync
code: the thread analogue of SQLAlchemy's ``_AsyncIoGreenlet``.

One :class:`_Call` per ``greenlet_spawn()``:

1. The worker runs ``fn``.  When the sync code calls ``await_(aw)``, the
   worker puts ``aw`` in the call's *outbox*, wakes the host through the
   call's channel (:mod:`._channel`) and waits for the reply.
2. The host awaits ``aw`` *itself* (:func:`_serve`), inside its own task,
   cancel scopes and context, puts the value or the exception in the
   *inbox* and wakes the worker, which returns the value from ``await_()``
   or raises the exception there, with its traceback.
3. When ``fn`` returns or raises, the worker marks itself idle (so the next
   call reuses it) and delivers the outcome.

How the host waits -- blocking its thread for a bounded time, or through
the loop with a coalesced wake-up (:class:`_Mailbox`) -- is decided by the
host loops (:mod:`._host_asyncio`, :mod:`._host_trio`), with the settings
here.  Also here: the context-variable mirroring done on every hop, Ctrl-C
delivery into the worker, and the bookkeeping of stats().
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

from . import _admission, _async_raise, _channel, _workers
from ._loop_proxy import _LoopProxy, _OnLoop

_perf_counter = time.perf_counter
_get_running_loop = asyncio._get_running_loop
_set_running_loop = asyncio._set_running_loop
_copy_context = contextvars.copy_context
_CancelledError = asyncio.CancelledError


#: set by the pytest plugin's ``await_points`` replacement: called with each
#: awaitable the host is about to await, returns the awaitable to await
await_hook: Callable[[Any], Any] | None = None

#: How long the host blocks its thread waiting for the worker's next message
#: before it lets the event loop run.  Within this time the hand-off is a
#: direct thread-to-thread switch with no event-loop iteration, and the loop
#: is blocked exactly as it is while a greenlet runs sync code; past it, the
#: host waits through the loop so that long stretches of sync code (or a
#: sync driver's blocking I/O) never stall other tasks.  Set by install()
#: (-1: no bound, the loop is blocked until the next await point).
handoff_timeout = 0.002


#: A call whose sync code holds the event loop longer than this, in one
#: stretch (the host blocking its thread on the worker while the sync code
#: runs from one await point to the next), is reported at WARNING on the
#: ``sqla_anyio_shim`` logger, as asyncio's debug mode reports slow
#: callbacks.  Set by install(slow_call_warning=...); None: never.
slow_hold_threshold: float | None = 0.1

_log = logging.getLogger("sqla_anyio_shim")

#: seconds a worker waits for a reply before it checks that its host's loop
#: still exists (a task parked in await_() when its loop is closed); the
#: interval doubles after each check, up to the maximum.  Measured: with a
#: 1 s interval, 3,000 tasks queueing on a pool of 5 took 2.2x as long
#: (17.8 s against 8.0 s), every parked worker waking each second.
_LIVENESS_INTERVAL = 5.0
_LIVENESS_MAX_INTERVAL = 80.0

# counters for stats(); guarded by _stats_lock (several loops in several
# threads may run calls at once, and without the GIL += is not atomic)
_stats_lock = threading.Lock()
_in_flight = 0
_longest_hold = 0.0

#: worker-thread state: ``_local.call`` is the :class:`_Call` running here
_local = threading.local()

_MISSING = object()
_DONE = object()

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
    source: contextvars.Context, tokens: dict[contextvars.ContextVar[Any], Any]
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
        "args",
        "async_waiting",
        "cancel_count",
        "channel",
        "context",
        "error",
        "finished",
        "fn",
        "fn_name",
        "gate_slot",
        "hold",
        "host_gone",
        "host_tokens",
        "inbox",
        "injected",
        "interrupt",
        "kwargs",
        "loop",
        "loop_thread",
        "mailbox",
        "outbox",
        "owners",
        "result",
        "state",
        "sync_io",
        "task",
        "thread_id",
        "user_running",
        "waiter",
        "worker",
        "worker_tokens",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Any,
        kwargs: Any,
        mailbox: _Mailbox,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.loop = loop
        self.task: Any = None
        # holds an admission slot until it is past the pool (see _admission)
        self.gate_slot = False
        self.sync_io = False
        self.cancel_count = 0
        self.host_tokens: dict[contextvars.ContextVar[Any], Any] = {}
        self.worker_tokens: dict[contextvars.ContextVar[Any], Any] = {}
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
        # KeyboardInterrupt / SystemExit that hit the host while it waited
        self.interrupt: BaseException | None = None
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
        # host and worker each release the channel once (release_channel)
        self.owners = 2
        # True while the host waits through the event loop rather than
        # blocked on the channel: the worker must then also post a wake-up
        # to the loop
        self.async_waiting = False
        self.waiter: Any = None
        self.mailbox = mailbox
        self.result: Any = None
        self.error: BaseException | None = None

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
            _set_running_loop(cast(Any, _LoopProxy(loop, self.loop_thread, _current_call)))
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
            self.fn = self.args = self.kwargs = None  # type: ignore[assignment]
        worker, self.worker = self.worker, None
        # mark ourselves idle *before* delivering, so that the caller's next
        # greenlet_spawn() finds this warm thread
        _workers.pool.release(worker)
        self.deliver(_DONE)
        self.release_channel()

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
                _async_raise.withdraw(self.thread_id)

    def release_channel(self) -> None:
        """Called once by the host (when greenlet_spawn() ends, however it
        ends) and once by the worker (after its last message).  The second
        caller hands the channel back: to the free list if the host took the
        final message (both directions consumed), closed otherwise.  Before
        both are done, neither closing nor reuse would be safe."""
        with self.state:
            self.owners -= 1
            last = self.owners == 0
        if last:
            _channel.put(self.channel, self.finished)

    def deliver(self, message: Any) -> None:
        self.outbox = message
        self.channel.signal_host()
        # read *after* the signal: if the host switched to waiting through
        # the loop before this read, it gets a wake-up; if after, its own
        # non-blocking take_message() sees the signal
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
        channel = self.channel
        interval = _LIVENESS_INTERVAL
        while not channel.wait_reply(interval):
            # rarely, and more rarely the longer it waits: thousands of
            # workers parked in a pool's queue must not wake up every second
            interval = min(interval * 2, _LIVENESS_MAX_INTERVAL)
            if not self.mailbox.host_alive(self.loop):
                # the loop was closed (or the trio run ended) with the task
                # parked here: nobody will ever reply.  greenlet would throw
                # GreenletExit into this frame when the task is collected;
                # the task cannot be collected while this frame holds it, so
                # the worker notices by itself.
                self.host_gone = True
                raise HostGone(HOST_GONE_MESSAGE)
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

    def send(self, value: Any, error: BaseException | None) -> None:
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
    in the order their messages arrived."""

    __slots__ = ("__weakref__", "_calls", "_lock", "_schedule", "_scheduled")

    def __init__(self, schedule: Callable[[Callable[[], None]], Any]) -> None:
        self._lock = threading.Lock()
        self._calls: list[_Call] = []
        self._scheduled = False
        self._schedule = schedule

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
            # coroutine is closed with it; see _abandon)
            with self._lock:
                self._calls.clear()
                self._scheduled = False

    def host_alive(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Whether the host's event loop (or trio run) can still run the
        host task.  Asked by a worker that has waited long for a reply."""
        if loop is not None:
            return not loop.is_closed()
        try:
            self._schedule(_noop)  # trio: RunFinishedError once the run is over
        except RuntimeError:
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._scheduled = False
        for call in calls:
            call.wakeup()


def _noop() -> None:
    pass


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
    return mailbox


def _count_call(delta: int) -> None:
    global _in_flight
    with _stats_lock:
        _in_flight += delta


def call_stats() -> dict[str, float]:
    """The bridge's side of sqla_anyio_shim.stats()."""
    with _stats_lock:
        return {"calls_in_flight": _in_flight, "longest_loop_hold": _longest_hold}


def reset_longest_hold() -> None:
    global _longest_hold
    with _stats_lock:
        _longest_hold = 0.0


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


#: How long the host may block for the worker's *first* message.  The
#: worker has just been woken, and on a busy machine a thread wake-up alone
#: can take longer than ``handoff_timeout``; past it the call would fall back
#: to the loop before its sync code even started, and the loop would run
#: other tasks where greenlet runs none (SQLAlchemy's test #13749 -- a queue
#: wait that must be registered before the task's next loop iteration --
#: failed so under load on 3.13t).  20 ms: the fairness bound of issue 10.
FIRST_HANDOFF_BOUND = 0.02


def _wait_bound(first: bool) -> float:
    """How long the host blocks its loop for the worker's next message (-1:
    no bound, 0: not at all).

    The host blocks on every build.  Not blocking while other calls are in
    flight -- the way to run several tasks' sync code on several cores of a
    free-threaded build -- was tried and dropped: it breaks what greenlet
    guarantees between two await points (that no other task's sync code
    runs meanwhile), which SQLAlchemy's own suite relies on
    (test_pool_classes[StaticPool]: 10 tasks on one connection failed 5 of 6
    runs on 3.14t), and with the GIL it lost throughput (hop
    microbenchmark, 100 tasks: 0.54x greenlet against 0.75x blocking)."""
    timeout = handoff_timeout
    if first and timeout > 0:
        return max(timeout, FIRST_HANDOFF_BOUND)
    return timeout


async def run_call(
    call: _Call, worker: Any, host_loop: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    """Start ``call`` on ``worker`` and serve it with ``host_loop(call,
    *args)`` (one backend's host loop); the bookkeeping around a call, for
    both backends."""
    call.worker = worker
    _count_call(1)
    try:
        worker.submit(call.run)
        return await host_loop(call, *args)
    except GeneratorExit:
        _abandon(call)
        raise
    finally:
        _count_call(-1)
        release_slot(call)
        _end_stretch(call)
        call.release_channel()


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


def _inject(call: _Call, exc_type: type) -> None:
    """Raise ``exc_type`` in the worker at its next bytecode, if it is
    running the caller's sync code (never inside the bridge's own code:
    see _Call.enter_user / leave_user), as a signal raises in whatever
    Python code greenlet's loop thread is running."""
    if not _async_raise.available():
        return
    with call.state:
        if call.user_running and not call.injected:
            call.injected = True
            _async_raise.raise_in_thread(call.thread_id, exc_type)


#: returned by _next_message when the message was answered already
_ANSWERED = object()


def _next_message(call: _Call) -> Any:
    """Take the worker's message (both backends): ``_DONE``, an awaitable to
    serve, or ``_ANSWERED`` -- Ctrl-C hit the host while the sync code ran,
    so the sync code gets the interrupt at this await_() instead (if the
    injected one has not landed yet), runs its cleanup, and the interrupt
    propagates."""
    message = call.take()
    if message is _DONE:
        call.finished = True
        return _DONE
    if call.interrupt is not None:
        _safe_close(message)
        call.send(None, call.interrupt)
        return _ANSWERED
    return message


async def _serve(call: _Call, awaitable: Any) -> None:
    """Await one awaitable for the worker, in the host task, and send the
    outcome back (both backends)."""
    pool_wait = False
    if call.gate_slot:
        # a call waiting in the pool's queue keeps its admission slot until
        # the wait is over; any other await point means it is past the pool,
        # and its slot goes to the next call (see _admission)
        pool_wait = getattr(awaitable, "cr_code", None) in _admission.pool_wait_codes
        if not pool_wait:
            release_slot(call)
    hook = await_hook
    if hook is not None and not isinstance(awaitable, _OnLoop):
        awaitable = hook(awaitable)
    if call.hold:
        # the stretch of sync code before this await point is over (the
        # awaitable usually lets the loop run; counting on across it would
        # add up stretches that the loop ran between)
        _end_stretch(call)
    try:
        value = await awaitable
    except BaseException as err:
        if pool_wait:
            release_slot(call)
        call.send(None, err)
    else:
        if pool_wait:
            release_slot(call)
        call.send(value, None)


def release_slot(call: _Call) -> None:
    """Give the call's admission slot back, once (see _admission)."""
    if call.gate_slot:
        call.gate_slot = False
        _admission.release()


def _finish(call: _Call, switched: bool, require_await: bool) -> Any:
    """The outcome of a finished call, for greenlet_spawn() to return or
    raise (both backends)."""
    error, call.error = call.error, None
    result, call.result = call.result, None
    interrupt, call.interrupt = call.interrupt, None
    if interrupt is not None and not isinstance(error, type(interrupt)):
        # the sync code finished before the interrupt reached it: the
        # interrupt still propagates (its outcome is dropped, as Ctrl-C on
        # greenlet's loop thread would have dropped it)
        error = interrupt
    del interrupt
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


def _current_call() -> _Call | None:
    """The call the current thread runs as a worker, if any."""
    return getattr(_local, "call", None)
