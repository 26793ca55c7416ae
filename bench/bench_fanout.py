"""One signed command fanned out to several hundred agents: how long until every result?

A child process runs N minimal agents on one asyncio loop, each a real ``MqttSession``
(persistent session, QoS 1) subscribed to the commands topic. On a command each runs the
real ``agent.intake.accept`` (JSON parsing, model validation, Ed25519 signature, clock skew,
targeting, replay), then publishes a ``received`` and a ``result`` event built by
``agent.announce``, as the daemon does for a command with nothing to do. The parent, as
the operator, publishes one signed command and times every result's arrival.

All N agents share one process and one core here, where a real fleet has a core each, so
the spread of arrivals is mostly this process working through N verifications in turn:
an upper bound of what the broker and the protocol cost.

Run: ``.venv/bin/python bench/bench_fanout.py [AGENTS] [ROUNDS]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from bench_common import Observer, ms, percentile, quiet_logs, raise_fd_limit, results_from

# isort: split
from support.agents import STACK, TOPICS, Operator
from support.broker import running_mosquitto

from agent.adapters.keys import load_trusted_keys
from agent.adapters.mqtt import MqttSession, Outgoing
from agent.core.config import AgentConfig, InstanceConfig, parse_config
from agent.node import announce
from agent.node.intake import Accepted, Ignored, Rejected, accept
from agent.protocol import encode

APP = "zeo-site"
PAUSE = 0.5  # between rounds, so each starts from quiet sockets
BATCH = 50  # sessions connecting at once, well inside Mosquitto's listen backlog


def fleet_config(port: int, public_key: Path) -> AgentConfig:
    return parse_config(
        {
            "stack": STACK,
            "instance": {"id": "bench-0", "address": "127.0.0.1", "layers": ["plone_instances"]},
            "broker": {"host": "127.0.0.1", "port": port, "keepalive": 60},
            "security": {"trusted_keys": [str(public_key)], "require_signatures": True},
            "apps": {APP: {"repository": "file:///nonexistent.git", "layers": ["plone_instances"]}},
        }
    )


class MiniAgent:
    """The command path of the daemon, minus the work: accept, then received and result."""

    def __init__(self, config: AgentConfig, trusted: dict[str, Any]) -> None:
        assert config.broker is not None
        self.config = config
        self.trusted = trusted
        self.seen: set[str] = set()
        self.events = TOPICS.events(config.instance.id)
        self.session = MqttSession(
            config.broker,
            client_id=f"bench-{config.instance.id}",
            subscriptions=[(TOPICS.commands, 1)],
        )

    async def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        verdict = accept(
            payload, config=self.config, trusted=self.trusted, seen=self.seen, now=announce.now()
        )
        if isinstance(verdict, Ignored):
            return
        if isinstance(verdict, Rejected):
            self.send(
                announce.event(
                    self.config,
                    verdict.command,
                    phase="result",
                    status="rejected",
                    message=verdict.reason,
                )
            )
            return
        assert isinstance(verdict, Accepted)
        command = verdict.command
        self.seen.add(str(command.id))
        self.send(
            announce.event(
                self.config,
                command,
                phase="received",
                status="started",
                message=f"queued as {verdict.run_as}",
            )
        )
        self.send(
            announce.event(
                self.config, command, phase="result", status="unchanged", message="nothing to do"
            )
        )

    def send(self, event: Any) -> None:
        self.session.publish(Outgoing(self.events, encode(event)))


async def serve(port: int, count: int, public_key: Path) -> None:
    """Connect ``count`` agents in batches, say ``ready`` on stdout, run until SIGTERM."""
    base = fleet_config(port, public_key)
    trusted = load_trusted_keys(base.security.trusted_keys)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    started = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    for first in range(0, count, BATCH):
        batch = []
        for n in range(first, min(first + BATCH, count)):
            instance = InstanceConfig(
                id=f"web-{n:04d}", address="127.0.0.1", layers=["plone_instances"]
            )
            agent = MiniAgent(base.model_copy(update={"instance": instance}), trusted)
            tasks.append(asyncio.create_task(agent.session.run(agent.on_message)))
            batch.append(agent)
        async with asyncio.timeout(60):
            await asyncio.gather(*(a.session.connected.wait() for a in batch))
    print(f"ready {time.monotonic() - started:.3f}", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _round(
    observer: Observer, operator: Operator, count: int, processes: dict[str, psutil.Process]
) -> dict[str, float]:
    """One command to all; arrival percentiles, and the CPU each process spent on it."""
    command = operator.command("deploy")
    before = {name: _cpu(p) for name, p in processes.items()}
    sent = observer.publish(TOPICS.commands, encode(command))
    events = observer.wait(
        lambda got: len(results_from(got)) >= count, str(command.id), timeout=120
    )
    cpu = {f"{name}_cpu": _cpu(p) - before[name] for name, p in processes.items()}
    results = [a.at - sent for a in results_from(events)]
    if any(a.status != "unchanged" for a in results_from(events)):
        raise RuntimeError(f"unexpected results: {[a.message for a in results_from(events)]}")
    received = [a.at - sent for a in events if a.phase == "received"]
    return {
        "received_p50": statistics.median(received),
        "p50": statistics.median(results),
        "p99": percentile(results, 99),
        "max": max(results),
        "min": min(results),
        **cpu,
    }


@contextlib.contextmanager
def _fleet(port: int, count: int, public_key: Path, log: Path) -> Any:
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, __file__, "serve", str(port), str(count), str(public_key)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"fleet did not start: {log.read_text()[-2000:]}")
        yield float(line.split()[1]), psutil.Process(child.pid)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def main(agents: int = 300, rounds: int = 5) -> dict[str, Any]:
    """Median over ``rounds`` commands of the p50/p99/max result arrival at ``agents``."""
    fds = raise_fd_limit(4 * agents + 256)  # the broker inherits it: a socket per agent
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        base = Path(tmp)
        with running_mosquitto(base / "broker") as broker:
            operator = Operator.create(broker.port, base / "operator")
            with (
                Observer(broker.port, [TOPICS.events_wildcard]) as observer,
                _fleet(broker.port, agents, operator.public_key, base / "fleet.log") as (
                    ready,
                    fleet,
                ),
            ):
                processes = {"fleet": fleet, "broker": _broker_process()}
                time.sleep(0.5)  # let the last subscriptions settle
                _round(observer, operator, agents, processes)  # warm-up, not counted
                samples = []
                for _ in range(rounds):
                    time.sleep(PAUSE)
                    samples.append(_round(observer, operator, agents, processes))
    figures: dict[str, Any] = {
        "agents": agents,
        "rounds": rounds,
        "fd_soft_limit": fds,
        "connect_all_s": round(ready, 2),
    }
    for key in samples[0]:
        figures[f"{key}_ms"] = ms(statistics.median(s[key] for s in samples))
    figures["fleet_cpu_per_agent_ms"] = round(figures["fleet_cpu_ms"] / agents, 3)
    return figures


def _broker_process() -> psutil.Process:
    """Our private Mosquitto: the one child of this process by that name."""
    for child in psutil.Process().children():
        if child.name() == "mosquitto":
            return child
    raise LookupError("no mosquitto child process")


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        quiet_logs()
        raise_fd_limit(4 * int(sys.argv[3]) + 256)
        asyncio.run(serve(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
    else:
        quiet_logs()
        args = [int(arg) for arg in sys.argv[1:3]]
        for key, value in main(*args).items():
            print(f"{key:18} {value}")
