"""What every cell stands on: configuration, sizes, variants, data.

The database URLs (``BENCH_PG_URL``, ``BENCH_SQLITE_PATH``), the sizes of a
full and a ``--quick`` run (:data:`FULL`/:data:`QUICK` for the classic grid
and the data set, :data:`HANDOFF_FULL`/:data:`HANDOFF_QUICK` for the
hand-off cells), :class:`Variant`, the switch between greenlet and the
bridge (:func:`use_implementation`, checked by :func:`impl_check`), the
schema and the items table every group reads (:func:`ensure_database`).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

DEFAULT_PG_URL = os.environ.get(
    "BENCH_PG_URL",
    # as tox.ini and tests/test_databases.py: SQLA_SHIM_PG_HOST, default root
    f"postgresql://{os.environ.get('SQLA_SHIM_PG_HOST', 'root@127.0.0.1:5432')}/test",
)
DEFAULT_SQLITE_PATH = os.environ.get("BENCH_SQLITE_PATH", "/tmp/sqla_anyio_shim_bench/bench.db")


@dataclass
class Sizes:
    """Sizes of the classic grid, and of the data set every group reads."""

    rounds: int
    items: int  # rows in the items table (= rows streamed)
    bulk: int  # rows per bulk insert
    heavy_ops: dict[str, int]  # ops per batch of the heavy workloads
    light_ops: dict[int, int]  # concurrency -> ops per task
    big_rounds: int = 3  # rounds at 1,000 tasks and more (each is long)

    def rounds_for(self, concurrency: int) -> int:
        return self.big_rounds if concurrency >= 1000 else self.rounds

    def ops_per_task(self, concurrency: int) -> int:
        if concurrency in self.light_ops:
            return self.light_ops[concurrency]
        return max(1, 2000 // max(concurrency, 1) // 4) or 1


FULL = Sizes(
    rounds=5,
    items=100_000,
    bulk=10_000,
    heavy_ops={"bulk_insert": 2, "stream": 1},
    light_ops={1: 300, 10: 40, 100: 5, 1000: 1},
)
QUICK = Sizes(
    rounds=1,
    items=2_000,
    bulk=200,
    heavy_ops={"bulk_insert": 1, "stream": 1},
    light_ops={1: 5, 10: 2, 100: 1, 1000: 1},
    big_rounds=1,
)


@dataclass
class GroupSizes:
    """Sizes of the hand-off cells (reuse, scale, cpu, fairness, hops)."""

    rounds: int
    reuse_tasks: list[int]
    reuse_k: dict[int, int]  # tasks -> selects per session
    scale_tasks: list[int]
    scale_rounds: int
    cpu_tasks: list[int]
    cpu_ops: dict[int, int]  # tasks -> operations per task
    cpu_rows: int
    fairness_rounds: int
    hops_tasks: list[int]
    hops_spawns: dict[int, int]  # tasks -> greenlet_spawn() calls per task
    hops_awaits: int = 10  # await_() per greenlet_spawn() in the "+await_" shape
    count_max_tasks: int = 100  # await_() counting pass only up to this many tasks

    def reuse_k_for(self, tasks: int) -> int:
        return self.reuse_k.get(tasks, max(1, 3000 // tasks))

    def cpu_ops_for(self, tasks: int) -> int:
        return self.cpu_ops.get(tasks, max(1, 480 // tasks))

    def spawns_for(self, tasks: int) -> int:
        return self.hops_spawns.get(tasks, max(1, 2000 // tasks))


HANDOFF_FULL = GroupSizes(
    rounds=5,
    reuse_tasks=[1, 100, 1000],
    reuse_k={1: 3000, 100: 30, 1000: 5},
    scale_tasks=[1000, 5000, 20000],
    scale_rounds=2,
    cpu_tasks=[1, 8],
    cpu_ops={1: 300, 8: 60},
    cpu_rows=400,
    fairness_rounds=10,
    hops_tasks=[1, 100],
    hops_spawns={1: 3000, 100: 30},
)
HANDOFF_QUICK = GroupSizes(
    rounds=1,
    reuse_tasks=[1, 50],
    reuse_k={1: 20, 50: 2},
    scale_tasks=[100, 300],
    scale_rounds=1,
    cpu_tasks=[1, 8],
    cpu_ops={1: 4, 8: 1},
    cpu_rows=400,
    fairness_rounds=1,
    hops_tasks=[1, 20],
    hops_spawns={1: 50, 20: 5},
)


# ---------------------------------------------------------------------------
# variants and implementation switching
# ---------------------------------------------------------------------------


@dataclass
class Variant:
    key: str  # e.g. "shim+aiosqlite"
    kind: str  # greenlet | shim | shim-sync | to_thread | plain
    driver: str  # drivername for the URL
    baseline: str  # key of the greenlet variant it is compared with

    @property
    def is_async_engine(self) -> bool:
        return self.kind in ("greenlet", "shim", "shim-loops", "shim-sync")


def pair(driver: str, name: str) -> list[Variant]:
    """greenlet and the shim on one async driver (``name``)."""
    g = f"greenlet+{name}"
    return [Variant(g, "greenlet", driver, g), Variant(f"shim+{name}", "shim", driver, g)]


def with_driver_loops(variants: list[Variant], driver: str, name: str) -> list[Variant]:
    """A pair, plus the shim with ``install(driver_loops=True)`` (issue 18:
    the async driver on a loop of its own in the worker)."""
    return [*variants, Variant(f"shim-loops+{name}", "shim-loops", driver, variants[0].key)]


class Unavailable(Exception):
    """The variant cannot run here (e.g. sync_drivers not implemented)."""


def use_implementation(kind: str) -> None:
    """Switch SQLAlchemy's concurrency helpers to what ``kind`` needs and
    assert that the switch happened."""
    import sqlalchemy.util.concurrency as concurrency

    import sqla_anyio_shim
    from sqla_anyio_shim import _bridge

    # BENCH_SHIM_PARALLEL=on|off: install(parallel=True|False), unset:
    # install()'s default (issue 17's cells set it in their child's
    # environment; a whole run can be made with either)
    parallel = {"on": True, "off": False}.get(os.environ.get("BENCH_SHIM_PARALLEL", ""))
    if kind == "shim":
        sqla_anyio_shim.install(parallel=parallel)
    elif kind == "shim-loops":
        sqla_anyio_shim.install(parallel=parallel, driver_loops=True)
    elif kind == "shim-sync":
        try:
            sqla_anyio_shim.install(sync_drivers=True, parallel=parallel)
        except (TypeError, AttributeError, NotImplementedError) as err:
            raise Unavailable(f"install(sync_drivers=True): {err!r}") from err
    else:
        # greenlet, and the sync variants, which must not touch the bridge
        sqla_anyio_shim.uninstall()
    shimmed = concurrency.greenlet_spawn is _bridge.greenlet_spawn
    want = kind in ("shim", "shim-loops", "shim-sync")
    assert shimmed == want, (kind, concurrency.greenlet_spawn)
    if kind == "greenlet":
        import greenlet  # noqa: F401  (the greenlet variant needs it)


def impl_check(variant: Variant, engine: Any) -> Any:
    """An awaitable that proves, at run time, where the sync code runs."""

    async def check() -> None:
        async with engine.connect() as conn:
            on_main = await conn.run_sync(
                lambda c: threading.current_thread() is threading.main_thread()
            )
        if variant.kind == "greenlet":
            assert on_main, "greenlet variant ran sync code off the loop thread"
        else:
            assert not on_main, "shim variant ran sync code on the loop thread"

    return check()


# ---------------------------------------------------------------------------
# schema and data
# ---------------------------------------------------------------------------


def make_schema() -> Any:
    from sqlalchemy import Integer, String
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "bench_items"
        id = mapped_column(Integer, primary_key=True, autoincrement=False)
        name = mapped_column(String(50))
        value = mapped_column(Integer)

    class InsertRow(Base):
        __tablename__ = "bench_inserts"
        id = mapped_column(Integer, primary_key=True)
        name = mapped_column(String(50))
        value = mapped_column(Integer)

    class BulkRow(Base):
        __tablename__ = "bench_bulk"
        id = mapped_column(Integer, primary_key=True)
        name = mapped_column(String(50))
        value = mapped_column(Integer)

    return Base, Item, InsertRow, BulkRow


SCHEMA: Any = None


def schema() -> Any:
    global SCHEMA
    if SCHEMA is None:
        SCHEMA = make_schema()
    return SCHEMA


def base_url(db: str, args: Any) -> str:
    if db == "sqlite":
        return f"sqlite:///{args.sqlite_path}"
    return args.pg_url


def url_for(db: str, driver: str, args: Any) -> Any:
    from sqlalchemy.engine import make_url

    return make_url(base_url(db, args)).set(drivername=driver)


def setup_database(db: str, args: Any, sizes: Sizes) -> str:
    """Create the tables and load the items with plain sync SQLAlchemy.
    Returns the server version string."""
    from sqlalchemy import create_engine, insert, text

    Base, Item, _, _ = schema()
    if db == "sqlite":
        os.makedirs(os.path.dirname(args.sqlite_path), exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(args.sqlite_path + suffix)
            except FileNotFoundError:
                pass
        engine = create_engine(url_for(db, "sqlite+pysqlite", args))
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            version = conn.exec_driver_sql("select sqlite_version()").scalar()
    else:
        engine = create_engine(url_for(db, "postgresql+psycopg", args))
        with engine.connect() as conn:
            version = conn.exec_driver_sql("show server_version").scalar()
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    rows = [
        {"id": i, "name": f"item {i}", "value": i * 7 % 1000} for i in range(1, sizes.items + 1)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(Item.__table__), rows[start : start + 10_000])
    if db == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE bench_items"))
    engine.dispose()
    return str(version)


# database -> server version, for the databases set up in this process
SETUP: dict[str, str] = {}


def ensure_database(db: str, args: Any, sizes: Sizes) -> str:
    """:func:`setup_database` once per database and run (all groups share
    the data)."""
    if db not in SETUP:
        SETUP[db] = setup_database(db, args, sizes)
    return SETUP[db]


def async_engine(driver: str, db: str, args: Any, **kw: Any) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    if db == "sqlite":
        kw.setdefault("connect_args", {"timeout": 60})
    return create_async_engine(url_for(db, driver, args), **kw)


def count_items(cargs: Any) -> int:
    import sqlite3

    con = sqlite3.connect(cargs.sqlite_path)
    try:
        return int(con.execute("select count(*) from bench_items").fetchone()[0])
    finally:
        con.close()
