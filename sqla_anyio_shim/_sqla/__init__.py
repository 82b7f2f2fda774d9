"""What the shim knows of SQLAlchemy, kept apart from the bridge.

=================  ========================================================
``_patching``      where the bridge is plugged into SQLAlchemy, per line
                   (2.0, 2.1): every reference swapped, and restored
``_primitives``    the pool's queue and the event lock, loop-safe from a
                   worker thread; trio's exceptions and ``asyncio`` proxy
``_admission``     the gate bounding the calls at the connection pool
                   (plugged into the bridge, see _bridge._host.Gate)
``_sync_drivers``  plain sync DBAPI drivers run in the workers (opt-in)
``_driver_loops``  async drivers inside the workers: which awaits belong to
                   a driver connection (its adapter classes), and where its
                   loop is made and closed (_bridge._driver_loop runs it)
=================  ========================================================

These import the bridge (``_bridge``); the bridge never imports them.
"""
