"""The ``fairness`` cells (issue 10): a tight loop under a deadline.

One task loops on ``await conn.execute(text("select 1"))`` inside
``anyio.move_on_after(0.1)`` next to a task sleeping 5 ms in a loop:
deadline overshoot, the sleeper's worst gap, the query rate --
greenlet+aiosqlite, shim+aiosqlite (asyncio), shim-sync+pysqlite (asyncio
and trio).
"""

from __future__ import annotations

import itertools
import traceback
from typing import Any

from ._method import (
    log,
    median,
    perf_counter,
    rotate,
    selected,
)
from ._setup import (
    GroupSizes,
    async_engine,
    use_implementation,
)

# key, kind, driver, backend
FAIRNESS_VARIANTS = [
    ("greenlet+aiosqlite", "greenlet", "sqlite+aiosqlite", "asyncio"),
    ("shim+aiosqlite", "shim", "sqlite+aiosqlite", "asyncio"),
    ("shim-sync+pysqlite", "shim-sync", "sqlite+pysqlite", "asyncio"),
    ("shim-sync+pysqlite", "shim-sync", "sqlite+pysqlite", "trio"),
]
DEADLINE = 0.1
SLEEP = 0.005
HARD_CAP = 3.0  # the query loop gives up by itself after this (a loop that cannot be cancelled)


def fairness_once(kind: str, driver: str, backend: str, args: Any) -> dict[str, Any]:
    import anyio
    from sqlalchemy import text

    use_implementation(kind)

    async def scenario() -> dict[str, Any]:
        engine = async_engine(driver, "sqlite", args)
        try:
            async with engine.connect() as conn:
                for _ in range(50):  # warm: connection, statement cache, worker
                    await conn.execute(text("select 1"))
                wakes: list[float] = []

                async def sleeper() -> None:
                    wakes.append(perf_counter())
                    while True:
                        await anyio.sleep(SLEEP)
                        wakes.append(perf_counter())

                n = 0
                capped = False
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sleeper)
                    await anyio.sleep(0.03)
                    t0 = perf_counter()
                    with anyio.move_on_after(DEADLINE):
                        while True:
                            await conn.execute(text("select 1"))
                            n += 1
                            if perf_counter() - t0 > HARD_CAP:
                                capped = True
                                break
                    t1 = perf_counter()
                    await anyio.sleep(0.03)  # the sleeper wakes at least once after
                    tg.cancel_scope.cancel()
        finally:
            await engine.dispose()
        # gaps between consecutive wake-ups whose interval overlaps [t0, t1]
        gaps = [b - a for a, b in itertools.pairwise(wakes) if b > t0 and a < t1]
        return {
            "overshoot_ms": (t1 - t0 - DEADLINE) * 1000,
            "worst_gap_ms": max(gaps) * 1000 if gaps else float("nan"),
            "sleeper_wakes": sum(1 for w in wakes if t0 < w < t1),
            "queries": n,
            "rate": n / (t1 - t0),
            "hard_cap": capped,
        }

    return anyio.run(scenario, backend=backend)


def run_fairness(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    combos = [c for c in FAIRNESS_VARIANTS if selected(c[0], args)]
    runs: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    t_cell = perf_counter()
    for rnd in range(gs.fairness_rounds):
        for key, kind, driver, backend in rotate(combos, rnd):
            label = f"{key} / {backend}"
            if label in errors:
                continue
            try:
                runs.setdefault(label, []).append(fairness_once(kind, driver, backend, args))
            except Exception as err:
                errors[label] = f"{type(err).__name__}: {err}"[:300]
                log(f"  ERROR fairness {label}: {traceback.format_exc(limit=6)}")
    use_implementation("greenlet")
    summary = {}
    for label, rs in runs.items():
        summary[label] = {
            "overshoot_ms": median([r["overshoot_ms"] for r in rs]),
            "overshoot_max_ms": max(r["overshoot_ms"] for r in rs),
            "worst_gap_ms": median([r["worst_gap_ms"] for r in rs]),
            "worst_gap_max_ms": max(r["worst_gap_ms"] for r in rs),
            "rate": median([r["rate"] for r in rs]),
            "sleeper_wakes": median([r["sleeper_wakes"] for r in rs]),
            "hard_cap_hits": sum(1 for r in rs if r["hard_cap"]),
            "rounds": len(rs),
        }
    for label, e in errors.items():
        failed.append(f"fairness {label}: {e}")
    log(
        f"[fairness] {perf_counter() - t_cell:.1f}s  "
        + "  ".join(
            f"{k}: over={s['overshoot_ms']:.0f}ms gap={s['worst_gap_ms']:.1f}ms {s['rate']:.0f}/s"
            for k, s in summary.items()
        )
    )
    return {
        "summary": summary,
        "errors": errors,
        "deadline_ms": DEADLINE * 1000,
        "sleep_ms": SLEEP * 1000,
        "hard_cap_s": HARD_CAP,
        "order": [f"{c[0]} / {c[3]}" for c in combos],
    }
