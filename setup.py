"""Packaging: the metadata is in setup.cfg; this file only ships the start-up
hook of ``SQLA_ANYIO_SHIM=1``: ``sqla_anyio_shim.pth`` (its import line, for
Python before 3.15) and ``sqla_anyio_shim.start`` (:pep:`829`'s entry point,
``_sqla_anyio_shim_start:start``, which 3.15+ runs instead of the ``.pth``
line).  Both call :func:`_sqla_anyio_shim_start.start`.

Such files work only at the top of site-packages, where ``package_data``
cannot put them: ``build_py`` copies them to the top of the build directory,
so they are in the wheel (and its RECORD, so ``pip uninstall`` removes
them).  setuptools' editable wheel (``pip install -e``) leaves build_py's
outputs out (it maps the packages and modules through a finder of its own),
so ``editable_wheel`` adds the two files to the wheel it built, RECORD
included.
"""

import base64
import hashlib
import os
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

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


def _add_to_wheel(path: str, files: dict[str, bytes]) -> None:
    """Add ``files`` at the top of the wheel ``path``, with RECORD rows."""
    with zipfile.ZipFile(path) as zf:
        entries = [(info, zf.read(info)) for info in zf.infolist()]
    (record,) = (
        i for i, (info, _) in enumerate(entries) if info.filename.endswith(".dist-info/RECORD")
    )
    record_info, record_data = entries.pop(record)
    rows = record_data.decode("utf-8").splitlines()
    kept = [(info, data) for info, data in entries if info.filename not in files]
    rows = [row for row in rows if row.split(",", 1)[0] not in files]
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in kept:
            zf.writestr(info, data)
        for name, data in files.items():
            zf.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append(f"{name},sha256={digest.decode()},{len(data)}")
        zf.writestr(record_info, "\n".join(rows) + "\n")
    os.replace(tmp, path)


class editable_wheel_with_pth(editable_wheel):
    def run(self) -> None:
        super().run()
        files = {}
        for name in STARTUP_FILES:
            with open(os.path.join(HERE, name), "rb") as f:
                files[name] = f.read()
        for name in os.listdir(self.dist_dir):
            if name.endswith(".whl") and "-0.editable-" in name:
                _add_to_wheel(os.path.join(self.dist_dir, name), files)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
