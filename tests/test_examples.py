"""The examples run, and do what they say.

* ``examples/fastapi_app.py``: the real application driven with httpx over
  the ASGI transport (lifespan included) -- on SQLite with aiosqlite
  (asyncio, asyncio+uvloop), on SQLite with sqlite3 in the workers (trio),
  and on PostgreSQL with asyncpg (a server that is down fails the test under
  ``CI=true``, skips it otherwise); then served by uvicorn under the
  launcher, and its scripted demo, as the README runs them.
* ``examples/trio_workers.py``: as the README runs it.
* ``examples/trio_async_drivers.py``: on aiosqlite and asyncpg.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from examples.fastapi_app import create_app

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
PG_URL = os.environ.get(
    "SQLA_SHIM_PG_URL",
    f"postgresql://{os.environ.get('SQLA_SHIM_PG_HOST', 'root@127.0.0.1:5432')}/test",
)
TIMEOUT = 120

pytestmark = pytest.mark.timeout(180)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


# -- the application over the ASGI transport --------------------------------

CASES = [
    pytest.param((("asyncio", {}), "sqlite+aiosqlite"), id="asyncio-aiosqlite"),
    pytest.param(
        (("asyncio", {"use_uvloop": True}), "sqlite+aiosqlite"),
        id="asyncio+uvloop-aiosqlite",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None and not IN_CI,
            reason="uvloop not installed",
        ),
    ),
    pytest.param((("trio", {}), "sqlite"), id="trio-sqlite3"),
    pytest.param((("asyncio", {}), "postgresql+asyncpg"), id="asyncio-asyncpg"),
]


@pytest.fixture(params=CASES)
def case(request: Any) -> tuple[Any, str]:
    backend_and_driver: tuple[Any, str] = request.param
    return backend_and_driver


@pytest.fixture
def anyio_backend(case: tuple[Any, str]) -> Any:
    return case[0]


def _asyncpg_missing_reason() -> str | None:
    if importlib.util.find_spec("asyncpg") is not None:
        return None
    # asyncpg publishes no wheel for free-threaded 3.13: the one interpreter
    # where its absence is expected rather than an installation mistake
    if sys.version_info[:2] == (3, 13) and sysconfig.get_config_var("Py_GIL_DISABLED"):
        pytest.skip("asyncpg cannot be installed on free-threaded Python 3.13 (no wheel)")
    return "asyncpg is not installed"


@pytest.fixture
def database(case: tuple[Any, str], tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(URL, engine options) for the case; PostgreSQL gets a schema of its
    own, dropped afterwards, so concurrent runs do not meet."""
    driver = case[1]
    if driver == "sqlite+aiosqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}", {}
        return
    if driver == "sqlite":
        import sqla_anyio_shim

        sqla_anyio_shim.install(sync_drivers=True)
        try:
            yield f"sqlite:///{tmp_path / 'notes.db'}", {}
        finally:
            sqla_anyio_shim.install(sync_drivers=False)
        return
    reason = _asyncpg_missing_reason()
    if reason is not None:
        _unavailable(reason)
    asyncpg: Any = importlib.import_module("asyncpg")  # untyped

    schema = f"example_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f"CREATE SCHEMA {schema}"))
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError) as exc:
        _unavailable(f"PostgreSQL at {PG_URL} is unreachable: {exc!r}")
    try:
        url = "postgresql+asyncpg" + PG_URL[len("postgresql") :]
        yield url, {"connect_args": {"server_settings": {"search_path": schema}}}
    finally:
        asyncio.run(admin(f"DROP SCHEMA {schema} CASCADE"))


@asynccontextmanager
async def serve(url: str, **engine_options: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    app = create_app(url, **engine_options)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://notes") as client,
    ):
        yield client, app


@pytest.mark.anyio
async def test_notes_api(database: tuple[str, dict[str, Any]]) -> None:
    """Every endpoint; the background task wrote its audit rows after the
    responses, in its own session, seeing the committed notes."""
    url, options = database
    with anyio.fail_after(60):
        async with serve(url, **options) as (client, app):
            first = await client.post("/notes", json={"title": "first", "body": "text"})
            assert first.status_code == 201, first.text
            assert first.json() == {"id": 1, "title": "first", "body": "text"}
            second = await client.post("/notes", json={"title": "second"})
            assert second.json() == {"id": 2, "title": "second", "body": ""}
            invalid = await client.post("/notes", json={"title": ""})
            assert invalid.status_code == 422

            listed = await client.get("/notes")
            assert [n["title"] for n in listed.json()] == ["first", "second"]
            assert (await client.get("/notes/2")).json()["title"] == "second"
            assert (await client.delete("/notes/1")).status_code == 204
            missing = await client.get("/notes/1")
            assert missing.status_code == 404
            assert missing.json() == {"detail": "no note 1"}
            assert (await client.delete("/notes/1")).status_code == 404

            audit = (await client.get("/audit")).json()
            assert audit == [
                {"note_id": 1, "action": "created", "notes_seen": 1},
                {"note_id": 2, "action": "created", "notes_seen": 2},
                {"note_id": 1, "action": "deleted", "notes_seen": 1},
            ]
            health = (await client.get("/health")).json()
            assert health["sqla_anyio_shim_installed"] is True
            assert health["greenlet_imported"] is False
            assert health["database"].startswith(url.split(":", 1)[0])
            # every request's session gave its connection back
            assert app.state.engine.sync_engine.pool.checkedout() == 0


