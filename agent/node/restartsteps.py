"""The restart steps of one command (docs/architecture.md, "Restarts"): the clients'
rolling restart after a switch, and the ``restart`` and heal commands of the live release.

Split from ``agent/node/pipeline.py``: its ``_Run`` composes a ``RestartSteps``; the roll
itself is the ``Restarter``'s (``agent/node/restart.py``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from agent.core.errors import ReleaseError
from agent.core.outcome import Outcome
from agent.node.hooksteps import CommandRun
from agent.node.restart import write_programs

if TYPE_CHECKING:
    from agent.node.pipeline import Pipeline


class RestartSteps:
    """Restarts for one command; the pipeline gives the settings, layout and restarter."""

    def __init__(self, command: CommandRun, pipeline: Pipeline) -> None:
        self.command = command
        self.pipeline = pipeline

    async def services(self) -> dict[str, Any]:
        """The ZEO server, up (or restarted) as the clients' roll would make it, before a
        ``before_restart`` hook that needs the database; the roll then leaves it be."""
        return await self.clients(None, services_only=True)

    async def clients(
        self, delay: float | None, only: list[str] | None = None, *, services_only: bool = False
    ) -> dict[str, Any]:
        """The clients' rolling restart (``only`` these programs, when given)."""
        cfg = self.command.cfg
        settings = self.pipeline.settings()
        # The agent's supervisord programs for this app, read at the restart's reloadConfig.
        await asyncio.to_thread(
            write_programs,
            self.pipeline.config,
            self.command.app,
            settings,
            self.pipeline.layout(settings),
        )
        if self.pipeline.restarter is None:
            await self.command.phase(
                "restart", "skipped", "no supervisor configured: nothing restarted"
            )
            return {"skipped": True}
        if delay is None:
            delay = cfg.restart.restart_delay
        if delay is None:
            delay = settings.plone_instances.restart_delay
        if services_only:
            await self.command.phase("restart", "services", "the ZEO server first, as it must")
        else:
            await self.command.phase(
                "restart", "started", f"{cfg.restart.strategy} restart, delay {delay} s"
            )
        report = await self.pipeline.restarter.restart(
            app=self.command.app,
            config=cfg,
            layout=self.pipeline.layout(settings),
            restart_delay=delay,
            only=only,
            services_only=services_only,
        )
        if not services_only:
            await self.command.phase("restart", "done", "clients restarted", **report)
        return report

    async def restart(self, delay: float | None) -> Outcome:
        """A rolling restart of the live release, without building anything."""
        current = self.command.mgr.current()
        if current is None:
            raise ReleaseError(f"{self.command.app} is not deployed here yet: nothing to restart")
        outcome = Outcome.succeeded(
            "restart",
            self.command.app,
            f"clients of {current.name} restarted",
            revision=current.sha,
            release=current.name,
        )
        return outcome.with_details(restart=await self.clients(delay))

    async def stale(self) -> list[str]:
        """The clients not running the live release (``Restarter.stale``)."""
        if self.pipeline.restarter is None:
            return []
        return await self.pipeline.restarter.stale(
            app=self.command.app,
            config=self.command.cfg,
            layout=self.pipeline.layout(self.pipeline.settings()),
        )

    async def finish(
        self, sha: str, release: str, stale: list[str], delay: float | None
    ) -> Outcome:
        """The deploy's target is live, but these clients do not run it: restart them."""
        names = ", ".join(stale)
        await self.command.phase(
            "plan", "done", f"{sha[:12]} is live; {names} do not run it: finishing the restart"
        )
        report = await self.clients(delay, only=stale)
        return Outcome.succeeded(
            "deploy",
            self.command.app,
            f"{sha[:12]} was already live in {release}; restarted {names}, which did not run it",
            decision="unchanged",
            revision=sha,
            release=release,
        ).with_details(restart=report)

    async def heal(self) -> Outcome:
        current = self.command.mgr.current()
        if self.pipeline.restarter is None or current is None:
            return Outcome.unchanged("restart", self.command.app, "nothing to start again")
        started = await self.pipeline.restarter.heal(
            app=self.command.app,
            config=self.command.cfg,
            layout=self.pipeline.layout(self.pipeline.settings()),
        )
        where = {"revision": current.sha, "release": current.name}
        if not started:
            return Outcome.unchanged(
                "restart", self.command.app, "every program was running", **where
            )
        return Outcome.succeeded(
            "restart",
            self.command.app,
            f"started again: {', '.join(started)}",
            details={"started": started},
            **where,
        )
