"""Plain sync DBAPI drivers behind ``create_async_engine()`` (opt-in).

Once SQLAlchemy's sync code runs in worker threads, a blocking driver
(sqlite3, psycopg, pymysql) can run right there: no event-loop hop per
driver call at all.  ``install(sync_drivers=True)`` turns this on; without
it, upstream's behaviour is kept exactly (``create_async_engine("sqlite://")``
raises ``InvalidRequestError``, as SQLAlchemy's ``TextSyncDBAPI`` tests
expect).

How: ``create_async_engine()`` asks the URL's dialect class for
``get_async_dialect_cls(url)``.  While sync drivers are enabled, a sync
dialect answers with a subclass of itself (made once per class) that

* says ``is_async = True``, so that ``AsyncEngine`` accepts it and the pool
  is the loop-safe ``AsyncAdaptedQueuePool`` (whose waits are cancellable and
  never block a worker that holds a connection);
* uses one connection for a SQLite ``:memory:`` database (pool of 1, no
  overflow): every worker sees the *same* database, one user at a time,
  instead of one database per thread (upstream's ``SingletonThreadPool``);
* turns off sqlite3's same-thread check, since a pooled connection is used
  by different workers one after another (never at the same time);
* tells the bridge that the call did its I/O, so that SQLAlchemy's
  ``_require_await`` check (made for async drivers) does not fire;
* runs each statement as an await point (``_bridge.run_blocking``): a
  cancellation of the task -- a deadline -- stops the running statement
  through the driver's interrupter (:data:`_INTERRUPTERS`) and is raised
  there, as an async driver's awaited statement raises it.  The driver
  stopped the statement and its connection is in order, so SQLAlchemy is
  told it is not a disconnect (:func:`_keep_interrupted_connection`): the
  transaction is rolled back and the connection kept, where a cancellation
  (an exit exception) would otherwise invalidate it -- and with it a SQLite
  ``:memory:`` database.

``postgresql+psycopg://`` normally resolves to the *async* psycopg dialect
in ``create_async_engine()``; with sync drivers enabled it is the sync one
(use ``postgresql+psycopg_async://`` for the async driver).

An asyncio-only driver used under trio with ``driver_loops=False`` fails
at its first connection with an error naming both options
(``_driver_loops._refuse_under_trio``).

Interrupters (what stops a running statement, called from another thread
while the worker is blocked in it):

* psycopg (3): ``Connection.cancel_safe()`` (``cancel()`` before psycopg
  3.2), the server's cancel request; the statement raises ``QueryCanceled``.
* sqlite3: ``Connection.interrupt()``; the statement raises
  ``OperationalError: interrupted``.
* pymysql: ``KILL QUERY <thread id>`` sent on a second, short-lived
  connection opened with the connection's own arguments; the statement
  raises error 1317 (``SLEEP()`` returns 1 instead).

Any other sync driver (psycopg2, pg8000, mysqlclient, mariadb, oracledb,
pyodbc, ...) has no interrupter: its statement runs to its end and the
cancellation is raised when it returns.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from typing import Any

from .. import _bridge

enabled = False

#: seconds an interrupter may take (a cancel request, a KILL QUERY
#: connection): past them the statement runs to its end
INTERRUPT_TIMEOUT = 5.0

_lock = threading.Lock()
_subclasses: dict[type, type] = {}

_MARK = "_sqla_anyio_shim_sync_driver"


def is_sync_driver_dialect(dialect: Any) -> bool:
    return bool(getattr(dialect, _MARK, False))


def _is_sqlite_memory(cls: type, url: Any) -> bool:
    if getattr(cls, "name", None) != "sqlite":
        return False
    is_file = getattr(cls, "_is_url_file_db", None)
    if is_file is None:
        return False
    return not is_file(url)


class _BufferedCursor:
    """A sync DBAPI cursor whose rows are fetched in the worker, at execute
    time (what SQLAlchemy's ``AsyncAdapt_dbapi_cursor`` does for async
    drivers): ``AsyncResult`` reads a buffered result on the event loop, and
    that must never touch the driver there."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self._rows: deque[Any] = deque()

    def __getattr__(self, name: str) -> Any:
        # description, rowcount, lastrowid, arraysize, setinputsizes, ...
        return getattr(self._cursor, name)

    def _buffer(self) -> None:
        cursor = self._cursor
        self._rows = deque(cursor.fetchall()) if cursor.description else deque()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        if parameters is None:
            result = self._cursor.execute(operation)
        else:
            result = self._cursor.execute(operation, parameters)
        self._buffer()
        return result

    def executemany(self, operation: Any, seq_of_parameters: Any) -> Any:
        result = self._cursor.executemany(operation, seq_of_parameters)
        self._buffer()
        return result

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: Any = None) -> Any:
        if size is None:
            size = self._cursor.arraysize
        rows = self._rows
        return [rows.popleft() for _ in range(min(size, len(rows)))]

    def fetchall(self) -> Any:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def close(self) -> None:
        self._rows.clear()
        self._cursor.close()

    async def _async_soft_close(self) -> None:
        # the rows are already buffered; nothing is left on the driver
        return None


