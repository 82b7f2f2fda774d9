"""Async drivers inside the workers: what SQLAlchemy's side of it knows
(``install(driver_loops=...)``; the mechanism is ``_bridge._driver_loop``,
the design docs/principle.md, "Driver loops").

Which ``await_()`` runs on a connection's own loop is decided by the
*connection*: SQLAlchemy reaches a driver only through its adapter classes
(``AsyncAdapt_*_connection``, ``AsyncAdapt_*_cursor``,
``AsyncAdapt_terminate``, ``AdaptedConnection.run_async``), so every method
and property those classes define is wrapped: while one runs, the loop of
the adapter's driver connection is the thread's driver scope (none: the
connection was made in the hand-off mode, its awaits go to the host).  A
method that runs before the adapter knows its connection (a cursor's
``__init__``) keeps the scope of its caller (the connection's ``cursor()``).
Outside the adapters SQLAlchemy awaits a driver in three places, wrapped
the same way: the adapter DBAPI module's ``connect()`` (the loop is made
there, whoever calls it: the dialect or a ``do_connect`` event), the
function ``on_connect()`` returns (asyncpg's codec set-up), psycopg's
``_type_info_fetch()``.  And one coroutine of a cursor is awaited by the
caller itself, on its own loop -- ``_async_soft_close()`` -- which runs on
the connection's loop in the caller's thread instead
(``DriverLoop.run_here``).

A connection's loop is closed after its adapter's ``close()`` succeeds and
after ``terminate()``; a connection collected unclosed closes it from its
finalizer (``_bridge.attach_driver_loop``).

The adapter classes are wrapped when the first connection is to get a
loop of its own (``_patching.activate_driver_loops``): until then the
hand-off mode pays nothing.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import types
from typing import Any

from .. import _bridge
from .._bridge import _driver_loop

__all__ = [
    "is_adapter_class",
    "is_adapter_dbapi_class",
    "patch_adapter_class",
    "patch_dbapi_class",
]

_MISSING = object()


def is_adapter_class(cls: type) -> bool:
    """A SQLAlchemy class through which the sync code reaches an async
    driver (see the module docstring)."""
    module = cls.__module__
    if not module.startswith(("sqlalchemy.connectors.", "sqlalchemy.dialects.")):
        return cls.__name__ == "AdaptedConnection" and module == "sqlalchemy.engine.interfaces"
    name = cls.__name__
    if not name.startswith("AsyncAdapt"):
        return False
    return "cursor" in name or name.endswith("_connection") or name == "AsyncAdapt_terminate"


_get = object.__getattribute__


def _driver_of(adapter: Any) -> Any:
    """The driver loop of an adapter (connection or cursor): None when its
    connection has none; _MISSING when the adapter does not know its
    connection yet.  Its own attributes only: some adapters forward the
    rest to the driver's object (``__getattr__``), and a lookup through it
    before ``__init__`` has set that object recurses."""
    try:
        return _driver_loop.loop_of(_get(adapter, "_connection"))
    except AttributeError:
        pass
    try:
        # 2.0's psycopg cursors know only the driver's cursor
        cursor = _get(adapter, "_cursor")
    except AttributeError:
        return _MISSING
    connection = getattr(cursor, "connection", None)
    if connection is None:
        return _MISSING
    return _driver_loop.loop_of(connection)


def _driver_of_argument(obj: Any) -> Any:
    """The driver loop behind what a dialect function is given: a DBAPI
    adapter, a pool's connection (``dbapi_connection``) or a Connection
    (``connection.dbapi_connection``)."""
    for path in ((), ("dbapi_connection",), ("connection", "dbapi_connection")):
        target = obj
        try:
            for name in path:
                target = getattr(target, name)
        except Exception:
            continue
        driver = _driver_of(target)
        if driver is not _MISSING:
            return driver
    return _MISSING


def _call_in(driver: Any, fn: Any, self: Any, args: Any, kwargs: Any) -> Any:
    """``fn(self, *args, **kwargs)`` in ``driver``'s scope (_MISSING: in the
    caller's)."""
    if driver is _MISSING:
        return fn(self, *args, **kwargs)
    return _call_in_scope(driver, fn, self, args, kwargs)


_call_in_scope = _driver_loop.call_in_scope


def _scoped(fn: Any, resolve: Any) -> Any:
    """``fn`` run in the driver scope ``resolve(first argument)`` names."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driver_loop.in_use:
            return fn(self, *args, **kwargs)
        return _call_in(resolve(self), fn, self, args, kwargs)

    return wrapper


def _scoped_generator(fn: Any) -> Any:
    """A generator method: each of its steps in the adapter's scope (the
    caller's code between the steps is not the adapter's)."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        generator = fn(self, *args, **kwargs)
        if not _driver_loop.in_use:
            return generator
        driver = _driver_of(self)
        if driver is _MISSING:
            return generator
        return _steps(generator, driver)

    return wrapper


