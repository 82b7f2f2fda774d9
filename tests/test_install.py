"""install() / uninstall(): what is patched, per SQLAlchemy line, and that
uninstall() restores exactly what was there.  Each scenario runs in a fresh
interpreter so that it starts from an unpatched SQLAlchemy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import sqlalchemy

import sqla_anyio_shim

pytestmark = pytest.mark.timeout(120)

LINE = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2])


def run_fresh(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_all_is_exact() -> None:
    assert sorted(sqla_anyio_shim.__all__) == sorted(
        [
            "install",
            "keep_atomic",
            "uninstall",
            "is_installed",
            "stats",
            "Stats",
            "UnsupportedSQLAlchemyVersion",
            "__version__",
        ]
    )
    for name in sqla_anyio_shim.__all__:
        assert hasattr(sqla_anyio_shim, name)


def test_without_shim_ext_asyncio_needs_greenlet() -> None:
    """The starting point: with greenlet absent and no shim, the asyncio
    extension cannot be used (2.1: ImportError at import; 2.0: at use)."""
    run_fresh(
        """
        import asyncio
        try:
            import sqlalchemy.ext.asyncio as ea
            e = ea.create_async_engine("sqlite+aiosqlite://")
            async def go():
                async with e.connect():
                    pass
            asyncio.run(go())
        except (ImportError, ValueError) as err:
            assert "greenlet" in str(err), err
        else:
            raise AssertionError("the asyncio extension worked without greenlet")
        """
    )


def test_round_trip_restores_everything() -> None:
    """uninstall() puts back every object install() replaced, in every
    module (module globals and class staticmethods), and install() works
    again afterwards."""
    run_fresh(
        """
        import sys, asyncio
        # what can be imported without greenlet on both lines
        import sqlalchemy.dialects.sqlite.aiosqlite, sqlalchemy.util.queue
        import sqlalchemy.connectors.asyncio, sqlalchemy.orm
        from sqlalchemy.util import concurrency
        original_spawn = concurrency.greenlet_spawn

        def snapshot():
            seen = {}
            for name, mod in list(sys.modules.items()):
                if mod is None or not name.startswith("sqlalchemy"):
                    continue
                for attr, value in list(vars(mod).items()):
                    seen[(name, attr)] = value
                    if isinstance(value, type) and value.__module__ == name:
                        for k, v in list(value.__dict__.items()):
                            seen[(name, attr, k)] = v
            seen[("asyncio", "current_task")] = asyncio.current_task
            return seen

        before = snapshot()
        import sqla_anyio_shim
        sqla_anyio_shim.install()
        assert sqla_anyio_shim.is_installed()
        during = snapshot()
        changed = [k for k in before if during.get(k) is not before[k]]
        assert changed, "install() changed nothing"
        import sqlalchemy.ext.asyncio.engine as ext_engine  # imported while installed
        from sqla_anyio_shim import _bridge
        assert ext_engine.greenlet_spawn is _bridge.greenlet_spawn
        sqla_anyio_shim.uninstall()
        assert ext_engine.greenlet_spawn is original_spawn
        assert not sqla_anyio_shim.is_installed()
        after = snapshot()
        # importing sqlalchemy.ext.asyncio registers its session class in
        # orm.state: SQLAlchemy's own doing, not the shim's
        own = {("sqlalchemy.orm.state", "_async_provider")}
        not_restored = [
            k for k in before if after.get(k) is not before[k] and k not in own
        ]
        assert not not_restored, not_restored[:10]
        sqla_anyio_shim.install()
        sqla_anyio_shim.install()  # idempotent
        assert concurrency.greenlet_spawn is _bridge.greenlet_spawn
        print(len(changed))
        """
    )


def test_late_imported_dialects_are_patched_and_restored() -> None:
    """Modules imported after install() get the bridge (including 2.0's
    staticmethod copies); uninstall() restores them too."""
    out = run_fresh(
        """
        import sqla_anyio_shim
        sqla_anyio_shim.install()
        from sqla_anyio_shim import _bridge
        import sqlalchemy.dialects.postgresql.asyncpg as apg
        import sqlalchemy.dialects.mysql.aiomysql as amy
        import sqlalchemy.connectors.asyncio as conn
        for mod in (apg, amy, conn):
            fn = getattr(mod, "await_", None) or getattr(mod, "await_only")
            assert fn is _bridge.await_, (mod, fn)
        for cls in vars(apg).values():
            sm = getattr(cls, "__dict__", {}).get("await_")
            if isinstance(sm, staticmethod):
                assert sm.__func__ in (_bridge.await_, _bridge.await_fallback), cls
        assert type(conn.asyncio).__name__ == "AsyncioProxy"
        sqla_anyio_shim.uninstall()
        fn = getattr(apg, "await_", None) or getattr(apg, "await_only")
        assert fn is not _bridge.await_
        import asyncio
        assert conn.asyncio is asyncio
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_install_before_any_sqlalchemy_import() -> None:
    out = run_fresh(
        """
        import sys
        import sqla_anyio_shim
        assert "sqlalchemy" not in sys.modules, "importing the package imported SQLAlchemy"
        sqla_anyio_shim.install()
        import asyncio
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy import text
        async def go():
            e = create_async_engine("sqlite+aiosqlite://")
            async with e.connect() as c:
                r = (await c.execute(text("select 42"))).scalar()
            await e.dispose()
            return r
        print(asyncio.run(go()))
        assert "greenlet" not in sys.modules
        """
    )
    assert out.strip() == "42"


