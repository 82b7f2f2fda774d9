"""The ``reuse`` cells (issues 10 and 17): one session per task, K selects.

Each task opens ONE ``AsyncSession`` and runs K ORM selects by primary key
(pool 20) -- asyncpg, psycopg_async, aiosqlite at 1 / 100 / 1,000 tasks:
ops/s, p50, p99, context switches per select, ``await_()`` calls per
select (an untimed pass through :class:`~benchmarks._method.HopCounter`).
In-process, greenlet and shim alternating round by round.

Each async driver is also measured with ``install(driver_loops=True)``
(``shim-loops+...``, issue 18: the driver's coroutines on a loop of the
connection's own, in the worker).

The sync-driver cells (issue 17: psycopg, pysqlite) have the same shape
with the sync driver: ``shim-sync`` (an ``AsyncSession`` over
``install(sync_drivers=True)``) against ``to_thread`` (a sync ``Session``
per task, each select and the close one ``anyio.to_thread.run_sync()``):
the same two thread hops per call, so the ratio is the shim's own cost.
"""

from __future__ import annotations

import asyncio
import gc
import random
import traceback
from typing import Any

from ._method import (
    HopCounter,
    Usage,
    int_list,
    log,
    median,
    pct,
    perf_counter,
    rotate,
    selected,
)
from ._setup import (
    GroupSizes,
    Sizes,
    Variant,
    async_engine,
    impl_check,
    pair,
    schema,
    url_for,
    use_implementation,
    with_driver_loops,
)


def _sync_pair(driver: str, name: str) -> list[Variant]:
    """``to_thread`` (the baseline) and the shim on one sync driver."""
    t = f"to_thread+{name}"
    return [
        Variant(t, "to_thread", driver, t),
        Variant(f"shim-sync+{name}", "shim-sync", driver, t),
    ]


# (database, driver name, variants: the first is the baseline)
REUSE_DRIVERS = [
    (
        "postgresql",
        "asyncpg",
        with_driver_loops(pair("postgresql+asyncpg", "asyncpg"), "postgresql+asyncpg", "asyncpg"),
    ),
    (
        "postgresql",
        "psycopg_async",
        with_driver_loops(
            pair("postgresql+psycopg_async", "psycopg_async"),
            "postgresql+psycopg_async",
            "psycopg_async",
        ),
    ),
    (
        "sqlite",
        "aiosqlite",
        with_driver_loops(pair("sqlite+aiosqlite", "aiosqlite"), "sqlite+aiosqlite", "aiosqlite"),
    ),
    ("postgresql", "psycopg", _sync_pair("postgresql+psycopg", "psycopg")),
    ("sqlite", "pysqlite", _sync_pair("sqlite+pysqlite", "pysqlite")),
]
REUSE_POOL = 20


async def reuse_batch(
    v: Variant,
    db: str,
    tasks: int,
    k: int,
    args: Any,
    sizes: Sizes,
    rng: random.Random,
    timeout: float,
    count: bool = False,
) -> dict[str, Any]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    use_implementation(v.kind)
    if v.kind == "to_thread":
        return await _to_thread_batch(v, db, tasks, k, args, sizes, rng, timeout, count)
    engine = async_engine(
        v.driver, db, args, pool_size=REUSE_POOL, max_overflow=0, pool_timeout=600
    )
    try:
        Item = schema()[1]
        Session = async_sessionmaker(engine, expire_on_commit=False)
        await impl_check(v, engine)
        ids = [rng.randint(1, sizes.items) for _ in range(tasks * k + tasks)]

        async def task(j: int, n: int, base: int, lat: list[float] | None) -> None:
            async with Session() as s:
                for m in range(n):
                    i = ids[base + j * n + m]
                    t = perf_counter()
                    obj = (await s.execute(select(Item).where(Item.id == i))).scalar_one()
                    if lat is not None:
                        lat.append(perf_counter() - t)
                        if m:
                            rest.append(lat[-1])
                    assert obj.id == i

        # selects after the first of a session: no wait for a pool connection
        rest: list[float] = []
        return await _timed(task, rest, tasks, k, timeout, count)
    finally:
        await engine.dispose()


