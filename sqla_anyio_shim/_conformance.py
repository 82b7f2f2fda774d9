"""``python -m sqla_anyio_shim conformance``: SQLAlchemy's own asyncio suite,
run unchanged on the shim next to the same suite on greenlet.

It fetches (and caches) the sdist of the SQLAlchemy version in use, builds
two virtual environments from the package index -- one with the shim and
*without* greenlet (proved by trying to import it), one with greenlet and
no shim -- runs ``test/ext/asyncio`` and ``test/base/test_concurrency.py``
(``test_concurrency_py3k.py`` on 2.0) in each, and prints a table.  The
exit status is non-zero when the shim run is worse than the greenlet run:
any failure or error, or fewer passes than greenlet's minus the tests that
``docs/conformance.md`` lists as asserting greenlet's own internals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# the pip requirement for each async driver name in a --db / --dburi
DRIVER_REQUIREMENTS = {
    "aiosqlite": ["aiosqlite"],
    "asyncpg": ["asyncpg"],
    "psycopg_async": ["psycopg[binary]"],
    "psycopg": ["psycopg[binary]"],
    "aiomysql": ["aiomysql"],
    "asyncmy": ["asyncmy"],
}

INTERNAL_MARK = "greenlet internals (sqla-anyio-shim)"


@dataclass
class RunResult:
    label: str
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0
    internal_skips: int = 0
    exit_code: int = 0
    note: str = ""
    failures: List[str] = field(default_factory=list)


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache:
        return Path(args.cache)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "sqla-anyio-shim"


def _installed_sqlalchemy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqlalchemy")
    except PackageNotFoundError:
        raise SystemExit(
            "SQLAlchemy is not installed; pass --sqlalchemy VERSION"
        ) from None


def _run(cmd: Sequence[str], **kw: object) -> None:
    print("   $ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(list(cmd), check=True, **kw)  # type: ignore[call-overload]


def fetch_sdist(version: str, cache: Path) -> Path:
    """Download and unpack the sdist of SQLAlchemy ``version``."""
    tree = cache / "sdist" / f"sqlalchemy-{version}"
    if (tree / "test" / "conftest.py").is_file():
        return tree
    download = cache / "sdist" / "download"
    download.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--no-binary", ":all:", f"sqlalchemy=={version}", "-d", str(download),
        ]
    )
    archives = sorted(download.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not archives:
        raise SystemExit(f"no sdist of SQLAlchemy {version} was downloaded")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(cache / "sdist")
    if not (tree / "test" / "conftest.py").is_file():
        raise SystemExit(f"{archives[0]} has no test/ tree")
    return tree


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _driver_of(args: argparse.Namespace) -> str:
    if args.dburi:
        scheme = args.dburi.split("://", 1)[0]
        return scheme.split("+", 1)[1] if "+" in scheme else scheme
    return args.db


def make_env(
    kind: str, version: str, driver: str, cache: Path, project: Optional[Path]
) -> Path:
    """Create (or refresh) the ``shim`` or ``greenlet`` environment."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env = cache / "venvs" / f"{kind}-sa{version}-{driver}-py{py}"
    python = _venv_python(env)
    requirements = [f"sqlalchemy=={version}", "pytest"] + DRIVER_REQUIREMENTS.get(
        driver, []
    )
    if kind == "greenlet":
        requirements.append("greenlet")
    marker = env / ".requirements"
    wanted = "\n".join(requirements)
    if not python.exists() or not marker.exists() or marker.read_text() != wanted:
        print(f"-- building the {kind} environment at {env}", flush=True)
        if env.exists():
            shutil.rmtree(env)
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        _run([str(python), "-m", "pip", "install", "-q", *requirements])
        marker.write_text(wanted)
    if kind == "shim":
        if project is None:
            raise SystemExit("cannot find the sqla-anyio-shim project to install")
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(project)])
        _run([str(python), "-m", "pip", "install", "-q", "anyio>=4"])
        # SQLAlchemy wheels pull greenlet in on common platforms: remove it
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-q", "-y", "greenlet"],
            check=False,
        )
        probe = subprocess.run(
            [str(python), "-c", "import greenlet"], capture_output=True
        )
        if probe.returncode == 0:
            raise SystemExit(f"greenlet is still importable in {env}")
        print("   greenlet is not importable in the shim environment", flush=True)
    return env


def _project_dir() -> Optional[Path]:
    here = Path(__file__).resolve().parent.parent
    if (here / "setup.cfg").is_file() and (here / "sqla_anyio_shim").is_dir():
        return here
    return None


def test_paths(version: str) -> List[str]:
    line = tuple(int(p) for p in version.split(".")[:2])
    concurrency = (
        "test/base/test_concurrency_py3k.py"
        if line < (2, 1)
        else "test/base/test_concurrency.py"
    )
    return ["test/ext/asyncio", concurrency]


