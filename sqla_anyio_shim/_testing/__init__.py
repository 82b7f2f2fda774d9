"""Tools for testing the shim against SQLAlchemy's own suite.

``_conformance``: ``python -m sqla_anyio_shim conformance``, SQLAlchemy's
asyncio suite (from the sdist of the installed version) on the shim next to
greenlet.  The harness adaptation itself is the public plugin
``sqla_anyio_shim.pytest_plugin``, kept at the package's top so that
``-p sqla_anyio_shim.pytest_plugin`` stays short.
"""
