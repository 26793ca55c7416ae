"""The health-gated restart (docs/architecture.md, "Restarts"), on top of
``agent.adapters.supervisor``.

Programs are restarted one at a time, or in waves of ``max_unavailable`` (stop, start,
RUNNING, health URL, ``restart_delay``);
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

from agent.adapters.health import (
    PROBE_TIMEOUT,
    health_url_for,
    probe,
    wait_healthy,
    wait_listening,
)
from agent.adapters.supervisor import (
    ConfigDiff,
    ProcessInfo,
    SupervisorClient,
    match_programs,
    natural_key,
)
from agent.core.errors import ConfigError, HealthCheckFailed, ProgramDidNotStart, RestartHalted
from agent.core.redact import strip_url_password as redact_url

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
class _Step:
    """One unit of the roll: a process restarted, or a whole group re-added or added."""

    action: Action
    group: str
    programs: tuple[ProcessInfo, ...]  # pids are the ones from before the restart


class _Unhealthy(Exception):
    """Raised inside the roll for a program that did not come up; becomes RestartHalted."""

    def __init__(self, name: str, cause: Exception, seconds: float | None = None) -> None:
        self.name = name
        self.cause = cause
        self.seconds = seconds
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
        restarted=done,
        removed=[p.name for p in removed],
        seconds=time.monotonic() - started,
        supporting=list(supporting),
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
                    if proc.name in plan.listen:
                        await wait_listening(
                            plan.listen[proc.name],
                            timeout=max(0.0, deadline - time.monotonic()),
                        )
                except (ProgramDidNotStart, HealthCheckFailed) as exc:
                    raise RestartHalted(
                        f"{proc.name} (new in supervisord's configuration) did not start: {exc}",
                        program=proc.name,
                        restarted=[],
                    ) from exc
        log.info("restart.supporting_added", group=group)


async def _plan_steps(
    client: SupervisorClient, plan: RestartPlan
) -> tuple[list[_Step], list[ProcessInfo], list[str]]:
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
    steps: list[_Step] = []

    def step_for(proc: ProcessInfo, *, restart: bool) -> None:
        if any(step.group == proc.group for step in steps) or proc.group in diff.added:
            return
        if proc.group in diff.changed:
            steps.append(_Step("readded", proc.group, _members(configured, proc.group, before)))
        elif proc.group not in diff.removed and restart:
            steps.append(_Step("restarted", proc.group, (proc,)))

    for proc in sorted(services, key=lambda p: natural_key(p.name)):
        step_for(proc, restart=plan.services[proc.name])
    for proc in matched:
        if proc.namespec not in service_specs:
            step_for(proc, restart=True)
    for group in _unique(p.group for p in matched if p.group in diff.added):
        if all(p.namespec not in service_specs for p in new if p.group == group):
            steps.append(_Step("added", group, _members(configured, group, before)))
    wanted = {p.namespec for p in matched} | service_specs
    removed = [p for p in active if p.group in diff.removed and p.namespec in wanted]
    covered = {p.group for p in matched if p.namespec not in service_specs}
    first = _unique(p.group for p in services if p.group in diff.added)
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
    """Wait for RUNNING, then for the health URL and ``health_rise`` more healthy answers,
    all within one health_timeout."""
    deadline = started + plan.health_timeout
    try:
        info = await client.wait_running(
            proc.namespec, timeout=max(0.0, deadline - time.monotonic())
        )
        if proc.name in plan.listen:
            await wait_listening(
                plan.listen[proc.name], timeout=max(0.0, deadline - time.monotonic())
            )
        elif url is not None:
            await wait_healthy(url, timeout=max(0.0, deadline - time.monotonic()))
            await _rise(url, plan, deadline)
    except (ProgramDidNotStart, HealthCheckFailed) as exc:
        raise _Unhealthy(proc.name, exc, time.monotonic() - started) from exc
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


async def _rise(url: str, plan: RestartPlan, deadline: float) -> None:
    """``health_rise`` further consecutive healthy answers, ``health_interval`` apart.

    A load balancer puts a server back after its own ``rise`` successful checks, every
    ``inter``; a client that answered once may not be in the pool yet. Stopping the next
    client only after the restarted one kept answering for ``health_rise *
    health_interval`` seconds leaves the balancer time for those checks (for the shipped
    HAProxy template, ``inter 500ms rise 1``: one check, at most 0.5 s away; the default
    2 x 0.5 s leaves one interval to spare). An unhealthy answer starts the count again.
    """
    healthy = 0
    last_error = "no answer yet"
    while healthy < plan.health_rise:
        if time.monotonic() + plan.health_interval > deadline:
            safe = redact_url(url)
            raise HealthCheckFailed(
                f"{safe} answered, but not {plan.health_rise} more times in a row "
                f"{plan.health_interval:g} s apart within health_timeout "
                f"(got {healthy}; last: {last_error})",
                url=safe,
                last_error=f"not steadily healthy ({last_error})",
            )
        await asyncio.sleep(plan.health_interval)
        try:
            status = await probe(url, timeout=min(PROBE_TIMEOUT, plan.health_interval * 4))
        except (OSError, TimeoutError) as exc:
            healthy, last_error = 0, str(exc) or type(exc).__name__
            continue
        if 200 <= status < 400:
            healthy += 1
        else:
            healthy, last_error = 0, f"HTTP {status}"


def _why(failure: _Unhealthy) -> str:
    """What went wrong, in an operator's words: "no answer", "HTTP 503", "FATAL"..."""
    cause = failure.cause
    if isinstance(cause, HealthCheckFailed):
        last = cause.last_error
        if last.startswith(("HTTP ", "not steadily")):
            return f"answered {last}" if last.startswith("HTTP ") else last
        return f"no answer ({last})"
    return str(cause)


