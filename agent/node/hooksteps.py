"""The hooks of one command (docs/architecture.md, "Hooks"): what they are told, one hook
run as a phase, and ``on_failure`` once per failed command.

Split from ``agent/node/pipeline.py``: its ``_Run`` orchestrates the phases, decides which
hook runs when, and composes a ``HookSteps`` to run them.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.adapters.hooks import HookContext, HookName, hook_commands, run_hook
from agent.adapters.markers import ReleaseInfo
from agent.adapters.releases import ReleaseManager
from agent.core.config import AppConfig
from agent.core.errors import AgentError, HookFailed
from agent.core.outcome import Outcome

log = structlog.get_logger(__name__)


class CommandRun(Protocol):
    """What a command's steps need from it (``agent/node/pipeline.py: _Run``)."""

    app: str

    @property
    def cfg(self) -> AppConfig: ...

    @property
    def mgr(self) -> ReleaseManager: ...

    @property
    def layers(self) -> tuple[str, ...]: ...

    async def phase(self, name: str, status: str, message: str, **details: Any) -> None: ...


class HookSteps:
    """One command's hooks; ``context`` is what they are told, set once a release is known."""

    def __init__(self, command: CommandRun) -> None:
        self.command = command
        self.context: HookContext | None = None

    def context_for(
        self,
        kind: str,
        release: Path,
        *,
        sha: str,
        previous: ReleaseInfo | None,
        decision: str = "",
    ) -> HookContext:
        self.context = HookContext(
            app=self.command.app,
            release=release.name,
            release_dir=release,
            kind=kind,
            previous_release=previous.name if previous else "",
            revision=sha,
            previous_revision=previous.sha if previous else "",
            decision=decision,
            layers=self.command.layers,
        )
        return self.context

    def has(self, hook: HookName, context: HookContext) -> bool:
        """Whether ``hook`` has anything to run for this release."""
        return bool(hook_commands(self.command.cfg.hooks, hook, context.release_dir))

    async def run(self, hook: HookName, context: HookContext) -> None:
        """Run one hook; a failure raises HookFailed (the caller decides what it undoes)."""
        steps = await run_hook(self.command.cfg.hooks, hook, context)
        if steps:
            await self.command.phase(
                f"hook.{hook}", "done", f"{hook}: {len(steps)} command(s) succeeded"
            )

    async def on_failure(self, kind: str, outcome: Outcome) -> Outcome:
        """The ``on_failure`` hook, once per failed command, in the live release; its own
        failure is logged and added to the message, never in place of the first error."""
        try:
            live = await asyncio.to_thread(self.command.mgr.current)
        except AgentError:
            live = None
        base = self.context
        if live is not None:
            where, revision = live.path, live.sha
        elif base is not None and base.release_dir.is_dir():  # a first deploy: none is live
            where, revision = base.release_dir, base.revision
        else:
            return outcome
        if base is not None:  # the failed release's context, run where the site lives
            context = replace(
                base, release=where.name, release_dir=where, kind=kind, revision=revision
            )
        else:
            context = HookContext(
                app=self.command.app,
                release=where.name,
                release_dir=where,
                kind=kind,
                revision=revision,
                decision=outcome.decision or "",
                layers=self.command.layers,
            )
        try:
            steps = await run_hook(
                self.command.cfg.hooks,
                "on_failure",
                context,
                extra_env={
                    "DEPLOY_ERROR": outcome.error or "",
                    "DEPLOY_FAILED_RELEASE": base.release if base else "",
                },
            )
        except HookFailed as exc:
            log.error("hook.on_failure_failed", error=str(exc))
            return outcome.with_changes(
                message=f"{outcome.message}; the on_failure hook failed too: {exc.args[0]}"
            )
        if steps:
            await self.command.phase(
                "hook.on_failure", "done", f"on_failure: {len(steps)} command(s) ran"
            )
        return outcome
