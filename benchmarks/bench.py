"""Benchmark runner: greenlet vs the thread bridge, in one process.

Run it as ``python benchmarks/bench.py [options]`` or load this file by path
and call :func:`main` (``python -m sqla_anyio_shim bench`` does that).

Cell groups (``--cells``, default all): ``classic`` is this module's
database x workload x concurrency grid (issue 6, described below); ``reuse``,
``scale``, ``cpu``, ``fairness`` and ``hops`` are the hand-off cells of
issue 10, in ``bench_cells.py``.  ``--merge results.json`` keeps the groups
of an earlier run that this run does not re-measure, so one group can be
re-run and RESULTS.md re-rendered whole.

Full runs (quiet machine; durations estimated for a 2-core VM)::

    # everything, the cpu cells on a free-threaded interpreter (~25 min)
    python benchmarks/bench.py --cpu-python /path/to/3.14t-venv/bin/python \
        --out benchmarks/RESULTS.md --plot benchmarks/ratios.png \
        --json benchmarks/results.json
    # one group, merged into the committed results (reuse ~4 min, scale
    # ~4 min, cpu ~2-4 min, fairness ~10 s (70 s while the sync-driver loop
    # cannot be cancelled: 3 s hard cap per round), hops ~40 s, classic ~14 min)
    python benchmarks/bench.py --cells reuse --merge benchmarks/results.json \
        --json benchmarks/results.json --out benchmarks/RESULTS.md \
        --plot benchmarks/ratios.png

``--quick`` (what CI runs) runs every cell at a tiny size: about 20 s for the
hand-off cells and 15 s for the classic grid on an idle machine.

Variants (per database)
-----------------------
``greenlet``   upstream: greenlet + async driver (``sqla_anyio_shim.uninstall()``)
``shim``       the thread bridge + the same async driver (``install()``)
``shim-sync``  the thread bridge + a sync DBAPI driver (``install(sync_drivers=True)``)
``to_thread``  a sync ``Session`` per operation through ``anyio.to_thread.run_sync``
``plain``      plain sync SQLAlchemy in the loop's thread (the floor; the
               "concurrency" tasks run one after another)

All variants of a cell (database x workload x concurrency) are measured in
rounds: every round runs one batch of every variant, in an order rotated
from round to round, so that drift of the machine hits all variants alike.
Every batch gets a fresh engine, created and disposed under the variant's
implementation, and a warm-up (``concurrency`` operations, untimed) before
the timed part.  Reported figures are medians over the rounds.

Peak threads and RSS: a sampler thread reads ``/proc/self/status`` every
5 ms during each timed batch (``Threads`` and ``VmRSS``).  Because VmHWM is
per process, the peak RSS at 1,000 tasks is also measured in isolation: one
subprocess per variant runs the 1,000-task ORM select and reports VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
perf_counter = time.perf_counter

# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

DEFAULT_PG_URL = os.environ.get(
    "BENCH_PG_URL",
    # as tox.ini and tests/test_databases.py: SQLA_SHIM_PG_HOST, default root
    f"postgresql://{os.environ.get('SQLA_SHIM_PG_HOST', 'root@127.0.0.1:5432')}/test",
)
DEFAULT_SQLITE_PATH = os.environ.get("BENCH_SQLITE_PATH", "/tmp/sqla_anyio_shim_bench/bench.db")

LIGHT_WORKLOADS = ["core_pk", "orm_get", "orm_select_pk", "orm_insert"]
HEAVY_WORKLOADS = ["bulk_insert", "stream"]
WORKLOAD_TITLES = {
    "core_pk": "Core select by primary key",
    "orm_get": "ORM session.get()",
    "orm_select_pk": "ORM select by primary key",
    "orm_insert": "ORM insert of one row + commit",
    "bulk_insert": "bulk insert of {bulk:,} rows (ORM insert() executemany)",
    "stream": "stream() of {stream:,} rows",
}


@dataclass
class Sizes:
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
class Variant:
    key: str  # e.g. "shim+aiosqlite"
    kind: str  # greenlet | shim | shim-sync | to_thread | plain
    driver: str  # drivername for the URL
    baseline: str  # key of the greenlet variant it is compared with

    @property
    def is_async_engine(self) -> bool:
        return self.kind in ("greenlet", "shim", "shim-sync")


def variants_for(db: str) -> list[Variant]:
    if db == "sqlite":
        g = "greenlet+aiosqlite"
        return [
            Variant(g, "greenlet", "sqlite+aiosqlite", g),
            Variant("shim+aiosqlite", "shim", "sqlite+aiosqlite", g),
            Variant("shim-sync+pysqlite", "shim-sync", "sqlite+pysqlite", g),
            Variant("to_thread+pysqlite", "to_thread", "sqlite+pysqlite", g),
            Variant("plain+pysqlite", "plain", "sqlite+pysqlite", g),
        ]
    ga, gp = "greenlet+asyncpg", "greenlet+psycopg_async"
    return [
        Variant(ga, "greenlet", "postgresql+asyncpg", ga),
        Variant("shim+asyncpg", "shim", "postgresql+asyncpg", ga),
        Variant(gp, "greenlet", "postgresql+psycopg_async", gp),
        Variant("shim+psycopg_async", "shim", "postgresql+psycopg_async", gp),
        Variant("shim-sync+psycopg", "shim-sync", "postgresql+psycopg", gp),
        Variant("to_thread+psycopg", "to_thread", "postgresql+psycopg", gp),
        Variant("plain+psycopg", "plain", "postgresql+psycopg", gp),
    ]


class Unavailable(Exception):
    """The variant cannot run here (e.g. sync_drivers not implemented)."""


# ---------------------------------------------------------------------------
# process sampling
# ---------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("Threads:", "VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


class Sampler:
    """Samples OS thread count and VmRSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_threads = 0
        self.peak_py_threads = 0
        self.peak_rss_kb = 0
        self.start_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def _sample(self) -> None:
        st = read_status()
        self.peak_threads = max(self.peak_threads, st["Threads"])
        self.peak_rss_kb = max(self.peak_rss_kb, st["VmRSS"])
        self.peak_py_threads = max(self.peak_py_threads, threading.active_count())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Sampler:
        self.start_rss_kb = read_status()["VmRSS"]
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------
# implementation switching
# ---------------------------------------------------------------------------


