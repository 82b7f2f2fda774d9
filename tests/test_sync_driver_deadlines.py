"""A deadline around one slow statement of a sync driver (issue 16, item 4).

With ``install(sync_drivers=True)`` the driver's statement runs in the
worker, where no cancellation can reach it: the deadline used to be ignored
until the statement ended by itself.  Now the statement is an await point,
as an async driver's is: a cancellation that arrives while it runs asks the
server (or SQLite) to stop it -- psycopg's cancel request, sqlite3's
``interrupt()``, MySQL's ``KILL QUERY`` from a second connection -- and the
sync code sees the cancellation there.

Every scenario runs per driver (PostgreSQL through psycopg, MariaDB through
pymysql, a SQLite file through sqlite3) and per backend (asyncio, uvloop,
trio), with the backend's own deadline and anyio's.  The statement would run
for many seconds; the bounds below are generous on purpose (the block must
end within 3 s of a 0.2 s deadline), never tight timings.

Servers as in ``tests/test_databases.py``: ``SQLA_SHIM_PG_SYNC_URL`` (a
``postgresql+psycopg://`` URL) and ``SQLA_SHIM_MYSQL_URL`` (its driver is
replaced by pymysql).  An unreachable server skips, unless ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from sqla_anyio_shim._sqla import _sync_drivers

from .test_edges import _arm_release

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

IN_CI = os.environ.get("CI") == "true"
PG_URL = os.environ.get(
    "SQLA_SHIM_PG_SYNC_URL", "postgresql+psycopg://root@127.0.0.1:5432/shim_tests"
)
MYSQL_URL = os.environ.get("SQLA_SHIM_MYSQL_URL", "mysql://root@127.0.0.1:3306/shim_tests")

#: the deadline, and how long the statement would run without it
DEADLINE = 0.2
SLOW = 10
#: the block must have ended this soon after it began
BOUND = 3.0
#: SQLite has no sleep(): a recursive CTE counting this far takes about 25 s
#: here (about 2 million rows a second), many seconds anywhere
SQLITE_COUNT = 50_000_000


def _sqlite_slow_sql(marker: str) -> Any:
    return sa.text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        f"WHERE x < {SQLITE_COUNT}) SELECT count(*), '{marker}' FROM c"
    )


class Driver:
    """One sync driver under test: its engine, its slow statement and how
    to see on the server whether that statement still runs."""

    def __init__(self, name: str, tmp_path: Any) -> None:
        self.name = name
        self.marker = f"shim_deadline_{uuid.uuid4().hex[:12]}"
        if name == "psycopg":
            self.module = "psycopg"
            self.url = make_url(PG_URL)
        elif name == "pymysql":
            self.module = "pymysql"
            self.url = make_url(MYSQL_URL).set(drivername="mysql+pymysql")
        else:
            self.module = "sqlite3"
            self.url = make_url(f"sqlite:///{tmp_path / 'deadline.db'}")
        self.engines: list[AsyncEngine] = []

    @property
    def has_server(self) -> bool:
        return self.name != "sqlite3"

    def engine(self, **kw: Any) -> AsyncEngine:
        engine = create_async_engine(self.url, **kw)
        self.engines.append(engine)
        return engine

    def slow_sql(self) -> Any:
        if self.name == "psycopg":
            return sa.text(f"SELECT pg_sleep({SLOW}), '{self.marker}'")
        if self.name == "pymysql":
            return sa.text(f"SELECT SLEEP({SLOW}), '{self.marker}'")
        return _sqlite_slow_sql(self.marker)

    def running_sql(self) -> Any:
        """Sessions other than the asking one running the slow statement."""
        if self.name == "psycopg":
            return sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND pid <> pg_backend_pid() AND position(:m in query) > 0"
            ).bindparams(m=self.marker)
        return sa.text(
            "SELECT count(*) FROM information_schema.PROCESSLIST "
            "WHERE ID <> CONNECTION_ID() AND COMMAND = 'Query' "
            "AND LOCATE(:m, INFO) > 0"
        ).bindparams(m=self.marker)


@pytest.fixture(params=["psycopg", "pymysql", "sqlite3"])
async def driver(request: Any, tmp_path: Any, sync_drivers: None) -> AsyncIterator[Driver]:
    d = Driver(request.param, tmp_path)
    if importlib.util.find_spec(d.module) is None:
        _unavailable(f"driver {d.module} is not installed")
    if d.has_server:
        probe = d.engine(poolclass=NullPool)
        try:
            with anyio.fail_after(5):
                async with probe.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except (OSError, TimeoutError, sa.exc.DBAPIError) as err:
            await _dispose(d)
            _unavailable(f"{d.name}: server unreachable: {err}".splitlines()[0])
    try:
        yield d
    finally:
        await _dispose(d)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


async def _dispose(d: Driver) -> None:
    with anyio.fail_after(30):
        for engine in reversed(d.engines):
            await engine.dispose()
    d.engines.clear()


# -- the deadlines: each backend's own, and anyio's -----------------------------


@pytest.fixture(params=["native", "anyio"])
def deadline_kind(request: Any, anyio_backend: Any) -> str:
    """``native``: ``asyncio.timeout`` on asyncio, ``trio.fail_after`` on
    trio; ``anyio``: ``anyio.fail_after`` (a cancel scope) on either."""
    if request.param == "anyio":
        return "anyio.fail_after"
    if anyio_backend[0] == "trio":
        return "trio.fail_after"
    if not hasattr(asyncio, "timeout"):
        pytest.skip("asyncio.timeout() is new in Python 3.11")
    return "asyncio.timeout"


@contextlib.asynccontextmanager
async def deadline(kind: str, seconds: float) -> AsyncIterator[None]:
    """The deadline ``kind`` around the block; it raises the deadline's own
    exception (asyncio's and anyio's TimeoutError, trio's TooSlowError)."""
    if kind == "asyncio.timeout":
        async with asyncio.timeout(seconds):  # type: ignore[attr-defined]
            yield
    elif kind == "anyio.fail_after":
        with anyio.fail_after(seconds):
            yield
    else:
        import trio

        with trio.fail_after(seconds):
            yield


def _timeout_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [TimeoutError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        import trio

        errors.append(trio.TooSlowError)
    return tuple(errors)


@contextlib.contextmanager
def _elapsed() -> Iterator[list[float]]:
    took: list[float] = []
    started = time.monotonic()
    try:
        yield took
    finally:
        took.append(time.monotonic() - started)


async def _server_stopped(d: Driver, admin: AsyncEngine) -> None:
    """The server no longer runs the slow statement (bounded: a cancel
    request is processed by the server asynchronously)."""
    if not d.has_server:
        return
    with anyio.move_on_after(5):
        while True:
            async with admin.connect() as conn:
                if not await conn.scalar(d.running_sql()):
                    return
            await anyio.sleep(0.05)
    pytest.fail(f"{d.name}: the server still runs the statement after the deadline")


async def _make_table(engine: AsyncEngine) -> sa.Table:
    metadata = sa.MetaData()
    table = sa.Table(
        f"shim_dl_{uuid.uuid4().hex[:12]}",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return table


async def _drop_table(engine: AsyncEngine, table: sa.Table) -> None:
    with anyio.fail_after(30):
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.drop_all)


# -- the scenarios ------------------------------------------------------------


async def test_deadline_interrupts_slow_statement(
    anyio_backend: Any, driver: Driver, deadline_kind: str
) -> None:
    """Issue 16 item 4: ``<deadline>(0.2)`` around ``execute(<10 s
    statement>)`` in a transaction that inserted a row.  The block raises the
    deadline's exception within 3 s, the server stops the statement, the row
    is not committed, the engine serves the next query and the pool has
    every connection back."""
    engine = driver.engine(pool_size=2, max_overflow=0)
    admin = driver.engine(poolclass=NullPool)
    table = await _make_table(engine)
    try:
        with _elapsed() as took, pytest.raises(_timeout_errors()):
            async with deadline(deadline_kind, DEADLINE):
                async with engine.begin() as conn:
                    await conn.execute(table.insert().values(id=1))
                    await conn.execute(driver.slow_sql())
                    await conn.execute(table.insert().values(id=2))
        assert took[0] < BOUND, f"the block took {took[0]:.2f} s"
        await _server_stopped(driver, admin)
        with anyio.fail_after(30):
            async with engine.connect() as conn:
                assert await conn.scalar(sa.text("SELECT 42")) == 42
                ids = (await conn.scalars(sa.select(table.c.id))).all()
        assert ids == [], f"rows committed after the deadline: {ids}"
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await _drop_table(engine, table)


async def test_connection_usable_after_interrupted_statement(
    anyio_backend: Any, driver: Driver
) -> None:
    """The deadline inside ``async with engine.connect()``: the interrupted
    statement leaves its connection in order -- after ``rollback()`` the
    same AsyncConnection runs the next query, on the same server session
    (the cancellation stopped the statement; it did not drop the
    connection)."""
    engine = driver.engine(pool_size=1, max_overflow=0)
    session_sql = {
        "psycopg": "SELECT pg_backend_pid()",
        "pymysql": "SELECT CONNECTION_ID()",
        "sqlite3": "SELECT 1",
    }[driver.name]
    with anyio.fail_after(60):
        async with engine.connect() as conn:
            before = await conn.scalar(sa.text(session_sql))
            with _elapsed() as took, pytest.raises(_timeout_errors()):
                with anyio.fail_after(DEADLINE):
                    await conn.execute(driver.slow_sql())
            assert took[0] < BOUND, f"the statement took {took[0]:.2f} s to stop"
            await conn.rollback()
            assert await conn.scalar(sa.text(session_sql)) == before
            assert not conn.invalidated
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_task_cancel_interrupts_slow_statement(anyio_backend: Any, driver: Driver) -> None:
    """A plain ``task.cancel()`` from another task while the statement runs
    (coordinated on the statement's start, not on a sleep): the task ends
    with CancelledError within 3 s and the server stops the statement."""
    engine = driver.engine(pool_size=1, max_overflow=0)
    admin = driver.engine(poolclass=NullPool)
    started = threading.Event()

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if driver.marker in statement:
            started.set()

    async def victim() -> None:
        async with engine.connect() as conn:
            await conn.execute(driver.slow_sql())

    task = asyncio.ensure_future(victim())
    with anyio.fail_after(10):
        while not started.is_set():
            await asyncio.sleep(0.01)
    # the worker is inside the driver now (or just about to enter it: either
    # way the statement is where the cancellation lands)
    await asyncio.sleep(DEADLINE)
    with _elapsed() as took:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    assert took[0] < BOUND, f"the task took {took[0]:.2f} s to be cancelled"
    await _server_stopped(driver, admin)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_deadline_before_statement_in_same_call_skips_it(
    anyio_backend: Any, driver: Driver, deadline_kind: str
) -> None:
    """The deadline passes while the sync code of one call runs plain
    Python (``run_sync``), before that same call issues the slow statement:
    the statement raises the cancellation at once, as an async driver's
    await point would, instead of running for 10 s."""
    engine = driver.engine(pool_size=1, max_overflow=0)
    release = threading.Event()
    executed: list[str] = []

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def on_done(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        executed.append(statement)

    def work(sync_conn: Any) -> None:
        assert release.wait(10)  # past the deadline
        sync_conn.execute(driver.slow_sql())

    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            with _elapsed() as took, pytest.raises(_timeout_errors()):
                async with deadline(deadline_kind, DEADLINE):
                    _arm_release(release, DEADLINE + 0.1)
                    await conn.run_sync(work)
            assert took[0] < BOUND, f"the block took {took[0]:.2f} s"
            assert not any(driver.marker in s for s in executed), executed
            await conn.rollback()
            assert await conn.scalar(sa.text("SELECT 2")) == 2
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        release.set()


async def test_driver_without_interrupter_raises_at_statement_end(
    anyio_backend: Any, tmp_path: Any, sync_drivers: None, monkeypatch: Any, deadline_kind: str
) -> None:
    """A sync driver the shim cannot interrupt (here sqlite3 with its
    interrupter taken away) runs the statement to its end, and then the
    block raises the deadline's exception, as an async driver's await point
    would: the statement's result is not returned past the deadline (before,
    it was, and ``asyncio.timeout`` / ``anyio.fail_after`` ended quietly)."""
    monkeypatch.setattr(_sync_drivers, "_INTERRUPTERS", {}, raising=False)
    engine = create_async_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    release = threading.Event()

    def slow() -> int:
        # a statement that outlives the deadline: the SQL function it calls
        # blocks until a loop timer fires after the deadline's own
        assert release.wait(10)
        return 1

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.create_function("slow", 0, slow)

    got: list[int] = []
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            with pytest.raises(_timeout_errors()):
                async with deadline(deadline_kind, DEADLINE):
                    _arm_release(release, DEADLINE + 0.1)
                    got.append(await conn.scalar(sa.text("SELECT slow()")))
            assert got == []
            await conn.rollback()
            assert await conn.scalar(sa.text("SELECT 2")) == 2
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        release.set()
        await engine.dispose()


async def test_memory_database_survives_interrupted_statement(
    anyio_backend: Any, sync_drivers: None, deadline_kind: str
) -> None:
    """A ``sqlite://`` memory database lives in its one connection: a
    deadline that interrupts a slow statement on it must not invalidate
    that connection (SQLAlchemy invalidates on any exit exception; the
    driver stopped the statement cleanly, so the shim says it is not a
    disconnect).  The committed rows are still there afterwards."""
    engine = create_async_engine("sqlite://")
    slow = _sqlite_slow_sql("memory")
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE kept (x INTEGER)")
            await conn.exec_driver_sql("INSERT INTO kept VALUES (1), (2)")
        with _elapsed() as took, pytest.raises(_timeout_errors()):
            async with deadline(deadline_kind, DEADLINE):
                async with engine.connect() as conn:
                    await conn.execute(slow)
        assert took[0] < BOUND, f"the block took {took[0]:.2f} s"
        async with engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT count(*) FROM kept")) == 2
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
