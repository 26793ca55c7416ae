"""One deploy, rollback, configure or restart of an app on this host (docs/architecture.md,
"The deploy algorithm").

Each phase is its own small step; ``current`` is only ever touched by ``switch``, and only
after buildout succeeded, so a failure anywhere before it leaves the live site as it was.
One ``Pipeline`` serves a daemon's whole life; each command gets its own ``Progress`` port,
through which its phases reach the command's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from structlog.contextvars import bound_contextvars

from agent.adapters import buildoutcfg
from agent.adapters.buildout import run_buildout
from agent.adapters.files import atomic_write
from agent.adapters.hooks import HookContext, HookName, run_hook
from agent.adapters.host import HostFacts, app_lock
from agent.adapters.releases import ReleaseInfo, ReleaseManager
from agent.adapters.state import AppState, StateStore
from agent.core.config import AgentConfig, AppConfig
from agent.core.errors import AgentError, HookFailed, ReleaseError, RestartHalted
from agent.core.outcome import Outcome
from agent.core.plan import ClientLayout, Decision, Member, client_layout, decide
from agent.core.render import RenderInput, cache_dirs, render_deploy_cfg
from agent.core.stackconfig import StackSettings, stack_settings
from agent.node.restart import Restarter, write_programs

log = structlog.get_logger(__name__)


class Progress(Protocol):
    """Where a command's phases go (the daemon turns them into events)."""

    async def phase(
        self, name: str, status: str, message: str, details: Mapping[str, Any]
    ) -> None: ...


class NoProgress:
    """For callers with nobody to tell (``--local`` logs every phase anyway)."""

    async def phase(self, name: str, status: str, message: str, details: Mapping[str, Any]) -> None:
        return None


NO_PROGRESS = NoProgress()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Pipeline:
    """The deploy algorithm for the apps of one host.

    ``stack_config`` and ``members`` are read at each command, so a daemon's pipeline sees
    the newest signed stack configuration and membership without being rebuilt.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        store: StateStore | None = None,
        restarter: Restarter | None = None,
        members: Callable[[], tuple[Member, ...]] | None = None,
        stack_config: Callable[[], Mapping[str, Any]] | None = None,
        facts: HostFacts | None = None,
        pins: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.config = config
        self.store = store or StateStore(config.paths.state)
        self.restarter = restarter
        self.members = members or self.only_me
        self.stack_config = stack_config or (lambda: config.stack_config)
        self.facts = facts or HostFacts.probe()
        self.pins = pins or dict

    # -- inputs ---------------------------------------------------------------------------
    def only_me(self) -> tuple[Member, ...]:
        inst = self.config.instance
        return (Member(inst.id, inst.address, tuple(inst.layers)),)

    def settings(self) -> StackSettings:
        return stack_settings(dict(self.stack_config()))

    def manager(self, app: str) -> ReleaseManager:
        return ReleaseManager.of(self.config, app)

    def layout(self, settings: StackSettings) -> ClientLayout:
        return client_layout(
            settings.plone_instances,
            cpu_count=self.facts.cpu_count,
            memory_mb=self.facts.memory_mb,
            layers=self.config.instance.layers,
        )

    def render(self, app: str, sha: str, settings: StackSettings) -> bytes:
        """deploy.cfg for ``app`` at ``sha``; reads the base configuration's environment
        from the mirror (the same bytes for the same sha, so rendering stays
        deterministic)."""
        inst = self.config.instance
        cfg = self.config.app(app)
        base_config = cfg.buildout.config or settings.plone_instances.base_config
        mgr = self.manager(app)
        base_environment = buildoutcfg.environment(
            lambda path: mgr.read_file(sha, path), base_config
        )
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
                stack_config=dict(self.stack_config()),
                members=self.members(),
                base_config=cfg.buildout.config,
                base_environment=base_environment,
                shared_dirs=tuple(cfg.shared_dirs),
                pins=dict(self.pins()),
            )
        )

    # -- commands -------------------------------------------------------------------------
    async def deploy(
        self,
        app: str,
        *,
        revision: str | None = None,
        always_buildout: bool | None = None,
        restart_delay: float | None = None,
        progress: Progress = NO_PROGRESS,
    ) -> Outcome:
        run = _Run(self, app, progress)
        return await run.guarded(
            "deploy", lambda: run.deploy(revision, always_buildout, restart_delay)
        )

    async def rollback(
        self,
        app: str,
        *,
        to_release: str | None = None,
        force: bool = False,
        progress: Progress = NO_PROGRESS,
    ) -> Outcome:
        """Back to the newest good release before ``current``, or to ``to_release`` (a
        release name or a revision); a release marked bad only with ``force``."""
        run = _Run(self, app, progress)
        return await run.guarded("rollback", lambda: run.rollback(to_release, force))

    async def configure(self, app: str, *, progress: Progress = NO_PROGRESS) -> Outcome:
        run = _Run(self, app, progress)
        return await run.guarded("configure", run.configure)

    async def restart(
        self, app: str, *, restart_delay: float | None = None, progress: Progress = NO_PROGRESS
    ) -> Outcome:
        run = _Run(self, app, progress)
        return await run.guarded("restart", lambda: run.restart(restart_delay))

    async def heal(self, app: str, *, progress: Progress = NO_PROGRESS) -> Outcome:
        """Start again the app's programs that are not running (after a crash mid-roll)."""
        run = _Run(self, app, progress)
        return await run.guarded("restart", run.heal)