def _steps(generator: Any, driver: Any) -> Any:
    scope = _driver_loop.scope
    try:
        with scope(driver):
            item = next(generator)
        while True:
            try:
                value = yield item
            except GeneratorExit:
                with scope(driver):
                    generator.close()
                raise
            except BaseException as exc:
                with scope(driver):
                    item = generator.throw(exc)
            else:
                with scope(driver):
                    item = generator.send(value)
    except StopIteration as stop:
        return stop.value


def _closing(fn: Any) -> Any:
    """A connection adapter's ``close()``: its loop is closed once it has
    closed (a close that failed leaves the loop to ``terminate()``, which
    the pool calls next, or to the finalizer)."""

    @functools.wraps(fn)
    def close(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driver_loop.in_use:
            return fn(self, *args, **kwargs)
        driver = _driver_of(self)
        result = _call_in(driver, fn, self, args, kwargs)
        if isinstance(driver, _bridge.DriverLoop):
            driver.close()
        return result

    return close


def _terminating(fn: Any) -> Any:
    """``terminate()``: SQLAlchemy force-closes when the graceful close
    raises one of ``_terminate_handled_exceptions()`` -- asyncio's
    cancellation among them, trio's not (upstream never ran a driver under
    trio).  A trio cancellation raised at the graceful close force-closes
    here, then propagates.  The loop is closed afterwards, whatever
    happened."""

    @functools.wraps(fn)
    def terminate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driver_loop.in_use:
            return fn(self, *args, **kwargs)
        driver = _driver_of(self)
        try:
            return _call_in(driver, fn, self, args, kwargs)
        except BaseException as exc:
            if isinstance(driver, _bridge.DriverLoop) and _is_foreign_cancellation(exc):
                self._terminate_force_close()
            raise
        finally:
            if isinstance(driver, _bridge.DriverLoop):
                driver.close()

    return terminate


def _is_foreign_cancellation(exc: BaseException) -> bool:
    from ._primitives import is_cancellation_exception

    return is_cancellation_exception(exc) and not isinstance(exc, asyncio.CancelledError)


def _soft_close(fn: Any) -> Any:
    """``_async_soft_close()``, awaited by ``AsyncResult`` on the caller's
    loop: on the connection's own loop, in the caller's thread."""

    @functools.wraps(fn)
    async def _async_soft_close(self: Any) -> None:
        driver = _driver_of(self) if _driver_loop.in_use else None
        if isinstance(driver, _bridge.DriverLoop):
            driver.run_here(fn(self))
            return
        await fn(self)

    return _async_soft_close


def _scoped_result(fn: Any) -> Any:
    """``on_connect()``: the function it returns runs in the scope of the
    connection it is given."""

    @functools.wraps(fn)
    def on_connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        hook = fn(self, *args, **kwargs)
        if hook is None:
            return None

        @functools.wraps(hook)
        def connect(conn: Any, *a: Any, **kw: Any) -> Any:
            if not _driver_loop.in_use:
                return hook(conn, *a, **kw)
            return _call_in(_driver_of_argument(conn), hook, conn, a, kw)

        return connect

    return on_connect


def _scoped_by_argument(fn: Any) -> Any:
    """A dialect method awaiting the driver of its first argument."""

    @functools.wraps(fn)
    def method(self: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
        if not _driver_loop.in_use:
            return fn(self, connection, *args, **kwargs)
        driver = _driver_of_argument(connection)
        return _call_in(driver, fn, self, (connection, *args), kwargs)

    return method


def _wrapped(value: Any) -> bool:
    return bool(getattr(value, "_sqla_anyio_shim_scoped", False))


def _mark(fn: Any) -> Any:
    fn._sqla_anyio_shim_scoped = True
    return fn


def patch_adapter_class(set_attr: Any, cls: type) -> None:
    """Wrap the methods and properties ``cls`` itself defines (see the
    module docstring); ``set_attr(cls, name, value)`` records each change
    for uninstall()."""
    for name, value in list(cls.__dict__.items()):
        if name.startswith("__") and name not in ("__init__", "__iter__", "__enter__", "__exit__"):
            continue
        if isinstance(value, property):
            if _wrapped(value.fget):
                continue
            set_attr(
                cls,
                name,
                property(
                    _mark(_scoped(value.fget, _driver_of)) if value.fget else None,
                    _mark(_scoped(value.fset, _driver_of)) if value.fset else None,
                    _mark(_scoped(value.fdel, _driver_of)) if value.fdel else None,
                    value.__doc__,
                ),
            )
            continue
        if not isinstance(value, types.FunctionType) or _wrapped(value):
            continue
        if name == "_async_soft_close":
            set_attr(cls, name, _mark(_soft_close(value)))
        elif inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            # awaited inside an await_() (on the loop that runs it)
            continue
        elif inspect.isgeneratorfunction(value):
            set_attr(cls, name, _mark(_scoped_generator(value)))
        elif name == "close" and cls.__name__.endswith("_connection"):
            set_attr(cls, name, _mark(_closing(value)))
        elif name == "terminate":
            set_attr(cls, name, _mark(_terminating(value)))
        else:
            set_attr(cls, name, _mark(_scoped(value, _driver_of)))


def patch_dialect_class(set_attr: Any, cls: type) -> None:
    """The dialect methods that await a driver outside its adapters."""
    for name, wrap in (("on_connect", _scoped_result), ("_type_info_fetch", _scoped_by_argument)):
        value = cls.__dict__.get(name)
        if isinstance(value, types.FunctionType) and not _wrapped(value):
            set_attr(cls, name, _mark(wrap(value)))


def is_adapter_dbapi_class(cls: type) -> bool:
    """A SQLAlchemy stand-in for an async driver's DBAPI module
    (``AsyncAdapt_asyncpg_dbapi``, ``PsycopgAdaptDBAPI``, ...): the
    dialect's ``loaded_dbapi``, whose ``connect()`` makes the adapter."""
    if not cls.__module__.startswith(("sqlalchemy.connectors.", "sqlalchemy.dialects.")):
        return False
    name = cls.__name__
    is_module = (name.startswith("AsyncAdapt") and name.endswith("_dbapi")) or name.endswith(
        "AdaptDBAPI"
    )
    return is_module and isinstance(cls.__dict__.get("connect"), types.FunctionType)


def patch_dbapi_class(set_attr: Any, cls: type) -> None:
    """Wrap the adapter DBAPI module's ``connect()`` (see _connecting)."""
    value = cls.__dict__["connect"]
    if not _wrapped(value):
        set_attr(cls, "connect", _mark(_connecting(value)))


def _connecting(fn: Any) -> Any:
    """``AsyncAdapt_*_dbapi.connect()``: an async driver's connection made
    while driver loops are in force gets a loop of its own, and is made on
    it.  This is the one place every connection passes through: the
    dialect's ``connect()`` calls it, and so does an application's
    ``do_connect`` event that opens the connection itself
    (``dialect.loaded_dbapi.connect(...)``), which skips the dialect's --
    a loop made there would leave such a connection without one (under
    trio its awaits then reached no asyncio loop at all)."""

    @functools.wraps(fn)
    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _bridge.driver_loops_in_force():
            _refuse_under_trio(self)
            return fn(self, *args, **kwargs)
        from ._patching import activate_driver_loops

        activate_driver_loops()
        driver = _bridge.new_driver_loop()
        try:
            with _driver_loop.scope(driver):
                connection = fn(self, *args, **kwargs)
            target = connection._connection
            if _driver_loop.loop_of(target) is not None:
                # made, and given its loop, by a connect nested in this one:
                # an async_creator that opens the driver connection through
                # another engine's creator (SQLAlchemy's
                # test_async_creator_invoked).  asyncpg and aiomysql bind a
                # connection to the loop it was made on: it keeps that one
                driver.close()
                return connection
            if not _driver_loop.attach(target, driver):
                with _driver_loop.scope(driver):
                    connection.close()
                raise _bridge.sqlalchemy_exc().InvalidRequestError(
                    f"sqla-anyio-shim: the {_driver_name(self)!r} driver's "
                    "connection can hold no event loop of its own; use "
                    "sqla_anyio_shim.install(driver_loops=False) with this driver"
                )
        except BaseException:
            driver.close()
            raise
        return connection

    return connect


def _driver_name(dbapi: Any) -> str:
    # the dialect module's name: asyncpg, psycopg, aiosqlite, aiomysql, ...
    return type(dbapi).__module__.rpartition(".")[2]


def _refuse_under_trio(dbapi: Any) -> None:
    """An asyncio-only driver under trio with driver loops off: fail at its
    first connection, clearly (its awaits would reach trio's loop)."""
    if _bridge.host_is_trio():
        raise _bridge.sqlalchemy_exc().InvalidRequestError(
            f"The {_driver_name(dbapi)!r} driver needs an asyncio event loop and "
            "cannot run under trio with driver_loops=False. Under trio, "
            "let async drivers run on event loops of their own in the "
            "shim's workers: sqla_anyio_shim.install(driver_loops=None) (the "
            "default) or driver_loops=True; or use a sync DBAPI driver "
            "there: install(sync_drivers=True) and a URL such as "
            "'sqlite:///file.db', 'postgresql+psycopg://...' or "
            "'mysql+pymysql://...'."
        )
