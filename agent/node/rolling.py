"""The health-gated restart (docs/architecture.md, "Restarts"), on top of
``agent.adapters.supervisor``.

Programs are restarted one at a time (stop, start, RUNNING, health URL, ``restart_delay``);
supervisord configuration changes are applied one group at a time, as ``supervisorctl
update`` would but without taking every client down together. New groups that the patterns
do not cover (a ZEO server on a first deploy, say) are added first, as ``update`` would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from agent.adapters.health import health_url_for, wait_healthy
from agent.adapters.supervisor import (
    ConfigDiff,
    ProcessInfo,
    SupervisorClient,
    match_programs,
    natural_key,
)
from agent.core.errors import ConfigError, HealthCheckFailed, ProgramDidNotStart, RestartHalted

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

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.programs, str) or not self.programs:
            problems.append("programs must be a non-empty list of names or globs")
        if self.strategy not in ("rolling", "all"):
            problems.append(f"strategy must be rolling or all, not {self.strategy!r}")
        if self.restart_delay < 0 or self.health_timeout <= 0:
            problems.append("restart_delay must be >= 0 and health_timeout > 0")
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


@dataclass(frozen=True)
class _Step:
    """One unit of the roll: a process restarted, or a whole group re-added or added."""

    action: Action
    group: str
    programs: tuple[ProcessInfo, ...]  # pids are the ones from before the restart


class _Unhealthy(Exception):
    """Raised inside the roll for a program that did not come up; becomes RestartHalted."""

    def __init__(self, name: str, cause: Exception) -> None:
        self.name = name
        self.cause = cause
        super().__init__(f"{name}: {cause}")


async def restart_programs(client: SupervisorClient, plan: RestartPlan) -> RestartReport:
    """Restart the plan's programs, health-gated; apply config changes group by group.

    Raises RestartHalted when a program does not come back RUNNING and healthy within
    ``health_timeout``: programs after it are not touched and keep serving.
    """
    started = time.monotonic()
    steps, removed, supporting = await _plan_steps(client, plan)
    urls = _health_urls(plan, steps)
    await _add_supporting(client, plan, supporting)
    roll = _roll if plan.strategy == "rolling" else _all_at_once
    try:
        done = await roll(client, plan, steps, urls)
    except RestartHalted as exc:
        log.warning("restart.halted", program=exc.program, restarted=exc.restarted)
        raise
    for group in _unique(p.group for p in removed):
        await client.stop_group(group)
        await client.remove_group(group)
        log.info("restart.removed", group=group)
    report = RestartReport(
        restarted=done, removed=[p.name for p in removed], seconds=time.monotonic() - started
    )
    log.info(
        "restart.done",
        strategy=plan.strategy,
        restarted=[r.name for r in done],
        removed=report.removed,
        seconds=round(report.seconds, 3),
    )
    return report


async def _add_supporting(
    client: SupervisorClient, plan: RestartPlan, groups: Sequence[str]
) -> None:
    """New groups outside the patterns (a ZEO server the clients need) come up first."""
    for group in groups:
        await client.add_group(group)
        deadline = time.monotonic() + plan.health_timeout
        for proc in await client.configured_processes():
            if proc.group == group:
                try:
                    await client.start(proc.namespec)
                    await client.wait_running(
                        proc.namespec, timeout=max(0.0, deadline - time.monotonic())
                    )
                except ProgramDidNotStart as exc:
                    raise RestartHalted(
                        f"{proc.name} (new in supervisord's configuration) did not start: {exc}",
                        program=proc.name,
                        restarted=[],
                    ) from exc
        log.info("restart.supporting_added", group=group)


async def _plan_steps(
    client: SupervisorClient, plan: RestartPlan
) -> tuple[list[_Step], list[ProcessInfo], list[str]]:
    """Order of work: existing programs (natural order), then new groups, then removals.

    Also returns the new groups that no pattern covers, added before the roll."""
    diff = await client.reload_config() if plan.reload_config else ConfigDiff()
    active = await client.list_processes()
    configured = await client.configured_processes() if diff.added or diff.changed else []
    new = [p for p in configured if p.group in diff.added]
    matched = match_programs(plan.programs, [*active, *new])
    before = {p.namespec: p for p in active}
    steps: list[_Step] = []
    for proc in matched:
        if proc.group in diff.changed:
            if all(step.group != proc.group for step in steps):
                members = _members(configured, proc.group, before)
                steps.append(_Step("readded", proc.group, members))
        elif proc.group not in diff.added and proc.group not in diff.removed:
            steps.append(_Step("restarted", proc.group, (proc,)))
    for group in _unique(p.group for p in matched if p.group in diff.added):
        steps.append(_Step("added", group, _members(configured, group, before)))
    removed = [p for p in active if p.group in diff.removed and p in matched]
    covered = {p.group for p in matched}
    supporting = sorted((g for g in diff.added if g not in covered), key=natural_key)
    return steps, removed, supporting


def _members(
    configured: Iterable[ProcessInfo], group: str, before: Mapping[str, ProcessInfo]
) -> tuple[ProcessInfo, ...]:
    """A group's processes in the new configuration, with their current pids if any."""
    members = [before.get(p.namespec, p) for p in configured if p.group == group]
    return tuple(sorted(members, key=lambda p: natural_key(p.name)))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _health_urls(plan: RestartPlan, steps: Sequence[_Step]) -> dict[str, str]:
    """Every program's health URL, resolved before anything is stopped (a bad template is
    a configuration error, and must not be found halfway through a roll). A program with
    no port (a celery worker among the clients) is healthy once RUNNING."""
    if plan.health_url is None:
        return {}
    urls = {}
    for step in steps:
        for proc in step.programs:
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


