"""HTTP health checks for restarted programs: is the new process really serving?

supervisord's RUNNING only means "the process stayed up for startsecs"; a Zope client can
be RUNNING for many seconds before it answers requests. A restart is gated on the health
URL instead, so the load balancer never sees two clients down at once. Stdlib only: one
HTTP/1.0 GET over ``asyncio.open_connection`` per probe, polled until a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from urllib.parse import SplitResult, urlsplit

import structlog

from agent.core.errors import ConfigError, HealthCheckFailed
from agent.core.redact import strip_url_password as redact_url

log = structlog.get_logger(__name__)

POLL_INTERVAL = 0.05
"""Seconds between two probes; loopback probes are cheap, and this bounds the overhead."""

PROBE_TIMEOUT = 5.0
"""Upper bound for one probe, so one hung connection cannot eat the whole deadline."""


def health_url_for(template: str, *, name: str, port: int | None) -> str:
    """Fill ``{name}`` and ``{port}`` of a configured health URL template for one program."""
    if "{port}" in template and port is None:
        raise ConfigError(f"health_url {template!r} needs a port for program {name!r}, none known")
    try:
        return template.format(name=name, port=port)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"health_url {template!r} may only use {{name}} and {{port}}: {exc}"
        ) from exc


def _target(url: str) -> SplitResult:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"health_url must be http(s)://host[:port]/path, got {redact_url(url)!r}")
    return parts


async def probe(url: str, *, timeout: float = PROBE_TIMEOUT) -> int:
    """One GET of ``url``; returns the HTTP status code or raises OSError/TimeoutError."""
    parts = _target(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    request = (
        f"GET {path} HTTP/1.0\r\nHost: {parts.hostname}:{port}\r\n"
        "User-Agent: deploy-agent-health\r\nConnection: close\r\n\r\n"
    )
    async with asyncio.timeout(timeout):
        context = ssl.create_default_context() if tls else None
        reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
        try:
            if _self_connected(writer):
                raise ConnectionRefusedError("connected to itself: nothing listens yet")
            writer.write(request.encode("ascii"))
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            await _closed(writer)
    return _status_code(status_line)


def _self_connected(writer: asyncio.StreamWriter) -> bool:
    """A TCP self-connect: polling a port nobody listens on yet, from the same host, can
    pick that very port as the local end and "connect" (a port in the kernel's ephemeral
    range, as in a test); the poller then reads back what it sent."""
    return bool(writer.get_extra_info("sockname") == writer.get_extra_info("peername"))


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Wait for the close; a peer that already hung up is not an error here."""
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _status_code(status_line: bytes) -> int:
    fields = status_line.split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise ConnectionError(f"not an HTTP response: {status_line[:80]!r}")
    return int(fields[1])


async def wait_healthy(url: str, *, timeout: float, interval: float = POLL_INTERVAL) -> float:
    """Probe ``url`` until it answers 2xx/3xx; returns the seconds it took.

    Raises HealthCheckFailed after ``timeout`` seconds, with the last answer or error.
    """
    _target(url)  # a malformed URL is a configuration error, not an unhealthy program
    started = time.monotonic()
    deadline = started + timeout
    last_error = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            status = await probe(url, timeout=min(PROBE_TIMEOUT, remaining))
        except TimeoutError as exc:
            if remaining >= PROBE_TIMEOUT or last_error == "no answer yet":
                last_error = str(exc) or type(exc).__name__
            # else: the deadline cut this probe short; the answer before it says more
        except OSError as exc:
            last_error = str(exc) or type(exc).__name__
        else:
            if 200 <= status < 400:
                return time.monotonic() - started
            last_error = f"HTTP {status}"
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    safe = redact_url(url)
    log.warning("health.timeout", url=safe, timeout=timeout, last_error=last_error)
    raise HealthCheckFailed(
        f"{safe} did not answer 2xx/3xx within {timeout:g}s (last: {last_error})",
        url=safe,
        last_error=last_error,
    )


async def wait_listening(address: str, *, timeout: float, interval: float = POLL_INTERVAL) -> float:
    """Wait until ``host:port`` accepts a TCP connection (a ZEO server is ready when it
    listens: RUNNING alone says only that it has not died yet); returns the seconds.

    Raises HealthCheckFailed after ``timeout`` seconds, with the last error."""
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{address!r} is not host:port") from None
    started = time.monotonic()
    deadline = started + timeout
    last_error = "no answer yet"
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT, remaining)):
                _, writer = await asyncio.open_connection(host or "127.0.0.1", port)
            itself = _self_connected(writer)
            writer.close()
            async with asyncio.timeout(PROBE_TIMEOUT):
                await _closed(writer)
            if not itself:
                return time.monotonic() - started
            last_error = "connected to itself: nothing listens yet"
        except (OSError, TimeoutError) as exc:
            last_error = str(exc) or type(exc).__name__
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    log.warning("health.timeout", address=address, timeout=timeout, last_error=last_error)
    raise HealthCheckFailed(
        f"{address} did not accept connections within {timeout:g}s (last: {last_error})",
        url=address,
        last_error=last_error,
    )
