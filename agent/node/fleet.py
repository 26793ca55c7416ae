"""The stack as this instance sees it, and the debounce that turns membership churn into
one reconfigure (docs/architecture.md, "Membership").

``Fleet`` is built from the retained ``P/instances/<id>`` presence messages. It tells the
daemon whether a message changed what rendered configuration depends on (which members'
endpoints count, where, in which layers, on which client ports, and which member serves
each single-server layer), so a presence republished for a new release, or an agent that
only stops, restarts or loses its broker connection, re-renders nothing.

The rules it keeps:

- An agent that is ``stopped`` or ``unreachable`` is not an instance that is gone: its
  endpoints keep counting for ``member_timeout``; only ``leaving`` takes them out at once.
  A non-online presence changes a known member's state, never its endpoints.
- A cleared retained presence (a broker that lost its store) is unknown, not gone.
- A claim to a layer counts only as far as the signed stack configuration's roster allows;
  a presence claiming more than that is refused whole.
- The member serving each service layer (ZEO server, Solr, Celery broker) is pinned once
  chosen, and changes only when it no longer counts and another one does.
- Between a (re)connect and the end of the broker's replay of retained presences
  (``begin_sync``/``end_sync``) nothing is compared: the view settles first.

``Debouncer`` waits for a burst of changes (an autoscaling group adding ten instances) to
settle before acting once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from agent.adapters.templates import build_context
from agent.core.plan import Member
from agent.core.stackconfig import Roster, StackSettings
from agent.protocol import ClientInfo, Presence
from agent.protocol.messages import RESTING_STATES

log = structlog.get_logger(__name__)

#: What one counting member contributes to rendered configuration:
#: (id, address, sorted layers, sorted (port, client name) pairs).
MemberKey = tuple[str, str, tuple[str, ...], tuple[tuple[int, str], ...]]
#: The counting members, then the pins as sorted (layer, member id) pairs.
Signature = tuple[tuple[MemberKey, ...], tuple[tuple[str, str], ...]]
DEFAULT_MEMBER_TIMEOUT = 1800.0


def state_of(presence: Presence) -> str:
    """The presence's state, with the ``offline`` of older agents read as unreachable."""
    return "unreachable" if presence.state == "offline" else presence.state


def _clients(presence: Presence) -> tuple[ClientInfo, ...]:
    return tuple(sorted(presence.clients, key=lambda c: (c.port, c.name)))


def service_layers(settings: StackSettings) -> tuple[str, ...]:
    plone = settings.plone_instances
    return tuple(dict.fromkeys((plone.zeo_layer, plone.solr_layer, plone.broker_layer)))


