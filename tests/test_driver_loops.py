"""Async drivers inside the workers (``install(driver_loops=...)``): each
driver connection on an event loop of its own, run by the worker.

On every async driver -- aiosqlite (embedded), asyncpg and psycopg on
PostgreSQL, aiomysql and asyncmy on MariaDB -- under trio (where the mode
is the default and the only way an asyncio driver runs) and under asyncio
with the mode forced on:

* an ORM workload of 200 tasks with random deadlines, its counts checked
  against the database (no lost commit, no row from a task cancelled
  before its commit, nothing checked out);
* a connection's loop is closed with the connection: after dispose no
  driver loop is open and no descriptor or thread is left; a connection
  dropped unclosed is closed by the collector;
* misuse is refused clearly: an adapter method outside the bridge
  (MissingGreenlet), an asyncio driver under trio with the mode off.

The scenarios against real servers with deadlines on running statements
(the server stops, the pool gets the connection back) run in every mode
in tests/test_databases.py.  A server that cannot be reached skips its
tests, unless ``CI=true``, where it fails them.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import socket
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import Integer, String, exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

import sqla_anyio_shim
from sqla_anyio_shim._bridge import _driver_loop

from .conftest import driver_loop_mode, wait_until
from .test_databases import CONNECT_TIMEOUT, IN_CI, MYSQL_URL, PG_URL
from .test_sqlalchemy import _cancelling_orm_workload

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

#: driver -> (URL, module)
DRIVERS = {
    "aiosqlite": (None, "aiosqlite"),
    "asyncpg": (make_url(PG_URL).set(drivername="postgresql+asyncpg"), "asyncpg"),
    "psycopg_async": (make_url(PG_URL).set(drivername="postgresql+psycopg_async"), "psycopg"),
    "aiomysql": (make_url(MYSQL_URL).set(drivername="mysql+aiomysql"), "aiomysql"),
    "asyncmy": (make_url(MYSQL_URL).set(drivername="mysql+asyncmy"), "asyncmy"),
}

#: (backend, install()'s driver_loops): trio's default, and asyncio forced
MODES = [
    pytest.param(("trio", None), id="trio"),
    pytest.param(("asyncio", True), id="asyncio-driver_loops"),
]


class Base(DeclarativeBase):
    pass


class LoopItem(Base):
    __tablename__ = "shim_driver_loop_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(params=MODES)
def anyio_backend(request: Any) -> Iterator[str]:
    with driver_loop_mode(request.param) as backend:
        yield backend


def _open_loops() -> list[Any]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, _driver_loop.DriverLoop) and not o.closed]


def _fds() -> int:
    """Open descriptors, less the eventfds of the workers' channels: a
    worker the test started retires after ``idle_timeout`` (10 s), which is
    the thread cache at work, not a leak.  What a connection or its loop
    would leave -- sockets, a selector's epoll, a self-pipe -- counts."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                continue
        except OSError:
            # the listing's own descriptor, closed by now
            continue
        count += 1
    return count


class _Baseline:
    """What was open before a test -- driver loops, descriptors, the
    shim's loop-closer threads -- so that it can wait until no more is."""

    def __init__(self) -> None:
        self.threads = {t.ident for t in threading.enumerate()}
        self.fds = _fds()
        self.loops = len(_open_loops())

    def settled(self) -> bool:
        return (
            len(_open_loops()) == self.loops
            and _fds() <= self.fds
            and not [
                t
                for t in threading.enumerate()
                if t.ident not in self.threads and t.name.startswith("sqla-anyio-shim-loop")
            ]
        )

    def wait(self, what: str) -> None:
        wait_until(self.settled, 10, what)


def _installed(name: str) -> Any:
    """The driver's base URL (None: aiosqlite's, made per test); a driver
    that is not installed skips -- and fails under CI=true."""
    base, module = DRIVERS[name]
    if importlib.util.find_spec(module) is None:
        message = f"driver {name} ({module}) is not installed"
        if IN_CI:
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return base


