"""Shared fixtures. Components (git, Mosquitto, supervisord, HAProxy) are real; when one is
missing the test fails under CI (CI=true) and is skipped only on a developer's machine."""

from __future__ import annotations

from pathlib import Path

import pytest
from components import require_binary
from site_helpers import SiteRepo


@pytest.fixture
def site_repo(tmp_path: Path) -> SiteRepo:
    require_binary("git")
    return SiteRepo.create(tmp_path)
