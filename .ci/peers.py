#!/usr/bin/env python3
"""Peer projects' test suites on the shim, next to the same suites on greenlet.

Published projects built on ``sqlalchemy.ext.asyncio`` are the closest thing
to users' applications that come with tests.  For each pinned project this
script

1. downloads the project's sdist (the test tree comes from it, unmodified)
   and unpacks it into a cache directory;
2. builds two virtual environments from the package index, identical but for
   greenlet: both get the pinned project, its pinned test requirements and
   this repository (its wheel, built once per invocation with ``pip
   wheel <repo>``); the ``shim`` one then has
   greenlet uninstalled, proved by ``import greenlet`` failing;
3. runs the suite in a fresh copy of the test tree in each environment --
   on greenlet as the project's own CI does, and with the shim switched on
   from outside (see :data:`ACTIVATION`) -- once per database the suite
   supports here (embedded SQLite; PostgreSQL through asyncpg when the suite
   takes its URL from the environment);
4. checks, through a tiny pytest plugin of ours loaded with ``-p``
   (:data:`PROBE`), that each run really ran on what it claims: the shim run
   with the shim installed and greenlet never imported, the greenlet run
   without the shim and with greenlet imported;
5. compares the two runs test by test (JUnit XML) and prints a table.

The exit status is non-zero when the shim run has a failing or erroring
test that passed (or was skipped) on greenlet, misses a test the greenlet
run had, collected no test at all, or did not run on what it claims.  A
failure on both sides is reported but is the peer's, not ours.

No file of a peer is changed; each harness adaptation is listed with its
project below (``adaptation``) and in ``docs/peers.md``.

Usage::

    python .ci/peers.py                     # every project, every database
    python .ci/peers.py --project sqlalchemy-crud-plus --db sqlite
    python .ci/peers.py --list

Environment: ``XDG_CACHE_HOME`` (cache root; venvs and sdists live in
``$XDG_CACHE_HOME/sqla-anyio-shim/peers``), ``SQLA_SHIM_PG_HOST``
(``user@host:port``, default ``root@127.0.0.1:5432``), ``CI=true`` (an
unreachable PostgreSQL is an error instead of a skipped database).

Standard library only: it runs before any environment of ours exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# How the shim is switched on for a suite we do not own (--activation
# overrides it for one run; see shim_command()):
# * "launcher": ``python -m sqla_anyio_shim run -- -m pytest ...``, the
#   documented way to run an unmodified program under the shim;
# * "env": ``SQLA_ANYIO_SHIM=1 python -m pytest ...``, the start-up hook of
#   the installed wheel (for processes nobody starts by hand);
# * "sitecustomize": a sitecustomize.py of ours on PYTHONPATH calls
#   install() at interpreter start, as a user without either would.
ACTIVATION = "launcher"
ACTIVATIONS = ("launcher", "env", "sitecustomize")

# pytest's per-run bound: a hung suite is a finding, not a stuck CI job
RUN_TIMEOUT = 900.0
# per-test bound (pytest-timeout): a deadlock names its test
TEST_TIMEOUT = 120

PYTEST = ["pytest==9.2.0", "pytest-asyncio==1.5.0", "pytest-timeout==2.4.0"]
GREENLET = "greenlet==3.5.6"


@dataclass(frozen=True)
class Database:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    postgresql: bool = False
    # appended to the project's pytest arguments (a -m selection, a plugin)
    pytest_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Project:
    name: str
    version: str
    # pinned: the direct requirements that decide what is tested
    requirements: tuple[str, ...]
    databases: tuple[Database, ...]
    pytest_args: tuple[str, ...] = ("tests",)
    adaptation: str = "none"
    # run without --project; the heavy ones are opt-in (CI's time budget)
    default: bool = True

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


# The PostgreSQL URL placeholder {pg} is filled in from SQLA_SHIM_PG_HOST and
# a database of our own per project (pg_database()), dropped and created
# afresh before each run: a peer's tables never meet those of the other
# suites sharing the server (nor another project's, when two runners run at
# once), and a run never meets the rows its twin left (advanced-alchemy's
# loader tests fail on a used database, on greenlet as on the shim).
PEERS_PG_DB = "sqla_peers"


def pg_database(project: Project) -> str:
    return f"{PEERS_PG_DB}_{re.sub(r'[^a-z0-9]+', '_', project.name.lower())}"


PROJECTS: tuple[Project, ...] = (
    Project(
        name="fastapi-users-db-sqlalchemy",
        version="7.0.0",
        # the project requires sqlalchemy<2.1: this is the 2.0 line's peer
        requirements=(
            "sqlalchemy==2.0.58",
            "fastapi-users==15.0.5",
            "pydantic==2.14.4",
            "aiosqlite==0.22.1",
            "asyncpg==0.32.0",
        ),
        databases=(
            Database("sqlite"),
            Database(
                "postgresql+asyncpg",
                {"DATABASE_URL": "postgresql+asyncpg://{pg}"},
                postgresql=True,
            ),
        ),
        adaptation=(
            "none; PostgreSQL through the suite's own DATABASE_URL variable"
        ),
    ),
    Project(
        name="sqlalchemy-crud-plus",
        version="1.13.3",
        # allows SQLAlchemy 2.1: this is the 2.1 line's peer
        requirements=(
            "sqlalchemy==2.1.9",
            "pydantic==2.14.4",
            "aiosqlite==0.22.1",
        ),
        # its conftest hard-codes sqlite+aiosqlite:///:memory:
        databases=(Database("sqlite"),),
        adaptation="none",
    ),
    Project(
        name="sqlmodel",
        version="0.0.50",
        requirements=(
            "sqlalchemy==2.1.9",
            "pydantic==2.14.4",
            "aiosqlite==0.22.1",
        ),
        databases=(Database("sqlite"),),
        # the rest of its suite is sync SQLAlchemy and its docs' examples
        pytest_args=("tests/test_asyncio.py",),
        adaptation="only its asyncio tests (tests/test_asyncio.py) are run",
    ),
    Project(
        name="alchemical",
        version="1.0.3",
        requirements=(
            "sqlalchemy==2.1.9",
            "aiosqlite==0.22.1",
        ),
        databases=(Database("sqlite"),),
        # unittest classes, one asyncio.run() per test; the rest of its
        # suite is sync (and Flask)
        pytest_args=("tests/test_aio.py",),
        adaptation="only its asyncio tests (tests/test_aio.py) are run",
    ),
    Project(
        name="advanced-alchemy",
        version="1.12.0",
        # its test tree imports every integration it has (Litestar, FastAPI,
        # Flask, Sanic, Spanner, Oracle, DuckDB, ...): about 3 minutes of
        # installing per environment, hence opt-in
        requirements=(
            "sqlalchemy==2.0.58",  # 1.12.0's tests do not collect on 2.1
            "alembic==1.20.1",
            "aiosqlite==0.22.1",
            "asyncpg==0.32.0",
            "pytest-databases[postgres,oracle,cockroachdb,bigquery,spanner]==0.19.0",
            "pytest-lazy-fixtures==1.4.1",
            "pytest-mock==3.17.0",
            "pytest-click==1.1.0",
            "pytest-xdist==3.8.0",
            "time-machine==3.6.0",
            "attrs==26.1.0",
            "cattrs==26.2.1",
            "sqlmodel==0.0.50",
            "dishka==1.10.1",
            "dogpile.cache==1.5.0",
            "pydantic==2.14.4",
            "pydantic-extra-types==2.11.1",
            "numpy==2.4.6",
            "pgvector==0.5.1",
            "cryptography==50.0.2",
            "pyotp==2.12.1",
            "rich-click==1.9.9",
            "click==8.5.1",
            "fsspec[s3]==2026.6.0",  # its uv.lock's; newer ones reject "memory://"
            "obstore==0.11.0",
            "passlib==1.7.4",
            "pwdlib[argon2]==0.3.1",
            "argon2-cffi==25.1.0",
            "asgi-lifespan==2.1.0",
            "psycopg[binary,pool]==3.3.9",
            "litestar[cli]==2.25.0",
            "fastapi[all]==0.165.0",
            "flask-sqlalchemy==3.1.1",
            "flask[async]==3.1.3",
            "sanic[ext]==25.12.1",
            "sanic-testing==24.6.0",
            "duckdb==2.0.1",
            "duckdb-engine==0.17.0",
            "pytz==2026.6",
            "asyncmy==0.2.18",
            "oracledb==26.1.0",
            "sqlalchemy-spanner==1.20.1",
        ),
        pytest_args=("tests/integration", "-p", "no:sugar"),
        databases=(
            Database("sqlite+aiosqlite", pytest_args=("-m", "aiosqlite")),
            Database(
                "postgresql+asyncpg",
                {"SQLA_PEERS_PG": "{pg}"},
                postgresql=True,
                pytest_args=("-m", "asyncpg", "-p", "sqla_peers_pg"),
            ),
        ),
        adaptation=(
            "tests/integration only, selected by the suite's own driver markers "
            "(-m aiosqlite, -m asyncpg); its PostgreSQL fixture comes from "
            "pytest-databases, which starts a Docker container: our plugin "
            "sqla_peers_pg (-p) redefines postgres_service to point at the "
            "local server"
        ),
        default=False,
    ),
)

PROBE = "sqla_peers_probe"
PROBE_SOURCE = '''\
"""Loaded by .ci/peers.py with ``-p sqla_peers_probe``: records at the end
of the session what the run really ran on."""
import json
import os
import sys


def pytest_sessionfinish(session, exitstatus):
    report = {
        "greenlet_imported": "greenlet" in sys.modules,
        "shim_installed": False,
        "greenlet_spawn": None,
    }
    if "sqla_anyio_shim" in sys.modules:
        report["shim_installed"] = bool(sys.modules["sqla_anyio_shim"].is_installed())
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.util import concurrency

        fn = concurrency.greenlet_spawn
        report["greenlet_spawn"] = f"{fn.__module__}.{fn.__qualname__}"
    with open(os.environ["SQLA_PEERS_PROBE"], "w") as f:
        json.dump(report, f)
'''

PG_PLUGIN = "sqla_peers_pg"
PG_PLUGIN_SOURCE = '''\
"""Loaded by .ci/peers.py with ``-p sqla_peers_pg`` (advanced-alchemy): the
suite's PostgreSQL fixtures come from pytest-databases, which starts a Docker
container; this points them at the local server named by SQLA_PEERS_PG
(``user@host:port/database``, no password) instead."""
import os

import pytest


class _LocalPostgres:
    @pytest.fixture(scope="session")
    def postgres_service(self):
        from pytest_databases.docker.postgres import PostgresService

        userhost, database = os.environ["SQLA_PEERS_PG"].rsplit("/", 1)
        user, hostport = userhost.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return PostgresService(
            container=None, host=host, port=int(port), user=user, password="",
            database=database,
        )


def pytest_configure(config):
    # registered after the initial conftests, whose pytest_plugins bring
    # pytest-databases' own postgres_service: the later definition wins
    config.pluginmanager.register(_LocalPostgres(), "sqla_peers_local_postgres")
'''

SITECUSTOMIZE_SOURCE = '''\
# written by .ci/peers.py: switch the shim on before the suite starts, as a
# user without the launcher would
import sqla_anyio_shim

sqla_anyio_shim.install()
'''


# --------------------------------------------------------------------------
# environments


def _run(cmd: Sequence[str], **kw: object) -> None:
    print("   $ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(list(cmd), check=True, **kw)  # type: ignore[call-overload]


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def cache_root(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "sqla-anyio-shim" / "peers"


def fetch_sdist(project: Project, cache: Path) -> Path:
    """The project's sdist, downloaded once and kept packed: each run gets
    a fresh unpacked copy of it (see fresh_tree)."""
    download = cache / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    stem = project.name.replace("-", "_")
    found = sorted(download.glob(f"{stem}-{project.version}.tar.gz"))
    if not found:
        _run([
            sys.executable, "-m", "pip", "download", "-q", "--no-deps",
            "--no-binary", ":all:", f"{project.name}=={project.version}",
            "-d", str(download),
        ])
        found = sorted(download.glob(f"{stem}-{project.version}.tar.gz"))
    if not found:
        raise SystemExit(f"no sdist of {project.key} was downloaded into {download}")
    return found[0]


def fresh_tree(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist into ``dest`` afresh (no state left by a previous
    run: SQLite files, __pycache__)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+/3.11.4+: refuse odd members
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    if not (root / "tests").is_dir():
        raise SystemExit(f"{sdist.name} has no tests/ directory")
    return root


def build_shim_wheel(source: Path, cache: Path) -> Path:
    """This repository as a wheel, built once per invocation: every
    environment installs the same file (ten in-tree builds would be slow, and
    two at once collide in setuptools' build/ directory)."""
    out = cache / "wheel"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)])
    wheels = sorted(out.glob("sqla_anyio_shim-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"building {source} gave {[w.name for w in wheels]}, not one wheel")
    return wheels[0]


def make_env(kind: str, project: Project, sdist: Path, cache: Path, shim: Path) -> Path:
    """The ``greenlet`` or ``shim`` environment of ``project``; ``shim`` is
    this repository's wheel."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    env = cache / "venvs" / f"{project.key}-py{py}-{kind}"
    python = _python(env)
    requirements = [str(sdist), *project.requirements, *PYTEST]
    if kind == "greenlet":
        # SQLAlchemy 2.1 no longer pulls greenlet in by itself
        requirements.append(GREENLET)
    marker = env / ".requirements"
    wanted = "\n".join(requirements)
    if not python.exists() or not marker.exists() or marker.read_text() != wanted:
        print(f"-- building the {kind} environment of {project.key} at {env}", flush=True)
        if env.exists():
            shutil.rmtree(env)
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
        # --no-compile: byte-compiling every installed module is a good part of
        # the build time; the runs compile the few modules they import
        _run([str(python), "-m", "pip", "install", "-q", "--no-compile",
              *requirements, str(shim)])
        marker.write_text(wanted)
    else:
        # the repository changes between runs; its dependencies do not
        _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
              "--force-reinstall", str(shim)])
    if kind == "shim":
        # SQLAlchemy 2.0's wheels pull greenlet in; 2.1's do not
        subprocess.run(
            [str(python), "-m", "pip", "uninstall", "-q", "-y", "greenlet"],
            check=False, capture_output=True,
        )
        probe = subprocess.run([str(python), "-c", "import greenlet"], capture_output=True)
        if probe.returncode == 0:
            raise SystemExit(f"greenlet is still importable in {env}")
        print(f"   greenlet is not importable in {env.name}", flush=True)
    else:
        probe = subprocess.run([str(python), "-c", "import greenlet"], capture_output=True)
        if probe.returncode != 0:
            raise SystemExit(f"greenlet is not importable in {env}: no baseline")
    return env


def write_harness(cache: Path) -> tuple[Path, Path]:
    """Directories for PYTHONPATH: the probe plugin (both runs) and the
    sitecustomize that switches the shim on (shim run, sitecustomize mode)."""
    probe_dir = cache / "harness" / "probe"
    site_dir = cache / "harness" / "sitecustomize"
    for d in (probe_dir, site_dir):
        d.mkdir(parents=True, exist_ok=True)
    (probe_dir / f"{PROBE}.py").write_text(PROBE_SOURCE)
    (probe_dir / f"{PG_PLUGIN}.py").write_text(PG_PLUGIN_SOURCE)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE_SOURCE)
    return probe_dir, site_dir


def shim_command(
    activation: str, python: Path, pytest_argv: list[str], env: dict[str, str],
    site_dir: Path, options: list[str],
) -> list[str]:
    """The command line (and environment, updated in place) of a shim run.
    Every form runs pytest as ``python -m pytest`` does (the current
    directory first on sys.path), as the greenlet run does.  ``options``:
    the launcher's install options (``--handoff-timeout 0``)."""
    if activation == "launcher":
        return [str(python), "-m", "sqla_anyio_shim", "run", *options, "--",
                "-m", "pytest", *pytest_argv]
    if activation == "env":
        env["SQLA_ANYIO_SHIM"] = "1"
        if options:
            env["SQLA_ANYIO_SHIM_OPTIONS"] = " ".join(options)
    elif options:
        raise SystemExit("--shim-options needs --activation launcher or env")
    elif activation == "sitecustomize":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_dir), env.get("PYTHONPATH")]))
    else:
        raise SystemExit(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    return [str(python), "-m", "pytest", *pytest_argv]


# --------------------------------------------------------------------------
# PostgreSQL


def pg_host() -> str:
    return os.environ.get("SQLA_SHIM_PG_HOST") or "root@127.0.0.1:5432"


PG_PREPARE = '''\
import asyncio, sys
import asyncpg

async def main(dsn, name):
    conn = await asyncio.wait_for(asyncpg.connect(dsn), 10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
'''


def prepare_pg(python: Path, database: str) -> str | None:
    """Create ``database`` afresh; None when done, else why not."""
    proc = subprocess.run(
        [str(python), "-c", PG_PREPARE, f"postgresql://{pg_host()}/test", database],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"PostgreSQL at {pg_host()} is not usable: {last}"
    return None


# --------------------------------------------------------------------------
# runs and results

OUTCOME_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}


@dataclass
class Run:
    label: str
    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    exit_code: int = 0
    seconds: float = 0.0
    probe: dict[str, object] = field(default_factory=dict)
    problem: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)

    def summary(self) -> str:
        return "/".join(
            str(self.count(o)) for o in ("passed", "failed", "skipped", "error")
        )


