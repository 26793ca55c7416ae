"""Shared fixtures. Components (git, Mosquitto, supervisord, HAProxy) are real; when one is
missing the test fails under CI (CI=true) and is skipped only on a developer's machine.

This directory is on sys.path (pytest's ``prepend`` import mode, no ``__init__.py``), so
every suite imports the helpers as ``from support.<module> import ...``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agents import Operator
from support.broker import Mosquitto, running_mosquitto
from support.components import require_binary
from support.site import SiteRepo
from support.tally import HOSTILE_COUNTERS, SUMMARIES, TALLIES, hostile_line

#: What the xdist workers of the fault and hostile suites reported (the controller prints).
FAULT_LINES: list[str] = []
HOSTILE: dict[str, dict[str, int]] = {}


@pytest.fixture
def site_repo(tmp_path: Path) -> SiteRepo:
    require_binary("git")
    return SiteRepo.create(tmp_path)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto for this test, killed after it."""
    with running_mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def operator(broker: Mosquitto, tmp_path: Path) -> Operator:
    """A signing operator on ``broker``, trusted by the agents the test creates."""
    return Operator.create(broker.port, tmp_path / "operator")


def add_hostile(module: str, counts: dict[str, int]) -> None:
    total = HOSTILE.setdefault(module, dict.fromkeys(HOSTILE_COUNTERS, 0))
    for name in HOSTILE_COUNTERS:
        total[name] += counts.get(name, 0)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands what the suites counted to the controller."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["fault_summaries"] = list(SUMMARIES)
        workeroutput["hostile_tallies"] = {m: c.counts() for m, c in TALLIES.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {})
    FAULT_LINES.extend(output.get("fault_summaries", []))
    for module, counts in output.get("hostile_tallies", {}).items():
        add_hostile(module, counts)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The suites' summary lines at the end of the run, with or without xdist."""
    lines = FAULT_LINES + SUMMARIES
    for module, tally in TALLIES.items():
        add_hostile(module, tally.counts())
    lines += [f"{hostile_line(counts)}   [{module}]" for module, counts in sorted(HOSTILE.items())]
    for line in lines:
        terminalreporter.write_line(line)
