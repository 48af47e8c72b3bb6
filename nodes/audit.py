"""Append-only, hash-chained audit log (JSON lines, fsync after every record).

Each line is one JSON object with the caller's fields plus

* ``seq``: 1, 2, 3, ... in file order;
* ``time_utc``: ISO-8601 UTC time of writing (unless the caller gave one);
* ``prev_sha256``: SHA-256 (hex) of the previous line's bytes (64 zeros for the first line).

The file is opened with ``O_APPEND`` and never rewritten or truncated; every record is written
with one ``write`` call followed by ``fsync``. :func:`read_audit_log` re-computes the chain, so
an edited, deleted or reordered line is detected.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from needle_steering.errors import NeedleSteeringError

GENESIS: Final = "0" * 64


class AuditLogError(NeedleSteeringError, ValueError):
    """The audit log cannot be opened or written, or its hash chain is broken."""


def utc_now_iso() -> str:
    """Current UTC time, ISO-8601 with microseconds and a ``Z`` suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def read_audit_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and verify an audit log.

    Returns:
        The records in file order (empty when the file does not exist).

    Raises:
        AuditLogError: a line is not a JSON object, ``seq`` is not consecutive, or the hash chain
            is broken (the line number is in the message).
    """
    p = Path(path)
    if not p.exists():
        return []
    records: list[dict[str, Any]] = []
    prev = GENESIS
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                raise AuditLogError(f"{p}:{number}: incomplete last line (interrupted write)")
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise AuditLogError(f"{p}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise AuditLogError(f"{p}:{number}: expected a JSON object")
            if record.get("seq") != number:
                raise AuditLogError(f"{p}:{number}: seq {record.get('seq')!r}, expected {number}")
            if record.get("prev_sha256") != prev:
                raise AuditLogError(f"{p}:{number}: hash chain broken (prev_sha256 {record.get('prev_sha256')!r})")
            prev = _line_hash(raw)
            records.append(record)
    return records


class AuditLog:
    """Thread-safe append-only writer (see module docstring).

    Args:
        path: File to append to (``~`` is expanded; parent folders are created).

    Raises:
        AuditLogError: the existing file fails verification or the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.expanduser(os.fspath(path)))
        if not os.fspath(path):
            raise AuditLogError("audit log path is empty")
        existing = read_audit_log(self.path)
        #: The verified records that were already in the file when it was opened (a previous run's).
        self.records_at_open: tuple[dict[str, Any], ...] = tuple(existing)
        self._seq = len(existing)
        self._prev = GENESIS
        if existing:
            with self.path.open("rb") as handle:
                last = handle.readlines()[-1]
            self._prev = _line_hash(last)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot open audit log ({exc})") from None

    def append(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Append one record; returns it with ``seq``, ``time_utc`` and ``prev_sha256`` filled in.

        Raises:
            AuditLogError: the write or fsync failed (the caller must treat the action as not done).
        """
        with self._lock:
            record = dict(fields)
            record.setdefault("time_utc", utc_now_iso())
            record["seq"] = self._seq + 1
            record["prev_sha256"] = self._prev
            line = (json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(self._fd)
            except OSError as exc:
                raise AuditLogError(f"{self.path}: audit write failed ({exc})") from None
            self._seq += 1
            self._prev = _line_hash(line)
            return record

    def close(self) -> None:
        """Close the file (further appends raise)."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


__all__ = ["AuditLog", "AuditLogError", "read_audit_log", "utc_now_iso"]
