"""The health-gated restart (docs/architecture.md, "Restarts"), on top of
``agent.adapters.supervisor``.

Programs are restarted one at a time, or in waves of ``max_unavailable`` (stop, start,
RUNNING, health URL, ``restart_delay``);
supervisord configuration changes are applied one group at a time, as ``supervisorctl
update`` would but without taking every client down together. New groups that the patterns
do not cover (a ZEO server on a first deploy, say) are added first, as ``update`` would.
What to do is decided first, in ``agent.node.restartplan``; this module carries it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import structlog

from agent.adapters.balancer import drain, set_state, wait_in_service
from agent.adapters.health import PROBE_TIMEOUT, probe, wait_healthy, wait_listening
from agent.adapters.supervisor import ProcessInfo, SupervisorClient
from agent.core.errors import HealthCheckFailed, ProgramDidNotStart, RestartHalted
from agent.core.redact import strip_url_password as redact_url
from agent.node.restartplan import (
    Action,
    ProgramRestart,
    RestartPlan,
    RestartReport,
    Step,
    health_urls,
    plan_steps,
    unique,
    waves,
)

__all__ = ["ProgramRestart", "RestartPlan", "RestartReport", "restart_programs"]

log = structlog.get_logger(__name__)


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
    steps, removed, supporting = await plan_steps(client, plan)
    urls = health_urls(plan, steps)
    await _add_supporting(client, plan, supporting)
    roll = _roll if plan.strategy == "rolling" else _all_at_once
    try:
        done = await roll(client, plan, steps, urls)
    except RestartHalted as exc:
        log.warning("restart.halted", program=exc.program, restarted=exc.restarted)
        raise
    for group in unique(p.group for p in removed):
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


async def _stop_step(client: SupervisorClient, step: Step) -> None:
    if step.action == "restarted":
        for proc in step.programs:
            await client.stop(proc.namespec)
    elif step.action == "readded":
        await client.stop_group(step.group)
        await client.remove_group(step.group)


async def _start_step(client: SupervisorClient, step: Step) -> None:
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
        if plan.balancer is not None and proc.name not in plan.services:
            if plan.balancer.drain:
                await set_state(plan.balancer, [proc.name], "ready")
            await wait_in_service(plan.balancer, proc.name, deadline=deadline)
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


async def _roll(
    client: SupervisorClient, plan: RestartPlan, steps: Sequence[Step], urls: Mapping[str, str]
) -> list[ProgramRestart]:
    """One wave at a time (one step each with ``max_unavailable`` 1): its clients drained in
    the balancer, its steps stopped, then started, then all waited for; the first wave with a
    program that does not come up stops the roll."""
    done: list[ProgramRestart] = []
    for index, wave in enumerate(waves(plan, steps)):
        if index and plan.restart_delay:
            await asyncio.sleep(plan.restart_delay)
        drained = await _drain(plan, wave)
        try:
            done.extend(await _wave(client, plan, wave, urls, done))
        except BaseException:
            if drained and plan.balancer is not None:  # back later, it must get requests
                await asyncio.shield(set_state(plan.balancer, drained, "ready"))
            raise
    return done


async def _drain(plan: RestartPlan, wave: Sequence[Step]) -> list[str]:
    """Drain the wave's clients (not its services) in the balancer; the names drained."""
    if plan.balancer is None or not plan.balancer.drain:
        return []
    names = [p.name for step in wave for p in step.programs if p.name not in plan.services]
    names = [n for n in names if n in plan.balancer.servers]
    if names:
        await drain(plan.balancer, names)
    return names


async def _wave(
    client: SupervisorClient,
    plan: RestartPlan,
    wave: Sequence[Step],
    urls: Mapping[str, str],
    done: Sequence[ProgramRestart],
) -> list[ProgramRestart]:
    """Stop, start and wait for one wave; RestartHalted names what came back before it."""
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
            return [
                await _wait_up(
                    client, plan, proc, step.action, started=started, url=urls.get(proc.name)
                )
            ]
        except _Unhealthy as exc:
            raise _halted(exc, done, plan) from exc.cause
    results = await asyncio.gather(
        *(
            _wait_up(client, plan, proc, step.action, started=started, url=urls.get(proc.name))
            for step in wave
            for proc in step.programs
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, ProgramRestart)]
    failures = [r for r in results if isinstance(r, _Unhealthy)]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, _Unhealthy):
            raise result
    if failures:
        # The wave's other failures count as restarted: a rollback restarts them too.
        others = [f.name for f in failures[1:]]
        halted = _halted(failures[0], [*done, *ok], plan)
        halted.restarted = [*halted.restarted, *others]
        raise halted from failures[0].cause
    return ok


async def _all_at_once(
    client: SupervisorClient, plan: RestartPlan, steps: Sequence[Step], urls: Mapping[str, str]
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
