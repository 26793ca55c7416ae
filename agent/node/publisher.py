"""What this agent publishes: presence, progress events, final results and the retained
last result per app (docs/architecture.md, "Wire protocol"). One owner for the topics an
agent writes, so the daemon, the worker and recovery never build a message by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from pydantic import ValidationError

from agent.adapters.mqtt import MqttSession, Outgoing
from agent.core.config import AgentConfig
from agent.core.outcome import Outcome
from agent.node import announce
from agent.protocol import Command, Presence, StatusRecord, Topics, encode

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(self, config: AgentConfig, session: MqttSession, topics: Topics) -> None:
        self.config = config
        self.session = session
        self.topics = topics
        self.status_record: StatusRecord | None = None

    @property
    def own_topic(self) -> str:
        return self.topics.instance(self.config.instance.id)

    def presence(self, presence: Presence) -> None:
        self.session.publish(Outgoing(self.own_topic, encode(presence), qos=1, retain=True))

    def offline(self) -> Outgoing:
        return Outgoing(self.own_topic, encode(announce.offline(self.config)), qos=1, retain=True)

    def event(self, command: Command | None, **fields: Any) -> None:
        """A progress event (or a rejection): sent when the broker is reachable. One the
        protocol cannot carry is logged and dropped: progress never fails a command."""
        try:
            event = announce.event(self.config, command, **fields)
        except ValidationError as exc:
            log.error("event.invalid", phase=fields.get("phase"), error=str(exc)[:500])
            return
        self.session.publish(Outgoing(self.topics.events(self.config.instance.id), encode(event)))

    def result(self, command: Command | None, **fields: Any) -> Outgoing:
        """A final event, for the caller to journal before ``deliver``."""
        event = announce.event(self.config, command, phase="result", **fields)
        return Outgoing(self.topics.events(self.config.instance.id), encode(event))

    def resent(self, payload: bytes) -> Outgoing:
        return Outgoing(self.topics.events(self.config.instance.id), payload)

    def deliver(self, message: Outgoing) -> asyncio.Future[bool]:
        """Publish; the future is True once the broker confirmed it."""
        return self.session.publish_tracked(message)

    def statuses(self, outcomes: Sequence[Outcome], command: Command | None) -> None:
        """The retained last result per app; a reconfigure that changed nothing is not
        news, so the last real result stays."""
        for outcome in outcomes:
            quiet = outcome.kind == "configure" and outcome.status == "unchanged"
            if outcome.app in self.config.apps and not quiet:
                self.status_record = announce.status_record(
                    self.config, self.status_record, outcome, command
                )
        if self.status_record is not None:
            topic = self.topics.status(self.config.instance.id)
            self.session.publish(Outgoing(topic, encode(self.status_record), qos=1, retain=True))


class CommandProgress:
    """The progress port of one command: its pipeline phases become its events."""

    def __init__(self, publisher: Publisher, command: Command | None) -> None:
        self.publisher = publisher
        self.command = command

    async def phase(self, name: str, status: str, message: str, details: Mapping[str, Any]) -> None:
        self.publisher.event(
            self.command,
            phase=name,
            status="progress",
            message=message,
            details={"step": status, **details},
        )