def parse_junit(path: Path, run: Run) -> None:
    """Per test id (``module.Class::name``), the worst outcome of its
    testcase elements (a teardown error is reported as a second element)."""
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip()
                break
        previous = run.outcomes.get(test_id)
        if previous is None or OUTCOME_RANK[outcome] > OUTCOME_RANK[previous]:
            run.outcomes[test_id] = outcome
            run.messages[test_id] = message.splitlines()[0][:160] if message else ""


def run_suite(
    kind: str,
    project: Project,
    db: Database,
    env_dir: Path,
    sdist: Path,
    cache: Path,
    probe_dir: Path,
    site_dir: Path,
    activation: str,
    options: list[str],
) -> Run:
    label = f"{project.key} [{db.name}] {kind}"
    run = Run(label)
    work = cache / "runs" / f"{project.key}-{db.name}-{kind}"
    if work.exists():
        # a previous run's JUnit XML or probe report must never be read as this one's
        shutil.rmtree(work)
    tree = fresh_tree(sdist, work / "tree")
    junit = work / "junit.xml"
    probe_file = work / "probe.json"
    log = work / "pytest.log"
    python = _python(env_dir)
    pytest_argv = [
        "-p", "no:cacheprovider", "-p", PROBE, "-q", "-rfEs",
        f"--timeout={TEST_TIMEOUT}", f"--junitxml={junit}", *project.pytest_args,
        *db.pytest_args,
    ]
    environ = dict(os.environ)
    for var in ("PYTHONPATH", "SQLA_ANYIO_SHIM", "SQLA_ANYIO_SHIM_OPTIONS"):
        environ.pop(var, None)
    environ["PYTHONPATH"] = str(probe_dir)
    environ["SQLA_PEERS_PROBE"] = str(probe_file)
    pg_url = f"{pg_host()}/{pg_database(project)}"
    environ.update({k: v.replace("{pg}", pg_url) for k, v in db.env.items()})
    if kind == "shim":
        cmd = shim_command(activation, python, pytest_argv, environ, site_dir, options)
    else:
        cmd = [str(python), "-m", "pytest", *pytest_argv]
    shown_env = " ".join(
        f"{k}={environ[k]}"
        for k in ("PYTHONPATH", "SQLA_ANYIO_SHIM", "SQLA_ANYIO_SHIM_OPTIONS", *db.env)
        if k in environ
    )
    print(f"-- {label}", flush=True)
    print(f"   $ (cd {tree} && {shown_env} {' '.join(cmd)}) > {log}", flush=True)
    start = time.monotonic()
    try:
        with open(log, "w") as out:
            proc = subprocess.run(
                cmd, cwd=tree, env=environ, stdout=out, stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
            )
        run.exit_code = proc.returncode
    except subprocess.TimeoutExpired:
        run.exit_code = -1
        run.problem = f"did not finish within {RUN_TIMEOUT:.0f} s"
    run.seconds = time.monotonic() - start
    if junit.exists():
        parse_junit(junit, run)
    closing = pytest_summary(log) or (
        f"{run.count('passed')} passed, {run.count('failed')} failed, "
        f"{run.count('skipped')} skipped, {run.count('error')} errors (JUnit XML)"
    )
    print(f"   {closing}  ({run.seconds:.1f} s)", flush=True)
    if not run.problem and run.exit_code not in (0, 1):
        run.problem = f"pytest exited {run.exit_code} (see {log})"
    if not run.outcomes and not run.problem:
        run.problem = f"no test was collected (see {log})"
    if probe_file.exists():
        run.probe = json.loads(probe_file.read_text())
        run.problem = run.problem or check_probe(kind, run.probe)
    elif not run.problem:
        run.problem = "the probe plugin wrote no report"
    return run