def run_suite(
    label: str,
    env: Path,
    tree: Path,
    version: str,
    db_args: List[str],
    shim: bool,
    timeout: float,
    extra: Sequence[str],
) -> RunResult:
    result = RunResult(label)
    junit = env / f"junit-{label}.xml"
    if junit.exists():
        junit.unlink()
    cmd = [
        str(_venv_python(env)), "-m", "pytest", "-p", "no:cacheprovider",
        "-q", "-rfE", f"--junitxml={junit}", *test_paths(version), *db_args, *extra,
    ]
    if shim:
        cmd[3:3] = ["-p", "sqla_anyio_shim.pytest_plugin"]
    print(f"-- {label}: running SQLAlchemy {version}'s suite", flush=True)
    print("   $ (cd " + str(tree) + " && " + " ".join(cmd) + ")", flush=True)
    start = time.monotonic()
    environ = dict(os.environ)
    environ.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run(cmd, cwd=tree, timeout=timeout, env=environ)
        result.exit_code = proc.returncode
    except subprocess.TimeoutExpired:
        result.exit_code = -1
        result.note = f"killed after {timeout:.0f} s (hang?)"
    result.seconds = time.monotonic() - start
    if not junit.exists():
        result.errors += 1
        result.note = result.note or "pytest produced no report"
        return result
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        children = {child.tag: child for child in case}
        if "failure" in children:
            result.failed += 1
            result.failures.append(name)
        elif "error" in children:
            result.errors += 1
            result.failures.append(name + " (error)")
        elif "skipped" in children:
            result.skipped += 1
            if INTERNAL_MARK in (children["skipped"].get("message") or ""):
                result.internal_skips += 1
        else:
            result.passed += 1
    return result


def verdict(shim: RunResult, greenlet: RunResult) -> List[str]:
    problems = []
    if shim.failed or shim.errors:
        problems.append(f"{shim.failed} failed and {shim.errors} errors on the shim")
    if shim.note:
        problems.append(shim.note)
    if shim.passed < greenlet.passed - shim.internal_skips:
        problems.append(
            f"{shim.passed} passed on the shim, {greenlet.passed} on greenlet "
            f"({shim.internal_skips} documented greenlet-internal tests skipped)"
        )
    return problems


def print_table(rows: List[RunResult]) -> None:
    header = f"{'run':<28}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}{'time':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.label:<28}{r.passed:>8}{r.failed:>8}{r.errors:>8}"
            f"{r.skipped:>9}{r.seconds:>8.1f}s"
        )


def server_unreachable(dburi: str) -> Optional[str]:
    """None if the server named in ``dburi`` accepts TCP connections, else
    why not."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(dburi)
    if not parts.hostname:
        return None
    defaults = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}
    port = parts.port or defaults.get(parts.scheme.split("+")[0], 0)
    try:
        with socket.create_connection((parts.hostname, port), timeout=5):
            return None
    except OSError as err:
        return f"{parts.hostname}:{port} is not reachable ({err})"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqla_anyio_shim conformance",
        description="Run SQLAlchemy's own asyncio test suite on the shim "
        "(greenlet absent) and on greenlet, and compare.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--db", default="aiosqlite", help="SQLAlchemy --db name (default aiosqlite)")
    target.add_argument("--dburi", help="SQLAlchemy --dburi, e.g. postgresql+asyncpg://user@127.0.0.1/test")
    parser.add_argument("--sqlalchemy", help="SQLAlchemy version (default: the installed one)")
    parser.add_argument("--cache", help="cache directory for sdists and environments")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per suite run")
    parser.add_argument("--shim-only", action="store_true", help="skip the greenlet run")
    parser.add_argument("--repeat", type=int, default=1, help="run the shim suite N times")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    if args.dburi:
        problem = server_unreachable(args.dburi)
        if problem is not None:
            if os.environ.get("CI") == "true":
                print(f"conformance: FAIL -- the database server is needed: {problem}")
                return 1
            print(f"conformance: NOT RUN -- {problem} (with CI=true this fails)")
            return 0
    version = args.sqlalchemy or _installed_sqlalchemy_version()
    cache = _cache_dir(args)
    cache.mkdir(parents=True, exist_ok=True)
    driver = _driver_of(args)
    db_args = ["--dburi", args.dburi] if args.dburi else ["--db", args.db]
    print(f"== SQLAlchemy {version}, {' '.join(db_args)}, cache {cache}", flush=True)

    tree = fetch_sdist(version, cache)
    shim_env = make_env("shim", version, driver, cache, _project_dir())
    rows: List[RunResult] = []
    for i in range(args.repeat):
        label = "shim (no greenlet)" + (f" #{i + 1}" if args.repeat > 1 else "")
        rows.append(
            run_suite(label, shim_env, tree, version, db_args, True, args.timeout, args.pytest_args)
        )
    greenlet_row: Optional[RunResult] = None
    if not args.shim_only:
        gl_env = make_env("greenlet", version, driver, cache, None)
        greenlet_row = run_suite(
            "greenlet (upstream)", gl_env, tree, version, db_args, False, args.timeout, args.pytest_args
        )
        rows.append(greenlet_row)

    print()
    print(f"SQLAlchemy {version} -- {' '.join(db_args)} -- {' '.join(test_paths(version))}")
    print_table(rows)
    status = 0
    for row in rows:
        if row is greenlet_row:
            continue
        for name in row.failures:
            print(f"   {row.label}: FAILED {name}")
        if row.internal_skips:
            print(
                f"   {row.label}: {row.internal_skips} test(s) skipped as asserting "
                "greenlet's own internals (docs/conformance.md)"
            )
        problems = (
            verdict(row, greenlet_row)
            if greenlet_row is not None
            else ([f"{row.failed} failed, {row.errors} errors"] if row.failed or row.errors or row.note else [])
        )
        if row.note and greenlet_row is None:
            problems.append(row.note)
        for p in problems:
            print(f"   WORSE THAN GREENLET: {p}")
        if problems:
            status = 1
    print("conformance: " + ("FAIL" if status else "OK"))
    return status
