"""The agent's events: one the protocol cannot carry never fails the command."""

from __future__ import annotations

from pathlib import Path

import structlog

from agent.adapters.configfile import load_config
from agent.adapters.mqtt import Outgoing
from agent.node.publisher import Publisher
from agent.protocol import Event, Topics, parse_message

REPO = Path(__file__).resolve().parents[2]


class RecordingSession:
    """Stands in for the MQTT session: what would have been published."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    def publish(self, message: Outgoing) -> None:
        self.sent.append(message)


def test_an_event_the_protocol_cannot_carry_is_logged_and_dropped() -> None:
    config = load_config(REPO / "config" / "agent.example.yaml")
    session = RecordingSession()
    publisher = Publisher(config, session, Topics("deploy-agent", config.stack))  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        publisher.event(None, phase="hook:before_restart", status="progress", message="x")
        publisher.event(None, phase="hook.before_restart", status="progress", message="ok")
    assert [e["phase"] for e in logs if e["event"] == "event.invalid"] == ["hook:before_restart"]
    [sent] = session.sent
    assert parse_message(Event, sent.payload).phase == "hook.before_restart"
