"""The launcher (``python -m sqla_anyio_shim run``) and ``SQLA_ANYIO_SHIM=1``.

Every form runs in a subprocess, as a user would run it, and the target
reports what it saw: ``sys.argv``, ``sys.path[0]``, ``__name__``, whether the
shim is installed with the options given, and whether ``greenlet`` was ever
imported -- after a real ``AsyncSession`` query through the asyncio
extension (aiosqlite, or sqlite3 in the workers for ``--sync-drivers``).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sqla_anyio_shim._options import OptionError, format_options, parse_options

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120
IN_CI = os.environ.get("CI") == "true"

PROBE = textwrap.dedent(
    """
    import json, os, sys

    import anyio
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    SYNC = "sync" in sys.argv[1:]

    async def query():
        url = ("sqlite:///" if SYNC else "sqlite+aiosqlite:///") + os.path.abspath("probe.db")
        engine = create_async_engine(url)
        try:
            async with AsyncSession(engine) as session:
                return (await session.execute(text("select 40 + 2"))).scalar_one()
        finally:
            await engine.dispose()

    value = anyio.run(query)

    import sqla_anyio_shim
    from sqla_anyio_shim._bridge import _workers

    print("PROBE " + json.dumps({
        "argv": sys.argv,
        "path0": sys.path[0],
        "name": __name__,
        "value": value,
        "installed": sqla_anyio_shim.is_installed(),
        "max_workers": _workers.pool.max_workers,
        "greenlet": "greenlet" in sys.modules,
        "env": [os.environ.get("SQLA_ANYIO_SHIM"), os.environ.get("SQLA_ANYIO_SHIM_OPTIONS")],
    }))
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLA_ANYIO_SHIM")}
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def _launch(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "sqla_anyio_shim", "run", *args], cwd, **env)


def _probe(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    report: dict[str, Any] = json.loads(lines[0][len("PROBE ") :])
    # the asyncio extension worked, on the bridge, and greenlet never loaded
    assert report["value"] == 42
    assert report["installed"] is True
    assert report["greenlet"] is False
    return report


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "probe_script.py").write_text(PROBE)
    return tmp_path


# -- the four forms -------------------------------------------------------


def test_module_form(project: Path) -> None:
    """``run --max-workers 7 -- -m probe a --b``: as ``python -m probe``."""
    args = ["--max-workers", "7", "--slow-call-warning", "none", "--", "-m", "probe", "a", "--b"]
    report = _probe(_launch(args, project))
    assert report["argv"] == [str(project / "probe.py"), "a", "--b"]
    assert report["path0"] == str(project)  # python -m puts the cwd first
    assert report["name"] == "__main__"
    assert report["max_workers"] == 7
    # exported for the target's own child processes
    assert report["env"] == ["1", "--max-workers 7 --slow-call-warning none"]


def test_script_form(project: Path) -> None:
    """``run -- sub/probe_script.py x``: sys.path[0] is the script's
    directory, not the current one, as for ``python sub/probe_script.py``."""
    report = _probe(_launch(["--sync-drivers", "--", "sub/probe_script.py", "x", "sync"], project))
    assert report["argv"] == [str(project / "sub" / "probe_script.py"), "x", "sync"]
    assert report["path0"] == str(project / "sub")
    assert report["name"] == "__main__"
    assert report["env"] == ["1", "--sync-drivers"]


def test_script_form_without_separator(project: Path) -> None:
    report = _probe(_launch(["probe.py", "--max-workers", "3"], project))
    # options after the target belong to the target
    assert report["argv"] == [str(project / "probe.py"), "--max-workers", "3"]
    assert report["max_workers"] is None


