"""The load balancer's view of a restarted client (docs/architecture.md, "Restarts").

A client that answers the agent is not yet a client that HAProxy sends requests to: HAProxy
counts it up only after its own next check, and a check of a just-started Zope takes
seconds. Stopping the next client before that leaves HAProxy with none. With
``restart.balancer`` set, the roll also waits until HAProxy's stats page (its CSV export,
the same on any host that can reach it) lists the restarted client as UP, as AWS
CodeDeploy waits for the load balancer's target health before it goes on.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import structlog

from agent.core.errors import ConfigError, HealthCheckFailed
from agent.core.redact import strip_url_password as redact_url

log = structlog.get_logger(__name__)

READ_TIMEOUT = 5.0
"""Upper bound for one read of the stats page."""


@dataclass(frozen=True, kw_only=True)
class BalancerGate:
    """Where HAProxy's stats are and what HAProxy calls each program of this host."""

    stats_url: str
    backend: str
    #: Program name -> HAProxy server name (``web-1-client1`` in the shipped template).
    servers: dict[str, str]
    interval: float = 0.5


def csv_url(stats_url: str) -> str:
    """The CSV export of an HAProxy stats page: ``<stats uri>;csv``."""
    parts = urlsplit(stats_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"restart.balancer.stats_url must be http(s)://host:port/path, "
            f"got {redact_url(stats_url)!r}"
        )
    return stats_url if parts.path.endswith(";csv") else stats_url + ";csv"


def server_status(csv_text: str, backend: str, server: str) -> str | None:
    """The ``status`` column of one server (``UP``, ``UP 1/3``, ``DOWN``, ``MAINT``,
    ``no check``), or None when HAProxy does not list it."""
    text = csv_text.lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") == server:
            return row.get("status") or ""
    return None


def in_service(status: str) -> bool:
    """HAProxy sends it requests: up (``UP 1/3`` is up, one check failed) or unchecked."""
    return status.startswith("UP") or status == "no check"


def _read(url: str) -> str:
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare)  # noqa: S310 (csv_url allows http(s) only)
    if parts.username is not None:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as response:  # noqa: S310
        return str(response.read().decode("utf-8", errors="replace"))


async def wait_in_service(gate: BalancerGate, program: str, *, deadline: float) -> float:
    """Wait until HAProxy lists ``program``'s server as in service; returns the seconds.

    A server HAProxy does not list (not rendered into its configuration yet) is not waited
    for: HAProxy sends it nothing, so stopping the next client takes nothing from it.
    Raises HealthCheckFailed at ``deadline`` (monotonic), with HAProxy's last status."""
    server = gate.servers.get(program)
    if server is None:
        return 0.0
    url = csv_url(gate.stats_url)
    safe = redact_url(url)
    started = time.monotonic()
    last = "no answer yet"
    while True:
        try:
            status = server_status(await asyncio.to_thread(_read, url), gate.backend, server)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = f"stats page: {exc}"
        else:
            if status is None:
                log.warning(
                    "restart.balancer_unknown",
                    program=program,
                    server=server,
                    backend=gate.backend,
                    reason="HAProxy does not list it; it sends it no requests",
                )
                return time.monotonic() - started
            if in_service(status):
                seconds = time.monotonic() - started
                log.info("restart.balancer_up", program=program, server=server, status=status)
                return seconds
            last = f"HAProxy says {status}"
        if time.monotonic() + gate.interval > deadline:
            raise HealthCheckFailed(
                f"HAProxy ({safe}) did not count {gate.backend}/{server} up "
                f"before health_timeout (last: {last})",
                url=safe,
                last_error=last,
            )
        await asyncio.sleep(gate.interval)
