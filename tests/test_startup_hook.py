"""The start-up hook of ``SQLA_ANYIO_SHIM=1``: both files the wheel ships.

* ``sqla_anyio_shim.start`` (PEP 829, Python 3.15+): one entry point,
  resolved like :func:`pkgutil.resolve_name` and called with no arguments;
  with it beside ``sqla_anyio_shim.pth``, 3.15+ ignores the ``.pth``'s
  import line;
* ``sqla_anyio_shim.pth``: that import line, for older interpreters.

No interpreter here has PEP 829 yet, so a subprocess does what its ``site``
would do (:func:`_pep829_site`): run the ``.start`` file's entry points and
skip the ``.pth`` import lines.  The wheel is built once (tests that need
it share a module fixture) and read as a zip.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import _sqla_anyio_shim_start

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120
IN_CI = os.environ.get("CI") == "true"
START = ROOT / "sqla_anyio_shim.start"
PTH = ROOT / "sqla_anyio_shim.pth"


def _entry_points(text: str) -> list[str]:
    """The entry points of a ``.start`` file, as PEP 829 reads it (UTF-8,
    one per line, ``#`` comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLA_ANYIO_SHIM")}
    env.update(extra)
    return env


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


# -- the files ---------------------------------------------------------------


def test_start_file_resolves_to_start() -> None:
    text = START.read_text(encoding="utf-8")
    assert _entry_points(text) == ["_sqla_anyio_shim_start:start"]
    assert pkgutil.resolve_name(text.strip()) is _sqla_anyio_shim_start.start


def test_pth_line_calls_start_only_with_the_variable() -> None:
    lines = [line for line in PTH.read_text(encoding="utf-8").splitlines() if line.strip()]
    expected = (
        "import os; os.environ.get('SQLA_ANYIO_SHIM', '') not in ('', '0') "
        "and __import__('_sqla_anyio_shim_start').start()"
    )
    assert lines == [expected]


def test_start_module_lives_outside_the_package() -> None:
    """Importing it must not run ``sqla_anyio_shim/__init__`` (see its
    docstring); and it imports nothing ``site`` has not imported."""
    spec = importlib.util.find_spec("_sqla_anyio_shim_start")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).parent != ROOT / "sqla_anyio_shim"
    code = textwrap.dedent(
        """
        import sys
        before = set(sys.modules)
        import _sqla_anyio_shim_start
        print(sorted(set(sys.modules) - before))
        """
    )
    proc = _python(code, ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['_sqla_anyio_shim_start']"


# -- the wheel ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once (``pip wheel``; build
    isolation only if this environment lacks setuptools)."""
    out = tmp_path_factory.mktemp("wheel")
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    if importlib.util.find_spec("setuptools") is not None:
        args.append("--no-build-isolation")
    proc = subprocess.run(
        [*args, str(ROOT)], capture_output=True, text=True, timeout=280, check=False
    )
    if proc.returncode != 0:
        if IN_CI:
            pytest.fail(f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}")
        pytest.skip(f"cannot build the wheel here (no setuptools, no index?): {proc.stderr}")
    (found,) = out.glob("sqla_anyio_shim-*.whl")
    return found


@pytest.mark.timeout(300)
def test_wheel_ships_both_startup_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (record_name,) = (n for n in names if n.endswith(".dist-info/RECORD"))
        record = {
            row.split(",")[0]: row.split(",")[1]
            for row in zf.read(record_name).decode().splitlines()
            if row
        }
        for name in ("sqla_anyio_shim.pth", "sqla_anyio_shim.start", "_sqla_anyio_shim_start.py"):
            # at the top of site-packages, byte for byte the checkout's file,
            # and in RECORD (so pip uninstall removes it) with its hash
            assert name in names
            data = zf.read(name)
            assert data == (ROOT / name).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert record[name] == "sha256=" + digest.decode()


def test_installed_distribution_has_both_startup_files() -> None:
    """This environment's install (a wheel under tox and CI, an editable
    one by hand: setup.py adds the files to setuptools' editable wheel)
    has both files beside each other, in its RECORD."""
    from importlib.metadata import distribution

    dist = distribution("sqla-anyio-shim")
    files = {str(f): f for f in dist.files or ()}
    for name in ("sqla_anyio_shim.pth", "sqla_anyio_shim.start"):
        assert name in files, f"{name} is not in the installed RECORD"
        installed = Path(str(files[name].locate()))
        assert installed.read_bytes() == (ROOT / name).read_bytes()
    assert (
        Path(str(files["sqla_anyio_shim.pth"].locate())).parent
        == Path(str(files["sqla_anyio_shim.start"].locate())).parent
    )


# -- start-up, both ways -------------------------------------------------------

#: after start-up: what is imported, and whether the hook is armed
REPORT = textwrap.dedent(
    """
    import json, sys
    import _sqla_anyio_shim_start as hook

    def seen():
        names = ("sqla_anyio_shim", "sqlalchemy", "asyncio")
        return sorted({m.split(".")[0] for m in sys.modules if m.startswith(names)})

    report = {
        "before": seen(),
        "hooks": sum(isinstance(f, hook._InstallOnImport) for f in sys.meta_path),
    }
    import sqlalchemy
    import sqla_anyio_shim
    from sqlalchemy.util import concurrency
    report["installed"] = sqla_anyio_shim.is_installed()
    report["spawn"] = concurrency.greenlet_spawn.__module__
    report["hooks_after"] = sum(isinstance(f, hook._InstallOnImport) for f in sys.meta_path)
    print("REPORT " + json.dumps(report))
    """
)


def _pep829_site(sitedir: Path) -> str:
    """Code that processes ``sitedir`` as a PEP 829 interpreter's ``site``
    would: every ``<name>.start`` file's entry points are called; a
    ``<name>.pth`` with a ``.start`` beside it keeps its path lines only."""
    return textwrap.dedent(
        f"""
        import os, pkgutil, sys
        sitedir = {str(sitedir)!r}
        for name in sorted(os.listdir(sitedir)):
            base, ext = os.path.splitext(name)
            path = os.path.join(sitedir, name)
            if ext == ".pth":
                has_start = os.path.exists(os.path.join(sitedir, base + ".start"))
                for line in open(path, encoding="utf-8"):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    if line.startswith(("import ", "import\\t")):
                        if not has_start:
                            exec(line)
                    else:
                        sys.path.append(os.path.join(sitedir, line))
            elif ext == ".start":
                for line in open(path, encoding="utf-8"):
                    line = line.split("#", 1)[0].strip()
                    if line:
                        pkgutil.resolve_name(line)()
        """
    )


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = (line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    report: dict[str, object] = json.loads(line[len("REPORT ") :])
    return report


def _site_with_both(tmp_path: Path) -> Path:
    sitedir = tmp_path / "site"
    sitedir.mkdir()
    for f in (PTH, START):
        (sitedir / f.name).write_bytes(f.read_bytes())
    return sitedir


def test_pep829_site_installs_the_shim_when_sqlalchemy_is_imported(tmp_path: Path) -> None:
    """3.15+: the ``.start`` entry point alone (the ``.pth`` line skipped)
    arms one hook, imports neither the package nor asyncio, and the shim is
    installed when SQLAlchemy is imported."""
    code = _pep829_site(_site_with_both(tmp_path)) + REPORT
    report = _report(_python(code, tmp_path, SQLA_ANYIO_SHIM="1"))
    assert report == {
        "before": [],
        "hooks": 1,
        "installed": True,
        "spawn": "sqla_anyio_shim._bridge._entry",
        "hooks_after": 0,
    }


def test_pth_site_installs_the_shim_when_sqlalchemy_is_imported(tmp_path: Path) -> None:
    """Before 3.15: ``site`` runs the ``.pth`` import line (and knows nothing
    of ``.start``); the same result."""
    code = f"import site; site.addsitedir({str(_site_with_both(tmp_path))!r})\n" + REPORT
    report = _report(_python(code, tmp_path, SQLA_ANYIO_SHIM="1"))
    assert report["before"] == [] and report["hooks"] == 1
    assert report["installed"] is True and report["spawn"] == "sqla_anyio_shim._bridge._entry"


def test_start_twice_arms_once(tmp_path: Path) -> None:
    """An interpreter that ran both files (it should not) still arms one
    hook and installs once."""
    site_both = _site_with_both(tmp_path)
    code = (
        f"import site; site.addsitedir({str(site_both)!r})\n"
        + _pep829_site(site_both)
        + "import _sqla_anyio_shim_start; _sqla_anyio_shim_start.start()\n"
        + REPORT
    )
    report = _report(_python(code, tmp_path, SQLA_ANYIO_SHIM="1"))
    assert report["hooks"] == 1 and report["installed"] is True


@pytest.mark.parametrize("flag", ["", "0"])
def test_start_without_the_variable_does_nothing(tmp_path: Path, flag: str) -> None:
    code = _pep829_site(_site_with_both(tmp_path)) + REPORT
    report = _report(_python(code, tmp_path, SQLA_ANYIO_SHIM=flag))
    assert report["hooks"] == 0 and report["installed"] is False
    assert report["spawn"] != "sqla_anyio_shim._bridge._entry"


def test_bad_options_are_reported_when_sqlalchemy_is_imported(tmp_path: Path) -> None:
    """The options are parsed with the package, when SQLAlchemy is imported:
    a process that never imports it says nothing; one that does reports
    them and goes on without the shim."""
    site_code = _pep829_site(_site_with_both(tmp_path))
    env = {"SQLA_ANYIO_SHIM": "1", "SQLA_ANYIO_SHIM_OPTIONS": "--max-worker 3"}
    quiet = _python(site_code + "print('ok')\n", tmp_path, **env)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ok"
    assert quiet.stderr == ""
    loud = _python(
        site_code + "import sqlalchemy, sqla_anyio_shim; print(sqla_anyio_shim.is_installed())\n",
        tmp_path,
        **env,
    )
    assert loud.returncode == 0, loud.stderr
    assert loud.stdout.strip() == "False"
    assert "SQLA_ANYIO_SHIM_OPTIONS='--max-worker 3': unknown option '--max-worker'" in loud.stderr
    assert "the shim is NOT installed in this process" in loud.stderr


def test_bad_flag_is_reported_at_start_up(tmp_path: Path) -> None:
    proc = _python(_pep829_site(_site_with_both(tmp_path)), tmp_path, SQLA_ANYIO_SHIM="yes")
    assert proc.returncode == 0
    assert "SQLA_ANYIO_SHIM='yes': set it to 1" in proc.stderr