def use_implementation(kind: str) -> None:
    """Switch SQLAlchemy's concurrency helpers to what ``kind`` needs and
    assert that the switch happened."""
    import sqlalchemy.util.concurrency as concurrency

    import sqla_anyio_shim
    from sqla_anyio_shim import _bridge

    if kind == "shim":
        sqla_anyio_shim.install()
    elif kind == "shim-sync":
        try:
            sqla_anyio_shim.install(sync_drivers=True)
        except (TypeError, AttributeError, NotImplementedError) as err:
            raise Unavailable(f"install(sync_drivers=True): {err!r}") from err
    else:
        # greenlet, and the sync variants, which must not touch the bridge
        sqla_anyio_shim.uninstall()
    shimmed = concurrency.greenlet_spawn is _bridge.greenlet_spawn
    want = kind in ("shim", "shim-sync")
    assert shimmed == want, (kind, concurrency.greenlet_spawn)
    if not want:
        import greenlet  # noqa: F401  (the greenlet variant needs it)


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


_SETUP: dict[str, str] = {}


def ensure_database(db: str, args: Any, sizes: Sizes) -> str:
    """:func:`setup_database` once per database and run (all groups share
    the data)."""
    if db not in _SETUP:
        _SETUP[db] = setup_database(db, args, sizes)
    return _SETUP[db]


def truncate_writes(db: str, args: Any) -> None:
    from sqlalchemy import create_engine

    driver = "sqlite+pysqlite" if db == "sqlite" else "postgresql+psycopg"
    engine = create_engine(url_for(db, driver, args))
    with engine.begin() as conn:
        if db == "sqlite":
            conn.exec_driver_sql("DELETE FROM bench_inserts")
            conn.exec_driver_sql("DELETE FROM bench_bulk")
        else:
            conn.exec_driver_sql("TRUNCATE bench_inserts, bench_bulk")
    engine.dispose()