def pytest_summary(log: Path) -> str:
    """pytest's closing line ("6 passed in 0.42s"), or '' (-qq has none)."""
    lines = log.read_text(errors="replace").strip().splitlines() or [""]
    for line in reversed(lines):
        # (-qq, as a suite's addopts plus ours give, drops the " in 1.2s")
        if re.match(r"=* ?(\d+ (passed|failed|errors?|skipped|deselected)\b|no tests ran)", line):
            return line.strip("= ")
    return ""


def check_probe(kind: str, probe: dict[str, object]) -> str:
    """'' when the run ran on what it claims, else what is wrong."""
    if kind == "shim":
        if not probe.get("shim_installed"):
            return "the shim was not installed during the run"
        if probe.get("greenlet_imported"):
            return "greenlet was imported during the shim run"
        if not str(probe.get("greenlet_spawn", "")).startswith("sqla_anyio_shim."):
            return f"greenlet_spawn is {probe.get('greenlet_spawn')}, not the shim's"
    else:
        if probe.get("shim_installed"):
            return "the shim was installed during the greenlet run"
        if not probe.get("greenlet_imported"):
            return "greenlet was never imported during the greenlet run"
    return ""


@dataclass
class Row:
    project: Project
    db: Database
    greenlet: Run | None = None
    shim: Run | None = None
    note: str = ""
    differences: list[tuple[str, str, str, str]] = field(default_factory=list)
    regressions: int = 0