@pytest.fixture(params=list(DRIVERS))
async def url(request: Any, tmp_path: Any) -> AsyncIterator[Any]:
    """The driver's URL, its server checked to be reachable."""
    name = request.param
    base = _installed(name)
    if base is None:
        yield f"sqlite+aiosqlite:///{tmp_path / 'loops.db'}"
        return
    probe = create_async_engine(base, poolclass=NullPool)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            async with probe.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    except (OSError, TimeoutError, sa_exc.DBAPIError) as err:
        message = f"server for {name} unreachable: {type(err).__name__}: {err}".splitlines()[0]
        if IN_CI:
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    finally:
        await probe.dispose()
    yield base


async def test_cancelled_workload_counts(anyio_backend: str, url: Any) -> None:
    """200 tasks, a quarter under random deadlines, on a pool of 10."""
    eng = create_async_engine(url, pool_size=10, max_overflow=0, pool_timeout=60)
    try:
        with anyio.fail_after(60):
            async with eng.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
                await conn.run_sync(Base.metadata.create_all)
        counts = await _cancelling_orm_workload(eng, LoopItem, seed=18, max_timeout=0.05)
        assert counts["committed"] > 0
        assert _driver_loop.in_use
    finally:
        with anyio.fail_after(60):
            async with eng.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
            await eng.dispose()


# the connection this test drops unclosed is closed by its driver's own
# finalizer, which warns (psycopg: "was deleted while still open"); on a
# free-threaded build that can happen after the test's own capture of it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_loops_closed_with_their_connections(
    anyio_backend: str, url: Any, request: Any
) -> None:
    """Every connection's loop is closed by dispose (and an unclosed one by
    the collector): no open loop, no descriptor, no thread left."""
    if "psycopg" in str(url) and not getattr(sys, "_is_gil_enabled", lambda: True)():
        # KNOWN, OPEN (issue 18, stop 29): on 3.14t the psycopg connection
        # dropped unclosed is, in 1 of 2-3 runs, not collected within the
        # wait below, so its loop closes late (seen before this stop's
        # changes too, at b77a380); who keeps it alive is not found yet
        request.applymarker(
            pytest.mark.xfail(
                reason="3.14t: a dropped psycopg connection is sometimes collected late "
                "(known, open: issue 18)",
                strict=False,
            )
        )
    before = _Baseline()
    eng = create_async_engine(url, pool_size=3, max_overflow=2)
    with anyio.fail_after(60):

        async def use() -> None:
            async with eng.connect() as conn:
                assert (await conn.execute(sa.text("SELECT 7"))).scalar() == 7

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(use)
        assert len(_open_loops()) - before.loops >= 1
        # a connection dropped without close(): the collector hands it back
        # (SQLAlchemy warns about it, and terminates it -- or, for psycopg,
        # drops it: the driver's own finalizer closes it and warns too)
        conn = await eng.connect()
        await conn.execute(sa.text("SELECT 1"))
        del conn
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            gc.collect()
            await eng.dispose()
            gc.collect()
        assert any("garbage collector" in str(w.message) for w in seen), [
            str(w.message) for w in seen
        ]

    before.wait("every driver loop, descriptor and closer thread is gone")


