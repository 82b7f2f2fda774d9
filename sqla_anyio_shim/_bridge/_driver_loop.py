"""Async drivers inside the worker: each connection on an event loop of its
own (``install(driver_loops=...)``; docs/principle.md, "Driver loops").

In the hand-off mode every ``await_()`` of the sync code is a round trip
to the event-loop thread.  Here a driver connection gets a private asyncio
loop, made when it connects and closed when it is closed, and the worker
that runs the sync code runs the driver's coroutines on that loop itself
(``run_until_complete``): a call then costs the two hops of ``to_thread``
(start, finish) and none per driver call, and the host's loop can be
anything -- trio included -- since the driver never sees it.

Which awaits run here is decided by the *connection*, not by guessing: the
SQLAlchemy side (``_sqla._driver_loops``) wraps the adapter classes'
methods so that, while one runs in a worker, the adapter's driver loop is
the thread's current :class:`DriverLoop` (:func:`scope`); ``await_()``
there runs on it (:meth:`DriverLoop.run`).  Every other await point (the
pool's queue, the user's awaitables, a connection made in the hand-off
mode) still goes to the host.

A driver call is a blocking call of the sync code (``_blocking``, with
``keep_outcome``): caught while it runs, a cancellation of the task makes
the *interrupter* cancel the private task from another thread
(``call_soon_threadsafe``) -- the driver's coroutine sees ``CancelledError``
at its suspension, as under greenlet, and does its own clean-up (asyncpg's
cancel request) -- and the backend's cancellation is raised when it ends.
Caught before the call began, it starts the coroutine and cancels it at its
first suspension, where greenlet's task would have had it.  An outcome the
coroutine reached before the cancellation reached it is kept, and the
cancellation left for the next await point (a new connection must not be
dropped).

A connection's loop is run by one thread at a time: by the worker of the
task that holds the connection (SQLAlchemy's rule: one task per
connection; engines that share a connection between tasks keep the
engine's domain lock, see _host.place).  Between calls it does not run:
callbacks a driver schedules then (a transport's close, a timer) run at
the connection's next call, or when the loop is closed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import weakref
from collections.abc import Awaitable
from typing import Any

from ._call import _Call, _local, safe_close
from ._host import release_slot
from ._loop_proxy import _LoopProxy

__all__ = ["DriverLoop", "call_in_scope", "current", "scope"]

_log = logging.getLogger("sqla_anyio_shim")

_get_running_loop = asyncio._get_running_loop
_set_running_loop = asyncio._set_running_loop

#: seconds a closing loop runs for its tasks' clean-up at most
CLOSE_TIMEOUT = 2.0

#: the name of the short-lived threads that close a loop for a thread that
#: runs an event loop of its own (a connection collected on the loop thread)
CLOSER_THREAD_NAME = "sqla-anyio-shim-loop-closer"


class _ConnectionEventLoop(asyncio.SelectorEventLoop):
    """A connection's loop.  A driver's own thread (aiosqlite's) completes
    its futures with ``call_soon_threadsafe``; when a task was cancelled and
    its connection terminated, the loop may be closed before that thread's
    call ends -- the completion then has nobody left to reach (on
    greenlet's loop, which outlives the connection, it is dropped by the
    cancelled future) and is dropped here too, instead of raising in the
    driver's thread."""

    def call_soon_threadsafe(  # type: ignore[override]
        self, callback: Any, *args: Any, context: Any = None
    ) -> asyncio.Handle:
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if not self.is_closed():
                raise
            handle = asyncio.Handle(callback, args, self, context)
            handle.cancel()
            return handle

    def run_call(self, awaitable: Awaitable[Any], on_task: Any) -> Any:
        """``run_until_complete(awaitable)`` for one driver call, with less
        ceremony: it is on every driver await of the mode.  Measured on an
        asyncpg select (CPython 3.13, yappi call counts): the general
        runner made four loop iterations per await -- the task's first
        step, the I/O, the task's last step, the done callback that stops
        the loop -- and some 60 Python calls around them.  Here the task
        starts eagerly (3.12+: its first step runs in this call, up to its
        first suspension; a coroutine that never suspends needs no
        iteration at all) and the loop iterates only while the task is not
        done, so nothing has to stop it.  What ``run_forever`` sets up for
        the task is set up the same way (the running loop, the thread that
        runs it, the async-generator hooks) and undone after.

        ``on_task(task)`` is called once the task exists (its interrupter
        may cancel it from then on).  The caller holds the connection's
        run lock and has unset the thread's running loop."""
        loop: Any = self  # the BaseEventLoop internals run_forever uses
        loop._check_closed()
        hooks = sys.get_asyncgen_hooks()
        sys.set_asyncgen_hooks(
            firstiter=loop._asyncgen_firstiter_hook, finalizer=loop._asyncgen_finalizer_hook
        )
        loop._thread_id = threading.get_ident()
        _set_running_loop(self)
        try:
            if _EAGER and asyncio.iscoroutine(awaitable):
                task: asyncio.Future[Any] = _Task(awaitable, loop=self, eager_start=True)
            else:
                task = asyncio.ensure_future(awaitable, loop=self)
            on_task(task)
            run_once = loop._run_once
            while not task.done():
                run_once()
        finally:
            loop._thread_id = None
            _set_running_loop(None)
            sys.set_asyncgen_hooks(*hooks)
        return task.result()


#: Task(eager_start=True) exists (3.12+)
_EAGER = sys.version_info >= (3, 12)
_Task: Any = asyncio.Task


class DriverLoop:
    """The private event loop of one driver connection."""

    __slots__ = ("__weakref__", "_lock", "closed", "loop")

    def __init__(self) -> None:
        self.loop = _ConnectionEventLoop()
        # held while a thread runs the loop: two at once is a connection
        # shared between tasks outside SQLAlchemy's rules
        self._lock = threading.Lock()
        self.closed = False

    def run(self, call: _Call, awaitable: Awaitable[Any]) -> Any:
        """``await_(awaitable)`` in ``call``'s worker, on this loop: run it
        to its end here, as an await point of the call (see the module
        docstring)."""
        if self.closed:
            # a closed connection's adapter: its driver raises (closed
            # connection) without touching a loop; on a loop of its own
            return _run_detached(awaitable)
        if self.loop.is_running():
            # an await_() nested inside this loop's own run (a finalizer
            # that ran there): the host's way
            return call.switch(awaitable)
        # the call did its I/O: _require_await is satisfied, and it is past
        # the pool (its admission slot goes to the next caller, as at the
        # hand-off's first await point other than the pool's queue; only
        # this worker touches the slot while it runs)
        call.sync_io = True
        if call.gate_slot is not None:
            release_slot(call)
        run = _Run(self, awaitable)
        try:
            return call.blocking().run(run.interrupt, run.run, (), keep_outcome=True)
        finally:
            if not run.started:
                # run() failed before it started the awaitable (two threads
                # on one connection): never awaited (a task made for it on
                # this loop -- asyncio.shield()'s -- is cancelled, and
                # finishes when the loop next runs)
                if isinstance(awaitable, asyncio.Future):
                    awaitable.cancel()
                else:
                    safe_close(awaitable)

    def run_here(self, awaitable: Awaitable[Any]) -> Any:
        """Run ``awaitable`` on this loop in the calling thread, outside any
        worker: the host awaiting a coroutine of the connection's driver
        (``AsyncResult``'s soft close of a buffered cursor, which SQLAlchemy
        awaits on the caller's loop).  The task holds the connection, so
        no worker runs the loop meanwhile; the caller's loop waits for it
        (a cursor's close: no round trip to the server)."""
        if self.closed:
            return _run_detached(awaitable)
        return _Run(self, awaitable).run()

    def close(self) -> None:
        """Close the loop, once: cancel what is left on it (a driver's
        background task, such as asyncpg's cancel request) and let it
        finish, run the callbacks pending (a transport's close), then
        close it.  From a thread that runs an event loop of its own (the
        host's loop thread, where the garbage collector may finalize a
        connection), in a short-lived thread instead."""
        if self.closed:
            return
        running = _get_running_loop()
        if running is not None and not isinstance(running, _LoopProxy):
            if running is self.loop:
                # closed from inside its own run (a finalizer): later
                self.loop.call_soon(self.close)
                return
            threading.Thread(target=self._close_now, name=CLOSER_THREAD_NAME).start()
            return
        self._close_now()

    def _close_now(self) -> None:
        if not self._lock.acquire(timeout=CLOSE_TIMEOUT):
            _log.warning("sqla-anyio-shim: a driver loop still runs; closing it later")
            return
        try:
            if self.closed:
                return
            self.closed = True
            loop = self.loop
            try:
                with _NoRunningLoop():
                    self._finish(loop)
            except BaseException:
                _log.exception("sqla-anyio-shim: closing a driver connection's loop failed")
            finally:
                loop.close()
        finally:
            self._lock.release()

    @staticmethod
    def _finish(loop: asyncio.AbstractEventLoop) -> None:
        """The closing loop's last runs (see :meth:`close`)."""
        # what the driver left running is let finish first (asyncpg's
        # cancel request of a statement cancelled by a deadline: the
        # server must still get it), then cancelled
        tasks = [task for task in _all_tasks(loop) if not task.done()]
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_TIMEOUT))
            tasks = [task for task in tasks if not task.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_TIMEOUT))
        # the callbacks pending: a transport's connection_lost, ...
        loop.run_until_complete(_pass_twice())
        loop.run_until_complete(loop.shutdown_asyncgens())


