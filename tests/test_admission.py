"""Admission (issue 10, scale): beyond ``max_pool_waiters`` workers waiting
for a pool connection, new calls that hold no connection wait in the event
loop without a thread -- and the calls that would return a connection are
never held up.

Deterministic: one task holds the pool's only connection while the others
queue; the test waits (bounded) for the exact counts before it lets the
holder go on.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import sqla_anyio_shim
from sqla_anyio_shim._bridge import _workers
from sqla_anyio_shim._sqla import _admission, _targets

from .test_sqlalchemy import Base, Item

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LIMIT = 4
TASKS = 30


@pytest.fixture
def small_gate(anyio_backend: Any) -> Any:
    """The gate at LIMIT (sync drivers under trio, where aiosqlite cannot
    run); restored afterwards."""
    sync = anyio_backend[0] == "trio"
    sqla_anyio_shim.install(max_pool_waiters=LIMIT, sync_drivers=sync)
    try:
        yield sync
    finally:
        sqla_anyio_shim.install()


async def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}: {sqla_anyio_shim.stats()}") from None


@pytest.fixture
async def engine(anyio_backend: Any, small_gate: bool, tmp_path: Any) -> Any:
    """A pool of one connection, on a file database."""
    engine = create_async_engine(
        _url(tmp_path, small_gate), pool_size=1, max_overflow=0, pool_timeout=60
    )
    try:
        yield engine
    finally:
        await engine.dispose()


async def _select_one(engine: Any) -> None:
    """A caller that queues for a connection of its own."""
    async with engine.connect() as conn:
        await conn.execute(text("select 1"))


async def _queue_callers(tg: Any, engine: Any, beyond: int) -> None:
    """Start LIMIT + ``beyond`` callers and wait until LIMIT of them are at
    the pool's queue, each on its worker, and ``beyond`` at the gate."""
    for _ in range(LIMIT + beyond):
        tg.start_soon(_select_one, engine)
    await _until(
        lambda: (
            sqla_anyio_shim.stats().calls_waiting_admission == beyond
            and _workers.pool.busy == LIMIT
        ),
        f"{beyond} callers at the gate",
    )


def _url(tmp_path: Any, sync: bool) -> str:
    path = tmp_path / "admission.db"
    return f"sqlite:///{path}" if sync else f"sqlite+aiosqlite:///{path}"