# ---------------------------------------------------------------------------
# engines and operations
# ---------------------------------------------------------------------------


def pool_size_for(variant: Variant, concurrency: int) -> int:
    # what a user would do: one connection per concurrent task up to a cap
    # well inside PostgreSQL's max_connections=100 (SQLAlchemy's default
    # pool_size=5 + max_overflow=10 would cap at 15 for the same purpose)
    if variant.kind == "plain":
        return 1
    return max(1, min(concurrency, 20))


def make_engine(variant: Variant, db: str, args: Any, concurrency: int) -> Any:
    from sqlalchemy import create_engine, exc
    from sqlalchemy.ext.asyncio import create_async_engine

    url = url_for(db, variant.driver, args)
    kw: dict[str, Any] = {
        "pool_size": pool_size_for(variant, concurrency),
        "max_overflow": 0,
        "pool_timeout": 600,
    }
    if db == "sqlite":
        kw["connect_args"] = {"timeout": 60}
    if not variant.is_async_engine:
        return create_engine(url, **kw)
    try:
        engine = create_async_engine(url, **kw)
    except (TypeError, exc.ArgumentError, exc.InvalidRequestError) as err:
        if variant.kind == "shim-sync":
            raise Unavailable(f"create_async_engine({variant.driver}): {err}") from err
        raise
    dialect = engine.sync_engine.dialect
    is_sync_driver = bool(getattr(dialect, "_sqla_anyio_shim_sync_driver", False))
    if variant.kind == "shim-sync" and not is_sync_driver:
        raise Unavailable(
            f"create_async_engine({variant.driver}) picked "
            f"{type(dialect).__name__}, not the sync driver"
        )
    if variant.kind != "shim-sync":
        assert not is_sync_driver, (variant.key, type(dialect))
    return engine


class Ops:
    """The workloads for one engine: ``op(i)`` performs operation ``i``,
    an awaitable for async engines, a plain call for sync engines."""

    def __init__(self, engine: Any, is_async: bool, sizes: Sizes) -> None:
        from sqlalchemy import insert, select

        _, Item, InsertRow, BulkRow = schema()
        self.engine = engine
        self.sizes = sizes
        items = Item.__table__
        core_stmt = select(items).where(items.c.id == 0)
        self.core_stmt = core_stmt
        self.items_stmt = select(items)
        self.Item, self.InsertRow, self.BulkRow = Item, InsertRow, BulkRow
        self.insert_bulk = insert(BulkRow)
        self.select = select
        if is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker

            self.Session = async_sessionmaker(engine, expire_on_commit=False)
        else:
            from sqlalchemy.orm import sessionmaker

            self.Session = sessionmaker(engine, expire_on_commit=False)

    def bulk_rows(self, i: int) -> list[dict[str, Any]]:
        return [{"name": f"bulk {i}/{j}", "value": j} for j in range(self.sizes.bulk)]

    # -- async ---------------------------------------------------------------

    async def a_core_pk(self, i: int) -> None:
        t = self.Item.__table__
        async with self.engine.connect() as conn:
            row = (await conn.execute(self.select(t).where(t.c.id == i))).one()
        assert row.id == i

    async def a_orm_get(self, i: int) -> None:
        async with self.Session() as s:
            obj = await s.get(self.Item, i)
        assert obj.id == i

    async def a_orm_select_pk(self, i: int) -> None:
        Item = self.Item
        async with self.Session() as s:
            obj = (await s.execute(self.select(Item).where(Item.id == i))).scalar_one()
        assert obj.id == i

    async def a_orm_insert(self, i: int) -> None:
        async with self.Session() as s:
            s.add(self.InsertRow(name=f"row {i}", value=i))
            await s.commit()

    async def a_bulk_insert(self, i: int) -> None:
        rows = self.bulk_rows(i)
        async with self.Session() as s:
            await s.execute(self.insert_bulk, rows)
            await s.commit()

    async def a_stream(self, i: int) -> None:
        n = 0
        async with self.engine.connect() as conn:
            result = await conn.stream(self.items_stmt)
            async for _row in result:
                n += 1
        assert n == self.sizes.items, n

    # -- sync ----------------------------------------------------------------

    def s_core_pk(self, i: int) -> None:
        t = self.Item.__table__
        with self.engine.connect() as conn:
            row = conn.execute(self.select(t).where(t.c.id == i)).one()
        assert row.id == i

    def s_orm_get(self, i: int) -> None:
        with self.Session() as s:
            obj = s.get(self.Item, i)
        assert obj.id == i

    def s_orm_select_pk(self, i: int) -> None:
        Item = self.Item
        with self.Session() as s:
            obj = s.execute(self.select(Item).where(Item.id == i)).scalar_one()
        assert obj.id == i

    def s_orm_insert(self, i: int) -> None:
        with self.Session() as s:
            s.add(self.InsertRow(name=f"row {i}", value=i))
            s.commit()

    def s_bulk_insert(self, i: int) -> None:
        rows = self.bulk_rows(i)
        with self.Session() as s:
            s.execute(self.insert_bulk, rows)
            s.commit()

    def s_stream(self, i: int) -> None:
        n = 0
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(self.items_stmt)
            for _row in result:
                n += 1
        assert n == self.sizes.items, n


