"""What the fault-injection and hostile-input suites tried, and the one summary line each
prints: the test files count, tests/conftest.py prints at the end of the run (merging what
xdist workers counted).

``faults: N kills tried, 0 lost data, 0 left an invalid current, 0 crashed the agent``
``hostile: N inputs tried, 0 crashed the agent, 0 accepted when they should not be``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.adapters.markers import MARKER
from support.agents import AgentProcess

HOSTILE_COUNTERS = ("tried", "crashed", "wrongly_accepted", "known_bugs")

#: The summary line of every fault test run so far, printed again at the end of the run.
SUMMARIES: list[str] = []


@dataclass(kw_only=True)
class Tally:
    """What a suite tried; ``summary`` is the line printed at the end of the run."""

    tried: int = 0

    def summary(self) -> str:
        raise NotImplementedError


# -- hostile inputs ------------------------------------------------------------------------


def hostile_line(counts: Mapping[str, int]) -> str:
    known = counts.get("known_bugs", 0)
    suffix = f" ({known} more on known bugs, xfail)" if known else ""
    return (
        f"hostile: {counts['tried']} inputs tried, {counts['crashed']} crashed the agent, "
        f"{counts['wrongly_accepted']} accepted when they should not be{suffix}"
    )


@dataclass
class HostileTally(Tally):
    """What one test file tried; a crash or a wrong acceptance also fails its test."""

    crashed: int = 0
    wrongly_accepted: int = 0
    known_bugs: int = 0
    expect_bug: bool = False  # set per test: it is marked xfail for a known bug

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """One hostile input: anything raised inside counts as a crash (and propagates)."""
        self.tried += 1
        try:
            yield
        except Exception:
            if self.expect_bug:
                self.known_bugs += 1
            else:
                self.crashed += 1
            raise

    def refuse(self, accepted: bool, what: str) -> None:
        """Fail (and count) when a hostile input was accepted."""
        if accepted and self.expect_bug:
            self.known_bugs += 1
            raise AssertionError(f"accepted (known bug): {what}")
        if accepted:
            self.wrongly_accepted += 1
            raise AssertionError(f"accepted when it should not be: {what}")

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in HOSTILE_COUNTERS}

    def summary(self) -> str:
        return hostile_line(self.counts())


#: The hostile tallies by test module.
TALLIES: dict[str, HostileTally] = {}


# -- faults --------------------------------------------------------------------------------


def current_problem(app: Path) -> str | None:
    """Why ``current`` is not a complete release, or None when it is one."""
    link = app / "current"
    if not link.is_symlink():
        return f"{link} is not a symlink"
    target = link.resolve()
    if target.parent != (app / "releases").resolve():
        return f"current points outside releases/: {os.readlink(link)}"
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError) as exc:
        return f"release {target.name} has no readable marker: {exc}"
    if marker.get("status") != "complete":
        return f"release {target.name} is marked {marker.get('status')!r}"
    if not (target / "deploy.cfg").is_file():
        return f"release {target.name} has no deploy.cfg"
    return None


@dataclass
class Precious:
    """A file in shared var/filestorage that no fault may change or remove."""

    path: Path
    digest: str = ""

    @classmethod
    def write(cls, app: Path, size: int = 256 * 1024) -> Precious:
        path = app / "shared" / "var" / "filestorage" / "precious.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        return cls(path, hashlib.sha256(data).hexdigest())

    def intact(self) -> bool:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest() == self.digest
        except OSError:
            return False


@dataclass
class FaultTally(Tally):
    """What a fault test tried and what went wrong; printed as one summary line.

    ``check`` may run several times per fault (right after it, after recovery): each
    fault counts at most once per kind of damage."""

    what: str
    lost: set[int] = field(default_factory=set)
    invalid: set[int] = field(default_factory=set)
    crashes: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def check(self, app: Path, precious: Precious | None, agent: AgentProcess | None) -> None:
        """Check the invariants after the current fault; ``agent`` None while it is down."""
        if precious is not None and not precious.intact():
            self.flag(self.lost, f"{precious.path.name} changed or missing")
        if problem := current_problem(app):
            self.flag(self.invalid, problem)
        if agent is not None and (agent.process is None or agent.process.poll() is not None):
            self.flag(self.crashes, f"the agent exited: {agent.tail(5)}")

    def flag(self, kind: set[int], note: str) -> None:
        kind.add(self.tried)
        self.notes.append(f"fault {self.tried}: {note}")

    def summary(self) -> str:
        return (
            f"faults: {self.tried} {self.what} tried, {len(self.lost)} lost data, "
            f"{len(self.invalid)} left an invalid current, "
            f"{len(self.crashes)} crashed the agent"
        )

    def report(self) -> None:
        """Print the summary (again at the end of the run) and fail when any fault did
        damage."""
        SUMMARIES.append(self.summary())
        print(f"\n{self.summary()}")
        for note in self.notes:
            print(f"  {note}")
        assert not (self.lost or self.invalid or self.crashes), self.notes
