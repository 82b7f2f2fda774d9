"""``python -m sqla_anyio_shim bench`` outside a checkout says what it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_bench_without_a_checkout_says_it_needs_one(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sqla_anyio_shim", "bench", "--help"],
        cwd=tmp_path,  # no benchmarks/ here
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "need a checkout of the repository" in proc.stderr
    assert "from the checkout's root directory" in proc.stderr
    assert "Traceback" not in proc.stderr
