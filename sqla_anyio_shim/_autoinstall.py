"""``SQLA_ANYIO_SHIM=1``: the shim in processes nobody starts by hand.

The wheel ships ``sqla_anyio_shim.pth`` at the top of site-packages, and
Python's :mod:`site` runs its one line at every start-up: it imports this
module only if ``os.environ.get('SQLA_ANYIO_SHIM', '') not in ('', '0')``, so
a process without the variable pays one dictionary look-up and imports
nothing (``site`` has imported :mod:`os` already).  With it, this module
reads ``SQLA_ANYIO_SHIM_OPTIONS`` (the launcher's option syntax, e.g.
``--sync-drivers --max-workers 50``) and arms a one-shot import hook that
installs the shim right after SQLAlchemy's top package is first imported --
not at start-up, because

* a process that never uses SQLAlchemy then never imports it (importing it
  takes about 0.4 s on a small machine, in every child process);
* by then ``sys.path`` is final (the script's directory, a source tree's
  ``lib/`` that a test harness puts first), so the shim patches the
  SQLAlchemy the program actually uses.

The launcher (:mod:`._launcher`) arms the same hook, with ``strict=True``.

Errors: a bad value in either variable is reported on stderr, naming the
variable and the option, and the shim is **not installed**; the process goes
on.  A start-up hook runs in every Python process of the environment (pip,
tox, an editor's language server), and failing them all would also break
the tools needed to fix the variable.  The launcher, one command, fails.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

ENV_FLAG = "SQLA_ANYIO_SHIM"
ENV_OPTIONS = "SQLA_ANYIO_SHIM_OPTIONS"

_lock = threading.Lock()
_armed: _InstallOnImport | None = None


def _report(message: str) -> None:
    print(
        f"sqla-anyio-shim: {message}; the shim is NOT installed in this process",
        file=sys.stderr,
    )


def _install(kwargs: dict[str, Any], strict: bool) -> None:
    import sqla_anyio_shim

    from . import _patching

    # An explicit install() imports SQLAlchemy itself, which fires the hook:
    # that install() finishes the job with its own options, and installing
    # from inside it would patch twice.  In another thread it may be waiting
    # for this very import (the module lock we hold): never wait for it.
    lock = _patching._lock
    is_owned = getattr(lock, "_is_owned", None)
    if is_owned is not None and is_owned():
        return
    if not lock.acquire(blocking=False):
        return
    try:
        sqla_anyio_shim.install(**kwargs)
    except Exception as exc:
        if strict:
            raise
        _report(f"install() failed: {type(exc).__name__}: {exc}")
    finally:
        lock.release()


class _InstallAfterExec:
    """The real loader of ``sqlalchemy``, plus :func:`_install` after it ran."""

    def __init__(self, loader: Any, kwargs: dict[str, Any], strict: bool) -> None:
        self._loader = loader
        self._kwargs = kwargs
        self._strict = strict

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        # code that looks at sqlalchemy.__loader__ / __spec__.loader
        # (importlib.resources) must see the real loader, never this one
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _install(self._kwargs, self._strict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _InstallOnImport:
    """One-shot ``sys.meta_path`` finder: wraps the loader of ``sqlalchemy``."""

    def __init__(self, kwargs: dict[str, Any], strict: bool) -> None:
        self.kwargs = kwargs
        self.strict = strict

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname != "sqlalchemy" or not _disarm(self):
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
        spec.loader = _InstallAfterExec(spec.loader, self.kwargs, self.strict)  # type: ignore[assignment]
        return spec


def _disarm(finder: _InstallOnImport | None = None) -> bool:
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


def arm(kwargs: dict[str, Any], *, strict: bool) -> None:
    """Install the shim with ``kwargs`` right after SQLAlchemy is first
    imported, or now if it already is.  Replaces a hook armed before (the
    launcher's options win over the environment's).

    :param strict: let an error of :func:`sqla_anyio_shim.install` (e.g. an
        unsupported SQLAlchemy version) propagate; otherwise report it on
        stderr and go on without the shim.
    """
    global _armed
    _disarm()
    if "sqlalchemy" in sys.modules:
        _install(kwargs, strict)
        return
    finder = _InstallOnImport(kwargs, strict)
    with _lock:
        _armed = finder
        sys.meta_path.insert(0, finder)


def _from_environment() -> None:
    flag = os.environ.get(ENV_FLAG, "")
    if flag in ("", "0"):
        return
    if flag != "1":
        _report(f"{ENV_FLAG}={flag!r}: set it to 1 to install the shim, or 0 / unset")
        return
    import shlex

    from ._launcher import OptionError, parse_options

    text = os.environ.get(ENV_OPTIONS, "")
    try:
        kwargs, rest = parse_options(shlex.split(text))
    except OptionError as exc:
        _report(f"{ENV_OPTIONS}={text!r}: {exc}")
        return
    except ValueError as exc:  # shlex: unbalanced quotes
        _report(f"{ENV_OPTIONS}={text!r}: {exc}")
        return
    if rest:
        _report(
            f"{ENV_OPTIONS}={text!r}: unexpected {rest[0]!r} (it holds install "
            "options only, e.g. '--sync-drivers --max-workers 50')"
        )
        return
    arm(kwargs, strict=False)


_from_environment()
