"""Admission of new calls at a saturated connection pool: one gate per pool.

Why: a task waiting in the connection pool's queue holds a whole worker
thread (its sync code's frames are live on that thread's stack), where
greenlet holds one small stack.  20,000 tasks queueing for a pool of 5 were
20,000 threads, and the cost grew faster than the number of tasks.

What: each pool (an ``AsyncAdaptedQueuePool``, the pool of every async
engine) has ``limit`` *admission slots*.  A call that will check out a
connection from that pool -- its target is the ``Engine``, or a ``Session``
(or an ORM object of one) bound to that engine and holding no connection yet
-- takes one of the pool's slots from its start until it is past the pool:
until its sync code first awaits anything but the pool's queue, or its wait
in the queue ends, or the call ends.  With all of the pool's slots taken, it
waits in the event loop (a future, no thread), in arrival order: it could
not have got a connection before the calls already queueing anyway.

What never waits here (the rules greenlet's users rely on):

* a call whose target holds a connection -- a ``Connection`` that has its
  DBAPI connection, its ``Transaction``, a ``Session`` bound to such a
  ``Connection`` or whose transaction has one, a result being fetched or
  closed, an ORM object of such a session: it may be the one that returns
  the connection the others wait for (it also passes ``max_workers``,
  see _host.acquire_worker);
* a call whose pool cannot be told from its target (a plain function
  closing over a connection, a session with several binds): it runs at
  once, on a thread, as it would on greenlet;
* calls on another pool: a saturated pool holds up nobody else's engine.

The pool's clock runs at its gate: a call waits there for at most the
pool's ``pool_timeout``, and the time it waited is taken off its wait in
the pool's queue (``_primitives.QueueMethods.get``), so SQLAlchemy's
``TimeoutError`` comes when ``pool_timeout`` says, gate or no gate.  A call
whose time ran out at the gate passes without a slot and meets the pool's
own timeout at once (or a connection, if one came free).

What a call works on is told by ``_targets`` (the kind of a class is
cached, the facts of an engine too).  Every call on a known engine gets a
*slot* object from here, held or not: it also carries the engine's facts
the bridge needs (``domain``, ``sync_driver``: see _host.Slot).

Cost: classifying a call is a few attribute reads; below ``limit`` calls at
a pool, one lock round trip at the start of a call and one when it is past
the pool.  Waiters leave the queue lazily
(a cancelled one is skipped when its turn comes), so 20,000 waiting tasks
cost O(1) each.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any

from .._bridge._wakeups import _deadline, _wait, _Waiter
from . import _targets
from ._targets import HOLDER as _HOLDS, EngineFacts, target_of

#: admission slots per pool (``None``: no admission control); set by
#: install(max_pool_waiters=...)
limit: int | None = 64

#: code objects of the coroutines that wait in a pool's queue (registered by
#: _primitives): a call awaiting one keeps its slot until it is over
pool_wait_codes: set[Any] = set()

#: try_admit(): all of the pool's slots are taken, await admit()
WAIT = object()

_monotonic = time.monotonic

# one lock for every gate: the state it guards is a few integers and a
# deque per pool, touched twice per call
_lock = threading.Lock()
# every gate that exists, for configure() and gate_stats()
_gates: weakref.WeakSet[_PoolGate] = weakref.WeakSet()
# totals over all gates, under _lock
_occupied = 0
_waiting = 0
_expired = 0


class _Slot:
    """What a call on a known engine holds from its admission on (see
    _host.Slot): a slot of the pool's gate (``gate``), or none (a holder,
    or a call that needs none) -- with the engine's facts either way."""

    __slots__ = ("domain", "gate", "holder", "sync_driver")

    #: a call admitted at once waited for nothing
    waited = 0.0

    def __init__(self, facts: EngineFacts | None, holder: bool, gate: _PoolGate | None) -> None:
        self.holder = holder
        self.gate = gate
        self.domain = facts.domain if facts is not None else None
        self.sync_driver = facts.sync_driver if facts is not None else False

    def release(self) -> None:
        gate = self.gate
        if gate is not None:
            gate.release()


class _EngineSlots:
    """The three slot objects of one engine's calls (shared by its calls:
    they hold no per-call state)."""

    __slots__ = ("facts", "free", "gate", "gated", "holder")

    def __init__(self, facts: EngineFacts) -> None:
        self.facts = facts
        self.gate = _gate_of_pool(facts.pool)
        self.holder = _Slot(facts, True, None)
        self.free = _Slot(facts, False, None)
        self.gated = _Slot(facts, False, self.gate) if self.gate is not None else self.free


def _slots_of(facts: EngineFacts) -> _EngineSlots:
    slots = facts.slots
    if slots is None:
        slots = facts.slots = _EngineSlots(facts)
    return slots  # type: ignore[no-any-return]


#: the slot of a call that holds a connection of an engine that cannot be told
HOLDER = _Slot(None, True, None)


