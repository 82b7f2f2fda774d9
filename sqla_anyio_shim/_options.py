"""The install options: one table, one frozen :class:`Settings`.

Every option of :func:`sqla_anyio_shim.install` is one :class:`Option` row
in :data:`OPTIONS`: its keyword, its default, what values it takes, and its
command-line spelling.  ``install()`` checks its keyword arguments through
:func:`settings_from`, and the launcher (``python -m sqla_anyio_shim run``,
``SQLA_ANYIO_SHIM_OPTIONS``) parses its words through the same rows, so a
value is accepted or refused in one place, with one message.

The settings in force are one immutable :class:`Settings` object,
:data:`current`, replaced whole by ``install()`` (:func:`apply`).  The
bridge reads it at each call and each hop; a call in flight while the
options change sees either the old object or the new one, never half of
each (which plain module globals written one by one could not promise
without the GIL).

A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OPTIONS",
    "Option",
    "OptionError",
    "Settings",
    "apply",
    "current",
    "format_options",
    "parse_options",
    "settings_from",
]


class OptionError(ValueError):
    """A bad install option; the message names the option and what it takes."""


@dataclass(frozen=True)
class Settings:
    """The options in force (see :func:`sqla_anyio_shim.install`)."""

    max_workers: int | None = None
    idle_timeout: float = 10.0
    max_idle_workers: int | None = None
    sync_drivers: bool = False
    handoff_timeout: float | None = 0.002
    slow_call_warning: float | None = 0.1
    max_pool_waiters: int | None = 64
    parallel: bool | None = None
    driver_loops: bool | None = None
    #: how long the host blocks for the next message, in the form the
    #: channel's wait takes (-1: no bound); derived from handoff_timeout
    handoff_wait: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        wait = -1.0 if self.handoff_timeout is None else float(self.handoff_timeout)
        object.__setattr__(self, "handoff_wait", wait)

    @property
    def checkpoint_calls(self) -> bool:
        """Whether every ``greenlet_spawn()`` on asyncio starts with a
        checkpoint: with sync drivers, whose queries never suspend the
        task, a task looping on queries would otherwise hold the loop, and
        a pending cancellation (a deadline) would not be delivered before
        its next statement."""
        return self.sync_drivers


# -- the kinds of value ----------------------------------------------------


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


@dataclass(frozen=True)
class _Kind:
    """What one option takes: ``check`` accepts a Python value, ``words``
    describes it in the launcher's messages and ``py_words`` in
    ``install()``'s, ``parse`` reads the command-line word."""

    words: str
    py_words: str
    check: Callable[[Any], bool]
    #: None for a flag (no value on the command line)
    parse: Callable[[str], Any] | None


def _count(minimum: int, allow_none: bool) -> _Kind:
    def check(value: Any) -> bool:
        if value is None:
            return allow_none
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    def parse(text: str) -> Any:
        if allow_none and text.lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            return _BAD

    words = f"a whole number >= {minimum}" + (" or 'none'" if allow_none else "")
    py_words = ("a positive integer" if minimum == 1 else f"an integer >= {minimum}") + (
        " or None" if allow_none else ""
    )
    return _Kind(words, py_words, check, parse)


def _seconds(allow_zero: bool, allow_none: bool) -> _Kind:
    def check(value: Any) -> bool:
        if value is None:
            return allow_none
        return _is_number(value) and (value > 0 or (allow_zero and value == 0))

    def parse(text: str) -> Any:
        if allow_none and text.lower() == "none":
            return None
        try:
            return float(text)
        except ValueError:
            return _BAD

    bound = ">= 0" if allow_zero else "> 0"
    words = f"a number of seconds {bound}" + (" or 'none'" if allow_none else "")
    py_words = ("a number of seconds >= 0" if allow_zero else "a positive number of seconds") + (
        " or None" if allow_none else ""
    )
    return _Kind(words, py_words, check, parse)


def _tristate() -> _Kind:
    # None ("auto"), True ("on"), False ("off")
    words = {"auto": None, "on": True, "off": False}

    def parse(text: str) -> Any:
        return words.get(text.lower(), _BAD)

    return _Kind(
        "'auto', 'on' or 'off'",
        "None, True or False",
        lambda value: value is None or value is True or value is False,
        parse,
    )


def _flag() -> _Kind:
    # any value, taken for its truth (install(sync_drivers=1) always worked)
    return _Kind("a flag", "True or False", lambda value: True, None)


_BAD = object()


@dataclass(frozen=True)
class Option:
    """One install option."""

    keyword: str
    kind: _Kind
    #: the launcher's help line (the default is added to it)
    help: str

    @property
    def flag(self) -> str:
        """The command-line spelling, ``--max-workers``."""
        return "--" + self.keyword.replace("_", "-")

    @property
    def default(self) -> Any:
        return getattr(_DEFAULTS, self.keyword)


