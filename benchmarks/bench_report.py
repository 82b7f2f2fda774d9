"""RESULTS.md and the ratio plot, from the data ``bench.py`` collects."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

WORKLOAD_TITLES = {
    "core_pk": "Core select by primary key",
    "orm_get": "ORM `session.get()`",
    "orm_select_pk": "ORM select by primary key",
    "orm_insert": "ORM insert of one row + commit",
    "bulk_insert": "bulk insert of {bulk:,} rows (ORM `insert()` executemany + commit)",
    "stream": "`stream()` of {items:,} rows (`async for row in result`)",
}
DB_TITLES = {"sqlite": "SQLite file", "postgresql": "PostgreSQL"}


_VARIANTS: Dict[str, List[Tuple[str, str]]] = {}


def _variants(db: str) -> List[Tuple[str, str]]:
    # (key, baseline key), in table order; set from data["variants"]
    return _VARIANTS.get(db, [])


def _load(data: Dict[str, Any]) -> None:
    for db, pairs in data["variants"].items():
        _VARIANTS[db] = [tuple(p) for p in pairs]  # type: ignore[misc]


def _fmt(x: Optional[float], nd: Optional[int] = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if nd is None:
        nd = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return f"{x:,.{nd}f}"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _r(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _cells(data: Dict[str, Any]) -> Dict[Tuple[str, str, int], Dict[str, Any]]:
    return {(c["db"], c["workload"], c["concurrency"]): c for c in data["cells"]}


def _get(cells: Any, db: str, w: str, c: int, key: str, field: str) -> Optional[float]:
    cell = cells.get((db, w, c))
    if not cell:
        return None
    s = cell["summary"].get(key)
    if not s:
        return None
    return s[field]


def goals(data: Dict[str, Any]) -> List[Tuple[str, str, str, str]]:
    """(goal, measured, target, verdict) rows."""
    cells = _cells(data)
    rows: List[Tuple[str, str, str, str]] = []

    def check(goal: str, value: Optional[float], target: float, le: bool, detail: str = "") -> None:
        if value is None:
            rows.append((goal, "not measured", ("≤ " if le else "≥ ") + f"{target:.2f}×", "n/a"))
            return
        ok = value <= target if le else value >= target
        if ok:
            verdict = "met"
        else:
            miss = (value / target - 1) * 100 if le else (1 - value / target) * 100
            verdict = f"missed by {miss:.0f}%"
        rows.append((goal, f"{value:.2f}×{detail}", ("≤ " if le else "≥ ") + f"{target:.2f}×", verdict))

    w = "orm_select_pk"
    # 1. shim + aiosqlite latency at one task
    check(
        "shim+aiosqlite, ORM select by PK, 1 task: p50 latency / greenlet+aiosqlite",
        _ratio(_get(cells, "sqlite", w, 1, "shim+aiosqlite", "p50_us"),
               _get(cells, "sqlite", w, 1, "greenlet+aiosqlite", "p50_us")),
        1.10, True,
    )
    for drv in ("asyncpg", "psycopg_async"):
        g = f"greenlet+{drv}"
        s = f"shim+{drv}"
        check(
            f"{s}, ORM select by PK, 1 task: p50 latency / {g}",
            _ratio(_get(cells, "postgresql", w, 1, s, "p50_us"),
                   _get(cells, "postgresql", w, 1, g, "p50_us")),
            1.10, True,
        )
        check(
            f"{s}, ORM select by PK, 100 tasks: throughput / {g}",
            _ratio(_get(cells, "postgresql", w, 100, s, "ops_per_s"),
                   _get(cells, "postgresql", w, 100, g, "ops_per_s")),
            0.95, False,
        )
    for db, sync, g, thr in (
        ("sqlite", "shim-sync+pysqlite", "greenlet+aiosqlite", "to_thread+pysqlite"),
        ("postgresql", "shim-sync+psycopg", "greenlet+psycopg_async", "to_thread+psycopg"),
    ):
        check(
            f"{sync}, ORM select by PK, 1 task: p50 latency / {g}",
            _ratio(_get(cells, db, w, 1, sync, "p50_us"), _get(cells, db, w, 1, g, "p50_us")),
            0.60, True,
        )
        check(
            f"{sync}, ORM select by PK, 1 task: p50 latency / {thr}",
            _ratio(_get(cells, db, w, 1, sync, "p50_us"), _get(cells, db, w, 1, thr, "p50_us")),
            1.00, True,
        )
        check(
            f"{sync}, ORM select by PK, 100 tasks: throughput / {thr}",
            _ratio(_get(cells, db, w, 100, sync, "ops_per_s"), _get(cells, db, w, 100, thr, "ops_per_s")),
            1.00, False,
        )
    # context for the 0.6x goal: how far below greenlet is the floor itself?
    for db, plain, g in (
        ("sqlite", "plain+pysqlite", "greenlet+aiosqlite"),
        ("postgresql", "plain+psycopg", "greenlet+psycopg_async"),
    ):
        x = _ratio(_get(cells, db, w, 1, plain, "p50_us"), _get(cells, db, w, 1, g, "p50_us"))
        if x is not None:
            rows.append((
                f"(context) {plain}, the floor: ORM select by PK, 1 task: p50 latency / {g}",
                f"{x:.2f}×", "–", "no sync-driver variant can beat this",
            ))
    # 1,000 tasks complete on every variant
    for db in ("sqlite", "postgresql"):
        c1000 = [c for c in data["cells"] if c["db"] == db and c["concurrency"] == 1000]
        if not c1000:
            continue
        total = 0
        ok = 0
        bad: List[str] = []
        for c in c1000:
            for key, _ in _variants(db):
                total += 1
                if key in c["summary"]:
                    ok += 1
                else:
                    why = "unavailable" if key in c["unavailable"] else "failed"
                    bad.append(f"{key} {c['workload']} ({why})")
        rows.append((
            f"{DB_TITLES[db]}: 1,000 concurrent tasks complete on every variant and workload",
            f"{ok}/{total}" + (": not " + ", ".join(bad) if bad else ""),
            "all", "met" if ok == total else "missed",
        ))
    # isolated peak RSS at 1,000 tasks
    for db, pr in data.get("rss_probes", {}).items():
        res = pr["results"]
        for key, base in _variants(db):
            if not key.startswith("shim"):
                continue
            a, b = res.get(key, {}), res.get(base, {})
            if "hwm_kb" not in a or "hwm_kb" not in b:
                rows.append((
                    f"{key} peak RSS at {pr['concurrency']:,} tasks / {base}",
                    "not measured (" + (a.get("unavailable") or a.get("error") or b.get("error") or "?")[:80] + ")",
                    "≤ 1.50×", "n/a",
                ))
                continue
            ratio = a["hwm_kb"] / b["hwm_kb"]
            da = (a["hwm_kb"] - a["rss_before_kb"]) / 1024
            dbb = (b["hwm_kb"] - b["rss_before_kb"]) / 1024
            check(
                f"{key} peak RSS (VmHWM) at {pr['concurrency']:,} tasks / {base}",
                ratio, 1.50, True,
                f" ({a['hwm_kb'] / 1024:.0f} vs {b['hwm_kb'] / 1024:.0f} MB; growth during the run "
                f"{da:.0f} vs {dbb:.0f} MB)",
            )
    return rows


def render_markdown(data: Dict[str, Any], plot_name: Optional[str] = None) -> str:
    _load(data)
    meta = data["meta"]
    cells = _cells(data)
    out: List[str] = []
    a = out.append
    a("# Benchmarks: greenlet vs the thread bridge\n")
    a(
        "Generated by `python benchmarks/bench.py "
        + " ".join(meta.get("argv", []))
        + "` (also `python -m sqla_anyio_shim bench`). "
        "Re-run and commit when the bridge changes.\n"
    )
    if meta.get("quick"):
        a("**QUICK MODE: tiny counts, figures are not meaningful.**\n")
    a("## Machine and versions\n")
    v = meta["versions"]
    a(f"- date: {meta['date']}; full run took {meta['elapsed_s'] / 60:.1f} min")
    a(f"- machine: {meta['cpu']}, {meta['cpus']} CPUs, {meta['mem_gb']:.1f} GiB RAM; {meta['platform']}")
    a(f"- {meta['implementation']} {meta['python']}, asyncio event loop (default, no uvloop)")
    a("- " + ", ".join(f"{k} {val}" for k, val in v.items()))
    pg = meta["servers"].get("postgresql")
    a(f"- SQLite library {meta['sqlite']}" + (f"; PostgreSQL server {pg}" if pg else ""))
    a(f"- shim under test: `{meta['commit']}`")
    a("")
    if plot_name:
        a(f"![throughput ratios to greenlet]({plot_name})\n")
    a("## Goals (issue 6)\n")
    a("| goal | measured | target | verdict |")
    a("|---|---|---|---|")
    for g in goals(data):
        a("| " + " | ".join(g) + " |")
    a("")
    a(
        "Noise: on this 2-core VM, repeating a cell moves a ratio by about ±0.10 "
        "(more at 100+ tasks, where 100+ threads share 2 cores with the database server); "
        "read verdicts within 0.1 of the target as a tie. Other work on the machine "
        "(test runs in the same checkout) may have overlapped parts of the run; interleaving "
        "makes such load hit all variants of a cell alike, not equally across cells.\n"
    )
    a("## Method\n")
    a(
        "- **One process, interleaved.** For every cell (database × workload × concurrency) "
        f"the runner does {meta['rounds']} rounds ({meta.get('big_rounds', meta['rounds'])} at 1,000 tasks); each round runs one batch of every variant, "
        "in an order rotated by one from round to round. greenlet and the shim are toggled with "
        "`sqla_anyio_shim.uninstall()` / `install()` before each batch, and the runner asserts "
        "that `sqlalchemy.util.concurrency.greenlet_spawn` is (or is not) the bridge's and, at "
        "run time, that `AsyncConnection.run_sync()` ran on the loop thread (greenlet) or off it "
        "(shim). Every batch creates its own engine and disposes it before the next toggle."
    )
    a(
        "- **Batch.** `N` tasks (`asyncio.gather`) each run `k` operations one after another; "
        "an operation opens its own `Session`/connection (checked out of the pool), does the work "
        "and closes it. Before the timed part the batch runs an untimed warm-up of `N` "
        "operations (fills the pool, starts the worker threads). Ops per task: "
        + ", ".join(f"{c} tasks → {k}" for c, k in meta["light_ops"].items())
        + f"; bulk insert {meta['heavy_ops'].get('bulk_insert')} and stream "
        f"{meta['heavy_ops'].get('stream')} per batch (one task)."
    )
    a(
        "- **Figures.** ops/s = operations / wall time of the batch; p50 / p99 = percentiles of "
        "the per-operation latencies of the batch (including time waiting for a pool connection "
        "or a thread); each is the median over the rounds. Ratios are to the greenlet variant "
        "with the same async driver (psycopg sync variants are compared with greenlet + "
        "psycopg_async): ops/s ratio > 1 and latency ratio < 1 are better than greenlet."
    )
    a(
        "- **Pool.** `pool_size = min(tasks, 20)`, `max_overflow = 0`, `pool_timeout = 600` "
        "(PostgreSQL allows 100 connections; a user sizing for many tasks keeps well under that). "
        "`to_thread` uses anyio's default limiter (40 threads). `plain` uses one connection and "
        "runs the `N × k` operations one after another in the loop's thread: its \"tasks\" column "
        "only says how many operations it ran."
    )
    a(
        "- **Threads and RSS.** A sampler thread reads `/proc/self/status` every 5 ms during the "
        "timed part: *peak threads* is the OS thread count of the process (it includes the main "
        "thread and the sampler), *peak RSS* is the highest `VmRSS` seen (process-wide, so it also "
        "carries whatever earlier batches left allocated). Because `VmHWM` is per process, the peak "
        "RSS that the goal refers to is measured separately: one fresh subprocess per variant runs "
        "the ORM select at the largest concurrency (warm-up + 2 ops per task) and reports its "
        "`VmHWM`; see the last table."
    )
    a(
        "- SQLite: a file in WAL mode, `timeout=60`. PostgreSQL: local server over TCP "
        "(127.0.0.1), trust auth. Data: "
        f"{meta['items']:,} rows in `bench_items` (selected by random primary key and streamed)."
    )
    a("")
    for db in ("sqlite", "postgresql"):
        db_cells = [c for c in data["cells"] if c["db"] == db]
        if not db_cells:
            continue
        a(f"## {DB_TITLES[db]}\n")
        workloads: List[str] = []
        for c in db_cells:
            if c["workload"] not in workloads:
                workloads.append(c["workload"])
        for w in workloads:
            a("### " + WORKLOAD_TITLES[w].format(bulk=meta["bulk"], items=meta["items"]) + "\n")
            a("| tasks | variant | ops/s | ×greenlet | p50 µs | ×greenlet | p99 µs | ×greenlet | peak threads | peak RSS MB |")
            a("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            concs = sorted({c["concurrency"] for c in db_cells if c["workload"] == w})
            for conc in concs:
                cell = cells[(db, w, conc)]
                for key, base in _variants(db):
                    s = cell["summary"].get(key)
                    if not s:
                        why = cell["unavailable"].get(key) or cell["errors"].get(key) or "did not run"
                        label = "unavailable" if key in cell["unavailable"] else "FAILED"
                        a(f"| {conc:,} | {key} | {label}: {why[:120]} | | | | | | | |")
                        continue
                    b = cell["summary"].get(base) or {}
                    a(
                        f"| {conc:,} | {key} | {_fmt(s['ops_per_s'])} | {_r(_ratio(s['ops_per_s'], b.get('ops_per_s')))} "
                        f"| {_fmt(s['p50_us'])} | {_r(_ratio(s['p50_us'], b.get('p50_us')))} "
                        f"| {_fmt(s['p99_us'])} | {_r(_ratio(s['p99_us'], b.get('p99_us')))} "
                        f"| {s['peak_threads']} | {_fmt(s['peak_rss_mb'])} |"
                    )
            a("")
    probes = data.get("rss_probes", {})
    if probes:
        a("## Peak RSS in isolation (one subprocess per variant, ORM select by PK)\n")
        a("| database | tasks | variant | VmHWM MB | ×greenlet | RSS before the run MB | growth MB | peak threads | ops/s |")
        a("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for db, pr in probes.items():
            res = pr["results"]
            for key, base in _variants(db):
                r = res.get(key, {})
                if "hwm_kb" not in r:
                    a(f"| {DB_TITLES[db]} | {pr['concurrency']:,} | {key} | {(r.get('unavailable') or r.get('error') or '?')[:100]} | | | | | |")
                    continue
                b = res.get(base, {})
                a(
                    f"| {DB_TITLES[db]} | {pr['concurrency']:,} | {key} | {r['hwm_kb'] / 1024:.1f} "
                    f"| {_r(_ratio(r['hwm_kb'], b.get('hwm_kb')))} | {r['rss_before_kb'] / 1024:.1f} "
                    f"| {(r['hwm_kb'] - r['rss_before_kb']) / 1024:.1f} | {r['peak_threads']} | {r['ops_per_s']:,.0f} |"
                )
        a("")
    return "\n".join(out) + "\n"


def plot(data: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _load(data)
    cells = _cells(data)
    dbs = [db for db in ("sqlite", "postgresql") if any(c["db"] == db for c in data["cells"])]
    if not dbs:
        raise ValueError("no results to plot")
    fig, axes = plt.subplots(len(dbs), 1, figsize=(15, 5.5 * len(dbs)), squeeze=False)
    for ax, db in zip(axes[:, 0], dbs):
        keys = [(k, b) for k, b in _variants(db) if not k.startswith("greenlet")]
        labels = []
        xs = []
        for c in data["cells"]:
            if c["db"] == db:
                xs.append((c["workload"], c["concurrency"]))
                labels.append(f"{c['workload']}\n{c['concurrency']}")
        width = 0.8 / max(1, len(keys))
        for i, (k, b) in enumerate(keys):
            vals = []
            for (w, conc) in xs:
                cell = cells[(db, w, conc)]
                s, g = cell["summary"].get(k), cell["summary"].get(b)
                vals.append(s["ops_per_s"] / g["ops_per_s"] if s and g else 0.0)
            ax.bar([j + (i - (len(keys) - 1) / 2) * width for j in range(len(xs))], vals, width, label=f"{k} / {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        # log scale: the sync variants stream 10-20x faster than greenlet
        ax.set_yscale("log")
        ticks = [0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16]
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{t:g}x" for t in ticks])
        ax.set_ylim(0.2, 25)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([l.replace("orm_select_pk", "orm_sel_pk") for l in labels], fontsize=7)
        ax.set_ylabel("throughput ratio to greenlet (higher is better)")
        ax.set_title(f"{DB_TITLES[db]}: ops/s relative to greenlet + the same async driver (workload / tasks)")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
