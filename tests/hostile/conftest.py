"""The hostile-input suite: one summary line per test file at the end of the run.

``tests/`` is on sys.path through ``tests/conftest.py`` (rootdir-relative conftests are
imported first), and this directory through pytest's own ``prepend`` import mode.
"""

from __future__ import annotations

import pytest
from hostile_helpers import TALLIES, Tally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    """The counters of one test file (printed by ``pytest_terminal_summary``); failures in
    a test marked xfail count as known bugs, not as new crashes."""
    counts = TALLIES.setdefault(request.module.__name__, Tally())
    counts.expect_bug = request.node.get_closest_marker("xfail") is not None
    return counts


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its counts to the controller (tests/conftest.py adds them up
    and prints them)."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hostile_tallies"] = {m: c.counts() for m, c in TALLIES.items()}
