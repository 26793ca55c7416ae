"""supervisord over XML-RPC, from asyncio, with errors an operator can act on.

The xmlrpc calls block, so each runs in a worker thread (``asyncio.to_thread``) on its own
short-lived ServerProxy: one persistent connection shared between threads would interleave
requests. The transport is supervisor's own ``SupervisorTransport``, as supervisorctl uses,
so ``unix://`` sockets and HTTP basic auth behave exactly as they do for an operator.

The health-gated restart built on this client lives in ``agent.rolling``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import http.client
import re
import ssl
import time
import traceback
import xmlrpc.client
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog
from supervisor.xmlrpc import Faults, SupervisorTransport, getFaultDescription

from agent.adapters.health import POLL_INTERVAL
from agent.core.errors import (
    ConfigError,
    ProgramDidNotStart,
    SupervisorCallFailed,
    SupervisorError,
)
from agent.core.redact import strip_url_password as redact_url

log = structlog.get_logger(__name__)

START_FAILURES = frozenset(
    {Faults.SPAWN_ERROR, Faults.NO_FILE, Faults.NOT_EXECUTABLE, Faults.ABNORMAL_TERMINATION}
)


@dataclass(frozen=True, kw_only=True)
class ProcessInfo:
    """One supervisord process as getAllProcessInfo reports it (pid None when not running)."""

    name: str
    group: str
    statename: str
    pid: int | None = None

    @property
    def namespec(self) -> str:
        """``group:name``, the one spelling every supervisord call accepts unambiguously."""
        return f"{self.group}:{self.name}"


@dataclass(frozen=True, kw_only=True)
class ConfigDiff:
    """Group names from reloadConfig: what `supervisorctl update` would add/change/remove."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def natural_key(text: str) -> list[Any]:
    """Sort key that puts client2 before client10 (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def match_programs(patterns: Sequence[str], processes: Iterable[ProcessInfo]) -> list[ProcessInfo]:
    """Processes matching any pattern (name or ``group:name``, fnmatch), naturally sorted.

    A pattern matching nothing is an error: a typo must not turn a restart into a no-op.
    """
    candidates = list(processes)
    matched: dict[str, ProcessInfo] = {}
    for pattern in patterns:
        hits = [
            p
            for p in candidates
            if fnmatch.fnmatchcase(p.name, pattern) or fnmatch.fnmatchcase(p.namespec, pattern)
        ]
        if not hits:
            known = ", ".join(sorted({p.name for p in candidates}, key=natural_key)) or "none"
            raise SupervisorError(f"no program matches {pattern!r} (programs: {known})")
        matched.update((p.namespec, p) for p in hits)
    return sorted(matched.values(), key=lambda p: (natural_key(p.name), natural_key(p.group)))


def _process_info(raw: dict[str, Any]) -> ProcessInfo:
    pid = int(raw.get("pid") or 0)
    return ProcessInfo(
        name=raw["name"], group=raw["group"], statename=raw["statename"], pid=pid or None
    )


class SupervisorClient:
    """Async client for one supervisord; never shows its password in repr, logs or errors."""

    def __init__(
        self, url: str, *, username: str | None = None, password: str | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("unix", "http", "https"):
            raise ConfigError(
                f"supervisor url must be unix://, http:// or https://, got {redact_url(url)!r}"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ConfigError(f"supervisor url {redact_url(url)!r} has no host")
        self.url = redact_url(url) if parts.scheme != "unix" else url
        self._username = username if username is not None else parts.username
        self._password = password if password is not None else parts.password
        self._parts = parts

    def __repr__(self) -> str:
        return f"SupervisorClient({self.url!r})"

    def _transport(self) -> SupervisorTransport:
        parts = self._parts
        if parts.scheme == "unix":
            return SupervisorTransport(self._username, self._password, self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        transport = SupervisorTransport(
            self._username, self._password, f"http://{parts.hostname}:{port}"
        )
        if parts.scheme == "https":
            # SupervisorTransport only knows http:// and unix://; same transport, TLS socket.
            context = ssl.create_default_context()
            transport._get_connection = lambda: http.client.HTTPSConnection(
                parts.hostname or "", port, context=context
            )
        return transport

    def _call_blocking(self, method: str, *args: Any) -> Any:
        transport = self._transport()
        # The proxy URL is a placeholder: the transport decides where to connect.
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.ProtocolError as exc:
            # SupervisorTransport raises on a non-200 answer without closing the response,
            # which keeps its socket open from the traceback; dropping the frames' locals
            # closes it now (not in a later GC pass, with a ResourceWarning).
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            transport.close()

    async def _call(self, method: str, *args: Any, program: str | None = None) -> Any:
        """Run one call in a thread and translate every failure into a SupervisorError."""
        try:
            return await asyncio.to_thread(self._call_blocking, method, *args)
        except xmlrpc.client.Fault as exc:
            fault = getFaultDescription(exc.faultCode)
            subject = f" for {program!r}" if program else ""
            raise SupervisorCallFailed(
                f"supervisord rejected {method}{subject}: {fault} ({exc.faultString})",
                method=method,
                program=program,
                fault=fault,
            ) from exc
        except xmlrpc.client.ProtocolError as exc:
            if exc.errcode == 401:
                raise SupervisorError(
                    f"supervisord refused the credentials for user {self._username!r} "
                    f"at {self.url} (HTTP 401); check supervisor.username/password_file"
                ) from exc
            raise SupervisorError(
                f"supervisord at {self.url} answered HTTP {exc.errcode} {exc.errmsg}"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            reason = str(exc) or type(exc).__name__
            raise SupervisorError(f"supervisord not reachable at {self.url}: {reason}") from exc

    async def _call_tolerating(self, fault_code: int, method: str, name: str, *args: Any) -> bool:
        """Call, treating one named fault as "already so" (stop a stopped process): False."""
        try:
            await self._call(method, name, *args, program=name)
        except SupervisorCallFailed as exc:
            if exc.fault != getFaultDescription(fault_code):
                raise
            return False
        return True

    async def state(self) -> str:
        """supervisord's own state (RUNNING, SHUTDOWN...): the cheapest "are you there"."""
        return str((await self._call("getState"))["statename"])

    async def list_processes(self) -> list[ProcessInfo]:
        """Every active process, naturally sorted by name."""
        raw = await self._call("getAllProcessInfo")
        return sorted((_process_info(r) for r in raw), key=lambda p: natural_key(p.name))

    async def process_info(self, namespec: str) -> ProcessInfo:
        """One process by ``name`` or ``group:name``."""
        return _process_info(await self._call("getProcessInfo", namespec, program=namespec))

    async def configured_processes(self) -> list[ProcessInfo]:
        """Processes of the loaded configuration (after reloadConfig), active or not."""
        raw = await self._call("getAllConfigInfo")
        return [ProcessInfo(name=r["name"], group=r["group"], statename="CONFIGURED") for r in raw]

    async def match(self, patterns: Sequence[str]) -> list[ProcessInfo]:
        """Active processes matching the patterns; raises SupervisorError if one matches none."""
        return match_programs(patterns, await self.list_processes())

    async def stop(self, namespec: str) -> None:
        """Stop and wait until stopped (supervisord escalates to SIGKILL after stopwaitsecs)."""
        await self._call_tolerating(Faults.NOT_RUNNING, "stopProcess", namespec, True)

    async def start(self, namespec: str) -> None:
        """Ask for a start without waiting: wait_running() bounds the wait ourselves."""
        try:
            await self._call_tolerating(Faults.ALREADY_STARTED, "startProcess", namespec, False)
        except SupervisorCallFailed as exc:
            if exc.fault in {getFaultDescription(code) for code in START_FAILURES}:
                raise ProgramDidNotStart(str(exc), program=namespec, state=exc.fault) from exc
            raise

    async def wait_running(
        self, namespec: str, *, timeout: float, interval: float = POLL_INTERVAL
    ) -> ProcessInfo:
        """Poll until RUNNING; FATAL fails at once, anything else fails at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.process_info(namespec)
            if info.statename == "RUNNING":
                return info
            if info.statename == "FATAL" or time.monotonic() >= deadline:
                raise ProgramDidNotStart(
                    f"{namespec} is {info.statename}, not RUNNING, after {timeout:g}s"
                    if info.statename != "FATAL"
                    else f"{namespec} is FATAL: supervisord gave up starting it",
                    program=namespec,
                    state=info.statename,
                )
            await asyncio.sleep(interval)

    async def reload_config(self) -> ConfigDiff:
        """Re-read supervisord's configuration files; nothing is applied yet."""
        [[added, changed, removed]] = await self._call("reloadConfig")
        diff = ConfigDiff(added=tuple(added), changed=tuple(changed), removed=tuple(removed))
        log.info("supervisor.reloaded", added=added, changed=changed, removed=removed)
        return diff

    async def stop_group(self, group: str) -> None:
        """Stop every process of a group and wait for them."""
        await self._call("stopProcessGroup", group, True, program=group)

    async def add_group(self, group: str) -> None:
        """Activate a group of the loaded configuration (autostart programs then start)."""
        await self._call_tolerating(Faults.ALREADY_ADDED, "addProcessGroup", group)

    async def remove_group(self, group: str) -> None:
        """Deactivate a stopped group."""
        await self._call("removeProcessGroup", group, program=group)

    async def update(self) -> ConfigDiff:
        """reloadConfig and apply all of it at once, as `supervisorctl update` does."""
        diff = await self.reload_config()
        for group in diff.removed:
            await self.stop_group(group)
            await self.remove_group(group)
        for group in diff.changed:
            await self.stop_group(group)
            await self.remove_group(group)
            await self.add_group(group)
        for group in diff.added:
            await self.add_group(group)
        return diff
