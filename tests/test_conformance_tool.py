"""The conformance runner's own decisions (python -m sqla_anyio_shim
conformance); its runs themselves are CI's conformance-* environments."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from sqla_anyio_shim._testing._conformance import _drop_first, _failure_summary


def test_server_databases_are_cleared_of_leftover_tables_first() -> None:
    """A table an interrupted run left in the server's test database would
    be reused, rows and all (a leftover ``a`` failed
    AsyncAttrsTest.test_it_didnt_load_but_is_ok in CI): SQLAlchemy's harness
    is asked to drop such tables first, on servers only (its SQLite setup
    cannot)."""
    assert _drop_first(["--dburi", "postgresql+asyncpg://root@127.0.0.1:5432/test"]) == [
        "--dropfirst"
    ]
    assert _drop_first(["--dburi", "mysql+aiomysql://root@127.0.0.1:3306/test"]) == ["--dropfirst"]
    assert _drop_first(["--db", "aiosqlite"]) == []
    assert _drop_first(["--dburi", "sqlite+aiosqlite:///file.db"]) == []


def test_failure_report_tail_is_kept_for_the_summary() -> None:
    """A failed upstream test is listed with the end of its report, so the
    summary printed last (what a CI log keeps) says why it failed."""
    report = "\n".join(f"line {n}" for n in range(40)) + "\nE   AssertionError: boom"
    failure = ET.fromstring(f'<failure message="AssertionError: boom">{report}</failure>')
    summary = _failure_summary(failure)
    assert summary.startswith("\n        ")
    assert summary.rstrip().endswith("E   AssertionError: boom")
    assert "line 39" in summary and "line 0\n" not in summary
    assert _failure_summary(ET.fromstring("<failure/>")) == ""
