"""The shipped HAProxy template, checked and run by the real HAProxy in front of real
HTTP servers (a stand-in for ZEO clients, which answer plain HTTP the same way)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import structlog
from support.components import require_binary
from support.ports import free_port
from support.processes import wait_until, wait_until_async
from support.site import REPO

from agent.adapters.balancer import (
    BalancerGate,
    drain,
    server_row,
    server_status,
    set_state,
    wait_in_service,
)
from agent.adapters.templates import apply_templates, build_context
from agent.core.config import TemplateConfig
from agent.core.errors import HealthCheckFailed
from agent.core.plan import Member
from agent.protocol import ClientInfo

TEMPLATE = REPO / "config" / "haproxy.cfg.tmpl"
MEMBERS = ("web-1", "web-2")
CLIENTS = ("client1", "client2")


class NamedHandler(BaseHTTPRequestHandler):
    """Answers every GET with the name of its server, like a ZEO client would with a page."""

    server: NamedServer

    def do_GET(self) -> None:
        if self.path == "/hold":  # a long answer, for draining: until the test releases it
            self.server.release.wait(timeout=60)
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # HAProxy checks every 500 ms; keep the test output readable


class NamedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), NamedHandler)
        self.name = name
        self.release = threading.Event()
        self.stopped = False
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


def context(ports: dict[str, dict[str, int]], haproxy: dict[str, Any]) -> dict[str, Any]:
    """Two members of plone_instances with two clients each, plus a zeoserver member."""
    members = [Member(m, "127.0.0.1", ("plone_instances",)) for m in MEMBERS]
    members.append(Member("zeo-1", "127.0.0.1", ("zeoserver",)))
    members.append(Member("web-3", "127.0.0.1", ("plone_instances",), online=False))
    clients = {
        m.id: [ClientInfo(name=c, port=p) for c, p in ports.get(m.id, {}).items()] for m in members
    }
    clients["web-3"] = [ClientInfo(name="client1", port=1)]
    return build_context(
        stack="mysite",
        instance=members[0],
        members=members,
        clients=clients,
        stack_config={"haproxy": haproxy},
    )


async def render(tmp_path: Path, ctx: dict[str, Any]) -> Path:
    destination = tmp_path / "haproxy.cfg"
    config = TemplateConfig(source=TEMPLATE, destination=destination)
    [result] = await apply_templates([config], ctx)
    assert result.changed
    return destination


def check(haproxy: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def haproxy_bin() -> str:
    return require_binary("haproxy")


@pytest.fixture
def backends() -> Iterator[dict[str, NamedServer]]:
    servers = {f"{m}-{c}": NamedServer(f"{m}-{c}") for m in MEMBERS for c in CLIENTS}
    yield servers
    for server in servers.values():
        server.release.set()
        server.stop()


def backend_ports(servers: dict[str, NamedServer]) -> dict[str, dict[str, int]]:
    return {m: {c: servers[f"{m}-{c}"].port for c in CLIENTS} for m in MEMBERS}


class RunningHAProxy:
    """HAProxy in the foreground (-db) on a loopback port, stopped gracefully (SIGUSR1)."""

    def __init__(self, haproxy: str, config: Path, port: int) -> None:
        self.port = port
        self.log = config.with_suffix(".log")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [haproxy, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"haproxy exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"haproxy did not listen on {self.port}:\n{self.log.read_text()}")

    def get(self, path: str = "/") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # soft stop: finish requests, then exit
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


@pytest.fixture
def start_haproxy(haproxy_bin: str) -> Iterator[Any]:
    started: list[RunningHAProxy] = []

    def start(config: Path, port: int) -> RunningHAProxy:
        started.append(RunningHAProxy(haproxy_bin, config, port))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


async def test_shipped_template_with_defaults_passes_haproxy_check(
    haproxy_bin: str, tmp_path: Path
) -> None:
    ports = {m: {"client1": 8081, "client2": 8082} for m in MEMBERS}
    path = await render(tmp_path, context(ports, {}))
    text = path.read_text()
    assert check(haproxy_bin, path).returncode == 0, check(haproxy_bin, path).stderr
    for m in MEMBERS:
        for c, port in ports[m].items():
            assert f"    server {m}-{c} 127.0.0.1:{port} check\n" in text
    assert "web-3" not in text  # offline
    assert "zeo-1" not in text  # another layer
    for setting in (
        "option httpchk GET /\n",
        "default-server inter 500ms fall 3 rise 1\n",
        "timeout check 10s\n",
        "retries 2\n",
        "option redispatch 1\n",
        "retry-on all-retryable-errors\n",
        "bind *:80\n",
        "balance roundrobin\n",
    ):
        assert setting in text


async def test_settings_come_from_stack_config_and_pass_haproxy_check(
    haproxy_bin: str, tmp_path: Path
) -> None:
    ports = {"zeo-1": {"client1": 9001}}
    haproxy = {
        "bind": "127.0.0.1:8999",
        "check_path": "/@@ok",
        "backend_layer": "zeoserver",
        "balance": "leastconn",
        "server_maxconn": 2,
        "stats_bind": "127.0.0.1:8404",
        "timeouts": {"server": "300s"},
        "log": "",
        "user": "",
        "group": "",
    }
    path = await render(tmp_path, context(ports, haproxy))
    text = path.read_text()
    result = check(haproxy_bin, path)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    assert "    server zeo-1-client1 127.0.0.1:9001 check\n" in text
    assert "web-1" not in text.split("backend zeo_clients")[1]
    for setting in (
        "option httpchk GET /@@ok\n",
        "bind 127.0.0.1:8999\n",
        "balance leastconn\n",
        "default-server inter 500ms fall 3 rise 1 maxconn 2\n",
        "timeout server 300s\n",
        "listen stats\n",
    ):
        assert setting in text


async def test_an_empty_backend_is_still_a_valid_configuration(
    haproxy_bin: str, tmp_path: Path
) -> None:
    path = await render(tmp_path, context({}, {"backend_layer": "nobody"}))
    result = check(haproxy_bin, path)
    assert result.returncode == 0, result.stderr
    assert "    server " not in path.read_text()


def live_settings(port: int) -> dict[str, Any]:
    """Loopback, no privilege drop and no syslog, so any user can run it in a test."""
    return {"bind": f"127.0.0.1:{port}", "log": "", "user": "", "group": ""}


async def test_haproxy_balances_round_robin_across_every_client(
    tmp_path: Path, backends: dict[str, NamedServer], start_haproxy: Any
) -> None:
    port = free_port()
    path = await render(tmp_path, context(backend_ports(backends), live_settings(port)))
    proxy = start_haproxy(path, port)
    answers = Counter(proxy.get()[1] for _ in range(8))
    assert answers == {name: 2 for name in backends}
    assert proxy.get("/haproxy-health")[0] == 200
    assert proxy.stop() == 0


async def test_haproxy_retries_elsewhere_when_a_client_refuses_connections(
    tmp_path: Path, backends: dict[str, NamedServer], start_haproxy: Any
) -> None:
    port = free_port()
    path = await render(tmp_path, context(backend_ports(backends), live_settings(port)))
    backends["web-2-client1"].stop()
    proxy = start_haproxy(path, port)
    # HAProxy starts with every server up; until checks mark this one down (three refused,
    # 500 ms apart), "retries 2" and "option redispatch 1" send its share to the others.
    answers = Counter(proxy.get() for _ in range(12))
    assert {status for status, _ in answers} == {200}
    assert {body for _, body in answers} == set(backends) - {"web-2-client1"}
    assert proxy.stop() == 0


async def test_the_roll_waits_until_haproxy_counts_a_client_up(
    tmp_path: Path, backends: dict[str, NamedServer], start_haproxy: Any
) -> None:
    """restart.balancer: HAProxy's stats page (the template's stats_bind) says which
    clients it sends requests to; a client it counts DOWN is waited for, then passes."""
    port, stats = free_port(), free_port()
    settings = {**live_settings(port), "stats_bind": f"127.0.0.1:{stats}"}
    path = await render(tmp_path, context(backend_ports(backends), settings))
    proxy = start_haproxy(path, port)
    gate = BalancerGate(
        stats_url=f"http://127.0.0.1:{stats}/",
        backend="zeo_clients",
        servers={"client1": "web-1-client1", "client2": "web-1-client2", "ghost": "web-9-x"},
        interval=0.1,
    )
    bound = 60.0  # bounds a hang; each wait ends as soon as HAProxy's state allows

    await wait_in_service(gate, "client1", deadline=time.monotonic() + bound)
    assert await wait_in_service(gate, "celery", deadline=time.monotonic()) == 0.0  # not HAProxy's
    with structlog.testing.capture_logs() as logs:
        await wait_in_service(gate, "ghost", deadline=time.monotonic() + bound)
    assert [e["server"] for e in logs if e["event"] == "restart.balancer_unknown"] == ["web-9-x"]

    stopped = backends["web-1-client2"]
    stopped.stop()
    csv_page = f"http://127.0.0.1:{stats}/;csv"
    wait_until(lambda: status_of(csv_page, "web-1-client2") == "DOWN", bound, "never DOWN")
    with pytest.raises(HealthCheckFailed, match=r"zeo_clients/web-1-client2.*HAProxy says DOWN"):
        await wait_in_service(gate, "client2", deadline=time.monotonic() + 0.5)

    backends["web-1-client2"] = NamedServer("web-1-client2", stopped.port)
    with structlog.testing.capture_logs() as logs:
        await wait_in_service(gate, "client2", deadline=time.monotonic() + bound)
    assert [e["status"] for e in logs if e["event"] == "restart.balancer_up"] == ["UP"]
    assert proxy.stop() == 0


def status_of(csv_page: str, server: str) -> str | None:
    with urllib.request.urlopen(csv_page, timeout=5) as response:
        return server_status(response.read().decode(), "zeo_clients", server)


def row_of(csv_page: str, server: str) -> dict[str, str]:
    """One server's row, read with the test's stats_auth credentials."""
    request = urllib.request.Request(csv_page)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"agent:s3cret").decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        row = server_row(response.read().decode(), "zeo_clients", server)
    assert row is not None, server
    return row


async def test_a_client_is_drained_before_it_stops_and_set_ready_again(
    tmp_path: Path, backends: dict[str, NamedServer], start_haproxy: Any
) -> None:
    """restart.balancer.drain through the stats page's admin form (with stats_auth): HAProxy
    sends a drained client no new request, and drain() returns only once the answer it was
    sending is done; a refused form is a warning that never shows the password."""
    port, stats = free_port(), free_port()
    settings = {
        **live_settings(port),
        "stats_bind": f"127.0.0.1:{stats}",
        "stats_auth": "agent:s3cret",
    }
    path = await render(tmp_path, context(backend_ports(backends), settings))
    proxy = start_haproxy(path, port)
    page = f"http://agent:s3cret@127.0.0.1:{stats}/"
    gate = BalancerGate(
        stats_url=page,
        backend="zeo_clients",
        servers={"client1": "web-1-client1"},
        interval=0.05,
        drain_timeout=120,  # bounds a hang; the drain ends when the held answer is done
    )
    csv_page = f"http://127.0.0.1:{stats}/;csv"
    wait_until(lambda: row_of(csv_page, "web-1-client1")["status"] == "UP", 30, "never UP")
    # One long answer per server (round robin), so web-1-client1 is busy answering one.
    held = [
        threading.Thread(target=lambda: answers.append(proxy.get("/hold")), daemon=True)
        for _ in backends
    ]
    answers: list[tuple[int, str]] = []
    for thread in held:
        thread.start()
    wait_until(lambda: row_of(csv_page, "web-1-client1")["scur"] == "1", 30, "never busy")

    draining = asyncio.create_task(drain(gate, ["client1"]))
    await wait_until_async(
        lambda: row_of(csv_page, "web-1-client1")["status"] == "DRAIN", 30, "never DRAIN"
    )
    served = Counter(proxy.get()[1] for _ in range(6))
    assert "web-1-client1" not in served and sum(served.values()) == 6
    assert not draining.done()  # still answering the long request

    backends["web-1-client1"].release.set()
    seconds = await asyncio.wait_for(draining, timeout=120)
    assert seconds > 0
    assert row_of(csv_page, "web-1-client1")["scur"] == "0"
    wait_until(lambda: (200, "web-1-client1") in answers, 30, "the held answer never came")

    assert await set_state(gate, ["client1"], "ready")
    wait_until(lambda: row_of(csv_page, "web-1-client1")["status"] == "UP", 30, "never ready")
    assert "web-1-client1" in {proxy.get()[1] for _ in range(8)}

    wrong = BalancerGate(
        stats_url=f"http://agent:wrong-pass@127.0.0.1:{stats}/",
        backend="zeo_clients",
        servers={"client1": "web-1-client1"},
    )
    with structlog.testing.capture_logs() as logs:
        assert await drain(wrong, ["client1"]) == 0.0
    [refused] = [e for e in logs if e["event"] == "restart.balancer_refused"]
    assert "401" in refused["verdict"] and "wrong-pass" not in str(logs)
    assert row_of(csv_page, "web-1-client1")["status"] == "UP"
    for server in backends.values():
        server.release.set()
    assert proxy.stop() == 0
