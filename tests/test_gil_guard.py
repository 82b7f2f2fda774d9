"""The GIL guard fails a free-threaded run when an import re-enables the GIL.

CPython's own test extension ``_testmultiphase`` carries a module,
``_testmultiphase_null_slots``, that does not declare ``Py_mod_gil``:
importing it on a free-threaded build switches the GIL on (and warns).  A
symlink named after it puts it on ``sys.path`` like any third-party
extension, and a pytest run with the shim's plugin must then fail, naming
it; the same run without that import must pass and say the GIL stayed off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from sqla_anyio_shim.pytest_plugin import FREE_THREADED

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not FREE_THREADED, reason="only free-threaded builds have a GIL to keep off"
    ),
]

CULPRIT = "_testmultiphase_null_slots"


def _extension_without_gil_slot(tmp_path: Path) -> Path:
    try:
        import _testmultiphase  # type: ignore[import-not-found]
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("this free-threaded build has no _testmultiphase test module")
        pytest.skip("this build has no _testmultiphase test module")
    site = tmp_path / "site"
    site.mkdir()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (site / f"{CULPRIT}{suffix}").symlink_to(_testmultiphase.__file__)
    return site


def _run(tmp_path: Path, body: str, python_flags: list[str]) -> subprocess.CompletedProcess[str]:
    site = _extension_without_gil_slot(tmp_path)
    (tmp_path / "test_probe.py").write_text(f"def test_probe():\n    {body}\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("PYTHON_GIL", None)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [
            sys.executable,
            *python_flags,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "sqla_anyio_shim.pytest_plugin",
            "-q",
            str(tmp_path / "test_probe.py"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_import_that_enables_the_gil_fails_the_run(tmp_path: Path) -> None:
    proc = _run(tmp_path, f"import {CULPRIT}", [])
    out = proc.stdout + proc.stderr
    # the test itself passed: only the guard can have failed the run
    assert "1 passed" in out, out
    assert proc.returncode == 1, out
    assert f"GIL CHECK FAILED: importing '{CULPRIT}' re-enabled the GIL" in out, out


def test_warning_filter_fails_the_import_itself(tmp_path: Path) -> None:
    proc = _run(
        tmp_path, f"import {CULPRIT}", ["-W", "error:The global interpreter lock:RuntimeWarning"]
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed" in out, out
    assert f"to load module '{CULPRIT}'" in out, out
    assert f"GIL CHECK FAILED: importing '{CULPRIT}' re-enabled the GIL" in out, out


def test_clean_run_reports_the_gil_off(tmp_path: Any) -> None:
    proc = _run(tmp_path, "import json", [])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "GIL check: free-threaded build, the GIL stayed off for the whole run" in out, out
