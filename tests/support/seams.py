"""Fast pipeline tests through its seams: the one fake (a ``Restarter`` whose clients fail
their health gate on demand), a trivial build command instead of buildout, and the example
site's configuration around them. Real git and real releases underneath."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig, AppConfig
from agent.core.errors import RestartHalted
from agent.core.plan import ClientLayout
from support.site import SiteRepo, write_config

APP = "zeo-site"
FACTS = HostFacts(cpu_count=2, memory_mb=4096)
#: Stands in for buildout: the pipeline only needs a command that succeeds.
BUILD = [sys.executable, "-c", "open('built', 'w').write('ok')"]


class FakeRestarter:
    """Restarts nothing; halts at ``halt_at`` (a program name) or raises ``error``."""

    def __init__(
        self,
        *,
        halt_at: str | None = None,
        error: Exception | None = None,
        on_restart: Callable[[list[str] | None], None] | None = None,
    ) -> None:
        self.halt_at = halt_at
        self.error = error
        self.on_restart = on_restart
        self.calls: list[list[str] | None] = []

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
        if services_only:  # no ZEO server behind the fake
            return {"programs": [], "services_only": True}
        self.calls.append(only)
        if self.on_restart is not None:
            self.on_restart(only)
        if self.error is not None:
            raise self.error
        names = only or list(layout.names)
        if self.halt_at is not None and only is None:
            done = names[: names.index(self.halt_at)]
            self.halt_at = None  # the rollback's restart succeeds
            raise RestartHalted(
                f"{names[len(done)]} did not come back healthy",
                program=names[len(done)],
                restarted=done,
            )
        return {"programs": [{"name": n} for n in names]}

    async def heal(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]:
        return []

    async def stale(self, *, app: str, config: AppConfig, layout: ClientLayout) -> list[str]:
        return []


def configured(tmp_path: Path, repo: SiteRepo, **overrides: Any) -> AgentConfig:
    return write_config(
        tmp_path, repo, **{f"apps.{APP}.buildout.command": BUILD, "clients": 3, **overrides}
    )


def current(config: AgentConfig) -> str:
    return (config.paths.root / APP / "current").resolve().name