async def test_waiting_tasks_beyond_the_bound_hold_no_thread(small_gate: bool, engine: Any) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(Item.__table__.insert(), [{"id": 1, "name": "one"}])
    expired = _admission.gate_stats()["expired"]
    done: list[int] = []

    async def reader(i: int) -> None:
        async with AsyncSession(engine) as session:
            item = (await session.execute(select(Item).where(Item.id == 1))).scalar_one()
            assert item.name == "one"
        done.append(i)

    async with engine.connect() as holder:
        # the pool's only connection is checked out: every reader waits
        await holder.execute(text("select 1"))
        async with anyio.create_task_group() as tg:
            for i in range(TASKS):
                tg.start_soon(reader, i)
            # LIMIT readers in the pool's queue, each on its worker; the
            # others wait at the gate, on no thread
            await _until(
                lambda: (
                    sqla_anyio_shim.stats().calls_waiting_admission == TASKS - LIMIT
                    and _workers.pool.busy == LIMIT
                ),
                "the readers beyond the bound to wait at the gate",
            )
            stats = sqla_anyio_shim.stats()
            assert stats.calls_at_pool == LIMIT, stats
            assert stats.calls_in_flight == LIMIT, stats
            assert done == []
            # the holder's own calls pass the closed gate (it is the one
            # that will return the connection)
            with anyio.fail_after(5):
                assert (await holder.execute(text("select 2"))).scalar() == 2
                await holder.commit()
            await holder.close()
    assert sorted(done) == list(range(TASKS))
    # nobody had to use the escape hatch: the holder was recognised
    assert _admission.gate_stats()["expired"] == expired
    stats = sqla_anyio_shim.stats()
    assert stats.calls_at_pool == 0 and stats.calls_waiting_admission == 0
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_session_holding_a_connection_passes_the_closed_gate(
    small_gate: bool, engine: Any
) -> None:
    """An ``AsyncSession`` whose transaction has the connection (its next
    execute(), its commit()) is not held at the gate."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as holder:
        holder.add(Item(id=7, name="seven"))
        await holder.flush()  # the session now holds the connection
        async with anyio.create_task_group() as tg:
            await _queue_callers(tg, engine, 3)
            with anyio.fail_after(5):
                got = (await holder.execute(select(Item.name).where(Item.id == 7))).scalar()
                assert got == "seven"
                await holder.commit()


async def test_cancelled_while_waiting_at_the_gate_leaves_nothing_behind(
    small_gate: bool, engine: Any
) -> None:
    """A task cancelled at the gate has started no sync code: no worker, no
    connection, no waiter left; the others go on."""
    finished: list[int] = []
    async with engine.connect() as holder:
        await holder.execute(text("select 1"))
        async with anyio.create_task_group() as tg:
            scopes: list[anyio.CancelScope] = []

            async def caller(i: int, scope: anyio.CancelScope) -> None:
                with scope:
                    async with engine.connect() as c:
                        await c.execute(text("select 1"))
                    finished.append(i)

            for i in range(LIMIT + 5):
                scope = anyio.CancelScope()
                scopes.append(scope)
                tg.start_soon(caller, i, scope)
            await _until(
                lambda: sqla_anyio_shim.stats().calls_waiting_admission == 5,
                "five callers at the gate",
            )
            for scope in scopes[LIMIT:]:
                scope.cancel()
            await _until(
                lambda: sqla_anyio_shim.stats().calls_waiting_admission == 0,
                "the cancelled callers to leave the gate",
            )
            assert sqla_anyio_shim.stats().calls_at_pool == LIMIT
            await holder.close()
    # the ones parked in the pool got their turn; the cancelled ones ran
    # no sync code at all
    assert sorted(finished) == list(range(LIMIT))
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_bad_max_pool_waiters_is_refused() -> None:
    for bad in (0, -1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_pool_waiters must be a positive integer or None"):
            sqla_anyio_shim.install(max_pool_waiters=bad)  # type: ignore[arg-type]
    sqla_anyio_shim.install()


async def test_raising_the_bound_admits_the_waiters_at_once(small_gate: bool, engine: Any) -> None:
    """install(max_pool_waiters=None) while calls wait at the gate lets them
    all go to the pool's queue at once (no waiting for the escape hatch)."""
    async with engine.connect() as holder:
        await holder.execute(text("select 1"))
        async with anyio.create_task_group() as tg:
            await _queue_callers(tg, engine, 6)
            expired = _admission.gate_stats()["expired"]
            sqla_anyio_shim.install(max_pool_waiters=None, sync_drivers=small_gate)
            await _until(
                lambda: (
                    sqla_anyio_shim.stats().calls_waiting_admission == 0
                    and _workers.pool.busy == LIMIT + 6
                ),
                "every caller at the pool's queue, on a worker",
            )
            # admitted by the raise, not by the 2 s escape hatch
            assert _admission.gate_stats()["expired"] == expired
            await holder.close()
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_engine_begin_commit_passes_the_closed_gate(small_gate: bool, engine: Any) -> None:
    """``async with engine.begin()``: the commit at the block's end is a call
    on the sync ``Transaction``, which holds the connection -- it must not
    wait behind the callers queueing for that very connection."""
    expired = _admission.gate_stats()["expired"]
    async with anyio.create_task_group() as tg:
        async with engine.begin() as holder:
            await holder.execute(text("select 1"))
            for _ in range(LIMIT + 3):
                tg.start_soon(_select_one, engine)
            await _until(
                lambda: (
                    sqla_anyio_shim.stats().calls_waiting_admission == 3
                    and _workers.pool.busy == LIMIT
                ),
                "three callers at the gate",
            )
        # the commit passed without the escape hatch
        assert _admission.gate_stats()["expired"] == expired


