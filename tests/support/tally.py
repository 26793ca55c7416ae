"""The end-of-run summary lines of the fault and hostile-input suites, one format for the
test files that count and for tests/conftest.py that prints (merging xdist workers)."""

from __future__ import annotations

from collections.abc import Mapping

HOSTILE_COUNTERS = ("tried", "crashed", "wrongly_accepted", "known_bugs")


def hostile_line(counts: Mapping[str, int]) -> str:
    known = counts.get("known_bugs", 0)
    suffix = f" ({known} more on known bugs, xfail)" if known else ""
    return (
        f"hostile: {counts['tried']} inputs tried, {counts['crashed']} crashed the agent, "
        f"{counts['wrongly_accepted']} accepted when they should not be{suffix}"
    )
