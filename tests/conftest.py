"""Shared fixtures. Components (git, Mosquitto, supervisord, HAProxy) are real; when one is
missing the test fails under CI (CI=true) and is skipped only on a developer's machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from components import require_binary
from site_helpers import SiteRepo
from summaries import HOSTILE_COUNTERS, hostile_line

#: What the xdist workers of the fault and hostile suites reported (the controller prints).
FAULT_LINES: list[str] = []
HOSTILE: dict[str, dict[str, int]] = {}


@pytest.fixture
def site_repo(tmp_path: Path) -> SiteRepo:
    require_binary("git")
    return SiteRepo.create(tmp_path)


def add_hostile(module: str, counts: dict[str, int]) -> None:
    total = HOSTILE.setdefault(module, dict.fromkeys(HOSTILE_COUNTERS, 0))
    for name in HOSTILE_COUNTERS:
        total[name] += counts.get(name, 0)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {})
    FAULT_LINES.extend(output.get("fault_summaries", []))
    for module, counts in output.get("hostile_tallies", {}).items():
        add_hostile(module, counts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The suites' summary lines at the end of the run, with or without xdist."""
    lines = list(FAULT_LINES)
    if (faults := sys.modules.get("fault_helpers")) is not None:
        lines += faults.SUMMARIES
    if (hostile := sys.modules.get("hostile_helpers")) is not None:
        for module, tally in hostile.TALLIES.items():
            add_hostile(module, tally.counts())
    lines += [f"{hostile_line(counts)}   [{module}]" for module, counts in sorted(HOSTILE.items())]
    for line in lines:
        terminalreporter.write_line(line)