async def _stop_step(client: SupervisorClient, step: _Step) -> None:
    if step.action == "restarted":
        for proc in step.programs:
            await client.stop(proc.namespec)
    elif step.action == "readded":
        await client.stop_group(step.group)
        await client.remove_group(step.group)


async def _start_step(client: SupervisorClient, step: _Step) -> None:
    """Start the step's programs; an added group's autostart ones may already be starting."""
    if step.action != "restarted":
        await client.add_group(step.group)
    for proc in step.programs:
        try:
            await client.start(proc.namespec)
        except ProgramDidNotStart as exc:
            raise _Unhealthy(proc.name, exc) from exc


async def _wait_up(
    client: SupervisorClient,
    plan: RestartPlan,
    proc: ProcessInfo,
    action: Action,
    *,
    started: float,
    url: str | None,
) -> ProgramRestart:
    """Wait for RUNNING, then for the health URL, both within one health_timeout."""
    deadline = started + plan.health_timeout
    try:
        info = await client.wait_running(
            proc.namespec, timeout=max(0.0, deadline - time.monotonic())
        )
        if url is not None:
            await wait_healthy(url, timeout=max(0.0, deadline - time.monotonic()))
    except (ProgramDidNotStart, HealthCheckFailed) as exc:
        raise _Unhealthy(proc.name, exc) from exc
    result = ProgramRestart(
        name=proc.name,
        pid_before=proc.pid,
        pid_after=info.pid or 0,
        seconds_to_healthy=time.monotonic() - started,
        action=action,
    )
    log.info(
        "restart.program",
        program=result.name,
        action=action,
        pid_before=result.pid_before,
        pid_after=result.pid_after,
        seconds_to_healthy=round(result.seconds_to_healthy, 3),
    )
    return result


def _halted(
    failure: _Unhealthy, done: Sequence[ProgramRestart], plan: RestartPlan
) -> RestartHalted:
    names = [r.name for r in done]
    return RestartHalted(
        f"{failure.name} did not come back RUNNING and healthy within "
        f"{plan.health_timeout:g}s: {failure.cause}. Restart halted; "
        f"restarted before it: {', '.join(names) or 'none'}",
        program=failure.name,
        restarted=names,
    )


async def _roll(
    client: SupervisorClient, plan: RestartPlan, steps: Sequence[_Step], urls: Mapping[str, str]
) -> list[ProgramRestart]:
    """One step at a time; the first program that does not come up stops the roll."""
    done: list[ProgramRestart] = []
    for index, step in enumerate(steps):
        if index and plan.restart_delay:
            await asyncio.sleep(plan.restart_delay)
        try:
            await _stop_step(client, step)
            started = time.monotonic()
            await _start_step(client, step)
            for proc in step.programs:
                done.append(
                    await _wait_up(
                        client, plan, proc, step.action, started=started, url=urls.get(proc.name)
                    )
                )
        except _Unhealthy as exc:
            raise _halted(exc, done, plan) from exc.cause
    return done


async def _all_at_once(
    client: SupervisorClient, plan: RestartPlan, steps: Sequence[_Step], urls: Mapping[str, str]
) -> list[ProgramRestart]:
    """Stop all, start all, then wait for all (OpsWorks' way; a window with none serving)."""
    await asyncio.gather(*(_stop_step(client, step) for step in steps))
    started = time.monotonic()
    waits: list[Coroutine[Any, Any, ProgramRestart]] = []
    try:
        await asyncio.gather(*(_start_step(client, step) for step in steps))
    except _Unhealthy as exc:
        raise _halted(exc, [], plan) from exc.cause
    for step in steps:
        waits.extend(
            _wait_up(client, plan, proc, step.action, started=started, url=urls.get(proc.name))
            for proc in step.programs
        )
    results = await asyncio.gather(*waits, return_exceptions=True)
    done = [r for r in results if isinstance(r, ProgramRestart)]
    for result in results:
        if isinstance(result, _Unhealthy):
            raise _halted(result, done, plan) from result.cause
        if isinstance(result, BaseException):
            raise result
    return done
