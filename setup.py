"""Packaging: the metadata is in setup.cfg; this file only ships the start-up
hook of ``SQLA_ANYIO_SHIM=1``: ``sqla_anyio_shim.pth`` (its import line, for
Python before 3.15) and ``sqla_anyio_shim.start`` (:pep:`829`'s entry point,
``_sqla_anyio_shim_start:start``, which 3.15+ runs instead of the ``.pth``
line).  Both call :func:`_sqla_anyio_shim_start.start`.

Such files work only at the top of site-packages, where ``package_data``
cannot put them: ``build_py`` copies them to the top of the build directory,
so they are in the wheel (and its RECORD, so ``pip uninstall`` removes
them).  An editable install (``pip install -e``) gets neither: setuptools'
editable wheel maps the packages and modules through a finder of its own and
leaves build_py's other outputs out.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

#: the start-up files, shipped at the top of site-packages
STARTUP_FILES = ("sqla_anyio_shim.pth", "sqla_anyio_shim.start")
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        for name in STARTUP_FILES:
            self.copy_file(os.path.join(HERE, name), os.path.join(self.build_lib, name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [
            *super().get_outputs(include_bytecode),
            *(os.path.join(self.build_lib, name) for name in STARTUP_FILES),
        ]


setup(cmdclass={"build_py": build_py_with_pth})
