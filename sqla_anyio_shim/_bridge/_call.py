"""One ``greenlet_spawn()`` in flight: the thread analogue of SQLAlchemy's
``_AsyncIoGreenlet``, and the outcomes it carries.

A :class:`_Call` is shared by two threads, each using its own half:

* the **worker** runs ``fn`` (:meth:`_Call.run`); at each ``await_(aw)`` it
  puts ``aw`` in the *outbox*, wakes the host through the call's channel
  (:mod:`._channel`) and waits for the reply (:meth:`_Call.switch`);
* the **host** -- the task that awaits ``greenlet_spawn()``, driven by
  :func:`._host.run_call` -- takes the message (:meth:`_Call.take`), awaits
  it in its own task and sends back its :data:`Outcome` (:meth:`_Call.send`),
  which ``await_()`` returns or raises.

When ``fn`` is done the worker marks itself idle (so that the next call
reuses it), delivers :data:`DONE`, and the host returns or raises the
call's outcome.  Context variables are mirrored at every hop (see
:mod:`._context`).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, cast, final

from . import _channel, _interrupts, _tracing, _workers
from ._blocking import Blocking
from ._context import apply_context
from ._loop_proxy import _LoopProxy

if TYPE_CHECKING:
    from ._wakeups import _Mailbox

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)

_set_running_loop = asyncio._set_running_loop
_copy_context = contextvars.copy_context

#: worker-thread state: ``_local.call`` is the :class:`_Call` running here
_local = threading.local()

#: the worker's last message: ``fn`` has returned or raised
DONE = object()

#: seconds a worker waits for a reply before it checks that its host's loop
#: still exists (a task parked in await_() when its loop is closed); the
#: interval doubles after each check, up to the maximum.  Measured: with a
#: 1 s interval, 3,000 tasks queueing on a pool of 5 took 2.2x as long
#: (17.8 s against 8.0 s), every parked worker waking each second.
LIVENESS_INTERVAL = 5.0
LIVENESS_MAX_INTERVAL = 80.0

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


def sqlalchemy_exc() -> Any:
    """``sqlalchemy.exc``, imported lazily: importing this package must not
    import SQLAlchemy (the pytest plugin has to put a source tree's lib/ on
    sys.path first)."""
    from sqlalchemy import exc

    return exc


def safe_close(awaitable: Any) -> None:
    """Close a coroutine we refuse to await, so that no "coroutine was never
    awaited" warning leaks out (upstream's ``_safe_cancel_awaitable``)."""
    if asyncio.iscoroutine(awaitable):
        awaitable.close()


# -- outcomes ----------------------------------------------------------------


@final
class Value(Generic[_T_co]):
    """A value that crossed from one thread to the other."""

    __slots__ = ("value",)

    def __init__(self, value: _T_co) -> None:
        self.value = value

    def unwrap(self) -> _T_co:
        return self.value


