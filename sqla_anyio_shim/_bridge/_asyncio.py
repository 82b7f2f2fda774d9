"""The asyncio backend: ``greenlet_spawn()`` on an asyncio loop (uvloop
included), and the asyncio side of its host (:class:`AsyncioHost`, see
_host.Host): how it waits through the loop, and where it delivers a
cancellation that arrived while the sync code ran -- where greenlet would
(see docs/principle.md, "Cancellation")."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any, NoReturn

from .. import _options
from . import _ki
from ._call import _Call
from ._host import Slot, give_back, place, run_call, serve_nested, take_worker
from ._interrupts import inject
from ._wakeups import mailbox_for

_CancelledError = asyncio.CancelledError
_current_task = asyncio.current_task


@types.coroutine
def _yield() -> Any:
    """One trip through the asyncio loop (``asyncio.sleep(0)`` without the
    call): other tasks run, and a pending cancellation is delivered here."""
    yield


@_ki.protect
async def spawn(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[..., Any],
    args: Any,
    kwargs: Any,
    require_await: bool,
    slot: Slot | None,
) -> Any:
    """greenlet_spawn() on asyncio, admitted (``slot``: what the gate gave
    it, see _host.Slot)."""
    holder = slot is not None and slot.holder
    # on the main thread, Ctrl-C is kept out of the bridge's bookkeeping
    # from here on (_ki)
    guarded = _ki.enter()
    try:
        if _options.current.checkpoint_calls:
            try:
                await _yield()
            except BaseException:
                give_back(slot)
                raise
        worker = await take_worker(holder, slot)
        call = _Call(fn, args, kwargs, mailbox_for(loop, loop.call_soon_threadsafe), loop)
        call.task = _current_task(loop)
        if not holder:
            call.gate_slot = slot
        place(call, slot)
        return await run_call(call, worker, AsyncioHost(loop, call.task), require_await)
    finally:
        if guarded:
            _ki.close(loop.call_soon)


class AsyncioHost:
    """The asyncio side of one call's host: the wait through the loop, and
    where a cancellation that arrived while the sync code ran plain Python
    is delivered (see docs/principle.md, "Cancellation")."""

    __slots__ = (
        "cancel_count",
        "cancelled",
        "loop",
        "raiser",
        "requested_before",
        "task",
        "waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, task: Any) -> None:
        self.loop = loop
        self.task = task
        self.waiter: asyncio.Future[None] | None = None
        #: a cancellation caught while the worker ran, not yet delivered
        self.cancelled: BaseException | None = None
        # the caught cancellation had been requested before the host
        # suspended (at an await point whose awaitable completed without
        # suspending), not while the sync code ran plain Python
        self.requested_before = False
        #: the task's count of cancel requests when it was caught
        self.cancel_count = 0
        # how the sync code's blocking calls raise ``cancelled`` (see
        # _blocking): None if it was not handed to them
        self.raiser: Any = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def forget(self) -> None:
        self.waiter = None

    def alive(self) -> bool:
        return not self.loop.is_closed()

    def run_nested(self, awaitable: Any, finish: Callable[[Any], None]) -> None:
        loop = self.loop
        loop.call_soon_threadsafe(loop.create_task, serve_nested(awaitable, finish))

    async def wait_for_message(self, call: _Call) -> None:
        channel = call.channel
        loop = self.loop
        while not channel.take_message():
            waiter = self.waiter = loop.create_future()
            pending = getattr(self.task, "_must_cancel", False)
            try:
                await waiter
            except _CancelledError as err:
                # the worker is running plain Python, which cannot be
                # interrupted, or a blocking call (a sync driver's
                # statement), which the cancellation interrupts: it is
                # handed to the call's blocking calls below (_blocking)
                self.waiter = None
                if _interrupted_by(err) is not None:
                    # the loop is being torn down by a Ctrl-C (the runner
                    # cancels every task while KeyboardInterrupt propagates):
                    # stop the sync code now rather than when it next
                    # awaits, as Ctrl-C would stop it on greenlet's loop
                    # thread
                    inject(call, _CancelledError)
                if _is_anyio_cancellation(err):
                    # level-triggered: anyio delivers it again at the next
                    # await inside its scope, so it must not be re-armed (it
                    # would escape the scope); wait out the worker shielded,
                    # so that anyio does not retry on every loop iteration
                    # meanwhile.  Every blocking call of the sync code raises
                    # it from now on, as every await inside the scope would.
                    call.blocking().cancel(_raiser(err), level=True)
                    native = await self._wait_shielded(call)
                    if native is not None:
                        self.cancelled = native
                        self.raiser = None
                        self.cancel_count = _cancelling(self.task)
                    return
                # asyncio's own, edge-triggered: deliver it at the sync
                # code's next blocking call or await_(), whichever comes
                # first (or, see _defer, once the task next suspends)
                self.cancelled = err
                self.requested_before = self.requested_before or bool(pending)
                self.cancel_count = _cancelling(self.task)
                self.raiser = _raiser(err)
                call.blocking().cancel(self.raiser, level=False)

    async def _wait_shielded(self, call: _Call) -> BaseException | None:
        """Wait for the worker's next message inside a shielded anyio scope.
        Returns a native asyncio cancellation that arrived meanwhile, if
        any."""
        import anyio

        native: BaseException | None = None
        with anyio.CancelScope(shield=True):
            while not call.channel.take_message():
                waiter = self.waiter = self.loop.create_future()
                try:
                    await waiter
                except _CancelledError as err:
                    self.waiter = None
                    if not _is_anyio_cancellation(err):
                        native = err
        return native

    def before_serve(self, call: _Call) -> None:
        cancelled = self.cancelled
        if cancelled is not None:
            # deliver the cancellation that arrived while the sync code ran
            # plain Python exactly as asyncio would have delivered it here:
            # re-arm it on our task and await the awaitable, which then runs
            # up to its first suspension and is cancelled there (so that,
            # e.g., asyncio.shield() still starts its inner task, as it does
            # under greenlet).  The count of cancel requests stays balanced.
            self.cancelled = None
            self.requested_before = False
            if self._had(call):
                return
            _rearm(self.task, cancelled)

    def after_last(self, call: _Call) -> None:
        cancelled, self.cancelled = self.cancelled, None
        if cancelled is None:
            return
        if self._had(call):
            # raised at a blocking call of the sync code (a sync driver's
            # statement), as at an await point: the call's outcome carries
            # it, or the sync code chose to swallow it
            self.requested_before = False
            return
        if self.requested_before:
            # requested at an await point whose awaitable finished without
            # suspending: under greenlet it stayed pending on the task
            # through the sync code's last stretch and landed at the task's
            # next suspension -- or ended the task when it returned.  Put it
            # back so.
            _rearm(self.task, cancelled)
            return
        # the cancellation arrived while the sync code ran its last stretch
        # of plain Python.  Under greenlet it could not have arrived before
        # greenlet_spawn() returned, so it must not replace the outcome (a
        # connection the sync code just checked out would be lost with the
        # result): it is requested again once this step of the task is
        # over, unless its requester withdrew it meanwhile (see _defer).
        _defer(self.task, self.loop, cancelled, self.cancel_count)

    def _had(self, call: _Call) -> bool:
        """The host delivers ``cancelled`` itself now: take it back from the
        sync code's blocking calls.  Whether the sync code has had it there
        already (then it is not delivered again)."""
        raiser, self.raiser = self.raiser, None
        return raiser is not None and call.blocking().retract(raiser)


def _raiser(err: BaseException) -> Callable[[], NoReturn]:
    """Raises, in the worker, a cancellation like ``err`` (its message
    included: anyio recognises its own by it); a fresh exception each time,
    as a level-triggered one may be raised at several blocking calls."""
    args = err.args[:1]

    def raise_cancelled() -> NoReturn:
        raise _CancelledError(*args)

    return raise_cancelled


def _interrupted_by(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt / SystemExit being handled when the
    cancellation ``err`` was thrown into the task, if any (an event-loop
    runner cancelling its tasks on Ctrl-C)."""
    seen = 0
    context = err.__context__
    while context is not None and seen < 8:
        if isinstance(context, (KeyboardInterrupt, SystemExit)):
            return context
        context = context.__context__
        seen += 1
    return None