# ---------------------------------------------------------------------------
# running one batch
# ---------------------------------------------------------------------------


@dataclass
class BatchResult:
    ops: int
    wall: float
    latencies: list[float]
    peak_threads: int
    peak_py_threads: int
    peak_rss_kb: int
    start_rss_kb: int

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        if not lat:
            return float("nan")
        k = min(len(lat) - 1, max(0, round(q * (len(lat) - 1))))
        return lat[k]


_id_counter = [0]


def next_ids(n: int, items: int, rng: random.Random) -> list[int]:
    return [rng.randint(1, items) for _ in range(n)]


async def _run_tasks(
    variant: Variant,
    op: Callable[[int], Any],
    concurrency: int,
    per_task: int,
    ids: Sequence[int],
    latencies: list[float] | None,
) -> None:
    """Run ``concurrency`` tasks x ``per_task`` ops of ``op``."""
    if variant.kind == "plain":
        # the floor: one thread, the "tasks" run one after another
        for j in range(concurrency * per_task):
            t = perf_counter()
            op(ids[j])
            if latencies is not None:
                latencies.append(perf_counter() - t)
        return

    if variant.kind == "to_thread":
        import anyio.to_thread

        run_sync = anyio.to_thread.run_sync

        async def one(i: int) -> None:
            await run_sync(op, i)

    else:
        one = op  # type: ignore[assignment]

    async def task(j: int) -> None:
        base = j * per_task
        for m in range(per_task):
            t = perf_counter()
            await one(ids[base + m])
            if latencies is not None:
                latencies.append(perf_counter() - t)

    await asyncio.gather(*(task(j) for j in range(concurrency)))


def _impl_check(variant: Variant, engine: Any) -> Any:
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


async def run_batch(
    variant: Variant,
    db: str,
    workload: str,
    concurrency: int,
    per_task: int,
    args: Any,
    sizes: Sizes,
    rng: random.Random,
    timeout: float,
) -> BatchResult:
    use_implementation(variant.kind)
    engine = make_engine(variant, db, args, concurrency)
    try:
        ops = Ops(engine, variant.is_async_engine, sizes)
        prefix = "a_" if variant.is_async_engine else "s_"
        op = getattr(ops, prefix + workload)
        if variant.is_async_engine:
            await _impl_check(variant, engine)
        n = concurrency * per_task
        if workload in ("orm_insert", "bulk_insert"):
            _id_counter[0] += n + concurrency
            ids: Sequence[int] = range(_id_counter[0] - n - concurrency, _id_counter[0])
        else:
            ids = next_ids(n + concurrency, sizes.items, rng)
        # warm-up: fill the pool and start the threads this concurrency needs
        warm = ids[n:]
        warm_op = op
        if workload in HEAVY_WORKLOADS:
            warm_op = getattr(ops, prefix + "core_pk")
            warm = [1] * concurrency
        await asyncio.wait_for(_run_tasks(variant, warm_op, concurrency, 1, warm, None), timeout)
        gc.collect()
        latencies: list[float] = []
        with Sampler() as sampler:
            t0 = perf_counter()
            await asyncio.wait_for(
                _run_tasks(variant, op, concurrency, per_task, ids, latencies),
                timeout,
            )
            wall = perf_counter() - t0
        return BatchResult(
            ops=n,
            wall=wall,
            latencies=latencies,
            peak_threads=sampler.peak_threads,
            peak_py_threads=sampler.peak_py_threads,
            peak_rss_kb=sampler.peak_rss_kb,
            start_rss_kb=sampler.start_rss_kb,
        )
    finally:
        if variant.is_async_engine:
            await engine.dispose()
        else:
            engine.dispose()