def test_console_script_form(project: Path) -> None:
    """``run -- pytest ...``: the console_scripts entry point of this
    environment, with sys.argv[0] the script's path; pytest marks the
    package for assertion rewriting after the launcher imported it, which
    must not warn."""
    (project / "test_probe.py").write_text(
        textwrap.dedent(
            """
            import json, subprocess, sys

            def test_probe():
                child = subprocess.run([sys.executable, "probe.py"], capture_output=True,
                                       text=True, timeout=100, check=False)
                import runpy
                runpy.run_path("probe.py")
                with open("argv.json", "w") as f:
                    json.dump({"argv": sys.argv, "child": [child.returncode, child.stdout]}, f)
            """
        )
    )
    proc = _launch(
        [
            "--",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::pytest.PytestAssertRewriteWarning",
            "-s",
            "test_probe.py",
        ],
        project,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert "cannot be rewritten" not in proc.stdout + proc.stderr
    seen = json.loads((project / "argv.json").read_text())
    script = seen["argv"][0]
    assert Path(script).name == "pytest"
    assert seen["argv"][1:] == [
        "-p",
        "no:cacheprovider",
        "-W",
        "error::pytest.PytestAssertRewriteWarning",
        "-s",
        "test_probe.py",
    ]
    # the probe inside the test ran under the shim the launcher installed
    reports = [
        json.loads(line.split("PROBE ", 1)[1])
        for line in proc.stdout.splitlines()
        if "PROBE {" in line
    ]
    assert len(reports) == 1, proc.stdout
    assert reports[0]["value"] == 42 and reports[0]["installed"] is True
    assert reports[0]["greenlet"] is False
    if _installed_pth() is not None:
        # a child process (plain `python probe.py`) got the shim through the
        # exported SQLA_ANYIO_SHIM=1 and the start-up hook of the wheel
        returncode, out = seen["child"]
        assert returncode == 0, out
        child = json.loads(out.split("PROBE ", 1)[1])
        assert child["installed"] is True and child["greenlet"] is False
        assert child["env"] == ["1", ""]


def test_command_on_path(project: Path) -> None:
    """A Python script found on PATH (not an entry point of this Python)."""
    bindir = project / "bin"
    bindir.mkdir()
    script = bindir / "shimprobe"
    script.write_text("#!/usr/bin/env python3\n" + PROBE)
    script.chmod(0o755)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    report = _probe(_launch(["--", "shimprobe", "one"], project, PATH=path))
    assert report["argv"] == [str(script), "one"]
    assert report["path0"] == str(bindir)


# -- the environment variable ---------------------------------------------


def _installed_pth() -> Path | None:
    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_path("purelib")]
    for d in dirs:
        candidate = Path(d) / "sqla_anyio_shim.pth"
        if candidate.is_file():
            return candidate
    return None


