"""One deploy, rollback, configure or restart of an app on this host, emitting events.

Each phase is its own small step; ``current`` is only ever touched by ``switch``, and only
after buildout succeeded, so a failure anywhere before it leaves the live site as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil
import structlog
from structlog.contextvars import bound_contextvars

from agent.adapters.buildout import run_buildout
from agent.adapters.releases import ReleaseInfo, ReleaseManager
from agent.adapters.state import AppState, StateStore, atomic_write
from agent.core.config import AgentConfig, AppConfig
from agent.core.errors import AgentError, ReleaseError, RestartHalted
from agent.core.plan import ClientLayout, Decision, Member, client_layout, decide
from agent.core.render import RenderInput, render_deploy_cfg
from agent.core.stackconfig import StackSettings, stack_settings

log = structlog.get_logger(__name__)
Status = Literal["succeeded", "failed", "unchanged"]
#: ``emit(phase, status, message, details)``: progress for the daemon's event topic.
Emitter = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]


@dataclass
class Outcome:
    """The result record of one command for one app on this host (a value, never a raise)."""

    kind: str
    app: str
    status: Status
    message: str
    decision: Decision | None = None
    revision: str | None = None
    release: str | None = None
    error: str | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"


class Restarter(Protocol):
    """Fills the restart step (supervisord); ``only`` limits it to some programs."""

    async def restart(
        self,
        *,
        app: str,
        config: AppConfig,
        layout: ClientLayout,
        restart_delay: float,
        only: list[str] | None = None,
    ) -> dict[str, Any]: ...

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]: ...


@dataclass(frozen=True)
class HostFacts:
    cpu_count: int
    memory_mb: int

    @classmethod
    def probe(cls) -> HostFacts:
        return cls(
            cpu_count=psutil.cpu_count() or 1,
            memory_mb=psutil.virtual_memory().total // (1024 * 1024),
        )


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def app_lock(app_dir: Path) -> Iterator[None]:
    """One command per app at a time on this host, across processes (CLI and daemon)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    path = app_dir / ".deploy.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ReleaseError(f"another command is running on {app_dir.name} ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Pipeline:
    """The deploy algorithm of DESIGN.md for the apps of one host."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: StateStore | None = None,
        restarter: Restarter | None = None,
        members: Callable[[], tuple[Member, ...]] | None = None,
        stack_config: dict[str, Any] | None = None,
        facts: HostFacts | None = None,
        emit: Emitter | None = None,
    ) -> None:
        self.config = config
        self.store = store or StateStore(config.paths.state)
        self.restarter = restarter
        self.members = members or self.only_me
        self.stack_config = stack_config if stack_config is not None else config.stack_config
        self.facts = facts or HostFacts.probe()
        self.emit = emit

    # -- inputs ---------------------------------------------------------------------------
    def only_me(self) -> tuple[Member, ...]:
        inst = self.config.instance
        return (Member(inst.id, inst.address, tuple(inst.layers)),)

    def settings(self) -> StackSettings:
        return stack_settings(self.stack_config)

    def manager(self, app: str) -> ReleaseManager:
        cfg = self.config.app(app)
        return ReleaseManager(
            root=self.config.paths.root,
            app=app,
            repository=cfg.repository,
            keep_releases=cfg.keep_releases,
            shared_dirs=cfg.shared_dirs,
        )

    def layout(self, settings: StackSettings) -> ClientLayout:
        return client_layout(
            settings.plone_instances,
            cpu_count=self.facts.cpu_count,
            memory_mb=self.facts.memory_mb,
            layers=self.config.instance.layers,
        )

    def render(self, app: str, sha: str, settings: StackSettings) -> bytes:
        inst = self.config.instance
        return render_deploy_cfg(
            RenderInput(
                stack=self.config.stack,
                app=app,
                instance_id=inst.id,
                instance_address=inst.address,
                layers=tuple(inst.layers),
                revision=sha,
                app_root=self.config.paths.root / app,
                layout=self.layout(settings),
                settings=settings,
                stack_config=self.stack_config,
                members=self.members(),
                base_config=self.config.app(app).buildout.config,
            )
        )

    async def phase(self, name: str, status: str, message: str, **details: Any) -> None:
        log.info("pipeline.phase", phase=name, status=status, message=message, **details)
        if self.emit is not None:
            await self.emit(name, status, message, details)

    # -- commands -------------------------------------------------------------------------
    async def deploy(
        self,
        app: str,
        *,
        revision: str | None = None,
        always_buildout: bool | None = None,
        restart_delay: float | None = None,
    ) -> Outcome:
        return await self._run(
            "deploy",
            app,
            lambda: self._deploy(
                app, revision=revision, always_buildout=always_buildout, restart_delay=restart_delay
            ),
        )

    async def rollback(self, app: str, *, to_release: str | None = None) -> Outcome:
        return await self._run("rollback", app, lambda: self._rollback(app, to_release))

    async def configure(self, app: str) -> Outcome:
        return await self._run("configure", app, lambda: self._configure(app))

    async def restart(self, app: str, *, restart_delay: float | None = None) -> Outcome:
        return await self._run("restart", app, lambda: self._restart(app, restart_delay))

    async def heal(self, app: str) -> Outcome:
        """Start again the app's programs that are not running (after a crash mid-roll)."""
        return await self._run("restart", app, lambda: self._heal(app))

    async def _run(self, kind: str, app: str, body: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Every command ends in one Outcome and one summary event, even when it fails."""
        started = time.monotonic()
        with bound_contextvars(app=app, kind=kind):
            try:
                self.config.app(app)
                with app_lock(self.config.paths.root / app):
                    outcome = await body()
            except AgentError as exc:
                outcome = Outcome(
                    kind=kind, app=app, status="failed", message=str(exc), error=exc.code
                )
            outcome.seconds = round(time.monotonic() - started, 2)
            level = "error" if outcome.status == "failed" else "info"
            getattr(log, level)(
                "command.finished",
                status=outcome.status,
                message=outcome.message,
                decision=outcome.decision,
                revision=outcome.revision,
                release=outcome.release,
                error=outcome.error,
                seconds=outcome.seconds,
            )
            return outcome

    async def _deploy(
        self,
        app: str,
        *,
        revision: str | None,
        always_buildout: bool | None,
        restart_delay: float | None,
    ) -> Outcome:
        cfg = self.config.app(app)
        mgr = self.manager(app)
        await self.phase("fetch", "started", f"fetching {cfg.repository}")
        await asyncio.to_thread(mgr.fetch)
        sha = await asyncio.to_thread(mgr.resolve, revision or cfg.revision, cfg.branch)
        await self.phase("fetch", "done", f"target revision {sha[:12]}", revision=sha)
        settings = self.settings()
        new_cfg = self.render(app, sha, settings)
        always = always_buildout
        if always is None:
            always = cfg.always_buildout_on_deploy or settings.app(app).always_buildout_on_deploy
        current = mgr.current()
        decision = decide(
            target_sha=sha,
            deployed_sha=current.sha if current else None,
            new_cfg=new_cfg,
            deployed_cfg=self.deployed_cfg(current),
            always_buildout=always,
        )
        if decision == "unchanged":
            assert current is not None
            return Outcome(
                kind="deploy",
                app=app,
                status="unchanged",
                decision=decision,
                message=f"{sha[:12]} is already live with the same deploy.cfg",
                revision=sha,
                release=current.name,
            )
        await self.phase("plan", "done", f"new release: {decision}", decision=decision)
        return await self.release_and_switch(app, sha, new_cfg, decision, restart_delay)

    def deployed_cfg(self, current: ReleaseInfo | None) -> bytes | None:
        if current is None:
            return None
        try:
            return (current.path / "deploy.cfg").read_bytes()
        except OSError:
            return None

    async def release_and_switch(
        self, app: str, sha: str, deploy_cfg: bytes, decision: Decision, restart_delay: float | None
    ) -> Outcome:
        """Steps 4 and 5: build a fresh release; only if that worked, switch and restart."""
        cfg = self.config.app(app)
        mgr = self.manager(app)
        release = await asyncio.to_thread(mgr.new_release_dir)
        with bound_contextvars(release=release.name):
            try:
                await self.build(mgr, cfg, release, sha, deploy_cfg)
            except BaseException as exc:
                reason = str(exc) if isinstance(exc, AgentError) else type(exc).__name__
                with contextlib.suppress(OSError, AgentError):
                    await asyncio.shield(asyncio.to_thread(mgr.mark_failed, release, reason))
                raise
            previous = mgr.current()
            await self.switch(app, mgr, release)
            outcome = Outcome(
                kind="deploy",
                app=app,
                status="succeeded",
                decision=decision,
                revision=sha,
                release=release.name,
                message=f"{sha[:12]} live in release {release.name} ({decision})",
            )
            await self.restart_or_recover(app, mgr, previous, restart_delay, outcome)
            pruned = await asyncio.to_thread(mgr.prune)
            if pruned:
                await self.phase(
                    "prune", "done", f"removed {len(pruned)} old release(s)", pruned=pruned
                )
            return outcome

    async def build(
        self, mgr: ReleaseManager, cfg: AppConfig, release: Path, sha: str, deploy_cfg: bytes
    ) -> None:
        await self.phase("checkout", "started", f"checking out {sha[:12]} into {release.name}")
        await asyncio.to_thread(mgr.checkout, release, sha)
        atomic_write(release / "deploy.cfg", deploy_cfg, mode=0o640)
        await self.phase("buildout", "started", "running bootstrap and buildout")
        seconds = await run_buildout(
            release,
            bootstrap=cfg.buildout.bootstrap,
            command=cfg.buildout.command,
            timeout=cfg.buildout.timeout,
            environment=cfg.buildout.environment,
        )
        await self.phase(
            "buildout", "done", f"buildout succeeded in {seconds:.1f} s", seconds=round(seconds, 2)
        )
        await asyncio.to_thread(mgr.mark_complete, release, sha=sha, cfg_digest=digest(deploy_cfg))

    async def switch(self, app: str, mgr: ReleaseManager, release: Path) -> ReleaseInfo:
        await asyncio.to_thread(mgr.switch, release)
        info = mgr.current()
        assert info is not None
        state = self.store.load()
        state.apps[app] = AppState(
            sha=info.sha,
            cfg_digest=info.cfg_digest,
            release=info.name,
            deployed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.store.save(state)
        await self.phase(
            "switch",
            "done",
            f"current -> releases/{info.name}",
            release=info.name,
            revision=info.sha,
        )
        return info

    async def restart_or_recover(
        self,
        app: str,
        mgr: ReleaseManager,
        previous: ReleaseInfo | None,
        restart_delay: float | None,
        outcome: Outcome,
    ) -> None:
        """Restart the clients; a halted roll fails the deploy, and with ``on_failure:
        rollback`` puts the previous release back and restarts what had been restarted."""
        cfg = self.config.app(app)
        try:
            outcome.details["restart"] = await self.restart_clients(app, restart_delay)
        except RestartHalted as exc:
            outcome.status, outcome.error = "failed", exc.code
            outcome.message = f"release {outcome.release} is live but the restart halted: {exc}"
            if cfg.restart.on_failure != "rollback" or previous is None:
                return
            await self.phase("rollback", "started", f"on_failure=rollback: back to {previous.name}")
            await self.switch(app, mgr, previous.path)
            redo = [*exc.restarted, exc.program]
            outcome.details["rollback_restart"] = await self.restart_clients(
                app, restart_delay, only=redo
            )
            outcome.message += f"; rolled back to {previous.name}"
            outcome.release, outcome.revision = previous.name, previous.sha
        except AgentError as exc:  # supervisord unreachable, say: the switch stands
            outcome.status, outcome.error = "failed", exc.code
            outcome.message = f"release {outcome.release} is live but the restart failed: {exc}"

    async def restart_clients(
        self, app: str, restart_delay: float | None, only: list[str] | None = None
    ) -> dict[str, Any]:
        cfg = self.config.app(app)
        if self.restarter is None:
            await self.phase("restart", "skipped", "no supervisor configured: nothing restarted")
            return {"skipped": True}
        settings = self.settings()
        delay = restart_delay
        if delay is None:
            delay = cfg.restart.restart_delay
        if delay is None:
            delay = settings.plone_instances.restart_delay
        await self.phase("restart", "started", f"{cfg.restart.strategy} restart, delay {delay} s")
        report = await self.restarter.restart(
            app=app, config=cfg, layout=self.layout(settings), restart_delay=delay, only=only
        )
        await self.phase("restart", "done", "clients restarted", **report)
        return report

    async def _rollback(self, app: str, to_release: str | None) -> Outcome:
        mgr = self.manager(app)
        current = mgr.current()
        target = mgr.find(to_release) if to_release else mgr.previous()
        if target is None:
            raise ReleaseError(f"no release to roll back to for {app}: only one release exists")
        if current is not None and target.name == current.name:
            return Outcome(
                kind="rollback",
                app=app,
                status="unchanged",
                revision=target.sha,
                release=target.name,
                message=f"{target.name} is already current",
            )
        await self.switch(app, mgr, target.path)
        outcome = Outcome(
            kind="rollback",
            app=app,
            status="succeeded",
            revision=target.sha,
            release=target.name,
            message=f"rolled back to {target.name} ({target.sha[:12]})",
        )
        outcome.details["restart"] = await self.restart_clients(app, None)
        return outcome

    async def _restart(self, app: str, restart_delay: float | None) -> Outcome:
        """A rolling restart of the live release, without building anything."""
        current = self.manager(app).current()
        if current is None:
            raise ReleaseError(f"{app} is not deployed here yet: nothing to restart")
        outcome = Outcome(
            kind="restart",
            app=app,
            status="succeeded",
            revision=current.sha,
            release=current.name,
            message=f"clients of {current.name} restarted",
        )
        outcome.details["restart"] = await self.restart_clients(app, restart_delay)
        return outcome

    async def _heal(self, app: str) -> Outcome:
        current = self.manager(app).current()
        if self.restarter is None or current is None:
            return Outcome(
                kind="restart", app=app, status="unchanged", message="nothing to start again"
            )
        settings = self.settings()
        started = await self.restarter.heal(
            app=app, config=self.config.app(app), layout=self.layout(settings)
        )
        if not started:
            return Outcome(
                kind="restart",
                app=app,
                status="unchanged",
                revision=current.sha,
                release=current.name,
                message="every program was running",
            )
        return Outcome(
            kind="restart",
            app=app,
            status="succeeded",
            revision=current.sha,
            release=current.name,
            message=f"started again: {', '.join(started)}",
            details={"started": started},
        )

    async def _configure(self, app: str) -> Outcome:
        """Re-render deploy.cfg for the live revision; a new release only if it changed."""
        mgr = self.manager(app)
        current = mgr.current()
        if current is None:
            return Outcome(
                kind="configure",
                app=app,
                status="unchanged",
                message=f"{app} is not deployed here yet: nothing to configure",
            )
        new_cfg = self.render(app, current.sha, self.settings())
        if new_cfg == self.deployed_cfg(current):
            return Outcome(
                kind="configure",
                app=app,
                status="unchanged",
                revision=current.sha,
                release=current.name,
                message="deploy.cfg unchanged",
            )
        await self.phase(
            "plan", "done", "deploy.cfg changed: new release", decision="config-changed"
        )
        outcome = await self.release_and_switch(app, current.sha, new_cfg, "config-changed", None)
        outcome.kind = "configure"
        return outcome
