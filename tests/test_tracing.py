"""The host thread's trace and profile functions follow its calls into the
workers (issue 16, item 8): a debugger's breakpoint, a ``sys.setprofile``
hook and a line tracer see the sync code, as on greenlet's one thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from sqlalchemy.util import concurrency

greenlet_spawn = concurrency.greenlet_spawn

pytestmark = pytest.mark.anyio


def _sync_work(n: int) -> int:
    # the sync code: six calls of _leaf, one line each
    total = 0
    for i in range(n):
        total += _leaf(i)
    return total


def _leaf(i: int) -> int:
    return i * 2


@pytest.fixture
def no_thread_hooks() -> Iterator[None]:
    """These tests install per-thread functions; a tool that hooks every
    thread (coverage) would be left alone by the bridge, by design."""
    if threading.gettrace() is not None or threading.getprofile() is not None:
        pytest.skip("threading.settrace()/setprofile() is in use (coverage?)")
    yield
    sys.settrace(None)
    sys.setprofile(None)


async def test_profile_hook_sees_the_sync_code(anyio_backend: Any, no_thread_hooks: None) -> None:
    seen: list[tuple[str, str]] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_name in ("_sync_work", "_leaf"):
            seen.append((frame.f_code.co_name, threading.current_thread().name))

    sys.setprofile(profile)
    try:
        assert await greenlet_spawn(_sync_work, 6) == 30
    finally:
        sys.setprofile(None)
    assert [name for name, _ in seen] == ["_sync_work"] + ["_leaf"] * 6
    # it did run in a worker, and the worker has no profile function left
    assert {thread for _, thread in seen} != {threading.current_thread().name}
    assert await greenlet_spawn(sys.getprofile) is None


async def test_line_tracer_sees_the_sync_code(anyio_backend: Any, no_thread_hooks: None) -> None:
    lines: list[int] = []
    first = _sync_work.__code__.co_firstlineno

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is _sync_work.__code__:
            if event == "line":
                lines.append(frame.f_lineno - first)
            return trace
        return None

    sys.settrace(trace)
    try:
        assert await greenlet_spawn(_sync_work, 2) == 2
    finally:
        sys.settrace(None)
    # total = 0; the loop (3 tests, 2 bodies); return
    assert lines and lines[0] == 2 and lines[-1] == 5, lines
    assert lines.count(4) == 2, lines
    assert await greenlet_spawn(sys.gettrace) is None


async def test_a_thread_hooking_tool_is_left_alone(
    anyio_backend: Any, no_thread_hooks: None
) -> None:
    """With ``threading.settrace()`` in use the tool hooks threads itself,
    with per-thread state: the host's own function is not lent to a
    worker."""
    host_calls: list[str] = []

    def host_trace(frame: FrameType, event: str, arg: Any) -> None:
        if frame.f_code is _leaf.__code__:
            host_calls.append(threading.current_thread().name)

    def tool(frame: FrameType, event: str, arg: Any) -> None:
        return None

    threading.settrace(tool)
    sys.settrace(host_trace)
    try:
        assert await greenlet_spawn(_sync_work, 3) == 6
    finally:
        sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]
    assert host_calls == []


_PDB_APP = """
import asyncio
import sqla_anyio_shim
sqla_anyio_shim.install()
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine

def listener(conn, cursor, statement, parameters, context, executemany):
    marker = "in-the-listener-" + statement.split()[1]
    return None

async def main():
    engine = create_async_engine("sqlite+aiosqlite://")
    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    async with engine.connect() as conn:
        print("result", (await conn.execute(text("select 42"))).scalar())
    await engine.dispose()

asyncio.run(main())
"""


# pdb with its sys.settrace() backend: ``python -m pdb`` up to 3.13.  (3.14's
# ``python -m pdb`` uses its sys.monitoring backend, which ignores every
# thread but the one that started it -- worker threads of any kind; see the
# README's limitations.)
_PDB_RUN = """
import pdb, sys
app = sys.argv[1]
kw = {"backend": "settrace"} if sys.version_info >= (3, 14) else {}
with open(app) as f:
    code = compile(f.read(), app, "exec")
pdb.Pdb(**kw).run(code, {"__name__": "__main__", "__file__": app})
"""


def test_pdb_breakpoint_in_an_event_listener(tmp_path: Any) -> None:
    """pdb (its settrace backend, ``python -m pdb`` before 3.14),
    ``b app.py:<line in the listener>``: pdb stops in the listener
    (SQLAlchemy's sync code, run by a worker)."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(_PDB_APP))
    line = 1 + _PDB_APP.splitlines().index("    return None")
    commands = f"b {app}:{line}\nc\np marker\nc\n"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PDB_RUN, str(app)],
            input=commands,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"pdb hung (killed after 60 s)\nstdout: {err.stdout!r}")
    assert "'in-the-listener-42'" in proc.stdout, proc.stdout + proc.stderr
    assert "result 42" in proc.stdout, proc.stdout + proc.stderr