# -- interrupting a running statement -------------------------------------

#: the attribute of a MySQL DBAPI connection holding the arguments it was
#: opened with (the KILL QUERY connection is opened with the same)
_CONNECT_ARGS = "_sqla_anyio_shim_connect_args"


def _psycopg_interrupter(dialect: Any, dbapi_conn: Any) -> Any:
    cancel_safe = getattr(dbapi_conn, "cancel_safe", None)
    if cancel_safe is None:  # psycopg < 3.2
        return dbapi_conn.cancel

    def cancel() -> None:
        cancel_safe(timeout=INTERRUPT_TIMEOUT)

    return cancel


def _sqlite_interrupter(dialect: Any, dbapi_conn: Any) -> Any:
    return dbapi_conn.interrupt


def _mysql_interrupter(dialect: Any, dbapi_conn: Any) -> Any:
    connect_args = getattr(dbapi_conn, _CONNECT_ARGS, None)
    if connect_args is None:
        return None

    def kill_query() -> None:
        cargs, cparams = connect_args
        params = dict(cparams)
        # bounded, whatever the engine's own timeouts are
        for name in ("connect_timeout", "read_timeout", "write_timeout"):
            params[name] = INTERRUPT_TIMEOUT
        killer = dialect.loaded_dbapi.connect(*cargs, **params)
        try:
            cursor = killer.cursor()
            try:
                # KILL QUERY, not KILL: the statement stops, its session and
                # transaction stay (an error packet, then the connection is
                # usable), as psycopg's cancel request leaves it
                cursor.execute(f"KILL QUERY {int(dbapi_conn.thread_id())}")
            finally:
                cursor.close()
        finally:
            killer.close()

    return kill_query


#: the dialect's driver name -> makes the interrupter of a DBAPI connection
#: (None: it has none).  Only the drivers tested here
#: (tests/test_sync_driver_deadlines.py).
_INTERRUPTERS: dict[str, Any] = {
    "psycopg": _psycopg_interrupter,
    "pysqlite": _sqlite_interrupter,
    "pymysql": _mysql_interrupter,
}


def _interrupter(dialect: Any, cursor: Any) -> Any:
    make = _INTERRUPTERS.get(dialect.driver)
    if make is None:
        return None
    dbapi_conn = getattr(cursor, "connection", None)
    if dbapi_conn is None:
        return None
    return make(dialect, dbapi_conn)


def _keep_interrupted_connection(ctx: Any) -> None:
    """``handle_error`` of every sync-driver dialect: a cancellation that
    the bridge raised at a statement the driver had stopped (or that never
    started) is not a disconnect.  SQLAlchemy treats every exit exception
    as one and invalidates the connection -- right for an async driver,
    whose cancelled coroutine may leave its protocol mid-message, needless
    here, and the end of a SQLite ``:memory:`` database."""
    if ctx.is_disconnect and _bridge.ended_cleanly(ctx.original_exception):
        ctx.is_disconnect = False


def _execution_context(cls: type[Any]) -> type[Any]:
    base = cls.execution_ctx_cls
    sqlite = cls.name == "sqlite"

    def create_default_cursor(self: Any) -> Any:
        return _BufferedCursor(base.create_default_cursor(self))

    def create_server_side_cursor(self: Any) -> Any:
        if sqlite:
            # sqlite3 steps a statement lazily: a plain cursor is the
            # "server side" cursor, and AsyncResult fetches from it through
            # greenlet_spawn(), in a worker
            return self._dbapi_connection.cursor()
        return base.create_server_side_cursor(self)

    return type(
        base.__name__ + "_syncdriver",
        (base,),
        {
            "__module__": base.__module__,
            "create_default_cursor": create_default_cursor,
            "create_server_side_cursor": create_server_side_cursor,
        },
    )


