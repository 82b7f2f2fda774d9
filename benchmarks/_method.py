"""The measuring method shared by every family of cells.

Rounds whose variant order rotates from round to round (:func:`rotate`),
medians and percentiles, process-wide counters (:class:`Usage`: wall, CPU
and context switches; :class:`Sampler`: OS threads and VmRSS every 5 ms;
VmHWM from :func:`read_status`), the ``await_()``/``greenlet_spawn()``
counter (:class:`HopCounter`), the runners of worker subprocesses
(``python -m benchmarks.<module>`` from the checkout's root, one JSON line
back), and the provenance of a run (:func:`collect_meta`,
:func:`git_describe`, :func:`merge_results`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

# the checkout's root: the working directory of every worker subprocess
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
perf_counter = time.perf_counter


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# rounds, medians, percentiles
# ---------------------------------------------------------------------------


def rotate(xs: list[Any], rnd: int) -> list[Any]:
    """``xs`` rotated by ``rnd``: the order of the variants in round ``rnd``."""
    if not xs:
        return xs
    k = rnd % len(xs)
    return xs[k:] + xs[:k]


def selected(key: str, args: Any) -> bool:
    """Whether ``--variants`` (substrings, comma-separated) keeps ``key``."""
    pats = [p for p in (getattr(args, "variants", None) or "").split(",") if p]
    return not pats or any(p in key for p in pats)


def int_list(s: str | None) -> list[int]:
    return [int(x) for x in (s or "").split(",") if x]


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


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


# ---------------------------------------------------------------------------
# worker subprocesses
# ---------------------------------------------------------------------------


def module_cmd(python: str, module: str, argv: list[str]) -> list[str]:
    """``python -m <module> argv``: run with ``cwd=ROOT`` (:func:`run_module`)."""
    return [python, "-m", module, *argv]


def run_module(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a :func:`module_cmd` from the checkout's root, output captured."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a worker that prints ``CHILD <json>`` (:func:`child_main`); its dict,
    or ``{"error": ...}``."""
    try:
        proc = run_module(cmd, timeout, env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("CHILD ")]
    if lines:
        return json.loads(lines[-1][len("CHILD ") :])  # type: ignore[no-any-return]
    return {"error": f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-400:]}


def child_argv(variant: str, tasks: int, args: Any, extra: list[str]) -> list[str]:
    """The arguments of a :func:`child_main` worker."""
    return [
        "--variant",
        variant,
        "--tasks",
        str(tasks),
        "--sqlite-path",
        args.sqlite_path,
        "--pg-url",
        args.pg_url,
        *extra,
    ]


def child_env(python: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` for a worker run on ``python``.  Another interpreter (its own
    venv) gets a ``PYTHONPATH`` to import the package this process measures
    -- unless that is installed in this interpreter's site-packages (whose
    compiled packages are not the child's): then this checkout's -- and the
    checkout's root (for ``benchmarks``)."""
    env = dict(env)
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        import sqla_anyio_shim

        where = os.path.dirname(os.path.dirname(os.path.abspath(sqla_anyio_shim.__file__)))
        if "site-packages" in where:
            where = ROOT
        paths = [where] + ([ROOT] if os.path.realpath(where) != os.path.realpath(ROOT) else [])
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def child_main(prog: str, run: Callable[[Any], dict[str, Any]], argv: list[str]) -> int:
    """Entry point of a worker subprocess: parse :func:`child_argv`, call
    ``run(cargs)``, print ``CHILD <json>`` (an error too)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--variant", required=True)
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--ops", type=int, default=1)
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--sqlite-path", required=True)
    p.add_argument("--pg-url", required=True)
    cargs = p.parse_args(argv)
    try:
        out = run(cargs)
    except Exception as err:
        out = {
            "error": f"{type(err).__name__}: {err}"[:300]
            + " | "
            + traceback.format_exc(limit=4)[-600:]
        }
    print("CHILD " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------


def collect_meta(
    args: Any,
    server_versions: dict[str, str],
    started: str,
    elapsed: float,
    sizes: Any,
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
    root = ROOT
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
