"""The start-up hook of sqla-anyio-shim (``SQLA_ANYIO_SHIM=1``).

Python runs :func:`start` at every interpreter start-up, from one of two
files the wheel puts at the top of site-packages:

* ``sqla_anyio_shim.start`` (:pep:`829`, Python 3.15+): its one entry point,
  ``_sqla_anyio_shim_start:start``;
* ``sqla_anyio_shim.pth``, for older interpreters: its one import line,
  ``import os; os.environ.get('SQLA_ANYIO_SHIM', '') not in ('', '0') and
  __import__('_sqla_anyio_shim_start').start()``.  A 3.15+ interpreter that
  finds the ``.start`` file beside it ignores that line (PEP 829), so the
  hook does not run twice; :func:`start` is idempotent all the same.

Without the variable (or with ``0``) :func:`start` returns at once; a
pre-3.15 interpreter does not even import this module.  With it, it arms a
one-shot ``sys.meta_path`` hook and returns: the ``sqla_anyio_shim`` package
(the bridge, asyncio: about 0.1 s) is imported, and the shim installed, only
when SQLAlchemy's top package is first imported (see
:mod:`sqla_anyio_shim._cli._autoinstall`, which also parses
``SQLA_ANYIO_SHIM_OPTIONS`` then).  So a process that never imports
SQLAlchemy -- pip, tox, an editor's language server -- pays for this module
only.

It lives outside the package on purpose, like the ``pytest11`` entry point
(:mod:`_sqla_anyio_shim_pytest`): importing ``sqla_anyio_shim._anything``
would first run the package's ``__init__``.  For the same reason it imports
nothing that ``site`` has not imported already (no :mod:`typing`, no
:mod:`threading`, no ``from __future__``).

PYTEST_DONT_REWRITE: pytest marks every module of a distribution with a
``pytest11`` entry point for assertion rewriting, and this one is imported
before pytest starts whenever ``SQLA_ANYIO_SHIM=1`` (it holds no test
assertions); without the marker pytest warns "Module already imported so
cannot be rewritten".
"""

import os
import sys
from _thread import allocate_lock

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

ENV_FLAG = "SQLA_ANYIO_SHIM"
ENV_OPTIONS = "SQLA_ANYIO_SHIM_OPTIONS"

_lock = allocate_lock()
_armed: "_InstallOnImport | None" = None
_started = False


def report(message: str) -> None:
    """A start-up problem, on stderr: the process goes on without the shim."""
    print(
        f"sqla-anyio-shim: {message}; the shim is NOT installed in this process",
        file=sys.stderr,
    )


class _InstallAfterExec:
    """The real loader of ``sqlalchemy``, plus the armed callback after it ran."""

    def __init__(self, loader: "Any", then: "Callable[[], None]") -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: "ModuleType") -> None:
        # code that looks at sqlalchemy.__loader__ / __spec__.loader
        # (importlib.resources) must see the real loader, never this one
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._then()

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)


class _InstallOnImport:
    """One-shot ``sys.meta_path`` finder: wraps the loader of ``sqlalchemy``."""

    def __init__(self, then: "Callable[[], None]") -> None:
        self.then = then

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None",
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        if fullname != "sqlalchemy" or not disarm(self):
            return None
        # ask the finders behind this one, as the import system would
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec: ModuleSpec | None = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # not a regular package: leave it alone
        spec.loader = _InstallAfterExec(spec.loader, self.then)  # type: ignore[assignment]
        return spec


def disarm(finder: "_InstallOnImport | None" = None) -> bool:
    """Remove the armed hook (only ``finder``, if given); whether it was."""
    global _armed
    with _lock:
        armed = _armed
        if armed is None or (finder is not None and armed is not finder):
            return False
        _armed = None
        try:
            sys.meta_path.remove(armed)
        except ValueError:
            pass
        return True


def arm(then: "Callable[[], None]") -> None:
    """Call ``then()`` right after SQLAlchemy's top package is first
    imported, or now if it already is.  Replaces a hook armed before (the
    launcher's options win over the environment's)."""
    global _armed
    disarm()
    if "sqlalchemy" in sys.modules:
        then()
        return
    finder = _InstallOnImport(then)
    with _lock:
        _armed = finder
        sys.meta_path.insert(0, finder)


def _install_from_environment() -> None:
    from sqla_anyio_shim._cli import _autoinstall

    _autoinstall.install_from_environment()


def start() -> None:
    """The start-up entry point: arm the hook if ``SQLA_ANYIO_SHIM=1``.

    Runs once per process (a second call does nothing); imports nothing.
    """
    global _started
    with _lock:
        if _started:
            return
        _started = True
    flag = os.environ.get(ENV_FLAG, "")
    if flag in ("", "0"):
        return
    if flag != "1":
        report(f"{ENV_FLAG}={flag!r}: set it to 1 to install the shim, or 0 / unset")
        return
    arm(_install_from_environment)
