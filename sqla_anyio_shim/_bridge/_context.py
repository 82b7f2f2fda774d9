"""Context variables across a hop.

Under greenlet the sync code and the task share one context: a variable set
on either side is seen by the other at once.  Here each side runs in a
context of its own (the worker in a copy made at ``greenlet_spawn()``, the
host in its task's), so at every hop the side that takes over makes its
context agree with the other's (:func:`apply_context`), and only when they
differ: comparing two contexts is cheap, copying every variable is not.
"""

from __future__ import annotations

import contextvars
from typing import Any

_MISSING = object()


def apply_context(
    source: contextvars.Context, tokens: dict[contextvars.ContextVar[Any], Any]
) -> None:
    """Make the current context agree with ``source``: set every variable
    whose value in ``source`` differs, and remove the variables that
    ``source`` no longer has.

    A variable can only be removed with the Token of the ``set()`` that
    gave it its first value *in this context*, so ``tokens`` keeps the
    tokens of the sets done here on variables that had no value: a variable
    the other side set and then reset (a before/after hook pair) is unset
    here again, as it is in greenlet's one shared context."""
    for var, value in source.items():
        if var.get(_MISSING) is not value:
            token = var.set(value)
            if token.old_value is contextvars.Token.MISSING:
                tokens[var] = token
    if tokens:
        for var in [var for var in tokens if var not in source]:
            token = tokens.pop(var)
            if var.get(_MISSING) is not _MISSING:
                try:
                    var.reset(token)
                except (RuntimeError, ValueError):
                    pass  # used already, or the context changed: keep it
