"""The fault-injection suite: an xdist worker hands its summary lines to the controller,
which prints them at the end of the run (tests/conftest.py)."""

from __future__ import annotations

import pytest
from fault_helpers import SUMMARIES


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_summaries"] = list(SUMMARIES)
