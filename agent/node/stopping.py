"""How the agent stops (docs/architecture.md, "Wire protocol"): signals only set flags
here (and start the shutdown probe), the running command gets ``shutdown_grace`` to reach
its end, and the last word is ``stopped``, or ``leaving`` when the host shuts down or
``deploy-agent leave`` asked.

Split from ``agent/node/daemon.py``, whose ``Daemon`` composes a ``Stopping`` and asks it
in its main loop and its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import structlog

from agent.adapters.sdnotify import notify
from agent.core.config import AgentConfig
from agent.protocol import PresenceState

log = structlog.get_logger(__name__)


class Stopping:
    """Whether the agent was asked to stop (``requested``), to stop now (``force``), or to
    leave the fleet (``leaving``); ``asked`` is set with the first of them."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.requested = False
        #: Set when this instance is being removed: the last word is ``leaving``.
        self.leaving = False
        self.probe: asyncio.Task[bool] | None = None
        self.asked = asyncio.Event()
        self.force = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: signal.Signals) -> None:
        """First signal: finish what runs, then stop. A second SIGINT: stop now."""
        if self.requested and sig == signal.SIGINT:
            self.force.set()
        if not self.requested and self.config.shutdown_probe:
            # Asked now, while systemd still says why we are being stopped.
            self.probe = asyncio.get_running_loop().create_task(
                host_shutting_down(self.config.shutdown_probe), name="shutdown-probe"
            )
        self.requested = True
        self.asked.set()

    def leave(self) -> None:
        """``deploy-agent leave`` asked while we run: go, and say ``leaving`` as we do."""
        self.leaving = True
        self.requested = True
        self.asked.set()

    async def final_state(self) -> PresenceState:
        """``leaving`` when the instance is being removed (``deploy-agent leave``, or the
        host shutting down), else ``stopped``: the services keep running."""
        if self.leaving:
            return "leaving"
        if self.probe is not None:
            try:
                if await asyncio.wait_for(asyncio.shield(self.probe), timeout=5):
                    log.info("agent.host_shutting_down")
                    return "leaving"
            except (TimeoutError, OSError):
                log.warning("agent.shutdown_probe_failed")
        return "stopped"

    async def drain(self, idle: asyncio.Event) -> None:
        """Stop taking commands; let the running one finish within ``shutdown_grace``."""
        notify("STOPPING=1")
        log.info("agent.stopping", running=not idle.is_set(), grace=self.config.shutdown_grace)
        waits = [asyncio.create_task(idle.wait()), asyncio.create_task(self.force.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.config.shutdown_grace, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
        if not idle.is_set():
            log.error("agent.grace_expired", grace=self.config.shutdown_grace)


async def host_shutting_down(argv: list[str]) -> bool:
    """True when ``argv`` (``systemctl is-system-running``) says ``stopping``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return False  # no systemd here: a plain stop
    try:
        async with asyncio.timeout(5):
            output, _ = await proc.communicate()
    except TimeoutError:
        return False
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return output.decode(errors="replace").strip() == "stopping"
