"""The pipeline's restart step: the ``Restarter`` port, and its supervisord implementation
(the app's restart settings become a ``RestartPlan`` for ``agent.node.rolling``).

Also the programs the agent writes for supervisord (``<root>/<app>/supervisor.conf``,
rendered by ``agent.core.programs``), and the record of the release each program was
started from (``<root>/<app>/.programs.json``), which decides whether the ZEO server must
be restarted and which releases prune must keep.
"""

from __future__ import annotations

import configparser
import contextlib
import fnmatch
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog

from agent.adapters.balancer import BalancerGate
from agent.adapters.configfile import read_secret
from agent.adapters.files import atomic_write
from agent.adapters.releases import ReleaseManager
from agent.adapters.supervisor import ProcessInfo, SupervisorClient
from agent.core.config import AgentConfig, AppConfig, SupervisorConfig
from agent.core.errors import ConfigError, ReleaseError, RestartHalted
from agent.core.plan import ClientLayout
from agent.core.programs import ProgramsInput, render_programs
from agent.core.stackconfig import StackSettings
from agent.node.rolling import RestartPlan, RestartReport, restart_programs

log = structlog.get_logger(__name__)

PROGRAMS_CONF = "supervisor.conf"


class Restarter(Protocol):
    """Fills the restart step; ``only`` limits it to some programs. Fast tests pass a fake."""

    async def restart(
        self,
        *,
        app: str,
        config: AppConfig,
        layout: ClientLayout,
        restart_delay: float,
        only: list[str] | None = None,
        services_only: bool = False,
    ) -> dict[str, Any]: ...

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]: ...

    async def stale(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]: ...


def write_programs(
    config: AgentConfig, app: str, settings: StackSettings, layout: ClientLayout
) -> Path | None:
    """Write ``<root>/<app>/supervisor.conf`` (atomically, only when its bytes change) for
    an app with ``programs.generate``; its path, or None when the buildout writes its own.

    supervisord reads it at the next ``reloadConfig``, which the restart step calls."""
    cfg = config.app(app)
    if not cfg.programs.generate:
        return None
    app_root = Path(config.paths.root).absolute() / app
    data = render_programs(
        ProgramsInput(
            app=app,
            app_root=PurePosixPath(app_root),
            layout=layout,
            layers=tuple(config.instance.layers),
            plone=settings.plone_instances,
            config=cfg.programs,
        )
    )
    path = app_root / PROGRAMS_CONF
    if cfg.programs.logs == "shared":
        with contextlib.suppress(OSError):  # supervisord says so if it cannot log there
            (app_root / "shared" / "var" / "log").mkdir(parents=True, exist_ok=True)
    try:
        unchanged = path.read_bytes() == data
    except OSError:
        unchanged = False
    if not unchanged:
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise ReleaseError(f"cannot write the supervisord programs {path}: {exc}") from exc
        log.info("programs.written", path=str(path), bytes=len(data))
    return path


