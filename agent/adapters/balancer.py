"""The load balancer's view of a restarted client (docs/architecture.md, "Restarts").

A client that answers the agent is not yet a client that HAProxy sends requests to: HAProxy
counts it up only after its own next check, and a check of a just-started Zope takes
seconds. Stopping the next client before that leaves HAProxy with none. With
``restart.balancer`` set, the roll also waits until HAProxy's stats page (its CSV export,
the same on any host that can reach it) lists the restarted client as UP, as AWS
CodeDeploy waits for the load balancer's target health before it goes on.

Before a client stops, the roll drains it there too (``restart.balancer.drain``): HAProxy
sends it no new request, and the roll waits until the requests it is answering are done
(``scur`` 0) or ``drain_timeout`` passed. A client stopped mid-answer cuts that answer off,
and HAProxy cannot replay an answer it already began to forward. Draining goes through the
stats page's admin form (``stats admin`` in the shipped template), the same page and the
same credentials as the gate; the client is set ready again once it answers.
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
from urllib.parse import urlencode, urlsplit, urlunsplit

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
    #: Drain a client in HAProxy before it stops, for at most ``drain_timeout`` seconds.
    drain: bool = True
    drain_timeout: float = 30.0


def csv_url(stats_url: str) -> str:
    """The CSV export of an HAProxy stats page: ``<stats uri>;csv``."""
    parts = urlsplit(stats_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"restart.balancer.stats_url must be http(s)://host:port/path, "
            f"got {redact_url(stats_url)!r}"
        )
    return stats_url if parts.path.endswith(";csv") else stats_url + ";csv"


def page_url(stats_url: str) -> str:
    """The stats page itself, where its admin form posts (``stats_url`` without ``;csv``)."""
    csv_url(stats_url)
    return stats_url.removesuffix(";csv")


def server_row(csv_text: str, backend: str, server: str) -> dict[str, str] | None:
    """One server's row of the CSV export, or None when HAProxy does not list it."""
    text = csv_text.lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") == server:
            return {key: value or "" for key, value in row.items() if key is not None}
    return None


def server_status(csv_text: str, backend: str, server: str) -> str | None:
    """The ``status`` column of one server (``UP``, ``UP 1/3``, ``DOWN``, ``MAINT``,
    ``DRAIN``, ``no check``), or None when HAProxy does not list it."""
    row = server_row(csv_text, backend, server)
    return None if row is None else row.get("status", "")


def busy(row: dict[str, str]) -> int:
    """Requests a server is answering or has queued (``scur`` + ``qcur``)."""
    return sum(int(row.get(key) or 0) for key in ("scur", "qcur"))


def admin_result(final_url: str) -> str:
    """What HAProxy's admin form did, from the page it redirects to (``…;st=DONE``):
    ``DONE``, ``PART``, ``NONE``, ``DENY`` (no ``stats admin``), ``ERRP``, ``EXCD``…"""
    marker = ";st="
    return final_url.rpartition(marker)[2] if marker in final_url else "NO ANSWER"


def in_service(status: str) -> bool:
    """HAProxy sends it requests: up (``UP 1/3`` is up, one check failed) or unchecked."""
    return status.startswith("UP") or status == "no check"


def _request(url: str, data: bytes | None = None) -> urllib.request.Request:
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare, data=data)  # noqa: S310 (csv_url: http(s) only)
    if parts.username is not None:
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def _read(url: str) -> str:
    with urllib.request.urlopen(_request(url), timeout=READ_TIMEOUT) as response:  # noqa: S310
        return str(response.read().decode("utf-8", errors="replace"))


def _post(url: str, fields: list[tuple[str, str]]) -> str:
    """Submit the stats page's admin form; returns HAProxy's verdict (``admin_result``)."""
    request = _request(url, urlencode(fields).encode())
    with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as response:  # noqa: S310
        response.read()
        return admin_result(str(response.geturl()))


async def set_state(gate: BalancerGate, programs: list[str], state: str) -> bool:
    """``drain`` or ``ready`` these programs' servers in HAProxy; False (and a warning) when
    HAProxy did not: the roll goes on as it would without a balancer to drain."""
    servers = [gate.servers[p] for p in programs if p in gate.servers]
    if not servers:
        return False
    fields = [("b", gate.backend), *(("s", server) for server in servers), ("action", state)]
    try:
        verdict = await asyncio.to_thread(_post, page_url(gate.stats_url), fields)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        verdict = f"stats page: {exc}"
    if verdict == "DONE":
        log.info(f"restart.balancer_{state}", servers=servers, backend=gate.backend)
        return True
    log.warning(
        "restart.balancer_refused",
        action=state,
        servers=servers,
        backend=gate.backend,
        verdict=verdict,
        hint="DENY: the stats page needs `stats admin` (stack_config.haproxy.stats_admin)",
    )
    return False


async def drain(gate: BalancerGate, programs: list[str]) -> float:
    """Drain these programs' servers and wait until they answer nothing (``busy`` 0), at most
    ``drain_timeout``; returns the seconds waited. Going on at the timeout is logged: the
    answers still running are cut off by the stop, as they would be without draining."""
    if not gate.drain or not await set_state(gate, programs, "drain"):
        return 0.0
    servers = [gate.servers[p] for p in programs if p in gate.servers]
    url = csv_url(gate.stats_url)
    started = time.monotonic()
    left: dict[str, int] = {}
    while True:
        try:
            page = await asyncio.to_thread(_read, url)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            left = {"stats page": 1}
            last = str(exc)
        else:
            rows = {s: server_row(page, gate.backend, s) for s in servers}
            left = {s: busy(row) for s, row in rows.items() if row is not None and busy(row)}
            last = ""
        seconds = time.monotonic() - started
        if not left:
            log.info("restart.drained", servers=servers, seconds=round(seconds, 3))
            return seconds
        if seconds + gate.interval > gate.drain_timeout:
            log.warning(
                "restart.drain_timeout",
                servers=servers,
                busy=left,
                drain_timeout=gate.drain_timeout,
                error=last or None,
            )
            return seconds
        await asyncio.sleep(gate.interval)


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
