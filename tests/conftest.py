"""Shared fixtures. Components (git, Mosquitto, supervisord, HAProxy) are real; when one is
missing the test fails under CI (CI=true) and is skipped only on a developer's machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from site_helpers import SiteRepo

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """The path of a system binary a test needs; missing is a failure in CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found:
        return found
    message = f"{name} is not installed (apt-get install {name}, or run `make test`)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def site_repo(tmp_path: Path) -> SiteRepo:
    require_binary("git")
    return SiteRepo.create(tmp_path)
