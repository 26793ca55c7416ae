"""One deploy, rollback, configure or restart of an app on this host (docs/architecture.md,
"The deploy algorithm").

Each phase is its own small step; ``current`` is only ever touched by ``switch``, and only
after buildout succeeded, so a failure anywhere before it leaves the live site as it was.
One ``Pipeline`` serves a daemon's whole life; each command gets its own ``Progress`` port,
through which its phases reach the command's events. A command's hook steps, restart
steps and release memory live in ``agent/node/hooksteps.py``, ``agent/node/restartsteps.py``
and ``agent/node/memory.py``; what is left here (a little over 400 lines) is the facade and
the deploy/configure phases, which read best together.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from structlog.contextvars import bound_contextvars

from agent.adapters import buildoutcfg
from agent.adapters.buildout import run_buildout
from agent.adapters.files import atomic_write
from agent.adapters.host import HostFacts, app_lock
from agent.adapters.markers import ReleaseInfo
from agent.adapters.releases import ReleaseManager
from agent.adapters.state import AppState, StateStore
from agent.core.config import AgentConfig, AppConfig
from agent.core.errors import AgentError
from agent.core.outcome import Outcome
from agent.core.plan import ClientLayout, Decision, Member, client_layout, decide
from agent.core.render import RenderInput, cache_dirs, render_deploy_cfg
from agent.core.stackconfig import StackSettings, stack_settings
from agent.node.hooksteps import HookSteps
from agent.node.memory import ReleaseMemory
from agent.node.restart import Restarter
from agent.node.restartsteps import RestartSteps

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

        def read(path: str) -> str | None:
            return mgr.read_file(sha, path)

        base_environment = buildoutcfg.environment(read, base_config)
        client_recipe = buildoutcfg.option_value(read, base_config, "client1", "recipe")
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
                client_recipe=client_recipe,
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
        return await run.guarded("rollback", lambda: run.memory.rollback(to_release, force))

    async def configure(self, app: str, *, progress: Progress = NO_PROGRESS) -> Outcome:
        run = _Run(self, app, progress)
        return await run.guarded("configure", run.configure)

    async def restart(
        self, app: str, *, restart_delay: float | None = None, progress: Progress = NO_PROGRESS
    ) -> Outcome:
        run = _Run(self, app, progress)
        return await run.guarded("restart", lambda: run.restarts.restart(restart_delay))

    async def heal(self, app: str, *, progress: Progress = NO_PROGRESS) -> Outcome:
        """Start again the app's programs that are not running (after a crash mid-roll)."""
        run = _Run(self, app, progress)
        return await run.guarded("restart", run.restarts.heal)


class _Run:
    """One command for one app: the orchestrator of its phases, with the app's manager and
    the progress port. Its hooks, restarts and release memory are parts it composes
    (``agent/node/hooksteps.py``, ``restartsteps.py``, ``memory.py``)."""

    def __init__(self, pipeline: Pipeline, app: str, progress: Progress) -> None:
        self.p = pipeline
        self.app = app
        self.progress = progress
        self.hooks = HookSteps(self)
        self.restarts = RestartSteps(self, pipeline)
        self.memory = ReleaseMemory(self)

    @property
    def cfg(self) -> AppConfig:
        return self.p.config.app(self.app)

    @property
    def mgr(self) -> ReleaseManager:
        return self.p.manager(self.app)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.p.config.instance.layers)

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
                        outcome = await self.hooks.on_failure(kind, outcome)
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
            stale = await self.restarts.stale()
            if stale:  # a restart that halted or was cut short: finish it
                return await self.restarts.finish(sha, current.name, stale, restart_delay)
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
        forget_caches_of_another_database(
            mgr.app_dir,
            shared_dirs=self.cfg.shared_dirs,
            zeo_layer=self.p.settings().plone_instances.zeo_layer,
            layers=self.layers,
        )
        release = await asyncio.to_thread(mgr.new_release_dir)
        with bound_contextvars(release=release.name):
            previous = mgr.current()
            context = self.hooks.context_for(
                kind, release, sha=sha, previous=previous, decision=decision
            )
            try:
                await self.build(release, sha, cfg_bytes, decision)
                await self.hooks.run("before_switch", context)
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
            outcome = await self.memory.restart_or_recover(previous, delay, outcome, context)
            pruned = await asyncio.to_thread(mgr.prune)
            if pruned:
                await self.phase(
                    "prune", "done", f"removed {len(pruned)} old release(s)", pruned=pruned
                )
            return outcome

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

    # -- configure (rollback: agent/node/memory.py; restarts: agent/node/restartsteps.py) --
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


def forget_caches_of_another_database(
    app_dir: Path, *, shared_dirs: Sequence[str], zeo_layer: str, layers: Sequence[str]
) -> None:
    """A ZEO server of this host about to create a new database (no Data.fs yet): the
    clients' persistent caches belong to another one, and a client whose cache is
    newer than its server never connects. They go before anything starts."""
    if "var/filestorage" not in shared_dirs:
        return
    if zeo_layer not in layers:
        return
    if (app_dir / "shared" / "var" / "filestorage" / "Data.fs").exists():
        return
    stale = sorted(cache_dirs(app_dir)["zeo"].glob("*.zec*"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("releases.stale_zeo_caches_removed", files=[p.name for p in stale])
