"""The ``pytest11`` entry point: inert unless asked for.

Installing sqla-anyio-shim must not change anybody's test runs, so this
module only adds the ``--sqla-anyio-shim`` option; given it, the real plugin
(:mod:`sqla_anyio_shim.pytest_plugin`, also loadable directly with
``-p sqla_anyio_shim.pytest_plugin``) is registered before conftest files
load.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        "--sqla-anyio-shim",
        action="store_true",
        default=False,
        help="install sqla-anyio-shim before SQLAlchemy's test harness "
        "starts (same as -p sqla_anyio_shim.pytest_plugin)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    if "--sqla-anyio-shim" not in args:
        return
    pm = early_config.pluginmanager
    if pm.has_plugin("sqla_anyio_shim.pytest_plugin"):
        return
    from . import pytest_plugin

    pm.register(pytest_plugin, "sqla_anyio_shim.pytest_plugin")
    pytest_plugin.pytest_load_initial_conftests(early_config, parser, args)
