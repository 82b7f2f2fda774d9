"""``SQLA_ANYIO_SHIM=1``: the shim in processes nobody starts by hand.

The wheel ships a start-up hook at the top of site-packages:
``sqla_anyio_shim.start`` (:pep:`829`, Python 3.15+) and
``sqla_anyio_shim.pth`` (older interpreters; 3.15+ ignores its import line
when the ``.start`` file is beside it).  Both run
:func:`_sqla_anyio_shim_start.start`, a top-level module outside this
package: without the variable it does nothing (before 3.15 the ``.pth`` line
does not even import it: one dictionary look-up, ``site`` has imported
:mod:`os` already).  With it, it arms a one-shot import hook **without
importing this package**; the hook imports this module right after
SQLAlchemy's top package is first imported, and :func:`install_from_environment`
then reads ``SQLA_ANYIO_SHIM_OPTIONS`` (the launcher's option syntax, e.g.
``--sync-drivers --max-workers 50``) and installs the shim -- not at
start-up, because

* a process that never uses SQLAlchemy then never imports it (importing it
  takes about 0.4 s on a small machine, in every child process), nor this
  package (about 0.1 s: the bridge imports asyncio);
* by then ``sys.path`` is final (the script's directory, a source tree's
  ``lib/`` that a test harness puts first), so the shim patches the
  SQLAlchemy the program actually uses.

The launcher (:mod:`._launcher`) arms the same hook (:func:`arm`), with
``strict=True``.

Errors: a bad ``SQLA_ANYIO_SHIM`` is reported on stderr at start-up, a bad
``SQLA_ANYIO_SHIM_OPTIONS`` when SQLAlchemy is imported (a process that
never imports it has no use for them), each naming the variable and the
option, and the shim is **not installed**; the process goes on.  A start-up
hook runs in every Python process of the environment (pip, tox, an editor's
language server), and failing them all would also break the tools needed to
fix the variable.  The launcher, one command, fails.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import _sqla_anyio_shim_start as _start

ENV_FLAG = _start.ENV_FLAG
ENV_OPTIONS = _start.ENV_OPTIONS

_report = _start.report


def _install(kwargs: dict[str, Any], strict: bool) -> None:
    import sqla_anyio_shim

    from .._sqla import _patching

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


def arm(kwargs: dict[str, Any], *, strict: bool) -> None:
    """Install the shim with ``kwargs`` right after SQLAlchemy is first
    imported, or now if it already is.  Replaces a hook armed before (the
    launcher's options win over the environment's).

    :param strict: let an error of :func:`sqla_anyio_shim.install` (e.g. an
        unsupported SQLAlchemy version) propagate; otherwise report it on
        stderr and go on without the shim.
    """
    _start.arm(functools.partial(_install, kwargs, strict))


def install_from_environment() -> None:
    """What the start-up hook runs once SQLAlchemy is imported: install the
    shim with ``SQLA_ANYIO_SHIM_OPTIONS``, or report why not.  (The start-up
    hook checked ``SQLA_ANYIO_SHIM`` already.)"""
    import shlex

    from .._options import OptionError, parse_options

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
    _install(kwargs, strict=False)
