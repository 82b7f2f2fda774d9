"""Admission of new calls while many calls contend for pool connections.

Why: a task waiting in the connection pool's queue holds a whole worker
thread (its sync code's frames are live on that thread's stack), where
greenlet holds one small stack.  20,000 tasks queueing for a pool of 5 were
20,000 threads, and the cost grew faster than the number of tasks.

What: a call holds one of ``limit`` *admission slots* from its start until
it is past the pool: until its sync code first awaits anything but the
pool's queue, or its wait in the queue ends, or the call ends -- whichever
comes first.  When all slots are taken, a new ``greenlet_spawn()`` waits in
the event loop (a future, no thread) for one, in arrival order.  Those calls
could not have got a connection before the ones already waiting anyway.
Calls that are past the pool (running queries) hold no slot, so the bound
never limits how many queries run at once.

Why not a plain cap on workers (``max_workers``): tasks waiting for a
connection would starve the tasks that hold one and would return it -- a
deadlock.  So when the slots are all taken, a call whose sync code works on
a checked-out connection (an SQLAlchemy ``Connection`` or its
``Transaction``, a ``Session`` or ``SessionTransaction`` that has one, a
result being fetched or closed, an ORM object whose session has one; as the
bound object of ``fn`` or its first argument) passes without a slot.  As a last resort a
waiter that sees no slot released for ``ESCAPE_AFTER`` seconds passes too: a
holder this check cannot recognise must never wait forever.

Below ``limit`` calls at the pool at once (SQLAlchemy's own tests, most
applications) the cost is a lock round trip at the start and end of a call.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .._bridge._wakeups import _deadline, _wait, _Waiter

#: admission slots (``None``: no admission control); set by
#: install(max_pool_waiters=...)
limit: int | None = 64

#: code objects of the coroutines that wait in a pool's queue (registered by
#: _primitives): a call awaiting one keeps its slot until it is over
pool_wait_codes: set[Any] = set()

#: seconds without any slot released after which a waiter passes anyway
ESCAPE_AFTER = 2.0

_lock = threading.Lock()
# calls holding a slot, and how many slots were ever released ("progress");
# both guarded by _lock
occupied = 0
_released = 0
_gate: deque[_Waiter] = deque()
_escapes = 0


def configure(new_limit: int | None) -> None:
    """install(max_pool_waiters=...): a raised (or removed) bound admits
    the waiters it now has room for at once."""
    global limit
    with _lock:
        limit = new_limit
        _hand_over()


def try_admit() -> bool | None:
    """Take a slot if one is free and nobody waits for one: True; no
    admission control: False (the call holds no slot); all taken: None."""
    with _lock:
        return _try_admit_locked()


def _try_admit_locked() -> bool | None:
    global occupied
    if limit is None:
        return False
    if occupied < limit and not _gate:
        occupied += 1
        return True
    return None


async def admit(fn: Any, args: tuple[Any, ...]) -> bool:
    """greenlet_spawn()'s admission: whether the call holds a slot (it must
    then release() it exactly once)."""
    slot = try_admit()
    if slot is not None:
        return slot
    if _holds_connection(fn, args):
        return False
    return await _wait_turn()


def release() -> None:
    """A call gives its slot back: hand it to the first waiter whose loop
    still runs."""
    global occupied, _released
    with _lock:
        occupied -= 1
        _released += 1
        _hand_over()


def _hand_over() -> None:
    # under _lock: a free slot goes to the first live waiter
    global occupied
    while _gate and (limit is None or occupied < limit):
        if _gate.popleft().wake():
            occupied += 1


async def _wait_turn() -> bool:
    """Wait, without a thread, for a slot (True: handed one) or for the
    escape hatch (False: passes without a slot)."""
    global occupied, _escapes
    front = False
    while True:
        with _lock:
            admitted = _try_admit_locked()
            if admitted is not None:
                return admitted
            released = _released
            waiter = _Waiter()
            if front:
                _gate.appendleft(waiter)
            else:
                _gate.append(waiter)
        try:
            await _wait(waiter, _deadline(ESCAPE_AFTER))
        except BaseException:
            with _lock:
                if waiter.notified:
                    # a slot was handed to us: pass it on
                    occupied -= 1
                    _hand_over()
                else:
                    _remove(waiter)
            raise
        with _lock:
            if waiter.notified:
                return True
            _remove(waiter)
            if _released == released:
                # no slot came free for ESCAPE_AFTER: whoever would free
                # one may be waiting here (a holder the check missed)
                _escapes += 1
                return False
        # slots moved, just not to us yet: wait again, keeping our place
        front = True


def _remove(waiter: _Waiter) -> None:
    try:
        _gate.remove(waiter)
    except ValueError:
        pass


def gate_stats() -> dict[str, int]:
    with _lock:
        return {"occupied": occupied, "waiting": len(_gate), "escapes": _escapes}


def _holds_connection(fn: Any, args: tuple[Any, ...]) -> bool:
    """Whether the call's sync code works on a connection checked out of a
    pool: then it may be the one that returns it, and must not wait."""
    for obj in (getattr(fn, "__self__", None), args[0] if args else None):
        if obj is None:
            continue
        kind = _kind_of(type(obj))
        if kind == "connection":
            # a Connection whose DBAPI connection is checked out
            if getattr(obj, "_dbapi_connection", None) is not None:
                return True
        elif kind == "session":
            transaction = getattr(obj, "_transaction", None)
            if transaction is not None and getattr(transaction, "_connections", None):
                return True
        elif kind == "transaction":
            # engine.begin()'s commit / rollback: its Connection's
            connection = getattr(obj, "connection", None)
            if getattr(connection, "_dbapi_connection", None) is not None:
                return True
        elif kind == "session_transaction":
            # AsyncSessionTransaction's commit / rollback
            if getattr(obj, "_connections", None):
                return True
        elif kind == "result":
            return True
        else:
            # an ORM object (awaitable_attrs: greenlet_spawn(getattr, obj,
            # name)): its session's connection
            state = getattr(obj, "_sa_instance_state", None)
            session = getattr(state, "session", None) if state is not None else None
            transaction = getattr(session, "_transaction", None)
            if transaction is not None and getattr(transaction, "_connections", None):
                return True
    return False


_kinds: dict[type, str] = {}

# SQLAlchemy classes (by module and name: nothing of SQLAlchemy's is
# imported here) whose instances, as a call's target, may hold a connection
_HOLDER_CLASSES = {
    ("sqlalchemy.engine.base", "Connection"): "connection",
    ("sqlalchemy.engine.base", "Transaction"): "transaction",
    ("sqlalchemy.orm.session", "Session"): "session",
    ("sqlalchemy.orm.session", "SessionTransaction"): "session_transaction",
    # an async result being fetched, or a sync result being closed for one:
    # it holds its cursor's connection
    ("sqlalchemy.ext.asyncio.result", "AsyncCommon"): "result",
    ("sqlalchemy.engine.result", "Result"): "result",
}


def _kind_of(cls: type) -> str:
    kind = _kinds.get(cls)
    if kind is None:
        kind = "other"
        for base in cls.__mro__:
            found = _HOLDER_CLASSES.get((base.__module__, base.__name__))
            if found is not None:
                kind = found
                break
        _kinds[cls] = kind
    return kind