def _is_anyio_cancellation(err: BaseException) -> bool:
    """Whether ``err`` was delivered by an anyio cancel scope (whose
    messages start so; anyio's own ``is_anyio_cancellation`` checks the same,
    including the ``__context__`` chain)."""
    while isinstance(err, _CancelledError):
        if (
            err.args
            and isinstance(err.args[0], str)
            and err.args[0].startswith("Cancelled via cancel scope ")
        ):
            return True
        err = err.__context__  # type: ignore[assignment]
    return False


def _cancelling(task: Any) -> int:
    """The task's count of pending cancel requests (0 before Python 3.11,
    which does not count them)."""
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling is not None else 0


def _rearm(task: Any, cancelled: BaseException) -> None:
    """Put a cancellation we caught (and so consumed) back on ``task``: it
    is then delivered at the task's next suspension, with the same count of
    cancel requests as before."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()
    task.cancel(*cancelled.args[:1])


def _defer(
    task: Any,
    loop: Any,
    cancelled: BaseException,
    count: int,
) -> None:
    """Request again, at the next loop iteration, a native asyncio
    cancellation that arrived while the sync code ran plain Python and that
    the sync code finished without reaching another await point.

    Under greenlet the canceller (a timer, another task) could not have run
    before the task's next suspension, because the sync code ran on the
    loop thread.  So:

    * if the task finishes before it next suspends, the cancellation must
      not end it (its result, say a connection just checked out, would be
      dropped): the task is done by the next iteration, nothing happens;
    * if the requester withdraws it first -- ``asyncio.timeout()`` /
      ``wait_for()`` leaving their block call ``task.uncancel()`` -- it must
      not escape the block: the count of cancel requests has dropped below
      the one we saw, nothing happens;
    * otherwise it is delivered where the task next suspends, as greenlet
      would have delivered it.
    """
    args = cancelled.args[:1]
    if loop is None:
        return

    def redeliver() -> None:
        if task.done():
            return
        cancelling = getattr(task, "cancelling", None)
        if cancelling is not None:
            if cancelling() < count:
                return  # withdrawn by its requester
            task.uncancel()  # keep the count balanced: re-request, not add
        task.cancel(*args)

    try:
        loop.call_soon(redeliver)
    except RuntimeError:
        pass  # the loop is closed: nothing left to cancel
