"""Examples of applications on sqla-anyio-shim (see README.md, "Examples")."""
