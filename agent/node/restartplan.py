"""What a restart will do, decided before anything is stopped (docs/architecture.md,
"Restarts"): the plan's settings, the steps in order (services, then the programs in the
patterns' order, re-added or added groups where supervisord's configuration changed), the
waves of ``max_unavailable``, and every health URL. ``agent.node.rolling`` carries it out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog

from agent.adapters.balancer import BalancerGate
from agent.adapters.health import health_url_for
from agent.adapters.supervisor import (
    ConfigDiff,
    ProcessInfo,
    SupervisorClient,
    match_programs,
    natural_key,
)
from agent.core.errors import ConfigError

log = structlog.get_logger(__name__)

Action = Literal["restarted", "added", "readded"]


@dataclass(frozen=True, kw_only=True)
class RestartPlan:
    """What to restart and how; built from an app's ``restart`` configuration."""

    programs: Sequence[str]
    strategy: Literal["rolling", "all"] = "rolling"
    restart_delay: float = 0.0
    health_url: str | None = None
    health_timeout: float = 60.0
    ports: Mapping[str, int] = field(default_factory=dict)
    reload_config: bool = True
    #: After the first healthy answer: this many more, ``health_interval`` s apart.
    health_rise: int = 2
    health_interval: float = 0.5
    #: Rolling: programs restarted together in one wave (services always alone).
    max_unavailable: int = 1
    #: Programs the clients depend on (the ZEO server), by name: handled before the roll,
    #: and restarted only when the value is True (what they run changed, or they are not
    #: running). A changed section is re-added and a new one added first, whatever it says.
    services: Mapping[str, bool] = field(default_factory=dict)
    #: Programs that are up when they accept TCP connections at ``host:port`` (the ZEO
    #: server at its address), checked after RUNNING instead of a health URL.
    listen: Mapping[str, str] = field(default_factory=dict)
    #: HAProxy's view, waited for after the health URL (``restart.balancer``).
    balancer: BalancerGate | None = None
    #: Only the services (the ZEO server brought up or restarted as it must): the phase
    #: before the ``before_restart`` hook, which may need the database.
    services_only: bool = False

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.programs, str) or not self.programs:
            problems.append("programs must be a non-empty list of names or globs")
        if self.strategy not in ("rolling", "all"):
            problems.append(f"strategy must be rolling or all, not {self.strategy!r}")
        if self.restart_delay < 0 or self.health_timeout <= 0:
            problems.append("restart_delay must be >= 0 and health_timeout > 0")
        if self.max_unavailable < 1:
            problems.append("max_unavailable must be at least 1")
        if self.health_rise < 0 or self.health_interval <= 0:
            problems.append("health_rise must be >= 0 and health_interval > 0")
        if problems:
            raise ConfigError("invalid restart plan", problems)


@dataclass(frozen=True, kw_only=True)
class ProgramRestart:
    """One program brought (back) up: the pids prove it is a new process."""

    name: str
    pid_before: int | None
    pid_after: int
    seconds_to_healthy: float
    action: Action


@dataclass(frozen=True, kw_only=True)
class RestartReport:
    """The outcome of a whole restart, in the order it happened."""

    restarted: list[ProgramRestart]
    removed: list[str]
    seconds: float
    #: New service groups (a ZEO server on a first deploy) started before the roll.
    supporting: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """One unit of the roll: a process restarted, or a whole group re-added or added."""

    action: Action
    group: str
    programs: tuple[ProcessInfo, ...]  # pids are the ones from before the restart


