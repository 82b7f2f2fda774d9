"""The ``scale`` cells (issue 10): many tasks on a small pool.

N tasks each open an ``AsyncSession`` for one query on a pool of 5
(aiosqlite): wall time, peak OS threads, peak RSS (VmHWM).  A fresh
subprocess per measurement (VmHWM is per process: ``python -m
benchmarks.cells_scale``), greenlet and shim alternating.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
from typing import Any

from ._method import (
    Sampler,
    Usage,
    child_argv,
    child_main,
    int_list,
    log,
    median,
    module_cmd,
    perf_counter,
    read_status,
    rotate,
    run_child,
    selected,
)
from ._setup import (
    GroupSizes,
    async_engine,
    count_items,
    impl_check,
    pair,
    schema,
    use_implementation,
)

SCALE_VARIANTS = pair("sqlite+aiosqlite", "aiosqlite")
SCALE_POOL = 5


def run_scale(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    variants = [v for v in SCALE_VARIANTS if selected(v.key, args)]
    for tasks in int_list(args.scale_tasks) or gs.scale_tasks:
        cell: dict[str, Any] = {"tasks": tasks, "runs": {}, "errors": {}}
        t_cell = perf_counter()
        for rnd in range(gs.scale_rounds):
            for v in rotate(variants, rnd):
                if v.key in cell["errors"]:
                    continue
                res = run_child(
                    module_cmd(
                        sys.executable, "benchmarks.cells_scale", child_argv(v.key, tasks, args, [])
                    ),
                    dict(os.environ),
                    3600.0,
                )
                if "error" in res:
                    cell["errors"][v.key] = res["error"]
                    log(f"  ERROR scale c={tasks} {v.key}: {res['error']}")
                    continue
                cell["runs"].setdefault(v.key, []).append(res)
        cell["summary"] = {
            key: {
                "wall_s": median([r["wall"] for r in runs]),
                "hwm_mb": median([r["hwm_kb"] / 1024 for r in runs]),
                "rss_before_mb": median([r["rss_before_kb"] / 1024 for r in runs]),
                "peak_threads": max(r["peak_threads"] for r in runs),
                "csw": median([r["vcsw"] + r["ivcsw"] for r in runs]),
                "cpu_busy": median([r["cpu_s"] / r["wall"] for r in runs]),
                "rounds": len(runs),
            }
            for key, runs in cell["runs"].items()
        }
        for key, e in cell["errors"].items():
            failed.append(f"scale c={tasks} {key}: {e}")
        cells.append(cell)
        parts = [
            f"{k}={s['wall_s']:.2f}s {s['hwm_mb']:.0f}MB {s['peak_threads']} threads"
            for k, s in cell["summary"].items()
        ]
        log(f"[scale c={tasks}] {perf_counter() - t_cell:.1f}s  " + "  ".join(parts))
    return {"cells": cells, "pool_size": SCALE_POOL}


def child_scale(cargs: Any) -> dict[str, Any]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    v = next(x for x in SCALE_VARIANTS if x.key == cargs.variant)
    use_implementation(v.kind)
    rss_before = read_status()["VmRSS"]
    engine = async_engine(
        v.driver, "sqlite", cargs, pool_size=SCALE_POOL, max_overflow=0, pool_timeout=3600
    )
    Item = schema()[1]
    Session = async_sessionmaker(engine, expire_on_commit=False)
    n_items = count_items(cargs)
    rng = random.Random(7)

    async def one(i: int) -> None:
        async with Session() as s:
            obj = (await s.execute(select(Item).where(Item.id == i))).scalar_one()
        assert obj.id == i

    async def go() -> dict[str, Any]:
        try:
            await impl_check(v, engine)
            await asyncio.gather(*(one(rng.randint(1, n_items)) for _ in range(SCALE_POOL)))
            gc.collect()
            ids = [rng.randint(1, n_items) for _ in range(cargs.tasks)]
            with Sampler(0.005) as sampler:
                u0 = Usage.now()
                await asyncio.gather(*(one(i) for i in ids))
                u = Usage.now().since(u0)
        finally:
            await engine.dispose()
        return dict(
            u,
            hwm_kb=read_status()["VmHWM"],
            rss_before_kb=rss_before,
            peak_threads=sampler.peak_threads,
            peak_py_threads=sampler.peak_py_threads,
        )

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(child_main("python -m benchmarks.cells_scale", child_scale, sys.argv[1:]))
