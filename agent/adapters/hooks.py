"""Deploy hooks: commands run at fixed points of a deploy (docs/architecture.md, "Hooks").

Two sources per hook, in this order: the app's configured commands
(``apps.<app>.hooks.<hook>``) and the repository's executable ``deploy/<hook>``. Each runs
in the release directory through buildout's ``run_step`` (own process group, timeout, output
streamed line by line as ``buildout.line`` events with step ``hook:<hook>[<i>]``), with the
agent's subprocess environment plus the ``DEPLOY_*`` variables of :class:`HookContext`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from agent.adapters.buildout import run_step, subprocess_env
from agent.core.config import HooksConfig
from agent.core.errors import BuildoutFailed, HookFailed

log = structlog.get_logger(__name__)

HookName = Literal["before_switch", "before_restart", "after_restart", "on_failure"]
HOOKS: tuple[HookName, ...] = ("before_switch", "before_restart", "after_restart", "on_failure")


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about the command it runs in (its ``DEPLOY_*`` variables)."""

    app: str
    release: str
    release_dir: Path
    kind: str
    previous_release: str = ""
    revision: str = ""
    previous_revision: str = ""
    decision: str = ""
    layers: tuple[str, ...] = ()

    def environment(self) -> dict[str, str]:
        return {
            "DEPLOY_APP": self.app,
            "DEPLOY_RELEASE": self.release,
            "DEPLOY_RELEASE_DIR": str(self.release_dir),
            "DEPLOY_PREVIOUS_RELEASE": self.previous_release,
            "DEPLOY_REVISION": self.revision,
            "DEPLOY_PREVIOUS_REVISION": self.previous_revision,
            "DEPLOY_DECISION": self.decision,
            "DEPLOY_LAYERS": " ".join(self.layers),
            "DEPLOY_KIND": self.kind,
        }


def hook_commands(hooks: HooksConfig, hook: HookName, release_dir: Path) -> list[list[str]]:
    """The configured commands of ``hook``, then ``deploy/<hook>`` of the release when it is
    an executable regular file (a symlink out of the release is not followed)."""
    commands = [list(argv) for argv in getattr(hooks, hook)]
    script = release_dir / "deploy" / hook
    if (
        not script.is_symlink()
        and not (release_dir / "deploy").is_symlink()
        and script.is_file()
        and os.access(script, os.X_OK)
    ):
        commands.append([str(script)])
    return commands


async def run_hook(
    hooks: HooksConfig,
    hook: HookName,
    context: HookContext,
    *,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """Run every command of ``hook`` in order; returns the step names that ran. The first
    failure stops the hook and raises :class:`HookFailed`."""
    commands = hook_commands(hooks, hook, context.release_dir)
    if not commands:
        return []
    env = subprocess_env({**(extra_env or {}), **context.environment()})
    steps = []
    for i, argv in enumerate(commands):
        step = f"hook:{hook}[{i}]"
        try:
            await run_step(argv, cwd=context.release_dir, step=step, timeout=hooks.timeout, env=env)
        except BuildoutFailed as exc:
            raise HookFailed(
                f"hook {hook}: {exc.args[0]}",
                hook=hook,
                step=step,
                returncode=exc.returncode,
                output_tail=exc.output_tail,
                timed_out=exc.timed_out,
            ) from exc
        steps.append(step)
    log.info("hook.done", hook=hook, steps=steps)
    return steps
