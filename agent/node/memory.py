"""Release memory within a command (docs/architecture.md, "Release memory" and "Hooks"):
a release whose restart or post-switch hook failed is marked bad, ``restart.on_failure:
rollback`` puts the previous release back, and ``rollback`` skips bad releases unless
``--force`` names one.

Split from ``agent/node/pipeline.py``: its ``_Run`` composes a ``ReleaseMemory`` and hands
it the restart after a switch and the rollback command.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Protocol

from agent.adapters.hooks import HookContext
from agent.adapters.markers import ReleaseInfo
from agent.core.errors import AgentError, HookFailed, ReleaseError, RestartHalted
from agent.core.outcome import Outcome
from agent.node.hooksteps import CommandRun, HookSteps
from agent.node.restartsteps import RestartSteps


class SwitchingRun(CommandRun, Protocol):
    """A command that can switch ``current`` and restart the clients."""

    hooks: HookSteps
    restarts: RestartSteps

    async def switch(self, release: Path) -> ReleaseInfo: ...


class ReleaseMemory:
    """What one command remembers about releases, and what it undoes."""

    def __init__(self, command: SwitchingRun) -> None:
        self.command = command

    async def restart_or_recover(
        self,
        previous: ReleaseInfo | None,
        delay: float | None,
        outcome: Outcome,
        context: HookContext | None = None,
    ) -> Outcome:
        """``before_restart``, the clients' restart, ``after_restart``. A halted roll or a
        failed hook fails the deploy and marks the release bad; with ``on_failure:
        rollback`` the previous release is put back and what had been restarted is
        restarted again."""
        command = self.command
        release = outcome.release or ""
        report: dict[str, Any] | None = None
        redo: list[str] | None
        try:
            if context is not None:
                await self.before_restart(context)
            report = await command.restarts.clients(delay)
            if context is not None:
                await command.hooks.run("after_restart", context)
            return outcome.with_details(restart=report)
        except RestartHalted as exc:
            what = f"the restart halted: {exc}"
            failed = outcome.with_changes(status="failed", error=exc.code)
            await self.mark_bad(release, what)
            redo = [*exc.restarted, exc.program]
        except HookFailed as exc:
            what = str(exc)
            failed = outcome.with_changes(status="failed", error=exc.code)
            if report is not None:
                failed = failed.with_details(restart=report)
            await self.mark_bad(release, exc.args[0])
            redo = None if report is not None else []  # before_restart: nothing restarted
        except AgentError as exc:  # supervisord unreachable, say: the switch stands
            return outcome.with_changes(
                status="failed",
                error=exc.code,
                message=f"release {outcome.release} is live but the restart failed: {exc}",
            )
        if command.cfg.restart.on_failure != "rollback" or previous is None:
            return failed.with_changes(message=f"release {release} is live but {what}")
        await command.phase("rollback", "started", f"on_failure=rollback: back to {previous.name}")
        await command.switch(previous.path)
        if redo == []:
            again: dict[str, Any] = {"skipped": True}
        else:
            again = await command.restarts.clients(delay, only=redo)
        return failed.with_changes(
            message=f"release {release} failed ({what}); rolled back to {previous.name}",
            release=previous.name,
            revision=previous.sha,
        ).with_details(rollback_restart=again)

    async def before_restart(self, context: HookContext) -> None:
        """The ``before_restart`` hook, once the ZEO server is up: it may need the database
        (create the site, run upgrade steps). Nothing to run, nothing brought up early."""
        if self.command.hooks.has("before_restart", context):
            await self.command.restarts.services()
            await self.command.hooks.run("before_restart", context)

    async def mark_bad(self, release: str, reason: str) -> None:
        if not release:
            return
        mgr = self.command.mgr
        with contextlib.suppress(OSError, AgentError):
            await asyncio.to_thread(mgr.mark_bad, mgr.releases_dir / release, reason)

    async def rollback(self, to_release: str | None, force: bool = False) -> Outcome:
        """The rollback command: the newest good release before ``current``, or
        ``to_release``; a bad one only with ``force``."""
        command = self.command
        mgr = command.mgr
        current = mgr.current()
        target = await asyncio.to_thread(mgr.rollback_target, to_release, force=force)
        if target is None:
            raise ReleaseError(
                f"no release to roll back to for {command.app}: no good release before current"
            )
        if current is not None and target.name == current.name:
            return Outcome.unchanged(
                "rollback",
                command.app,
                f"{target.name} is already current",
                revision=target.sha,
                release=target.name,
            )
        context = command.hooks.context_for(
            "rollback", target.path, sha=target.sha, previous=current
        )
        await command.switch(target.path)
        outcome = Outcome.succeeded(
            "rollback",
            command.app,
            f"rolled back to {target.name} ({target.sha[:12]})",
            revision=target.sha,
            release=target.name,
        )
        # The same restart hooks as a deploy (DEPLOY_KIND=rollback); a failure marks the
        # target bad and fails the rollback, which goes no further back on its own.
        try:
            await self.before_restart(context)
            report = await command.restarts.clients(None)
            await command.hooks.run("after_restart", context)
        except RestartHalted as exc:
            await self.mark_bad(target.name, f"the restart halted: {exc}")
            raise
        except HookFailed as exc:
            await self.mark_bad(target.name, exc.args[0])
            raise
        return outcome.with_details(restart=report)
