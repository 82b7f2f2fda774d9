"""Where the bridge is plugged into SQLAlchemy, per SQLAlchemy line.

SQLAlchemy binds its greenlet helpers *by name* all over the place:
``from ..util.concurrency import await_`` in a dozen modules, re-exports in
``sqlalchemy.util``, and on 2.0 ``await_ = staticmethod(await_only)`` in the
dialects' adapter classes.  Patching one module is not enough, so
:func:`install` builds a map *original object -> replacement* and walks every
loaded ``sqlalchemy.*`` module (module globals, and the staticmethods of the
classes each module defines), swapping every reference it finds.  A
``sys.meta_path`` finder does the same for every ``sqlalchemy.*`` module
imported later, right after it executes.  Every swap is recorded so that
:func:`uninstall` restores exactly what was there.

What else is replaced, and why:

* 2.1: ``util.concurrency._concurrency_shim``, the lazy greenlet importer,
  becomes an object that reports greenlet as present, which disarms the
  import guard of ``sqlalchemy.ext.asyncio`` and the harness'
  ``_AsyncUtil.run_in_greenlet``.
* 2.0: ``util.concurrency`` decides ``have_greenlet`` at import; it is set to
  True and, when greenlet is not importable, a stand-in for
  ``util._concurrency_py3k`` (which imports greenlet at module level) is put
  in ``sys.modules`` with the bridge's functions.
* ``AsyncAdaptedQueue`` (the pool) and ``AsyncAdaptedLock`` (event/attr.py)
  get loop-safe methods (:mod:`._primitives`).
* ``asyncio`` in the globals of the modules whose sync code calls
  ``asyncio.shield()`` / ``asyncio.get_event_loop()`` becomes a proxy.
* ``ext.asyncio.base._run_to_completion`` and ``is_cancellation_exception``
  learn trio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.abc
import importlib.machinery
import inspect
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from .. import _bridge
from . import _driver_loops, _primitives, _sync_drivers

SUPPORTED_LINES = ((2, 0), (2, 1))
SUPPORTED_TEXT = "SQLAlchemy 2.0.x and 2.1.x"


class UnsupportedSQLAlchemyVersion(RuntimeError):
    """The installed SQLAlchemy is not a version this shim knows how to
    patch."""


def sqlalchemy_line() -> tuple[int, int]:
    import sqlalchemy

    version = sqlalchemy.__version__
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if (major, minor) not in SUPPORTED_LINES:
        raise UnsupportedSQLAlchemyVersion(
            f"sqla-anyio-shim supports {SUPPORTED_TEXT}; the installed "
            f"SQLAlchemy is {version}. Install a supported version, e.g. "
            f"pip install 'sqlalchemy>=2.0,<2.2'"
        )
    return major, minor


# modules whose *sync* code calls asyncio functions (see AsyncioProxy)
_ASYNCIO_PROXY_MODULES = (
    "sqlalchemy.connectors.asyncio",
    "sqlalchemy.dialects.sqlite.aiosqlite",
)

_MISSING = object()


class _ConcurrencyShim:
    """Stands in for 2.1's ``_concurrency_shim``: greenlet is 'present'
    because the bridge provides what SQLAlchemy needed it for."""

    _has_greenlet = True
    # the thread analogue of _AsyncIoGreenlet: one per greenlet_spawn()
    _AsyncIoGreenlet = _bridge._Call

    def _initialize(self, *, raise_: bool = True) -> None:
        return None


class _Runner:
    """asyncio.Runner for 2.0's harness on Python 3.10 (2.0 vendors one in
    _concurrency_py3k, which cannot be imported without greenlet)."""

    def __init__(self) -> None:
        self._loop: Any = None

    def __enter__(self) -> _Runner:
        self.get_loop()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._loop:
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()
                self._loop = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is False:
            raise RuntimeError("Runner is closed")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop  # type: ignore[no-any-return]

    def run(self, coro: Any) -> Any:
        return self.get_loop().run_until_complete(coro)


def _get_event_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        pass
    return asyncio.get_event_loop_policy().get_event_loop()


def _trampoline(target: str, is_async: bool) -> types.CodeType:
    """The code of a function forwarding everything to
    ``sqla_anyio_shim._bridge.<target>``, looked up at each call (the code
    runs with the globals of the SQLAlchemy module it is swapped into, so it
    may only use builtins)."""
    if is_async:
        source = (
            "async def trampoline(*args, **kwargs):\n"
            "    import sys\n"
            "    bridge = sys.modules['sqla_anyio_shim._bridge']\n"
            f"    return await bridge.{target}(*args, **kwargs)\n"
        )
    else:
        source = (
            "def trampoline(*args, **kwargs):\n"
            "    import sys\n"
            "    bridge = sys.modules['sqla_anyio_shim._bridge']\n"
            f"    return bridge.{target}(*args, **kwargs)\n"
        )
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<sqla-anyio-shim: {target}>", "exec"), namespace)
    return namespace["trampoline"].__code__  # type: ignore[no-any-return]


# the helpers whose original function objects are swapped to the bridge
_SWAP_TARGETS = {
    "await_": "await_",
    "await_only": "await_",
    "await_fallback": "await_fallback",
    "greenlet_spawn": "greenlet_spawn",
    "in_greenlet": "in_greenlet",
}


class _Installation:
    """The record of one install(): every attribute changed, to undo."""

    def __init__(self) -> None:
        self.line: tuple[int, int] = (0, 0)
        # id(original) -> (original, replacement)
        self.replacements: dict[int, tuple[Any, Any]] = {}
        # id(replacement) -> original, for modules imported while installed
        self.originals: dict[int, Any] = {}
        self.undo: list[tuple[Any, str, Any]] = []
        self.added_modules: list[str] = []
        self.sync_drivers = False
        self.finder: _Finder | None = None
        # (function, its original __code__): see swap_code()
        self.codes: list[tuple[Any, Any]] = []
        # the driver adapter classes seen, wrapped once driver loops are
        # first used (activate_driver_loops)
        self.adapter_classes: list[type] = []
        self.driver_loops_active = False

    def set_sync_drivers(self, flag: bool) -> None:
        self.sync_drivers = flag
        _sync_drivers.enabled = flag
        # (each greenlet_spawn() is then a checkpoint: the bridge reads
        # that from the settings, _options.Settings.checkpoint_calls)

    def set(self, target: Any, name: str, value: Any) -> None:
        old = (
            target.__dict__.get(name, _MISSING)
            if isinstance(target, type)
            else getattr(target, name, _MISSING)
        )
        self.undo.append((target, name, old))
        setattr(target, name, value)

    def replace(self, original: Any, replacement: Any) -> None:
        if original is replacement or original is None:
            return
        self.replacements[id(original)] = (original, replacement)
        self.originals[id(replacement)] = original

    def swap_code(self, original: Any, target: str) -> None:
        """Make the *function object* ``original`` call the bridge's
        ``target``, by giving it a trampoline's code.

        Rebinding names (replace()) covers every module that looks the
        helpers up through SQLAlchemy's modules; a user module that did
        ``from sqlalchemy.util import greenlet_spawn, await_only`` before
        install() holds the original function objects themselves, which
        would still try to use greenlet.  With the code swapped they reach
        the installed bridge too; uninstall() puts the code back."""
        if not isinstance(original, types.FunctionType) or original.__closure__:
            return
        if any(func is original for func, _ in self.codes):
            return
        trampoline = _trampoline(target, inspect.iscoroutinefunction(original))
        code = trampoline.replace(co_name=original.__code__.co_name)
        if sys.version_info >= (3, 11):
            code = code.replace(co_qualname=original.__code__.co_qualname)
        self.codes.append((original, original.__code__))
        original.__code__ = code

    # -- walking modules ----------------------------------------------------

    def patch_module(self, module: types.ModuleType, late: bool) -> None:
        name = module.__name__
        replacements = self.replacements
        originals = self.originals
        for attr, value in list(vars(module).items()):
            hit = replacements.get(id(value))
            if hit is not None and hit[0] is value:
                self.set(module, attr, hit[1])
            elif late and id(value) in originals:
                # bound to our replacement at import time: remember what
                # uninstall() must put back
                self.undo.append((module, attr, originals[id(value)]))
            if isinstance(value, type) and value.__module__ == name and attr == value.__name__:
                self.patch_class(value, late)
        if name in _ASYNCIO_PROXY_MODULES and vars(module).get("asyncio") is asyncio:
            self.set(module, "asyncio", _primitives.asyncio_proxy)
        if name == "sqlalchemy.ext.asyncio.base":
            original = vars(module).get("_run_to_completion")
            if original is not None and not hasattr(original, "__wrapped__"):
                replacement = _primitives.make_run_to_completion(original)
                self.replace(original, replacement)
                self.set(module, "_run_to_completion", replacement)

    def patch_class(self, cls: type, late: bool) -> None:
        replacements = self.replacements
        method = cls.__dict__.get("get_async_dialect_cls")
        if isinstance(method, classmethod) and not hasattr(method.__func__, "__wrapped__"):
            # sync drivers behind create_async_engine() (off unless enabled)
            self.set(
                cls,
                "get_async_dialect_cls",
                classmethod(_sync_drivers.wrap_get_async_dialect_cls(method.__func__)),
            )
        force_close = cls.__dict__.get("_terminate_force_close")
        if isinstance(force_close, types.FunctionType) and not hasattr(force_close, "__wrapped__"):
            # an async driver's sync "terminate now" (asyncpg's
            # terminate(), aiomysql's close(), aiosqlite's stop()) touches
            # the driver's transport and loop, which only the loop thread
            # may do; SQLAlchemy calls it from sync code when a graceful
            # close fails or is cancelled -- on greenlet's loop thread, in
            # a worker here: run it on the loop thread
            self.set(cls, "_terminate_force_close", _bridge.on_loop_thread(force_close))
        if _driver_loops.is_adapter_class(cls):
            # async drivers inside the workers: every method of the classes
            # through which SQLAlchemy reaches a driver knows its
            # connection's loop (after _terminate_force_close's wrapper,
            # which it wraps in turn) -- once the first connection is to get
            # a loop of its own (activate_driver_loops).  Until then the
            # hand-off pays no wrapper: one more Python frame per adapter
            # call cost the asyncpg reuse cell ~10% at 100 tasks, where the
            # sync code runs with the loop blocked (A/B, issue 17's note)
            with _lock:
                if cls not in self.adapter_classes:
                    self.adapter_classes.append(cls)
                if self.driver_loops_active:
                    _driver_loops.patch_adapter_class(self.set, cls)
        elif _driver_loops.is_adapter_dbapi_class(cls):
            # where a driver connection is made, and gets its loop (from
            # install(): no connection may be made without it)
            _driver_loops.patch_dbapi_class(self.set, cls)
        elif cls.__module__.startswith("sqlalchemy.dialects."):
            _driver_loops.patch_dialect_class(self.set, cls)
        for attr, value in list(cls.__dict__.items()):
            if isinstance(value, staticmethod):
                func = value.__func__
                hit = replacements.get(id(func))
                if hit is not None and hit[0] is func:
                    self.set(cls, attr, staticmethod(hit[1]))
                elif late and id(func) in self.originals:
                    self.undo.append((cls, attr, staticmethod(self.originals[id(func)])))

    def patch_loaded(self) -> None:
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "sqlalchemy" or name.startswith("sqlalchemy.")):
                continue
            self.patch_module(module, late=False)

    def restore(self) -> None:
        for func, code in reversed(self.codes):
            func.__code__ = code
        self.codes.clear()
        for target, name, old in reversed(self.undo):
            if old is _MISSING:
                try:
                    delattr(target, name)
                except AttributeError:
                    pass
            else:
                setattr(target, name, old)
        self.undo.clear()
        for name in self.added_modules:
            sys.modules.pop(name, None)


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader: Any, installation: _Installation) -> None:
        self._loader = loader
        self._installation = installation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            if _installation is self._installation:
                self._installation.patch_module(module, late=True)


class _Finder(importlib.abc.MetaPathFinder):
    """Patches every ``sqlalchemy.*`` module imported after install()."""

    def __init__(self, installation: _Installation) -> None:
        self._installation = installation
        self._local = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not fullname.startswith("sqlalchemy.") or getattr(self._local, "busy", False):
            return None
        self._local.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._local.busy = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderWrapper(spec.loader, self._installation)
        return spec


_lock = threading.RLock()
_installation: _Installation | None = None


def is_installed() -> bool:
    return _installation is not None


def install(*, sync_drivers: bool = False) -> None:
    global _installation
    with _lock:
        if _installation is not None:
            if _installation.sync_drivers != sync_drivers:
                _installation.set_sync_drivers(sync_drivers)
            return
        line = sqlalchemy_line()
        inst = _Installation()
        inst.line = line
        import sqlalchemy.util.concurrency as concurrency
        import sqlalchemy.util.queue as sqla_queue

        try:
            _apply_plan(inst, concurrency, _PLANS[line])
            for method in ("empty", "full", "qsize", "put_nowait", "put", "get_nowait", "get"):
                inst.set(
                    sqla_queue.AsyncAdaptedQueue,
                    method,
                    getattr(_primitives.QueueMethods, method),
                )
            # asyncio.current_task() from sync code (scoped sessions) is the
            # calling task, as on greenlet's loop thread
            import asyncio.tasks

            inst.replace(asyncio.tasks.current_task, _bridge.current_task)
            inst.set(asyncio, "current_task", _bridge.current_task)
            inst.set(asyncio.tasks, "current_task", _bridge.current_task)
            # and asyncio.all_tasks(), which lists the caller's task there
            inst.replace(asyncio.tasks.all_tasks, _bridge.all_tasks)
            inst.set(asyncio, "all_tasks", _bridge.all_tasks)
            inst.set(asyncio.tasks, "all_tasks", _bridge.all_tasks)
            inst.patch_loaded()
            inst.set_sync_drivers(sync_drivers)
            inst.finder = _Finder(inst)
            sys.meta_path.insert(0, inst.finder)
        except BaseException:
            inst.restore()
            raise
        _installation = inst


def activate_driver_loops() -> None:
    """A driver connection is about to get a loop of its own (the first
    one of this install()): wrap the adapter classes (see patch_class).
    Called from a worker while other workers may run adapter methods: a
    call under way finishes with the function it looked up, the next one
    finds the wrapper; only connections made from now on have loops."""
    inst = _installation
    if inst is None or inst.driver_loops_active:
        return
    with _lock:
        if _installation is not inst or inst.driver_loops_active:
            return
        for cls in inst.adapter_classes:
            _driver_loops.patch_adapter_class(inst.set, cls)
        inst.driver_loops_active = True


def uninstall() -> None:
    global _installation
    with _lock:
        inst = _installation
        if inst is None:
            return
        _installation = None
        if inst.finder is not None and inst.finder in sys.meta_path:
            sys.meta_path.remove(inst.finder)
        inst.restore()
        _sync_drivers.enabled = False


def _plan_lock(inst: _Installation, concurrency: Any) -> None:
    lock = vars(concurrency).get("AsyncAdaptedLock")
    if isinstance(lock, type):
        inst.set(lock, "__enter__", _primitives.LockMethods.__enter__)
        inst.set(lock, "__exit__", _primitives.LockMethods.__exit__)
    else:
        # 2.0 without greenlet: a function that raises; give it a class
        replacement = type(
            "AsyncAdaptedLock",
            (_primitives.LockMethods,),
            {"__module__": "sqlalchemy.util.concurrency"},
        )
        inst.replace(lock, replacement)


# -- the plans, per SQLAlchemy line ------------------------------------------

#: every helper of ``sqlalchemy.util.concurrency`` the bridge replaces, by
#: name (a line's plan names the ones it has)
_REPLACEMENTS: dict[str, Any] = {
    "await_": _bridge.await_,
    "await_only": _bridge.await_,
    "await_fallback": _bridge.await_fallback,
    "greenlet_spawn": _bridge.greenlet_spawn,
    "in_greenlet": _bridge.in_greenlet,
    "is_exit_exception": _primitives.is_exit_exception,
    "is_cancellation_exception": _primitives.is_cancellation_exception,
}


@dataclasses.dataclass(frozen=True)
class _LinePlan:
    """What install() replaces in one SQLAlchemy line."""

    #: MissingGreenlet's message, worded as the line words it
    missing_greenlet: str
    #: the helpers of util.concurrency replaced (keys of _REPLACEMENTS)
    names: tuple[str, ...]
    #: whether a helper the module lacks is added (2.0 without greenlet
    #: defines only some of them)
    add_missing: bool
    #: the line's own steps, after the helpers: (installation, the
    #: util.concurrency module, the helpers replaced)
    finish: Callable[[_Installation, Any, dict[str, Any]], None]


def _apply_plan(inst: _Installation, concurrency: Any, plan: _LinePlan) -> None:
    _bridge.set_missing_greenlet_message(plan.missing_greenlet)
    names = {name: _REPLACEMENTS[name] for name in plan.names}
    for name, replacement in names.items():
        original = vars(concurrency).get(name)
        if original is not None:
            inst.replace(original, replacement)
            if name in _SWAP_TARGETS:
                inst.swap_code(original, _SWAP_TARGETS[name])
        elif plan.add_missing:
            inst.set(concurrency, name, replacement)
    plan.finish(inst, concurrency, names)


def _finish_21(inst: _Installation, concurrency: Any, names: dict[str, Any]) -> None:
    inst.replace(concurrency._concurrency_shim, _ConcurrencyShim())
    _plan_lock(inst, concurrency)


def _finish_20(inst: _Installation, concurrency: Any, names: dict[str, Any]) -> None:
    _plan_lock(inst, concurrency)
    if not concurrency.have_greenlet:
        runner = getattr(asyncio, "Runner", _Runner)
        inst.set(concurrency, "have_greenlet", True)
        inst.set(concurrency, "greenlet_error", None)
        inst.set(concurrency, "_Runner", runner)
        # _concurrency_py3k imports greenlet at module level; stand in for it
        if "sqlalchemy.util._concurrency_py3k" not in sys.modules:
            stand_in = types.ModuleType("sqlalchemy.util._concurrency_py3k")
            stand_in.__doc__ = (
                "sqla-anyio-shim's stand-in for SQLAlchemy 2.0's greenlet "
                "module: the same names, backed by the thread bridge."
            )
            lock = vars(concurrency)["AsyncAdaptedLock"]
            if not isinstance(lock, type):
                lock = inst.replacements[id(lock)][1]
            extra = {
                "AsyncAdaptedLock": lock,
                "_AsyncIoGreenlet": _bridge._Call,
                "_Runner": runner,
                "get_event_loop": _get_event_loop,
                "_safe_cancel_awaitable": _bridge.safe_close,
                "iscoroutine": asyncio.iscoroutine,
            }
            for name, value in {**names, **extra}.items():
                setattr(stand_in, name, value)
            sys.modules[stand_in.__name__] = stand_in
            inst.added_modules.append(stand_in.__name__)
            import sqlalchemy.util

            inst.set(sqlalchemy.util, "_concurrency_py3k", stand_in)


_PLANS = {
    (2, 1): _LinePlan(
        missing_greenlet=(
            "greenlet_spawn has not been called; can't call await_() "
            "here. Was IO attempted in an unexpected place?"
        ),
        names=(
            "await_",
            "await_only",
            "greenlet_spawn",
            "in_greenlet",
            "is_cancellation_exception",
        ),
        add_missing=False,
        finish=_finish_21,
    ),
    (2, 0): _LinePlan(
        missing_greenlet=(
            "greenlet_spawn has not been called; can't call await_only() "
            "here. Was IO attempted in an unexpected place?"
        ),
        names=(
            "await_only",
            "await_fallback",
            "greenlet_spawn",
            "in_greenlet",
            "is_exit_exception",
            "is_cancellation_exception",
        ),
        add_missing=True,
        finish=_finish_20,
    ),
}
