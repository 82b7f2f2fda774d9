"""The host thread's trace and profile functions follow its calls.

Under greenlet the sync code runs on the event loop's own thread, so
whatever ``sys.settrace()`` / ``sys.setprofile()`` installed there -- pdb's
breakpoints (``python -m pdb app.py``, ``b listener``), a profile hook, a
line tracer -- sees it.  Those functions are per thread, and a worker thread
has none of its own: without this module the sync code of every call runs
untraced.

So a call captures the host thread's functions when it is created (on the
loop thread) and its worker installs them for the call's duration, then
removes them -- with two exceptions, where the worker is left as it is:

* the worker already has a function of its own (a tool that hooks threads
  itself, such as coverage, gave it one when the thread started);
* the application asked for thread hooks with ``threading.settrace()`` /
  ``threading.setprofile()``: such a tool keeps per-thread state in its
  function (coverage's tracer is one per thread) and must not see one
  thread's function called from another.

Cost: two ``sys.get*()`` calls per call on the host when no hook is set,
nothing in the worker.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

__all__ = ["Hooks", "capture", "follow", "unfollow"]

#: (trace function, profile function) of the host thread; either may be None
Hooks = tuple[Any, Any]

_gettrace = sys.gettrace
_getprofile = sys.getprofile


def capture() -> Hooks | None:
    """The host thread's functions that the worker should take, or None."""
    trace = _gettrace()
    profile = _getprofile()
    if trace is None and profile is None:
        return None
    if trace is not None and threading.gettrace() is not None:
        trace = None
    if profile is not None and threading.getprofile() is not None:
        profile = None
    if trace is None and profile is None:
        return None
    return trace, profile


def follow(hooks: Hooks) -> tuple[bool, bool]:
    """In the worker: install ``hooks`` where the thread has none; returns
    which were installed (for :func:`unfollow`)."""
    trace, profile = hooks
    set_trace = trace is not None and _gettrace() is None
    set_profile = profile is not None and _getprofile() is None
    if set_trace:
        sys.settrace(trace)
    if set_profile:
        sys.setprofile(profile)
    return set_trace, set_profile


def unfollow(installed: tuple[bool, bool]) -> None:
    """In the worker, after the call: remove what :func:`follow` installed
    (the next call may come from a host with other functions, or none)."""
    set_trace, set_profile = installed
    if set_trace:
        sys.settrace(None)
    if set_profile:
        sys.setprofile(None)
