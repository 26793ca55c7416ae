"""What ships beside the code: the systemd unit, the Mosquitto configuration and ACL, and the
configurations shown in the guides. Each is checked against the real thing it configures."""

from __future__ import annotations

import configparser
import datetime as dt
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from support.agents import AgentProcess, Operator
from support.cli import run_cli
from support.components import require_binary
from support.ports import free_port
from support.site import REPO, SiteRepo

from agent.adapters.configfile import load_config
from agent.adapters.host import HostFacts
from agent.adapters.releases import ReleaseManager
from agent.core.config import AgentConfig
from agent.core.plan import Member
from agent.node.pipeline import Pipeline
from agent.protocol import Topics, encode

UNIT = REPO / "systemd" / "deploy-agent.service"
MOSQUITTO_CONF = REPO / "config" / "mosquitto.conf"
MOSQUITTO_ACL = REPO / "config" / "mosquitto.acl"
MIGRATION = REPO / "docs" / "migration-from-opsworks.md"
OPERATOR, CI_USER = "alice@ops", "ci@ops"
MYSITE = Topics("deploy-agent", "mysite")
#: Agent accounts of the shipped ACL: `<stack>-<instance>`, stack "mysite".
WEB1, WEB2 = "mysite-web-1", "mysite-web-2"
PASSWORDS = {WEB1: "pw-web-1", WEB2: "pw-web-2", OPERATOR: "pw-alice", CI_USER: "pw-ci"}


# --- the systemd unit -------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    """A systemd time span such as ``660``, ``11min`` or ``10min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, suffix in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[suffix]
    return total


def test_unit_is_a_notify_service_running_the_agent_with_its_config() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == (
        "/opt/deploy-agent/bin/deploy-agent run --config /etc/deploy-agent/agent.yaml"
    )
    assert service["User"] == "deploy-agent"
    assert service["StateDirectory"] == "deploy-agent"
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_restarts_on_failure_but_not_on_a_configuration_error() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2"]
    from agent.core.exits import EXIT_USAGE

    assert EXIT_USAGE == 2


def test_unit_lets_a_running_deploy_finish_before_systemd_kills_it() -> None:
    service = unit()["Service"]
    grace = AgentConfig.model_fields["shutdown_grace"].default
    assert seconds(service["TimeoutStopSec"]) > grace
    assert service["KillMode"] == "mixed"
    assert seconds(service["WatchdogSec"]) > 0


def test_unit_is_hardened_and_can_still_write_where_deploys_write() -> None:
    service = unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "read-only"
    assert service["PrivateTmp"] == "yes"
    writable = service["ReadWritePaths"].split()
    assert "/srv/deploy" in writable
    assert "-/etc/haproxy" in writable
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]  # psutil's interface addresses


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_binary("systemd-analyze", "systemd")  # a failure under CI, never a skip
    # verify checks that ExecStart exists: point it at this checkout's console script.
    script = Path(sys.executable).parent / "deploy-agent"
    text = UNIT.read_text().replace("/opt/deploy-agent/bin/deploy-agent", str(script))
    copy = tmp_path / "deploy-agent.service"
    copy.write_text(text)
    result = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings


# --- configurations shown to users pass `deploy-agent config check` ---------------------


def config_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("config", "check", str(path))


def fenced(markdown: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown.read_text(), re.M | re.S)


def guide_agent_config(tmp_path: Path) -> Path:
    blocks = [b for b in fenced(MIGRATION, "yaml") if "stack_config:" in b]
    assert len(blocks) == 1, "the guide shows one agent configuration"
    path = tmp_path / "agent.yaml"
    path.write_text(blocks[0])
    return path