async def plan_steps(
    client: SupervisorClient, plan: RestartPlan
) -> tuple[list[Step], list[ProcessInfo], list[str]]:
    """Order of work: services first (the ZEO server, only when it must), then the
    programs in the order of ``plan.programs`` (each entry's matches in natural order,
    whether restarted, re-added or added), then removals.

    Also returns the new groups added and started before the roll: new services, and new
    groups that no pattern covers (what the clients need, as ``supervisorctl update``)."""
    diff = await client.reload_config() if plan.reload_config else ConfigDiff()
    active = await client.list_processes()
    configured = await client.configured_processes() if diff.added or diff.changed else []
    new = [p for p in configured if p.group in diff.added]
    candidates = [*active, *new]
    matched = order_programs(plan.programs, candidates)
    services = [p for p in candidates if p.name in plan.services]
    service_specs = {p.namespec for p in services}
    before = {p.namespec: p for p in active}
    steps: list[Step] = []

    def step_for(proc: ProcessInfo, *, restart: bool) -> None:
        if any(step.group == proc.group for step in steps) or proc.group in diff.added:
            return
        if proc.group in diff.changed:
            steps.append(Step("readded", proc.group, members(configured, proc.group, before)))
        elif proc.group not in diff.removed and restart:
            steps.append(Step("restarted", proc.group, (proc,)))

    for proc in sorted(services, key=lambda p: natural_key(p.name)):
        step_for(proc, restart=plan.services[proc.name])
    for proc in matched:
        if proc.namespec not in service_specs:
            step_for(proc, restart=True)
    for group in unique(p.group for p in matched if p.group in diff.added):
        if all(p.namespec not in service_specs for p in new if p.group == group):
            steps.append(Step("added", group, members(configured, group, before)))
    wanted = {p.namespec for p in matched} | service_specs
    removed = [p for p in active if p.group in diff.removed and p.namespec in wanted]
    covered = {p.group for p in matched if p.namespec not in service_specs}
    first = unique(p.group for p in services if p.group in diff.added)
    if plan.services_only:
        groups = {p.group for p in services}
        return [step for step in steps if step.group in groups], [], first
    others = sorted((g for g in diff.added if g not in covered and g not in first), key=natural_key)
    return steps, removed, [*first, *others]


def order_programs(patterns: Sequence[str], processes: Iterable[ProcessInfo]) -> list[ProcessInfo]:
    """The processes the patterns name, in the patterns' order; natural order within one
    entry (``[zeoserver, "client*"]``: zeoserver, client1, client2, client10). A process
    matched by several entries comes at its first. A pattern matching nothing is an
    error (``match_programs`` says which)."""
    candidates = list(processes)
    ordered: dict[str, ProcessInfo] = {}
    for pattern in patterns:
        for proc in match_programs([pattern], candidates):
            ordered.setdefault(proc.namespec, proc)
    return list(ordered.values())


def members(
    configured: Iterable[ProcessInfo], group: str, before: Mapping[str, ProcessInfo]
) -> tuple[ProcessInfo, ...]:
    """A group's processes in the new configuration, with their current pids if any."""
    members = [before.get(p.namespec, p) for p in configured if p.group == group]
    return tuple(sorted(members, key=lambda p: natural_key(p.name)))


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def health_urls(plan: RestartPlan, steps: Sequence[Step]) -> dict[str, str]:
    """Every program's health URL, resolved before anything is stopped (a bad template is
    a configuration error, and must not be found halfway through a roll). A program with
    no port (a celery worker among the clients) is healthy once RUNNING."""
    if plan.health_url is None:
        return {}
    urls = {}
    for step in steps:
        for proc in step.programs:
            if proc.name in plan.services:
                continue  # a ZEO server speaks no HTTP: RUNNING is its check
            port = plan.ports.get(proc.name)
            if port is None and "{port}" in plan.health_url:
                log.info(
                    "restart.no_health_url",
                    program=proc.name,
                    reason="no port known for it: RUNNING is its health check",
                )
                continue
            urls[proc.name] = health_url_for(plan.health_url, name=proc.name, port=port)
    return urls


def waves(plan: RestartPlan, steps: Sequence[Step]) -> list[list[Step]]:
    """Steps grouped into waves of ``max_unavailable``; a service (the ZEO server) step is
    a wave of its own, so clients never go down together with their server."""
    waves: list[list[Step]] = []
    for step in steps:
        service = any(p.name in plan.services for p in step.programs)
        last = waves[-1] if waves else None
        if (
            service
            or last is None
            or len(last) >= plan.max_unavailable
            or any(p.name in plan.services for s in last for p in s.programs)
        ):
            waves.append([step])
        else:
            last.append(step)
    return waves
