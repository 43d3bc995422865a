"""Build the native accelerators (Cython) next to their pure-Python references; everything else is pyproject.toml.

Each compiled module (``_*.pyx``) speeds up a pure-Python module that stays the reference: same inputs, same
outputs, checked against each other by the tests (tests/test_native_*.py). The package works without them
(``PG2K_NATIVE=0``, or a machine without a C compiler: the build is then skipped with a warning), only slower.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Every ``_*.pyx`` of the package, each compiled to the module of the same name.
NATIVE_MODULES = sorted(str(p) for p in Path("pg2kinesis_dagster").rglob("_*.pyx"))


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python path in place instead of failing the install,
    unless PG2K_REQUIRE_NATIVE=1 (CI sets it: a broken accelerator must fail there)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure
            self._skip(exc)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        if os.environ.get("PG2K_REQUIRE_NATIVE") == "1":
            raise exc
        print(f"warning: native accelerators not built ({exc}); the pure-Python path is used", file=sys.stderr)


def extensions() -> list:
    from Cython.Build import cythonize

    return cythonize(
        NATIVE_MODULES,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
