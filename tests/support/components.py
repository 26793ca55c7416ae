"""System components the tests need (git, Mosquitto, HAProxy): real ones, found on the
machine; a missing one fails the test under CI (CI=true) and skips it elsewhere.

A module of its own, not conftest.py: sub-directories have conftest modules too, and
``from conftest import`` would find whichever was imported first."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str, package: str | None = None) -> str:
    """The path of a system binary a test needs; missing is a failure in CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if found:
        return found
    unavailable(f"{name} is not installed (apt-get install {package or name}, or run `make test`)")


def unavailable(message: str) -> NoReturn:
    """A component or capability the test needs is missing: a failure under CI, where
    everything must be there; a skip on a developer's machine."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