async def _to_thread_batch(
    v: Variant,
    db: str,
    tasks: int,
    k: int,
    args: Any,
    sizes: Sizes,
    rng: random.Random,
    timeout: float,
    count: bool,
) -> dict[str, Any]:
    """The baseline of the sync-driver cells: what an application without
    the shim writes -- a sync ``Session`` per task, every call one
    ``to_thread.run_sync()`` (anyio's default limiter, 40 threads)."""
    import anyio
    import anyio.to_thread
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    kw: dict[str, Any] = {"connect_args": {"timeout": 60}} if db == "sqlite" else {}
    engine = create_engine(
        url_for(db, v.driver, args), pool_size=REUSE_POOL, max_overflow=0, pool_timeout=600, **kw
    )
    run_sync = anyio.to_thread.run_sync
    try:
        Item = schema()[1]
        Session = sessionmaker(engine, expire_on_commit=False)
        ids = [rng.randint(1, sizes.items) for _ in range(tasks * k + tasks)]

        def one(s: Any, i: int) -> Any:
            return s.execute(select(Item).where(Item.id == i)).scalar_one()

        # Sessions admitted pool_size at a time.  Without this, to_thread
        # deadlocks in this shape once tasks outnumber anyio's 40 threads
        # and the pool: tasks waiting for a connection block in the pool's
        # checkout on every thread, and the holders cannot get one to run
        # their next select and return theirs (measured: 100 tasks, pool 20,
        # no progress until pool_timeout).  The shim's gate does the same
        # admission by itself; the wait counts in the first select's latency
        # as the pool wait does for the shim.
        admit = anyio.Semaphore(REUSE_POOL)

        async def task(j: int, n: int, base: int, lat: list[float] | None) -> None:
            t_admit = perf_counter()
            async with admit:
                s = Session()
                try:
                    for m in range(n):
                        i = ids[base + j * n + m]
                        t = t_admit if m == 0 else perf_counter()
                        obj = await run_sync(one, s, i)
                        if lat is not None:
                            lat.append(perf_counter() - t)
                            if m:
                                rest.append(lat[-1])
                        assert obj.id == i
                finally:
                    await run_sync(s.close)

        rest: list[float] = []
        return await _timed(task, rest, tasks, k, timeout, count)
    finally:
        engine.dispose()


async def _timed(
    task: Any, rest: list[float], tasks: int, k: int, timeout: float, count: bool
) -> dict[str, Any]:
    """Warm up, then run ``tasks`` x ``task(j, k, ...)`` timed."""
    # warm-up: one select per task (fills the pool, starts the threads)
    await asyncio.wait_for(
        asyncio.gather(*(task(j, 1, tasks * k, None) for j in range(tasks))), timeout
    )
    gc.collect()
    lat: list[float] = []
    counter = HopCounter() if count else None
    if counter:
        counter.__enter__()
    try:
        u0 = Usage.now()
        await asyncio.wait_for(asyncio.gather(*(task(j, k, 0, lat) for j in range(tasks))), timeout)
        u = Usage.now().since(u0)
    finally:
        if counter:
            counter.__exit__()
    n = tasks * k
    out: dict[str, Any] = dict(
        u,
        ops=n,
        ops_per_s=n / u["wall"],
        p50_us=pct(lat, 0.5) * 1e6,
        p99_us=pct(lat, 0.99) * 1e6,
        p99_rest_us=pct(rest, 0.99) * 1e6,
    )
    if counter:
        out["awaits"] = counter.awaits
        out["spawns"] = counter.spawns
    return out


