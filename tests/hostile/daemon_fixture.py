"""A real ``Daemon`` in this process, without a broker, to feed its message handlers.

Nothing is faked: the handlers are the ones ``deploy-agent run`` dispatches to, the state
directory and the key files are real; the MQTT session simply never connects, so what the
agent would publish stays in its outbox. What the tests observe is the agent's state
(stack config, fleet, queue, seen ids) and its structured log events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hostile_helpers import config_data, write_public_keys
from structlog.testing import capture_logs

from agent.core.config import parse_config
from agent.node.daemon import Daemon
from agent.protocol import Topics


@dataclass
class InProcessAgent:
    """A Daemon and the event loop its handlers run on."""

    daemon: Daemon
    loop: asyncio.AbstractEventLoop

    @property
    def topics(self) -> Topics:
        return self.daemon.topics

    def feed(self, topic: str, payload: bytes) -> list[dict[str, Any]]:
        """Deliver one message as the session would; return the log events it caused."""
        with capture_logs() as logs:
            self.loop.run_until_complete(self.daemon.on_message(topic, payload, False))
        return logs

    def state(self) -> tuple[Any, ...]:
        """Everything a hostile message must leave alone."""
        d = self.daemon
        return (
            dict(d.stack_config),
            d.fleet.signature(),
            d.worker.queue.qsize(),
            frozenset(d.seen),
            d.worker.configure_queued,
            d.reconfigure.pending,
        )


def make_agent(tmp: Path, **overrides: Any) -> InProcessAgent:
    keys = write_public_keys(tmp / "keys")
    data = config_data(tmp) | {
        "broker": {"host": "127.0.0.1", "port": 1},
        "security": {
            "trusted_keys": [str(k) for k in keys],
            "require_signatures": True,
            "max_clock_skew": 300,
        },
        **overrides,
    }
    loop = asyncio.new_event_loop()

    async def build() -> Daemon:
        return Daemon(parse_config(data))

    return InProcessAgent(daemon=loop.run_until_complete(build()), loop=loop)


def close_agent(agent: InProcessAgent) -> None:
    agent.loop.run_until_complete(agent.daemon.reconfigure.close())
    agent.loop.close()


def in_process_agent(tmp: Path, **overrides: Any) -> Iterator[InProcessAgent]:
    """For a fixture: ``yield from in_process_agent(tmp)``."""
    agent = make_agent(tmp, **overrides)
    try:
        yield agent
    finally:
        close_agent(agent)
