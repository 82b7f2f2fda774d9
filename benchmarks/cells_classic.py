"""The ``classic`` cells (issue 6): database x workload x concurrency.

Workloads: Core select by primary key, ORM ``session.get()``, ORM select by
primary key, ORM insert + commit at 1 / 10 / 100 / 1,000 tasks; a bulk
insert and a ``stream()`` of the items table at one task.

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
subprocess per variant (``python -m benchmarks.cells_classic --rss-probe
VARIANT ...``) runs the 1,000-task ORM select and reports VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from subprocess import TimeoutExpired
from typing import Any

from ._method import Sampler, log, module_cmd, perf_counter, read_status, run_module
from ._setup import (
    DEFAULT_PG_URL,
    DEFAULT_SQLITE_PATH,
    FULL,
    QUICK,
    Sizes,
    Unavailable,
    Variant,
    ensure_database,
    impl_check,
    schema,
    url_for,
    use_implementation,
)

LIGHT_WORKLOADS = ["core_pk", "orm_get", "orm_select_pk", "orm_insert"]
HEAVY_WORKLOADS = ["bulk_insert", "stream"]


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
            await impl_check(variant, engine)
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
# the grid
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


def run_grid(
    args: Any, sizes: Sizes, dbs: list[str], concurrencies: list[int], failed: list[str]
) -> tuple[list[Cell], dict[str, dict[str, Any]], dict[str, str]]:
    """Set up each database, run its cells (``--workloads``) and, unless
    ``--no-rss-probe``, the isolated peak-RSS probes at the largest task
    count.  Returns (cells, probes, server versions); set-up failures are
    appended to ``failed``."""
    all_cells: list[Cell] = []
    probes: dict[str, dict[str, Any]] = {}
    server_versions: dict[str, str] = {}
    for db in dbs:
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
    return all_cells, probes, server_versions


def problems(
    cells: list[Cell],
    probes: dict[str, dict[str, Any]],
    failed: list[str],
    unavailable: list[str],
) -> None:
    """Append the errors, the variants that did not run and the failed
    probes to ``failed``; the unavailable variants to ``unavailable``."""
    for cell in cells:
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


def cells_json(cells: list[Cell]) -> list[dict[str, Any]]:
    """The ``cells`` section of results.json."""
    return [
        {
            "db": c.db,
            "workload": c.workload,
            "concurrency": c.concurrency,
            "per_task": c.per_task,
            "summary": {k: c.summary(k) for k in c.results},
            "errors": c.errors,
            "unavailable": c.unavailable,
        }
        for c in cells
    ]


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
        cmd = module_cmd(
            sys.executable,
            "benchmarks.cells_classic",
            [
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
            ],
        )
        if args.quick:
            cmd.append("--quick")
        try:
            proc = run_module(cmd, 600)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSSPROBE ")]
            if line:
                out[v.key] = json.loads(line[-1][len("RSSPROBE ") :])
            else:
                out[v.key] = {"error": (proc.stderr or proc.stdout)[-300:]}
        except TimeoutExpired:
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


def probe_main(argv: list[str]) -> int:
    """``python -m benchmarks.cells_classic --rss-probe VARIANT ...``: the
    worker of :func:`run_rss_probes` (the same flags as ``python -m
    benchmarks``, which accepts ``--rss-probe`` too)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.cells_classic")
    p.add_argument("--rss-probe", dest="probe_variant", required=True)
    p.add_argument("--db", required=True, choices=["sqlite", "postgresql"])
    p.add_argument("--concurrency", required=True)
    p.add_argument("--pg-url", default=DEFAULT_PG_URL)
    p.add_argument("--sqlite-path", default=DEFAULT_SQLITE_PATH)
    p.add_argument("--quick", action="store_true")
    return rss_probe(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(probe_main(sys.argv[1:]))
