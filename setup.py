"""Packaging: the metadata is in setup.cfg; this file only ships the
``sqla_anyio_shim.pth`` start-up hook (``SQLA_ANYIO_SHIM=1``).

A ``.pth`` file works only at the top of site-packages, where ``package_data``
cannot put it: ``build_py`` copies it to the top of the build directory, so
it is in the wheel (and its RECORD, so ``pip uninstall`` removes it).  An
editable install gets it too (setuptools puts build_py's outputs that live
outside any package into the editable wheel).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "sqla_anyio_shim.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