def compare(row: Row) -> None:
    g, s = row.greenlet, row.shim
    assert g is not None and s is not None
    bad = ("failed", "error")
    for test_id in sorted(set(g.outcomes) | set(s.outcomes)):
        go = g.outcomes.get(test_id, "missing")
        so = s.outcomes.get(test_id, "missing")
        if go == so:
            continue
        row.differences.append((test_id, go, so, s.messages.get(test_id, "")))
        if (so in bad or so == "missing") and go not in bad:
            row.regressions += 1


def print_table(rows: list[Row]) -> None:
    print()
    print("== peer suites: greenlet vs shim (passed/failed/skipped/error)")
    header = ("project", "version", "database", "greenlet", "shim", "differ", "seconds g/s")
    lines = [header]
    for r in rows:
        if r.greenlet is None or r.shim is None:
            lines.append((r.project.name, r.project.version, r.db.name, "-", "-", "-", r.note))
            continue
        lines.append((
            r.project.name, r.project.version, r.db.name,
            r.greenlet.summary(), r.shim.summary(), str(len(r.differences)),
            f"{r.greenlet.seconds:.1f}/{r.shim.seconds:.1f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = (cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        print("  " + "  ".join(cells).rstrip())
    for r in rows:
        for run in (r.greenlet, r.shim):
            if run is not None and run.problem:
                print(f"  !! {run.label}: {run.problem}")
        for test_id, go, so, msg in r.differences:
            print(f"  {r.project.name} [{r.db.name}] {test_id}: greenlet {go}, shim {so}"
                  + (f" -- {msg}" if msg else ""))
        if r.greenlet is not None:
            both = [t for t, o in r.greenlet.outcomes.items()
                    if o in ("failed", "error")
                    and r.shim is not None and r.shim.outcomes.get(t) == o]
            for t in both:
                print(f"  {r.project.name} [{r.db.name}] {t}: {r.greenlet.outcomes[t]} "
                      "on both (the peer's, not the shim's)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", action="append", default=[],
                        help="run only this project (repeatable; opt-in ones too)")
    parser.add_argument("--all", action="store_true",
                        help="every project, the opt-in (slow to install) ones too")
    parser.add_argument("--db", action="append", default=[],
                        help="run only this database, e.g. sqlite (repeatable)")
    parser.add_argument("--cache", help="cache directory (default: under XDG_CACHE_HOME)")
    parser.add_argument("--shim", default=str(REPO),
                        help="the sqla-anyio-shim source tree to install (default: this checkout)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=ACTIVATION,
                        help=f"how the shim run switches the shim on (default: {ACTIVATION})")
    parser.add_argument("--shim-options", default="", metavar="OPTIONS",
                        help="install options for the shim run, in the launcher's syntax "
                        "(e.g. '--handoff-timeout 0')")
    parser.add_argument("--list", action="store_true", help="list the pinned projects and exit")
    args = parser.parse_args(argv)

    if args.list:
        for p in PROJECTS:
            dbs = ", ".join(d.name for d in p.databases)
            opt = "" if p.default else "  (opt-in)"
            print(f"{p.name}=={p.version}  [{dbs}]{opt}  requires {' '.join(p.requirements)}")
            print(f"    adaptation: {p.adaptation}")
        return 0
    names = {p.name for p in PROJECTS}
    unknown = sorted(set(args.project) - names)
    if unknown:
        parser.error(f"unknown project(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    projects = [
        p for p in PROJECTS
        if p.name in args.project or (not args.project and (p.default or args.all))
    ]

    cache = cache_root(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    probe_dir, site_dir = write_harness(cache)
    strict = os.environ.get("CI") == "true"
    activation = " ".join(filter(None, [args.activation, args.shim_options]))
    print(f"== peers: cache {cache}, shim from {args.shim}, activation {activation}, "
          f"Python {sys.version.split()[0]}", flush=True)

    shim_wheel = build_shim_wheel(Path(args.shim), cache)
    rows: list[Row] = []
    failed = False
    for project in projects:
        sdist = fetch_sdist(project, cache)
        envs = {
            kind: make_env(kind, project, sdist, cache, shim_wheel)
            for kind in ("greenlet", "shim")
        }
        for db in project.databases:
            if args.db and db.name.split("+")[0] not in args.db and db.name not in args.db:
                continue
            row = Row(project, db)
            rows.append(row)
            runs: dict[str, Run] = {}
            for kind in ("greenlet", "shim"):
                problem = (
                    prepare_pg(_python(envs["greenlet"]), pg_database(project))
                    if db.postgresql else None
                )
                if problem:
                    row.note = problem + ("" if strict else " (skipped: CI is not true)")
                    print(f"!! {row.note}", flush=True)
                    failed = failed or strict
                    break
                runs[kind] = run_suite(kind, project, db, envs[kind], sdist,
                                       cache, probe_dir, site_dir, args.activation,
                                       shlex.split(args.shim_options))
            if row.note:
                continue
            row.greenlet, row.shim = runs["greenlet"], runs["shim"]
            compare(row)
            if row.regressions or row.greenlet.problem or row.shim.problem:
                failed = True
    print_table(rows)
    if not rows:
        print("no project/database matched the selection", file=sys.stderr)
        return 2
    print("peers: " + ("FAILED (the shim run is worse than greenlet's, or a run is unusable)"
                       if failed else "OK (no test fails on the shim that passes on greenlet)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
