"""Where the event-loop thread's time goes: py-spy on one running cell.

::

    python -m benchmarks.loop_profile [--native] [--duration 20] [--rate 40] \\
        -- --cells reuse --db postgresql --reuse-tasks 100 --variants shim+asyncpg

Starts ``python -m benchmarks`` with the arguments after ``--`` (plus many rounds, so the
cell outlasts the recording), waits until the cell has started (past the data
set-up), attaches ``py-spy record --idle --threads`` for ``--duration``
seconds, stops the run and prints the loop thread's (``MainThread``) top
entries: by line where it was (self), and by function (inclusive).  With
``--idle`` a thread blocked in a lock or in ``epoll`` is counted where it
blocks, which is the point: time the loop spends waiting for a worker is
time no other task runs.

Keep the rate low: py-spy samples every thread (100+ workers here), and
``--native`` unwinding of all of them at a high rate falls behind on a
2-core machine.  Needs ``py-spy`` (``pip install py-spy``) and ptrace
permission (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def aggregate(
    path: str, thread: str = "MainThread"
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, self by file:line, inclusive by function) of ``thread``."""
    leaf: dict[str, int] = collections.Counter()
    incl: dict[str, int] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if thread not in frames[0]:
                continue
            n = int(count)
            total += n
            py = [fr for fr in frames[1:] if re.search(r"\.py[x]?:\d+\)$", fr)]
            native = [fr for fr in frames[1:] if fr not in py]
            where = re.sub(r" \(.*/", " (", py[-1]) if py else "?"
            # the innermost native frame under the last Python frame says what
            # the thread was doing there (a futex wait, a sem_post, a send)
            tail = frames[frames.index(py[-1]) + 1 :] if py else native
            if tail:
                where += "  [" + " <- ".join(fr.split(" (")[0] for fr in tail[::-1][:2]) + "]"
            leaf[where] += n
            for fr in set(py):
                incl[re.sub(r" \(.*/", " (", re.sub(r":\d+\)$", ")", fr))] += n
    return (
        total,
        sorted(leaf.items(), key=lambda x: -x[1]),
        sorted(incl.items(), key=lambda x: -x[1]),
    )


def main(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        own, bench_args = argv[:i], argv[i + 1 :]
    else:
        own, bench_args = argv, []
    p = argparse.ArgumentParser(prog="loop_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--rate", type=int, default=40)
    p.add_argument("--native", action="store_true")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--raw", default=None, help="keep py-spy's raw output here")
    p.add_argument(
        "--py-spy",
        default=shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
    )
    args = p.parse_args(own)
    if not bench_args:
        bench_args = [
            "--cells",
            "reuse",
            "--db",
            "postgresql",
            "--reuse-tasks",
            "100",
            "--variants",
            "shim+asyncpg",
        ]
    if "--rounds" not in bench_args:
        bench_args += ["--rounds", "1000"]
    if not os.path.exists(args.py_spy):
        print(
            f"py-spy not found at {args.py_spy}: pip install py-spy, or pass --py-spy PATH",
            file=sys.stderr,
        )
        return 2
    proc = subprocess.Popen(
        # the runner as a package module, from the checkout's root
        [sys.executable, "-m", "benchmarks", *bench_args],
        cwd=os.path.dirname(HERE),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = threading.Event()

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "] started" in line:
                started.set()
            if "ERROR" in line or "FAILED" in line:
                print(line, end="", file=sys.stderr)

    threading.Thread(target=watch, daemon=True).start()
    raw = args.raw or tempfile.mktemp(prefix="loop_profile_", suffix=".txt")
    try:
        if not started.wait(600):
            print("the cell did not start within 600 s", file=sys.stderr)
            return 1
        time.sleep(2)  # past the warm-up of the first batch
        cmd = [
            args.py_spy,
            "record",
            "--pid",
            str(proc.pid),
            "--idle",
            "--threads",
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            "--format",
            "raw",
            "-o",
            raw,
        ]
        if args.native:
            cmd.append("--native")
        rec = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration * 5 + 60)
        if rec.returncode != 0 or not os.path.exists(raw):
            print(rec.stderr[-800:], file=sys.stderr)
            return 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    total, leaf, incl = aggregate(raw)
    print(
        f"loop thread (MainThread): {total} samples at {args.rate} Hz over {args.duration} s"
        f"{' (native frames)' if args.native else ''}; python -m benchmarks {' '.join(bench_args)}"
    )
    print("-- where it was (self, by line) --")
    for where, n in leaf[: args.top]:
        print(f"{100 * n / total:5.1f}%  {where}")
    print("-- inclusive (by function) --")
    for where, n in incl[: args.top * 2]:
        print(f"{100 * n / total:5.1f}%  {where}")
    if args.raw:
        print(f"raw stacks: {raw}")
    else:
        os.unlink(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
