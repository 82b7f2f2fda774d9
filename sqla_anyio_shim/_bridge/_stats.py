"""The bridge's counters for :func:`sqla_anyio_shim.stats`, and the
slow-call warning.

Several event loops in several threads may run calls at once, and without
the GIL ``+=`` is not atomic: every counter is guarded by one lock.
"""

from __future__ import annotations

import logging
import threading

_log = logging.getLogger("sqla_anyio_shim")

_lock = threading.Lock()
_in_flight = 0
_longest_hold = 0.0


def count_call(delta: int) -> None:
    global _in_flight
    with _lock:
        _in_flight += delta


def note_hold(hold: float) -> None:
    """A stretch of ``hold`` seconds in which a call's sync code kept its
    event loop blocked has ended."""
    global _longest_hold
    if hold > _longest_hold:
        with _lock:
            if hold > _longest_hold:
                _longest_hold = hold


def warn_slow_hold(fn_name: str | None, hold: float, threshold: float, unbounded: bool) -> None:
    """Log a stretch longer than ``install(slow_call_warning=...)``, as
    asyncio's debug mode reports slow callbacks."""
    _log.warning(
        "greenlet_spawn(%s) held the event loop for %.3f s without "
        "letting it run (threshold %.3f s): its sync code ran between "
        "two await points while the task blocked the loop on it%s",
        fn_name or "<sync code>",
        hold,
        threshold,
        " (handoff_timeout=None blocks until the next await point)" if unbounded else "",
    )


def call_stats(reset: bool = False) -> dict[str, float]:
    """The bridge's side of sqla_anyio_shim.stats(); ``reset`` starts the
    longest-hold measurement afresh in the same locked read (a hold noted
    between a read and a separate reset would be lost)."""
    global _longest_hold
    with _lock:
        stats = {"calls_in_flight": _in_flight, "longest_loop_hold": _longest_hold}
        if reset:
            _longest_hold = 0.0
        return stats
