"""The parallel mode's contract (issue 17, docs/principle.md): the sync code
of tasks that do not share a DBAPI connection runs at the same time, the
loop never blocked waiting for it; on engines whose pool shares one
connection between tasks (StaticPool) or marked with keep_atomic(), the
sync code of one task never runs while another's is between two of its
await points -- whichever call of SQLAlchemy's it is in (a result's fetch
included), in the parallel mode and past the atomic mode's bounded wait.

Threads meet through events with bounded waits: a wait that must succeed
fails the test when it times out, and a wait that must not be answered
is the proof of exclusion."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy import Column, Integer, event, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import declarative_base
from sqlalchemy.pool import StaticPool

import sqla_anyio_shim
from sqla_anyio_shim._sqla import _targets

pytestmark = pytest.mark.anyio

Base = declarative_base()


class Row(Base):  # type: ignore[misc, valid-type]
    __tablename__ = "parallel_rows"
    id = Column(Integer, primary_key=True)


# a wait another task's sync code must answer (generous: a loaded machine)
MEET = 10.0
# a wait nobody may answer while the waiter holds the engine: its timing out
# is the expected outcome, so it is kept short
EXCLUDED = 0.5


@pytest.fixture(params=["atomic", "parallel"])
def mode(request: Any, anyio_backend: Any) -> Iterator[str]:
    # the trio runs use the sync driver (aiosqlite needs asyncio)
    sync = anyio_backend[0] == "trio"
    sqla_anyio_shim.install(sync_drivers=sync, parallel=request.param == "parallel")
    try:
        yield request.param
    finally:
        sqla_anyio_shim.install()


def _url(anyio_backend: Any, path: Any = None) -> str:
    driver = "sqlite" if anyio_backend[0] == "trio" else "sqlite+aiosqlite"
    return f"{driver}:///{path}" if path is not None else f"{driver}://"


async def _wait_for(event_: threading.Event, what: str) -> None:
    """Wait in the loop, without blocking it, for another thread's event."""
    with anyio.fail_after(MEET):
        while not event_.is_set():
            await anyio.sleep(0.005)
    assert event_.is_set(), what


async def test_static_pool_fetch_holds_the_engine(anyio_backend: Any, mode: str) -> None:
    """Task A fetches a streamed ORM result and, in an ORM load event (sync
    code of the fetch), waits for task B's sync code on the same StaticPool
    engine.  B must not get there while A is between await points: A's
    wait times out, and B runs once A has moved on.  (A result's fetch used
    to run without the engine's domain lock: the ORM result it reads keeps
    its cursor as ``raw``, which the target lookup did not follow.)"""
    engine = create_async_engine(_url(anyio_backend), poolclass=StaticPool)
    a_inside = threading.Event()
    b_inside = threading.Event()
    seen: dict[str, bool] = {}

    @event.listens_for(Row, "load")
    def on_load(target: Any, context: Any) -> None:
        if "a" not in seen:
            a_inside.set()
            seen["a"] = b_inside.wait(EXCLUDED)

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement == "select 42":
            b_inside.set()

    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(Row.__table__.insert(), [{"id": i} for i in range(1, 6)])

        async def task_a() -> None:
            async with AsyncSession(engine) as session:
                result = await session.stream_scalars(select(Row).order_by(Row.id))
                assert [row.id async for row in result] == [1, 2, 3, 4, 5]

        async def task_b() -> None:
            await _wait_for(a_inside, "task A's fetch reached its load event")
            async with engine.connect() as conn:
                assert (await conn.execute(text("select 42"))).scalar() == 42

        async with anyio.create_task_group() as tg:
            tg.start_soon(task_a)
            tg.start_soon(task_b)
        assert b_inside.is_set()
        assert seen == {"a": False}, "task B's sync code ran while task A's held the engine"
    finally:
        event.remove(Row, "load", on_load)
        await engine.dispose()