class _SilentServer:
    """A TCP listener that completes the handshake (the kernel does, from
    its backlog) and never says a word: a driver's connect to it waits for
    the server's first message until its caller gives up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async", "aiomysql", "asyncmy"])
async def test_connect_cancelled_in_flight_leaves_nothing(anyio_backend: str, driver: str) -> None:
    """A cancellation that lands while the driver's connect runs on the new
    connection's loop in the worker (the server has not answered): the
    caller's scope ends promptly, the pool slot is back, and the half-made
    connection's loop, its socket and any closer thread are gone.  No
    database needed: the server is a silent listener."""
    base = _installed(driver)
    server = _SilentServer()
    before = _Baseline()
    # no driver-side connect timeout: only the caller's cancellation ends it
    eng = create_async_engine(
        base.set(host="127.0.0.1", port=server.port), pool_size=1, max_overflow=0
    )
    try:
        for attempt in range(3):
            scope = anyio.CancelScope()

            async def connect(scope: anyio.CancelScope = scope) -> None:
                with scope:
                    async with eng.connect() as conn:
                        await conn.execute(sa.text("SELECT 1"))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(connect)
                    # in flight: the connection's own loop exists (and runs
                    # the driver's connect in the worker)
                    while len(_open_loops()) == before.loops:
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.05)
                    scope.cancel()
                    cancelled_at = anyio.current_time()
                # the group's exit waited for connect() to return
                took = anyio.current_time() - cancelled_at
            assert scope.cancelled_caught, f"attempt {attempt}: the connect was not cancelled"
            assert took < 2.0, f"attempt {attempt}: the cancelled connect took {took:.2f} s to end"
            assert eng.sync_engine.pool.checkedout() == 0
    finally:
        with anyio.fail_after(30):
            await eng.dispose()
        server.close()

    before.wait("the cancelled connects' loops, sockets and closer threads are gone")


async def test_adapter_outside_the_bridge_is_refused(anyio_backend: str, url: Any) -> None:
    """The driver connection's methods called from the event loop, not in
    sync code the bridge runs: MissingGreenlet, as with greenlet."""
    eng = create_async_engine(url)
    try:
        with anyio.fail_after(30):
            async with eng.connect() as conn:
                raw = await conn.get_raw_connection()
                with pytest.raises(sa_exc.MissingGreenlet, match="greenlet_spawn has not been"):
                    raw.dbapi_connection.run_async(lambda driver_conn: _a_pass())
                # and the connection is in order afterwards
                assert (await conn.execute(sa.text("SELECT 3"))).scalar() == 3
    finally:
        await eng.dispose()


async def test_run_async_in_sync_code(anyio_backend: str, url: Any) -> None:
    """``AdaptedConnection.run_async()``, SQLAlchemy's way to await the raw
    driver connection from sync code (pool events), runs on its loop."""
    eng = create_async_engine(url)
    seen: list[Any] = []

    def probe(sync_conn: Any) -> None:
        adapted = sync_conn.connection.dbapi_connection

        async def driver_type(driver_conn: Any) -> str:
            await anyio_free_sleep()
            return type(driver_conn).__name__

        seen.append(adapted.run_async(driver_type))

    try:
        with anyio.fail_after(30):
            async with eng.connect() as conn:
                await conn.run_sync(probe)
    finally:
        await eng.dispose()
    assert seen and isinstance(seen[0], str)


async def test_connection_opened_by_do_connect_gets_a_loop(anyio_backend: str, url: Any) -> None:
    """An application's ``do_connect`` event that opens the connection
    itself (``dialect.loaded_dbapi.connect(...)``, SQLAlchemy's documented
    way to customise a connect) bypasses the dialect's ``connect()``: the
    connection still gets a loop of its own, its statements run on it, and
    the loop is closed with it.  (The loop was made in the dialect's
    ``connect()``: under trio such a connection failed with "There is no
    current event loop", under asyncio it silently used the hand-off.)"""
    eng = create_async_engine(url, poolclass=NullPool)
    opened: list[Any] = []

    @sa.event.listens_for(eng.sync_engine, "do_connect")
    def open_it(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
        opened.append(connection)
        return connection

    try:
        with anyio.fail_after(30):
            async with eng.connect() as conn:
                assert (await conn.execute(sa.text("SELECT 4"))).scalar() == 4
                raw = await conn.get_raw_connection()
                loop = _driver_loop.loop_of(raw.dbapi_connection._connection)
                assert isinstance(loop, _driver_loop.DriverLoop), "no loop of its own"
                assert not loop.closed
            # NullPool: closed on return, and its loop with it
            assert loop.closed
    finally:
        await eng.dispose()
    assert len(opened) == 1


async def test_async_creator_opening_through_another_engine(anyio_backend: str, url: Any) -> None:
    """A connect nested in a connect: an ``async_creator`` that opens the
    driver connection through another engine's creator, in a
    ``greenlet_spawn()`` of its own (SQLAlchemy's
    ``test_async_creator_invoked``).  The driver connection is made on the
    inner connect's loop, where asyncpg and aiomysql bind it; the outer
    adapter keeps that loop (it was given its own: "attached to a
    different loop")."""
    from sqlalchemy.util import greenlet_spawn

    other = create_async_engine(url, poolclass=NullPool)
    existing_creator = other.sync_engine.pool._creator

    async def async_creator() -> Any:
        sync_conn = await greenlet_spawn(existing_creator)
        return sync_conn.driver_connection

    eng = create_async_engine(url, poolclass=NullPool, async_creator=async_creator)
    try:
        with anyio.fail_after(30):
            async with eng.connect() as conn:
                assert (await conn.scalar(sa.select(1))) == 1
                raw = await conn.get_raw_connection()
                loop = _driver_loop.loop_of(raw.dbapi_connection._connection)
                assert isinstance(loop, _driver_loop.DriverLoop)
            assert loop.closed
    finally:
        await eng.dispose()
        await other.dispose()


async def test_placement_blocks_on_a_gil_build(anyio_backend: str, tmp_path: Any) -> None:
    """Where the host waits for a driver-loop call (install(parallel=None),
    the auto): as the hand-off does -- blocking the loop for up to
    handoff_timeout on a GIL build, where the workers running their
    connections' loops at once took turns at the GIL (issue 18's reuse
    cells: driver loops beat the hand-off blocking, lost to it in
    parallel), and in parallel where the GIL is off, where the first
    stretch is not waited for either: it is the driver's I/O."""
    from sqla_anyio_shim import _options
    from sqla_anyio_shim._bridge._call import _local
    from sqla_anyio_shim._bridge._host import FIRST_HANDOFF_BOUND

    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'placement.db'}")
    seen: list[tuple[float, float]] = []

    @sa.event.listens_for(eng.sync_engine, "before_cursor_execute")
    def probe(*args: Any) -> None:
        call = _local.call
        seen.append((call.handoff, call.first_handoff))

    try:
        with anyio.fail_after(30):
            async with eng.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    finally:
        await eng.dispose()
    assert seen
    handoff, first_handoff = seen[-1]
    wait = _options.current.handoff_wait
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        assert (handoff, first_handoff) == (wait, max(wait, FIRST_HANDOFF_BOUND))
        assert handoff > 0
    else:
        assert (handoff, first_handoff) == (0.0, 0.0)


async def _a_pass() -> None:
    return None


async def anyio_free_sleep() -> None:
    """A suspension on the connection's own asyncio loop (where the caller's
    trio would not do)."""
    import asyncio

    await asyncio.sleep(0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_mode_off_under_trio_fails_clearly(anyio_backend: str, tmp_path: Any) -> None:
    sqla_anyio_shim.install(driver_loops=False)
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'off.db'}")
    try:
        with anyio.fail_after(10):
            with pytest.raises(
                sa_exc.InvalidRequestError,
                match=r"needs an asyncio event loop.*driver_loops=False.*driver_loops=None",
            ):
                async with eng.connect() as conn:
                    await conn.execute(sa.text("select 1"))
    finally:
        await eng.dispose()
        sqla_anyio_shim.install()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_loop_run_on_the_host_thread_keeps_the_host_task(anyio_backend: str) -> None:
    """``DriverLoop.run_here()`` -- a connection's loop run on the host's
    loop thread, inside a running host task (``AsyncResult``'s soft close
    of a buffered cursor does so).  Since Python 3.14 asyncio keeps the
    running task per thread: the driver's task must be entered with the
    host's set aside (it raised "Cannot enter into task ... while another
    task ... is being executed" and the run never ended), and the host's
    task must be the current one again after."""
    import asyncio

    host_task = asyncio.current_task()
    driver = _driver_loop.DriverLoop()
    seen: list[Any] = []

    async def on_the_driver_loop() -> str:
        await asyncio.sleep(0)  # a real suspension on the driver's loop
        seen.append((asyncio.get_running_loop(), asyncio.current_task()))
        return "done"

    # a hang must fail, not stall the run: the watchdog stops the driver's
    # loop from another thread after 10 s (run_here then raises "Event loop
    # stopped before Future completed")
    watchdog = threading.Timer(10, lambda: driver.loop.call_soon_threadsafe(driver.loop.stop))
    watchdog.start()
    try:
        assert driver.run_here(on_the_driver_loop()) == "done"
    finally:
        watchdog.cancel()
        driver.close()
    ((loop, task),) = seen
    assert loop is driver.loop and task is not None and task is not host_task
    assert asyncio.current_task() is host_task
    assert asyncio.get_running_loop() is host_task.get_loop()
    # closed from the loop thread: by a closer thread, soon
    wait_until(driver.loop.is_closed, 10, "the driver loop closed")
