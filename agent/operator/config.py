"""The operator's client: where it finds its broker, stack and signing key, how it
connects (a short clean session with a random client id, never an agent's identity),
how it reads what the agents retained, and the stack configuration it pushes.

Sources, each setting taken from the first that has it: the ``--config`` file (a small
operator YAML, or an agent configuration with ``broker`` and ``stack``), then the
environment (``DEPLOY_AGENT_BROKER``, ``DEPLOY_AGENT_STACK``, ``DEPLOY_AGENT_KEY``,
``DEPLOY_AGENT_TOPIC_PREFIX``), which is what a CI job uses.
"""

from __future__ import annotations

import asyncio
import getpass
import secrets
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.adapters.configfile import read_secret
from agent.adapters.keys import load_private_key
from agent.adapters.tls import client_context
from agent.core.config import BrokerConfig, Model, TlsConfig, parse_config
from agent.core.errors import BrokerUnreachable, ConfigError
from agent.core.names import Label, Name
from agent.core.stackconfig import stack_settings
from agent.protocol import (
    DEFAULT_TOPIC_PREFIX,
    MAX_PAYLOAD_BYTES,
    Event,
    InvalidMessage,
    Presence,
    SignedConfig,
    StatusRecord,
    Topics,
    encode,
    parse_message,
    sign_config,
)

OPERATOR_KEYS = frozenset({"stack", "broker", "key", "issued_by"})
CONNECT_TIMEOUT = 10.0
QUIET_SECONDS = 0.5  # retained messages arrive in a burst right after SUBACK
RETAINED_LIMIT = 5.0
ENV_BROKER, ENV_STACK = "DEPLOY_AGENT_BROKER", "DEPLOY_AGENT_STACK"
ENV_KEY, ENV_PREFIX = "DEPLOY_AGENT_KEY", "DEPLOY_AGENT_TOPIC_PREFIX"


