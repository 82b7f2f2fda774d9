"""The main job: a Core and ORM walk-through on embedded SQLite, greenlet-free.

``python -m sqla_anyio_shim`` runs it twice: on asyncio with the aiosqlite
driver, and on trio with the sync sqlite3 driver running in the workers
(``install(sync_drivers=True)``).  Every step checks its result and the run
exits non-zero on the first failure.
"""

# no "from __future__ import annotations": the mapped classes below are
# local, and SQLAlchemy must evaluate their annotations where they stand

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import anyio


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(f"walk-through check failed: {what}")


async def walk(url: str, say: Callable[[str], None]) -> None:
    from sqlalchemy import ForeignKey, String, func, inspect, select, text, update
    from sqlalchemy.ext.asyncio import (
        AsyncAttrs,
        async_sessionmaker,
        create_async_engine,
    )
    from sqlalchemy.orm import (
        DeclarativeBase,
        Mapped,
        mapped_column,
        relationship,
        selectinload,
    )

    class Base(AsyncAttrs, DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50))
        addresses: Mapped[list["Address"]] = relationship(
            back_populates="user", cascade="all, delete-orphan"
        )

    class Address(Base):
        __tablename__ = "addresses"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(100))
        user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
        user: Mapped[User] = relationship(back_populates="addresses")

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            tables = await conn.run_sync(lambda sync_conn: inspect(sync_conn).get_table_names())
        _check(sorted(tables) == ["addresses", "users"], f"tables {tables}")
        say(f"created tables {', '.join(sorted(tables))} (run_sync + inspector)")

        # -- Core --
        users_table = Base.metadata.tables["users"]
        async with engine.begin() as conn:
            await conn.execute(
                users_table.insert(),
                [{"id": i, "name": f"user{i}"} for i in range(1, 6)],
            )
            count = (await conn.execute(select(func.count()).select_from(User))).scalar_one()
        _check(count == 5, f"count {count}")
        say(f"Core: inserted {count} users in one executemany")

        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT name FROM users WHERE id = :id"), {"id": 3})
            name = result.scalar_one()
            _check(name == "user3", f"name {name}")
            await conn.execute(
                update(users_table).where(users_table.c.id == 3).values(name="renamed")
            )
            await conn.rollback()
            name = (await conn.execute(select(User.name).where(User.id == 3))).scalar_one()
        _check(name == "user3", "rollback kept the old name")
        say("Core: select by key, update then rollback: the update is gone")

        # -- ORM --
        Session = async_sessionmaker(engine, expire_on_commit=False)
        async with Session() as session:
            user = await session.get(User, 1, options=[selectinload(User.addresses)])
            _check(user is not None, "get(User, 1)")
            assert user is not None
            user.addresses.append(Address(email="u1@example.com"))
            user.addresses.append(Address(email="u1@work.example"))
            session.add(User(id=6, name="user6"))
            await session.commit()
        say("ORM: get, add two addresses through a relationship, add a user, commit")

        async with Session() as session:
            users = (
                await session.scalars(
                    select(User).options(selectinload(User.addresses)).order_by(User.id)
                )
            ).all()
            emails = [a.email for a in users[0].addresses]
            _check(len(users) == 6, f"{len(users)} users")
            _check(sorted(emails) == ["u1@example.com", "u1@work.example"], str(emails))
            lazy = await users[0].awaitable_attrs.addresses
            _check(len(lazy) == 2, "awaitable_attrs")
        say(f"ORM: selectinload of {len(users)} users with their addresses")

        async with Session() as session:
            seen = 0
            stream = await session.stream_scalars(select(User).order_by(User.id))
            async for _user in stream:
                seen += 1
            _check(seen == 6, f"streamed {seen}")
        say(f"ORM: AsyncSession.stream_scalars() yielded {seen} users")

        async with Session() as session:
            async with session.begin():
                session.add(User(id=7, name="doomed"))
                await session.flush()
                nested = await session.begin_nested()
                session.add(User(id=8, name="also doomed"))
                await session.flush()
                await nested.rollback()
                await session.delete(await session.get(User, 6))
            count = await session.scalar(select(func.count()).select_from(User)) or 0
            _check(count == 6, f"count after savepoint rollback {count}")
        say("ORM: savepoint rollback dropped a user, delete committed")

        async with Session() as session:
            try:
                async with session.begin():
                    session.add(User(id=9, name="never"))
                    await session.flush()
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            gone = await session.get(User, 9)
            _check(gone is None, "rolled back on error")
        say("ORM: an exception inside session.begin() rolled the transaction back")

        def sync_work(sync_session: Any) -> int:
            return len(sync_session.execute(select(User)).all())

        async with Session() as session:
            n = await session.run_sync(sync_work)
        _check(n == 6, f"run_sync saw {n}")
        say(f"ORM: run_sync() ran sync Session code seeing {n} users")

        _check(
            engine.pool.checkedout() == 0,  # type: ignore[attr-defined]
            "no connection left checked out",
        )
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    import sqla_anyio_shim

    before = "greenlet" in sys.modules
    sqla_anyio_shim.install(sync_drivers=True)
    tmp = tempfile.mkdtemp(prefix="sqla-anyio-shim-")
    runs = [
        ("asyncio", f"sqlite+aiosqlite:///{os.path.join(tmp, 'aio.db')}", "aiosqlite"),
        ("trio", f"sqlite:///{os.path.join(tmp, 'sync.db')}", "sqlite3 in the workers"),
    ]
    try:
        import trio  # noqa: F401
    except ImportError:
        runs = runs[:1]
        print("(trio is not installed: the trio run is skipped; pip install trio)")
    for backend, url, driver in runs:
        print(f"== {backend} + {driver}: {url}")

        def say(line: str) -> None:
            print(f"   ok  {line}")

        anyio.run(walk, url, say, backend=backend)
    from .._bridge import _workers

    print(f"== done: worker threads alive {_workers.pool.total} (idle {_workers.pool.idle})")
    if before or "greenlet" in sys.modules:
        print("greenlet WAS imported in this process")
        return 1
    print("greenlet was not imported: every await_() went through the thread bridge")
    return 0