class _Run:
    """One command for one app: the steps, with the app's manager and the progress port.

    Long by count of steps, not by any one of them: each method is one phase.
    """

    def __init__(self, pipeline: Pipeline, app: str, progress: Progress) -> None:
        self.p = pipeline
        self.app = app
        self.progress = progress
        #: What this command's hooks are told; set once a release is known.
        self.context: HookContext | None = None

    @property
    def cfg(self) -> AppConfig:
        return self.p.config.app(self.app)

    @property
    def mgr(self) -> ReleaseManager:
        return self.p.manager(self.app)

    async def phase(self, name: str, status: str, message: str, **details: Any) -> None:
        log.info("pipeline.phase", phase=name, status=status, message=message, **details)
        await self.progress.phase(name, status, message, details)

    async def guarded(self, kind: str, body: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Every command ends in one Outcome and one summary event, even when it fails."""
        started = time.monotonic()
        with bound_contextvars(app=self.app, kind=kind):
            try:
                self.p.config.app(self.app)
                with app_lock(self.p.config.paths.root / self.app):
                    try:
                        outcome = await body()
                    except AgentError as exc:
                        outcome = Outcome.failed(kind, self.app, str(exc), error=exc.code)
                    if outcome.status == "failed":
                        outcome = await self.on_failure(kind, outcome)
            except AgentError as exc:
                outcome = Outcome.failed(kind, self.app, str(exc), error=exc.code)
            outcome = outcome.with_changes(seconds=round(time.monotonic() - started, 2))
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

    # -- hooks ----------------------------------------------------------------------------
    def hook_context(
        self,
        kind: str,
        release: Path,
        *,
        sha: str,
        previous: ReleaseInfo | None,
        decision: str = "",
    ) -> HookContext:
        self.context = HookContext(
            app=self.app,
            release=release.name,
            release_dir=release,
            kind=kind,
            previous_release=previous.name if previous else "",
            revision=sha,
            previous_revision=previous.sha if previous else "",
            decision=decision,
            layers=tuple(self.p.config.instance.layers),
        )
        return self.context

    async def hook(self, hook: HookName, context: HookContext) -> None:
        """Run one hook; a failure raises HookFailed (the caller decides what it undoes)."""
        steps = await run_hook(self.cfg.hooks, hook, context)
        if steps:
            await self.phase(f"hook:{hook}", "done", f"{hook}: {len(steps)} command(s) succeeded")

    async def on_failure(self, kind: str, outcome: Outcome) -> Outcome:
        """The ``on_failure`` hook, once per failed command, in the live release; its own
        failure is logged and added to the message, never in place of the first error."""
        try:
            live = await asyncio.to_thread(self.mgr.current)
        except AgentError:
            live = None
        base = self.context
        if live is not None:
            where, revision = live.path, live.sha
        elif base is not None and base.release_dir.is_dir():  # a first deploy: none is live
            where, revision = base.release_dir, base.revision
        else:
            return outcome
        context = HookContext(
            app=self.app,
            release=where.name,
            release_dir=where,
            kind=kind,
            previous_release=base.previous_release if base else "",
            revision=revision,
            previous_revision=base.previous_revision if base else "",
            decision=base.decision if base else (outcome.decision or ""),
            layers=tuple(self.p.config.instance.layers),
        )
        try:
            steps = await run_hook(
                self.cfg.hooks,
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
            await self.phase("hook:on_failure", "done", f"on_failure: {len(steps)} command(s) ran")
        return outcome

    # -- deploy ---------------------------------------------------------------------------
    async def deploy(
        self, revision: str | None, always_buildout: bool | None, restart_delay: float | None
    ) -> Outcome:
        cfg, mgr = self.cfg, self.mgr
        await self.phase("fetch", "started", f"fetching {cfg.repository}")
        await asyncio.to_thread(mgr.fetch)
        sha = await asyncio.to_thread(mgr.resolve, revision or cfg.revision, cfg.branch)
        await self.phase("fetch", "done", f"target revision {sha[:12]}", revision=sha)
        settings = self.p.settings()
        new_cfg = self.p.render(self.app, sha, settings)
        always = always_buildout
        if always is None:
            always = (
                cfg.always_buildout_on_deploy or settings.app(self.app).always_buildout_on_deploy
            )
        current = mgr.current()
        decision = decide(
            target_sha=sha,
            deployed_sha=current.sha if current else None,
            new_cfg=new_cfg,
            deployed_cfg=deployed_cfg(current),
            always_buildout=always,
        )
        if decision == "unchanged":
            assert current is not None
            return Outcome.unchanged(
                "deploy",
                self.app,
                f"{sha[:12]} is already live with the same deploy.cfg",
                decision=decision,
                revision=sha,
                release=current.name,
            )
        await self.phase("plan", "done", f"new release: {decision}", decision=decision)
        return await self.release_and_switch("deploy", sha, new_cfg, decision, restart_delay)

    async def release_and_switch(
        self, kind: str, sha: str, cfg_bytes: bytes, decision: Decision, delay: float | None
    ) -> Outcome:
        """Build a fresh release; only if that worked, switch, restart and prune."""
        mgr = self.mgr
        for cache in cache_dirs(mgr.app_dir).values():  # deploy.cfg points the clients here
            cache.mkdir(parents=True, exist_ok=True)
        self.forget_caches_of_another_database(mgr.app_dir)
        release = await asyncio.to_thread(mgr.new_release_dir)
        with bound_contextvars(release=release.name):
            previous = mgr.current()
            context = self.hook_context(
                kind, release, sha=sha, previous=previous, decision=decision
            )
            try:
                await self.build(release, sha, cfg_bytes, decision)
                await self.hook("before_switch", context)
            except BaseException as exc:
                reason = str(exc) if isinstance(exc, AgentError) else type(exc).__name__
                with contextlib.suppress(OSError, AgentError):
                    await asyncio.shield(asyncio.to_thread(mgr.mark_failed, release, reason))
                raise
            await self.switch(release)
            outcome = Outcome.succeeded(
                kind,
                self.app,
                f"{sha[:12]} live in release {release.name} ({decision})",
                decision=decision,
                revision=sha,
                release=release.name,
            )
            outcome = await self.restart_or_recover(previous, delay, outcome, context)
            pruned = await asyncio.to_thread(mgr.prune)
            if pruned:
                await self.phase(
                    "prune", "done", f"removed {len(pruned)} old release(s)", pruned=pruned
                )
            return outcome

    def forget_caches_of_another_database(self, app_dir: Path) -> None:
        """A ZEO server of this host about to create a new database (no Data.fs yet): the
        clients' persistent caches belong to another one, and a client whose cache is
        newer than its server never connects. They go before anything starts."""
        if "var/filestorage" not in self.cfg.shared_dirs:
            return
        zeo_layer = self.p.settings().plone_instances.zeo_layer
        if zeo_layer not in self.p.config.instance.layers:
            return
        if (app_dir / "shared" / "var" / "filestorage" / "Data.fs").exists():
            return
        stale = sorted(cache_dirs(app_dir)["zeo"].glob("*.zec*"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.warning("releases.stale_zeo_caches_removed", files=[p.name for p in stale])

    async def build(
        self, release: Path, sha: str, cfg_bytes: bytes, decision: str | None = None
    ) -> None:
        cfg, mgr = self.cfg, self.mgr
        await self.phase("checkout", "started", f"checking out {sha[:12]} into {release.name}")
        await asyncio.to_thread(mgr.checkout, release, sha)
        atomic_write(release / "deploy.cfg", cfg_bytes, mode=0o640)
        await self.phase("buildout", "started", "running bootstrap and buildout")
        seconds = await run_buildout(
            release,
            bootstrap=cfg.buildout.bootstrap,
            command=cfg.buildout.command,
            timeout=cfg.buildout.timeout,
            environment=cfg.buildout.environment,
            bootstrap_cache=mgr.shared_dir / "bootstrap" if cfg.buildout.reuse_bootstrap else None,
        )
        await self.phase(
            "buildout", "done", f"buildout succeeded in {seconds:.1f} s", seconds=round(seconds, 2)
        )
        await asyncio.to_thread(
            mgr.mark_complete, release, sha=sha, cfg_digest=digest(cfg_bytes), decision=decision
        )

    async def switch(self, release: Path) -> ReleaseInfo:
        mgr = self.mgr
        await asyncio.to_thread(mgr.switch, release)
        info = mgr.current()
        assert info is not None
        self.p.store.update_app(
            self.app,
            AppState(
                sha=info.sha,
                cfg_digest=info.cfg_digest,
                release=info.name,
                deployed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            ),
        )
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
        previous: ReleaseInfo | None,
        delay: float | None,
        outcome: Outcome,
        context: HookContext | None = None,
    ) -> Outcome:
        """``before_restart``, the clients' restart, ``after_restart``. A halted roll or a
        failed hook fails the deploy and marks the release bad; with ``on_failure:
        rollback`` the previous release is put back and what had been restarted is
        restarted again."""
        release = outcome.release or ""
        report: dict[str, Any] | None = None
        redo: list[str] | None
        try:
            if context is not None:
                await self.hook("before_restart", context)
            report = await self.restart_clients(delay)
            if context is not None:
                await self.hook("after_restart", context)
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
        if self.cfg.restart.on_failure != "rollback" or previous is None:
            return failed.with_changes(message=f"release {release} is live but {what}")
        await self.phase("rollback", "started", f"on_failure=rollback: back to {previous.name}")
        await self.switch(previous.path)
        if redo == []:
            again: dict[str, Any] = {"skipped": True}
        else:
            again = await self.restart_clients(delay, only=redo)
        return failed.with_changes(
            message=f"release {release} failed ({what}); rolled back to {previous.name}",
            release=previous.name,
            revision=previous.sha,
        ).with_details(rollback_restart=again)

    async def mark_bad(self, release: str, reason: str) -> None:
        if not release:
            return
        mgr = self.mgr
        with contextlib.suppress(OSError, AgentError):
            await asyncio.to_thread(mgr.mark_bad, mgr.releases_dir / release, reason)

    async def restart_clients(
        self, delay: float | None, only: list[str] | None = None
    ) -> dict[str, Any]:
        cfg = self.cfg
        settings = self.p.settings()
        # The agent's supervisord programs for this app, read at the restart's reloadConfig.
        await asyncio.to_thread(
            write_programs, self.p.config, self.app, settings, self.p.layout(settings)
        )
        if self.p.restarter is None:
            await self.phase("restart", "skipped", "no supervisor configured: nothing restarted")
            return {"skipped": True}
        if delay is None:
            delay = cfg.restart.restart_delay
        if delay is None:
            delay = settings.plone_instances.restart_delay
        await self.phase("restart", "started", f"{cfg.restart.strategy} restart, delay {delay} s")
        report = await self.p.restarter.restart(
            app=self.app,
            config=cfg,
            layout=self.p.layout(settings),
            restart_delay=delay,
            only=only,
        )
        await self.phase("restart", "done", "clients restarted", **report)
        return report

    # -- rollback, restart, heal, configure -------------------------------------------------
    async def rollback(self, to_release: str | None, force: bool = False) -> Outcome:
        mgr = self.mgr
        current = mgr.current()
        target = await asyncio.to_thread(mgr.rollback_target, to_release, force=force)
        if target is None:
            raise ReleaseError(
                f"no release to roll back to for {self.app}: no good release before current"
            )
        if current is not None and target.name == current.name:
            return Outcome.unchanged(
                "rollback",
                self.app,
                f"{target.name} is already current",
                revision=target.sha,
                release=target.name,
            )
        self.hook_context("rollback", target.path, sha=target.sha, previous=current)
        await self.switch(target.path)
        outcome = Outcome.succeeded(
            "rollback",
            self.app,
            f"rolled back to {target.name} ({target.sha[:12]})",
            revision=target.sha,
            release=target.name,
        )
        try:
            report = await self.restart_clients(None)
        except RestartHalted as exc:
            await self.mark_bad(target.name, f"the restart halted: {exc}")
            raise
        return outcome.with_details(restart=report)

    async def restart(self, delay: float | None) -> Outcome:
        """A rolling restart of the live release, without building anything."""
        current = self.mgr.current()
        if current is None:
            raise ReleaseError(f"{self.app} is not deployed here yet: nothing to restart")
        outcome = Outcome.succeeded(
            "restart",
            self.app,
            f"clients of {current.name} restarted",
            revision=current.sha,
            release=current.name,
        )
        return outcome.with_details(restart=await self.restart_clients(delay))

    async def heal(self) -> Outcome:
        current = self.mgr.current()
        if self.p.restarter is None or current is None:
            return Outcome.unchanged("restart", self.app, "nothing to start again")
        started = await self.p.restarter.heal(
            app=self.app, config=self.cfg, layout=self.p.layout(self.p.settings())
        )
        where = {"revision": current.sha, "release": current.name}
        if not started:
            return Outcome.unchanged("restart", self.app, "every program was running", **where)
        return Outcome.succeeded(
            "restart",
            self.app,
            f"started again: {', '.join(started)}",
            details={"started": started},
            **where,
        )

    async def configure(self) -> Outcome:
        """Re-render deploy.cfg for the live revision; a new release only if it changed."""
        current = self.mgr.current()
        if current is None:
            return Outcome.unchanged(
                "configure", self.app, f"{self.app} is not deployed here yet: nothing to configure"
            )
        new_cfg = self.p.render(self.app, current.sha, self.p.settings())
        if new_cfg == deployed_cfg(current):
            return Outcome.unchanged(
                "configure",
                self.app,
                "deploy.cfg unchanged",
                revision=current.sha,
                release=current.name,
            )
        await self.phase(
            "plan", "done", "deploy.cfg changed: new release", decision="config-changed"
        )
        return await self.release_and_switch(
            "configure", current.sha, new_cfg, "config-changed", None
        )


def deployed_cfg(current: ReleaseInfo | None) -> bytes | None:
    if current is None:
        return None
    try:
        return (current.path / "deploy.cfg").read_bytes()
    except OSError:
        return None