async def test_parallel_mode_runs_two_tasks_sync_code_at_once(
    anyio_backend: Any, mode: str, tmp_path: Any
) -> None:
    """Two tasks on a QueuePool engine (one connection each): in the
    parallel mode each one's sync code waits for the other's to arrive and
    both arrive, however long the atomic mode would block the loop
    (``handoff_timeout=None``: until the next await point).  In the atomic
    mode with that setting, the first one's wait is never answered."""
    sync = anyio_backend[0] == "trio"
    sqla_anyio_shim.install(sync_drivers=sync, parallel=mode == "parallel", handoff_timeout=None)
    engine = create_async_engine(_url(anyio_backend, tmp_path / "p.db"), pool_size=2)
    arrived = {"a": threading.Event(), "b": threading.Event()}
    met: dict[str, bool] = {}

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        for me, other in (("a", "b"), ("b", "a")):
            if statement == f"select '{me}'":
                arrived[me].set()
                met[me] = arrived[other].wait(MEET if mode == "parallel" else EXCLUDED)

    async def task(me: str) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))  # both connections checked out first
            assert (await conn.execute(text(f"select '{me}'"))).scalar() == me

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task, "a")
            tg.start_soon(task, "b")
        if mode == "parallel":
            assert met == {"a": True, "b": True}
        else:
            # the first to arrive held the loop until its statement was done
            assert sorted(met.values()) == [False, True]
    finally:
        await engine.dispose()


async def test_keep_atomic_reaches_engines_already_used(
    anyio_backend: Any, mode: str, tmp_path: Any
) -> None:
    """keep_atomic(engine) after the engine -- and one made from it by
    execution_options() -- has been used: both are atomic from their next
    call on (their cached facts were kept before)."""
    engine = create_async_engine(_url(anyio_backend, tmp_path / "k.db"))
    derived = engine.execution_options(logging_token="derived")
    try:
        for e in (engine, derived):
            async with e.connect() as conn:
                await conn.execute(text("select 1"))
        assert _targets.facts_of(derived.sync_engine).domain is None
        sqla_anyio_shim.keep_atomic(engine)
        assert _targets.facts_of(engine.sync_engine).domain is not None
        assert _targets.facts_of(derived.sync_engine).domain is not None
        async with derived.connect() as conn:
            assert (await conn.execute(text("select 1"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_reaction_to_an_await_points_error_is_waited_for(
    anyio_backend: Any, monkeypatch: Any
) -> None:
    """In the parallel mode the loop runs while the sync code does -- but
    not while the sync code reacts to an exception raised at one of its
    await points (a cancellation, a lost connection): from then on the call
    is waited for as its first stretch is.  On greenlet that reaction
    (SQLAlchemy invalidating and terminating the connection, over a few
    hops) runs before the loop's next step; when the loop ran meanwhile,
    asyncpg's background cancel request raced with the terminate() and left
    an unretrieved ConnectionError on the loop (CI, 3.14t and 3.13t;
    docs/conformance.md).  A ticker task counts the loop's iterations while
    the sync code handles the error in two stretches with a hop between:
    none may pass.  (The bound per stretch is raised so that a loaded
    machine cannot make the worker outlast it.)"""
    if anyio_backend[0] == "trio":
        pytest.skip("the first-stretch wait is for async drivers, which are asyncio's")
    from sqlalchemy.util import concurrency

    from sqla_anyio_shim._bridge import _host

    monkeypatch.setattr(_host, "FIRST_HANDOFF_BOUND", 30.0)
    sqla_anyio_shim.install(parallel=True)
    await_ = getattr(concurrency, "await_", None) or concurrency.await_only
    ticks = [0]
    seen: dict[str, int] = {}
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks[0] += 1
            await anyio.lowlevel.checkpoint()

    async def fails() -> None:
        await anyio.lowlevel.checkpoint()
        raise ConnectionError("the server went away")

    async def hop() -> int:
        return ticks[0]

    def sync() -> None:
        try:
            await_(fails())
        except ConnectionError:
            seen["caught"] = ticks[0]
            threading.Event().wait(0.05)  # the reaction: plain Python, then a hop
            seen["hop"] = await_(hop())
            threading.Event().wait(0.05)
            seen["end"] = ticks[0]

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await anyio.sleep(0.01)
            await concurrency.greenlet_spawn(sync)
            stop.set()
    finally:
        sqla_anyio_shim.install()
    assert seen["hop"] - seen["caught"] <= 1, seen
    assert seen["end"] - seen["hop"] <= 1, seen
