"""``python -m sqla_anyio_shim run [options] -- TARGET [args]``: run an
unmodified program under the shim.

The convention of monkeypatching libraries (``python -m gevent.monkey
app.py``): install first, then run the target exactly as Python would.
TARGET is one of

* ``-m MODULE``: :func:`runpy.run_module` with ``alter_sys=True``, as
  ``python -m MODULE`` (``sys.argv[0]`` is the module's file, ``sys.path[0]``
  the current directory, both as Python set them for ``-m sqla_anyio_shim``);
* a script path (file, directory or zip with ``__main__.py``):
  :func:`runpy.run_path`, as ``python SCRIPT`` (``sys.path[0]`` is the
  script's directory, not the current one);
* a console-script name (``uvicorn``, ``pytest``, ``alembic``): the
  ``console_scripts`` entry point of this interpreter's environment, called
  as the script pip writes calls it (``sys.argv[0]`` is the script's path,
  ``sys.path[0]`` its directory); failing that, a Python script of that name
  on ``PATH``.

The shim is installed when SQLAlchemy is first imported (see
:mod:`._autoinstall`), not before the target starts: the target's
``sys.path`` is then final, so the SQLAlchemy it imports is the one it would
import without the launcher, and a target that never uses SQLAlchemy pays
nothing.  The launcher also exports ``SQLA_ANYIO_SHIM=1`` and
``SQLA_ANYIO_SHIM_OPTIONS``, so that Python processes the target starts
(uvicorn's ``--workers`` and ``--reload``, pytest-xdist, multiprocessing)
run under the shim too, through the start-up hook of an installed wheel
(``sqla_anyio_shim.pth``, or ``sqla_anyio_shim.start`` on Python 3.15+:
see :mod:`._autoinstall`).

The install options are :func:`sqla_anyio_shim.install`'s keyword
arguments, spelled as command-line options; their parser
(``_options.parse_options``) is shared with ``SQLA_ANYIO_SHIM_OPTIONS``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from .._options import OPTIONS, OptionError, format_options, format_word, parse_options

__all__ = ["USAGE", "main"]


def _option_lines() -> str:
    """The OPTIONS part of the usage, from the one options table."""
    lines = []
    for option in OPTIONS:
        if option.kind.parse is None:
            lines += [f"  {option.flag}", f"      {option.help}"]
        else:
            default = format_word(option, option.default)
            lines += [
                f"  {option.flag} VALUE",
                f"      {option.help};",
                f"      {option.kind.words} (default: {default})",
            ]
    return "\n".join(lines)


USAGE = f"""\
usage: python -m sqla_anyio_shim run [OPTIONS] -- TARGET [ARGS...]

TARGET:  -m MODULE | path/to/script.py | console-script name (uvicorn, pytest, ...)

OPTIONS (install()'s keyword arguments):
{_option_lines()}

The environment variable SQLA_ANYIO_SHIM=1 does the same for processes not
started by hand, with these options in SQLA_ANYIO_SHIM_OPTIONS."""


def _fail(message: str) -> NoReturn:
    print(f"python -m sqla_anyio_shim run: {message}", file=sys.stderr)
    raise SystemExit(2)


def _is_python_script(path: str) -> bool:
    if path.endswith((".py", ".pyw")):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def _set_path0(entry: str | None) -> None:
    """Replace the ``sys.path[0]`` Python set for ``-m sqla_anyio_shim`` (the
    current directory) with the one it sets for the target, or drop it."""
    if getattr(sys.flags, "safe_path", False):
        return  # -P / PYTHONSAFEPATH: Python adds no entry for any target
    if sys.path:
        del sys.path[0]
    if entry is not None:
        sys.path.insert(0, entry)


def _run_script(path: str, args: list[str]) -> None:
    import runpy

    path = os.path.abspath(path)
    # ``python script.py`` puts the directory of the resolved script first;
    # runpy.run_path inserts a directory or zip target itself
    _set_path0(os.path.dirname(os.path.realpath(path)) if os.path.isfile(path) else None)
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")


def _run_module(module: str, args: list[str]) -> None:
    import importlib.util
    import runpy

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or ""
        found = False
    if not found:
        _fail(f"no module named {module!r} (for run -- -m MODULE)")
    # sys.path[0] is already what ``python -m`` sets: the current directory;
    # run_module(alter_sys=True) sets sys.argv[0] to the module's file
    sys.argv = ["-m", *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _console_script(name: str) -> Callable[[], Any] | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="console_scripts"):
        if ep.name == name:
            loaded: Callable[[], Any] = ep.load()
            return loaded
    return None


def _script_path(name: str) -> str:
    """Where the console script ``name`` of this environment lives."""
    import shutil
    import sysconfig

    candidate = os.path.join(sysconfig.get_path("scripts"), name)
    if os.path.isfile(candidate):
        return candidate
    return shutil.which(name) or candidate


def _run_command(name: str, args: list[str]) -> NoReturn:
    import shutil

    func = _console_script(name)
    if func is not None:
        script = _script_path(name)
        _set_path0(os.path.dirname(script))
        sys.argv = [script, *args]
        # what the wrapper pip writes does: sys.exit(main())
        raise SystemExit(func())
    found = shutil.which(name)
    if found is None:
        _fail(
            f"{name!r} is not a file, nor a console script of this Python "
            f"({sys.executable}), nor a command on PATH; "
            "to run a module use: run -- -m MODULE"
        )
    if not _is_python_script(found):
        _fail(
            f"{name!r} on PATH ({found}) is not a Python script; the shim "
            "can only run Python code in this interpreter"
        )
    _run_script(found, args)
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    """``run`` subcommand; returns the exit status (or raises SystemExit as
    the target does)."""
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        kwargs, rest = parse_options(argv)
    except OptionError as exc:
        _fail(f"{exc}\n\n{USAGE}")
    if not rest or (rest[0] == "-m" and len(rest) < 2):
        _fail(f"nothing to run: give -m MODULE, a script or a console-script name\n\n{USAGE}")

    from . import _autoinstall

    # children started by the target run under the shim too (see docstring)
    os.environ[_autoinstall.ENV_FLAG] = "1"
    os.environ[_autoinstall.ENV_OPTIONS] = format_options(kwargs)
    _autoinstall.arm(kwargs, strict=True)

    if rest[0] == "-m":
        _run_module(rest[1], rest[2:])
    elif os.path.exists(rest[0]):
        _run_script(rest[0], rest[1:])
    elif os.sep in rest[0] or rest[0].endswith(".py"):
        _fail(f"no such script: {rest[0]!r}")
    else:
        _run_command(rest[0], rest[1:])
    return 0
