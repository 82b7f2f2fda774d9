"""The ``cpu`` cells (issue 10, issue 17): CPU-heavy ORM reads.

400 rows materialised per operation at 1 and 8 tasks: greenlet+aiosqlite,
shim+aiosqlite, shim-sync+pysqlite (``install()``'s defaults: the parallel
mode on a free-threaded build) and shim+aiosqlite under ``PYTHON_GIL=1``
(where the default blocks as greenlet does); the shim's two in the atomic
mode (``install(parallel=False)``, the default until 2026-12-05); and plain
sync SQLAlchemy, a ``Session`` per operation on N
threads -- what the machine's cores give this workload with no event loop
at all, the limit the parallel mode is measured against.  Meant for a
free-threaded interpreter (``--cpu-python`` or ``BENCH_CPU_PYTHON``); a
subprocess per measurement (``python -m benchmarks.cells_cpu``, from the
checkout's root), because ``PYTHON_GIL`` is read at start-up, so every
variant gets the same treatment.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import subprocess
import sys
from typing import Any

from ._method import (
    Usage,
    child_argv,
    child_env,
    child_main,
    int_list,
    interpreter_info,
    log,
    median,
    module_cmd,
    pct,
    perf_counter,
    rotate,
    run_child,
    selected,
)
from ._setup import (
    GroupSizes,
    Unavailable,
    Variant,
    async_engine,
    count_items,
    impl_check,
    schema,
    use_implementation,
)

# key -> (kind, driver, extra environment)
CPU_VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "greenlet+aiosqlite": ("greenlet", "sqlite+aiosqlite", {}),
    "shim+aiosqlite": ("shim", "sqlite+aiosqlite", {}),
    "shim-sync+pysqlite": ("shim-sync", "sqlite+pysqlite", {}),
    "shim+aiosqlite PYTHON_GIL=1": ("shim", "sqlite+aiosqlite", {"PYTHON_GIL": "1"}),
    "shim+aiosqlite atomic": ("shim", "sqlite+aiosqlite", {"BENCH_SHIM_PARALLEL": "off"}),
    "shim-sync+pysqlite atomic": ("shim-sync", "sqlite+pysqlite", {"BENCH_SHIM_PARALLEL": "off"}),
    "sync threads+pysqlite": ("plain", "sqlite+pysqlite", {}),
}
CPU_BASELINE = "greenlet+aiosqlite"

# ``--cpu-db postgresql`` (issue 18): the same reads over asyncpg, each
# against greenlet+asyncpg -- the hand-off (``install()``'s defaults) and
# driver loops (the driver's coroutines in the worker: on a free-threaded
# build the driver's own Python code runs on the worker's core too)
CPU_PG_VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "greenlet+asyncpg": ("greenlet", "postgresql+asyncpg", {}),
    "shim+asyncpg": ("shim", "postgresql+asyncpg", {}),
    "shim-loops+asyncpg": ("shim-loops", "postgresql+asyncpg", {}),
}


def cpu_variants(db: str) -> dict[str, tuple[str, str, dict[str, str]]]:
    """The cpu variants on ``db`` (``--cpu-db``)."""
    return CPU_PG_VARIANTS if db == "postgresql" else CPU_VARIANTS


def cpu_python(args: Any) -> str:
    return str(args.cpu_python or os.environ.get("BENCH_CPU_PYTHON") or sys.executable)


def run_cpu(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    python = cpu_python(args)
    env = dict(os.environ)
    env.pop("PYTHON_GIL", None)
    env = child_env(python, env)  # another interpreter: PYTHONPATH
    info_proc = subprocess.run(
        [
            python,
            "-c",
            (
                "import sys, sysconfig, json; print(json.dumps([sys.version.split()[0], "
                "bool(sysconfig.get_config_var('Py_GIL_DISABLED')), "
                "getattr(sys, '_is_gil_enabled', lambda: True)()]))"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    try:
        ver, ft, gil = json.loads(info_proc.stdout)
    except ValueError:
        failed.append(f"cpu: cannot run {python}: {info_proc.stderr[-300:]}")
        return {"cells": [], "python": python}
    label = f"CPython {ver}{'t (free-threaded build)' if ft else ' (GIL build)'}"
    log(f"[cpu] interpreter: {python}: {label}")
    variants = cpu_variants(args.cpu_db)
    keys = [k for k in variants if selected(k, args)]
    cells: list[dict[str, Any]] = []
    for tasks in int_list(args.cpu_tasks) or gs.cpu_tasks:
        ops = gs.cpu_ops_for(tasks)
        cell: dict[str, Any] = {
            "tasks": tasks,
            "ops_per_task": ops,
            "rows": gs.cpu_rows,
            "runs": {},
            "errors": {},
        }
        t_cell = perf_counter()
        for rnd in range(gs.rounds):
            for key in rotate(keys, rnd):
                if key in cell["errors"]:
                    continue
                cenv = dict(env, **variants[key][2])
                res = run_child(
                    module_cmd(
                        python,
                        "benchmarks.cells_cpu",
                        child_argv(
                            key, tasks, args, ["--ops", str(ops), "--rows", str(gs.cpu_rows)]
                        ),
                    ),
                    cenv,
                    900.0,
                )
                if "error" in res or "unavailable" in res:
                    cell["errors"][key] = res.get("error") or "unavailable: " + res["unavailable"]
                    log(f"  ERROR cpu c={tasks} {key}: {cell['errors'][key]}")
                    continue
                cell["runs"].setdefault(key, []).append(res)
        cell["summary"] = {
            key: {
                "ops_per_s": median([r["ops_per_s"] for r in runs]),
                "p50_ms": median([r["p50_us"] / 1000 for r in runs]),
                "p99_ms": median([r["p99_us"] / 1000 for r in runs]),
                "cpu_busy": median([r["cpu_s"] / r["wall"] for r in runs]),
                "csw_per_op": median([(r["vcsw"] + r["ivcsw"]) / r["ops"] for r in runs]),
                "vcsw_per_op": median([r["vcsw"] / r["ops"] for r in runs]),
                "gil_enabled": runs[0]["interpreter"]["gil_enabled"],
                "rounds": len(runs),
            }
            for key, runs in cell["runs"].items()
        }
        for key, e in cell["errors"].items():
            failed.append(f"cpu c={tasks} {key}: {e}")
        cells.append(cell)
        parts = [
            f"{k}={s['ops_per_s']:.0f}/s busy={s['cpu_busy']:.2f}"
            for k, s in cell["summary"].items()
        ]
        log(f"[cpu c={tasks}] {perf_counter() - t_cell:.1f}s  " + "  ".join(parts))
    return {
        "cells": cells,
        "python": python,
        "db": args.cpu_db,
        "interpreter": label,
        "free_threaded_build": ft,
        "gil_enabled_by_default": gil,
    }


def _window(Item: Any, start: int, rows: int) -> Any:
    """The cell's one statement, the same for the bridge and for plain
    threads: ``rows`` consecutive ORM rows from ``start``."""
    from sqlalchemy import select

    return select(Item).where(Item.id >= start).order_by(Item.id).limit(rows)


def child_cpu(cargs: Any) -> dict[str, Any]:
    kind, driver, _ = {**CPU_VARIANTS, **CPU_PG_VARIANTS}[cargs.variant]
    db = "sqlite" if driver.startswith("sqlite") else "postgresql"
    try:
        use_implementation(kind)
    except Unavailable as err:
        return {"unavailable": str(err)}
    v = Variant(cargs.variant, kind, driver, "greenlet+" + driver.split("+")[1])
    tasks, ops, rows = cargs.tasks, cargs.ops, cargs.rows
    if kind == "plain":
        return _child_cpu_threads(cargs, tasks, ops, rows)
    # only now: without greenlet (3.13t) SQLAlchemy's asyncio extension
    # imports only once install() has run
    from sqlalchemy import func, select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    engine = async_engine(driver, db, cargs, pool_size=tasks, max_overflow=0, pool_timeout=600)
    Item = schema()[1]
    Session = async_sessionmaker(engine, expire_on_commit=False)
    n_items = count_items(cargs) if db == "sqlite" else 0
    rng = random.Random(11)

    async def op(lat: list[float] | None) -> None:
        start = rng.randint(1, n_items - rows + 1)
        t = perf_counter()
        async with Session() as s:
            objs = (await s.execute(_window(Item, start, rows))).scalars().all()
        if lat is not None:
            lat.append(perf_counter() - t)
        assert len(objs) == rows, len(objs)

    async def worker(n: int, lat: list[float] | None) -> None:
        for _ in range(n):
            await op(lat)

    async def go() -> dict[str, Any]:
        nonlocal n_items
        try:
            if db != "sqlite":
                async with engine.connect() as conn:
                    n_items = (await conn.execute(select(func.count()).select_from(Item))).scalar()
            if n_items < rows:
                raise RuntimeError(f"bench_items has {n_items} rows, the cpu cell needs {rows}")
            await impl_check(v, engine)
            await asyncio.gather(*(worker(2, None) for _ in range(tasks)))
            gc.collect()
            lat: list[float] = []
            u0 = Usage.now()
            await asyncio.gather(*(worker(ops, lat) for _ in range(tasks)))
            u = Usage.now().since(u0)
        finally:
            await engine.dispose()
        n = tasks * ops
        return dict(
            u,
            ops=n,
            ops_per_s=n / u["wall"],
            p50_us=pct(lat, 0.5) * 1e6,
            p99_us=pct(lat, 0.99) * 1e6,
            interpreter=interpreter_info(),
        )

    return asyncio.run(go())


def _child_cpu_threads(cargs: Any, tasks: int, ops: int, rows: int) -> dict[str, Any]:
    """The same operations in plain sync SQLAlchemy: N threads, a Session
    per operation, pool_size N (no event loop, no bridge)."""
    import threading

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ._setup import url_for

    engine = create_engine(
        url_for("sqlite", "sqlite+pysqlite", cargs),
        pool_size=tasks,
        max_overflow=0,
        pool_timeout=600,
        connect_args={"timeout": 60, "check_same_thread": False},
    )
    Item = schema()[1]
    Session = sessionmaker(engine, expire_on_commit=False)
    n_items = count_items(cargs)
    if n_items < rows:
        raise RuntimeError(f"bench_items has {n_items} rows, the cpu cell needs {rows}")
    errors: list[BaseException] = []

    def worker(n: int, lat: list[float] | None, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(n):
                start = rng.randint(1, n_items - rows + 1)
                t = perf_counter()
                with Session() as s:
                    objs = s.execute(_window(Item, start, rows)).scalars().all()
                if lat is not None:
                    lat.append(perf_counter() - t)
                assert len(objs) == rows, len(objs)
        except BaseException as err:  # reported, never lost
            errors.append(err)

    def run(n: int, lat: list[float] | None) -> None:
        threads = [threading.Thread(target=worker, args=(n, lat, 11 + i)) for i in range(tasks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    try:
        run(2, None)
        gc.collect()
        lat: list[float] = []  # list.append is atomic, on free-threaded builds too
        u0 = Usage.now()
        run(ops, lat)
        u = Usage.now().since(u0)
    finally:
        engine.dispose()
    n = tasks * ops
    return dict(
        u,
        ops=n,
        ops_per_s=n / u["wall"],
        p50_us=pct(lat, 0.5) * 1e6,
        p99_us=pct(lat, 0.99) * 1e6,
        interpreter=interpreter_info(),
    )


if __name__ == "__main__":
    sys.exit(child_main("python -m benchmarks.cells_cpu", child_cpu, sys.argv[1:]))