@final
class Error:
    """An exception that crossed from one thread to the other, raised as
    it is by :meth:`unwrap`."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def unwrap(self) -> NoReturn:
        # A ``raise`` inside an ``except`` block of the caller would set the
        # caller's exception as ``error.__context__`` ("During handling of
        # the above exception, another exception occurred"), which greenlet,
        # propagating the sync code's exception through a switch, never does.
        error, self.error = self.error, None  # type: ignore[assignment]
        context = error.__context__
        try:
            raise error
        except BaseException:
            error.__context__ = context
            raise
        finally:
            del error, context


#: what a hop or a whole call ends with (trio's and greenback's ``outcome``)
Outcome = Value[_T] | Error


class _Call:
    """One ``greenlet_spawn()`` in flight."""

    __slots__ = (
        "_blocking",
        "args",
        "async_waiting",
        "channel",
        "context",
        "domain",
        "domain_held",
        "finished",
        "first_handoff",
        "fn",
        "fn_name",
        "gate_slot",
        "handoff",
        "hold",
        "host",
        "host_gone",
        "host_tokens",
        "inbox",
        "injected",
        "interrupt",
        "interrupt_pending",
        "kwargs",
        "loop",
        "loop_thread",
        "mailbox",
        "outbox",
        "outcome",
        "owners",
        "settled",
        "state",
        "switching",
        "sync_io",
        "task",
        "thread_id",
        "tracing",
        "user_running",
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
        #: the asyncio task awaiting the call (None under trio)
        self.task: Any = None
        #: the backend's side of the host (see _host.Host); set by the backend
        self.host: Any = None
        # the admission slot it holds until it is past the pool (see
        # _host.Gate); None: none
        self.gate_slot: Any = None
        # how long the host blocks for a message, and for the first one
        # (_host.place)
        self.handoff = 0.0
        self.first_handoff = 0.0
        # the engine's lock held by the sync code between its await points
        # (_host.place); held now
        self.domain: Any = None
        self.domain_held = False
        self.sync_io = False
        self.host_tokens: dict[contextvars.ContextVar[Any], Any] = {}
        self.worker_tokens: dict[contextvars.ContextVar[Any], Any] = {}
        self.thread_id = 0
        # created by the host, on the loop thread
        self.loop_thread = threading.get_ident()
        # seconds the host has blocked the loop in the current stretch
        self.hold = 0.0
        self.fn_name = getattr(fn, "__qualname__", None)
        # guards user_running / injected (see _interrupts.inject) and the
        # making of _blocking
        self.state = threading.Lock()
        # the worker is inside switch() (see _switch_nested)
        self.switching = False
        self.user_running = False
        self.injected = False
        # KeyboardInterrupt / SystemExit that hit the host while it waited
        self.interrupt: BaseException | None = None
        # ``interrupt`` was deferred by the SIGINT guard (_ki) and is still
        # to be carried into the sync code at the host's next wait
        self.interrupt_pending = False
        # the host has taken the call's outcome (or is leaving without it):
        # an interrupt can no longer be delivered through the call
        self.settled = False
        self.worker: Any = None
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = _copy_context()
        # the host thread's trace / profile functions, for the worker
        self.tracing = _tracing.capture()
        # worker -> host: an awaitable, or DONE
        self.outbox: Any = None
        # host -> worker: (the awaitable's outcome, the host's context if
        # it changed)
        self.inbox: tuple[Outcome[Any], contextvars.Context | None] | None = None
        #: the outcome of fn, once the worker has delivered DONE
        self.outcome: Outcome[Any] | None = None
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
        self.mailbox = mailbox
        # the sync code's blocking calls (sync drivers' statements) and the
        # cancellation that interrupts them: made on first use (blocking())
        self._blocking: Blocking | None = None

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
            _set_running_loop(cast(Any, _LoopProxy(loop, self.loop_thread, current_call)))
        tracing = self.tracing
        traced = _tracing.follow(tracing) if tracing is not None else None
        try:
            if self.domain is not None:
                self.enter_domain()
            self.enter_user(first=True)
            try:
                self.outcome = Value(self.context.run(self.fn, *self.args, **self.kwargs))
            finally:
                self.leave_user()
        except BaseException as err:
            self.outcome = Error(err)
        finally:
            if traced is not None:
                _tracing.unfollow(traced)
            self.leave_domain()
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
        self.deliver(DONE)
        self.release_channel()

    def enter_user(self, first: bool = False) -> None:
        with self.state:
            interrupt = self.interrupt
            if first and interrupt is not None and not self.injected:
                # Ctrl-C hit the host as it handed this call over, before
                # the sync code began (_host._start): inject() found nothing
                # to interrupt, so the sync code does not start at all
                raise interrupt
            self.user_running = True

    def leave_user(self) -> None:
        """The worker leaves the caller's code for the bridge's: an
        interrupt injected but not raised yet is withdrawn (it is delivered
        at the await_() instead, by the host)."""
        with self.state:
            self.user_running = False
            if self.injected:
                self.injected = False
                _interrupts.withdraw(self.thread_id)

    def enter_domain(self) -> None:
        """Take the engine's domain lock (see _host.place) before running
        sync code: the sync code of another task on the same engine may be
        between two of its await points right now."""
        domain = self.domain
        if domain is not None and not self.domain_held:
            domain.acquire()
            self.domain_held = True

    def leave_domain(self) -> None:
        if self.domain_held:
            self.domain_held = False
            self.domain.release()

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
        if self.switching:
            return self._switch_nested(awaitable)
        self.switching = True
        try:
            self.leave_user()
            if self.host_gone:
                safe_close(awaitable)
                raise HostGone(HOST_GONE_MESSAGE)
            # the stretch is over: another task's sync code on the engine
            # may run (checked inline: this is the per-await path)
            if self.domain_held:
                self.leave_domain()
            self.deliver(awaitable)
            wait_reply = self.channel.wait_reply
            if not wait_reply(LIVENESS_INTERVAL):
                self._wait_while_alive(wait_reply)
            if self.domain is not None:
                self.enter_domain()
            self.enter_user()
            inbox, self.inbox = self.inbox, None
        finally:
            self.switching = False
        assert inbox is not None
        outcome, snapshot = inbox
        del inbox
        if snapshot is not None:
            apply_context(snapshot, self.worker_tokens)
        return outcome.unwrap()

    def _switch_nested(self, awaitable: Any) -> Any:
        """``await_()`` re-entered on this worker while its own ``switch()``
        is mid-hand-off: a finalizer the garbage collector ran there (a
        ``__del__``, a weakref callback) awaits something -- aiosqlite's
        ``Connection.__del__`` calls ``loop.create_future()``, which
        :class:`_LoopProxy` hops to the loop thread.  Under greenlet such a
        switch simply nests.  Here the channel carries one message each
        way at a time: a second hand-off through it would overwrite the one
        in flight and take its reply (seen as SQLAlchemy's suite hanging
        when a pool's spare connection was collected mid-``await_()``), and
        the nested call must not touch the outer one's domain or user
        state either.  So it goes to the loop by the backend's thread-safe
        scheduling, as a task of its own, and this thread waits for it.

        The host may be blocking its loop for the outer hand-off's message
        (``handoff_timeout``): that wait is bounded, so the loop runs the
        nested call soon after; with ``handoff_timeout=None`` it is not,
        and waiting would deadlock, so that case raises instead."""
        if self.handoff < 0:
            safe_close(awaitable)
            raise RuntimeError(
                "await_() was called re-entrantly, from a finalizer (__del__ "
                "or a weakref callback) that ran while this worker's own "
                "await_() was handing off to the event loop; with "
                "install(handoff_timeout=None) the loop may be blocked for "
                "that hand-off, so the finalizer cannot be served.  Close the "
                "object explicitly instead of leaving it to the garbage "
                "collector, or use a bounded handoff_timeout"
            )
        done = threading.Event()
        box: list[Outcome[Any]] = []

        def finish(outcome: Outcome[Any]) -> None:
            box.append(outcome)
            done.set()

        self.host.run_nested(awaitable, finish)
        if not done.wait(LIVENESS_INTERVAL):
            self._wait_while_alive(done.wait)
        return box[0].unwrap()

    def _wait_while_alive(self, wait: Callable[[float], bool]) -> None:
        """Go on waiting (``wait(timeout)`` returns True once the reply is
        there) after a first LIVENESS_INTERVAL went by without it, checking
        that the host can still reply -- rarely, and more rarely the longer
        it waits: thousands of workers parked in a pool's queue must not
        wake up every second."""
        interval = LIVENESS_INTERVAL
        while True:
            if not self.host.alive():
                # the loop was closed (or the trio run ended) with the task
                # parked here: nobody will ever reply.  greenlet would throw
                # GreenletExit into this frame when the task is collected;
                # the task cannot be collected while this frame holds it, so
                # the worker notices by itself.
                self.host_gone = True
                raise HostGone(HOST_GONE_MESSAGE)
            interval = min(interval * 2, LIVENESS_MAX_INTERVAL)
            if wait(interval):
                return

    # -- either side -------------------------------------------------------

    def blocking(self) -> Blocking:
        """The call's blocking calls and the cancellation that interrupts
        them (see _blocking), made on first use -- by the worker at a sync
        driver's first statement, or by the host when it catches a
        cancellation -- so that a call that has neither pays nothing."""
        blocking = self._blocking
        if blocking is None:
            with self.state:
                blocking = self._blocking
                if blocking is None:
                    blocking = self._blocking = Blocking()
        return blocking

    # -- host side ---------------------------------------------------------

    def checkpoint(self) -> None:
        """A cancellation point of the sync code that is neither an
        await_() nor a blocking call (see _blocking.Blocking.checkpoint);
        nothing to do unless the host has handed a cancellation over."""
        blocking = self._blocking
        if blocking is not None:
            blocking.checkpoint()

    def send(self, outcome: Outcome[Any], mirror: bool = True) -> None:
        """Reply to the worker; with ``mirror``, the host's context goes
        with it if it differs from the call's.  ``mirror=False`` when the
        worker may be running in ``self.context`` right now (not waiting
        for a reply): comparing a context another thread is changing is
        not safe on a free-threaded build."""
        snapshot = _copy_context() if mirror else None
        changed = mirror and snapshot != self.context
        self.inbox = (outcome, snapshot if changed else None)
        self.channel.signal_worker()

    def take(self) -> Any:
        """The message the worker delivered; syncs the context first."""
        message, self.outbox = self.outbox, None
        context = self.context
        if _copy_context() != context:
            apply_context(context, self.host_tokens)
        return message


def current_call() -> _Call | None:
    """The call the current thread runs as a worker, if any."""
    return getattr(_local, "call", None)
