"""Shared pieces of the fault-injection suite: a fast log follower, a SIGKILL that takes
the whole process tree (as systemd's KillMode=control-group does), the on-disk invariants
every fault must preserve, and the tally each test prints.

tests/faults has no __init__.py: this module is imported by name, and tests/ itself is on
sys.path through tests/conftest.py, so ``agent_helpers`` and friends import as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from agent_helpers import APP, AgentProcess
from supervisord_helpers import Supervisord

from agent.adapters.releases import MARKER

#: How many kills test_fault_agent_kill.py tries; CI keeps the default.
FAULT_RUNS = int(os.environ.get("FAULT_RUNS", "8"))


#: The summary line of every fault test run so far, printed again at the end of the run.
SUMMARIES: list[str] = []


class LogFollower:
    """Reads an agent's current log file incrementally, so a kill can follow an event by
    milliseconds (AgentProcess.wait_logged re-reads the whole file every 100 ms)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.path = agent.log_files[-1]
        self.offset = 0
        self.pending = b""
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
            self.offset += len(chunk)
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                new.append(json.loads(line))
        self.seen.extend(new)
        return new

    def wait_for(
        self, event: str, timeout: float = 120, nth: int = 1, **match: Any
    ) -> dict[str, Any]:
        """The ``nth`` matching event, polled every few milliseconds. The timeout only
        bounds a hang: nothing waits for it to pass."""
        deadline = time.monotonic() + timeout
        checked = 0
        found = 0
        while time.monotonic() < deadline:
            self.poll()
            for item in self.seen[checked:]:
                if item.get("event") == event and all(item.get(k) == v for k, v in match.items()):
                    found += 1
                    if found == nth:
                        return item
            checked = len(self.seen)
            time.sleep(0.005)
        raise TimeoutError(f"never logged {event} {match} #{nth}; last: {self.seen[-5:]}")

    def last_phase(self) -> str:
        """``phase/status`` of the last pipeline event: where the kill actually landed."""
        self.poll()
        phases = [e for e in self.seen if e.get("event") == "pipeline.phase"]
        return f"{phases[-1]['phase']}/{phases[-1]['status']}" if phases else "before-fetch"


def kill_tree(agent: AgentProcess) -> None:
    """SIGKILL the agent and every process below it (buildout runs in its own session, so
    a plain kill of the agent would leave it running; systemd kills the whole cgroup)."""
    assert agent.process is not None
    try:
        children = psutil.Process(agent.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    with contextlib.suppress(ProcessLookupError):
        os.kill(agent.process.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    agent.process.wait(timeout=10)
    psutil.wait_procs(children, timeout=5)


def app_dir(agent: AgentProcess) -> Path:
    return agent.directory / "srv" / APP


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
class Tally:
    """What a fault test tried and what went wrong; printed as one summary line.

    ``check`` may run several times per fault (right after it, after recovery): each
    fault counts at most once per kind of damage."""

    what: str
    tried: int = 0
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


@contextlib.contextmanager
def supervisord_again(sv: Supervisord, timeout: float = 15) -> Iterator[Supervisord]:
    """Start supervisord again from the same configuration (same socket, same includes)
    after ``sv.stop()``, as `systemctl start supervisor` would; stopped on the way out."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor.supervisord",
            "-c",
            str(sv.root / "supervisord.conf"),
            "-n",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=sv.root,
    )
    again = Supervisord(root=sv.root, socket_path=sv.socket_path, process=process)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, "supervisord exited at start-up"
            try:
                if again.call("getState")["statename"] == "RUNNING":
                    break
            except (OSError, xmlrpc.client.Error):
                pass
            assert time.monotonic() < deadline, "supervisord did not answer again"
            time.sleep(0.05)
        yield again
    finally:
        again.stop()
