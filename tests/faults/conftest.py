"""The fault-injection suite: each test's summary line again at the end of the run, where
CI's output shows it ("N faults tried, 0 lost data, 0 left an invalid current, ...").
Under pytest-xdist the workers hand their lines to the controller, which prints them."""

from __future__ import annotations

from typing import Any

import pytest
from fault_helpers import SUMMARIES


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_summaries"] = list(SUMMARIES)


def pytest_testnodedown(node: Any, error: Any) -> None:
    SUMMARIES.extend(getattr(node, "workeroutput", {}).get("fault_summaries", []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARIES:
        terminalreporter.write_line(line)