def test_unsupported_version_is_refused() -> None:
    out = run_fresh(
        """
        import sqlalchemy
        sqlalchemy.__version__ = "1.4.54"
        import sqla_anyio_shim
        try:
            sqla_anyio_shim.install()
        except sqla_anyio_shim.UnsupportedSQLAlchemyVersion as err:
            print(err)
        assert not sqla_anyio_shim.is_installed()
        """
    )
    assert "supports SQLAlchemy 2.0.x and 2.1.x" in out and "1.4.54" in out


@pytest.mark.skipif(LINE != (2, 0), reason="SQLAlchemy 2.0 line only")
def test_sqlalchemy_20_names() -> None:
    """2.0: await_only / await_fallback, have_greenlet, and the stand-in for
    _concurrency_py3k when greenlet is absent."""
    run_fresh(
        """
        import sqla_anyio_shim
        sqla_anyio_shim.install()
        from sqla_anyio_shim import _bridge
        from sqlalchemy.util import concurrency
        import sqlalchemy.util as util
        assert concurrency.have_greenlet is True
        assert concurrency.await_only is _bridge.await_ and util.await_only is _bridge.await_
        assert concurrency.await_fallback is _bridge.await_fallback
        from sqlalchemy.util import _concurrency_py3k as k
        assert k.greenlet_spawn is _bridge.greenlet_spawn
        from sqlalchemy.testing import cancellation  # imports _AsyncIoGreenlet
        sqla_anyio_shim.uninstall()
        assert concurrency.have_greenlet is False
        import sys
        assert "sqlalchemy.util._concurrency_py3k" not in sys.modules
        """
    )


@pytest.mark.skipif(LINE != (2, 1), reason="SQLAlchemy 2.1 line only")
def test_sqlalchemy_21_names() -> None:
    """2.1: await_ / await_only alias and the lazy greenlet importer."""
    run_fresh(
        """
        import sqla_anyio_shim
        sqla_anyio_shim.install()
        from sqla_anyio_shim import _bridge
        from sqlalchemy.util import concurrency
        import sqlalchemy.util as util
        assert concurrency.await_ is _bridge.await_ and concurrency.await_only is _bridge.await_
        assert util.await_ is _bridge.await_
        assert concurrency._concurrency_shim._has_greenlet is True
        import sqlalchemy.ext.asyncio  # the import guard is disarmed
        sqla_anyio_shim.uninstall()
        try:
            concurrency._concurrency_shim._initialize()
        except ImportError as err:
            assert "greenlet" in str(err)
        else:
            raise AssertionError("greenlet is importable in the test environment")
        """
    )


