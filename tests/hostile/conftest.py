"""The hostile-input suite: one summary line per test file at the end of the run.

``tests/`` is on sys.path through ``tests/conftest.py`` (rootdir-relative conftests are
imported first), and this directory through pytest's own ``prepend`` import mode.
"""

from __future__ import annotations

from typing import Any

import pytest
from hostile_helpers import TALLIES, Tally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    """The counters of one test file (printed by ``pytest_terminal_summary``); failures in
    a test marked xfail count as known bugs, not as new crashes."""
    counts = TALLIES.setdefault(request.module.__name__, Tally())
    counts.expect_bug = request.node.get_closest_marker("xfail") is not None
    return counts


COUNTERS = ("tried", "crashed", "wrongly_accepted", "known_bugs")


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its counts to the controller, which adds them up."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hostile_tallies"] = {
            module: {name: getattr(counts, name) for name in COUNTERS}
            for module, counts in TALLIES.items()
        }


def pytest_testnodedown(node: Any, error: Any) -> None:
    for module, counts in getattr(node, "workeroutput", {}).get("hostile_tallies", {}).items():
        total = TALLIES.setdefault(module, Tally())
        for name in COUNTERS:
            setattr(total, name, getattr(total, name) + counts[name])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for module, counts in sorted(TALLIES.items()):
        terminalreporter.write_line(f"{counts.summary()}   [{module}]")
