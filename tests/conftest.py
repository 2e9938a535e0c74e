"""Shared test fixtures: paths to the real photos in ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO = SHARED_DATA / "coco-cc"
FLICKR_SHARDS = SHARED_DATA / "flickr8k-dev"
NONMEMBERS = SHARED_DATA / "flickr8k-nonmember"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found at {path} (set PROVENANCE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    return _need(COCO)


@pytest.fixture(scope="session")
def flickr_shards_dir() -> Path:
    return _need(FLICKR_SHARDS)


@pytest.fixture(scope="session")
def nonmember_dir() -> Path:
    return _need(NONMEMBERS)
