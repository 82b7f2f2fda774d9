"""The ``hops`` cells (issue 10): the bare hand-off.

``greenlet_spawn()`` of a function doing 0 or 10 ``await_()`` of a trivial
awaitable, at 1 and 100 tasks: time and context switches per spawn and per
``await_()``.

Context switches (here and in the other hand-off cells) are
``getrusage(RUSAGE_SELF)`` ``ru_nvcsw + ru_nivcsw`` deltas: the whole
process, threads that exited during the measurement included (Linux folds a
dead thread's counts into the process's).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

from ._method import (
    Usage,
    log,
    median,
    perf_counter,
    rotate,
    selected,
)
from ._setup import (
    GroupSizes,
    Variant,
    use_implementation,
)

HOPS_VARIANTS = [
    Variant("greenlet", "greenlet", "", "greenlet"),
    Variant("shim", "shim", "", "greenlet"),
]


async def hops_batch(
    kind: str, tasks: int, spawns: int, awaits: int, awaitable: str
) -> dict[str, Any]:
    use_implementation(kind)
    from sqlalchemy.util import concurrency

    spawn, await_ = concurrency.greenlet_spawn, concurrency.await_

    async def ready() -> None:
        return None

    make: Callable[[], Any] = ready if awaitable == "ready" else (lambda: asyncio.sleep(0))

    def sync_fn() -> None:
        for _ in range(awaits):
            await_(make())

    async def task(n: int) -> None:
        for _ in range(n):
            await spawn(sync_fn)

    await asyncio.gather(*(task(2) for _ in range(tasks)))  # warm: workers started
    gc.collect()
    u0 = Usage.now()
    await asyncio.gather(*(task(spawns) for _ in range(tasks)))
    u = Usage.now().since(u0)
    return dict(u, spawns=tasks * spawns, awaits=tasks * spawns * awaits)


async def run_hops(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    variants = [v for v in HOPS_VARIANTS if selected(v.key, args)]
    cells: list[dict[str, Any]] = []
    t_all = perf_counter()
    for awaitable in ("ready", "sleep0"):
        for tasks in gs.hops_tasks:
            for awaits in (0, gs.hops_awaits):
                spawns = gs.spawns_for(tasks)
                cell: dict[str, Any] = {
                    "awaitable": awaitable,
                    "tasks": tasks,
                    "awaits": awaits,
                    "spawns_per_task": spawns,
                    "runs": {},
                    "errors": {},
                }
                for rnd in range(gs.rounds):
                    for v in rotate(variants, rnd):
                        try:
                            r = await hops_batch(v.kind, tasks, spawns, awaits, awaitable)
                        except Exception as err:
                            cell["errors"][v.key] = f"{type(err).__name__}: {err}"[:300]
                            continue
                        cell["runs"].setdefault(v.key, []).append(r)
                cell["summary"] = {
                    key: {
                        "us_per_spawn": median([r["wall"] / r["spawns"] * 1e6 for r in runs]),
                        "csw_per_spawn": median(
                            [(r["vcsw"] + r["ivcsw"]) / r["spawns"] for r in runs]
                        ),
                        "vcsw_per_spawn": median([r["vcsw"] / r["spawns"] for r in runs]),
                        "cpu_busy": median([r["cpu_s"] / r["wall"] for r in runs]),
                    }
                    for key, runs in cell["runs"].items()
                }
                for key, e in cell["errors"].items():
                    failed.append(f"hops {awaitable} c={tasks} awaits={awaits} {key}: {e}")
                cells.append(cell)
    use_implementation("greenlet")
    # marginal cost of one await_(): (per spawn with N awaits - per spawn with 0) / N
    marginal = []
    for awaitable in ("ready", "sleep0"):
        for tasks in gs.hops_tasks:
            c0 = next(
                (
                    c
                    for c in cells
                    if (c["awaitable"], c["tasks"], c["awaits"]) == (awaitable, tasks, 0)
                ),
                None,
            )
            cn = next(
                (
                    c
                    for c in cells
                    if (c["awaitable"], c["tasks"], c["awaits"])
                    == (awaitable, tasks, gs.hops_awaits)
                ),
                None,
            )
            if not c0 or not cn:
                continue
            row: dict[str, Any] = {"awaitable": awaitable, "tasks": tasks, "by_variant": {}}
            for v in variants:
                a, b = c0["summary"].get(v.key), cn["summary"].get(v.key)
                if not a or not b:
                    continue
                row["by_variant"][v.key] = {
                    "us_per_spawn": a["us_per_spawn"],
                    "csw_per_spawn": a["csw_per_spawn"],
                    "us_per_await": (b["us_per_spawn"] - a["us_per_spawn"]) / gs.hops_awaits,
                    "csw_per_await": (b["csw_per_spawn"] - a["csw_per_spawn"]) / gs.hops_awaits,
                    "vcsw_per_spawn": a["vcsw_per_spawn"],
                    "vcsw_per_await": (b["vcsw_per_spawn"] - a["vcsw_per_spawn"]) / gs.hops_awaits,
                }
            marginal.append(row)
    for row in marginal:
        log(
            f"[hops {row['awaitable']} c={row['tasks']}] "
            + "  ".join(
                f"{k}: spawn {s['us_per_spawn']:.1f}us/{s['csw_per_spawn']:.2f}csw, await_ "
                f"{s['us_per_await']:.1f}us/{s['csw_per_await']:.2f}csw"
                for k, s in row["by_variant"].items()
            )
        )
    log(f"[hops] {perf_counter() - t_all:.1f}s")
    return {"cells": cells, "per_await": marginal, "awaits": gs.hops_awaits}