def test_what_counts_as_holding_a_connection(tmp_path: Any) -> None:
    """The holder check, object by object (sync API, no gate involved)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    def _holds_connection(fn: Any, args: tuple[Any, ...]) -> bool:
        # what the gate asks of a call's target (_admission._classify): whether
        # its sync code works on a checked-out connection, so may be the one
        # to return it and must not wait
        target = _targets.target_of(fn, args)
        return target is not None and target[0] is _targets.HOLDER

    engine = create_engine(f"sqlite:///{tmp_path / 'holders.db'}")
    Base.metadata.create_all(engine)
    try:
        assert not _holds_connection(engine.connect, ())
        with engine.connect() as conn:
            assert _holds_connection(conn.execute, ())
            assert _holds_connection(getattr, (conn, "connection"))
            result = conn.execute(text("select 1"))
            assert _holds_connection(result.close, ())
            result.close()
        with engine.begin() as conn:
            assert _holds_connection(conn.get_transaction().commit, ())  # type: ignore[union-attr]
        with Session(engine) as session:
            assert not _holds_connection(session.execute, ())
            session.add(Item(id=1, name="one"))
            session.flush()
            assert _holds_connection(session.execute, ())
            assert _holds_connection(session.get_transaction().commit, ())  # type: ignore[union-attr]
            item = session.get(Item, 1)
            assert _holds_connection(getattr, (item, "name"))
            session.commit()
            assert not _holds_connection(getattr, (item, "name"))
            assert not _holds_connection(session.execute, ())
        assert not _holds_connection(len, ([],))
    finally:
        engine.dispose()


# -- the gate is per pool, runs the pool's clock, and never holds up holders
# (issue 16, items 1-3 and 5) -----------------------------------------------------


async def test_sessions_joined_to_an_external_connection_pass_the_closed_gate(
    small_gate: bool, engine: Any
) -> None:
    """SQLAlchemy's "join a session into an external transaction" recipe:
    the task holds an ``AsyncConnection`` and works through
    ``AsyncSession(bind=conn)`` -- a session with no transaction yet, whose
    bind is the checked-out connection -- or through a plain function that
    closes over the sync connection.  Neither may wait at the closed gate:
    it is what returns the connection the queue waits for (before: both
    waited 2 s for the escape hatch, and the waiters' pool_timeout ran
    out)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with engine.connect() as holder:
        await holder.execute(text("select 1"))
        sync_conn = holder.sync_connection
        async with anyio.create_task_group() as tg:
            await _queue_callers(tg, engine, 3)
            waiting = sqla_anyio_shim.stats().calls_waiting_admission
            with anyio.fail_after(1.5):
                async with AsyncSession(bind=holder) as session:
                    session.add(Item(id=1, name="joined"))
                    await session.flush()
                    got = await session.scalar(select(Item.name).where(Item.id == 1))
                    assert got == "joined"
                from sqlalchemy.util import greenlet_spawn

                assert (
                    await greenlet_spawn(lambda: sync_conn.execute(text("select 41 + 1")).scalar())
                    == 42
                )
            # nobody new waited at the gate meanwhile
            assert sqla_anyio_shim.stats().calls_waiting_admission == waiting
            await holder.rollback()
            await holder.close()
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_saturated_pool_does_not_hold_up_another_engine(
    small_gate: bool, engine: Any, tmp_path: Any
) -> None:
    """Slots are per pool: with engine A's gate closed (its only connection
    held, LIMIT calls in its queue, more at its gate), units of work on an
    idle engine B run at once (before: each waited at the process-wide
    gate for the 2 s escape hatch)."""
    other = create_async_engine(
        _other_url(tmp_path, small_gate),
        pool_size=2,
        max_overflow=0,
    )
    try:
        async with engine.connect() as holder:
            await holder.execute(text("select 1"))
            async with anyio.create_task_group() as tg:
                await _queue_callers(tg, engine, 3)
                with anyio.fail_after(1.5):
                    for i in range(10):
                        async with AsyncSession(other) as session:
                            assert await session.scalar(text(f"select {i}")) == i
                        async with other.connect() as conn:
                            assert (await conn.execute(text("select 1"))).scalar() == 1
                assert sqla_anyio_shim.stats().calls_waiting_admission == 3
                await holder.close()
        assert other.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await other.dispose()


