"""The host loop: how the task that awaits ``greenlet_spawn()`` serves its
worker, for both backends.

:func:`run_call` is the one skeleton.  It starts the call on a worker, then
repeats: wait for the worker's next message -- first blocking this thread
for up to ``handoff_timeout`` (a direct thread hand-off during which the
loop is blocked, exactly as it is while a greenlet runs sync code), then,
if the sync code runs longer, through the event loop so that other tasks
run meanwhile -- and await the message's awaitable in this task
(:func:`_serve`), until the worker delivers ``DONE``.

What differs per backend is behind :class:`Host`, one object per call made
by :mod:`._asyncio` or :mod:`._trio`: how to wait through the loop, how a
worker wakes that wait, and where a cancellation that arrived meanwhile is
delivered.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection
from typing import Any, Protocol

from .. import _options
from . import _interrupts, _ki, _stats, _workers
from ._call import (
    AWAIT_REQUIRED_MESSAGE,
    DONE,
    HOST_GONE_MESSAGE,
    Error,
    HostGone,
    Outcome,
    Value,
    _Call,
    safe_close,
    sqlalchemy_exc,
)
from ._loop_proxy import _OnLoop
from ._wakeups import _Waiter

_perf_counter = time.perf_counter


class Host(Protocol):
    """The backend's side of one call's host (see :mod:`._asyncio`,
    :mod:`._trio`)."""

    async def wait_for_message(self, call: _Call) -> None:
        """Wait through the event loop until the worker's message is there
        (``call.channel.take_message()`` returned True)."""

    def wake(self) -> None:
        """Wake :meth:`wait_for_message`; runs on the loop thread, posted by
        the worker through the call's mailbox."""

    def forget(self) -> None:
        """The host's coroutine is being closed: drop the waiter."""

    def alive(self) -> bool:
        """Whether the host's event loop (or trio run) can still run the
        host task; asked by a worker that has waited long for a reply."""

    def before_serve(self, call: _Call) -> None:
        """Before the host awaits the worker's next awaitable."""

    def after_last(self, call: _Call) -> None:
        """The worker has delivered DONE."""

    def run_nested(self, awaitable: Any, finish: Callable[[Outcome[Any]], None]) -> None:
        """Called from the worker, thread-safe: have the loop run
        :func:`serve_nested` for an ``await_()`` re-entered by a finalizer
        (see _Call._switch_nested)."""


# -- what SQLAlchemy knowledge plugs in -------------------------------------


class Slot(Protocol):
    """What a call holds from its admission on (``call.gate_slot``)."""

    #: the call works on a checked-out connection: it passes max_workers
    holder: bool
    #: seconds it waited at the gate (taken off its wait in the pool's queue)
    waited: float
    #: held by the sync code of every call on the same engine between its
    #: await points, when the engine's connections are shared between
    #: tasks (StaticPool, ..., keep_atomic()); None: the calls may run at once
    domain: Any
    #: the engine runs a sync driver in the workers (parallel by default)
    sync_driver: bool

    def release(self) -> None:
        """Give the slot back (called once)."""


class Gate(Protocol):
    """Admission of calls at the connection pool (``_sqla._admission``):
    a call holds a slot of its pool from its start until it is past the
    pool."""

    @property
    def pool_wait_codes(self) -> Collection[Any]:
        """The code objects of the pool's queue wait: a call awaiting one
        of them is still at the pool."""

    @property
    def WAIT(self) -> object:
        """try_admit()'s answer when the call must await admit()."""

    def try_admit(self, fn: Any, args: tuple[Any, ...]) -> Slot | object | None:
        """A slot, None (no slot needed), or WAIT."""

    async def admit(self, fn: Any, args: tuple[Any, ...]) -> Slot | None:
        """Wait for a slot (or pass without one)."""


class _NoGate:
    pool_wait_codes: Collection[Any] = frozenset()
    WAIT = object()

    def try_admit(self, fn: Any, args: tuple[Any, ...]) -> None:
        return None

    async def admit(self, fn: Any, args: tuple[Any, ...]) -> None:
        return None  # pragma: no cover -- try_admit never says wait