def _startup(project: Path, script: str, *args: str) -> list[str]:
    """The command that starts ``script`` with the start-up hook in effect.

    An install (a wheel under tox and CI, or ``pip install -e``) has
    ``sqla_anyio_shim.pth`` in site-packages: then it is a plain ``python
    script``.  Failing that (an install made before setup.py added the file
    to the editable wheel), the same line is processed the way ``site``
    processes it at start-up, from a site directory made here."""
    if _installed_pth() is not None:
        return [sys.executable, script, *args]
    assert not IN_CI, "CI=true: sqla_anyio_shim.pth is not installed (tox installs the wheel)"
    sitedir = project / "site"
    sitedir.mkdir(exist_ok=True)
    shutil.copy(ROOT / "sqla_anyio_shim.pth", sitedir)
    code = (
        "import site, sys, runpy; site.addsitedir(sys.argv.pop(1)); "
        "sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    return [sys.executable, "-c", code, str(sitedir), script, *args]


def test_pth_is_in_the_wheel_build() -> None:
    """setup.py ships the start-up hook; its one line is the documented one
    (tests/test_startup_hook.py checks the wheel and the PEP 829 file)."""
    line = (ROOT / "sqla_anyio_shim.pth").read_text().strip()
    assert line.startswith("import os;")
    assert "__import__('_sqla_anyio_shim_start').start()" in line
    assert "\n" not in line


def test_env_var_form(project: Path) -> None:
    report = _probe(
        _run(
            _startup(project, "probe.py", "sync"),
            project,
            SQLA_ANYIO_SHIM="1",
            SQLA_ANYIO_SHIM_OPTIONS="--sync-drivers --max-workers 50",
        )
    )
    assert report["max_workers"] == 50  # and the sync driver ran: --sync-drivers


def test_env_var_installs_only_when_sqlalchemy_is_imported(project: Path) -> None:
    """No cost for a process that never uses SQLAlchemy: with the variable
    only the start-up module (the package is imported with SQLAlchemy);
    nothing at all without it."""
    (project / "plain.py").write_text(
        "import sys\n"
        "names = ('sqla_anyio_shim', '_sqla_anyio_shim', 'sqlalchemy', 'asyncio')\n"
        "print(sorted(m for m in sys.modules if m.startswith(names)))\n"
    )
    unset = _run(_startup(project, "plain.py"), project)
    assert unset.returncode == 0, unset.stderr
    assert unset.stdout.strip() == "[]"
    armed = _run(_startup(project, "plain.py"), project, SQLA_ANYIO_SHIM="1")
    assert armed.returncode == 0, armed.stderr
    assert armed.stdout.strip() == "['_sqla_anyio_shim_start']"


@pytest.mark.parametrize(
    ("flag", "options", "expected"),
    [
        (
            "1",
            "--max-worker 3",
            "SQLA_ANYIO_SHIM_OPTIONS='--max-worker 3': unknown option '--max-worker'",
        ),
        ("1", "--idle-timeout 0", "--idle-timeout takes a number of seconds > 0, got '0'"),
        ("1", "--sync-drivers pytest", "unexpected 'pytest'"),
        ("yes", "", "SQLA_ANYIO_SHIM='yes': set it to 1"),
    ],
)
def test_env_var_bad_value_warns_and_does_not_install(
    project: Path, flag: str, options: str, expected: str
) -> None:
    """A bad variable is reported, naming it and the option; the process
    goes on without the shim (see _autoinstall's docstring for why)."""
    (project / "check.py").write_text(
        "import sqlalchemy, sqla_anyio_shim\nprint('installed', sqla_anyio_shim.is_installed())\n"
    )
    proc = _run(
        _startup(project, "check.py"),
        project,
        SQLA_ANYIO_SHIM=flag,
        SQLA_ANYIO_SHIM_OPTIONS=options,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed False"
    assert expected in proc.stderr
    assert "the shim is NOT installed in this process" in proc.stderr


def test_explicit_install_while_armed(project: Path) -> None:
    """Regression: with the hook armed, an explicit install() that imports
    SQLAlchemy itself fires the hook from inside install(); the explicit
    call must win, with no second patching and no deadlock."""
    (project / "explicit.py").write_text(
        textwrap.dedent(
            """
            import sys
            import sqla_anyio_shim
            sqla_anyio_shim.install(max_workers=3)
            assert "sqlalchemy" in sys.modules
            sqla_anyio_shim.uninstall()  # restores exactly: one patching only
            from sqlalchemy.util import concurrency
            assert concurrency.greenlet_spawn.__module__.startswith("sqlalchemy")
            sqla_anyio_shim.install(max_workers=3)
            """
        )
        + PROBE
    )
    report = _probe(
        _run(
            _startup(project, "explicit.py"),
            project,
            SQLA_ANYIO_SHIM="1",
            SQLA_ANYIO_SHIM_OPTIONS="--max-workers 9",
        )
    )
    assert report["max_workers"] == 3


# -- launcher errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--max-workers", "0", "--", "probe.py"],
            "--max-workers takes a whole number >= 1 or 'none', got '0'",
        ),
        (
            ["--handoff-timeout", "soon", "probe.py"],
            "--handoff-timeout takes a number of seconds >= 0 or 'none', got 'soon'",
        ),
        (["--workers", "3", "probe.py"], "unknown option '--workers'"),
        (["--sync-drivers=yes", "probe.py"], "--sync-drivers is a flag and takes no value"),
        (["--idle-timeout"], "--idle-timeout needs a value"),
        (["--"], "nothing to run"),
        (["--", "-m"], "nothing to run"),
        (["--", "-m", "no_such_module_here"], "no module named 'no_such_module_here'"),
        (["--", "missing/script.py"], "no such script: 'missing/script.py'"),
        (["--", "no-such-command-anywhere"], "nor a command on PATH"),
    ],
)
def test_launcher_errors(project: Path, args: list[str], expected: str) -> None:
    proc = _launch(args, project)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr
    assert "PROBE" not in proc.stdout