def _other_url(tmp_path: Any, sync: bool) -> str:
    path = tmp_path / "other.db"
    return f"sqlite:///{path}" if sync else f"sqlite+aiosqlite:///{path}"


async def test_pool_timeout_counts_the_wait_at_the_gate(small_gate: bool, tmp_path: Any) -> None:
    """``pool_timeout`` means what SQLAlchemy says, gate or no gate: with the
    only connection held, every one of 5 x LIMIT callers gets SQLAlchemy's
    ``TimeoutError`` about ``pool_timeout`` after it asked -- not after its
    turn at the gate plus a whole ``pool_timeout`` in the queue (before:
    the last ones waited 5 x pool_timeout).  The bound below is twice the
    timeout: generous for a busy machine, far below the old behaviour."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    timeout = 1.0
    engine = create_async_engine(
        _url(tmp_path, small_gate), pool_size=1, max_overflow=0, pool_timeout=timeout
    )
    errors: list[float] = []
    try:
        async with engine.connect() as holder:
            await holder.execute(text("select 1"))
            started = anyio.current_time()

            async def caller() -> None:
                with pytest.raises(PoolTimeout):
                    async with engine.connect():
                        pass  # pragma: no cover -- the pool has nothing to give
                errors.append(anyio.current_time() - started)

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for _ in range(5 * LIMIT):
                        tg.start_soon(caller)
            await holder.close()
        assert len(errors) == 5 * LIMIT
        assert max(errors) < 2 * timeout, sorted(errors)
        assert _admission.gate_stats()["waiting"] == 0
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_max_workers_below_the_waiting_sessions_does_not_deadlock(
    anyio_backend: Any, tmp_path: Any
) -> None:
    """``max_workers`` fewer than the sessions queueing for a pool: the
    workers are all taken by calls waiting for a connection, and the
    sessions holding one must still get a worker to return it (their calls
    pass the cap).  Before: no progress until pool_timeout."""
    sync = anyio_backend[0] == "trio"
    sqla_anyio_shim.install(max_workers=4, sync_drivers=sync)
    engine = create_async_engine(_url(tmp_path, sync), pool_size=2, max_overflow=0, pool_timeout=30)
    done: list[int] = []
    try:

        async def one(i: int) -> None:
            async with AsyncSession(engine) as session:
                assert await session.scalar(text(f"select {i}")) == i
                assert await session.scalar(text("select 1")) == 1
            done.append(i)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(60):
                    tg.start_soon(one, i)
        assert sorted(done) == list(range(60))
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
        sqla_anyio_shim.install()


async def test_closing_a_session_that_has_no_connection_passes_the_closed_gate(
    small_gate: bool, engine: Any
) -> None:
    """A session that never got its connection (its task was cancelled in
    the pool's queue, or it never ran a query) closes, rolls back and is
    reset without the pool: those calls do not wait behind the tasks
    queueing for a connection.  (Before, they did, while a cancelled
    task's anyio scope retried its cancellation on every loop iteration:
    the 1,000-task stress run took three times as long.)"""
    async with engine.connect() as holder:
        await holder.execute(text("select 1"))
        async with anyio.create_task_group() as tg:
            await _queue_callers(tg, engine, 3)
            with anyio.fail_after(1.5):
                session = AsyncSession(engine)
                await session.rollback()
                await session.close()
                await session.reset()
            assert sqla_anyio_shim.stats().calls_waiting_admission == 3
            await holder.close()
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
