"""Lazy, quiet import of PyBullet.

PyBullet's C module writes ``pybullet build time: ...`` to the standard error stream when it is
first imported; with many worker processes that banner clutters the output of
``needle-steering regress``. :func:`import_pybullet` imports the module with file descriptor 2
pointed at ``/dev/null`` (import errors are still raised as Python exceptions) and flushes the C
buffers before restoring it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Any

_LOCK = threading.Lock()


def import_pybullet() -> Any:
    """Return the ``pybullet`` module, importing it without its banner."""
    module = sys.modules.get("pybullet")
    if module is not None:
        return module
    with _LOCK:
        module = sys.modules.get("pybullet")
        if module is not None:
            return module
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import pybullet

            with contextlib.suppress(OSError, AttributeError):  # non-POSIX libc: nothing to flush
                ctypes.CDLL(None).fflush(None)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        return pybullet