#: set by set_gate(); read at each call
gate: Gate = _NoGate()


def set_gate(new: Gate | None) -> None:
    """Plug in the admission gate (the package does at import)."""
    global gate
    gate = _NoGate() if new is None else new


#: the pytest plugin's ``await_points`` replacement: called with each
#: awaitable the host is about to await, returns the awaitable to await
await_hook: Callable[[Any], Any] | None = None


def set_await_hook(hook: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """Install ``hook`` (None: none); returns the previous one."""
    global await_hook
    previous, await_hook = await_hook, hook
    return previous


# -- the skeleton ----------------------------------------------------------


#: How long the host may block for the worker's *first* message.  The
#: worker has just been woken, and on a busy machine a thread wake-up alone
#: can take longer than ``handoff_timeout``; past it the call would fall back
#: to the loop before its sync code even started, and the loop would run
#: other tasks where greenlet runs none (SQLAlchemy's test #13749 -- a queue
#: wait that must be registered before the task's next loop iteration --
#: failed so under load on 3.13t).  20 ms: the fairness bound of issue 10.
FIRST_HANDOFF_BOUND = 0.02

#: returned by _next_message when the message was answered already
_ANSWERED = object()


async def acquire_worker(holder: bool) -> _workers._Worker:
    """The slow path of a backend's ``_workers.pool.try_acquire()``: with
    ``max_workers`` reached, wait for the next worker to come free without
    blocking the loop (either backend).

    A call that works on a checked-out connection (``holder``, told by the
    gate) is never held up by ``max_workers``: the workers may all be taken
    by calls waiting for a connection that only this call can return."""
    pool = _workers.pool
    if holder:
        worker = pool.try_acquire(beyond_cap=True)
        assert worker is not None  # a new thread, if none is idle
        return worker
    while True:
        early = _ki.deferred()
        if early is not None:
            # Ctrl-C hit spawn() just before (see _ki): no worker is taken,
            # so it is raised here rather than after a wait for one
            raise early
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


async def take_worker(holder: bool, slot: Slot | None) -> _workers._Worker:
    """A worker for a backend's spawn(): an idle or new one at once, or the
    next to come free (:func:`acquire_worker`); the slot is given back if
    the wait ends otherwise (cancelled)."""
    try:
        worker = _workers.pool.try_acquire(beyond_cap=holder)
        if worker is None:
            worker = await acquire_worker(holder)
    except BaseException:
        give_back(slot)
        raise
    return worker


async def serve_nested(awaitable: Any, finish: Callable[[Outcome[Any]], None]) -> None:
    """A task of its own on the loop for an ``await_()`` that a finalizer
    re-entered in a worker mid-hand-off (_Call._switch_nested): its outcome
    goes to the waiting worker, whatever it is."""
    try:
        value = await awaitable
    except BaseException as err:
        finish(Error(err))
        if not isinstance(err, Exception):
            # trio's Cancelled (the run ending) must propagate out of the
            # system task; asyncio's CancelledError ends the task anyway
            raise
    else:
        finish(Value(value))


@_ki.protect
async def run_call(call: _Call, worker: Any, host: Host, require_await: bool) -> Any:
    """Start ``call`` on ``worker`` and serve it until its sync code has
    finished; return or raise its outcome.

    A Ctrl-C that lands in this bookkeeping (on the main thread) is deferred
    by _ki's guard into ``call.interrupt`` and delivered at the next wait
    (deliver_deferred), as one that lands in a wait is (_interrupted)."""
    call.worker = worker
    call.host = host
    _stats.count_call(1)
    try:
        early = _ki.deferred()
        if early is not None and call.interrupt is None:
            # Ctrl-C hit spawn() after it had taken the worker: the worker
            # finds it as it enters the sync code, which does not start
            call.interrupt = early
        _start(call, worker)
        channel = call.channel
        switched = False
        first = True
        while True:
            if call.interrupt_pending:
                deliver_deferred(call)
            if not _acquire_blocking(call, channel, _wait_bound(call, first)):
                # the sync code runs longer than a hand-off: let the loop run
                _end_stretch(call)
                if call.interrupt_pending:
                    deliver_deferred(call)
                call.async_waiting = True
                await host.wait_for_message(call)
                call.async_waiting = False
            first = False
            message = _next_message(call)
            if message is DONE:
                break
            switched = True
            if message is _ANSWERED:
                continue
            host.before_serve(call)
            if await _serve(call, message) and 0 <= call.handoff < call.first_handoff:
                # an await point raised (a cancellation, a lost connection):
                # the rest of the call is waited for as its first stretch
                # is.  On greenlet the sync code's reaction -- SQLAlchemy
                # invalidating and terminating the connection, with a hop or
                # two on the way -- runs before the loop gets far, and
                # drivers' own background work races with it otherwise
                # (asyncpg's cancel request, see docs/conformance.md)
                call.handoff = call.first_handoff
            del message
        host.after_last(call)
        return _finish(call, switched, require_await)
    except GeneratorExit:
        _abandon(call)
        raise
    finally:
        call.settled = True
        _stats.count_call(-1)
        release_slot(call)
        _end_stretch(call)
        call.release_channel()


def _start(call: _Call, worker: Any) -> None:
    """Hand ``call`` to ``worker``.

    On the loop thread a signal handler can raise at any bytecode: with
    CPython 3.10's ``asyncio.run`` or ``loop.run_until_complete`` the first
    Ctrl-C raises KeyboardInterrupt wherever the loop thread is, and it lands
    inside ``submit()`` when it comes just as the worker starts.  Propagating
    from here would abandon a worker that may already run the sync code; so
    the hand-over is completed (exactly once, _Worker.resubmit) and the
    interrupt is delivered into the sync code, as in _acquire_blocking."""
    try:
        worker.submit(call.run)
    except BaseException as exc:
        # the interrupt first: a worker that had not begun then finds it as
        # it enters the sync code (_Call.enter_user), and does not start it
        _interrupted(call, exc)
        worker.resubmit(call.run, lambda: call.thread_id != 0)


def driver_loops_on(settings: _options.Settings, host_loop: Any) -> bool:
    """Whether async drivers' connections get loops of their own
    (``install(driver_loops=...)``) for a call whose host runs the asyncio
    loop ``host_loop`` (None: trio): on, or auto under trio, whose host no
    asyncio driver could use."""
    mode = settings.driver_loops
    return mode is True or (mode is None and host_loop is None)


def place(call: _Call, slot: Slot | None) -> None:
    """Decide how the host waits for ``call``'s worker: blocking the loop
    for up to ``handoff_timeout`` (greenlet's atomicity: no other task runs
    while this sync code does), or not at all (the parallel mode: the loop
    runs other tasks, and on a free-threaded build their sync code runs at
    the same time on other cores).  See docs/principle.md, "The parallel
    mode".

    * A call on an engine whose pool shares connections between tasks
      (``slot.domain``) is atomic in every mode: the host blocks, and the
      worker holds the engine's domain lock between await points, so that
      no other task's sync code on that engine runs meanwhile even when
      other calls run in parallel (or the hand-off timed out).
    * Otherwise ``install(parallel=...)`` decides; ``None`` (auto) is
      parallel on a free-threaded build whose GIL is off, and for engines
      of sync drivers (whose statements block the worker on the network:
      blocking the loop on them serializes every task's round trips) --
      unless ``handoff_timeout=None`` asked for greenlet's full atomicity.
      Async drivers on loops of their own (driver loops) are not sync
      drivers here: on a GIL build they block, as the hand-off does."""
    settings = _options.current
    domain = slot.domain if slot is not None else None
    if domain is not None:
        call.domain = domain
        _atomic(call, settings.handoff_wait)
        return
    sync_driver = slot is not None and slot.sync_driver
    # the engine's driver I/O runs in the worker: a sync driver's, or an
    # async driver's on its connections' own loops (_driver_loop)
    io_in_worker = sync_driver or (slot is not None and driver_loops_on(settings, call.loop))
    parallel = settings.parallel
    if parallel is None:
        # auto; an explicit handoff_timeout=None asks for greenlet's full
        # atomicity, which auto does not override (parallel=True does).
        # Driver loops on a GIL build block like the hand-off: measured
        # (issue 18, session-reuse cells, same run) the workers running
        # their connections' loops at once took turns at the GIL, 23-116
        # context switches per select; blocking, 3-26, and driver loops
        # beat the hand-off at 100 and 1,000 tasks on every driver
        parallel = (not _gil_enabled() or sync_driver) and settings.handoff_wait >= 0
    if not parallel:
        _atomic(call, settings.handoff_wait)
        return
    call.handoff = 0.0
    # The first stretch -- from the start to the first await_() -- is still
    # waited for, up to FIRST_HANDOFF_BOUND: under greenlet it runs before
    # the loop runs anything else, and code that starts a call and then
    # acts "once it waits" relies on it (SQLAlchemy's #13749 queue tests
    # let the waiter reach the queue in 3 loop iterations; on a GIL build
    # the worker would not get the GIL that soon).  Not with a sync driver:
    # its first stretch is a statement's network round trip, and blocking
    # the loop on it is what serialized every task's round trips.
    call.first_handoff = 0.0 if io_in_worker else FIRST_HANDOFF_BOUND


def _atomic(call: _Call, wait: float) -> None:
    """Greenlet's atomicity, bounded: block ``wait`` for each message (-1:
    no bound; 0, ``handoff_timeout=0``: never), and at least
    FIRST_HANDOFF_BOUND for the first."""
    call.handoff = wait
    call.first_handoff = wait if wait <= 0 else max(wait, FIRST_HANDOFF_BOUND)


#: sys._is_gil_enabled (3.13+): a free-threaded build can switch its GIL
#: back on at run time (an extension that does not declare support), so it
#: is asked per call, which costs a C call
_gil_enabled: Callable[[], bool] = getattr(sys, "_is_gil_enabled", lambda: True)


def _wait_bound(call: _Call, first: bool) -> float:
    """How long the host blocks its loop for the worker's next message (-1:
    no bound, 0: not at all); see :func:`place`.

    Blocking every call on a free-threaded build -- or, the other way,
    parallel calls on engines that share a connection between tasks --
    breaks what the dropped first attempt at a parallel mode learned:
    SQLAlchemy's own suite relies on greenlet's atomicity where tasks share
    one connection (test_pool_classes[StaticPool], 10 tasks on one
    connection), and with the GIL, async drivers lose throughput when the
    host does not block (hop microbenchmark, 100 tasks: 0.54x greenlet
    against 0.75x blocking)."""
    return call.first_handoff if first else call.handoff


def _acquire_blocking(call: _Call, channel: Any, timeout: float) -> bool:
    """Wait for the worker's next message blocking this thread, for at most
    ``timeout``.

    A signal handler raising here (Ctrl-C's KeyboardInterrupt, SystemExit)
    must not abandon the worker, which runs on with the task's connection:
    on greenlet the interrupt would have landed in the sync code itself.
    So it is delivered there (see _interrupts.inject) and the wait goes on;
    the sync code's cleanup runs and the interrupt propagates from
    greenlet_spawn()."""
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


def deliver_deferred(call: _Call) -> None:
    """Carry into the sync code an interrupt that _ki's guard deferred
    (``call.interrupt``), once: at its next line if it runs the caller's
    code, else at its next await_() (_next_message)."""
    call.interrupt_pending = False
    interrupt = call.interrupt
    if interrupt is not None:
        _interrupts.inject(call, type(interrupt))


def _interrupted(call: _Call, exc: BaseException) -> bool:
    """A signal handler raised while the host waited (see
    _acquire_blocking)."""
    if call.interrupt is None:
        call.interrupt = exc
    _interrupts.inject(call, type(exc))
    return False


def _end_stretch(call: _Call) -> None:
    """The loop runs again (the host waits through it, or the call ends):
    the stretch during which this call's sync code held the loop is over."""
    hold = call.hold
    if hold == 0.0:
        return
    call.hold = 0.0
    _stats.note_hold(hold)
    settings = _options.current
    threshold = settings.slow_call_warning
    if threshold is not None and hold >= threshold:
        _stats.warn_slow_hold(call.fn_name, hold, threshold, settings.handoff_timeout is None)


def _next_message(call: _Call) -> Any:
    """Take the worker's message: ``DONE``, an awaitable to serve, or
    ``_ANSWERED`` -- Ctrl-C hit the host while the sync code ran, so the
    sync code gets the interrupt at this await_() instead (if the injected
    one has not landed yet), runs its cleanup, and the interrupt
    propagates."""
    message = call.take()
    if message is DONE:
        call.finished = True
        return DONE
    if call.interrupt is not None:
        # delivered here, so not also carried in later (deliver_deferred)
        call.interrupt_pending = False
        safe_close(message)
        call.send(Error(call.interrupt))
        return _ANSWERED
    return message


async def _serve(call: _Call, awaitable: Any) -> bool:
    """Await one awaitable for the worker, in the host task, and send the
    outcome back.  Returns whether it raised."""
    pool_wait = False
    if call.gate_slot is not None:
        # a call waiting in the pool's queue keeps its admission slot until
        # the wait is over; any other await point means it is past the pool,
        # and its slot goes to the next call (see _sqla._admission)
        pool_wait = getattr(awaitable, "cr_code", None) in gate.pool_wait_codes
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
    outcome: Outcome[Any]
    interrupt = call.interrupt
    if interrupt is not None:
        # Ctrl-C was deferred (_ki) after _next_message looked: the sync
        # code gets it here rather than after an awaitable that may run long
        call.interrupt_pending = False
        safe_close(awaitable)
        outcome = Error(interrupt)
    else:
        try:
            outcome = Value(await awaitable)
        except GeneratorExit:
            # the host's own coroutine is being closed, not the awaitable
            # failing: run_call abandons the call (the sync code gets
            # HostGone at this await_())
            raise
        except BaseException as err:
            outcome = Error(err)
    del interrupt
    if pool_wait:
        release_slot(call)
    call.send(outcome)
    return outcome.__class__ is Error


def give_back(slot: Slot | None) -> None:
    """A call that got its slot will not start after all (cancelled before
    it had a worker): the slot goes to the next caller."""
    if slot is not None:
        slot.release()


def release_slot(call: _Call) -> None:
    """Give the call's admission slot back, once."""
    slot = call.gate_slot
    if slot is not None:
        call.gate_slot = None
        slot.release()


def _finish(call: _Call, switched: bool, require_await: bool) -> Any:
    """The outcome of a finished call, for greenlet_spawn() to return or
    raise."""
    call.settled = True
    outcome, call.outcome = call.outcome, None
    assert outcome is not None
    interrupt, call.interrupt = call.interrupt, None
    if interrupt is not None and not (
        isinstance(outcome, Error) and isinstance(outcome.error, type(interrupt))
    ):
        # the sync code finished before the interrupt reached it: the
        # interrupt still propagates (its outcome is dropped, as Ctrl-C on
        # greenlet's loop thread would have dropped it)
        outcome = Error(interrupt)
    del interrupt
    if isinstance(outcome, Error):
        outcome.unwrap()
    if require_await and not switched and not call.sync_io:
        raise sqlalchemy_exc().AwaitRequired(AWAIT_REQUIRED_MESSAGE)
    return outcome.value


def _abandon(call: _Call) -> None:
    """The host's coroutine is being closed (GeneratorExit: the loop was
    closed with the task pending, or the coroutine was dropped) while the
    worker runs: the sync code gets HostGone at its next await_() -- or
    now, if it is already waiting for a reply -- instead of waiting forever
    for a host that no longer exists, so its cleanup runs and the worker
    goes back to the pool."""
    call.host_gone = True
    call.host.forget()
    if call.channel.take_message():
        # a message was waiting: an awaitable nobody will await (or DONE)
        message, call.outbox = call.outbox, None
        if message is DONE:
            call.finished = True
            return
        safe_close(message)
        call.send(Error(HostGone(HOST_GONE_MESSAGE)))
        return
    # no message: the worker still runs its sync code, in the call's
    # context -- no context to mirror to it, and none to compare with
    call.send(Error(HostGone(HOST_GONE_MESSAGE)), mirror=False)
