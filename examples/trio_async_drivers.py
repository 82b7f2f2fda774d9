"""A trio program on an asyncio driver: aiosqlite, asyncpg, psycopg,
aiomysql or asyncmy through SQLAlchemy's asyncio extension.

    python examples/trio_async_drivers.py [URL]

(default: an aiosqlite database in a temporary directory; e.g.
``postgresql+asyncpg://user@host/db`` for PostgreSQL.)

The drivers are asyncio libraries and trio has no asyncio loop; under trio
the shim gives each driver connection an asyncio loop of its own, which the
worker thread running SQLAlchemy's sync code runs (``install()``'s
``driver_loops``, on by default under trio).  Deadlines work as on asyncio:
a trio cancellation reaches the driver's coroutine at its suspension.

Forty tasks each insert a row and commit, under ``trio.move_on_after``; a
quarter of them have a deadline too short to make it.  At the end the
program checks the database: every task whose commit returned has its row,
no task cancelled before its commit has one, and nothing is checked out.
Exit status 1 if anything is off.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile

import trio

import sqla_anyio_shim

sqla_anyio_shim.install()  # driver_loops=None: on under trio

from sqlalchemy import Integer, String, select  # noqa: E402
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

TASKS = 40


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "shim_trio_example_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(String(40))


async def main(url: str) -> int:
    engine = create_async_engine(url, pool_size=5, max_overflow=0)
    print(f"trio {trio.__version__} + {engine.dialect.driver} ({engine.url.get_backend_name()})")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    Session = async_sessionmaker(engine)
    rnd = random.Random(18)
    short = set(rnd.sample(range(TASKS), TASKS // 4))
    committing: set[int] = set()
    committed: set[int] = set()

    async def task(i: int) -> None:
        # a "short" deadline passes before the task gets far (or, now and
        # then, just after its commit)
        with trio.move_on_after(0.0005 if i in short else 30):
            async with Session() as session:
                session.add(Row(id=i, note=f"task {i}"))
                committing.add(i)
                await session.commit()
                committed.add(i)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(TASKS):
                nursery.start_soon(task, i)
        async with Session() as session:
            ids = set((await session.scalars(select(Row.id))).all())
        checked_out = engine.pool.checkedout()
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await engine.dispose()
    print(f"{TASKS} tasks, {len(short)} with a deadline too short: {len(committed)} committed")
    ok = committed <= ids <= committing and checked_out == 0
    print(
        f"database: {len(ids)} rows; every commit kept, nothing from a task cancelled "
        f"before its commit, nothing checked out: {'yes' if ok else 'NO'}"
    )
    print(f"greenlet imported: {'yes' if 'greenlet' in sys.modules else 'no'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        target = sys.argv[1]
    else:
        target = f"sqlite+aiosqlite:///{os.path.join(tempfile.mkdtemp(), 'rows.db')}"
    sys.exit(trio.run(main, target))
