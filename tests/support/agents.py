"""Real agent daemons in their own processes, and a signing operator, for integration tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.adapters.keys import generate_keypair, load_private_key
from agent.protocol import Command, Event, Topics, encode, parse_message, sign_command
from support.broker import Collector, publish
from support.cli import cli_argv
from support.logs import LogFollower, parse_events
from support.processes import kill_tree, wait_until
from support.site import REPO, SiteRepo, write_config

STACK = "test"
TOPICS = Topics("deploy-agent", STACK)
APP = "zeo-site"


@dataclass
class Operator:
    """Signs and publishes commands the way `deploy-agent deploy` does."""

    port: int
    key_path: Path

    @classmethod
    def create(cls, port: int, directory: Path) -> Operator:
        directory.mkdir(parents=True, exist_ok=True)
        key = generate_keypair(directory / "operator", comment="test@ci")
        return cls(port=port, key_path=key.private_path)

    @property
    def public_key(self) -> Path:
        return self.key_path.with_name(self.key_path.name + ".pub")

    def command(self, kind: str = "deploy", *, sign: bool = True, **fields: Any) -> Command:
        fields.setdefault("app", APP if kind != "configure" else None)
        command = Command.create(
            kind, issued_by="test@ci", now=datetime.now(UTC), stack=STACK, **fields
        )
        return sign_command(command, load_private_key(self.key_path)) if sign else command

    def send(self, command: Command | bytes) -> None:
        payload = command if isinstance(command, bytes) else encode(command)
        publish(self.port, TOPICS.commands, payload)


@dataclass
class AgentProcess:
    """`deploy-agent run` for one instance, with its own root, state and log file."""

    name: str
    directory: Path
    config_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_files: list[Path] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        root: Path,
        name: str = "web-1",
        *,
        port: int,
        repo: SiteRepo,
        operator: Operator,
        address: str = "127.0.0.2",
        layers: list[str] | None = None,
        **overrides: Any,
    ) -> AgentProcess:
        """Instance ``name`` under ``root / name``, on the broker at ``port``, trusting
        ``operator``; ``overrides`` are dotted configuration keys (see write_config)."""
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        overrides.setdefault("membership_debounce", 0.5)
        overrides.setdefault("first_deploy", False)  # tests deploy by command unless they say
        write_config(
            directory,
            repo,
            **{
                "instance.id": name,
                "instance.address": address,
                "instance.layers": layers or ["plone_instances"],
                "broker": {"host": "127.0.0.1", "port": port, "keepalive": 5},
                "security": {
                    "trusted_keys": [str(operator.public_key)],
                    "require_signatures": True,
                    "max_clock_skew": 300,
                },
                **overrides,
            },
        )
        return cls(name=name, directory=directory, config_path=directory / "agent.yaml")

    def start(self) -> AgentProcess:
        log = self.directory / f"agent-{len(self.log_files)}.log"
        self.log_files.append(log)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                cli_argv("run", "-c", str(self.config_path)),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        return self

    def logs(self, *, all_runs: bool = True) -> list[dict[str, Any]]:
        events = []
        for path in self.log_files if all_runs else self.log_files[-1:]:
            events += parse_events(path.read_bytes())
        return events

    def follow(self) -> LogFollower:
        """A reader of the current run's log, from its start."""
        return LogFollower(self.log_files[-1], describe=self.name)

    def wait_logged(
        self, event: str, timeout: float = 30, nth: int = 1, **match: Any
    ) -> dict[str, Any]:
        """The ``nth`` (first) such event logged by the current run of the agent."""
        try:
            return self.follow().wait_for(event, timeout, nth, interval=0.02, **match)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.tail()}") from None

    def tail(self, lines: int = 15) -> str:
        text = "\n".join(p.read_text(errors="replace") for p in self.log_files)
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill_tree(self) -> None:
        """SIGKILL the agent and every process below it (buildout runs in its own
        session, so a plain kill would leave it running; systemd kills the whole cgroup)."""
        assert self.process is not None
        kill_tree(self.process)


@contextlib.contextmanager
def running_agents(*agents: AgentProcess) -> Iterator[tuple[AgentProcess, ...]]:
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.wait_logged("mqtt.connected")
        yield agents
    finally:
        for agent in agents:
            agent.stop(timeout=30)


def events(seen: Collector) -> list[Event]:
    return [
        parse_message(Event, m.payload)
        for m in seen.snapshot()
        if m.topic.startswith(f"deploy-agent/{STACK}/events/")
    ]


def results(
    seen: Collector,
    command: Command | None = None,
    *,
    kind: str | None = None,
    after: datetime | None = None,
) -> dict[str, Event]:
    """Final events by instance, for one command (the first), or the last reconfigure."""
    found = {}
    for event in events(seen):
        if after is not None and event.at <= after:
            continue
        if event.phase != "result" and event.status != "rejected":
            continue
        if command is not None and event.command_id != command.id:
            continue
        if command is None and (event.command_id is not None or (kind and event.kind != kind)):
            continue
        if command is not None:
            # The first result is the answer, as for the operator's tracker: a broker that
            # redelivers a command after a crash gets "already received" afterwards.
            found.setdefault(event.instance, event)
        else:
            found[event.instance] = event
    return found


def wait_results(
    seen: Collector,
    command: Command | None,
    instances: set[str],
    *,
    timeout: float = 120,
    kind: str | None = None,
    after: datetime | None = None,
) -> dict[str, Event]:
    def complete() -> dict[str, Event] | None:
        found = results(seen, command, kind=kind, after=after)
        return found if instances <= set(found) else None

    found = wait_until(
        complete,
        timeout,
        lambda: (
            f"results from {sorted(results(seen, command, kind=kind))}, wanted {sorted(instances)}"
        ),
        interval=0.1,
    )
    assert found is not None
    return found