# ---------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------


@dataclass
class Cell:
    db: str
    workload: str
    concurrency: int
    per_task: int
    results: dict[str, list[BatchResult]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def summary(self, key: str) -> dict[str, float] | None:
        rs = self.results.get(key)
        if not rs:
            return None
        return {
            "ops_per_s": statistics.median(r.ops_per_s for r in rs),
            "p50_us": statistics.median(r.pct(0.50) for r in rs) * 1e6,
            "p99_us": statistics.median(r.pct(0.99) for r in rs) * 1e6,
            "peak_threads": max(r.peak_threads for r in rs),
            "peak_rss_mb": max(r.peak_rss_kb for r in rs) / 1024,
            "rss_delta_mb": max(r.peak_rss_kb - r.start_rss_kb for r in rs) / 1024,
            "rounds": len(rs),
            "ops": rs[0].ops,
        }


def log(msg: str) -> None:
    print(msg, flush=True)


async def run_cells(db: str, cells: list[Cell], args: Any, sizes: Sizes) -> None:
    variants = variants_for(db)
    rng = random.Random(1234)
    timeout = 60.0 if args.quick else 600.0
    for cell in cells:
        if cell.workload in ("orm_insert", "bulk_insert"):
            truncate_writes(db, args)
        t_cell = perf_counter()
        for rnd in range(sizes.rounds_for(cell.concurrency)):
            shift = rnd % len(variants)
            order = variants[shift:] + variants[:shift]
            for v in order:
                if v.key in cell.errors or v.key in cell.unavailable:
                    continue
                try:
                    r = await run_batch(
                        v,
                        db,
                        cell.workload,
                        cell.concurrency,
                        cell.per_task,
                        args,
                        sizes,
                        rng,
                        timeout,
                    )
                except Unavailable as err:
                    cell.unavailable[v.key] = str(err)
                    continue
                except Exception as err:
                    tb = traceback.format_exc(limit=6)
                    cell.errors[v.key] = f"{type(err).__name__}: {err}"[:300]
                    log(f"  ERROR {db} {cell.workload} c={cell.concurrency} {v.key}: {tb}")
                    continue
                cell.results.setdefault(v.key, []).append(r)
        parts = []
        for v in variants:
            s = cell.summary(v.key)
            if s:
                parts.append(f"{v.key}={s['ops_per_s']:.0f}/s p50={s['p50_us']:.0f}us")
            elif v.key in cell.unavailable:
                parts.append(f"{v.key}=unavailable")
            elif v.key in cell.errors:
                parts.append(f"{v.key}=ERROR")
        log(
            f"[{db} {cell.workload} c={cell.concurrency}] "
            f"{perf_counter() - t_cell:.1f}s  " + "  ".join(parts)
        )
    use_implementation("greenlet")


def build_cells(db: str, concurrencies: list[int], sizes: Sizes) -> list[Cell]:
    cells = []
    for w in LIGHT_WORKLOADS:
        for c in concurrencies:
            cells.append(Cell(db, w, c, sizes.ops_per_task(c)))
    for w in HEAVY_WORKLOADS:
        cells.append(Cell(db, w, 1, sizes.heavy_ops[w]))
    return cells


# ---------------------------------------------------------------------------
# isolated peak-RSS probe (one subprocess per variant)
# ---------------------------------------------------------------------------


def rss_probe(args: Any) -> int:
    """Child process: one ORM-select batch at ``--concurrency`` tasks;
    prints a JSON line with VmHWM and thread peaks."""
    sizes = QUICK if args.quick else FULL
    db = args.db
    variant = next(v for v in variants_for(db) if v.key == args.probe_variant)
    concurrency = int(args.concurrency)

    async def go() -> dict[str, Any]:
        rng = random.Random(99)
        before = read_status()
        try:
            r = await run_batch(
                variant, db, "orm_select_pk", concurrency, 2, args, sizes, rng, 600.0
            )
        except Unavailable as err:
            return {"unavailable": str(err)}
        st = read_status()
        return {
            "rss_before_kb": before["VmRSS"],
            "hwm_kb": st["VmHWM"],
            "peak_rss_kb": r.peak_rss_kb,
            "peak_threads": r.peak_threads,
            "ops_per_s": r.ops_per_s,
        }

    try:
        out = asyncio.run(go())
    except Exception as err:
        out = {"error": f"{type(err).__name__}: {err}"[:300]}
    print("RSSPROBE " + json.dumps(out), flush=True)
    return 0


def run_rss_probes(db: str, args: Any, concurrency: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v in variants_for(db):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--rss-probe",
            v.key,
            "--db",
            db,
            "--concurrency",
            str(concurrency),
            "--pg-url",
            args.pg_url,
            "--sqlite-path",
            args.sqlite_path,
        ]
        if args.quick:
            cmd.append("--quick")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSSPROBE ")]
            if line:
                out[v.key] = json.loads(line[-1][len("RSSPROBE ") :])
            else:
                out[v.key] = {"error": (proc.stderr or proc.stdout)[-300:]}
        except subprocess.TimeoutExpired:
            out[v.key] = {"error": "timeout"}
        res = out[v.key]
        if "hwm_kb" in res:
            log(
                f"  rss probe {db} c={concurrency} {v.key}: VmHWM "
                f"{res['hwm_kb'] / 1024:.1f} MB, threads {res['peak_threads']}"
            )
        else:
            log(f"  rss probe {db} c={concurrency} {v.key}: {res}")
    return out


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


ALL_GROUPS = ("classic", "reuse", "scale", "cpu", "fairness", "hops")


def parse_groups(spec: str) -> list[str]:
    names = [g.strip() for g in spec.split(",") if g.strip()]
    if names == ["all"]:
        return list(ALL_GROUPS)
    bad = [g for g in names if g not in ALL_GROUPS]
    if bad or not names:
        raise SystemExit(
            f"--cells: unknown group(s) {', '.join(bad) or '(none)'}; "
            f"choose from {', '.join(ALL_GROUPS)} or all"
        )
    return [g for g in ALL_GROUPS if g in names]


def parse_args(argv: list[str]) -> Any:
    p = argparse.ArgumentParser(prog="bench", description="greenlet vs sqla-anyio-shim benchmarks")
    p.add_argument(
        "--quick", action="store_true", help="tiny counts: prove every variant and workload runs"
    )
    p.add_argument(
        "--cells",
        default="all",
        help="comma-separated cell groups: " + ",".join(ALL_GROUPS) + " (default all)",
    )
    p.add_argument(
        "--merge",
        default=None,
        metavar="JSON",
        help="keep the groups of this earlier --json that this run does not measure",
    )
    p.add_argument(
        "--cpu-python",
        default=None,
        help="interpreter for the cpu cells (default $BENCH_CPU_PYTHON or this one), e.g. a 3.14t "
        "venv's python",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="hand-off cells: only variants whose key contains one of these (comma-separated), "
        "e.g. for profiling",
    )
    p.add_argument(
        "--reuse-tasks", default=None, help="task counts of the reuse cells (default 1,100,1000)"
    )
    p.add_argument(
        "--scale-tasks",
        default=None,
        help="task counts of the scale cells (default 1000,5000,20000)",
    )
    p.add_argument("--cpu-tasks", default=None, help="task counts of the cpu cells (default 1,8)")
    p.add_argument("--out", default=None, help="write RESULTS.md here")
    p.add_argument("--plot", default=None, help="write the ratios PNG here")
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--db", default="all", choices=["sqlite", "postgresql", "all"])
    p.add_argument(
        "--concurrency",
        default=None,
        help="comma-separated task counts (default 1,10,100,1000; quick: 1,10)",
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated subset of " + ",".join(LIGHT_WORKLOADS + HEAVY_WORKLOADS),
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--sqlite-path", default=DEFAULT_SQLITE_PATH)
    p.add_argument(
        "--no-rss-probe",
        action="store_true",
        help="skip the isolated 1,000-task peak-RSS subprocesses",
    )
    p.add_argument(
        "--allow-unavailable", action="store_true", help="exit 0 even if a variant was unavailable"
    )
    p.add_argument(
        "--render-from",
        default=None,
        metavar="JSON",
        help="only re-render --out/--plot from a saved --json file",
    )
    p.add_argument("--rss-probe", dest="probe_variant", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # bench_cells.py imports this module as "bench": one copy, whichever way
    # it was loaded (script, or python -m sqla_anyio_shim bench)
    sys.modules.setdefault("bench", sys.modules[__name__])
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.probe_variant:
        return rss_probe(args)
    if args.render_from:
        return render(args)
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes.rounds = sizes.big_rounds = args.rounds
    if args.concurrency:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    else:
        concurrencies = [1, 10] if args.quick else [1, 10, 100, 1000]
    dbs = ["sqlite", "postgresql"] if args.db == "all" else [args.db]
    t_start = perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    commit = git_describe()
    groups = parse_groups(args.cells)
    log(
        f"sqla-anyio-shim benchmarks ({'quick' if args.quick else 'full'}): "
        f"cells={','.join(groups)} dbs={dbs} concurrency={concurrencies}"
    )

    all_cells: list[Cell] = []
    probes: dict[str, dict[str, Any]] = {}
    server_versions: dict[str, str] = {}
    failed: list[str] = []
    for db in dbs if "classic" in groups else []:
        try:
            server_versions[db] = ensure_database(db, args, sizes)
        except Exception as err:
            failed.append(f"{db}: setup failed: {type(err).__name__}: {err}")
            log(f"{db}: setup failed: {err}")
            continue
        cells = build_cells(db, concurrencies, sizes)
        if args.workloads:
            keep = set(args.workloads.split(","))
            cells = [c for c in cells if c.workload in keep]
        asyncio.run(run_cells(db, cells, args, sizes))
        all_cells.extend(cells)
        if not args.no_rss_probe:
            pc = max(concurrencies)
            probes[db] = {"concurrency": pc, "results": run_rss_probes(db, args, pc)}

    group_data: dict[str, Any] = {}
    new_groups = [g for g in groups if g != "classic"]
    if new_groups:
        import bench_cells

        group_data = bench_cells.run_groups(args, new_groups, sizes, dbs, failed)
        for g in group_data.values():
            g["meta"]["commit"] = commit
        server_versions.update({db: v for db, v in _SETUP.items() if db not in server_versions})

    elapsed = perf_counter() - t_start
    unavailable: list[str] = []
    for cell in all_cells:
        for k, e in cell.errors.items():
            failed.append(f"{cell.db} {cell.workload} c={cell.concurrency} {k}: {e}")
        for k, e in cell.unavailable.items():
            unavailable.append(f"{cell.db} {cell.workload} c={cell.concurrency} {k}: {e}")
        for v in variants_for(cell.db):
            if (
                v.key not in cell.results
                and v.key not in cell.errors
                and v.key not in cell.unavailable
            ):
                failed.append(
                    f"{cell.db} {cell.workload} c={cell.concurrency} {v.key}: did not run"
                )
    for db, pr in probes.items():
        for k, res in pr["results"].items():
            if "error" in res:
                failed.append(f"{db} rss probe {k}: {res['error']}")

    meta = collect_meta(args, server_versions, started, elapsed, sizes, concurrencies)
    meta["commit"] = commit
    data = {
        "meta": meta,
        "cells": [
            {
                "db": c.db,
                "workload": c.workload,
                "concurrency": c.concurrency,
                "per_task": c.per_task,
                "summary": {k: c.summary(k) for k in c.results},
                "errors": c.errors,
                "unavailable": c.unavailable,
            }
            for c in all_cells
        ],
        "rss_probes": probes,
        "variants": {db: [(v.key, v.baseline) for v in variants_for(db)] for db in dbs}
        if "classic" in groups
        else {},
        "groups": group_data,
    }
    if args.merge:
        data = merge_results(args.merge, data, groups)
    import bench_report

    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                bench_report.render_markdown(
                    data, plot_name=os.path.basename(args.plot) if args.plot else None
                )
            )
        log(f"wrote {args.out}")
    if args.plot:
        try:
            bench_report.plot(data, args.plot)
            log(f"wrote {args.plot}")
        except Exception as err:
            failed.append(f"plot: {type(err).__name__}: {err}")
    log(f"total wall time {elapsed:.1f}s")
    for u in unavailable:
        log(f"UNAVAILABLE {u}")
    for f_ in failed:
        log(f"FAILED {f_}")
    if failed or (unavailable and not args.allow_unavailable):
        return 1
    return 0


def collect_meta(
    args: Any,
    server_versions: dict[str, str],
    started: str,
    elapsed: float,
    sizes: Sizes,
    concurrencies: list[int],
) -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for dist in (
        "SQLAlchemy",
        "greenlet",
        "aiosqlite",
        "asyncpg",
        "psycopg",
        "anyio",
        "sqla-anyio-shim",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except OSError:
        mem_kb = 0
    import sqlite3

    return {
        "date": started,
        "elapsed_s": elapsed,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gb": mem_kb / 1024 / 1024,
        "versions": versions,
        "sqlite": sqlite3.sqlite_version,
        "servers": server_versions,
        "quick": args.quick,
        "rounds": sizes.rounds,
        "big_rounds": sizes.big_rounds,
        "items": sizes.items,
        "bulk": sizes.bulk,
        "light_ops": {str(c): sizes.ops_per_task(c) for c in concurrencies},
        "heavy_ops": sizes.heavy_ops,
        "argv": sys.argv[1:],
    }


def merge_results(path: str, data: dict[str, Any], groups: list[str]) -> dict[str, Any]:
    """``data`` (this run) plus every group of the earlier run at ``path``
    that this run did not measure."""
    with open(path) as f:
        old = json.load(f)
    if "classic" not in groups:
        # the classic sections describe their own run: keep its meta too
        for key in ("meta", "cells", "rss_probes", "variants"):
            if key in old:
                data[key] = old[key]
    merged = dict(old.get("groups", {}))
    merged.update(data.get("groups", {}))
    data["groups"] = merged
    log(f"merged with {path}: groups from this run: {', '.join(groups)}")
    return data


def git_describe() -> str:
    """HEAD of the checkout, and whether the package has local changes."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(
            ["git", "-C", root, "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "sqla_anyio_shim"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except Exception:
        return "?"
    import sqla_anyio_shim

    pkg = os.path.dirname(os.path.abspath(sqla_anyio_shim.__file__))
    if os.path.realpath(pkg) != os.path.realpath(os.path.join(root, "sqla_anyio_shim")):
        # an installed copy or an export: say which code was measured
        return f"sqla_anyio_shim from {pkg} (checkout HEAD: {head})"
    return head + (" (+ uncommitted changes in sqla_anyio_shim/)" if dirty else "")


def render(args: Any) -> int:
    """Re-render RESULTS.md / the plot from a saved --json file."""
    import bench_report

    with open(args.render_from) as f:
        data = json.load(f)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                bench_report.render_markdown(
                    data, plot_name=os.path.basename(args.plot) if args.plot else None
                )
            )
    if args.plot:
        bench_report.plot(data, args.plot)
    return 0


def _import_report() -> None:
    if HERE not in sys.path:
        sys.path.insert(0, HERE)


_import_report()

if __name__ == "__main__":
    sys.exit(main())