class Fleet:
    """Membership view of one stack from presence messages, this instance included.

    An instance always sees itself as online, from its own presence given here, before
    the broker echoes it and even when a stale Last Will of a previous run arrives late.
    A presence without an address cannot be rendered into anyone's configuration, so it
    does not count.
    """

    def __init__(
        self,
        own: Presence,
        *,
        member_timeout: float = DEFAULT_MEMBER_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        pins: Mapping[str, str] | None = None,
    ) -> None:
        self._own_id = own.instance
        self._presences: dict[str, Presence] = {own.instance: own}
        self._resting_since: dict[str, float] = {}
        self._member_timeout = member_timeout
        self._clock = clock
        self._roster: Roster | None = None
        self._roster_warned = False
        self._service_layers: tuple[str, ...] = service_layers(StackSettings())
        self._pins: dict[str, str] = dict(pins or {})
        self._synced = True
        self._acted: Signature = self.signature()

    @property
    def own_id(self) -> str:
        return self._own_id

    @property
    def synced(self) -> bool:
        return self._synced

    # -- inputs -----------------------------------------------------------------------------
    def configure(self, settings: StackSettings) -> bool:
        """Take the roster and the service layers of (new) stack settings.

        Returns True when that changed what rendered configuration depends on.
        """
        self._roster = settings.roster_view()
        self._service_layers = service_layers(settings)
        if self._roster is None and not self._roster_warned:
            self._roster_warned = True
            log.warning(
                "fleet.no_roster",
                hint="any instance may claim any layer: set stack_config.roster",
            )
        return self._settle("stack configuration")

    def apply(self, instance_id: str, presence: Presence | None) -> bool:
        """Record a presence (None: its retained message was cleared).

        Returns True when the membership that rendered configuration depends on changed
        (never while a sync is under way: ``end_sync`` says it then).
        """
        if presence is not None and presence.instance != instance_id:
            log.warning(
                "fleet.presence_mismatch", topic_instance=instance_id, claimed=presence.instance
            )
            return False
        if instance_id == self._own_id:
            if presence is None or presence.state != "online":
                # We are running, so this is the will or the clearing of an earlier run.
                log.info("fleet.own_offline_ignored", member=instance_id)
                return False
            self._presences[instance_id] = presence
            return self._settle(instance_id)
        if presence is None:
            if instance_id in self._presences:
                log.info("fleet.presence_cleared_kept", member=instance_id)
            return False
        accepted = self._accept(instance_id, presence)
        if accepted is None:
            return False
        previous = self._presences.get(instance_id)
        state = state_of(accepted)
        if previous is None or state_of(previous) != state:
            log.info("fleet.member_state", member=instance_id, state=state)
        self._track_rest(instance_id, state)
        self._presences[instance_id] = accepted
        return self._settle(instance_id)

    def begin_sync(self) -> None:
        """A (re)connect: the broker replays retained presences; compare nothing yet."""
        self._synced = False

    def end_sync(self) -> bool:
        """The replay is over; True when membership differs from what was last acted on."""
        self._synced = True
        return self._settle("sync")

    def expire(self) -> bool:
        """Re-check ``member_timeout``; True when a member's endpoints just stopped counting."""
        return self._settle("member_timeout")

    def next_expiry(self) -> float | None:
        """Seconds until the next stopped or unreachable member expires, or None."""
        now = self._clock()
        waits = [
            since + self._member_timeout - now
            for member, since in self._resting_since.items()
            if since + self._member_timeout > now and member in self._presences
        ]
        return max(0.0, min(waits)) if waits else None

    # -- views ------------------------------------------------------------------------------
    def is_online(self, instance_id: str) -> bool:
        """True when the instance's endpoints count (online, stopped or unreachable)."""
        presence = self._presences.get(instance_id)
        return presence is not None and self._counts(presence)

    def online_count(self) -> int:
        return sum(1 for p in self._presences.values() if self._counts(p))

    def members(self) -> tuple[Member, ...]:
        """Every known instance, counting or not, sorted by id."""
        return tuple(
            Member(
                id=p.instance,
                address=p.address or "",
                layers=self._layers(p),
                online=self._counts(p),
                state=state_of(p),
            )
            for p in self._sorted()
        )

    def own_member(self) -> Member:
        return next(m for m in self.members() if m.id == self._own_id)

    def pins(self) -> dict[str, str]:
        """Service layer -> the member id serving it (for rendering and persistence)."""
        return dict(self._pins)

    def clients(self) -> dict[str, tuple[ClientInfo, ...]]:
        """The ZEO clients each known instance announced, sorted by port."""
        return {p.instance: _clients(p) for p in self._sorted()}

    def presences(self) -> dict[str, Presence]:
        """The latest presence of every known instance, by id (for the status view)."""
        return {p.instance: p for p in self._sorted()}

    def signature(self) -> Signature:
        """A hashable digest of exactly what rendered configuration depends on."""
        members = tuple(
            (
                p.instance,
                p.address or "",
                self._layers(p),
                tuple((c.port, c.name) for c in _clients(p)),
            )
            for p in self._sorted()
            if self._counts(p)
        )
        return members, tuple(sorted(self._pins.items()))

    def template_context(self, *, stack: str, stack_config: Mapping[str, Any]) -> dict[str, Any]:
        """The context of the configured templates, from this view of the fleet."""
        return build_context(
            stack=stack,
            instance=self.own_member(),
            members=self.members(),
            clients=self.clients(),
            stack_config=stack_config,
        )

    # -- rules ------------------------------------------------------------------------------
    def _accept(self, instance_id: str, presence: Presence) -> Presence | None:
        """What to keep of a presence: a resting or leaving one changes only the state of
        a known member; an online one counts only when the roster gives it its claims."""
        previous = self._presences.get(instance_id)
        state = state_of(presence)
        if state != "online" and previous is not None:
            return previous.model_copy(update={"state": presence.state, "since": presence.since})
        if self._roster is not None:
            refused = self._roster.refused(instance_id, presence.address, presence.layers)
            if refused:
                log.warning(
                    "fleet.claim_refused",
                    member=instance_id,
                    address=presence.address,
                    refused_layers=refused,
                    kept="previous presence" if previous else "nothing",
                )
                return None
        return presence

    def _track_rest(self, instance_id: str, state: str) -> None:
        if state in RESTING_STATES:
            # Counted from when this agent first saw it resting: never expires early.
            self._resting_since.setdefault(instance_id, self._clock())
        else:
            self._resting_since.pop(instance_id, None)

    def _expired(self, instance_id: str) -> bool:
        since = self._resting_since.get(instance_id)
        return since is not None and self._clock() - since >= self._member_timeout

    def _counts(self, presence: Presence) -> bool:
        if presence.instance == self._own_id:
            return True
        state = state_of(presence)
        if not presence.address or state == "leaving":
            return False
        return state == "online" or (
            state in RESTING_STATES and not self._expired(presence.instance)
        )

    def _layers(self, presence: Presence) -> tuple[str, ...]:
        layers = set(presence.layers)
        if self._roster is not None and presence.instance != self._own_id:
            roster = self._roster
            layers = {x for x in layers if roster.allows(x, presence.instance, presence.address)}
        return tuple(sorted(layers))

    def _update_pins(self) -> None:
        counting = [p for p in self._sorted() if self._counts(p)]
        for layer in self._service_layers:
            holders = [p.instance for p in counting if layer in self._layers(p)]
            pinned = self._pins.get(layer)
            if pinned in holders or not holders:
                continue  # still serving, or nobody else to take over
            self._pins[layer] = holders[0]
            log.info("fleet.pinned", layer=layer, member=holders[0], previous=pinned)

    def _settle(self, cause: str) -> bool:
        if not self._synced:
            return False
        self._update_pins()
        signature = self.signature()
        if signature == self._acted:
            return False
        self._acted = signature
        log.info(
            "fleet.membership_changed",
            cause=cause,
            counting=self.online_count(),
            pins=self.pins(),
        )
        return True

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
