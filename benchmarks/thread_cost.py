"""What the interpreter itself charges for running sync code in another
thread -- no shim, no event loop, no database server.

::

    python -m benchmarks.thread_cost [--rounds 7] [--reads 200] [--pin]

The work is the cpu cells' shape: a 400-row ORM read (sync SQLAlchemy,
SQLite in memory, one ``Session``), its rows then touched.  Two ways, one
round each, alternating:

* *main*: the read and the touch in the main thread;
* *handed*: the ``Session`` is the main thread's, each read is run by one
  long-lived worker thread (two ``threading.Event`` hand-offs per read, the
  shape of a bridge call), and its rows are touched back in the main thread.

It prints the process CPU time per read (every thread's), medians over the
rounds, and handed / main.  ``--pin`` first restricts the process to one
CPU (``os.sched_setaffinity``): the two threads then share one core's
caches, which separates what crossing cores costs from what crossing
threads costs.  On a GIL build the pinned ratio is about 1.0 (the hand-offs
themselves are ~10 µs of a ~2 ms read); on a free-threaded build it is not
(objects made by one thread and used or freed by another take the slower
paths of biased reference counting and mimalloc's cross-thread frees), and
that is a floor under any design that runs the ORM's code in a worker:
the shim's cpu cells on 3.14t pay it (benchmarks/RESULTS.md, docs/principle.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import Any

from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

ROWS = 400
WARM_UP = 20


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "thread_cost_rows"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    a: Mapped[str] = mapped_column(String(40))
    b: Mapped[int] = mapped_column(Integer)


def _engine() -> Any:
    eng = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    _Base.metadata.create_all(eng)
    with Session(eng) as s:
        s.add_all([_Row(id=i, a=f"r{i}", b=i) for i in range(ROWS)])
        s.commit()
    return eng


def _read(s: Session) -> list[_Row]:
    rows = list(s.scalars(select(_Row)).all())
    s.expunge_all()
    return rows


def _touch(rows: list[_Row]) -> int:
    return sum(r.b for r in rows)


def main_only(eng: Any, reads: int) -> float:
    """Process CPU µs per read, everything in the main thread."""
    with Session(eng) as s:
        for _ in range(WARM_UP):
            _touch(_read(s))
        c = time.process_time()
        for _ in range(reads):
            _touch(_read(s))
        return (time.process_time() - c) / reads * 1e6


def handed(eng: Any, reads: int) -> float:
    """Process CPU µs per read, each read run by a worker thread."""
    go, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    def worker() -> None:
        while True:
            if not go.wait(60):
                raise RuntimeError("thread_cost: the main thread stopped handing reads")
            go.clear()
            if box.get("stop"):
                return
            box["rows"] = _read(box["session"])
            done.set()

    thread = threading.Thread(target=worker, name="thread-cost-worker")
    thread.start()
    try:
        with Session(eng) as s:
            box["session"] = s

            def one() -> None:
                go.set()
                if not done.wait(60):
                    raise RuntimeError("thread_cost: the worker did not answer in 60 s")
                done.clear()
                _touch(box.pop("rows"))

            for _ in range(WARM_UP):
                one()
            c = time.process_time()
            for _ in range(reads):
                one()
            return (time.process_time() - c) / reads * 1e6
    finally:
        box["stop"] = True
        go.set()
        thread.join(60)


def run(rounds: int, reads: int) -> dict[str, float]:
    eng = _engine()
    seen: dict[str, list[float]] = {"main": [], "handed": []}
    for r in range(rounds):
        order = [("main", main_only), ("handed", handed)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            seen[name].append(fn(eng, reads))
    eng.dispose()
    return {name: statistics.median(xs) for name, xs in seen.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thread_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reads", type=int, default=200, help="timed reads per round and way")
    p.add_argument("--pin", action="store_true", help="run the whole process on one CPU")
    p.add_argument(
        "--way",
        choices=["main", "handed"],
        default=None,
        help="only this way, once, printing nothing (for an instruction count: run it under "
        "valgrind --tool=callgrind with two --reads values and subtract)",
    )
    args = p.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.way:
        eng = _engine()
        (main_only if args.way == "main" else handed)(eng, args.reads)
        eng.dispose()
        return 0
    result = run(args.rounds, args.reads)
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    build = "free-threaded build" if sys.version.find("free-threading") >= 0 else "GIL build"
    print(
        f"CPython {sys.version.split()[0]} ({build}, GIL {'on' if gil else 'off'}), "
        f"{'pinned to one CPU' if args.pin else f'{len(os.sched_getaffinity(0))} CPUs'}, "
        f"{args.rounds} rounds x {args.reads} reads of {ROWS} rows"
    )
    print(
        f"  process CPU per read: main {result['main']:.0f} µs, handed {result['handed']:.0f} µs "
        f"-- handed / main {result['handed'] / result['main']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