# the real one, bound before install() replaces asyncio.all_tasks (with
# one that lists the host's tasks from a worker)
_all_tasks = asyncio.all_tasks


class _NoRunningLoop:
    """While a loop runs here: this thread's running loop (the driver
    scope's, a worker's loop proxy, the host's own on its thread) is
    unset, as ``run_until_complete`` requires, and restored after.

    On the host's loop thread (``DriverLoop.run_here``, a connection
    collected there) a task of the host's loop is running, too.  Up to
    3.13 asyncio keeps the running task per loop, so a task of another
    loop may be entered meanwhile; since 3.14 it is kept per *thread*, and
    entering one raises "Cannot enter into task ... while another task
    ... is being executed" (in a callback of the nested loop: the task
    never runs, and the nested run never ends).  So the host's task is
    set aside for the nested run (``_swap_current_task``) and put back
    after."""

    __slots__ = ("previous", "task")

    def __enter__(self) -> None:
        self.previous = previous = _get_running_loop()
        self.task = None
        if _PER_THREAD_TASK and previous is not None and not isinstance(previous, _LoopProxy):
            self.task = _swap_current_task(previous, None)
        _set_running_loop(None)

    def __exit__(self, *exc_info: Any) -> None:
        previous = self.previous
        _set_running_loop(previous)
        if self.task is not None:
            _swap_current_task(previous, self.task)
            self.task = None


