"""``python -m benchmarks [options]``: the benchmark runner (``cli.main``)."""

import sys

from benchmarks.cli import main

sys.exit(main())