@pytest.mark.anyio
async def test_concurrent_requests(database: tuple[str, dict[str, Any]]) -> None:
    """40 requests at once (more than the pool's 5 + 10 connections): each
    has its own session, all commit, every background task runs."""
    url, options = database
    count = 40
    statuses: list[int] = []
    with anyio.fail_after(90):
        async with serve(url, **options) as (client, app):

            async def post(i: int) -> None:
                response = await client.post("/notes", json={"title": f"note {i}"})
                statuses.append(response.status_code)

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(post, i)
            assert statuses == [201] * count
            notes = (await client.get("/notes")).json()
            assert sorted(n["title"] for n in notes) == sorted(f"note {i}" for i in range(count))
            audit = (await client.get("/audit")).json()
            assert sorted(a["note_id"] for a in audit) == [n["id"] for n in notes]
            assert app.state.engine.sync_engine.pool.checkedout() == 0


# -- the README's commands ----------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLA_ANYIO_SHIM")}
    env.pop("DATABASE_URL", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_uvicorn_under_the_launcher(tmp_path: Path) -> None:
    """``python -m sqla_anyio_shim run -- uvicorn examples.fastapi_app:app``:
    a real server, real HTTP, then a clean shutdown on SIGINT."""
    port = _free_port()
    cmd = [sys.executable, "-m", "sqla_anyio_shim", "run", "--", "uvicorn"]
    cmd += ["examples.fastapi_app:app", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'notes.db'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.communicate()[0]
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert health.json()["sqla_anyio_shim_installed"] is True
        assert health.json()["greenlet_imported"] is False
        created = httpx.post(f"{base}/notes", json={"title": "over HTTP"}, timeout=10)
        assert created.status_code == 201
        assert httpx.get(f"{base}/notes/{created.json()['id']}", timeout=10).json()["title"] == (
            "over HTTP"
        )
        # over real HTTP the response goes out before the background task
        # runs (the ASGI transport waits for both): wait for it, bounded
        deadline = time.monotonic() + 10
        while not (audit := httpx.get(f"{base}/audit", timeout=10).json()):
            assert time.monotonic() < deadline, "the background task never wrote its row"
            time.sleep(0.05)
        assert audit == [{"note_id": 1, "action": "created", "notes_seen": 1}]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
            raise
    assert server.returncode == 0, output
    assert "Application shutdown complete" in output


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_fastapi_demo_script() -> None:
    """``python -m sqla_anyio_shim run -- examples/fastapi_app.py``."""
    proc = _run(
        [sys.executable, "-m", "sqla_anyio_shim", "run", "--", "examples/fastapi_app.py"], ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == 'POST   /notes     -> 201 {"id":1,"title":"first","body":"under the shim"}'
    assert lines[3].startswith("POST   /notes     -> 422 ")
    assert lines[5] == "DELETE /notes/1   -> 204"
    assert lines[6] == 'GET    /notes/1   -> 404 {"detail":"no note 1"}'
    assert lines[-1].endswith('"sqla_anyio_shim_installed":true,"greenlet_imported":false}')


def test_trio_workers(tmp_path: Path) -> None:
    """``python examples/trio_workers.py``: 22 jobs done, the two hanging
    ones cancelled by their deadline and rolled back, the monitor cancelled
    by the nursery, greenlet never imported."""
    proc = _run([sys.executable, str(ROOT / "examples" / "trio_workers.py"), "jobs.db"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert (
        "database: 22 done, 2 timed out, 0 pending; 22 result rows, none from a timed-out job: yes"
        in out
    )
    timed_out = sorted(
        int(line.split("job", 1)[1].split()[0])
        for line in out.splitlines()
        if "timed out (" in line
    )
    assert timed_out == [7, 18]
    assert "monitor: cancelled by the nursery after" in out
    assert "batch within its 60 s budget (move_on_after): yes" in out
    assert out.rstrip().endswith("greenlet imported: no")


@pytest.mark.parametrize("driver", ["aiosqlite", "asyncpg"])
def test_trio_async_drivers(tmp_path: Path, driver: str) -> None:
    """``python examples/trio_async_drivers.py [URL]``: an asyncio driver
    under trio (driver loops), its counts checked against the database."""
    cmd = [sys.executable, str(ROOT / "examples" / "trio_async_drivers.py")]
    if driver == "asyncpg":
        from sqlalchemy.engine import make_url

        cmd.append(make_url(PG_URL).set(drivername="postgresql+asyncpg").render_as_string(False))
    proc = _run(cmd, tmp_path)
    if driver == "asyncpg" and proc.returncode != 0 and "Connect call failed" in proc.stderr:
        _unavailable(f"PostgreSQL unreachable at {PG_URL}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith(f"trio {trio_version()} + {driver} ")
    assert "nothing checked out: yes" in out
    assert out.rstrip().endswith("greenlet imported: no")


def trio_version() -> str:
    import trio

    return str(trio.__version__)