#: asyncio keeps the running task per thread (3.14+), not per loop
_PER_THREAD_TASK = sys.version_info >= (3, 14)
_swap_current_task: Any = getattr(asyncio.tasks, "_swap_current_task", None)


def _run_detached(awaitable: Awaitable[Any]) -> Any:
    """Run ``awaitable`` on a short-lived loop in this thread."""
    loop = asyncio.new_event_loop()
    try:
        with _NoRunningLoop():
            return loop.run_until_complete(awaitable)
    finally:
        loop.close()


async def _pass_twice() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


class _Run:
    """One driver call on a connection's loop, and its interrupter."""

    __slots__ = ("awaitable", "cancelled", "lock", "owner", "started", "task")

    def __init__(self, owner: DriverLoop, awaitable: Awaitable[Any]) -> None:
        self.owner = owner
        self.awaitable: Any = awaitable
        self.task: asyncio.Future[Any] | None = None
        self.started = False
        self.cancelled = False
        self.lock = threading.Lock()

    def run(self) -> Any:
        owner = self.owner
        loop = owner.loop
        if not owner._lock.acquire(blocking=False):
            raise RuntimeError(
                "a driver connection's event loop is already running in another "
                "thread: one connection is used by two tasks at once, which "
                "SQLAlchemy's threading rules do not allow.  Use a connection (or "
                "Session) per task, or keep the engine atomic with "
                "sqla_anyio_shim.keep_atomic(engine)"
            )
        try:
            with _NoRunningLoop():
                self.started = True
                awaitable, self.awaitable = self.awaitable, None
                return loop.run_call(awaitable, self._started)
        finally:
            owner._lock.release()

    def _started(self, task: asyncio.Future[Any]) -> None:
        with self.lock:
            self.task = task
            cancelled = self.cancelled
        if cancelled:
            # after its first step: cancelled at its first suspension (a
            # task already done ignores it: its outcome is kept)
            self.owner.loop.call_soon(task.cancel)

    def interrupt(self) -> None:
        """From another thread (_blocking's interrupter thread): cancel the
        driver's coroutine at its suspension."""
        with self.lock:
            self.cancelled = True
            task = self.task
        if task is None:
            return  # not started yet: run() cancels it as it starts
        try:
            self.owner.loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:
            pass  # the loop is closed: nothing runs on it any more


