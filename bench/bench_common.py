"""Shared pieces of the benchmarks: import paths, quiet logs, percentiles, a timed observer.

The observer is one paho client on its own thread that publishes commands and stamps every
event it receives with ``time.monotonic()`` on arrival, so latencies are measured from the
operator's side, as ``deploy-agent deploy --wait`` would see them. It keeps one connection
open, so no connect handshake is counted in any figure.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT / "tests"), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import paho.mqtt.client as paho  # noqa: E402
import structlog  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402


def quiet_logs(stream: Any = None) -> None:
    """Warnings and up only, on stderr by default: the table is the output."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
    )


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in 0..100."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


@dataclass(frozen=True)
class Arrival:
    """One event as the observer saw it: arrival time and the fields we key on.

    ``stamped`` is the event's own ``at`` (set by the agent when it built the event) moved
    onto the monotonic clock, so delays split into "until the agent had it" and "delivery".
    """

    at: float
    stamped: float
    instance: str
    command_id: str | None
    phase: str
    status: str
    message: str


class Observer:
    """Publishes on, and timestamps everything arriving from, one private broker."""

    def __init__(self, port: int, topics: Sequence[str], *, qos: int = 1) -> None:
        self.arrivals: list[Arrival] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = list(topics)
        self._qos = qos
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{uuid.uuid4().hex[:12]}",
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=60)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"observer could not subscribe to {self._topics}")

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        client.subscribe([(topic, self._qos) for topic in self._topics])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        at, wall = time.monotonic(), time.time()
        try:
            data = json.loads(message.payload)
            stamped = datetime.fromisoformat(data["at"]).timestamp() - wall + at
        except (ValueError, KeyError, TypeError):
            return
        arrival = Arrival(
            at=at,
            stamped=stamped,
            instance=str(data.get("instance")),
            command_id=data.get("command_id"),
            phase=str(data.get("phase")),
            status=str(data.get("status")),
            message=str(data.get("message", "")),
        )
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()

    def publish(self, topic: str, payload: bytes) -> float:
        """Send one QoS 1 message; returns the monotonic time just before it left."""
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        return started

    def of(self, command_id: str) -> list[Arrival]:
        with self._changed:
            return [a for a in self.arrivals if a.command_id == command_id]

    def wait(
        self, done: Callable[[list[Arrival]], bool], command_id: str, timeout: float
    ) -> list[Arrival]:
        """Block until ``done(arrivals of command_id)``; TimeoutError with what came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                mine = [a for a in self.arrivals if a.command_id == command_id]
                if done(mine):
                    return mine
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = sorted({(a.phase, a.status, a.message[:80]) for a in mine})
                    raise TimeoutError(f"command {command_id}: only {len(mine)} events: {seen}")
                self._changed.wait(min(remaining, 0.5))

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Observer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def first(arrivals: Sequence[Arrival], phase: str, *, not_status: str | None = None) -> Arrival:
    """The earliest arrival of ``phase`` (optionally not of one status)."""
    found = [a for a in arrivals if a.phase == phase and a.status != not_status]
    if not found:
        raise LookupError(f"no {phase} event among {[a.phase for a in arrivals]}")
    return min(found, key=lambda a: a.at)


def results_from(arrivals: Sequence[Arrival]) -> list[Arrival]:
    return [a for a in arrivals if a.phase == "result" or a.status == "rejected"]
