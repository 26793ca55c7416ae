"""Every topic of one stack (docs/architecture.md, "Wire protocol"): no other module spells
a topic by hand, and a topic from the broker maps back to (channel, instance) or nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from agent.core.errors import ConfigError
from agent.core.names import NAME_RE, config_name

DEFAULT_TOPIC_PREFIX = "deploy-agent"
Channel = Literal["commands", "config", "instances", "events", "status", "logs"]
_CHANNELS: dict[str, Channel] = {name: name for name in get_args(Channel)}


@dataclass(frozen=True)
class Topics:
    """Every topic name of one stack, so no other module spells a topic by hand."""

    prefix: str
    stack: str

    def __post_init__(self) -> None:
        for segment in self.prefix.split("/"):
            _config_name("topic prefix segment", segment)
        _config_name("stack name", self.stack)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.stack}"

    @property
    def commands(self) -> str:
        return f"{self.base}/commands"

    @property
    def config(self) -> str:
        return f"{self.base}/config"

    def instance(self, instance_id: str) -> str:
        return self._per_instance("instances", instance_id)

    def events(self, instance_id: str) -> str:
        return self._per_instance("events", instance_id)

    def status(self, instance_id: str) -> str:
        return self._per_instance("status", instance_id)

    def logs(self, instance_id: str) -> str:
        return self._per_instance("logs", instance_id)

    def _wildcard(self, channel: str) -> str:
        """Every instance's topic of one channel (``P/<channel>/+``)."""
        return f"{self.base}/{channel}/+"

    @property
    def instances_wildcard(self) -> str:
        return self._wildcard("instances")

    @property
    def events_wildcard(self) -> str:
        return self._wildcard("events")

    @property
    def status_wildcard(self) -> str:
        return self._wildcard("status")

    @property
    def logs_wildcard(self) -> str:
        return self._wildcard("logs")

    def parse(self, topic: str) -> tuple[Channel, str | None] | None:
        """Return (channel, instance id) of a topic of this stack, or None for any other."""
        if not topic.startswith(self.base + "/"):
            return None
        name, sep, instance_id = topic[len(self.base) + 1 :].partition("/")
        channel = _CHANNELS.get(name)
        if channel is None:
            return None
        if channel in ("commands", "config"):
            return None if sep else (channel, None)
        return (channel, instance_id) if NAME_RE.fullmatch(instance_id) else None

    def instance_id(self, topic: str) -> str | None:
        """Return the instance id a per-instance topic belongs to, or None."""
        parsed = self.parse(topic)
        return parsed[1] if parsed else None

    def _per_instance(self, channel: str, instance_id: str) -> str:
        return f"{self.base}/{channel}/{_config_name('instance id', instance_id)}"


def _config_name(what: str, value: str) -> str:
    try:
        return config_name(what, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