def _halted(
    failure: _Unhealthy, done: Sequence[ProgramRestart], plan: RestartPlan
) -> RestartHalted:
    names = [r.name for r in done]
    after = f" after {failure.seconds:.1f} s" if failure.seconds is not None else ""
    return RestartHalted(
        f"{failure.name} did not come back healthy: {_why(failure)}{after} "
        f"(health_timeout {plan.health_timeout:g} s). Restart halted; "
        f"restarted before it: {', '.join(names) or 'none'}",
        program=failure.name,
        restarted=names,
    )


def _waves(plan: RestartPlan, steps: Sequence[_Step]) -> list[list[_Step]]:
    """Steps grouped into waves of ``max_unavailable``; a service (the ZEO server) step is
    a wave of its own, so clients never go down together with their server."""
    waves: list[list[_Step]] = []
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


async def _roll(
    client: SupervisorClient, plan: RestartPlan, steps: Sequence[_Step], urls: Mapping[str, str]
) -> list[ProgramRestart]:
    """One wave at a time (one step each with ``max_unavailable`` 1): its steps stopped,
    then started, then all waited for; the first wave with a program that does not come
    up stops the roll."""
    done: list[ProgramRestart] = []
    for index, wave in enumerate(_waves(plan, steps)):
        if index and plan.restart_delay:
            await asyncio.sleep(plan.restart_delay)
        try:
            for step in wave:
                await _stop_step(client, step)
            started = time.monotonic()
            for step in wave:
                await _start_step(client, step)
        except _Unhealthy as exc:
            raise _halted(exc, done, plan) from exc.cause
        if len(wave) == 1 and len(wave[0].programs) == 1:
            step, proc = wave[0], wave[0].programs[0]
            try:
                done.append(
                    await _wait_up(
                        client, plan, proc, step.action, started=started, url=urls.get(proc.name)
                    )
                )
            except _Unhealthy as exc:
                raise _halted(exc, done, plan) from exc.cause
            continue
        results = await asyncio.gather(
            *(
                _wait_up(client, plan, proc, step.action, started=started, url=urls.get(proc.name))
                for step in wave
                for proc in step.programs
            ),
            return_exceptions=True,
        )
        done.extend(r for r in results if isinstance(r, ProgramRestart))
        failures = [r for r in results if isinstance(r, _Unhealthy)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _Unhealthy):
                raise result
        if failures:
            # The wave's other failures count as restarted: a rollback restarts them too.
            others = [f.name for f in failures[1:]]
            halted = _halted(failures[0], done, plan)
            halted.restarted = [*halted.restarted, *others]
            raise halted from failures[0].cause
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
