"""Atomic file output: write beside the target, fsync, then rename into place.

A crash or an error mid-write never leaves a half-written plan, image or report under the final
name; the temporary file is removed. The result gets ordinary permissions (0666 less the umask),
not the 0600 of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success rename it to ``target``.

    Args:
        target: Final path. Its folder must exist.
        suffix: Suffix of the temporary name (some writers choose the format from it).

    Raises:
        FileNotFoundError: The folder of ``target`` does not exist.
    """
    final = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path."""
    final = Path(target)
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return final
