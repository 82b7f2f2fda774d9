"""Command line: ``python -m sqla_anyio_shim [walkthrough|conformance|bench|run]``.

* no argument / ``walkthrough``: the Core and ORM walk-through on embedded
  SQLite (asyncio + aiosqlite, trio + sqlite3 in the workers), greenlet-free;
* ``conformance``: SQLAlchemy's own asyncio suite on the shim vs greenlet;
* ``bench``: the benchmark runner (``benchmarks/bench.py`` of a checkout);
* ``run [OPTIONS] -- TARGET [ARGS]``: run a program (``-m MODULE``, a script,
  a console script such as ``uvicorn`` or ``pytest``) under the shim.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _bench(argv: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
    if not script.is_file():
        print(
            "the benchmark runner lives in the project checkout "
            "(benchmarks/bench.py); run this from a source checkout",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("sqla_anyio_shim_bench", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return int(module.main(argv))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and not args[0].startswith("-") else "walkthrough"
    if command == "walkthrough":
        from ._walkthrough import main as walkthrough

        return walkthrough(args)
    if command == "conformance":
        from ._conformance import main as conformance

        return conformance(args)
    if command == "bench":
        return _bench(args)
    if command == "run":
        from ._launcher import main as run

        return run(args)
    print(
        f"unknown command {command!r}; use walkthrough, conformance, bench or run",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