def sync_driver_dialect(cls: type[Any]) -> type[Any]:
    """The sync-driver variant of the sync dialect class ``cls``."""
    with _lock:
        sub = _subclasses.get(cls)
        if sub is not None:
            return sub

        from sqlalchemy import event, pool

        class _OneConnectionPool(pool.AsyncAdaptedQueuePool):
            """One connection, shared by every worker one at a time: a
            SQLite ``:memory:`` database lives in its connection."""

            def __init__(self, creator: Any, **kw: Any) -> None:
                kw["pool_size"] = 1
                kw["max_overflow"] = 0
                super().__init__(creator, **kw)

        def get_pool_class(subcls: Any, url: Any) -> Any:
            if _is_sqlite_memory(cls, url):
                return _OneConnectionPool
            base = cls.get_pool_class(url)
            if issubclass(base, pool.QueuePool) and not issubclass(
                base, pool.AsyncAdaptedQueuePool
            ):
                return pool.AsyncAdaptedQueuePool
            return base

        def create_connect_args(self: Any, url: Any) -> Any:
            cargs, cparams = cls.create_connect_args(self, url)
            if cls.name == "sqlite":
                # pooled connections move between workers (never shared at
                # the same time): sqlite3's same-thread check must be off,
                # also for :memory:, where the dialect turns it on
                cparams["check_same_thread"] = False
            return cargs, cparams

        remember_connect_args = cls.name in ("mysql", "mariadb")

        def connect(self: Any, *cargs: Any, **cparams: Any) -> Any:
            dbapi_conn = cls.connect(self, *cargs, **cparams)
            if remember_connect_args:
                try:
                    setattr(dbapi_conn, _CONNECT_ARGS, (cargs, cparams))
                except AttributeError:
                    pass  # a driver class with __slots__: no interrupter
            return dbapi_conn

        # each statement is an await point (see the module docstring); the
        # rows are fetched inside it (_BufferedCursor), so a slow fetch is
        # interrupted too
        def as_await_point(method: Any) -> Any:
            def statement(self: Any, cursor: Any, *args: Any, **kwargs: Any) -> None:
                _bridge.note_sync_io()
                fn = functools.partial(method, **kwargs) if kwargs else method
                _bridge.run_blocking(_interrupter(self, cursor), fn, self, cursor, *args)

            statement.__name__ = method.__name__
            return statement

        sub = type(
            cls.__name__ + "_syncdriver",
            (cls,),
            {
                "__module__": cls.__module__,
                "__doc__": f"{cls.__name__} run by sqla-anyio-shim's "
                "workers behind create_async_engine().",
                _MARK: True,
                "is_async": True,
                # SQLAlchemy looks for this in the class's own __dict__; the
                # subclass changes nothing that affects statement caching
                "supports_statement_cache": cls.__dict__.get(
                    "supports_statement_cache",
                    getattr(cls, "supports_statement_cache", False),
                ),
                "get_pool_class": classmethod(get_pool_class),
                "create_connect_args": create_connect_args,
                "connect": connect,
                "do_execute": as_await_point(cls.do_execute),
                "do_execute_no_params": as_await_point(cls.do_execute_no_params),
                "do_executemany": as_await_point(cls.do_executemany),
                "execution_ctx_cls": _execution_context(cls),
                "supports_server_side_cursors": True
                if cls.name == "sqlite"
                else cls.supports_server_side_cursors,
            },
        )
        event.listen(sub, "handle_error", _keep_interrupted_connection)
        _subclasses[cls] = sub
        return sub


def wrap_get_async_dialect_cls(original: Any) -> Any:
    """Wrap a dialect's ``get_async_dialect_cls`` classmethod function."""

    def get_async_dialect_cls(cls: Any, url: Any) -> Any:
        if enabled:
            dialect_cls = cls.get_dialect_cls(url)
            if not dialect_cls.is_async:
                return sync_driver_dialect(dialect_cls)
        return original(cls, url)

    get_async_dialect_cls.__wrapped__ = original  # type: ignore[attr-defined]
    return get_async_dialect_cls
