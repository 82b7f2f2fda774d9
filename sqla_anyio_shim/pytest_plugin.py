"""pytest plugin: run SQLAlchemy's own test suite on the thread bridge.

Load it with ``-p sqla_anyio_shim.pytest_plugin`` (or ``--sqla-anyio-shim``
through the inert entry point).  It installs the shim before SQLAlchemy's
test harness starts, and adapts the few places where the *harness* (never a
test file) depends on greenlet itself.  Each adaptation is listed, with its
reason, in ``docs/conformance.md``:

1. ``requirements.greenlet`` / ``asyncio`` try ``import greenlet``; with the
   shim the bridge is what provides greenlet's role, so they are open.
   ``requirements.no_greenlet`` (tests of the "greenlet is missing" error)
   is closed, as it is on a greenlet run.
2. ``testing.cancellation.await_points`` instruments the greenlet class's
   ``switch``/``throw`` to see every await point; here the same
   ``AwaitPoints`` object is fed by the bridge's await hook, which sees
   exactly the awaitables the host task awaits for the sync code.
3. Tests that assert greenlet's own internals (``'greenlet' in
   sys.modules``) cannot pass without greenlet: they are marked skipped with
   the reason, never counted as passed.
4. When the rootdir is a SQLAlchemy source tree, its ``lib/`` is put first
   on ``sys.path`` before the shim imports SQLAlchemy, as the tree's own
   ``conftest.py`` would do a moment later.

The shim is installed with the options of ``SQLA_ANYIO_SHIM_OPTIONS`` if it
is set (the launcher's syntax, e.g. ``--parallel on``), else the defaults.

On a free-threaded build it also proves the GIL stayed off for the whole run
(:class:`GilGuard`): an import that re-enables it fails the run, naming the
module.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from importlib.machinery import ExtensionFileLoader, ModuleSpec, PathFinder
from typing import Any

import pytest

# tests that assert greenlet's own internals; node-id fragments and reasons
GREENLET_INTERNAL_TESTS = {
    "GreenletImportTests::test_concurrency_fn[greenlet_setup_in_ext": (
        "asserts that importing sqlalchemy.ext.asyncio imports the greenlet "
        "module ('greenlet' in sys.modules), in a fresh process without the "
        "shim"
    ),
    "GreenletImportTests::test_concurrency_fn[greenlet_setup_on_call": (
        "asserts that calling greenlet_spawn() imports the greenlet module "
        "('greenlet' in sys.modules), in a fresh process without the shim"
    ),
}


FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


class _WatchedExtensionLoader(ExtensionFileLoader):
    """An extension module's loader that notes whether loading it switched
    the GIL on: CPython enables it permanently while creating a module that
    does not declare ``Py_mod_gil`` (and then warns, naming it)."""

    guard: GilGuard

    def create_module(self, spec: ModuleSpec) -> Any:
        before = sys._is_gil_enabled()  # type: ignore[attr-defined]
        try:
            return super().create_module(spec)
        finally:
            # in ``finally``: a ``-W error`` filter turns the warning into
            # an exception after the GIL is already on
            if not before and sys._is_gil_enabled():  # type: ignore[attr-defined]
                self.guard.culprits.append(spec.name)


class GilGuard:
    """Proves that the GIL stays off for a whole pytest run on a
    free-threaded build (a no-op on other builds).

    ``start()`` puts a finder on ``sys.meta_path`` that only wraps the
    loader of *extension* modules (the only kind that can switch the GIL on)
    so each load is checked; plain Python imports are left to the usual
    finders.  At the end ``problem()`` is None if the GIL was off when the
    check started, no import switched it on, and it is off now.  Modules
    imported before ``start()`` are covered by the first condition; run with
    ``python -W "error:The global interpreter lock:RuntimeWarning"`` to have
    such an import fail on the spot, naming the module.
    """

    def __init__(self) -> None:
        self.culprits: list[str] = []
        self.enabled_at_start = False
        self.started = False

    # the MetaPathFinder protocol
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> ModuleSpec | None:
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or type(spec.loader) is not ExtensionFileLoader:
            return None  # the usual finders handle it, as if we were not here
        loader = _WatchedExtensionLoader(spec.loader.name, spec.loader.path)
        loader.guard = self
        spec.loader = loader
        return spec

    def start(self) -> None:
        if not FREE_THREADED or self.started:
            return
        self.started = True
        self.enabled_at_start = sys._is_gil_enabled()  # type: ignore[attr-defined]
        # just before PathFinder (which finds extension modules), so the
        # finders ahead of it (pytest's assertion rewriter, the shim's
        # patching finder, editable installs) keep their turn
        at = next(
            (i for i, f in enumerate(sys.meta_path) if f is PathFinder),
            len(sys.meta_path),
        )
        sys.meta_path.insert(at, self)  # type: ignore[arg-type]

    def problem(self) -> str | None:
        if not self.started:
            return None
        if self.culprits:
            names = ", ".join(repr(m) for m in self.culprits)
            return (
                f"importing {names} re-enabled the GIL on this free-threaded "
                "build (the extension does not declare Py_mod_gil): the run "
                "no longer tests free threading; drop that dependency or use "
                "a free-threading build of it"
            )
        if self.enabled_at_start:
            return (
                "the GIL was already enabled when the check started (PYTHON_GIL=1, "
                "-X gil=1, or a module imported at start-up); run with "
                "python -W 'error:The global interpreter lock:RuntimeWarning' "
                "to name the module"
            )
        if sys._is_gil_enabled():  # type: ignore[attr-defined]
            return "the GIL is enabled at the end of the run"
        return None

    def summary(self) -> str:
        problem = self.problem()
        if problem is not None:
            return f"GIL CHECK FAILED: {problem}"
        return (
            "GIL check: free-threaded build, the GIL stayed off for the whole "
            "run (no import re-enabled it; sys._is_gil_enabled() is False at "
            "the end)"
        )

    # pytest hooks, for a guard registered as a plugin
    def pytest_sessionfinish(self, session: Any, exitstatus: Any) -> None:
        if not self.started:
            return
        report = os.environ.get("SQLA_SHIM_GIL_REPORT")
        if report:
            # read by ``python -m sqla_anyio_shim conformance``
            with open(report, "w") as f:
                f.write(self.summary() + "\n")
        if self.problem() is not None and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.started:
            terminalreporter.write_line(self.summary(), red=self.problem() is not None, bold=True)


gil_guard = GilGuard()


def _sqlalchemy_source_lib(rootdir: str) -> str | None:
    lib = os.path.join(rootdir, "lib")
    if os.path.isfile(os.path.join(lib, "sqlalchemy", "__init__.py")) and (
        os.path.isfile(os.path.join(rootdir, "test", "conftest.py"))
    ):
        return lib
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    # before SQLAlchemy, the drivers and the test modules are imported
    if FREE_THREADED and not early_config.pluginmanager.is_registered(gil_guard):
        gil_guard.start()
        early_config.pluginmanager.register(gil_guard, "sqla-anyio-shim-gil-guard")
    lib = _sqlalchemy_source_lib(str(early_config.rootpath))
    if lib is not None and lib not in sys.path and "sqlalchemy" not in sys.modules:
        sys.path.insert(0, lib)
    import sqla_anyio_shim

    sqla_anyio_shim.install(**_options_from_environment())


def _options_from_environment() -> dict[str, Any]:
    """``SQLA_ANYIO_SHIM_OPTIONS`` (the launcher's option syntax, as the
    start-up hook reads it): how the conformance runner runs the suite in
    another mode (``--parallel on``).  A bad value fails the run."""
    import shlex

    from ._cli._autoinstall import ENV_OPTIONS
    from ._options import OptionError, parse_options

    text = os.environ.get(ENV_OPTIONS, "")
    try:
        kwargs, rest = parse_options(shlex.split(text))
    except (OptionError, ValueError) as exc:
        raise pytest.UsageError(f"{ENV_OPTIONS}={text!r}: {exc}") from None
    if rest:
        raise pytest.UsageError(f"{ENV_OPTIONS}={text!r}: unexpected {rest[0]!r}")
    return kwargs


@contextlib.contextmanager
def _bridge_await_points(cancel_at: Any = ()) -> Iterator[Any]:
    """``testing.cancellation.await_points`` for the thread bridge."""
    from sqlalchemy.testing import cancellation

    from . import _bridge

    points = cancellation.AwaitPoints(cancel_at)

    def hook(awaitable: Any) -> Any:
        return cancellation._InstrumentedAwaitable(awaitable, points)

    previous = _bridge.set_await_hook(hook)
    try:
        yield points
    finally:
        _bridge.set_await_hook(previous)


def _adapt_harness() -> None:
    from sqlalchemy.testing import asyncio as _test_asyncio, exclusions
    from sqlalchemy.testing.requirements import SuiteRequirements

    def greenlet(self: Any) -> Any:
        return exclusions.only_if(
            lambda config: _test_asyncio.ENABLE_ASYNCIO,
            "asyncio disabled (--disable-asyncio)",
        )

    def no_greenlet(self: Any) -> Any:
        return exclusions.closed()

    SuiteRequirements.greenlet = property(greenlet)  # type: ignore[method-assign, assignment]
    SuiteRequirements.no_greenlet = property(no_greenlet)  # type: ignore[method-assign, assignment]
    try:
        from sqlalchemy.testing import cancellation
    except ImportError:
        pass
    else:
        cancellation.await_points = _bridge_await_points


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "sqla_anyio_shim_greenlet_internal: see docs/conformance.md")


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: Any) -> None:
    # after SQLAlchemy's plugin has imported its harness (sessionstart) and
    # before any test module is imported: some tests evaluate requirements
    # at import time, in decorators
    _adapt_harness()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: Any, config: Any, items: Any) -> None:
    for item in items:
        for fragment, reason in GREENLET_INTERNAL_TESTS.items():
            if fragment in item.nodeid:
                item.add_marker(
                    pytest.mark.skip(reason=f"greenlet internals (sqla-anyio-shim): {reason}")
                )
