"""Which native accelerators are in use.

A few hot loops have a compiled twin (``_*.pyx`` next to the module, built by ``setup.py``): the pure-Python
code stays the reference, the compiled one must give the same output for the same input (tests/test_native_*.py
compare them). ``PG2K_NATIVE=0`` turns every accelerator off (the tests run the reference path that way); a
package installed without a C compiler has none and says so once in the log.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

_warned: set[str] = set()


def native_enabled() -> bool:
    """Whether accelerators may be used (``PG2K_NATIVE`` is not ``0``)."""
    return os.environ.get("PG2K_NATIVE", "1").strip() != "0"


def load(name: str) -> ModuleType | None:
    """The compiled module ``name`` (e.g. ``pg2kinesis_dagster.kinesis._kpl``), or None when it is turned off or
    was not built (then the caller uses its pure-Python path)."""
    if not native_enabled():
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if name not in _warned:
            _warned.add(name)
            log.warning("native accelerator %s is not built (%s): using the pure-Python path, several times "
                        "slower; reinstall with a C compiler (make install) to build it", name, exc)
        return None
