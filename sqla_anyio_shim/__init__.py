"""sqla-anyio-shim: SQLAlchemy's asyncio extension without greenlet.

::

    import sqla_anyio_shim; sqla_anyio_shim.install()

After that, ``sqlalchemy.ext.asyncio`` runs SQLAlchemy's sync code in worker
threads, and every ``await_()`` in it is awaited by the calling task through
the event loop (asyncio or trio).  See ``docs/principle.md`` for how.

PYTEST_DONT_REWRITE: this package holds no test assertions, and it is often
imported before pytest starts (``sitecustomize``, ``python -m sqla_anyio_shim
run -- pytest``, ``SQLA_ANYIO_SHIM=1``); without this marker pytest, which
marks every package of a distribution with a ``pytest11`` entry point for
assertion rewriting, warns "Module already imported so cannot be rewritten".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import _bridge, _options
from ._sqla import _admission, _patching, _targets
from ._sqla._patching import UnsupportedSQLAlchemyVersion as UnsupportedSQLAlchemyVersion

# the package is the one place where the rooms are wired together: the
# bridge's admission gate is SQLAlchemy knowledge (which calls hold a
# connection, which await is the pool's queue)
_bridge.set_gate(_admission)

__all__ = [
    "Stats",
    "UnsupportedSQLAlchemyVersion",
    "__version__",
    "install",
    "is_installed",
    "keep_atomic",
    "stats",
    "uninstall",
]

__version__ = "0.1.0"


def install(
    *,
    max_workers: int | None = None,
    idle_timeout: float = 10.0,
    max_idle_workers: int | None = None,
    sync_drivers: bool = False,
    handoff_timeout: float | None = 0.002,
    slow_call_warning: float | None = 0.1,
    max_pool_waiters: int | None = 64,
    parallel: bool | None = None,
    driver_loops: bool | None = None,
) -> None:
    """Replace SQLAlchemy's greenlet helpers with the thread bridge.

    Idempotent and thread-safe; may be called before or after SQLAlchemy
    modules are imported (later imports are patched as they happen).
    Calling it again changes the options.

    :param max_workers: upper bound on worker threads; ``None`` (the
        default) creates one per ``greenlet_spawn()`` in flight, as greenlet
        creates one greenlet per call.  A call beyond the bound waits,
        without blocking the event loop, for a worker to come free -- but
        a call that works on a checked-out connection gets a worker beyond
        the bound, since it may be the one to return the connection the
        waiting calls need.
    :param idle_timeout: seconds after which an idle worker thread retires.
    :param max_idle_workers: idle workers kept at most (``None``: no cap).
    :param sync_drivers: let ``create_async_engine()`` accept plain sync
        DBAPI drivers (``sqlite://``, ``postgresql+psycopg://``,
        ``mysql+pymysql://``), which then run directly in the workers.
    :param handoff_timeout: seconds the calling task blocks its event loop
        waiting for the sync code to reach its next ``await_()`` (or to
        finish) before it lets the loop run other tasks meanwhile.  Within
        it a hop is a direct thread hand-off and the sync code is atomic
        with respect to the loop, as under greenlet; past it, other tasks
        run while the sync code does.  ``None`` blocks until the next
        await point, exactly like greenlet (a sync driver's I/O then
        stalls the loop, and sync code that waits for the loop deadlocks).
    :param slow_call_warning: seconds; a call whose sync code keeps the
        event loop blocked longer than this in one stretch is logged at
        WARNING on the ``sqla_anyio_shim`` logger (``None``: never).
    :param max_pool_waiters: calls that may be at one connection pool at
        once (started and not yet past it: waiting in its queue, or not yet
        at their first other await point).  Beyond it a new
        ``greenlet_spawn()`` for that pool waits in the event loop, without
        a thread, until one of them is past the pool; the wait counts
        against the pool's ``pool_timeout``.  Calls working on a
        checked-out connection, and calls whose pool cannot be told (a
        plain function given to ``run_sync``), always pass.  Under greenlet
        a task waiting for a connection costs a small stack; here a thread.
        ``None``: no bound (a thread per waiting task).
    :param parallel: whether the sync code of different tasks may run at the
        same time, the event loop never blocked waiting for it (as threaded
        sync SQLAlchemy runs: one task per ``Session`` / ``Connection``).
        ``None`` (auto, the default) is parallel on free-threaded builds
        whose GIL is off and for sync-driver engines everywhere, and blocks
        as greenlet does for async drivers on GIL builds (measured faster
        there), and blocks everywhere with ``handoff_timeout=None``
        (greenlet's behaviour exactly); ``True`` is parallel everywhere;
        ``False`` blocks everywhere.
        A call's first stretch, up to its first ``await_()``, and the rest
        of a call once an await point raised are waited for in every mode
        (async drivers; docs/principle.md).
        Engines whose pool shares a connection between tasks
        (``StaticPool``, ``SingletonThreadPool``, ``AssertionPool``) and
        engines given to :func:`keep_atomic` keep greenlet's atomicity in
        every mode.
    :param driver_loops: whether async drivers run inside the workers: each
        driver connection gets an asyncio event loop of its own, made and
        closed with it, and the worker runs the driver's coroutines on it,
        so that a driver call is no round trip to the caller's event loop
        and the caller's loop may be trio's.  ``None`` (auto, the default)
        is on under trio (where no async driver could run otherwise) and
        off under asyncio; ``True`` everywhere; ``False`` nowhere (async
        drivers are then refused under trio).  It applies to connections
        made after it; each connection keeps the mode it was made in.
    :raises UnsupportedSQLAlchemyVersion: SQLAlchemy is not 2.0.x or 2.1.x.
    """
    settings = _options.settings_from(
        max_workers=max_workers,
        idle_timeout=idle_timeout,
        max_idle_workers=max_idle_workers,
        sync_drivers=sync_drivers,
        handoff_timeout=handoff_timeout,
        slow_call_warning=slow_call_warning,
        max_pool_waiters=max_pool_waiters,
        parallel=parallel,
        driver_loops=driver_loops,
    )
    _bridge.pool.configure(
        max_workers=settings.max_workers,
        idle_timeout=settings.idle_timeout,
        max_idle_workers=settings.max_idle_workers,
    )
    _patching.install(sync_drivers=settings.sync_drivers)
    _options.apply(settings)
    _admission.configure(settings.max_pool_waiters)
    if _bridge.NO_THREADS_AT_EXIT:
        # CPython 3.12 starts no thread in atexit handlers: keep one worker
        # for a query made there (as greenlet runs it)
        _bridge.pool.keep_reserve()


def keep_atomic(engine: Any) -> None:
    """Keep greenlet's atomicity for ``engine`` (an ``AsyncEngine`` or its
    ``sync_engine``) in every mode: the sync code of its tasks runs one
    stretch at a time (between two await points), with no other task's
    sync code on the engine in between -- for an application that shares
    one connection or session between tasks, which SQLAlchemy's threading
    rules do not allow.  Engines on ``StaticPool``, ``SingletonThreadPool``
    and ``AssertionPool`` are kept so without it.  It applies to the calls
    started after it, on the engine and on the engines its
    ``execution_options()`` made (calls in flight finish as they began):
    mark the engine before its tasks share anything."""
    _targets.keep_atomic(engine)


def uninstall() -> None:
    """Restore exactly what :func:`install` replaced (greenlet is used
    again if it is installed).  Idle worker threads are stopped.

    Refused (RuntimeError) while ``greenlet_spawn()`` calls are in flight:
    their sync code would go on with SQLAlchemy's own helpers, which cannot
    reach their host task (``MissingGreenlet``, or a pool that waits for
    connections those calls would never return)."""
    in_flight = int(_bridge.call_stats()["calls_in_flight"])
    if in_flight and _patching.is_installed():
        raise RuntimeError(
            f"sqla_anyio_shim.uninstall() was called with {in_flight} "
            "greenlet_spawn() call(s) in flight (sessions, connections or "
            "run_sync() at work); their sync code runs on this bridge and "
            "would lose its way back to the event loop, and their "
            "connections with it.  Await them (or close the engines: "
            "await engine.dispose()) before uninstalling"
        )
    _patching.uninstall()
    # the other options stay as they were (install() sets them all again)
    _options.apply(dataclasses.replace(_options.current, sync_drivers=False))
    _bridge.pool.shutdown()


def is_installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _patching.is_installed()


@dataclass(frozen=True)
class Stats:
    """A snapshot of the bridge, from :func:`stats`."""

    #: worker threads alive, running a call, and idle (kept for reuse)
    workers_total: int
    workers_busy: int
    workers_idle: int
    #: calls waiting for a worker (only with ``max_workers``)
    workers_waiting: int
    #: ``greenlet_spawn()`` calls in flight, on every event loop
    calls_in_flight: int
    #: seconds: the longest stretch a call's sync code kept an event loop
    #: blocked (its host waiting on it from one await point to the next)
    #: since start-up or the last ``stats(reset=True)``
    longest_loop_hold: float
    #: calls not yet past the pool (started, or waiting in its queue for a
    #: connection): at most ``max_pool_waiters``
    calls_at_pool: int = 0
    #: calls waiting in the event loop, without a thread, because
    #: ``max_pool_waiters`` calls are at the pool already
    calls_waiting_admission: int = 0


def stats(*, reset: bool = False) -> Stats:
    """What the bridge is doing now: worker threads, calls in flight, and
    the longest time a call held an event loop.  ``reset=True`` starts the
    longest-hold measurement afresh after reading it."""
    pool = _bridge.pool.stats()
    calls = _bridge.call_stats(reset=reset)
    gate = _admission.gate_stats()
    return Stats(
        workers_total=pool.total,
        workers_busy=pool.busy,
        workers_idle=pool.idle,
        workers_waiting=pool.waiters,
        calls_in_flight=int(calls["calls_in_flight"]),
        longest_loop_hold=float(calls["longest_loop_hold"]),
        calls_at_pool=gate["occupied"],
        calls_waiting_admission=gate["waiting"],
    )