def test_launcher_refuses_a_non_python_command(project: Path) -> None:
    bindir = project / "bin"
    bindir.mkdir()
    tool = bindir / "nativetool"
    tool.write_bytes(b"\x7fELF\x02\x01\x01")
    tool.chmod(0o755)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = _launch(["--", "nativetool"], project, PATH=path)
    assert proc.returncode == 2
    assert "is not a Python script" in proc.stderr


def test_target_exit_status_and_exception_pass_through(project: Path) -> None:
    (project / "exits.py").write_text("import sys\nsys.exit(7)\n")
    assert _launch(["--", "exits.py"], project).returncode == 7
    (project / "raises.py").write_text("raise RuntimeError('from the target')\n")
    proc = _launch(["--", "raises.py"], project)
    assert proc.returncode == 1
    assert "RuntimeError: from the target" in proc.stderr


# -- option parsing (in-process) -------------------------------------------


def test_parse_options_forms() -> None:
    kwargs, rest = parse_options(
        [
            "--max-workers=4",
            "--idle-timeout",
            "2.5",
            "--max-idle-workers",
            "none",
            "--sync-drivers",
            "--handoff-timeout",
            "NONE",
            "--slow-call-warning=0.25",
            "--",
            "app.py",
            "--max-workers",
            "1",
        ]
    )
    assert kwargs == {
        "max_workers": 4,
        "idle_timeout": 2.5,
        "max_idle_workers": None,
        "sync_drivers": True,
        "handoff_timeout": None,
        "slow_call_warning": 0.25,
    }
    assert rest == ["app.py", "--max-workers", "1"]
    assert parse_options(["-m", "mod", "--sync-drivers"]) == ({}, ["-m", "mod", "--sync-drivers"])
    assert parse_options(["--handoff-timeout", "0"]) == ({"handoff_timeout": 0.0}, [])


def test_options_are_install_keywords() -> None:
    """The one options table is exactly install()'s keyword arguments, with
    the same defaults (a new keyword of install() needs its row)."""
    import inspect

    import sqla_anyio_shim
    from sqla_anyio_shim._options import OPTIONS

    params = {
        name: p.default
        for name, p in inspect.signature(sqla_anyio_shim.install).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert [option.keyword for option in OPTIONS] == list(params)
    for option in OPTIONS:
        assert option.default == params[option.keyword], option.keyword
        assert option.flag == "--" + option.keyword.replace("_", "-")


def test_readme_and_usage_list_every_option() -> None:
    """README's launcher paragraph and ``run --help`` name exactly the
    options of the one table, ``OPTIONS``."""
    import re

    from sqla_anyio_shim._cli._launcher import USAGE
    from sqla_anyio_shim._options import OPTIONS

    flags = [option.flag for option in OPTIONS]

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("The options are `install()`'s keyword arguments:")
    paragraph = readme[start : readme.index("\n\n", start)]
    listed = re.findall(r"`(--[a-z][a-z-]*)[^`]*`", paragraph)
    assert sorted(listed) == sorted(flags)
    assert len(listed) == len(set(listed))
    usage = re.findall(r"^  (--[a-z][a-z-]*)", USAGE, flags=re.MULTILINE)
    assert usage == flags


def test_format_options_round_trip() -> None:
    import shlex

    kwargs = {"max_workers": 4, "sync_drivers": True, "handoff_timeout": None}
    text = format_options(kwargs)
    assert text == "--max-workers 4 --sync-drivers --handoff-timeout none"
    assert parse_options(shlex.split(text)) == (kwargs, [])
    assert format_options({}) == ""


@pytest.mark.parametrize(
    "bad",
    [
        ["--max-idle-workers", "-1"],
        ["--idle-timeout", "nan"],
        ["--handoff-timeout", "-0.1"],
        ["--slow-call-warning", "0"],
        ["--nope"],
    ],
)
def test_parse_options_rejects(bad: list[str]) -> None:
    with pytest.raises(OptionError, match=bad[0]):
        parse_options(bad)
