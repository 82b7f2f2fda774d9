"""The runtime bridge: SQLAlchemy's sync code in worker threads, every
``await_()`` awaited by the calling task.  It knows nothing of SQLAlchemy
but its exception classes; what it knows is plugged in from ``_sqla``.

One call, from ``greenlet_spawn()`` to a worker and back, room by room:

=================  ========================================================
``_entry``         the entry points: ``greenlet_spawn()``, ``await_()``,
                   ``in_greenlet()``, ``current_task()``, ...
``_asyncio``       the asyncio backend: its ``spawn()`` and its side of the
``_trio``          host (how it waits through the loop, where a
                   cancellation lands); the trio backend, the same
``_host``          the one host loop, ``run_call()``: start the call on a
                   worker, serve each awaitable, return the outcome; the
                   admission gate and test hook plugged into it
``_call``          the call shared by host and worker (``_Call``), and its
                   outcomes (``Value`` / ``Error``)
``_workers``       the worker threads (a LIFO cache, as trio's)
``_channel``       the wake-up of one hop between host and worker (eventfd)
``_wakeups``       waking a task from a worker: the host's mailbox, and
                   the one-shot ``_Waiter`` of the pool queue, lock and gate
``_driver_loop``   async drivers inside the worker: a connection's own
                   event loop, run by the worker (``driver_loops``)
``_blocking``      a blocking call of the sync code (a sync driver's
                   statement) as an await point: the cancellation that
                   interrupts it
``_context``       context variables across a hop
``_interrupts``    Ctrl-C delivered into the sync code
``_loop_proxy``    the asyncio loop as the sync code in a worker sees it
``_stats``         counters for ``stats()``, the slow-call warning
=================  ========================================================

Imports go one way: ``_entry`` -> backends -> ``_host`` -> ``_call`` -> the
leaves (``_workers``, ``_channel``, ``_wakeups``, ``_blocking``, ``_context``,
``_interrupts``, ``_loop_proxy``, ``_stats``; and the package's
``_options``).  The names below are what the rest of the package uses.
"""

from __future__ import annotations

from ._call import (
    AWAIT_REQUIRED_MESSAGE as AWAIT_REQUIRED_MESSAGE,
    HOST_GONE_MESSAGE as HOST_GONE_MESSAGE,
    HostGone as HostGone,
    _Call as _Call,
    current_call as current_call,
    safe_close as safe_close,
    sqlalchemy_exc as sqlalchemy_exc,
)
from ._driver_loop import DriverLoop as DriverLoop
from ._entry import (
    all_tasks as all_tasks,
    await_ as await_,
    await_fallback as await_fallback,
    cancellation_point as cancellation_point,
    current_loop_of_worker as current_loop_of_worker,
    current_task as current_task,
    driver_loops_in_force as driver_loops_in_force,
    ended_cleanly as ended_cleanly,
    greenlet_spawn as greenlet_spawn,
    host_is_trio as host_is_trio,
    in_greenlet as in_greenlet,
    missing_greenlet as missing_greenlet,
    new_driver_loop as new_driver_loop,
    note_sync_io as note_sync_io,
    on_loop_thread as on_loop_thread,
    run_blocking as run_blocking,
    run_on_loop_thread as run_on_loop_thread,
    set_missing_greenlet_message as set_missing_greenlet_message,
)
from ._host import Gate as Gate, set_await_hook as set_await_hook, set_gate as set_gate
from ._stats import call_stats as call_stats
from ._workers import NO_THREADS_AT_EXIT as NO_THREADS_AT_EXIT, pool as pool
