"""Command line of the benchmarks: greenlet vs the thread bridge.

Run from a checkout's root as ``python -m benchmarks [options]`` (or
``python -m sqla_anyio_shim bench [options]``, which calls :func:`main`
here); ``--help`` lists the flags.  Environment: ``BENCH_PG_URL``,
``BENCH_SQLITE_PATH`` (the defaults of ``--pg-url``/``--sqlite-path``, in
``_setup.py``), ``BENCH_CPU_PYTHON`` (the default of ``--cpu-python``).

Cell groups (``--cells``, default all), one module each: ``classic``
(``cells_classic.py``: the database x workload x concurrency grid of issue
6); ``reuse``, ``scale``, ``cpu``, ``fairness`` and ``hops``
(``cells_<group>.py``: the hand-off cells of issue 10).  The method they
share is in ``_method.py``, the data and variants in ``_setup.py``,
RESULTS.md and the plot in ``report.py``.  ``--merge results.json`` keeps
the groups of an earlier run that this run does not re-measure, so one
group can be re-run and RESULTS.md re-rendered whole; ``--render-from
results.json`` re-renders ``--out``/``--plot`` without measuring.

Full runs (quiet machine; durations estimated for a 2-core VM)::

    # everything, the cpu cells on a free-threaded interpreter (~25 min)
    python -m benchmarks --cpu-python /path/to/3.14t-venv/bin/python \
        --out benchmarks/RESULTS.md --plot benchmarks/ratios.png \
        --json benchmarks/results.json
    # one group, merged into the committed results (reuse ~4 min, scale
    # ~4 min, cpu ~2-4 min, fairness ~10 s (70 s while the sync-driver loop
    # cannot be cancelled: 3 s hard cap per round), hops ~40 s, classic ~14 min)
    python -m benchmarks --cells reuse --merge benchmarks/results.json \
        --json benchmarks/results.json --out benchmarks/RESULTS.md \
        --plot benchmarks/ratios.png
    # the cpu cells over asyncpg (issue 18: greenlet, the hand-off, driver
    # loops), kept as a group of their own next to aiosqlite's
    python -m benchmarks --cells cpu --cpu-db postgresql \
        --cpu-group cpu:3.14t-asyncpg --cpu-python /path/to/3.14t-venv/bin/python \
        --merge benchmarks/results.json --json benchmarks/results.json \
        --out benchmarks/RESULTS.md --plot benchmarks/ratios.png

``--quick`` (what CI runs) runs every cell at a tiny size: about 20 s for the
hand-off cells and 15 s for the classic grid on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from . import cells_classic, cells_cpu, cells_fairness, cells_hops, cells_reuse, cells_scale, report
from ._method import collect_meta, git_describe, interpreter_info, log, merge_results, perf_counter
from ._setup import (
    DEFAULT_PG_URL,
    DEFAULT_SQLITE_PATH,
    FULL,
    HANDOFF_FULL,
    HANDOFF_QUICK,
    QUICK,
    SETUP,
    Sizes,
    ensure_database,
)
from .cells_classic import HEAVY_WORKLOADS, LIGHT_WORKLOADS

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
    p.add_argument(
        "--cpu-db",
        default="sqlite",
        choices=["sqlite", "postgresql"],
        help="the cpu cells' database: sqlite (aiosqlite, pysqlite, plain threads; the default) "
        "or postgresql (asyncpg: greenlet, the hand-off, driver loops); give the second its own "
        "--cpu-group, e.g. cpu:3.14t-asyncpg",
    )
    p.add_argument(
        "--cpu-group",
        default="cpu",
        help="the name the cpu cells are stored and rendered under (default cpu); another name, "
        "e.g. cpu:3.13t, keeps a second interpreter's cells next to the first's (--merge)",
    )
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
    """Run the benchmarks with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.probe_variant:
        return cells_classic.rss_probe(args)
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
    all_cells: list[cells_classic.Cell] = []
    probes: dict[str, dict[str, Any]] = {}
    server_versions: dict[str, str] = {}
    failed: list[str] = []
    if "classic" in groups:
        all_cells, probes, server_versions = cells_classic.run_grid(
            args, sizes, dbs, concurrencies, failed
        )

    group_data: dict[str, Any] = {}
    new_groups = [g for g in groups if g != "classic"]
    if new_groups:
        group_data = run_groups(args, new_groups, sizes, dbs, failed)
        for g in group_data.values():
            g["meta"]["commit"] = commit
        server_versions.update({db: v for db, v in SETUP.items() if db not in server_versions})

    elapsed = perf_counter() - t_start
    unavailable: list[str] = []
    cells_classic.problems(all_cells, probes, failed, unavailable)

    meta = collect_meta(args, server_versions, started, elapsed, sizes, concurrencies)
    meta["commit"] = commit
    data = {
        "meta": meta,
        "cells": cells_classic.cells_json(all_cells),
        "rss_probes": probes,
        "variants": {
            db: [(v.key, v.baseline) for v in cells_classic.variants_for(db)] for db in dbs
        }
        if "classic" in groups
        else {},
        "groups": group_data,
    }
    if args.merge:
        data = merge_results(args.merge, data, groups)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                report.render_markdown(
                    data, plot_name=os.path.basename(args.plot) if args.plot else None
                )
            )
        log(f"wrote {args.out}")
    if args.plot:
        try:
            report.plot(data, args.plot)
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


def run_groups(
    args: Any, groups: list[str], sizes: Sizes, dbs: list[str], failed: list[str]
) -> dict[str, Any]:
    """Run the selected hand-off groups; returns ``{group: data}``.  Problems
    are appended to ``failed``."""
    gs = HANDOFF_QUICK if args.quick else HANDOFF_FULL
    if args.rounds:
        gs.rounds = gs.fairness_rounds = gs.scale_rounds = args.rounds
    need = set()
    if "reuse" in groups:
        need.update(dbs)
    if {"scale", "cpu", "fairness"} & set(groups):
        need.add("sqlite")
    if "cpu" in groups and args.cpu_db == "postgresql":
        need.add("postgresql")
    for db in sorted(need):
        try:
            ensure_database(db, args, sizes)
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
                cells_reuse.run_reuse(args, gs, sizes, [d for d in dbs if d in SETUP], failed)
            )
        elif g == "scale":
            data = cells_scale.run_scale(args, gs, failed) if "sqlite" in SETUP else {"cells": []}
        elif g == "cpu":
            data = cells_cpu.run_cpu(args, gs, failed) if args.cpu_db in SETUP else {"cells": []}
        elif g == "fairness":
            data = (
                cells_fairness.run_fairness(args, gs, failed)
                if "sqlite" in SETUP
                else {"summary": {}}
            )
        elif g == "hops":
            data = asyncio.run(cells_hops.run_hops(args, gs, failed))
        else:
            raise ValueError(f"unknown cell group {g!r}; choose from {', '.join(ALL_GROUPS[1:])}")
        data["meta"] = dict(stamp, elapsed_s=perf_counter() - t0)
        out[args.cpu_group if g == "cpu" else g] = data
        log(f"== {g}: {perf_counter() - t0:.1f}s")
    return out


def render(args: Any) -> int:
    """Re-render RESULTS.md / the plot from a saved --json file."""
    with open(args.render_from) as f:
        data = json.load(f)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                report.render_markdown(
                    data, plot_name=os.path.basename(args.plot) if args.plot else None
                )
            )
    if args.plot:
        report.plot(data, args.plot)
    return 0
