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
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

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


def _sqlalchemy_source_lib(rootdir: str) -> "str | None":
    lib = os.path.join(rootdir, "lib")
    if os.path.isfile(os.path.join(lib, "sqlalchemy", "__init__.py")) and (
        os.path.isfile(os.path.join(rootdir, "test", "conftest.py"))
    ):
        return lib
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    lib = _sqlalchemy_source_lib(str(early_config.rootpath))
    if lib is not None and lib not in sys.path and "sqlalchemy" not in sys.modules:
        sys.path.insert(0, lib)
    import sqla_anyio_shim

    sqla_anyio_shim.install()


@contextlib.contextmanager
def _bridge_await_points(cancel_at: Any = ()) -> Iterator[Any]:
    """``testing.cancellation.await_points`` for the thread bridge."""
    from sqlalchemy.testing import cancellation

    from . import _bridge

    points = cancellation.AwaitPoints(cancel_at)

    def hook(awaitable: Any) -> Any:
        return cancellation._InstrumentedAwaitable(awaitable, points)

    previous = _bridge._await_hook
    _bridge._await_hook = hook
    try:
        yield points
    finally:
        _bridge._await_hook = previous


def _adapt_harness() -> None:
    from sqlalchemy.testing import asyncio as _test_asyncio
    from sqlalchemy.testing import exclusions
    from sqlalchemy.testing.requirements import SuiteRequirements

    def greenlet(self: Any) -> Any:
        return exclusions.only_if(
            lambda config: _test_asyncio.ENABLE_ASYNCIO,
            "asyncio disabled (--disable-asyncio)",
        )

    def no_greenlet(self: Any) -> Any:
        return exclusions.closed()

    SuiteRequirements.greenlet = property(greenlet)  # type: ignore
    SuiteRequirements.no_greenlet = property(no_greenlet)  # type: ignore
    try:
        from sqlalchemy.testing import cancellation
    except ImportError:
        pass
    else:
        cancellation.await_points = _bridge_await_points


def pytest_configure(config: Any) -> None:
    config.addinivalue_line(
        "markers", "sqla_anyio_shim_greenlet_internal: see docs/conformance.md"
    )


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
                    pytest.mark.skip(
                        reason=f"greenlet internals (sqla-anyio-shim): {reason}"
                    )
                )
