"""The thread bridge: greenlet_spawn / await_ with greenlet's semantics."""

from __future__ import annotations

import contextvars
import gc
import random
import sys
import threading
import traceback
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import exc
from sqlalchemy.util import concurrency

from sqla_anyio_shim import _bridge, _options
from sqla_anyio_shim._bridge import _workers

from .conftest import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

greenlet_spawn = concurrency.greenlet_spawn
await_ = getattr(concurrency, "await_", None) or concurrency.await_only
in_greenlet = concurrency.in_greenlet

MISSING = "greenlet_spawn has not been called; can't call await_"


def test_greenlet_is_absent() -> None:
    """The whole suite runs without greenlet: a green run proves nothing
    about the shim if greenlet did the work."""
    with pytest.raises(ImportError):
        import greenlet  # noqa: F401
    assert "greenlet" not in sys.modules


def test_helpers_are_the_bridge() -> None:
    assert concurrency.greenlet_spawn is _bridge.greenlet_spawn
    assert in_greenlet is _bridge.in_greenlet
    assert await_ is _bridge.await_


async def test_return_value_args_kwargs(anyio_backend: Any) -> None:
    async def add(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    def sync(x: int, *, y: int) -> int:
        assert in_greenlet()
        return await_(add(x, y)) * 2

    assert await greenlet_spawn(sync, 1, y=2) == 6
    assert not in_greenlet()


async def test_sync_code_runs_in_a_worker_thread(anyio_backend: Any) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def sync() -> None:
        seen.append(threading.get_ident())

    await greenlet_spawn(sync)
    assert seen and seen[0] != loop_thread


async def test_exception_from_sync_code_keeps_type_and_traceback(anyio_backend: Any) -> None:
    def raiser() -> None:
        raise KeyError("from sync")

    with pytest.raises(KeyError, match="from sync") as info:
        await greenlet_spawn(raiser)
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "raiser" in names


async def test_exception_from_awaitable_raised_at_await(anyio_backend: Any) -> None:
    async def fails() -> None:
        await anyio.lowlevel.checkpoint()
        raise ValueError("from async")

    caught: list[BaseException] = []

    def sync() -> str:
        try:
            await_(fails())
        except ValueError as err:
            caught.append(err)
            raise

    with pytest.raises(ValueError, match="from async") as info:
        await greenlet_spawn(sync)
    assert caught and caught[0] is info.value
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "fails" in names and "sync" in names


async def test_await_outside_bridge_on_loop_thread(anyio_backend: Any) -> None:
    async def coro() -> None:
        pass

    c = coro()
    with pytest.raises(exc.MissingGreenlet, match=MISSING):
        await_(c)
    # the refused coroutine was closed: no "never awaited" warning
    assert c.cr_frame is None


async def test_await_inside_awaited_coroutine_is_refused(anyio_backend: Any) -> None:
    """A coroutine the bridge awaits runs on the loop thread, not in the
    bridge: await_() there raises, as it does under greenlet."""

    async def inner() -> None:
        pass

    async def outer() -> str:
        try:
            await_(inner())
        except exc.MissingGreenlet:
            return "refused"
        return "accepted"

    def sync() -> str:
        return await_(outer())

    assert await greenlet_spawn(sync) == "refused"


async def test_await_in_user_thread_is_refused(anyio_backend: Any) -> None:
    async def coro() -> None:
        pass

    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            await_(coro())
        except BaseException as err:
            errors.append(err)

    def sync() -> None:
        t = threading.Thread(target=in_thread)
        t.start()
        t.join(10)
        assert not t.is_alive()

    await greenlet_spawn(sync)
    assert len(errors) == 1 and isinstance(errors[0], exc.MissingGreenlet)


def test_await_with_no_loop_at_all() -> None:
    async def coro() -> None:
        pass

    with pytest.raises(exc.MissingGreenlet, match=MISSING):
        await_(coro())
    assert not in_greenlet()


async def test_require_await(anyio_backend: Any) -> None:
    assert await greenlet_spawn(lambda: 2) == 2
    with pytest.raises(exc.AwaitRequired, match="required an async execution"):
        await greenlet_spawn(lambda: 2, _require_await=True)

    async def nothing() -> int:
        return 3

    assert await greenlet_spawn(lambda: await_(nothing()), _require_await=True) == 3


async def test_nested_greenlet_spawn(anyio_backend: Any) -> None:
    def inner(x: int) -> int:
        async def double() -> int:
            await anyio.lowlevel.checkpoint()
            return x * 2

        return await_(double())

    def outer() -> int:
        return await_(greenlet_spawn(inner, 5)) + 1

    assert await greenlet_spawn(outer) == 11


async def test_many_awaits_in_one_call(anyio_backend: Any) -> None:
    async def ident(i: int) -> int:
        if i % 7 == 0:
            await anyio.lowlevel.checkpoint()
        return i

    def sync() -> int:
        return sum(await_(ident(i)) for i in range(2000))

    assert await greenlet_spawn(sync) == sum(range(2000))


async def test_contextvars_500_tasks(anyio_backend: Any) -> None:
    """SQLAlchemy's test_contextvars, on every backend: values flow both
    ways across every hop and back to the caller."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var")
    concurrency_ = 500

    async def async_inner(val: int) -> int:
        await anyio.sleep(random.uniform(0.005, 0.015))
        assert var.get() == val
        return var.get()

    async def async_set(val: int) -> None:
        await anyio.sleep(random.uniform(0.005, 0.015))
        var.set(val)

    def inner(val: int) -> int:
        assert await_(async_inner(val)) == val
        assert var.get() == val
        newval = val + concurrency_
        var.set(newval)
        assert await_(async_inner(newval)) == newval
        retval = val + 2 * concurrency_
        await_(async_set(retval))
        assert var.get() == retval
        assert await_(async_inner(retval)) == retval
        return retval

    results: list[int] = []

    async def task(val: int) -> None:
        await anyio.sleep(random.uniform(0.005, 0.015))
        var.set(val)
        await anyio.sleep(random.uniform(0.005, 0.015))
        results.append(await greenlet_spawn(inner, val))
        # the caller sees what the sync code left behind
        assert var.get() == val + 2 * concurrency_

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(concurrency_):
                tg.start_soon(task, i)
    assert sorted(results) == list(range(2 * concurrency_, 3 * concurrency_))


async def test_contextvar_set_in_sync_code_visible_to_awaited(anyio_backend: Any) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("v", default="unset")

    async def read() -> str:
        return var.get()

    def sync() -> str:
        var.set("from sync")
        return await_(read())

    assert await greenlet_spawn(sync) == "from sync"
    assert var.get() == "from sync"


# -- cancellation -----------------------------------------------------------


async def test_cancel_at_await_point(anyio_backend: Any) -> None:
    """Cancelling the caller while the sync code waits in await_() cancels
    the awaited coroutine, raises the backend's cancellation at that
    await_(), lets the sync cleanup run (including another await_), and
    greenlet_spawn() returns only after the sync code has finished."""
    entered = anyio.Event()
    order: list[str] = []
    cancelled_exc = anyio.get_cancelled_exc_class()

    async def long_wait() -> None:
        entered.set()
        try:
            await anyio.sleep(30)
        finally:
            order.append("awaitable cancelled")

    def sync() -> None:
        try:
            await_(long_wait())
        except cancelled_exc:
            order.append("sync saw cancellation")
            raise
        finally:
            order.append("sync finally")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                try:
                    await greenlet_spawn(sync)
                finally:
                    order.append("greenlet_spawn exited")

            tg.start_soon(run)
            await entered.wait()
            tg.cancel_scope.cancel()
    assert order == [
        "awaitable cancelled",
        "sync saw cancellation",
        "sync finally",
        "greenlet_spawn exited",
    ]


async def test_cancel_while_sync_code_runs_lands_at_next_await(anyio_backend: Any) -> None:
    """A cancel that arrives while the sync code runs plain Python cannot
    interrupt it: it lands at its next await_(), as with greenlet."""
    started = threading.Event()
    release = threading.Event()
    outcome: list[str] = []
    cancelled_exc = anyio.get_cancelled_exc_class()

    def sync() -> None:
        started.set()
        # plain Python that outlives the bridge's blocking hand-off
        assert release.wait(10)
        outcome.append("plain python finished")
        try:
            await_(anyio.lowlevel.checkpoint())
        except cancelled_exc:
            outcome.append("cancelled at next await_")
            raise
        outcome.append("not cancelled")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(greenlet_spawn, sync)
            # wait (through the loop) until the worker is inside sync()
            while not started.is_set():
                await anyio.sleep(0.001)
            await anyio.sleep(_options.current.handoff_timeout * 2)
            tg.cancel_scope.cancel()
            release.set()
    assert outcome == ["plain python finished", "cancelled at next await_"]


async def test_cancel_while_sync_code_finishes_without_await(anyio_backend: Any) -> None:
    """A cancellation that arrives during the sync code's last stretch of
    plain Python neither interrupts it nor replaces its outcome (which may
    be a connection just checked out): greenlet_spawn() returns the result,
    and the cancellation lands at the caller's next await, where greenlet
    would have delivered it."""
    started = threading.Event()
    release = threading.Event()
    events: list[str] = []
    cancelled_exc = anyio.get_cancelled_exc_class()

    def sync() -> str:
        started.set()
        assert release.wait(10)
        return "done"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                events.append(await greenlet_spawn(sync))
                try:
                    await anyio.sleep(30)
                except cancelled_exc:
                    events.append("cancelled at the next await")
                    raise

            tg.start_soon(run)
            while not started.is_set():
                await anyio.sleep(0.001)
            await anyio.sleep(_options.current.handoff_timeout * 2)
            tg.cancel_scope.cancel()
            release.set()
    assert events == ["done", "cancelled at the next await"]


# -- workers ----------------------------------------------------------------


async def test_workers_are_reused(anyio_backend: Any) -> None:
    idents = set()

    async def hop() -> None:
        await anyio.lowlevel.checkpoint()

    def sync() -> None:
        await_(hop())
        idents.add(threading.get_ident())

    for _ in range(50):
        await greenlet_spawn(sync)
    assert len(idents) == 1


async def test_job_references_are_released(anyio_backend: Any) -> None:
    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)

    def sync(p: Payload) -> None:
        assert p is ref()

    await greenlet_spawn(sync, payload)
    del payload
    gc.collect()
    assert ref() is None


async def test_idle_workers_retire(anyio_backend: Any) -> None:
    pool = _workers.pool
    old = (pool.max_workers, pool.idle_timeout, pool.max_idle_workers)
    pool.shutdown()
    pool.configure(max_workers=None, idle_timeout=0.2, max_idle_workers=None)
    try:
        threads: list[threading.Thread] = []

        def sync() -> None:
            threads.append(threading.current_thread())

        await greenlet_spawn(sync)
        assert threads[0].is_alive()
        wait_until(lambda: not threads[0].is_alive(), 10, "the idle worker to retire")
        assert pool.total == 0
    finally:
        pool.configure(max_workers=old[0], idle_timeout=old[1], max_idle_workers=old[2])


async def test_max_workers_bounds_threads_without_deadlock(anyio_backend: Any) -> None:
    pool = _workers.pool
    old = (pool.max_workers, pool.idle_timeout, pool.max_idle_workers)
    pool.shutdown()
    pool.configure(max_workers=2, idle_timeout=old[1], max_idle_workers=None)
    peak = [0]
    try:

        def sync(i: int) -> int:
            peak[0] = max(peak[0], pool.total)
            await_(anyio.sleep(0.01))
            return i

        results: list[int] = []

        async def one(i: int) -> None:
            results.append(await greenlet_spawn(sync, i))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(one, i)
        assert sorted(results) == list(range(20))
        assert peak[0] <= 2
    finally:
        pool.configure(max_workers=old[0], idle_timeout=old[1], max_idle_workers=old[2])


def test_bad_worker_options() -> None:
    import sqla_anyio_shim

    with pytest.raises(ValueError, match="max_workers must be a positive integer"):
        sqla_anyio_shim.install(max_workers=0)
    with pytest.raises(ValueError, match="idle_timeout must be a positive number"):
        sqla_anyio_shim.install(idle_timeout=-1)


async def test_current_task_in_worker_is_the_caller(asyncio_only: None, anyio_backend: Any) -> None:
    import asyncio

    me = asyncio.current_task()

    def sync() -> Any:
        return asyncio.current_task()

    assert await greenlet_spawn(sync) is me


async def test_all_tasks_in_worker_include_caller(asyncio_only: None, anyio_backend: Any) -> None:
    """Issue 16, item 11: ``asyncio.all_tasks()`` from sync code lists the
    loop's tasks, the calling one included, as on greenlet's loop thread
    (it was empty: the worker's running loop is a proxy, and no task is the
    proxy's), also given the loop the sync code sees."""
    import asyncio

    me = asyncio.current_task()
    other = asyncio.ensure_future(asyncio.sleep(10))
    try:

        def sync() -> Any:
            return asyncio.all_tasks(), asyncio.all_tasks(asyncio.get_running_loop())

        implicit, explicit = await greenlet_spawn(sync)
        assert me in implicit and other in implicit, implicit
        assert implicit == explicit == asyncio.all_tasks()
    finally:
        other.cancel()


def test_outside_any_event_loop_error() -> None:
    """greenlet_spawn() needs a running asyncio or trio loop."""
    coro = greenlet_spawn(lambda: None)
    with pytest.raises(RuntimeError, match="asyncio or trio event loop"):
        coro.send(None)


async def test_pending_cancel_still_starts_shielded_cleanup(
    asyncio_only: None, anyio_backend: Any
) -> None:
    """Regression: a cancellation that arrives while the sync code runs plain
    Python, followed by ``await_(asyncio.shield(coro))`` (what SQLAlchemy's
    terminate() does), must still run ``coro`` -- greenlet starts the
    shielded task; closing the awaitable unawaited skipped the graceful
    close and leaked a "never awaited" warning."""
    import asyncio

    from sqla_anyio_shim._sqla._primitives import asyncio_proxy

    started = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    async def graceful_close() -> None:
        await asyncio.sleep(0.01)
        ran.append("graceful close ran")

    def sync() -> None:
        started.set()
        assert release.wait(10)
        await_(asyncio_proxy.shield(graceful_close()))

    task = asyncio.ensure_future(greenlet_spawn(sync))
    with anyio.fail_after(10):
        while not started.is_set():
            await asyncio.sleep(0.001)
        await asyncio.sleep(_options.current.handoff_timeout * 2)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not ran:
            await asyncio.sleep(0.005)
    assert ran == ["graceful close ran"]


async def test_unbounded_handoff_keeps_sync_code_atomic(anyio_backend: Any) -> None:
    """install(handoff_timeout=None): the loop is blocked while the sync
    code runs, as under greenlet, so no other task runs in between."""
    import sqla_anyio_shim

    ticks: list[int] = []
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks.append(1)
            await anyio.lowlevel.checkpoint()

    def sync() -> int:
        before = len(ticks)
        threading.Event().wait(0.05)  # 25x the default hand-off
        return len(ticks) - before

    sqla_anyio_shim.install(handoff_timeout=None)
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                await anyio.sleep(0.01)
                assert await greenlet_spawn(sync) == 0
                stop.set()
    finally:
        sqla_anyio_shim.install()
    assert _options.current.handoff_timeout == 0.002


def test_bad_handoff_timeout() -> None:
    import sqla_anyio_shim

    with pytest.raises(ValueError, match="handoff_timeout must be"):
        sqla_anyio_shim.install(handoff_timeout=-1)
