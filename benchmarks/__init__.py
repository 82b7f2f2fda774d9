"""The benchmarks of sqla-anyio-shim, run from a checkout's root as
``python -m benchmarks [options]`` (see ``cli.py``)."""
