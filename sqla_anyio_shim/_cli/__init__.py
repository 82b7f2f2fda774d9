"""The command line: ``python -m sqla_anyio_shim [run | walkthrough]``.

=================  ========================================================
``_launcher``      ``run [OPTIONS] -- TARGET``: an unmodified program under
                   the shim (options parsed through the package's
                   ``_options`` table, as ``install()`` checks them)
``_autoinstall``   ``SQLA_ANYIO_SHIM=1``: the shim installed when SQLAlchemy
                   is first imported (armed by ``_sqla_anyio_shim_start``)
``_walkthrough``   the main job: a Core and ORM walk-through on SQLite
=================  ========================================================
"""
