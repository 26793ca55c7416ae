"""Pure decisions: whether a deploy needs a new release, and how many ZEO clients to run.

No I/O here, so every branch is covered by fast unit tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.core.stackconfig import PloneInstances

#: The most ZEO clients one instance runs, whatever the CPU count says.
MAX_CLIENTS = 256
Decision = Literal["new-revision", "config-changed", "always-buildout", "unchanged"]


def decide(
    *,
    target_sha: str,
    deployed_sha: str | None,
    new_cfg: bytes,
    deployed_cfg: bytes | None,
    always_buildout: bool,
) -> Decision:
    """The decision (docs/architecture.md, "The deploy algorithm", step 3): a new release
    unless revision and deploy.cfg are both unchanged."""
    if target_sha != deployed_sha:
        return "new-revision"
    if new_cfg != deployed_cfg:
        return "config-changed"
    if always_buildout:
        return "always-buildout"
    return "unchanged"


@dataclass(frozen=True)
class ClientLayout:
    """The ZEO clients of one instance: ``client<n>`` on ``base_port + n``."""

    count: int
    base_port: int

    @property
    def names(self) -> list[str]:
        return [f"client{n}" for n in range(1, self.count + 1)]

    @property
    def ports(self) -> dict[str, int]:
        return {f"client{n}": self.base_port + n for n in range(1, self.count + 1)}


def client_count(settings: PloneInstances, *, cpu_count: int, memory_mb: int) -> int:
    """The cookbook's sizing: ``instance_count`` when given (an explicit count is honoured as
    it is), else ``ceil(cpu * per_cpu)``, at least one, and no more than fit in memory when
    ``client_memory_mb`` is set."""
    if settings.instance_count is not None:
        return settings.instance_count
    count = min(MAX_CLIENTS, max(1, math.ceil(cpu_count * settings.per_cpu)))
    if settings.client_memory_mb:
        count = min(count, max(1, memory_mb // settings.client_memory_mb))
    return count


def service_only(settings: PloneInstances, layers: Sequence[str]) -> bool:
    """True for an instance that only carries service layers (the ZEO server, Solr, the
    Celery broker): like the cookbook's database server, it runs no ZEO clients."""
    services = {settings.zeo_layer, settings.solr_layer, settings.broker_layer}
    return bool(layers) and set(layers) <= services


def client_layout(
    settings: PloneInstances, *, cpu_count: int, memory_mb: int, layers: Sequence[str] = ()
) -> ClientLayout:
    if service_only(settings, layers):
        return ClientLayout(count=0, base_port=settings.base_port)
    count = client_count(settings, cpu_count=cpu_count, memory_mb=memory_mb)
    return ClientLayout(count=count, base_port=settings.base_port)


@dataclass(frozen=True)
class Member:
    """One instance of the stack as seen through its presence message.

    ``online`` means "its endpoints count in rendered configuration": true while its agent
    is online, stopped or unreachable (within ``member_timeout``), false once it is
    leaving or expired. ``state`` is what its agent last said (docs/architecture.md,
    "Membership"), for templates and the status view.
    """

    id: str
    address: str
    layers: tuple[str, ...]
    online: bool = True
    state: str = "online"


def first_online(members: tuple[Member, ...] | list[Member], layer: str) -> Member | None:
    """The member the cookbook would pick for a single-server layer: first online by id."""
    candidates = sorted((m for m in members if m.online and layer in m.layers), key=lambda m: m.id)
    return candidates[0] if candidates else None


def service_member(
    members: tuple[Member, ...] | list[Member], layer: str, pins: Mapping[str, str]
) -> Member | None:
    """The member serving a single-server layer (ZEO server, Solr, Celery broker): the one
    the fleet pinned for that layer while it still counts, else the first by id. A pin
    keeps the choice stable when another member of the layer joins."""
    pinned = pins.get(layer)
    for member in members:
        if member.id == pinned and member.online and layer in member.layers:
            return member
    return first_online(members, layer)
