"""Command line: ``python -m sqla_anyio_shim [walkthrough|conformance|bench|run]``.

* no argument / ``walkthrough``: the Core and ORM walk-through on embedded
  SQLite (asyncio + aiosqlite, trio + sqlite3 in the workers), greenlet-free;
* ``conformance``: SQLAlchemy's own asyncio suite on the shim vs greenlet;
* ``bench``: the benchmarks (``benchmarks/cli.py`` of a checkout, run from
  its root);
* ``run [OPTIONS] -- TARGET [ARGS]``: run a program (``-m MODULE``, a script,
  a console script such as ``uvicorn`` or ``pytest``) under the shim.
"""

from __future__ import annotations

import sys


def _bench(argv: list[str]) -> int:
    """The benchmarks of a checkout (``benchmarks/cli.py``), imported as a
    package: with ``python -m`` the current directory is on ``sys.path``, so
    this works from the checkout's root.  The wheel does not ship them."""
    import importlib

    try:
        cli = importlib.import_module("benchmarks.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.cli"):
            raise
        print(
            "python -m sqla_anyio_shim bench: the benchmarks are not part of the "
            "installed package; they need a checkout of the repository: run this "
            "command from the checkout's root directory",
            file=sys.stderr,
        )
        return 2
    return int(cli.main(argv))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and not args[0].startswith("-") else "walkthrough"
    if command == "walkthrough":
        from ._cli._walkthrough import main as walkthrough

        return walkthrough(args)
    if command == "conformance":
        from ._testing._conformance import main as conformance

        return conformance(args)
    if command == "bench":
        return _bench(args)
    if command == "run":
        from ._cli._launcher import main as run

        return run(args)
    print(
        f"unknown command {command!r}; use walkthrough, conformance, bench or run",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
