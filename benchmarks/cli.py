"""Command line of the benchmarks: ``python -m benchmarks [options]``.

The flags and ``BENCH_*`` variables are those of ``bench.py`` (``--help``).
``python -m sqla_anyio_shim bench`` calls :func:`main` here.
"""

from __future__ import annotations

from benchmarks import bench


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    return bench.main(argv)
