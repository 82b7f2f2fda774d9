"""The hand-off cells (issue 10): what the thread bridge costs under load.

Loaded by ``bench.py`` (``--cells reuse,scale,cpu,fairness,hops``); it also
runs as a child process (``python bench_cells.py --child scale|cpu ...``) for
the cells that need a fresh process per measurement.

Groups
------
``reuse``     each task opens ONE ``AsyncSession`` and runs K ORM selects by
              primary key (pool 20) -- asyncpg, psycopg_async, aiosqlite at
              1 / 100 / 1,000 tasks: ops/s, p50, p99, context switches per
              select, ``await_()`` calls per select.  In-process, greenlet and
              shim alternating round by round.
``scale``     N tasks each open an ``AsyncSession`` for one query on a pool of
              5 (aiosqlite): wall time, peak OS threads, peak RSS (VmHWM).  A
              fresh subprocess per measurement (VmHWM is per process),
              greenlet and shim alternating.
``cpu``       CPU-heavy ORM reads (400 rows materialised per operation) at 1
              and 8 tasks: greenlet+aiosqlite, shim+aiosqlite,
              shim-sync+pysqlite and shim+aiosqlite under ``PYTHON_GIL=1``.
              Meant for a free-threaded interpreter (``--cpu-python``); a
              subprocess per measurement, because ``PYTHON_GIL`` is read at
              start-up, so every variant gets the same treatment.
``fairness``  one task loops on ``await conn.execute(text("select 1"))``
              inside ``anyio.move_on_after(0.1)`` next to a task sleeping
              5 ms in a loop: deadline overshoot, the sleeper's worst gap,
              the query rate -- greenlet+aiosqlite, shim+aiosqlite (asyncio),
              shim-sync+pysqlite (asyncio and trio).
``hops``      the bare hand-off: ``greenlet_spawn()`` of a function doing 0
              or 10 ``await_()`` of a trivial awaitable, at 1 and 100 tasks:
              time and context switches per spawn and per ``await_()``.

Context switches are ``getrusage(RUSAGE_SELF)`` ``ru_nvcsw + ru_nivcsw``
deltas: the whole process, threads that exited during the measurement
included (Linux folds a dead thread's counts into the process's).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench as core  # noqa: E402  (bench.py registers itself under this name)

perf_counter = time.perf_counter

GROUPS = ("reuse", "scale", "cpu", "fairness", "hops")


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------


@dataclass
class GroupSizes:
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


FULL = GroupSizes(
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
QUICK = GroupSizes(
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
# measuring helpers
# ---------------------------------------------------------------------------


@dataclass
class Usage:
    """Process-wide counters at one instant."""

    t: float
    vcsw: int
    ivcsw: int
    cpu: float

    @classmethod
    def now(cls) -> Usage:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return cls(perf_counter(), r.ru_nvcsw, r.ru_nivcsw, r.ru_utime + r.ru_stime)

    def since(self, start: Usage) -> dict[str, float]:
        wall = self.t - start.t
        return {
            "wall": wall,
            "vcsw": self.vcsw - start.vcsw,
            "ivcsw": self.ivcsw - start.ivcsw,
            "cpu_s": self.cpu - start.cpu,
        }


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def interpreter_info() -> dict[str, Any]:
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    ft = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "free_threaded_build": ft,
        "gil_enabled": bool(gil),
        "label": f"CPython {sys.version.split()[0]}{'t (free-threaded build)' if ft else ''}, "
        f"GIL {'enabled' if gil else 'disabled'}",
    }


def log(msg: str) -> None:
    print(msg, flush=True)


def _selected(key: str, args: Any) -> bool:
    pats = [p for p in (getattr(args, "variants", None) or "").split(",") if p]
    return not pats or any(p in key for p in pats)


def _rotate(xs: list[Any], rnd: int) -> list[Any]:
    if not xs:
        return xs
    k = rnd % len(xs)
    return xs[k:] + xs[:k]


class HopCounter:
    """Counts ``greenlet_spawn()`` and ``await_()`` calls made through
    SQLAlchemy's names for them: the hops between the task and the sync code.

    SQLAlchemy 2.1 binds both by name in each module that uses them
    (``from ...util.concurrency import await_``); every ``sqlalchemy.*``
    module global that *is* the current function is swapped for a counting
    wrapper and swapped back afterwards.  Only used in an untimed pass.  Hops
    a bridge makes without these names (its own pool waits, say) are not
    counted.
    """

    def __init__(self) -> None:
        self.awaits = 0
        self.spawns = 0
        self._lock = threading.Lock()
        self._swapped: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> HopCounter:
        from sqlalchemy.util import concurrency

        orig_await, orig_spawn = concurrency.await_, concurrency.greenlet_spawn

        def counting_await(awaitable: Any) -> Any:
            with self._lock:
                self.awaits += 1
            return orig_await(awaitable)

        async def counting_spawn(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.spawns += 1
            return await orig_spawn(*args, **kwargs)

        swap = {id(orig_await): counting_await, id(orig_spawn): counting_spawn}
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == "sqlalchemy" or name.startswith("sqlalchemy.")):
                continue
            for attr, val in list(vars(mod).items()):
                if val is orig_await or val is orig_spawn:
                    setattr(mod, attr, swap[id(val)])
                    self._swapped.append((mod, attr, val))
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, attr, orig in reversed(self._swapped):
            setattr(mod, attr, orig)
        self._swapped.clear()


def _async_engine(driver: str, db: str, args: Any, **kw: Any) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    if db == "sqlite":
        kw.setdefault("connect_args", {"timeout": 60})
    return create_async_engine(core.url_for(db, driver, args), **kw)


# ---------------------------------------------------------------------------
# reuse: one AsyncSession per task, K selects by primary key
# ---------------------------------------------------------------------------

REUSE_DRIVERS = [
    ("postgresql", "postgresql+asyncpg", "asyncpg"),
    ("postgresql", "postgresql+psycopg_async", "psycopg_async"),
    ("sqlite", "sqlite+aiosqlite", "aiosqlite"),
]
REUSE_POOL = 20


def _pair(driver: str, name: str) -> list[core.Variant]:
    g = f"greenlet+{name}"
    return [core.Variant(g, "greenlet", driver, g), core.Variant(f"shim+{name}", "shim", driver, g)]


async def reuse_batch(
    v: core.Variant,
    db: str,
    tasks: int,
    k: int,
    args: Any,
    sizes: core.Sizes,
    rng: random.Random,
    timeout: float,
    count: bool = False,
) -> dict[str, Any]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    core.use_implementation(v.kind)
    engine = _async_engine(
        v.driver, db, args, pool_size=REUSE_POOL, max_overflow=0, pool_timeout=600
    )
    try:
        Item = core.schema()[1]
        Session = async_sessionmaker(engine, expire_on_commit=False)
        await core._impl_check(v, engine)
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
            await asyncio.wait_for(
                asyncio.gather(*(task(j, k, 0, lat) for j in range(tasks))), timeout
            )
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
    finally:
        await engine.dispose()


async def run_reuse(
    args: Any, gs: GroupSizes, sizes: core.Sizes, dbs: list[str], failed: list[str]
) -> dict[str, Any]:
    rng = random.Random(4321)
    timeout = 120.0 if args.quick else 900.0
    cells: list[dict[str, Any]] = []
    tasks_list = _int_list(args.reuse_tasks) or gs.reuse_tasks
    for db, driver, name in REUSE_DRIVERS:
        if db not in dbs:
            continue
        variants = [v for v in _pair(driver, name) if _selected(v.key, args)]
        for tasks in tasks_list:
            k = gs.reuse_k_for(tasks)
            cell: dict[str, Any] = {
                "driver": name,
                "db": db,
                "tasks": tasks,
                "k": k,
                "runs": {},
                "errors": {},
                "awaits_per_op": {},
                "spawns_per_op": {},
            }
            t_cell = perf_counter()
            log(f"[reuse {name} c={tasks} k={k}] started")  # loop_profile.py waits for this
            for rnd in range(gs.rounds):
                for v in _rotate(variants, rnd):
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
    core.use_implementation("greenlet")
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


def _line(cell: dict[str, Any], variants: list[core.Variant]) -> str:
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


# ---------------------------------------------------------------------------
# subprocess children (scale, cpu)
# ---------------------------------------------------------------------------


def _child_cmd(
    python: str, kind: str, variant: str, tasks: int, args: Any, extra: list[str]
) -> list[str]:
    return [
        python,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--variant",
        variant,
        "--tasks",
        str(tasks),
        "--sqlite-path",
        args.sqlite_path,
        *extra,
    ]


def _run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if lines:
        return json.loads(lines[-1][len("CHILD ") :])  # type: ignore[no-any-return]
    return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-400:]}


SCALE_VARIANTS = _pair("sqlite+aiosqlite", "aiosqlite")
SCALE_POOL = 5


def run_scale(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    cells: list[dict[str, Any]] = []
    variants = [v for v in SCALE_VARIANTS if _selected(v.key, args)]
    for tasks in _int_list(args.scale_tasks) or gs.scale_tasks:
        cell: dict[str, Any] = {"tasks": tasks, "runs": {}, "errors": {}}
        t_cell = perf_counter()
        for rnd in range(gs.scale_rounds):
            for v in _rotate(variants, rnd):
                if v.key in cell["errors"]:
                    continue
                res = _run_child(
                    _child_cmd(sys.executable, "scale", v.key, tasks, args, []),
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
    core.use_implementation(v.kind)
    rss_before = core.read_status()["VmRSS"]
    engine = _async_engine(
        v.driver, "sqlite", cargs, pool_size=SCALE_POOL, max_overflow=0, pool_timeout=3600
    )
    Item = core.schema()[1]
    Session = async_sessionmaker(engine, expire_on_commit=False)
    n_items = _count_items(cargs)
    rng = random.Random(7)

    async def one(i: int) -> None:
        async with Session() as s:
            obj = (await s.execute(select(Item).where(Item.id == i))).scalar_one()
        assert obj.id == i

    async def go() -> dict[str, Any]:
        try:
            await core._impl_check(v, engine)
            await asyncio.gather(*(one(rng.randint(1, n_items)) for _ in range(SCALE_POOL)))
            gc.collect()
            ids = [rng.randint(1, n_items) for _ in range(cargs.tasks)]
            with core.Sampler(0.005) as sampler:
                u0 = Usage.now()
                await asyncio.gather(*(one(i) for i in ids))
                u = Usage.now().since(u0)
        finally:
            await engine.dispose()
        return dict(
            u,
            hwm_kb=core.read_status()["VmHWM"],
            rss_before_kb=rss_before,
            peak_threads=sampler.peak_threads,
            peak_py_threads=sampler.peak_py_threads,
        )

    return asyncio.run(go())


def _count_items(cargs: Any) -> int:
    import sqlite3

    con = sqlite3.connect(cargs.sqlite_path)
    try:
        return int(con.execute("select count(*) from bench_items").fetchone()[0])
    finally:
        con.close()


# -- cpu: CPU-heavy ORM reads -------------------------------------------------

# key -> (kind, driver, extra environment)
CPU_VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "greenlet+aiosqlite": ("greenlet", "sqlite+aiosqlite", {}),
    "shim+aiosqlite": ("shim", "sqlite+aiosqlite", {}),
    "shim-sync+pysqlite": ("shim-sync", "sqlite+pysqlite", {}),
    "shim+aiosqlite PYTHON_GIL=1": ("shim", "sqlite+aiosqlite", {"PYTHON_GIL": "1"}),
}
CPU_BASELINE = "greenlet+aiosqlite"


def cpu_python(args: Any) -> str:
    return str(args.cpu_python or os.environ.get("BENCH_CPU_PYTHON") or sys.executable)


def run_cpu(args: Any, gs: GroupSizes, failed: list[str]) -> dict[str, Any]:
    python = cpu_python(args)
    env = dict(os.environ)
    env.pop("PYTHON_GIL", None)
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        # another interpreter (its own venv): let it import the package this
        # process measures -- unless that is installed in this interpreter's
        # site-packages (whose compiled packages are not the child's): then
        # this checkout's
        import sqla_anyio_shim

        where = os.path.dirname(os.path.dirname(os.path.abspath(sqla_anyio_shim.__file__)))
        if "site-packages" in where:
            where = os.path.dirname(HERE)
        env["PYTHONPATH"] = where + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
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
    keys = [k for k in CPU_VARIANTS if _selected(k, args)]
    cells: list[dict[str, Any]] = []
    for tasks in _int_list(args.cpu_tasks) or gs.cpu_tasks:
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
            for key in _rotate(keys, rnd):
                if key in cell["errors"]:
                    continue
                cenv = dict(env, **CPU_VARIANTS[key][2])
                res = _run_child(
                    _child_cmd(
                        python,
                        "cpu",
                        key,
                        tasks,
                        args,
                        ["--ops", str(ops), "--rows", str(gs.cpu_rows)],
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
        "interpreter": label,
        "free_threaded_build": ft,
        "gil_enabled_by_default": gil,
    }


def child_cpu(cargs: Any) -> dict[str, Any]:
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    kind, driver, _ = CPU_VARIANTS[cargs.variant]
    try:
        core.use_implementation(kind)
    except core.Unavailable as err:
        return {"unavailable": str(err)}
    v = core.Variant(cargs.variant, kind, driver, CPU_BASELINE)
    tasks, ops, rows = cargs.tasks, cargs.ops, cargs.rows
    engine = _async_engine(
        driver, "sqlite", cargs, pool_size=tasks, max_overflow=0, pool_timeout=600
    )
    Item = core.schema()[1]
    Session = async_sessionmaker(engine, expire_on_commit=False)
    n_items = _count_items(cargs)
    if n_items < rows:
        raise RuntimeError(f"bench_items has {n_items} rows, the cpu cell needs {rows}")
    rng = random.Random(11)

    async def op(lat: list[float] | None) -> None:
        start = rng.randint(1, n_items - rows + 1)
        t = perf_counter()
        async with Session() as s:
            objs = (
                (
                    await s.execute(
                        select(Item).where(Item.id >= start).order_by(Item.id).limit(rows)
                    )
                )
                .scalars()
                .all()
            )
        if lat is not None:
            lat.append(perf_counter() - t)
        assert len(objs) == rows, len(objs)

    async def worker(n: int, lat: list[float] | None) -> None:
        for _ in range(n):
            await op(lat)

    async def go() -> dict[str, Any]:
        try:
            await core._impl_check(v, engine)
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


# ---------------------------------------------------------------------------
# fairness: a tight select-1 loop under a deadline, next to a 5 ms sleeper
# ---------------------------------------------------------------------------

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

    core.use_implementation(kind)

    async def scenario() -> dict[str, Any]:
        engine = _async_engine(driver, "sqlite", args)
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
    combos = [c for c in FAIRNESS_VARIANTS if _selected(c[0], args)]
    runs: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    t_cell = perf_counter()
    for rnd in range(gs.fairness_rounds):
        for key, kind, driver, backend in _rotate(combos, rnd):
            label = f"{key} / {backend}"
            if label in errors:
                continue
            try:
                runs.setdefault(label, []).append(fairness_once(kind, driver, backend, args))
            except Exception as err:
                errors[label] = f"{type(err).__name__}: {err}"[:300]
                log(f"  ERROR fairness {label}: {traceback.format_exc(limit=6)}")
    core.use_implementation("greenlet")
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


# ---------------------------------------------------------------------------
# hops: the bare greenlet_spawn() / await_() round trip
# ---------------------------------------------------------------------------

HOPS_VARIANTS = [
    core.Variant("greenlet", "greenlet", "", "greenlet"),
    core.Variant("shim", "shim", "", "greenlet"),
]


async def hops_batch(
    kind: str, tasks: int, spawns: int, awaits: int, awaitable: str
) -> dict[str, Any]:
    core.use_implementation(kind)
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
    variants = [v for v in HOPS_VARIANTS if _selected(v.key, args)]
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
                    for v in _rotate(variants, rnd):
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
    core.use_implementation("greenlet")
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


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------


def _int_list(s: str | None) -> list[int]:
    return [int(x) for x in (s or "").split(",") if x]


def run_groups(
    args: Any, groups: list[str], sizes: core.Sizes, dbs: list[str], failed: list[str]
) -> dict[str, Any]:
    """Run the selected groups; returns ``{group: data}``.  Problems are
    appended to ``failed``."""
    gs = QUICK if args.quick else FULL
    if args.rounds:
        gs.rounds = gs.fairness_rounds = gs.scale_rounds = args.rounds
    need = set()
    if "reuse" in groups:
        need.update(dbs)
    if {"scale", "cpu", "fairness"} & set(groups):
        need.add("sqlite")
    for db in sorted(need):
        try:
            core.ensure_database(db, args, sizes)
        except Exception as err:
            failed.append(f"{db}: setup failed: {type(err).__name__}: {err}")
            log(f"{db}: setup failed: {err}")
            dbs = [d for d in dbs if d != db]
    out: dict[str, Any] = {}
    stamp = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": bool(args.quick),
        "interpreter": interpreter_info()["label"],
    }
    for g in groups:
        t0 = perf_counter()
        if g == "reuse":
            data = asyncio.run(
                run_reuse(args, gs, sizes, [d for d in dbs if d in core._SETUP], failed)
            )
        elif g == "scale":
            data = run_scale(args, gs, failed) if "sqlite" in core._SETUP else {"cells": []}
        elif g == "cpu":
            data = run_cpu(args, gs, failed) if "sqlite" in core._SETUP else {"cells": []}
        elif g == "fairness":
            data = run_fairness(args, gs, failed) if "sqlite" in core._SETUP else {"summary": {}}
        elif g == "hops":
            data = asyncio.run(run_hops(args, gs, failed))
        else:
            raise ValueError(f"unknown cell group {g!r}; choose from {', '.join(GROUPS)}")
        data["meta"] = dict(stamp, elapsed_s=perf_counter() - t0)
        out[g] = data
        log(f"== {g}: {perf_counter() - t0:.1f}s")
    return out


def child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_cells (child)")
    p.add_argument("--child", required=True, choices=["scale", "cpu"])
    p.add_argument("--variant", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--ops", type=int, default=1)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--sqlite-path", required=True)
    cargs = p.parse_args(argv)
    try:
        out = child_scale(cargs) if cargs.child == "scale" else child_cpu(cargs)
    except Exception as err:
        out = {
            "error": f"{type(err).__name__}: {err}"[:300]
            + " | "
            + traceback.format_exc(limit=4)[-600:]
        }
    print("CHILD " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