class SupervisorRestarter:
    """Health-gated restarts of an app's programs through supervisord's XML-RPC API."""

    def __init__(
        self, config: SupervisorConfig, *, root: Path | None = None, instance: str = ""
    ) -> None:
        self.config = config
        self.root = root
        self.instance = instance

    def client(self) -> SupervisorClient:
        return SupervisorClient(
            self.config.url,
            username=self.config.username,
            password=read_secret(self.config.password_file),
        )

    def manager(self, app: str, config: AppConfig) -> ReleaseManager | None:
        if self.root is None:
            return None
        return ReleaseManager(
            root=self.root,
            app=app,
            repository=config.repository,
            keep_releases=config.keep_releases,
            shared_dirs=config.shared_dirs,
        )

    async def restart(
        self,
        *,
        app: str,
        config: AppConfig,
        layout: ClientLayout,
        restart_delay: float,
        only: list[str] | None = None,
        services_only: bool = False,
    ) -> dict[str, Any]:
        """The roll; with ``services_only``, just the ZEO server as it must be brought up or
        restarted (an instance with no clients: the same, its ZEO server is its roll)."""
        client = self.client()
        mgr = self.manager(app, config)
        active = await client.list_processes()
        self.refresh(mgr, active)
        services = self.services(mgr, config, active)
        zeoserver = config.programs.zeoserver_name
        programs = only or config.restart.programs
        if layout.count == 0 and not only:
            if not await _knows(client, zeoserver, active):
                # No ZEO clients here and no ZEO server: apply supervisord's configuration
                # as `supervisorctl update` would.
                diff = await client.update()
                return {
                    "programs": [],
                    "added": diff.added,
                    "changed": diff.changed,
                    "removed": diff.removed,
                    "seconds": 0.0,
                }
            programs = [zeoserver]  # a database server: its ZEO server is the roll
        plan = RestartPlan(
            programs=programs,
            strategy=config.restart.strategy,
            restart_delay=restart_delay,
            health_url=config.restart.health_url,
            health_timeout=config.restart.health_timeout,
            health_rise=config.restart.health_rise,
            health_interval=config.restart.health_interval,
            max_unavailable=config.restart.max_unavailable,
            ports=layout.ports,
            services=services,
            listen=self.listen_checks(mgr, config),
            balancer=self.balancer_gate(config, layout),
            services_only=services_only and layout.count > 0,
        )
        try:
            report = await restart_programs(client, plan)
        except RestartHalted as exc:
            self.record(mgr, [*exc.restarted, exc.program])
            raise
        self.record(mgr, [*report.supporting, *(r.name for r in report.restarted)], report.removed)
        return _summary(report)

    def balancer_gate(self, config: AppConfig, layout: ClientLayout) -> BalancerGate | None:
        """HAProxy's names of this instance's clients, when the roll waits for HAProxy."""
        balancer = config.restart.balancer
        if balancer is None:
            return None
        try:
            servers = {
                name: balancer.server.format(instance=self.instance, name=name)
                for name in layout.names
            }
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"restart.balancer.server {balancer.server!r} may only use "
                f"{{instance}} and {{name}}: {exc}"
            ) from exc
        return BalancerGate(
            stats_url=balancer.stats_url,
            backend=balancer.backend,
            servers=servers,
            interval=config.restart.health_interval,
            drain=balancer.drain,
            drain_timeout=balancer.drain_timeout,
        )

    def listen_checks(self, mgr: ReleaseManager | None, config: AppConfig) -> dict[str, str]:
        """The ZEO server is up when it listens where deploy.cfg says (``[deploy]
        zeo_address`` of the live release)."""
        current = mgr.current() if mgr is not None else None
        if current is None:
            return {}
        parser = configparser.RawConfigParser(strict=False, interpolation=None)
        try:
            parser.read_string((current.path / "deploy.cfg").read_text(encoding="utf-8"))
            address = parser.get("deploy", "zeo_address", fallback="")
        except (OSError, configparser.Error, UnicodeDecodeError):
            return {}
        return {config.programs.zeoserver_name: address} if ":" in address else {}

    def services(
        self, mgr: ReleaseManager | None, config: AppConfig, active: list[ProcessInfo]
    ) -> dict[str, bool]:
        """The ZEO server, and whether it must be restarted before the clients: when it
        is not running, or what it runs differs between its release and ``current``."""
        name = config.programs.zeoserver_name
        proc = next((p for p in active if p.name == name), None)
        if proc is None or proc.statename != "RUNNING":
            return {name: True}
        if mgr is None:
            return {name: False}
        current = mgr.current()
        if current is None:
            return {name: False}
        running = mgr.release_of_pid(proc.pid) if proc.pid else None
        running = running or mgr.recorded_programs().get(name)
        if running is None:
            # Started before the agent kept a record: compare with the release before.
            previous = mgr.previous()
            running = previous.name if previous else current.name
        if running == current.name:
            return {name: False}
        files = config.programs.zeoserver_files
        before = mgr.files_digest(running, files)
        after = mgr.files_digest(current.name, files)
        changed = before is None or before != after
        log.info(
            "restart.zeoserver_check",
            program=name,
            running_from=running,
            current=current.name,
            changed=changed,
            reason="its release is gone" if before is None else None,
        )
        return {name: changed}

    def refresh(self, mgr: ReleaseManager | None, active: list[ProcessInfo]) -> None:
        """Correct the record from what the processes show where we may look (supervisord
        restarts a crashed program from ``current`` without asking us)."""
        if mgr is None:
            return
        record = mgr.recorded_programs()
        seen = {p.name: mgr.release_of_pid(p.pid) for p in active if p.pid}
        fixed = {n: r for n, r in seen.items() if r is not None and record.get(n) != r}
        if fixed:
            _try_record(mgr, dict(fixed))

    def record(
        self, mgr: ReleaseManager | None, started: list[str], removed: list[str] | None = None
    ) -> None:
        """Note that ``started`` now run from ``current`` (what supervisord resolved their
        ``directory`` to); prune keeps those releases while they run."""
        if mgr is None:
            return
        current = mgr.current()
        if current is None:
            return
        _try_record(mgr, dict.fromkeys(started, current.name), removed or ())

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]:
        """Start, health-gated, the ZEO server if it is not RUNNING and the clients that do
        not run ``current`` (``stale``: stopped, or a roll cut short); their names. Clients
        already on ``current`` are left alone."""
        processes = await self.client().list_processes()
        service = config.programs.zeoserver_name
        down = [p.name for p in processes if p.name == service and p.statename != "RUNNING"]
        todo = [*down, *self._off_current(app, config, processes)]
        if todo:
            await self.restart(app=app, config=config, layout=layout, restart_delay=0, only=todo)
        return todo

    async def stale(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]:
        """The clients that do not run ``current``: not RUNNING, or started from another
        release (a restart that halted, failed or was cut short). A deploy that finds its
        release live finishes their restart, so ``unchanged`` means every client runs it."""
        return self._off_current(app, config, await self.client().list_processes())

    def _off_current(self, app: str, config: AppConfig, processes: list[ProcessInfo]) -> list[str]:
        """The clients among ``processes`` not RUNNING, or running another release than
        ``current`` when that can be told. The ZEO server is not one: it keeps its release
        when what it runs is the same."""
        mgr = self.manager(app, config)
        current = mgr.current() if mgr is not None else None
        self.refresh(mgr, processes)
        record = mgr.recorded_programs() if mgr is not None else {}

        def elsewhere(proc: ProcessInfo) -> bool:
            if mgr is None or current is None:
                return False
            runs = (mgr.release_of_pid(proc.pid) if proc.pid else None) or record.get(proc.name)
            return runs is not None and runs != current.name

        service = config.programs.zeoserver_name
        return [
            proc.name
            for proc in processes
            if proc.name != service
            and any(fnmatch.fnmatchcase(proc.name, p) for p in config.restart.programs)
            and (proc.statename != "RUNNING" or elsewhere(proc))
        ]


def _try_record(
    mgr: ReleaseManager, started: dict[str, str | None], removed: Sequence[str] = ()
) -> None:
    """A record that cannot be written costs prune its knowledge, not the restart."""
    try:
        mgr.record_programs(started, removed=removed)
    except ReleaseError as exc:
        log.warning("programs.record_failed", app=mgr.app, error=str(exc))


async def _knows(client: SupervisorClient, name: str, active: list[ProcessInfo]) -> bool:
    """True when supervisord runs ``name`` or has it in its configuration files."""
    if any(p.name == name for p in active):
        return True
    diff = await client.reload_config()
    return name in diff.added


def _summary(report: RestartReport) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "programs": [asdict(p) for p in report.restarted],
        "removed": report.removed,
        "seconds": round(report.seconds, 2),
    }
    if report.supporting:
        summary["started_first"] = report.supporting
    return summary


def restarter_for(config: AgentConfig) -> SupervisorRestarter | None:
    """None when no supervisor is configured: the pipeline then says it skipped restarts."""
    if not config.supervisor:
        return None
    return SupervisorRestarter(
        config.supervisor, root=Path(config.paths.root), instance=config.instance.id
    )
