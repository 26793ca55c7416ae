"""This agent's membership of the fleet (docs/architecture.md, "Membership"): its own
presence, the barrier after each (re)connect, the others' presences and the member
timeout, and the pins that survive a restart.

Split from ``agent/node/daemon.py``: the daemon composes a ``Membership``, routes the
presence topics to it and runs its ``expiry`` task; the fleet's decisions stay in
``agent/node/fleet.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agent.adapters.files import atomic_write
from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig
from agent.core.plan import client_layout
from agent.core.stackconfig import stack_settings
from agent.node import announce
from agent.node.fleet import Debouncer, Fleet
from agent.node.publisher import Publisher
from agent.protocol import InvalidMessage, Presence, encode, parse_message

log = structlog.get_logger(__name__)


def own_presence(
    config: AgentConfig, facts: HostFacts, stack_config: Mapping[str, Any], since: datetime
) -> Presence:
    """What this agent says about itself, for the stack configuration in force."""
    settings = stack_settings(dict(stack_config))
    layout = client_layout(
        settings.plone_instances,
        cpu_count=facts.cpu_count,
        memory_mb=facts.memory_mb,
        layers=config.instance.layers,
    )
    return announce.presence(config, facts, layout, since)


class Membership:
    """The fleet as this agent sees it, and what it says about itself.

    ``stopping`` says the agent is on its way out; ``leave`` is called when ``deploy-agent
    leave`` asked this instance to go. A change of membership saves the pins and triggers
    ``reconfigure``.
    """

    def __init__(
        self,
        config: AgentConfig,
        own: Presence,
        *,
        facts: HostFacts,
        stack_config: Callable[[], Mapping[str, Any]],
        started_at: datetime,
        publisher: Publisher,
        reconfigure: Debouncer,
        stopping: Callable[[], bool],
        leave: Callable[[], None],
    ) -> None:
        self.config = config
        self.facts = facts
        self.stack_config = stack_config
        self.started_at = started_at
        self.pins_path = config.paths.state / "fleet.json"
        self.saved_pins = load_pins(self.pins_path)
        self.fleet = Fleet(own, member_timeout=config.member_timeout, pins=self.saved_pins)
        self.fleet.configure(stack_settings(dict(stack_config())))
        self.fleet.begin_sync()  # nothing is compared before the first replay is over
        self.publisher = publisher
        self.reconfigure = reconfigure
        self.stopping = stopping
        self.leave = leave
        self.synced = asyncio.Event()
        self.sync_token: bytes | None = None
        self.sync_generation = 0
        self.fleet_woken = asyncio.Event()

    # -- our own presence -----------------------------------------------------------------
    def presence(self) -> Presence:
        return own_presence(self.config, self.facts, self.stack_config(), self.started_at)

    async def announce(self) -> None:
        """(Re)publish our presence: on every connect and after every command. Until a
        sync is over, its echo is the barrier: it comes back after every retained
        presence the broker replays for our subscription."""
        own = self.presence()
        if self.fleet.apply(own.instance, own):
            self.membership_changed()
        self.sync_token = encode(own)
        self.publisher.presence(own)

    def republish(self) -> None:
        own = self.presence()
        self.sync_token = encode(own)
        self.publisher.presence(own)

    # -- the barrier ----------------------------------------------------------------------
    async def begin_sync(self) -> None:
        """A (re)connect: compare nothing until the broker replayed retained presences."""
        self.fleet.begin_sync()
        self.sync_generation += 1
        generation = self.sync_generation
        broker = self.config.broker
        assert broker is not None
        # Only bounds a broker that never echoes us (an ACL without read of our own
        # presence): then we stop waiting, loudly.
        asyncio.get_running_loop().call_later(
            max(10.0, broker.keepalive * 2.0), self.sync_timeout, generation
        )

    def sync_timeout(self, generation: int) -> None:
        if generation == self.sync_generation and not self.fleet.synced:
            log.warning("fleet.barrier_timeout", hint="our own presence never came back")
            self.end_sync()

    def end_sync(self) -> None:
        changed = self.fleet.end_sync()
        log.info("fleet.synced", changed=changed, members=len(self.fleet.presences()))
        self.synced.set()
        if changed:
            self.membership_changed()

    # -- the others -----------------------------------------------------------------------
    def on_presence(self, instance: str, payload: bytes, retain: bool = True) -> None:
        if instance == self.config.instance.id:
            self.on_own_presence(payload, retain)
            return
        valid, presence = _parsed(instance, payload)
        if not valid:
            return
        if self.fleet.apply(instance, presence):
            log.info(
                "fleet.changed",
                instance=instance,
                state=presence.state if presence else "cleared",
                online=self.fleet.online_count(),
            )
            self.membership_changed()
        else:
            self.fleet_woken.set()  # a member may have started resting: a new expiry

    def on_own_presence(self, payload: bytes, retain: bool) -> None:
        if not self.fleet.synced and not retain and payload == self.sync_token:
            self.end_sync()  # our echo: every retained presence was delivered before it
            return
        if self.stopping():
            return
        _, presence = _parsed(self.config.instance.id, payload)
        if presence is not None and presence.state == "online":
            if payload != self.sync_token:
                # Not what we said last (an older echo, or someone else with our account):
                # the retained presence must be ours.
                log.info("presence.own_corrected")
                self.republish()
            return
        if (
            presence is not None
            and presence.state == "leaving"
            and presence.since >= self.started_at
        ):
            # `deploy-agent leave` while we run: go, and say leaving as we do.
            log.warning("agent.leave_requested", since=presence.since.isoformat())
            self.leave()
            return
        # A Last Will (ours, late, or a previous run's), a stale leave or a cleared
        # presence: we are here, say so.
        self.republish()

    async def expiry(self) -> None:
        """Re-check ``member_timeout`` when the next resting member is due, or when a
        presence changed who is due."""
        while True:
            wait = self.fleet.next_expiry()
            self.fleet_woken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else wait + 0.05):
                    await self.fleet_woken.wait()
            if self.fleet.expire():
                log.info("fleet.member_expired", timeout=self.config.member_timeout)
                self.membership_changed()

    # -- changes and pins -----------------------------------------------------------------
    def membership_changed(self) -> None:
        self.save_pins()
        self.fleet_woken.set()
        self.reconfigure.trigger()

    def save_pins(self) -> None:
        pins = self.fleet.pins()
        if pins == self.saved_pins:
            return
        try:
            atomic_write(self.pins_path, json.dumps({"pins": pins}, sort_keys=True).encode())
        except OSError as exc:
            log.error("fleet.pins_not_saved", reason=str(exc))
            return
        self.saved_pins = pins


def load_pins(path: Path) -> dict[str, str]:
    """The service members this agent pinned before it restarted (none when unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("fleet.pins_unreadable", path=str(path), reason=str(exc))
        return {}
    pins = data.get("pins") if isinstance(data, dict) else None
    if not isinstance(pins, dict):
        return {}
    return {str(k): str(v) for k, v in pins.items() if isinstance(v, str)}


def _parsed(instance: str, payload: bytes) -> tuple[bool, Presence | None]:
    """(valid, presence): an empty payload is a cleared presence; an invalid one is logged."""
    if not payload:
        return True, None
    try:
        return True, parse_message(Presence, payload)
    except InvalidMessage as exc:
        log.warning("presence.invalid", instance=instance, reason=str(exc))
        return False, None
