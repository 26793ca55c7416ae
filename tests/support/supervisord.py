"""A private, real supervisord per test, and tiny HTTP programs for it to run.

Usage::

    with running_supervisord(tmp_path) as sv:          # or http=True for an inet server
        sv.add_program("client1", port=free_port())    # conf.d/client1.conf
        sv.reload()                                    # supervisorctl update
        ... SupervisorClient(sv.url) ...

Teardown (even after a failed test) stops supervisord, and kills any child it left.
The unix socket lives in a short temporary directory: pytest's tmp_path can exceed the
~107 byte limit of a socket path.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from supervisor.xmlrpc import SupervisorTransport

from support.ports import free_port
from support.processes import children, wait_until

SERVER_SCRIPT = textwrap.dedent(
    '''
    """Tiny HTTP program: 200 on every GET in mode ok, 503 in mode bad (never healthy).

    Exits at once (status 3) while a file <name>.crash exists next to the start log.
    """
    import http.server, os, sys, time

    name, port, mode, tag, startlog = sys.argv[1:6]
    port = int(port)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{name} {tag} {os.getpid()}".encode()
            self.send_response(200 if mode == "ok" else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    if os.path.exists(os.path.join(os.path.dirname(startlog), name + ".crash")):
        sys.exit(3)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    with open(startlog, "a") as log:
        log.write(f"{name} {os.getpid()} {time.time():.6f}\\n")
    server.serve_forever()
    '''
)


@dataclass
class Supervisord:
    """A running private supervisord; add, change and remove programs through conf.d."""

    root: Path
    socket_path: Path
    process: subprocess.Popen[bytes]
    http_port: int | None = None
    username: str = "agent"
    password: str = field(default_factory=lambda: secrets.token_hex(8))
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def http_url(self) -> str:
        assert self.http_port is not None, "start with http=True"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def conf_d(self) -> Path:
        return self.root / "conf.d"

    @property
    def start_log(self) -> Path:
        """Lines "name pid unix_time" appended by each HTTP program when it starts serving."""
        return self.root / "starts.log"

    def starts(self) -> list[tuple[str, int, float]]:
        if not self.start_log.exists():
            return []
        rows = [line.split() for line in self.start_log.read_text().splitlines()]
        return [(name, int(pid), float(at)) for name, pid, at in rows]

    def program_command(self, name: str, port: int, *, mode: str = "ok", tag: str = "v1") -> str:
        script = self.root / "httpserver.py"
        return f"{sys.executable} {script} {name} {port} {mode} {tag} {self.start_log}"

    def add_program(
        self,
        name: str,
        *,
        port: int | None = None,
        mode: str = "ok",
        tag: str = "v1",
        command: str | None = None,
        autostart: bool = True,
        startsecs: int = 0,
        startretries: int = 1,
    ) -> int:
        """Write conf.d/<name>.conf for an HTTP program (or ``command``); returns its port.

        Nothing changes in supervisord until reload() (or the code under test) applies it.
        """
        port = port or self.ports.get(name) or free_port()
        if command is None:
            self.ports[name] = port
            command = self.program_command(name, port, mode=mode, tag=tag)
        (self.conf_d / f"{name}.conf").write_text(
            f"[program:{name}]\ncommand = {command}\nautostart = {str(autostart).lower()}\n"
            f"autorestart = true\nstartsecs = {startsecs}\nstartretries = {startretries}\n"
            "stopwaitsecs = 5\nstopasgroup = true\nkillasgroup = true\n"
            f"redirect_stderr = true\nstdout_logfile = {self.root / 'logs' / name}.log\n"
        )
        return port

    def crash_on_start(self, name: str) -> None:
        """From now on, program ``name`` exits at once whenever it is started."""
        (self.root / f"{name}.crash").touch()

    def remove_program(self, name: str) -> None:
        (self.conf_d / f"{name}.conf").unlink()

    def call(self, method: str, *args: Any) -> Any:
        """One synchronous XML-RPC call, made as supervisorctl makes it (test-side truth)."""
        transport = SupervisorTransport(None, None, self.url)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        finally:
            transport.close()

    def reload(self) -> None:
        """Apply conf.d to the running supervisord, like `supervisorctl update`, and wait
        until every autostarted program is RUNNING."""
        [[added, changed, removed]] = self.call("reloadConfig")
        for group in [*removed, *changed]:
            self.call("stopProcessGroup", group)
            self.call("removeProcessGroup", group)
        for group in [*changed, *added]:
            self.call("addProcessGroup", group)
        self.wait_serving()

    def wait_serving(self, timeout: float = 10.0) -> None:
        """Wait until every program is RUNNING and every HTTP program has bound its port
        (RUNNING alone comes before the port with startsecs = 0)."""
        infos: list[dict[str, Any]] = []

        def serving() -> bool:
            infos[:] = self.call("getAllProcessInfo")
            started = {pid for _, pid, _ in self.starts()}
            return all(
                i["statename"] == "RUNNING" and (i["name"] not in self.ports or i["pid"] in started)
                for i in infos
            )

        wait_until(serving, timeout, lambda: f"programs not serving after {timeout}s: {infos}")

    def pids(self) -> dict[str, int]:
        return {i["name"]: i["pid"] for i in self.call("getAllProcessInfo")}

    def stop(self) -> None:
        """Stop supervisord and make sure no program it started survives it.

        supervisord's own shutdown stops programs one at a time in 1 s poll ticks, which
        would cost every test seconds. So: SIGTERM it, poke it over XML-RPC until it is in
        SHUTDOWN (from then on it restarts nothing), terminate the programs ourselves, and
        let it exit; anything that does not is killed.
        """
        below = children(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self._wait_for_shutdown_state()
        for child in below:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        self._wait_for_exit()
        _, alive = psutil.wait_procs(below, timeout=2)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()

    def _wait_for_exit(self, timeout: float = 10.0) -> None:
        """Wait for supervisord to exit, poking it so it does not sleep out a poll tick."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.process.wait(timeout=0.05)
                return
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError, xmlrpc.client.Error):
                    self.call("getState")
        self.process.kill()
        self.process.wait(timeout=5)

    def _wait_for_shutdown_state(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.call("getState")
            except xmlrpc.client.Fault:
                return  # SHUTDOWN_STATE: the signal has been handled
            except (OSError, xmlrpc.client.Error):
                return  # no longer answering: shutting down or gone
            time.sleep(0.01)


def _write_config(
    root: Path,
    socket_path: Path,
    http_port: int | None,
    sv: dict[str, str],
    include: Sequence[str] = (),
) -> Path:
    inet = (
        f"[inet_http_server]\nport = 127.0.0.1:{http_port}\n"
        f"username = {sv['username']}\npassword = {sv['password']}\n\n"
        if http_port
        else ""
    )
    config = root / "supervisord.conf"
    config.write_text(
        f"[unix_http_server]\nfile = {socket_path}\nchmod = 0700\n\n{inet}"
        f"[supervisord]\nlogfile = {root / 'supervisord.log'}\npidfile = {root / 'sv.pid'}\n"
        f"childlogdir = {root / 'logs'}\nnodaemon = true\nloglevel = info\n\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl = unix://{socket_path}\n\n"
        f"[include]\nfiles = {' '.join([str(root / 'conf.d' / '*.conf'), *include])}\n"
    )
    return config


def _launch(config: Path, root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(config), "-n"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=root,
    )


def _wait_until_answering(sv: Supervisord, timeout: float = 15.0) -> None:
    def answering() -> bool:
        if sv.process.poll() is not None:
            log = (sv.root / "supervisord.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"supervisord exited with {sv.process.returncode}:\n{log}")
        try:
            return bool(sv.call("getState")["statename"] == "RUNNING")
        except (OSError, xmlrpc.client.Error):
            return False

    wait_until(
        answering, timeout, f"supervisord did not answer on {sv.socket_path} within {timeout}s"
    )


@contextmanager
def running_supervisord(
    root: Path, *, http: bool = False, include: Sequence[str] = ()
) -> Iterator[Supervisord]:
    """Start supervisord with its config under ``root``; stop it (and its children) after.

    ``include``: more globs for its [include] section, e.g. a deployed app's
    ``<root>/<app>/current/etc/supervisor/*.conf``."""
    (root / "conf.d").mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / "httpserver.py").write_text(SERVER_SCRIPT)
    sock_dir = Path(tempfile.mkdtemp(prefix="sv-"))
    socket_path = sock_dir / "supervisor.sock"
    http_port = free_port() if http else None
    credentials = {"username": "agent", "password": secrets.token_hex(8)}
    config = _write_config(root, socket_path, http_port, credentials, include)
    process = _launch(config, root)
    sv = Supervisord(root=root, socket_path=socket_path, process=process, http_port=http_port)
    sv.username, sv.password = credentials["username"], credentials["password"]
    try:
        _wait_until_answering(sv)
        yield sv
    finally:
        sv.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@contextmanager
def supervisord_again(sv: Supervisord, timeout: float = 15.0) -> Iterator[Supervisord]:
    """Start supervisord again from the same configuration (same socket, same includes)
    after ``sv.stop()``, as `systemctl start supervisor` would; stopped on the way out."""
    process = _launch(sv.root / "supervisord.conf", sv.root)
    again = Supervisord(root=sv.root, socket_path=sv.socket_path, process=process)
    try:
        _wait_until_answering(again, timeout)
        yield again
    finally:
        again.stop()
