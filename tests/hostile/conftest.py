"""The hostile-input suite: one summary line per test file at the end of the run
(support.tally; tests/conftest.py prints them, merging what xdist workers counted).

``tests/`` is on sys.path through ``tests/conftest.py`` (rootdir-relative conftests are
imported first), and this directory through pytest's own ``prepend`` import mode.
"""

from __future__ import annotations

import pytest
from support.tally import TALLIES, HostileTally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> HostileTally:
    """The counters of one test file (printed by ``pytest_terminal_summary``); failures in
    a test marked xfail count as known bugs, not as new crashes."""
    counts = TALLIES.setdefault(request.module.__name__, HostileTally())
    counts.expect_bug = request.node.get_closest_marker("xfail") is not None
    return counts
