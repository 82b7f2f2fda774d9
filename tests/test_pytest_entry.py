"""The ``pytest11`` entry point costs nothing and warns about nothing.

Each scenario is a pytest run in a subprocess on a tiny project, with
``-W error::pytest.PytestAssertRewriteWarning``: pytest marks every
top-level package of a distribution that has a ``pytest11`` entry point for
assertion rewriting, and warns "Module already imported so cannot be
rewritten" when the package was imported before (``sitecustomize``, the
launcher, ``SQLA_ANYIO_SHIM=1``).  The package's docstring opts out with
``PYTEST_DONT_REWRITE``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TIMEOUT = 120

#: the project's test: what the entry point loaded, and what it did not
PROBE_TEST = textwrap.dedent(
    """
    import sys

    def test_entry(request):
        pm = request.config.pluginmanager
        assert pm.has_plugin("sqla_anyio_shim"), "the pytest11 entry point is not loaded"
        assert "_sqla_anyio_shim_pytest" in sys.modules
        print("LOADED", sorted(m for m in sys.modules if m.startswith("sqla_anyio_shim")))
        print("PLUGIN", pm.has_plugin("sqla_anyio_shim.pytest_plugin"))
        if "sqla_anyio_shim" in sys.modules:
            print("INSTALLED", sys.modules["sqla_anyio_shim"].is_installed())
    """
)


def _pytest(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SQLA_ANYIO_SHIM")}
    environ.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    environ.pop("PYTEST_ADDOPTS", None)
    environ.update(env)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::pytest.PytestAssertRewriteWarning",
            "-s",
            *args,
        ],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert "cannot be rewritten" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    return proc


def _line(proc: subprocess.CompletedProcess[str], key: str) -> str:
    for line in proc.stdout.splitlines():
        if key + " " in line:
            return line.split(key + " ", 1)[1]
    raise AssertionError(f"no {key} line in\n{proc.stdout}")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "test_entry.py").write_text(PROBE_TEST)
    return tmp_path


def test_entry_point_imports_nothing_of_the_package(project: Path) -> None:
    """A project that never passes --sqla-anyio-shim: the entry point is
    loaded, the package is not imported at all."""
    proc = _pytest(project)
    assert _line(proc, "LOADED") == "[]"
    assert _line(proc, "PLUGIN") == "False"


def test_option_registers_the_plugin(project: Path) -> None:
    proc = _pytest(project, "--sqla-anyio-shim")
    assert _line(proc, "PLUGIN") == "True"
    assert _line(proc, "INSTALLED") == "True"


def test_package_imported_in_conftest(project: Path) -> None:
    (project / "conftest.py").write_text("import sqla_anyio_shim\nsqla_anyio_shim.install()\n")
    proc = _pytest(project)
    assert _line(proc, "INSTALLED") == "True"


def test_package_imported_before_pytest_starts(project: Path) -> None:
    """The case of the report: install() in sitecustomize.py, then pytest.
    (With a wheel install pytest marks the package itself; an editable
    install marks only the entry module, so conftest.py marks the package
    the same way, through pytest's public register_assert_rewrite.)"""
    sitedir = project / "site"
    sitedir.mkdir()
    (sitedir / "sitecustomize.py").write_text("import sqla_anyio_shim\nsqla_anyio_shim.install()\n")
    (project / "conftest.py").write_text(
        "import pytest\npytest.register_assert_rewrite('sqla_anyio_shim')\n"
    )
    path = os.pathsep.join(filter(None, [str(sitedir), os.environ.get("PYTHONPATH")]))
    proc = _pytest(project, PYTHONPATH=path)
    assert _line(proc, "INSTALLED") == "True"


def test_start_module_imported_before_pytest_starts(project: Path) -> None:
    """``SQLA_ANYIO_SHIM=1``: the start-up module is imported before pytest
    starts (its docstring opts out too).  Its start() is called here as
    site would call it; conftest.py marks it as a wheel install would."""
    sitedir = project / "site"
    sitedir.mkdir()
    (sitedir / "sitecustomize.py").write_text(
        "import _sqla_anyio_shim_start\n_sqla_anyio_shim_start.start()\n"
    )
    (project / "conftest.py").write_text(
        "import pytest\npytest.register_assert_rewrite('_sqla_anyio_shim_start')\n"
    )
    path = os.pathsep.join(filter(None, [str(sitedir), os.environ.get("PYTHONPATH")]))
    proc = _pytest(project, PYTHONPATH=path, SQLA_ANYIO_SHIM="1")
    assert _line(proc, "PLUGIN") == "False"


def test_the_check_can_fail(project: Path) -> None:
    """The same pytest run does warn for a package imported early without
    the marker: the scenarios above would catch a regression."""
    sitedir = project / "site"
    (sitedir / "earlypkg").mkdir(parents=True)
    (sitedir / "earlypkg" / "__init__.py").write_text('"""no marker"""\n')
    (sitedir / "sitecustomize.py").write_text("import earlypkg\n")
    (project / "conftest.py").write_text(
        "import pytest\npytest.register_assert_rewrite('earlypkg')\n"
    )
    path = os.pathsep.join(filter(None, [str(sitedir), os.environ.get("PYTHONPATH")]))
    with pytest.raises(AssertionError, match="cannot be rewritten"):
        _pytest(project, PYTHONPATH=path)
