"""Shared fixtures: paths to the real CT data beside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``: real CT scans with TotalSegmentator reference masks."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real CT data not found at {SHARED_DATA}; clone the repository beside shared/")
    return SHARED_DATA