def current() -> DriverLoop | None:
    """The driver loop of the adapter whose method runs on this thread now."""
    return getattr(_local, "driver", None)


class scope:  # lower case: used as a function, ``with scope(driver):``
    """While an adapter method of a connection whose loop is ``driver``
    runs: its ``await_()`` go to ``driver`` (None: to the host), and the
    sync code's running loop is that loop (``asyncio.shield()`` or
    ``asyncio.get_event_loop()`` in the adapter's sync code make tasks and
    futures for it).  A class, not a generator: it is on every adapter
    call's path."""

    __slots__ = ("driver", "previous", "previous_loop")

    def __init__(self, driver: DriverLoop | None) -> None:
        self.driver = driver

    def __enter__(self) -> None:
        self.previous = getattr(_local, "driver", None)
        _local.driver = driver = self.driver
        if driver is not None:
            self.previous_loop = _get_running_loop()
            _set_running_loop(driver.loop)

    def __exit__(self, *exc_info: Any) -> None:
        if self.driver is not None:
            _set_running_loop(self.previous_loop)
        _local.driver = self.previous


def call_in_scope(driver: DriverLoop | None, fn: Any, self: Any, args: Any, kwargs: Any) -> Any:
    """``fn(self, *args, **kwargs)`` in ``driver``'s scope: what ``with
    scope(driver):`` does, inlined -- an asyncpg select passes here five
    times, and the class's three calls per pass were a tenth of the
    mode's Python calls."""
    local = _local
    previous = getattr(local, "driver", None)
    if driver is previous:
        return fn(self, *args, **kwargs)
    local.driver = driver
    if driver is None:
        try:
            return fn(self, *args, **kwargs)
        finally:
            local.driver = previous
    previous_loop = _get_running_loop()
    _set_running_loop(driver.loop)
    try:
        return fn(self, *args, **kwargs)
    finally:
        _set_running_loop(previous_loop)
        local.driver = previous


# -- the loops of driver connections ----------------------------------------

_ATTR = "_sqla_anyio_shim_driver_loop"
# for driver connections without a __dict__ (asyncpg's): by id(), the entry
# removed by the connection's finalizer -- which runs before its memory,
# and so its id, can be reused.  (A WeakKeyDictionary's get() is a Python
# call, and an adapter call looks its loop up each time.)
_by_id: dict[int, DriverLoop] = {}

#: whether any connection ever got a loop of its own: until then the
#: adapters' wrappers (_sqla._driver_loops) step aside at once
in_use = False


def attach(connection: Any, driver: DriverLoop) -> bool:
    """Make ``driver`` the loop of the driver connection ``connection``;
    it is closed when the connection is collected if nothing closed it
    before.  False if the connection can hold neither an attribute nor a
    weak reference (its loop is then closed only with the connection)."""
    global in_use
    in_use = True
    has_dict = hasattr(connection, "__dict__")
    key = None if has_dict else id(connection)
    try:
        weakref.finalize(connection, _collected, key, driver)
    except TypeError:
        if not has_dict:
            return False
    if has_dict:
        connection.__dict__[_ATTR] = driver
    else:
        # dict item assignment and pop are atomic (free-threaded too)
        _by_id[key] = driver  # type: ignore[index]
    return True


def _collected(key: int | None, driver: DriverLoop) -> None:
    if key is not None:
        _by_id.pop(key, None)
    driver.close()


def loop_of(connection: Any) -> DriverLoop | None:
    """The driver loop of ``connection`` (None: it was made in the
    hand-off mode, its awaits go to the host)."""
    if connection is None:
        return None
    d = getattr(connection, "__dict__", None)
    if d is not None:
        return d.get(_ATTR)  # type: ignore[no-any-return]
    return _by_id.get(id(connection))
