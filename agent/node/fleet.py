"""The stack as this instance sees it, and the debounce that turns membership churn into
one reconfigure.

``Fleet`` is built from the retained ``P/instances/<id>`` presence messages. It tells the
daemon whether a message changed what rendered configuration depends on (who is online,
where, in which layers, on which client ports), so a presence republished for a new
release or timestamp does not re-render anything. ``Debouncer`` waits for a burst of such
changes (an autoscaling group adding ten instances) to settle before acting once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.adapters.templates import build_context
from agent.core.plan import Member
from agent.protocol import ClientInfo, Presence

log = structlog.get_logger(__name__)

#: What one online member contributes to rendered configuration:
#: (id, address, sorted layers, sorted (port, client name) pairs).
MemberKey = tuple[str, str, tuple[str, ...], tuple[tuple[int, str], ...]]
Signature = tuple[MemberKey, ...]


def _layers(presence: Presence) -> tuple[str, ...]:
    return tuple(sorted(set(presence.layers)))


def _clients(presence: Presence) -> tuple[ClientInfo, ...]:
    return tuple(sorted(presence.clients, key=lambda c: (c.port, c.name)))


class Fleet:
    """Membership view of one stack from presence messages, this instance included.

    An instance always sees itself as online, from its own presence given here, before
    the broker echoes it and even when a stale Last Will of a previous run arrives late.
    An online presence without an address cannot be rendered into anyone's
    configuration, so it counts as offline.
    """

    def __init__(self, own: Presence) -> None:
        self._own_id = own.instance
        self._presences: dict[str, Presence] = {own.instance: own}

    @property
    def own_id(self) -> str:
        return self._own_id

    def apply(self, instance_id: str, presence: Presence | None) -> bool:
        """Record a presence (None: its retained message was cleared).

        Returns True when the membership that rendered configuration depends on changed.
        """
        if presence is not None and presence.instance != instance_id:
            log.warning(
                "fleet.presence_mismatch", topic_instance=instance_id, claimed=presence.instance
            )
            return False
        if instance_id == self._own_id and (presence is None or presence.state != "online"):
            # We are running, so this is the will or the clearing of an earlier run.
            log.info("fleet.own_offline_ignored", member=instance_id)
            return False
        before = self.signature()
        if presence is None:
            self._presences.pop(instance_id, None)
        else:
            self._presences[instance_id] = presence
        changed = self.signature() != before
        if changed:
            log.info(
                "fleet.membership_changed",
                member=instance_id,
                state=presence.state if presence else "cleared",
                online=self.online_count(),
            )
        return changed

    def is_online(self, instance_id: str) -> bool:
        presence = self._presences.get(instance_id)
        return presence is not None and self._counts_online(presence)

    def online_count(self) -> int:
        return sum(1 for p in self._presences.values() if self._counts_online(p))

    def members(self) -> tuple[Member, ...]:
        """Every known instance, online or not, sorted by id."""
        return tuple(
            Member(
                id=p.instance,
                address=p.address or "",
                layers=_layers(p),
                online=self._counts_online(p),
            )
            for p in self._sorted()
        )

    def own_member(self) -> Member:
        return next(m for m in self.members() if m.id == self._own_id)

    def clients(self) -> dict[str, tuple[ClientInfo, ...]]:
        """The ZEO clients each known instance announced, sorted by port."""
        return {p.instance: _clients(p) for p in self._sorted()}

    def presences(self) -> dict[str, Presence]:
        """The latest presence of every known instance, by id (for the status view)."""
        return {p.instance: p for p in self._sorted()}

    def signature(self) -> Signature:
        """A hashable digest of exactly what rendered configuration depends on."""
        return tuple(
            (
                p.instance,
                p.address or "",
                _layers(p),
                tuple((c.port, c.name) for c in _clients(p)),
            )
            for p in self._sorted()
            if self._counts_online(p)
        )

    def template_context(self, *, stack: str, stack_config: Mapping[str, Any]) -> dict[str, Any]:
        """The context of the configured templates, from this view of the fleet."""
        return build_context(
            stack=stack,
            instance=self.own_member(),
            members=self.members(),
            clients=self.clients(),
            stack_config=stack_config,
        )

    def _counts_online(self, presence: Presence) -> bool:
        if presence.instance == self._own_id:
            return True
        return presence.state == "online" and bool(presence.address)

    def _sorted(self) -> list[Presence]:
        return [self._presences[key] for key in sorted(self._presences)]


class Debouncer:
    """Run ``action`` once, ``delay`` seconds after the last of a burst of triggers.

    Triggers that arrive while the action runs cause exactly one more run after it. The
    action's exceptions are logged and never stop the debouncer; cancellation is not
    swallowed. The debouncer owns its task: ``close()`` cancels it and waits for it.
    """

    def __init__(
        self, delay: float, action: Callable[[], Awaitable[None]], *, name: str = "debounce"
    ) -> None:
        if delay < 0:
            raise ValueError("delay must not be negative")
        self.delay = delay
        self._action = action
        self._name = name
        self._deadline: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.runs = 0

    @property
    def pending(self) -> bool:
        """True while a run is scheduled or running."""
        return self._task is not None and not self._task.done()

    def trigger(self) -> None:
        """Schedule a run ``delay`` seconds from now, replacing any run not yet started.

        Must be called from the event loop's thread. A no-op once closed.
        """
        if self._closed:
            log.debug("debounce.closed_trigger_ignored", debouncer=self._name)
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.delay
        if not self.pending:
            self._task = loop.create_task(self._run(), name=f"debouncer-{self._name}")

    async def wait_idle(self) -> None:
        """Wait until no run is scheduled or running (a test and shutdown helper)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def close(self) -> None:
        """Drop any scheduled run, cancel a running one and wait for it to end."""
        self._closed = True
        self._deadline = None
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        if task is not asyncio.current_task():
            # asyncio.wait neither raises the task's CancelledError nor swallows our own.
            await asyncio.wait({task})

    async def __aenter__(self) -> Debouncer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._deadline is not None:
            remaining = self._deadline - loop.time()
            if remaining > 0:
                # A trigger during the sleep moves the deadline; the loop sleeps again.
                await asyncio.sleep(remaining)
                continue
            self._deadline = None
            await self._run_action()

    async def _run_action(self) -> None:
        self.runs += 1
        try:
            await self._action()
        except Exception:
            log.exception("debounce.action_failed", debouncer=self._name)