def test_uninstall_is_refused_while_calls_are_in_flight() -> None:
    """Issue 16, item 10: uninstall() with a greenlet_spawn() call parked at
    an await point raises a RuntimeError that names the calls in flight and
    the fix, and leaves the bridge installed, so the call finishes on it
    (before: it went on with SQLAlchemy's helpers -- MissingGreenlet, or a
    pool timeout with its connection lost).  Once the call is over,
    uninstall() works."""
    out = run_fresh(
        """
        import asyncio
        import sqla_anyio_shim
        sqla_anyio_shim.install()
        from sqlalchemy.util import concurrency
        await_ = getattr(concurrency, "await_", None) or concurrency.await_only

        async def main():
            parked, release = asyncio.Event(), asyncio.Event()

            async def wait():
                parked.set()
                await asyncio.wait_for(release.wait(), 30)
                return 1

            def sync():
                return await_(wait()) + await_(wait())

            task = asyncio.ensure_future(concurrency.greenlet_spawn(sync))
            await asyncio.wait_for(parked.wait(), 30)
            try:
                sqla_anyio_shim.uninstall()
            except RuntimeError as err:
                print("refused:", "1 greenlet_spawn() call(s) in flight" in str(err))
            print("still installed:", sqla_anyio_shim.is_installed())
            release.set()
            print("result:", await asyncio.wait_for(task, 30))

        asyncio.run(main())
        sqla_anyio_shim.uninstall()
        print("uninstalled:", not sqla_anyio_shim.is_installed())
        """
    )
    assert out.split("\n")[:4] == [
        "refused: True",
        "still installed: True",
        "result: 2",
        "uninstalled: True",
    ], out


def test_descriptors_stay_within_budget_and_leave_with_the_threads() -> None:
    """Issue 16, item 6: with RLIMIT_NOFILE=256, 150 calls parked at once
    (150 workers) keep the bridge's eventfds within a quarter of the limit
    (locks take over past it), so the application's open() still works; and
    once the burst's workers retire, their idle channels are closed too
    (before: 256 descriptors taken, EMFILE in the application, and over 100
    still held after the threads had gone)."""
    out = run_fresh(
        """
        import asyncio, os, resource, time
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        import sqla_anyio_shim
        sqla_anyio_shim.install(idle_timeout=0.2)
        from sqlalchemy.util import concurrency
        from sqla_anyio_shim._bridge import _channel
        await_ = getattr(concurrency, "await_", None) or concurrency.await_only

        def fds():
            return len(os.listdir("/proc/self/fd"))

        base = fds()

        async def main():
            release = asyncio.Event()
            parked = 0

            async def wait():
                nonlocal parked
                parked += 1
                await asyncio.wait_for(release.wait(), 60)
                return 1

            def sync():
                return await_(wait())

            tasks = [asyncio.ensure_future(concurrency.greenlet_spawn(sync)) for _ in range(150)]
            deadline = time.monotonic() + 60
            while parked < 150 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            print("parked:", parked)
            print("budget:", _channel.FD_BUDGET)
            print("within budget:", fds() - base <= _channel.FD_BUDGET + 8, fds() - base)
            with open(os.devnull) as f:
                print("open works:", f.readable())
            release.set()
            print("results:", sum(await asyncio.gather(*tasks)))

        asyncio.run(main())
        # CPython 3.12 keeps one worker for good (a query at exit)
        from sqla_anyio_shim._bridge import _workers
        kept = 1 if _workers.NO_THREADS_AT_EXIT else 0
        deadline = time.monotonic() + 30
        while sqla_anyio_shim.stats().workers_total > kept and time.monotonic() < deadline:
            time.sleep(0.05)
        print("workers:", sqla_anyio_shim.stats().workers_total - kept)
        # a retiring worker leaves the pool's counts, then closes its
        # wake-up descriptor as its thread ends: wait for the threads too
        # (on a loaded 3.13t some were still ending: 8 descriptors)
        while fds() - base > 2 and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        print("fds back:", fds() - base <= 2, fds() - base)
        """
    )
    lines = out.splitlines()
    assert lines[0] == "parked: 150", out
    assert lines[1] == "budget: 64", out
    assert lines[2].startswith("within budget: True"), out
    assert lines[3:5] == ["open works: True", "results: 150"], out
    assert lines[5] == "workers: 0", out
    assert lines[6].startswith("fds back: True"), out
