"""Blocking calls in the sync code that a cancellation interrupts: a sync
driver's statement as an await point.

With an async driver, a statement is an ``await_()``: a cancellation of the
task lands there, the driver's coroutine stops the statement, and the sync
code sees the cancellation at that line.  A sync driver's statement blocks
the worker in C (or in the driver's own socket reads) where no cancellation
can reach it, so a deadline around one slow statement waited for its end.
The sync-driver layer (``_sqla._sync_drivers``) runs each statement through
:meth:`Blocking.run` with an *interrupter*, a callable that asks the driver
or the server to stop that statement (psycopg's cancel request, sqlite3's
``interrupt()``, MySQL's ``KILL QUERY``); the host hands over every
cancellation it catches while the worker runs (:meth:`Blocking.cancel`).
What the bridge knows is only this protocol, never a driver.

The rule, as for an await point (docs/principle.md, "Cancellation"):

* a cancellation the host caught before the statement began (while the sync
  code ran plain Python) is raised at the statement's start; the statement
  never runs;
* one that arrives while it runs calls the interrupter -- once, in a thread
  of its own, because it may block (a network round trip) and the host is
  on the event-loop thread -- and is raised when the statement has
  returned, whatever it returned: the driver's error for the stopped
  statement, or a result that raced the interruption, which is dropped as
  an awaited coroutine's result is dropped when the task is cancelled;
* a driver without an interrupter runs the statement to its end, and then
  the cancellation is raised the same way.

What a cancellation is comes from the backend: a callable that raises it
(``raiser``).  asyncio's native cancellation is edge-triggered: it is raised
once, at one statement (:meth:`Blocking.retract` then tells the host that
the sync code has had it, so the host delivers it nowhere else).  anyio's
cancel scopes and trio's are level-triggered: every statement raises until
the call ends.

The races, step by step (the call's lock orders them):

* The host catches a cancellation while no statement runs: it is stored.
  The next :meth:`run` takes it under the lock before it installs its
  interrupter, so the statement either sees it at its start or does not
  exist yet.
* The host catches one while a statement runs: under the lock it sees the
  interrupter and marks it fired (one Event per statement, so a second
  cancellation or trio's repeated abort does not fire it again), and starts
  it outside the lock.
* The statement returns (or raises) while the interrupter is running or
  about to run: :meth:`run` removes the interrupter under the lock and then
  waits for the fired one to finish before it returns, so an interruption
  meant for this statement can never hit the connection's next one (a
  cancel request arriving late, a ``KILL QUERY`` of the next statement).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["INTERRUPTER_THREAD_NAME", "Blocking", "Raiser"]

_log = logging.getLogger("sqla_anyio_shim")

#: the name of the short-lived threads that run interrupters
INTERRUPTER_THREAD_NAME = "sqla-anyio-shim-interrupter"

#: raises the cancellation the host caught (a fresh exception for a
#: level-triggered one: it may be raised at several statements)
Raiser = Callable[[], NoReturn]


class Blocking:
    """The blocking calls of one ``greenlet_spawn()`` and the cancellation
    that interrupts them; shared by the host (loop thread) and the worker."""

    __slots__ = ("_fired", "_interrupter", "_lock", "_raiser", "_taken", "clean", "level")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # the running blocking call's interrupter (None: none runs, or the
        # driver has none)
        self._interrupter: Callable[[], None] | None = None
        # set once the interrupter fired for the running call has finished
        self._fired: threading.Event | None = None
        #: the cancellation in force for this call's blocking calls
        self._raiser: Raiser | None = None
        #: whether it is level-triggered (raised at every blocking call)
        self.level = False
        # the edge-triggered raiser the sync code has had
        self._taken: Raiser | None = None
        #: the last cancellation :meth:`run` raised in place of an outcome the
        #: blocking call produced by itself (it returned, raised an
        #: Exception, or never started): what it left behind is in order
        self.clean: BaseException | None = None

    # -- worker side -------------------------------------------------------

    def run(
        self,
        interrupter: Callable[[], None] | None,
        fn: Callable[..., Any],
        args: Any,
        *,
        keep_outcome: bool = False,
    ) -> Any:
        """``fn(*args)``, a blocking call, as an await point (see the module
        docstring); ``interrupter`` stops it from another thread.

        ``keep_outcome``: ``fn`` runs a coroutine, which the interrupter
        cancels (a driver loop's call).  An outcome it reached by itself --
        a result, an Exception -- before the cancellation reached it is kept
        and the cancellation left for the next await point, as when an
        awaited coroutine finishes before its task is cancelled (its result
        may be a new connection, which must not be dropped); only the
        coroutine's own cancellation raises the backend's here."""
        if keep_outcome:
            with self._lock:
                pending = self._raiser is not None
                self._interrupter = interrupter
            if pending and interrupter is not None:
                # a cancellation caught before the call began: the coroutine
                # is started and cancelled at its first suspension, where
                # greenlet's task would have had it (the interrupter of a
                # call not yet started only marks it; it does not block)
                interrupter()
        else:
            with self._lock:
                raiser = self._take()
                if raiser is None:
                    self._interrupter = interrupter
            if raiser is not None:
                self._raise(raiser)
        try:
            result = fn(*args)
        except Exception:
            raiser = self._end(keep_outcome)
            if raiser is None:
                raise
            # chained to the driver's error for the stopped statement
            self._raise(raiser)
        except BaseException:
            # fn was itself interrupted by a BaseException (Ctrl-C raised in
            # this thread, say): what it left behind is unknown, so a
            # cancellation raised instead is not marked clean
            raiser = self._end()
            if raiser is None:
                raise
            self._raise(raiser, clean=False)
        raiser = self._end(keep_outcome)
        if raiser is not None:
            self._raise(raiser)
        return result

    def checkpoint(self) -> None:
        """Where a blocking call would start but none runs -- the pool
        queue's ``get()`` finding a connection at once: a cancellation the
        host caught while the sync code ran plain Python is raised here, as
        at a statement's start.  (Under greenlet it could not have arrived
        before the sync code got here; had it got here first, the get would
        have waited and been cancelled, leaving the item in the queue --
        SQLAlchemy's #13749.)"""
        with self._lock:
            raiser = self._take()
        if raiser is not None:
            self._raise(raiser)

    def _end(self, keep: bool = False) -> Raiser | None:
        """The blocking call is over: no interrupter may start for it any
        more, and the one fired for it has finished when this returns.
        ``keep``: the cancellation in force stays for the next await point
        (None is returned)."""
        with self._lock:
            self._interrupter = None
            fired, self._fired = self._fired, None
            raiser = None if keep else self._take()
        if fired is not None:
            fired.wait()
        return raiser

    def _take(self) -> Raiser | None:
        """The cancellation to raise at a blocking call, if any (under the
        lock); an edge-triggered one is raised once."""
        raiser = self._raiser
        if raiser is not None and not self.level:
            self._raiser = None
            self._taken = raiser
        return raiser

    def _raise(self, raiser: Raiser, clean: bool = True) -> NoReturn:
        try:
            raiser()
        except BaseException as exc:
            self.clean = exc if clean else None
            raise

    # -- host side ---------------------------------------------------------

    def cancel(self, raiser: Raiser, level: bool) -> None:
        """The host task was cancelled while its worker runs: raise
        ``raiser``'s cancellation at the sync code's blocking calls, and
        interrupt the one running now.  Called on the loop thread; never
        blocks, never raises."""
        with self._lock:
            if self._raiser is not None and self.level and not level:
                # a level-triggered cancellation is in force: every blocking
                # call raises already (the host keeps the edge-triggered one
                # and delivers it its own way)
                return
            self._raiser = raiser
            self.level = level
            interrupter = self._interrupter
            if interrupter is None or self._fired is not None:
                return
            fired = self._fired = threading.Event()
        _start(interrupter, fired)

    def retract(self, raiser: Raiser) -> bool:
        """The host delivers the edge-triggered cancellation ``raiser``
        itself from now on (at an await point, or after the call): withdraw
        it from the blocking calls.  True if the sync code has had it
        already, in which case the host must not deliver it again."""
        with self._lock:
            if self._raiser is raiser:
                self._raiser = None
            return self._taken is raiser


def _start(interrupter: Callable[[], None], fired: threading.Event) -> None:
    """Run ``interrupter`` in a short-lived thread of its own (it may block
    on the network; an interruption is rare, a thread start cheap); set
    ``fired`` when it is done, whatever happens."""

    def interrupt() -> None:
        try:
            interrupter()
        except BaseException:
            # the statement then runs to its end, and the cancellation is
            # raised there: slower, never wrong
            _log.exception("sqla-anyio-shim: interrupting a blocking call failed")
        finally:
            fired.set()

    try:
        threading.Thread(target=interrupt, name=INTERRUPTER_THREAD_NAME, daemon=True).start()
    except Exception:
        _log.exception("sqla-anyio-shim: could not start a thread to interrupt a blocking call")
        fired.set()
