"""The pipeline's restart step: the ``Restarter`` port, and its supervisord implementation
(the app's restart settings become a ``RestartPlan`` for ``agent.node.rolling``)."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict
from typing import Any, Protocol

from agent.adapters.configfile import read_secret
from agent.adapters.supervisor import SupervisorClient
from agent.core.config import AgentConfig, AppConfig, SupervisorConfig
from agent.core.plan import ClientLayout
from agent.node.rolling import RestartPlan, restart_programs


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
    ) -> dict[str, Any]: ...

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]: ...


class SupervisorRestarter:
    """Health-gated restarts of an app's programs through supervisord's XML-RPC API."""

    def __init__(self, config: SupervisorConfig) -> None:
        self.config = config

    def client(self) -> SupervisorClient:
        return SupervisorClient(
            self.config.url,
            username=self.config.username,
            password=read_secret(self.config.password_file),
        )

    async def restart(
        self,
        *,
        app: str,
        config: AppConfig,
        layout: ClientLayout,
        restart_delay: float,
        only: list[str] | None = None,
    ) -> dict[str, Any]:
        if layout.count == 0 and not only:
            # No ZEO clients here (a database server): apply supervisord's configuration
            # as `supervisorctl update` would, so a new ZEO server program starts.
            diff = await self.client().update()
            return {
                "programs": [],
                "added": diff.added,
                "changed": diff.changed,
                "removed": diff.removed,
                "seconds": 0.0,
            }
        plan = RestartPlan(
            programs=only or config.restart.programs,
            strategy=config.restart.strategy,
            restart_delay=restart_delay,
            health_url=config.restart.health_url,
            health_timeout=config.restart.health_timeout,
            ports=layout.ports,
        )
        report = await restart_programs(self.client(), plan)
        return {
            "programs": [asdict(p) for p in report.restarted],
            "removed": report.removed,
            "seconds": round(report.seconds, 2),
        }

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]:
        """Start, health-gated, the app's programs that are not RUNNING; their names."""
        client = self.client()
        processes = await client.list_processes()
        stopped = [
            p.name
            for p in processes
            if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in config.restart.programs)
            and p.statename != "RUNNING"
        ]
        if stopped:
            await self.restart(app=app, config=config, layout=layout, restart_delay=0, only=stopped)
        return stopped


def restarter_for(config: AgentConfig) -> SupervisorRestarter | None:
    """None when no supervisor is configured: the pipeline then says it skipped restarts."""
    return SupervisorRestarter(config.supervisor) if config.supervisor else None
