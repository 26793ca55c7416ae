"""A private, real Mosquitto per test, and small synchronous paho clients to observe it.

Usage::

    with running_mosquitto(tmp_path) as broker:      # passwords={"agent": "pw"} for auth
        ... BrokerConfig(port=broker.port) ...
        broker.stop(); broker.start()                 # same port, same persistence file
        broker.kill()                                 # SIGKILL

    with Collector(broker.port, ["a/#"]) as seen:     # a paho client in its own thread
        publish(broker.port, "a/b", b"x")
        seen.wait_for(1)                              # or: await seen.gathered(1)

The broker persists to its directory (autosave every second), so persistent sessions,
their queued QoS 1 messages and retained messages survive ``stop()``/``start()``.
Teardown kills it even when the test failed. A missing binary fails under CI and skips
only on a developer's machine (support.components).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from support.components import require_binary
from support.ports import free_port
from support.processes import WaitTimeout, wait_until, wait_until_async


def _password_file(directory: Path, passwords: dict[str, str]) -> Path:
    """A Mosquitto password file made by mosquitto_passwd (hashed, as in production)."""
    tool = require_binary("mosquitto_passwd", "mosquitto")
    path = directory / "passwords"
    path.touch(mode=0o600)
    for user, password in passwords.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


class Mosquitto:
    """One broker process on a fixed loopback port, restartable with its state."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        passwords: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.log_path = directory / "mosquitto.log"
        self.config_path = directory / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None
        self._binary = require_binary("mosquitto")
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config(passwords or {}))

    def _config(self, passwords: dict[str, str]) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if passwords else 'true'}",
            "persistence true",
            "set_tcp_nodelay true",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            f"log_dest file {self.log_path}",
            "log_type all",
        ]
        if passwords:
            lines.append(f"password_file {_password_file(self.directory, passwords)}")
        if os.geteuid() == 0:
            # As root Mosquitto switches to the user "mosquitto", who cannot read tmp_path.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (again) on the same port with the same persistence file."""
        assert not self.running, "already running"
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_until(self._listening, timeout, f"mosquitto did not listen on {self.port}")
        except WaitTimeout as exc:
            self.kill()
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from None

    def _listening(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"mosquitto exited at start-up:\n{self.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM: Mosquitto saves its database and closes client connections cleanly."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._end(signal.SIGKILL, 5.0)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_saved(self, timeout: float = 60.0) -> None:
        """Wait until everything the broker had when this was called is on disk: two more
        autosaves must start (a save logs when it begins; the second begins after the first
        ended), so a SIGKILL from now on keeps it. The timeout only bounds a hang."""
        marker = "Saving in-memory database"
        before = self.log_text().count(marker)
        wait_until(
            lambda: self.log_text().count(marker) >= before + 2,
            timeout,
            lambda: f"the broker never saved:\n{self.log_tail()}",
            interval=0.05,
        )


@contextmanager
def running_mosquitto(
    directory: Path,
    *,
    port: int | None = None,
    passwords: dict[str, str] | None = None,
) -> Iterator[Mosquitto]:
    """A started private broker, killed on the way out whatever happened.

    ``passwords`` (user -> password) turns anonymous access off.
    """
    broker = Mosquitto(directory, port=port, passwords=passwords)
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


def _paho_client(client_id: str | None, clean_session: bool) -> paho.Client:
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
        clean_session=clean_session,
        protocol=paho.MQTTv311,
    )


class Collector:
    """A paho client on its own thread that records every message on ``topics`` (QoS 1).

    With a ``client_id`` and ``clean_session=False`` it keeps a persistent session, and
    reconnects on its own after a broker restart.
    """

    def __init__(
        self,
        port: int,
        topics: Sequence[str],
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topics = list(topics)
        self._client = _paho_client(client_id, clean_session)
        # paho annotates ints but sleeps floats; a quick return after a broker restart.
        self._client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port, keepalive=30)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise TimeoutError(f"collector could not subscribe to {self._topics}")

    def _on_connect(self, client: paho.Client, userdata: Any, *args: Any) -> None:
        client.subscribe([(topic, 1) for topic in self._topics])

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(
                Received(message.topic, bytes(message.payload), bool(message.retain), message.qos)
            )

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.snapshot() if topic is None or m.topic == topic]

    def wait_for(self, count: int, timeout: float = 10.0, topic: str | None = None) -> list[bytes]:
        """Block until ``count`` messages (on ``topic``) arrived; their payloads."""
        wait_until(
            lambda: self._arrived(count, topic), timeout, lambda: self._missing(count, topic)
        )
        return self.payloads(topic)

    async def gathered(
        self, count: int, timeout: float = 10.0, topic: str | None = None
    ) -> list[bytes]:
        """``wait_for`` for async tests: lets the event loop run while waiting."""
        await wait_until_async(
            lambda: self._arrived(count, topic), timeout, lambda: self._missing(count, topic)
        )
        return self.payloads(topic)

    def _arrived(self, count: int, topic: str | None) -> bool:
        return len(self.payloads(topic)) >= count

    def _missing(self, count: int, topic: str | None) -> str:
        return f"expected {count} messages on {topic or self._topics}: {self.payloads(topic)}"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Collector:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def publish(port: int, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
    """Publish one message and wait until the broker confirmed it."""
    client = _paho_client(None, True)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError(f"no CONNACK from the broker on port {port}")
        info = client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise TimeoutError(f"broker did not confirm {topic}")
    finally:
        client.disconnect()
        client.loop_stop()


def retained(port: int, topic: str, timeout: float = 5.0) -> Received:
    """The retained message on ``topic`` as a fresh subscriber sees it."""
    with Collector(port, [topic]) as seen:
        seen.wait_for(1, timeout)
        return seen.snapshot()[0]