_DEFAULTS = Settings()

#: every install option, in the order of install()'s signature
OPTIONS: tuple[Option, ...] = (
    Option("max_workers", _count(1, allow_none=True), "cap on worker threads"),
    Option(
        "idle_timeout",
        _seconds(allow_zero=False, allow_none=False),
        "idle worker threads retire after this many seconds",
    ),
    Option("max_idle_workers", _count(0, allow_none=True), "idle workers kept at most"),
    Option("sync_drivers", _flag(), "let create_async_engine() run sync DBAPI drivers"),
    Option(
        "handoff_timeout",
        _seconds(allow_zero=True, allow_none=True),
        "seconds the loop blocks on a hand-off ('none': greenlet's full atomicity)",
    ),
    Option(
        "slow_call_warning",
        _seconds(allow_zero=False, allow_none=True),
        "log a WARNING when sync code holds the loop longer than this",
    ),
    Option(
        "max_pool_waiters",
        _count(1, allow_none=True),
        "calls at one connection pool at once before new ones wait threadless in the loop",
    ),
    Option(
        "parallel",
        _tristate(),
        "sync code of different tasks at once, the loop never blocked "
        "(auto, the default: on free-threaded builds and for sync drivers)",
    ),
    Option(
        "driver_loops",
        _tristate(),
        "async drivers inside the workers, each connection on a loop of its own "
        "(auto, the default: under trio)",
    ),
)

_BY_KEYWORD = {option.keyword: option for option in OPTIONS}
BY_FLAG = {option.flag: option for option in OPTIONS}


def settings_from(**kwargs: Any) -> Settings:
    """The :class:`Settings` of ``install(**kwargs)``, every value checked.

    :raises ValueError: an unknown keyword or a bad value, named with what
        the option takes.
    """
    for keyword, value in kwargs.items():
        option = _BY_KEYWORD.get(keyword)
        if option is None:
            raise TypeError(f"install() got an unexpected keyword argument {keyword!r}")
        if not option.kind.check(value):
            raise ValueError(f"{keyword} must be {option.kind.py_words}, got {value!r}")
    if "sync_drivers" in kwargs:
        kwargs["sync_drivers"] = bool(kwargs["sync_drivers"])
    return Settings(**kwargs)


def parse_word(option: Option, text: str) -> Any:
    """The Python value of a command-line word for ``option``.

    :raises OptionError: the word is not a value ``option`` takes.
    """
    parse = option.kind.parse
    assert parse is not None, "a flag takes no value"
    value = parse(text)
    if value is _BAD or not option.kind.check(value):
        raise OptionError(f"{option.flag} takes {option.kind.words}, got {text!r}")
    return value


def format_word(option: Option, value: Any) -> str:
    """The inverse of :func:`parse_word`."""
    if option.keyword in ("parallel", "driver_loops"):
        return {None: "auto", True: "on", False: "off"}[value]
    return "none" if value is None else str(value)


# -- the command-line spelling (the launcher, SQLA_ANYIO_SHIM_OPTIONS) ------


def parse_options(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Parse leading install options of ``args``.

    Returns ``(install keyword arguments, the rest)``: parsing stops at
    ``--`` (which is dropped), at ``-m`` or at the first argument that is not
    an option.  ``--option=value`` and ``--option value`` are both accepted.

    :raises OptionError: unknown option, missing or bad value.
    """
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return kwargs, args[i + 1 :]
        if arg == "-m" or not arg.startswith("-"):
            return kwargs, args[i:]
        name, has_value, value = arg.partition("=")
        option = BY_FLAG.get(name)
        if option is None:
            known = ", ".join(BY_FLAG)
            raise OptionError(f"unknown option {name!r} (the options are {known})")
        if option.kind.parse is None:
            if has_value:
                raise OptionError(f"{name} is a flag and takes no value, got {arg!r}")
            kwargs[option.keyword] = True
        else:
            if not has_value:
                i += 1
                if i == len(args):
                    raise OptionError(f"{name} needs a value")
                value = args[i]
            kwargs[option.keyword] = parse_word(option, value)
        i += 1
    return kwargs, []


def format_options(kwargs: dict[str, Any]) -> str:
    """The inverse of :func:`parse_options`, for ``SQLA_ANYIO_SHIM_OPTIONS``."""
    words: list[str] = []
    for option in OPTIONS:
        if option.keyword not in kwargs:
            continue
        value = kwargs[option.keyword]
        if option.kind.parse is None:
            if value:
                words.append(option.flag)
        else:
            words += [option.flag, format_word(option, value)]
    return shlex.join(words)


#: the settings in force; replaced whole by apply()
current = _DEFAULTS


def apply(settings: Settings) -> None:
    """Put ``settings`` in force (one assignment: readers see the old
    object or the new one)."""
    global current
    current = settings
