"""What a ``greenlet_spawn()`` call works on, told from its target.

SQLAlchemy's asyncio extension calls ``greenlet_spawn(fn, *args)`` with
``fn`` a bound method of the object the sync code works on
(``sync_session.execute``, ``sync_engine.connect``, ...) or with that object
as the first argument (``run_sync(fn)``: the sync ``Connection`` or
``Session``).  From it two rooms need to know:

* the admission gate (``_admission``): which pool the call will check a
  connection out of, or whether it holds one already;
* the parallel mode (``_bridge._host``): whether the engine's pool hands
  one DBAPI connection to several tasks at once (then the sync code of
  those tasks must stay atomic, as under greenlet), and whether it is a
  sync-driver engine.

Both are answered by :func:`target_of` with the :class:`EngineFacts` of the
engine, computed once per engine and pool and cached on the engine.
Nothing of SQLAlchemy's is imported here: classes are recognised by module
and name, their kind cached per class.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

#: pool classes whose checkout hands one DBAPI connection to several
#: callers at once (by module and name): a task's sync code on such an
#: engine is kept atomic with respect to the other tasks' on it
_SHARING_POOLS = frozenset(
    {
        ("sqlalchemy.pool.impl", "StaticPool"),
        ("sqlalchemy.pool.impl", "SingletonThreadPool"),
        ("sqlalchemy.pool.impl", "AssertionPool"),
    }
)

#: the class attribute of the sync-driver dialects (_sync_drivers._MARK;
#: not imported, so that this module stays free of the dialect machinery)
_SYNC_DRIVER_MARK = "_sqla_anyio_shim_sync_driver"

# engines the application marked (keep_atomic): weak, by their sync Engine
_marked: weakref.WeakSet[Any] = weakref.WeakSet()
# bumped by every keep_atomic(): facts made before it are stale (engines of
# execution_options() share their base's mark but cache facts of their own;
# and a call may be computing facts while the mark is added)
_marks_generation = 0
_marks_lock = threading.Lock()


class EngineFacts:
    """What the bridge needs to know of one engine (with its current pool).

    ``domain``: a lock held by the sync code of every call on the engine
    between its await points (None: the engine's connections are not
    shared, its calls may run at once); ``sync_driver``: its DBAPI is a sync
    driver run in the workers (``_sync_drivers``); ``pool``: the pool these
    facts are about (an engine's ``dispose()`` makes a new one)."""

    __slots__ = ("__weakref__", "domain", "generation", "pool", "slots", "sync_driver")

    def __init__(
        self, pool: Any, domain: threading.Lock | None, sync_driver: bool, generation: int = 0
    ) -> None:
        self.pool = pool
        self.domain = domain
        self.generation = generation
        self.sync_driver = sync_driver
        # the admission slots of this engine's calls (made by _admission)
        self.slots: Any = None


#: target_of()'s "holds a connection" answer comes with the engine's facts
#: (or None when the connection's engine cannot be told)
HOLDER = "holder"
#: ... and "will check one out of the engine's pool"
USER = "user"


def target_of(fn: Any, args: tuple[Any, ...]) -> tuple[str, EngineFacts | None] | None:
    """``(HOLDER, facts)`` if the call works on a checked-out connection,
    ``(USER, facts)`` if it will check one out of the engine's pool, None
    if neither can be told (a plain function)."""
    found = None
    for obj in (getattr(fn, "__self__", None), args[0] if args else None):
        if obj is None:
            continue
        target = _target_of_object(obj)
        if target is None:
            continue
        if target[0] is HOLDER:
            return target
        if found is None:
            found = target
    return found


def _target_of_object(obj: Any) -> tuple[str, EngineFacts | None] | None:
    kind = _kind_of(type(obj))
    if kind == "engine":
        return USER, facts_of(obj)
    if kind == "connection":
        return _of_connection(obj)
    if kind == "session":
        return _of_session(obj)
    if kind == "transaction":
        # engine.begin()'s commit / rollback: its Connection's
        connection = getattr(obj, "connection", None)
        return _of_connection(connection) if connection is not None else None
    if kind == "session_transaction":
        # AsyncSessionTransaction's commit / rollback
        session = getattr(obj, "session", None)
        if session is not None:
            return _of_session(session)
        return (HOLDER, None) if getattr(obj, "_connections", None) else None
    if kind == "result":
        # an async result being fetched, or a sync result being closed for
        # one: it holds its cursor's connection
        connection = _connection_of_result(obj)
        if connection is not None:
            return HOLDER, _facts_of_connection(connection)
        return HOLDER, None
    if kind == "other":
        # an ORM object (awaitable_attrs: greenlet_spawn(getattr, obj,
        # name)): its session's
        state = getattr(obj, "_sa_instance_state", None)
        session = getattr(state, "session", None) if state is not None else None
        if session is not None:
            return _of_session(session)
    return None


def _connection_of_result(result: Any) -> Any:
    """The Connection whose cursor ``result`` reads, or None.

    An async result wraps a sync one (``_real_result``; a sync result has the
    attribute too, as None); a CursorResult's execution context has the
    connection; an ORM result (``ChunkedIteratorResult``: its ``context`` is
    the ORM's QueryContext in 2.1, absent in 2.0) keeps the CursorResult it
    reads from as ``raw``.  Missing one of these would run the call without
    its engine's domain lock (StaticPool, keep_atomic)."""
    for _ in range(4):  # AsyncResult -> ORM result -> CursorResult
        context = getattr(result, "context", None)
        connection = getattr(context, "root_connection", None)
        if connection is not None and _kind_of(type(connection)) == "connection":
            return connection
        result = getattr(result, "_real_result", None) or getattr(result, "raw", None)
        if result is None:
            return None
    return None


def _of_connection(connection: Any) -> tuple[str, EngineFacts | None] | None:
    facts = _facts_of_connection(connection)
    if getattr(connection, "_dbapi_connection", None) is not None:
        return HOLDER, facts
    return (USER, facts) if facts is not None else None


def _facts_of_connection(connection: Any) -> EngineFacts | None:
    engine = getattr(connection, "engine", None)
    return facts_of(engine) if engine is not None and _kind_of(type(engine)) == "engine" else None


def _of_session(session: Any) -> tuple[str, EngineFacts | None] | None:
    bind = getattr(session, "bind", None)
    facts = None
    joined = False
    if bind is not None:
        kind = _kind_of(type(bind))
        if kind == "engine":
            facts = facts_of(bind)
        elif kind == "connection":
            # a session joined to an external connection ("join a session
            # into an external transaction"): it works on that connection
            facts = _facts_of_connection(bind)
            joined = getattr(bind, "_dbapi_connection", None) is not None
    transaction = getattr(session, "_transaction", None)
    connections = getattr(transaction, "_connections", None) if transaction is not None else None
    if joined or connections:
        if facts is None and connections:
            # several binds: the engines it has connections on (an atomic
            # one among them decides: its domain lock must be held)
            facts = _facts_of_connections(connections)
        return HOLDER, facts
    if facts is None:
        return None  # several binds, or get_bind(): cannot tell which pool
    return USER, facts


def _facts_of_connections(connections: Any) -> EngineFacts | None:
    """Facts of a SessionTransaction's connections (values: (Connection,
    Transaction, ...)): the first atomic engine's, else the first engine's."""
    first = None
    for entry in list(connections.values()):
        connection = entry[0] if isinstance(entry, tuple) and entry else None
        facts = _facts_of_connection(connection) if connection is not None else None
        if facts is None:
            continue
        if facts.domain is not None:
            return facts
        if first is None:
            first = facts
    return first


def facts_of(engine: Any) -> EngineFacts:
    """The engine's facts, made on first use and again after its pool was
    replaced (``dispose()``)."""
    pool = engine.pool  # a property on the engines of execution_options()
    facts = engine.__dict__.get("_sqla_anyio_shim_facts")
    generation = _marks_generation  # read before the marks: see keep_atomic
    if facts is not None and facts.pool is pool and facts.generation == generation:
        return facts  # type: ignore[no-any-return]
    atomic = _shares_connections(pool) or _is_marked(engine)
    facts = EngineFacts(
        pool,
        # one lock per pool, whichever engine object (execution_options()
        # makes new ones on the same pool) asks; dict.setdefault is atomic
        pool.__dict__.setdefault("_sqla_anyio_shim_domain", threading.Lock()) if atomic else None,
        bool(getattr(engine.dialect, _SYNC_DRIVER_MARK, False)),
        generation,
    )
    # two threads racing here make equal facts; either may stay
    engine.__dict__["_sqla_anyio_shim_facts"] = facts
    return facts


def _shares_connections(pool: Any) -> bool:
    return any((base.__module__, base.__name__) in _SHARING_POOLS for base in type(pool).__mro__)


def _is_marked(engine: Any) -> bool:
    while engine is not None:
        if engine in _marked:
            return True
        engine = engine.__dict__.get("_proxied")  # an execution_options() engine's base
    return False


def keep_atomic(engine: Any) -> None:
    """Mark ``engine`` (an ``AsyncEngine`` or ``Engine``): its tasks' sync
    code runs one stretch at a time, as under greenlet, in every mode."""
    sync_engine = getattr(engine, "sync_engine", engine)
    if _kind_of(type(sync_engine)) != "engine":
        raise TypeError(
            f"keep_atomic() takes an AsyncEngine or an Engine, got {type(engine).__name__}"
        )
    global _marks_generation
    _marked.add(sync_engine)
    # every engine's next call recomputes its facts: this one's, those made
    # from it by execution_options() (they cache their own), and a call that
    # read the generation before the mark was added (it stores facts of the
    # old generation, which the call after it recomputes)
    with _marks_lock:
        _marks_generation += 1


_kinds: dict[type, str] = {}

# SQLAlchemy classes (by module and name) whose instances, as a call's
# target, tell which engine it works on and whether it holds a connection
_CLASSES = {
    ("sqlalchemy.engine.base", "Engine"): "engine",
    ("sqlalchemy.engine.base", "Connection"): "connection",
    ("sqlalchemy.engine.base", "Transaction"): "transaction",
    ("sqlalchemy.orm.session", "Session"): "session",
    ("sqlalchemy.orm.session", "SessionTransaction"): "session_transaction",
    ("sqlalchemy.ext.asyncio.result", "AsyncCommon"): "result",
    ("sqlalchemy.engine.result", "Result"): "result",
    # the pool's queue (a pool has an admission gate only if it waits in one)
    ("sqlalchemy.util.queue", "AsyncAdaptedQueue"): "queue",
}


def _kind_of(cls: type) -> str:
    kind = _kinds.get(cls)
    if kind is None:
        kind = "other"
        for base in cls.__mro__:
            found = _CLASSES.get((base.__module__, base.__name__))
            if found is not None:
                kind = found
                break
        _kinds[cls] = kind
    return kind
