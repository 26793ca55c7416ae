"""One real ``deploy-agent run`` process on a private Mosquitto: command latency and idle cost.

``latency()``: the agent deploys the example site once (its first command, with buildout),
then receives N signed deploys that change nothing, one after the other with a short
pause so each finds the agent idle. For each, from the moment the operator publishes it:
its ``received`` event (parsed, signature checked, journaled with fsync), its first
progress event (the worker picked it up and started the fetch), and its result.

``idle()``: a fresh agent with the production keepalive (30 s) deploys once, settles,
then its RSS is read and its CPU seconds are counted over an idle window.

Run: ``.venv/bin/python bench/bench_agent.py [latency|idle]``.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from bench_common import Arrival, Observer, first, ms, percentile, quiet_logs, results_from

# isort: split
from support.agents import TOPICS, AgentProcess, Operator
from support.broker import running_mosquitto
from support.site import SiteRepo

from agent.protocol import encode

PAUSE = 0.2  # between commands, so each one meets an idle agent


@dataclass
class Rig:
    """A broker, the example site's repository, an operator key, one agent, an observer."""

    operator: Operator
    agent: AgentProcess
    observer: Observer

    def deploy(self, timeout: float) -> tuple[float, list[Arrival]]:
        """Publish one signed deploy; (publish time, its events once the result came)."""
        command = self.operator.command("deploy")
        sent = self.observer.publish(TOPICS.commands, encode(command))
        events = self.observer.wait(lambda got: bool(results_from(got)), str(command.id), timeout)
        result = results_from(events)[0]
        if result.status not in ("succeeded", "unchanged"):
            raise RuntimeError(f"deploy {result.status}: {result.message}")
        return sent, events


@contextlib.contextmanager
def rig(**overrides: Any) -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        base = Path(tmp)
        repo = SiteRepo.create(base)
        with running_mosquitto(base / "broker") as broker:
            operator = Operator.create(broker.port, base / "operator")
            agent = AgentProcess.create(
                base,
                "web-1",
                port=broker.port,
                repo=repo,
                operator=operator,
                address="127.0.0.1",
                **overrides,
            )
            with Observer(broker.port, [TOPICS.events("web-1")]) as observer:
                agent.start()
                try:
                    agent.wait_logged("mqtt.connected")
                    yield Rig(operator, agent, observer)
                finally:
                    agent.stop(timeout=30)


def _first_progress(events: list[Arrival]) -> Arrival:
    progress = [a for a in events if a.status == "progress"]
    if not progress:
        raise LookupError(f"no progress event among {[a.phase for a in events]}")
    return min(progress, key=lambda a: a.at)


def latency(commands: int = 50) -> dict[str, Any]:
    """p50/p99 from publish to received, to first progress and to result (no-op deploys)."""
    series: dict[str, list[float]] = {
        "received": [],
        "progress": [],
        "result": [],
        "accepted": [],
        "delivery": [],
        "done": [],
    }
    with rig() as r:
        started = time.monotonic()
        r.deploy(timeout=180)
        first_s = time.monotonic() - started
        for _ in range(commands):
            time.sleep(PAUSE)
            sent, events = r.deploy(timeout=60)
            received = first(events, "received")
            series["received"].append(received.at - sent)
            series["progress"].append(_first_progress(events).at - sent)
            result = results_from(events)[0]
            series["result"].append(result.at - sent)
            series["done"].append(result.stamped - sent)
            # Split of the first: until the agent built the event, then its way back.
            series["accepted"].append(received.stamped - sent)
            series["delivery"].append(received.at - received.stamped)
    figures: dict[str, Any] = {"commands": commands, "first_deploy_s": round(first_s, 2)}
    for name, values in series.items():
        figures[f"{name}_p50_ms"] = ms(statistics.median(values))
        figures[f"{name}_p99_ms"] = ms(percentile(values, 99))
        figures[f"{name}_max_ms"] = ms(max(values))
    return figures


def idle(window: float = 30.0, settle: float = 5.0) -> dict[str, Any]:
    """RSS after settling and CPU percent over ``window`` seconds of an idle agent."""
    with rig(**{"broker.keepalive": 30}) as r:
        r.deploy(timeout=180)
        assert r.agent.process is not None
        process = psutil.Process(r.agent.process.pid)
        time.sleep(settle)
        memory = process.memory_full_info()
        before = process.cpu_times()
        started = time.monotonic()
        time.sleep(window)
        after = process.cpu_times()
        elapsed = time.monotonic() - started
        cpu_s = (after.user + after.system) - (before.user + before.system)
        return {
            "window_s": round(elapsed, 1),
            "settle_s": settle,
            "rss_mb": round(memory.rss / 2**20, 1),
            "uss_mb": round(memory.uss / 2**20, 1),
            "threads": process.num_threads(),
            "cpu_seconds": round(cpu_s, 3),
            "cpu_percent": round(100 * cpu_s / elapsed, 3),
        }


if __name__ == "__main__":
    quiet_logs()
    which = sys.argv[1] if len(sys.argv) > 1 else "latency"
    figures = latency() if which == "latency" else idle()
    for key, value in figures.items():
        print(f"{key:18} {value}")
