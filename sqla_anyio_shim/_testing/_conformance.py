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

On a free-threaded build the shim run must also keep the GIL off from start
to end (``python -W error`` on CPython's "GIL has been enabled" warning, and
the pytest plugin's GIL guard), and the greenlet row says what greenlet did
there: installed from source or only as an older wheel, whether importing it
switched the GIL back on, and whether the run crashed (with its signal) --
never an empty row.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import threading
import time
import venv
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
# CPython's warning when an extension switches the GIL back on; as an error
# filter it makes such an import fail on the spot, naming the module
GIL_WARNING = "The global interpreter lock"
GIL_ERROR_FILTER = f"error:{GIL_WARNING}:RuntimeWarning"


def driver_requirements(driver: str) -> list[str]:
    reqs = DRIVER_REQUIREMENTS.get(driver, [])
    if FREE_THREADED:
        # psycopg's binary implementation has no free-threaded wheel; the
        # pure-Python one (libpq through ctypes) is the same driver
        reqs = ["psycopg" if r == "psycopg[binary]" else r for r in reqs]
    return reqs


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
    failures: list[str] = field(default_factory=list)
    # what happened around the run (greenlet's install, the GIL), printed
    # under the table
    remarks: list[str] = field(default_factory=list)
    not_run: bool = False


def _cache_dir(args: argparse.Namespace) -> Path:
    if args.cache:
        return Path(args.cache)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sqla-anyio-shim"


def _installed_sqlalchemy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sqlalchemy")
    except PackageNotFoundError:
        raise SystemExit("SQLAlchemy is not installed; pass --sqlalchemy VERSION") from None


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
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            # the sdist of SQLAlchemy only: ":all:" would also build the
            # sdist's build requirements from source (Cython: minutes of C
            # compilation on a fresh machine) just to read its metadata
            "--no-binary",
            "sqlalchemy",
            f"sqlalchemy=={version}",
            "-d",
            str(download),
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
        scheme = str(args.dburi).split("://", 1)[0]
        return scheme.split("+", 1)[1] if "+" in scheme else scheme
    return str(args.db)


def _pip_install(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # not -q: the output names the version pip picked ("greenlet-X.tar.gz")
    cmd = [str(python), "-m", "pip", "install", *args]
    print("   $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace")


def _greenlet_on_free_threaded(python: Path) -> list[str]:
    """Install greenlet in a free-threaded environment as a user would, and
    say what happened: the newest release (built from source when there is
    no wheel); if that fails, the newest wheel for this interpreter.  The
    returned remarks end with what importing it did to the GIL."""
    remarks: list[str] = []
    proc = _pip_install(python, "--upgrade", "greenlet")
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        tried = re.search(r"greenlet-(\d[\w.]*?)\.tar\.gz", out)
        error = re.search(r"^\s*(\S+:\d+:\d+: (?:fatal )?error: .*)$", out, re.M)
        reason = error.group(1).strip() if error else out.strip().splitlines()[-1]
        remarks.append(
            f"greenlet {tried.group(1) if tried else '(newest)'}: the build "
            f"from source failed: {reason}"
        )
        proc = _pip_install(python, "--upgrade", "--only-binary=greenlet", "greenlet")
        if proc.returncode != 0:
            remarks.append(
                "no greenlet wheel for this interpreter either: greenlet cannot be installed"
            )
            return remarks
    probe = subprocess.run(
        [
            str(python),
            "-W",
            "always::RuntimeWarning",
            "-c",
            "import sys, greenlet; print(greenlet.__version__, sys._is_gil_enabled())",
        ],
        capture_output=True,
        text=True,
        errors="replace",
    )
    if probe.returncode != 0:
        remarks.append(
            f"importing greenlet failed (exit status {probe.returncode}): "
            f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}"
        )
        return remarks
    version, gil = probe.stdout.split()
    how = "installed" if not remarks else "installed instead (newest wheel for this interpreter)"
    remarks.append(f"greenlet {version} {how}")
    if gil == "True":
        found = re.search(r"to load module '([^']+)'", probe.stderr)
        remarks.append(
            f"importing greenlet {version} re-enabled the GIL "
            f"(CPython: module {found.group(1) if found else '?'!r} has not declared "
            "that it can run without the GIL): the greenlet run below runs with the GIL"
        )
    else:
        remarks.append(f"importing greenlet {version} kept the GIL off")
    return remarks


def make_env(
    kind: str, version: str, driver: str, cache: Path, project: Path | None
) -> tuple[Path, list[str]]:
    """Create (or refresh) the ``shim`` or ``greenlet`` environment; also
    returns remarks on how greenlet installed (free-threaded builds)."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
    env = cache / "venvs" / f"{kind}-sa{version}-{driver}-py{py}"
    python = _venv_python(env)
    requirements = [f"sqlalchemy=={version}", "pytest", *driver_requirements(driver)]
    greenlet_apart = kind == "greenlet" and FREE_THREADED
    if kind == "greenlet" and not FREE_THREADED:
        requirements.append("greenlet")
    marker = env / ".requirements"
    notes = env / ".greenlet-remarks"
    wanted = "\n".join(requirements)
    remarks: list[str] = []
    if not python.exists() or not marker.exists() or marker.read_text() != wanted:
        print(f"-- building the {kind} environment at {env}", flush=True)
        if env.exists():
            shutil.rmtree(env)
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        # SQLAlchemy 2.0 requires greenlet; on a free-threaded build take a
        # greenlet wheel for that, as a source build may fail (greenlet's
        # own install is tried, and reported, apart)
        only_binary = ["--only-binary=greenlet"] if FREE_THREADED else []
        _run([str(python), "-m", "pip", "install", "-q", *only_binary, *requirements])
        if greenlet_apart:
            remarks = _greenlet_on_free_threaded(python)
            notes.write_text("\n".join(remarks))
        marker.write_text(wanted)
    elif greenlet_apart and notes.exists():
        remarks = [r for r in notes.read_text().splitlines() if r]
    if kind == "shim":
        if project is None:
            raise SystemExit("cannot find the sqla-anyio-shim project to install")
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--force-reinstall",
                str(project),
            ]
        )
        _run([str(python), "-m", "pip", "install", "-q", "anyio>=4"])
        # SQLAlchemy wheels pull greenlet in on common platforms: remove it
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-q", "-y", "greenlet"],
            check=False,
        )
        probe = subprocess.run([str(python), "-c", "import greenlet"], capture_output=True)
        if probe.returncode == 0:
            raise SystemExit(f"greenlet is still importable in {env}")
        print("   greenlet is not importable in the shim environment", flush=True)
    return env, remarks


def _project_dir() -> Path | None:
    """The checkout this module runs from (``python -m sqla_anyio_shim``
    in a checkout's root imports the package from there), if any."""
    here = Path(__file__).resolve().parents[2]
    if (here / "setup.cfg").is_file() and (here / "sqla_anyio_shim").is_dir():
        return here
    return None


def test_paths(version: str) -> list[str]:
    line = tuple(int(p) for p in version.split(".")[:2])
    concurrency = (
        "test/base/test_concurrency_py3k.py" if line < (2, 1) else "test/base/test_concurrency.py"
    )
    return ["test/ext/asyncio", concurrency]


def _tee(proc: subprocess.Popen[str], tail: collections.deque[str]) -> None:
    """Echo the run's output as it comes and keep its last lines (what a
    crash leaves behind: CPython's fatal error, faulthandler's stack)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))


def _crash_remark(code: int, tail: Sequence[str]) -> str:
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    # pytest -q prints a progress character per finished test
    done = sum(
        len(m.group(1))
        for m in (re.match(r"^(?:\S+\.py ?)?([.sFExX]*)\s*(?:\[\s*\d+%\])?\s*$", t) for t in tail)
        if m
    )
    fatal = next((t.strip() for t in tail if t.startswith("Fatal Python error")), "")
    return f"the run crashed: killed by {name} (exit status {code}) after about {done} test(s)" + (
        f"; {fatal}" if fatal else ""
    )


def run_suite(
    label: str,
    env: Path,
    tree: Path,
    version: str,
    db_args: list[str],
    shim: bool,
    timeout: float,
    extra: Sequence[str],
) -> RunResult:
    result = RunResult(label)
    junit = env / f"junit-{label}.xml"
    if junit.exists():
        junit.unlink()
    cmd = [
        str(_venv_python(env)),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfE",
        f"--junitxml={junit}",
        # a test that hangs dumps every thread's stack long before the run is
        # killed (no upstream test takes more than seconds), so a hang in CI
        # says where it is instead of just "killed after 900 s"
        "-o",
        f"faulthandler_timeout={max(60, int(timeout / 4))}",
        *_drop_first(db_args),
        *test_paths(version),
        *db_args,
        *extra,
    ]
    if shim:
        cmd[3:3] = ["-p", "sqla_anyio_shim.pytest_plugin"]
    environ = dict(os.environ)
    environ.pop("PYTHONPATH", None)
    # the run's own GIL state, not one forced from outside
    environ.pop("PYTHON_GIL", None)
    gil_report = env / f"gil-{label}.txt"
    if shim and FREE_THREADED:
        # an import that switches the GIL on fails where it happens; the
        # plugin's guard checks the rest of the run and writes its verdict
        cmd[1:1] = ["-W", GIL_ERROR_FILTER]
        if gil_report.exists():
            gil_report.unlink()
        environ["SQLA_SHIM_GIL_REPORT"] = str(gil_report)
    print(f"-- {label}: running SQLAlchemy {version}'s suite", flush=True)
    print("   $ (cd " + str(tree) + " && " + " ".join(cmd) + ")", flush=True)
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=300)
    proc = subprocess.Popen(
        cmd,
        cwd=tree,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    reader = threading.Thread(target=_tee, args=(proc, tail), daemon=True)
    reader.start()
    try:
        result.exit_code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        result.exit_code = -1
        result.note = f"killed after {timeout:.0f} s (hang?)"
    reader.join(30)
    result.seconds = time.monotonic() - start
    if result.exit_code < 0 and not result.note:
        result.note = _crash_remark(result.exit_code, tail)
        result.remarks.append(result.note)
    if shim and FREE_THREADED:
        verdict_line = gil_report.read_text().strip() if gil_report.exists() else ""
        if not verdict_line or verdict_line.startswith("GIL CHECK FAILED"):
            result.note = result.note or (
                verdict_line
                or "GIL CHECK FAILED: the run ended without the GIL "
                "guard's verdict (see the output above: an import may have "
                "switched the GIL on)"
            )
        result.remarks.append(verdict_line or result.note)
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
            result.failures.append(name + _failure_summary(children["failure"]))
        elif "error" in children:
            result.errors += 1
            result.failures.append(name + " (error)" + _failure_summary(children["error"]))
        elif "skipped" in children:
            result.skipped += 1
            if INTERNAL_MARK in (children["skipped"].get("message") or ""):
                result.internal_skips += 1
        else:
            result.passed += 1
    return result


def _drop_first(db_args: Sequence[str]) -> list[str]:
    """``--dropfirst`` for a database server: tables an interrupted earlier
    run (or another project's) left in the database would be reused, rows and
    all, by this run's fixtures -- a leftover table ``a`` fails
    ``AsyncAttrsTest.test_it_didnt_load_but_is_ok`` on both sides -- so
    SQLAlchemy's harness drops them first.  Not for SQLite, whose harness
    cannot (the attached test schemas do not exist yet) and whose files live
    in the sdist's directory, which is ours."""
    joined = " ".join(db_args)
    if "--dburi" in db_args and "sqlite" not in joined:
        return ["--dropfirst"]
    return []


def _failure_summary(element: ET.Element, lines: int = 25) -> str:
    """The end of a failure's report, indented, so that the summary printed
    last (what a CI log keeps) says why a test failed, not only which."""
    text = (element.text or element.get("message") or "").strip().splitlines()
    if not text:
        return ""
    return "\n" + "\n".join("        " + line for line in text[-lines:])


def verdict(shim: RunResult, greenlet: RunResult) -> list[str]:
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


def print_table(rows: list[RunResult]) -> None:
    header = f"{'run':<28}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}{'time':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.not_run:
            print(f"{r.label:<28}{'not run (see below)':>42}")
            continue
        print(
            f"{r.label:<28}{r.passed:>8}{r.failed:>8}{r.errors:>8}{r.skipped:>9}{r.seconds:>8.1f}s"
        )


def server_unreachable(dburi: str) -> str | None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sqla_anyio_shim conformance",
        description="Run SQLAlchemy's own asyncio test suite on the shim "
        "(greenlet absent) and on greenlet, and compare.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--db", default="aiosqlite", help="SQLAlchemy --db name (default aiosqlite)"
    )
    target.add_argument(
        "--dburi", help="SQLAlchemy --dburi, e.g. postgresql+asyncpg://user@127.0.0.1/test"
    )
    parser.add_argument("--sqlalchemy", help="SQLAlchemy version (default: the installed one)")
    parser.add_argument("--cache", help="cache directory for sdists and environments")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per suite run")
    parser.add_argument("--shim-only", action="store_true", help="skip the greenlet run")
    parser.add_argument("--repeat", type=int, default=1, help="run the shim suite N times")
    parser.add_argument(
        "--parallel",
        choices=["off", "auto", "on"],
        help="run the shim suite with install(parallel=...) (default: install()'s)",
    )
    parser.add_argument(
        "--driver-loops",
        choices=["off", "auto", "on"],
        help="run the shim suite with install(driver_loops=...): async drivers on "
        "event loops of their own in the workers (default: install()'s)",
    )
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
    shim_env, _ = make_env("shim", version, driver, cache, _project_dir())
    rows: list[RunResult] = []
    mode = ""
    options = []
    if args.parallel is not None:
        options.append(f"--parallel {args.parallel}")
        mode += f", parallel {args.parallel}"
    if args.driver_loops is not None:
        options.append(f"--driver-loops {args.driver_loops}")
        mode += f", driver loops {args.driver_loops}"
    if options:
        # read by the plugin's install() (sqla_anyio_shim.pytest_plugin)
        os.environ["SQLA_ANYIO_SHIM_OPTIONS"] = " ".join(options)
    for i in range(args.repeat):
        label = f"shim (no greenlet{mode})" + (f" #{i + 1}" if args.repeat > 1 else "")
        rows.append(
            run_suite(label, shim_env, tree, version, db_args, True, args.timeout, args.pytest_args)
        )
    greenlet_row: RunResult | None = None
    if not args.shim_only:
        gl_env, remarks = make_env("greenlet", version, driver, cache, None)
        installed = next(
            (r.split()[1] for r in remarks if r.startswith("greenlet ") and " installed" in r),
            None,
        )
        label = "greenlet (upstream)" if installed is None else f"greenlet {installed} (upstream)"
        if FREE_THREADED and installed is None:
            greenlet_row = RunResult(label, not_run=True)
        else:
            greenlet_row = run_suite(
                label, gl_env, tree, version, db_args, False, args.timeout, args.pytest_args
            )
        greenlet_row.remarks[:0] = remarks
        rows.append(greenlet_row)

    print()
    build = "free-threaded" if FREE_THREADED else "GIL"
    print(
        f"SQLAlchemy {version} -- {' '.join(db_args)} -- {' '.join(test_paths(version))}"
        f" -- Python {sys.version.split()[0]} ({build} build)"
    )
    print_table(rows)
    for row in rows:
        for remark in row.remarks:
            print(f"   {row.label}: {remark}")
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
            else (
                [f"{row.failed} failed, {row.errors} errors"]
                if row.failed or row.errors or row.note
                else []
            )
        )
        if row.note and greenlet_row is None:
            problems.append(row.note)
        for p in problems:
            print(f"   WORSE THAN GREENLET: {p}")
        if problems:
            status = 1
    print("conformance: " + ("FAIL" if status else "OK"))
    return status