class OperatorFile(Model):
    """The operator's own configuration file."""

    stack: Name | None = None
    broker: BrokerConfig | None = None
    key: Path | None = None
    issued_by: Label | None = None


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    """Everything an operator session needs, validated once."""

    stack: str
    broker: BrokerConfig
    password: str | None = field(default=None, repr=False)
    key_path: Path | None = None
    issued_by: str
    source: str

    @property
    def topics(self) -> Topics:
        return Topics(self.broker.topic_prefix, self.stack)

    @property
    def address(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def private_key(self) -> Ed25519PrivateKey | None:
        """The signing key, or None when none is configured (commands go unsigned)."""
        return load_private_key(self.key_path) if self.key_path else None


def default_issued_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = "operator"
    return f"{user}@{socket.gethostname()}"


def parse_broker_url(
    url: str, *, topic_prefix: str | None = None
) -> tuple[BrokerConfig, str | None]:
    """``mqtt[s]://[user[:pass]@]host[:port]`` → (broker settings, password)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{ENV_BROKER}: not a broker URL: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(
            f"{ENV_BROKER} must look like mqtt://[user[:pass]@]host[:port] (mqtts:// for TLS)"
        )
    tls = parts.scheme == "mqtts"
    settings: dict[str, Any] = {
        "host": parts.hostname,
        "port": port or (8883 if tls else 1883),
        "topic_prefix": topic_prefix or DEFAULT_TOPIC_PREFIX,
        "username": unquote(parts.username) if parts.username else None,
        "tls": TlsConfig() if tls else None,
    }
    password = unquote(parts.password) if parts.password is not None else None
    try:
        return BrokerConfig.model_validate(settings), password
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise ConfigError(f"{ENV_BROKER}: invalid broker settings: {problem}") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _from_file(path: Path) -> OperatorFile:
    """Read an operator file, or the operator's share of an agent configuration."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys")
    base = path.resolve().parent
    if not set(data) <= OPERATOR_KEYS:
        agent = parse_config(data, source=str(path), base=base)
        return OperatorFile(stack=agent.stack, broker=agent.broker)
    try:
        loaded = OperatorFile.model_validate(data)
    except ValidationError as exc:
        problems = [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors()]
        raise ConfigError(f"{path}: invalid operator configuration", problems) from None
    return _resolve_relative(loaded, base)


def _resolve_relative(loaded: OperatorFile, base: Path) -> OperatorFile:
    def fix(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else (base / value).resolve()

    broker = loaded.broker
    if broker is not None:
        tls = broker.tls and broker.tls.model_copy(
            update={k: fix(getattr(broker.tls, k)) for k in ("ca", "cert", "key")}
        )
        broker = broker.model_copy(update={"password_file": fix(broker.password_file), "tls": tls})
    return loaded.model_copy(update={"key": fix(loaded.key), "broker": broker})


def load_operator_config(
    path: Path | None, *, explicit: bool, environ: Mapping[str, str]
) -> OperatorConfig:
    """Merge the file (if given, or present at the default path) with the environment."""
    source = "environment"
    loaded = OperatorFile()
    if path is not None and (explicit or path.is_file()):
        loaded, source = _from_file(path), str(path)
    broker, password = loaded.broker, None
    if broker is not None:
        password = read_secret(broker.password_file)
    elif environ.get(ENV_BROKER):
        broker, password = parse_broker_url(
            environ[ENV_BROKER], topic_prefix=environ.get(ENV_PREFIX)
        )
    stack = loaded.stack or environ.get(ENV_STACK)
    if broker is None or not stack:
        raise ConfigError(
            f"no broker or stack configured: pass --config FILE (stack, broker, key), "
            f"or set {ENV_BROKER}=mqtt://host:port and {ENV_STACK}=NAME"
        )
    Topics(broker.topic_prefix, stack)  # validates the names now, not at first publish
    key = loaded.key or (Path(environ[ENV_KEY]) if environ.get(ENV_KEY) else None)
    return OperatorConfig(
        stack=stack,
        broker=broker,
        password=password,
        key_path=key,
        issued_by=loaded.issued_by or default_issued_by(),
        source=source,
    )


@asynccontextmanager
async def connect(config: OperatorConfig) -> AsyncIterator[aiomqtt.Client]:
    """A connected clean session; any broker failure becomes one BrokerUnreachable."""
    broker = config.broker
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=config.password,
        identifier=f"deploy-agent-operator-{secrets.token_hex(6)}",
        clean_session=True,
        keepalive=broker.keepalive,
        timeout=CONNECT_TIMEOUT,
        tls_context=client_context(broker.tls),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    connected = False
    try:
        async with client:
            connected = True
            yield client
    except aiomqtt.MqttError as exc:
        what = "lost the connection to" if connected else "cannot reach"
        raise BrokerUnreachable(f"{what} the broker at {config.address}: {exc}") from exc


# --- the session -----------------------------------------------------------------


class Inbox:
    """Pumps the client's messages into a queue that is safe to wait on with a timeout."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._queue: asyncio.Queue[aiomqtt.Message | BaseException] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Inbox:
        self._task = asyncio.create_task(self._pump(), name="operator-inbox")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its CancelledError is its own, not ours

    async def _pump(self) -> None:
        try:
            async for message in self._client.messages:
                self._queue.put_nowait(message)
        except aiomqtt.MqttError as exc:
            self._queue.put_nowait(exc)

    async def get(self, timeout: float) -> aiomqtt.Message | None:
        """The next message, or None when none came within timeout seconds."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                item = await self._queue.get()
        except TimeoutError:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


async def collect_retained(inbox: Inbox) -> list[aiomqtt.Message]:
    """Read until the broker has been quiet for a moment: the retained burst is over."""
    loop = asyncio.get_running_loop()
    end = loop.time() + RETAINED_LIMIT
    messages = []
    while (message := await inbox.get(min(QUIET_SECONDS, end - loop.time()))) is not None:
        messages.append(message)
    return messages


def parse_retained(
    topics: Topics, messages: Sequence[aiomqtt.Message]
) -> tuple[dict[str, Presence], dict[str, StatusRecord]]:
    """Presences and status records by instance id; malformed or mislabelled ones skipped."""
    presences: dict[str, Presence] = {}
    statuses: dict[str, StatusRecord] = {}
    for message in messages:
        parsed = topics.parse(str(message.topic))
        if not parsed or not isinstance(message.payload, bytes) or not message.payload:
            continue
        channel, instance = parsed
        try:
            if channel == "instances":
                presence = parse_message(Presence, message.payload)
                if presence.instance == instance:
                    presences[presence.instance] = presence
            elif channel == "status":
                record = parse_message(StatusRecord, message.payload)
                if record.instance == instance:
                    statuses[record.instance] = record
        except InvalidMessage:
            continue
    return presences, statuses


def parse_event(topics: Topics, message: aiomqtt.Message) -> Event | None:
    parsed = topics.parse(str(message.topic))
    if not parsed or parsed[0] != "events" or not isinstance(message.payload, bytes):
        return None
    try:
        event = parse_message(Event, message.payload)
    except InvalidMessage:
        return None
    return event if event.instance == parsed[1] else None


# --- the stack configuration an operator pushes ----------------------------------------


def load_stack_config(path: Path, stack: str) -> dict[str, Any]:
    """The stack configuration in FILE: an agent configuration's ``stack_config``, or a
    file that is the stack configuration itself. Validated either way."""
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a stack configuration must be a mapping of keys")
    if "stack_config" in data:
        agent = parse_config(data, source=str(path), base=path.resolve().parent)
        if agent.stack != stack:
            raise ConfigError(f"{path} is for stack {agent.stack!r}, the operator's is {stack!r}")
        data = dict(agent.stack_config)
    stack_settings(data)
    return data


def signed_stack_config(config: OperatorConfig, payload: dict[str, Any]) -> SignedConfig:
    """The payload as agents will receive it: signed (when a key is set) and not too big."""
    try:
        message = SignedConfig(
            payload=payload,
            stack=config.stack,
            issued_by=config.issued_by,
            issued_at=datetime.now(UTC),
        )
        key = config.private_key()
        signed = sign_config(message, key) if key is not None else message
        size = len(encode(signed))
    except (ValidationError, ValueError, TypeError) as exc:
        raise ConfigError(f"the stack configuration cannot be published: {exc}") from exc
    if size > MAX_PAYLOAD_BYTES:
        raise ConfigError(
            f"the stack configuration is {size} bytes; agents accept at most {MAX_PAYLOAD_BYTES}"
        )
    return signed