async def run_reuse(
    args: Any, gs: GroupSizes, sizes: Sizes, dbs: list[str], failed: list[str]
) -> dict[str, Any]:
    rng = random.Random(4321)
    timeout = 120.0 if args.quick else 900.0
    cells: list[dict[str, Any]] = []
    tasks_list = int_list(args.reuse_tasks) or gs.reuse_tasks
    for db, name, all_variants in REUSE_DRIVERS:
        if db not in dbs:
            continue
        variants = [v for v in all_variants if selected(v.key, args)]
        if not variants:
            continue
        for tasks in tasks_list:
            k = gs.reuse_k_for(tasks)
            cell: dict[str, Any] = {
                "driver": name,
                "db": db,
                "tasks": tasks,
                "k": k,
                "variants": [v.key for v in all_variants],  # the first is the baseline
                "runs": {},
                "errors": {},
                "awaits_per_op": {},
                "spawns_per_op": {},
            }
            t_cell = perf_counter()
            log(f"[reuse {name} c={tasks} k={k}] started")  # loop_profile.py waits for this
            for rnd in range(gs.rounds):
                for v in rotate(variants, rnd):
                    if v.key in cell["errors"]:
                        continue
                    try:
                        r = await reuse_batch(v, db, tasks, k, args, sizes, rng, timeout)
                    except Exception as err:
                        cell["errors"][v.key] = f"{type(err).__name__}: {err}"[:300]
                        log(
                            f"  ERROR reuse {name} c={tasks} {v.key}: "
                            f"{traceback.format_exc(limit=6)}"
                        )
                        continue
                    cell["runs"].setdefault(v.key, []).append(r)
            if tasks <= gs.count_max_tasks:
                # an untimed pass through a counting await_ (same shape, k <= 20)
                for v in variants:
                    if v.key in cell["errors"]:
                        continue
                    try:
                        kc = min(k, 20)
                        r = await reuse_batch(
                            v, db, tasks, kc, args, sizes, rng, timeout, count=True
                        )
                        cell["awaits_per_op"][v.key] = r["awaits"] / r["ops"]
                        cell["spawns_per_op"][v.key] = r["spawns"] / r["ops"]
                    except Exception as err:
                        cell["errors"][v.key + " (await_ count)"] = f"{type(err).__name__}: {err}"[
                            :300
                        ]
            cell["summary"] = {key: _summarise(runs) for key, runs in cell["runs"].items()}
            for key, e in cell["errors"].items():
                failed.append(f"reuse {name} c={tasks} {key}: {e}")
            cells.append(cell)
            log(
                f"[reuse {name} c={tasks} k={k}] {perf_counter() - t_cell:.1f}s  "
                + _line(cell, variants)
            )
    use_implementation("greenlet")
    return {"cells": cells, "pool_size": REUSE_POOL}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ops = runs[0]["ops"]
    return {
        "ops_per_s": median([r["ops_per_s"] for r in runs]),
        "p50_us": median([r["p50_us"] for r in runs]),
        "p99_us": median([r["p99_us"] for r in runs]),
        "p99_rest_us": median([r["p99_rest_us"] for r in runs]),
        "csw_per_op": median([(r["vcsw"] + r["ivcsw"]) / r["ops"] for r in runs]),
        "vcsw_per_op": median([r["vcsw"] / r["ops"] for r in runs]),
        "ivcsw_per_op": median([r["ivcsw"] / r["ops"] for r in runs]),
        "cpu_busy": median([r["cpu_s"] / r["wall"] for r in runs]),
        "rounds": len(runs),
        "ops": ops,
    }


def _line(cell: dict[str, Any], variants: list[Variant]) -> str:
    parts = []
    for v in variants:
        s = cell["summary"].get(v.key)
        if not s:
            parts.append(f"{v.key}=ERROR" if v.key in cell["errors"] else f"{v.key}=–")
            continue
        b = cell["summary"].get(v.baseline)
        ratio = f" ({s['ops_per_s'] / b['ops_per_s']:.2f}x)" if b and v.key != v.baseline else ""
        parts.append(
            f"{v.key}={s['ops_per_s']:.0f}/s{ratio} p99={s['p99_us']:.0f}us "
            f"csw/op={s['csw_per_op']:.1f}"
        )
    return "  ".join(parts)
