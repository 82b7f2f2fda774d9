"""Shared fixtures: the shim is installed for the whole run, greenlet must
be absent, and every applicable test runs on asyncio, asyncio+uvloop and
trio through one ``anyio_backend`` fixture."""

from __future__ import annotations

import gc
import importlib.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import sqla_anyio_shim
from sqla_anyio_shim._bridge import _workers
from sqla_anyio_shim.pytest_plugin import gil_guard

# free-threaded builds: the run fails if any import re-enables the GIL, or if
# it is on at the end (a no-op on other builds; see GilGuard)
gil_guard.start()

sqla_anyio_shim.install()


def pytest_configure(config: Any) -> None:
    if gil_guard.started and not config.pluginmanager.is_registered(gil_guard):
        config.pluginmanager.register(gil_guard, "sqla-anyio-shim-gil-guard")


BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(
        ("asyncio", {"use_uvloop": True}),
        id="asyncio+uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None and os.environ.get("CI") != "true",
            reason="uvloop not installed",
        ),
    ),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: Any) -> Any:
    return request.param


@pytest.fixture
def asyncio_only(anyio_backend: Any) -> None:
    """For tests of asyncio itself seen from the sync code (current_task,
    all_tasks, shield), or of the hand-off's await points (the sweep that
    cancels at each: under trio aiosqlite runs on driver loops, whose
    awaits stay in the worker).  aiosqlite as such runs on trio too."""
    if anyio_backend[0] != "asyncio":
        pytest.skip("this scenario is about asyncio's own API or the hand-off's await points")


@pytest.fixture
def sync_drivers() -> Iterator[None]:
    sqla_anyio_shim.install(sync_drivers=True)
    try:
        yield
    finally:
        sqla_anyio_shim.install(sync_drivers=False)


@pytest.fixture(autouse=True)
def no_busy_workers() -> Iterator[None]:
    """Leak check: every test leaves no worker with work in flight."""
    yield
    gc.collect()
    busy = _workers.pool.busy
    assert busy == 0, f"{busy} worker thread(s) still busy after the test"


@contextmanager
def driver_loop_mode(param: tuple[str, bool | None]) -> Iterator[str]:
    """(backend, install()'s driver_loops): the shim installed in that mode
    while the test runs, the defaults again afterwards; yields the backend
    (for an ``anyio_backend`` fixture)."""
    backend, driver_loops = param
    sqla_anyio_shim.install(driver_loops=driver_loops)
    try:
        yield backend
    finally:
        sqla_anyio_shim.install()


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition owned by another thread, bounded by ``timeout``."""
    event = threading.Event()
    deadline = timeout
    step = 0.01
    waited = 0.0
    while not predicate():
        if waited >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        event.wait(step)
        waited += step