def test_example_config_passes_config_check() -> None:
    result = config_check(REPO / "config" / "agent.example.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_migration_guide_agent_config_passes_config_check(tmp_path: Path) -> None:
    result = config_check(guide_agent_config(tmp_path))
    assert result.returncode == 0, result.stderr


def test_migration_guide_takes_the_custom_json_as_it_is(tmp_path: Path) -> None:
    (custom_json,) = fenced(MIGRATION, "json")
    config = load_config(guide_agent_config(tmp_path))
    assert config.stack_config == json.loads(custom_json)


def test_migration_guide_shows_the_deploy_cfg_the_renderer_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guide's inputs (web-1: 2 CPUs, 4 GB; the fleet below; a cookbook base.cfg)
    give its deploy.cfg."""
    base = "[buildout]\nparts =\n\n[client1]\nrecipe = plone.recipe.zope2instance\n"

    # The guide's repository is not here: its base.cfg at that revision is read as this.
    def read_file(self: ReleaseManager, sha: str, path: str) -> str | None:
        return base if path == "cfg/base.cfg" else None

    monkeypatch.setattr(ReleaseManager, "read_file", read_file)
    config = load_config(guide_agent_config(tmp_path))
    members = (
        Member("db-1", "10.0.1.5", ("zeoserver",)),
        Member("lb-1", "10.0.1.2", ("frontend",)),
        Member("web-1", "10.0.1.11", ("plone_instances",)),
        Member("web-2", "10.0.1.12", ("plone_instances",)),
    )
    pipeline = Pipeline(
        config, facts=HostFacts(cpu_count=2, memory_mb=4096), members=lambda: members
    )
    rendered = pipeline.render(
        "plone_instances", "3f2a9c1e7b5d4a6f8e0c2b1a9d7f5e3c1b0a8f6e", pipeline.settings()
    )
    shown = [b for b in fenced(MIGRATION, "ini") if b.startswith("# generated by deploy-agent")]
    assert len(shown) == 1
    assert shown[0] == rendered.decode()


# --- the broker: the shipped configuration and ACL on a real Mosquitto -------------------


def self_signed_tls(directory: Path) -> dict[str, Path]:
    """A CA and a broker certificate for 127.0.0.1, as PEM files."""
    now = dt.datetime.now(dt.UTC)

    def build(
        subject: str,
        issuer: x509.Name | None,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, broker_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca_cert = build("deploy-agent test CA", None, ca_key, ca_key, ca=True)
    broker_cert = build("127.0.0.1", ca_cert.subject, broker_key, ca_key, ca=False)
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(broker_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        broker_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    paths["key"].chmod(0o600)
    return paths


def adapted_config(directory: Path, port: int, tls: dict[str, Path], passwd: Path) -> str:
    """The shipped mosquitto.conf with its paths moved into ``directory``; nothing else."""
    replace = {
        "persistence_location": f"{directory}/",
        "log_dest": f"file {directory}/mosquitto.log",
        "password_file": str(passwd),
        "acl_file": str(MOSQUITTO_ACL),
        "listener": f"{port} 127.0.0.1",
        "cafile": str(tls["ca"]),
        "certfile": str(tls["cert"]),
        "keyfile": str(tls["key"]),
    }
    lines: list[str] = []
    seen: set[str] = set()
    for line in MOSQUITTO_CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "pid_file":
            continue
        if key in replace:
            seen.add(key)
            line = f"{key} {replace[key]}"
        lines.append(line)
    assert seen == set(replace), f"mosquitto.conf lost {set(replace) - seen}"
    if os.geteuid() == 0:
        lines.append("user root")  # as root Mosquitto drops to "mosquitto", who cannot read tmp
    return "\n".join(lines) + "\n"


def password_file(directory: Path) -> Path:
    tool = require_binary("mosquitto_passwd")
    path = directory / "passwd"
    path.touch(mode=0o600)
    for user, password in PASSWORDS.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
    return path


@dataclass(frozen=True)
class Broker:
    """A running Mosquitto with the shipped configuration: its port and its CA."""

    port: int
    ca: Path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    binary = require_binary("mosquitto")
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    tls = self_signed_tls(directory)
    port = free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(adapted_config(directory, port, tls, password_file(directory)))
    with (directory / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_listening(process, port, directory)
        yield Broker(port, tls["ca"])
    finally:
        process.kill()
        process.wait(10)


def wait_listening(process: subprocess.Popen[bytes], port: int, directory: Path) -> None:
    """Until the port answers; a broker that exits refused its configuration: show why."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = directory / "mosquitto.log"
            text = log.read_text() if log.exists() else (directory / "stderr.log").read_text()
            raise RuntimeError(f"mosquitto refused the shipped configuration:\n{text}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not listen")


class Client:
    """A paho client over TLS with a username, recording what it receives."""

    def __init__(self, broker: Broker, username: str | None, password: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.reason: Any = None
        self.granted: list[Any] = []
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
        )
        self.client.tls_set(ca_certs=str(broker.ca))
        if username is not None:
            self.client.username_pw_set(username, password or PASSWORDS[username])
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise TimeoutError("no CONNACK")

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.reason = reason
        self.connected.set()

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[Any], properties: Any
    ) -> None:
        self.granted = codes
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    @property
    def refused(self) -> bool:
        return bool(self.reason.is_failure)

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the SUBACK. Mosquitto grants any subscription and
        applies the ACL on delivery, so tests check what arrives, not the SUBACK."""
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), "no SUBACK"
        assert not any(code.is_failure for code in self.granted), topic

    def publish(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def topics(self) -> list[str]:
        with self.lock:
            return [topic for topic, _ in self.messages]

    def wait_for(self, topic: str, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while topic not in self.topics() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert topic in self.topics(), f"{topic} never arrived: {self.topics()}"
        return self.topics()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


P = "deploy-agent/mysite"
OTHER = "deploy-agent/prod"


def test_broker_refuses_anonymous_clients_and_wrong_passwords(broker: Broker) -> None:
    anonymous = Client(broker, None)
    wrong = Client(broker, WEB1, "not-the-password")
    try:
        assert anonymous.refused
        assert wrong.refused
    finally:
        anonymous.close()
        wrong.close()


def test_agent_may_announce_itself_but_not_another_instance_nor_command(
    broker: Broker,
) -> None:
    operator, agent = Client(broker, OPERATOR), Client(broker, WEB1)
    try:
        operator.subscribe("deploy-agent/#")
        for denied in (
            f"{P}/instances/web-2",
            f"{P}/events/web-2",
            f"{P}/status/web-2",
            f"{P}/commands",
            f"{P}/config",
            # Its own id under another stack: joining stack prod is refused too.
            f"{OTHER}/instances/web-1",
            f"{OTHER}/events/web-1",
            f"{OTHER}/status/web-1",
            f"{OTHER}/logs/web-1",
            f"{OTHER}/commands",
        ):
            agent.publish(denied)
        for allowed in ("events", "status", "logs", "instances"):  # instances last: the marker
            agent.publish(f"{P}/{allowed}/web-1")
        # One publisher's QoS 1 messages arrive in order: all of them are in once the last is.
        seen = operator.wait_for(f"{P}/instances/web-1")
        assert seen == [f"{P}/{name}/web-1" for name in ("events", "status", "logs", "instances")]
    finally:
        operator.close()
        agent.close()


def test_agent_reads_commands_config_and_presence_but_not_the_others_results(
    broker: Broker,
) -> None:
    """Mosquitto grants every subscription and filters on delivery: check what arrives."""
    agent, other = Client(broker, WEB1), Client(broker, WEB2)
    operator = Client(broker, OPERATOR)
    try:
        for topic in ("events", "status", "logs", "instances"):
            agent.subscribe(f"deploy-agent/+/{topic}/+")
        agent.subscribe("deploy-agent/+/config")
        agent.subscribe("deploy-agent/+/commands")
        # Another stack's retained configuration, commands and presences: never delivered.
        operator.publish(f"{OTHER}/config", retain=True)
        operator.publish(f"{OTHER}/commands")
        operator.publish(f"{OTHER}/instances/web-9", retain=True)
        for topic in ("events", "status", "logs", "instances"):  # instances last: the marker
            other.publish(f"{P}/{topic}/web-2")
        assert agent.wait_for(f"{P}/instances/web-2") == [f"{P}/instances/web-2"]
    finally:
        agent.close()
        other.close()
        operator.close()


def test_an_agent_account_cannot_read_another_stack_even_when_subscribing_late(
    broker: Broker,
) -> None:
    """Retained messages of another stack are filtered on the replay too."""
    operator = Client(broker, OPERATOR)
    agent = None
    try:
        operator.publish(f"{OTHER}/config", retain=True)
        operator.publish(f"{OTHER}/instances/db-1", retain=True)
        operator.publish(f"{P}/config", retain=True)  # the marker: our own stack's config
        agent = Client(broker, WEB1)
        agent.subscribe("deploy-agent/#")
        assert agent.wait_for(f"{P}/config") == [f"{P}/config"]
    finally:
        operator.close()
        if agent is not None:
            agent.close()


def test_operator_may_publish_commands_and_config_that_agents_receive(broker: Broker) -> None:
    operator, agent = Client(broker, OPERATOR), Client(broker, WEB1)
    try:
        agent.subscribe(f"{P}/commands")
        agent.subscribe(f"{P}/config")
        operator.publish(f"{P}/config", retain=True)
        operator.publish(f"{P}/commands")
        assert agent.wait_for(f"{P}/commands") == [f"{P}/config", f"{P}/commands"]
    finally:
        operator.close()
        agent.close()


def test_ci_user_may_deploy_its_stack_only(broker: Broker) -> None:
    """The shipped ACL gives the user ci@ops the stack mysite (as docs/ci.md shows)."""
    mine = "deploy-agent/mysite"
    ci, agent = Client(broker, CI_USER), Client(broker, WEB1)
    try:
        agent.subscribe("deploy-agent/+/commands")
        agent.subscribe(f"{mine}/config")
        ci.subscribe(f"{mine}/logs/+")
        ci.subscribe(f"{mine}/events/+")
        ci.publish(f"{OTHER}/commands")
        ci.publish(f"{mine}/config")
        ci.publish(f"{mine}/commands")
        assert agent.wait_for(f"{mine}/commands") == [f"{mine}/commands"]
        agent.publish(f"{mine}/logs/web-1")
        agent.publish(f"{mine}/events/web-1")
        assert ci.wait_for(f"{mine}/events/web-1") == [f"{mine}/events/web-1"]
    finally:
        ci.close()
        agent.close()


def test_real_agent_runs_through_tls_and_the_acl(
    broker: Broker, site_repo: SiteRepo, tmp_path: Path
) -> None:
    """Everything `deploy-agent run` subscribes and publishes is allowed for its instance."""
    secret = tmp_path / "broker.pass"
    secret.write_text(PASSWORDS[WEB1] + "\n")
    secret.chmod(0o600)
    operator = Operator.create(broker.port, tmp_path / "operator")
    agent = AgentProcess.create(
        tmp_path,
        port=broker.port,
        repo=site_repo,
        operator=operator,
        address="127.0.0.1",
        stack="mysite",
        broker={
            "host": "127.0.0.1",
            "port": broker.port,
            "keepalive": 5,
            "username": WEB1,
            "password_file": str(secret),
            "tls": {"ca": str(broker.ca)},
        },
    )
    watcher = Client(broker, OPERATOR)
    try:
        watcher.subscribe("deploy-agent/#")
        agent.start()
        agent.wait_logged("mqtt.connected")
        watcher.wait_for(MYSITE.instance("web-1"))
        # The barrier (our own presence coming back) passes on the shipped ACL.
        agent.wait_logged("fleet.synced")
        unsigned = operator.command("deploy", sign=False)
        watcher.publish(MYSITE.commands, encode(unsigned))
        watcher.wait_for(MYSITE.events("web-1"))
        assert not [e for e in agent.logs() if e.get("event") == "mqtt.subscribe_refused"]
        assert not [e for e in agent.logs() if e.get("event") == "fleet.barrier_timeout"]
    finally:
        assert agent.stop(timeout=30) == 0, agent.tail()
        watcher.close()
    offline = [json.loads(p) for t, p in watcher.messages if t == MYSITE.instance("web-1")]
    assert offline[-1]["state"] == "stopped"