class _PoolGate:
    """The admission slots of one pool."""

    __slots__ = ("__weakref__", "occupied", "queue", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.occupied = 0
        self.queue: deque[_Ticket] = deque()
        # the pool's pool_timeout: the longest a call waits at the gate
        self.timeout = timeout

    def release(self) -> None:
        """A call holding one of the slots is past the pool."""
        global _occupied
        with _lock:
            self.occupied -= 1
            _occupied -= 1
            self._hand_over()

    def _hand_over(self) -> None:
        # under _lock: free slots go to the first waiters whose loops run
        global _occupied, _waiting
        queue = self.queue
        while queue and (limit is None or self.occupied < limit):
            ticket = queue.popleft()
            if ticket.state is not _WAITING:
                continue  # left already (cancelled, timed out)
            if ticket.waiter.wake():
                ticket.state = _GRANTED
                self.occupied += 1
                _occupied += 1
            else:
                ticket.state = _GONE  # its loop is closed
            _waiting -= 1


_WAITING = "waiting"
_GRANTED = "granted"
_GONE = "gone"


class _Ticket:
    """A call's place at a gate, and then the slot it holds: the gate's,
    if it was handed one, else none (it passed when its time ran out).
    ``waited``: seconds it spent at the gate, taken off its wait in the
    pool's queue (read once, by _primitives)."""

    __slots__ = ("domain", "gate", "state", "sync_driver", "waited", "waiter")

    holder = False

    def __init__(self, gate: _PoolGate, facts: EngineFacts) -> None:
        self.gate: _PoolGate | None = gate
        self.domain = facts.domain
        self.sync_driver = facts.sync_driver
        self.waiter = _Waiter()
        self.state = _WAITING
        self.waited = 0.0

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.release()


def configure(new_limit: int | None) -> None:
    """install(max_pool_waiters=...): a raised (or removed) bound admits
    the waiters it now has room for at once."""
    global limit
    with _lock:
        limit = new_limit
        for gate in _snapshot(_gates):
            gate._hand_over()


def _snapshot(gates: Any) -> list[Any]:
    """list() of a WeakSet that a collection on another thread may shrink
    mid-copy ("Set changed size during iteration"): copy again."""
    while True:
        try:
            return list(gates)
        except RuntimeError:
            continue


def _classify(fn: Any, args: tuple[Any, ...]) -> Any:
    """The slot a call needs no wait for (a ``_Slot`` or None), or the
    engine's slots if it is to take one of the pool's."""
    target = target_of(fn, args)
    if target is None:
        return None
    what, facts = target
    if facts is None:
        return HOLDER if what is _HOLDS else None
    slots = _slots_of(facts)
    if what is _HOLDS:
        return slots.holder
    if slots.gate is None or limit is None or getattr(fn, "__name__", None) in _RELEASING:
        return slots.free
    return slots


def try_admit(fn: Any, args: tuple[Any, ...]) -> Any:
    """greenlet_spawn()'s admission, without waiting: a slot (release() it
    exactly once), None (a call on no engine that can be told), or
    :data:`WAIT` (await :func:`admit`)."""
    found = _classify(fn, args)
    if type(found) is not _EngineSlots:
        return found
    gate = found.gate
    assert gate is not None  # _classify gives the slots only of a gated pool
    with _lock:
        if _take_slot_locked(gate):
            return found.gated
    return WAIT


def _take_slot_locked(gate: _PoolGate) -> bool:
    """Take one of the gate's slots if one is free and nobody waits for
    one (under _lock)."""
    global _occupied
    if limit is None or (gate.occupied < limit and not gate.queue):
        gate.occupied += 1
        _occupied += 1
        return True
    return False


async def admit(fn: Any, args: tuple[Any, ...]) -> Any:
    """Wait, without a thread, for one of the pool's slots; returns what
    :func:`try_admit` does, never :data:`WAIT`."""
    global _occupied, _waiting, _expired
    found = _classify(fn, args)
    if type(found) is not _EngineSlots:
        return found
    gate = found.gate
    assert gate is not None  # _classify gives the slots only of a gated pool
    with _lock:
        if _take_slot_locked(gate):
            return found.gated
        ticket = _Ticket(gate, found.facts)
        gate.queue.append(ticket)
        _waiting += 1
    started = _monotonic()
    try:
        await _wait(ticket.waiter, _deadline(gate.timeout))
    except BaseException:
        with _lock:
            if ticket.state is _GRANTED:
                # handed a slot as we were cancelled: pass it on
                ticket.state = _GONE
                gate.occupied -= 1
                _occupied -= 1
                gate._hand_over()
            elif ticket.state is _WAITING:
                ticket.state = _GONE
                _waiting -= 1
        raise
    ticket.waited = _monotonic() - started
    with _lock:
        if ticket.state is _GRANTED:
            return ticket
        if ticket.state is _WAITING:
            # pool_timeout ran out here: go to the pool without a slot,
            # where the rest of the timeout (none) applies
            ticket.state = _GONE
            _waiting -= 1
            _expired += 1
        ticket.gate = None
        return ticket


def gate_stats() -> dict[str, int]:
    with _lock:
        return {"occupied": _occupied, "waiting": _waiting, "expired": _expired}


#: methods that only let go of what their target holds: a session or
#: connection with no connection checked out closes (rolls back, is reset)
#: without the pool, so such a call never waits at the pool's gate -- it
#: would wait behind every task queueing for a connection, and a task
#: cancelled before it got one closes its session so (under a level-
#: triggered anyio scope that retries on every loop iteration meanwhile)
_RELEASING = frozenset(
    {"close", "dispose", "invalidate", "reset", "rollback", "expunge", "expunge_all"}
)


def _gate_of_pool(pool: Any) -> _PoolGate | None:
    """The pool's gate, made on first use; None for a pool whose checkout
    never waits in an ``AsyncAdaptedQueue`` (NullPool, StaticPool, ...)."""
    state = pool.__dict__
    gate = state.get("_sqla_anyio_shim_gate")
    if gate is not None:
        return gate  # type: ignore[no-any-return]
    queue = state.get("_pool")
    if queue is None or _targets._kind_of(type(queue)) != "queue":
        return None
    timeout = state.get("_timeout")
    new = _PoolGate(timeout if isinstance(timeout, (int, float)) else None)
    # dict.setdefault is atomic: two threads racing here get one gate
    gate = state.setdefault("_sqla_anyio_shim_gate", new)
    if gate is new:
        with _lock:
            _gates.add(new)
    return gate  # type: ignore[no-any-return]
