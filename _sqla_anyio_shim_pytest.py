"""The ``pytest11`` entry point of sqla-anyio-shim: inert unless asked for.

Installing sqla-anyio-shim must not change anybody's test runs, so this
module only adds the ``--sqla-anyio-shim`` option; given it, the real plugin
(:mod:`sqla_anyio_shim.pytest_plugin`, also loadable directly with
``-p sqla_anyio_shim.pytest_plugin``) is registered before conftest files
load.

It lives outside the package on purpose: pytest imports every entry point at
start-up, and importing ``sqla_anyio_shim._anything`` would first run the
package's ``__init__`` (the bridge, asyncio) in every test run of every
project that has the package installed, whether or not it asks for the shim.
"""

from __future__ import annotations

from typing import Any

import pytest

OPTION = "--sqla-anyio-shim"
PLUGIN = "sqla_anyio_shim.pytest_plugin"


def pytest_addoption(parser: Any) -> None:
    parser.addoption(
        OPTION,
        action="store_true",
        default=False,
        help="install sqla-anyio-shim before SQLAlchemy's test harness "
        f"starts (same as -p {PLUGIN})",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> None:
    if OPTION not in args:
        return
    pm = early_config.pluginmanager
    if pm.has_plugin(PLUGIN):
        return
    from sqla_anyio_shim import pytest_plugin

    pm.register(pytest_plugin, PLUGIN)
    pytest_plugin.pytest_load_initial_conftests(early_config, parser, args)
