"""The wire protocol the daemon and the operator CLI share: topics, messages, signatures.

Pure (no I/O). Every payload from the broker is hostile until a ``parse_*`` and a
``verify_*`` accept it: size and nesting are checked before any JSON parser recurses, and
a signature covers the canonical JSON of every field except the signature itself, so the
agent verifies the values it will act on, not the bytes that happened to arrive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args
from uuid import UUID, uuid4

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from agent.adapters.keys import TrustedKeys, by_key_id, fingerprint, sign_bytes, signed_by
from agent.core.errors import AgentError, CommandRejected, ConfigError
from agent.protocol.wire import canonical_json as canonical_json
from agent.protocol.wire import check_json, summarise
from agent.protocol.wire import encode as encode

DEFAULT_TOPIC_PREFIX = "deploy-agent"
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_DEPTH = 16

Channel = Literal["commands", "config", "instances", "events", "status", "logs"]
CommandKind = Literal["deploy", "rollback", "configure", "restart"]
_CHANNELS: dict[str, Channel] = {name: name for name in get_args(Channel)}
EventStatus = Literal[
    "started", "progress", "succeeded", "failed", "unchanged", "rejected", "interrupted"
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REVISION_CHARS = re.compile(r"[A-Za-z0-9._/-]+")


def check_revision(value: str) -> str:
    """Refuse what git could read as an option, a range or anything but one ref or sha."""
    if not 1 <= len(value) <= 200:
        raise ValueError("must be 1 to 200 characters")
    if value.startswith("-"):
        raise ValueError("must not start with '-' (git would read it as an option)")
    if ".." in value:
        raise ValueError("must not contain '..' (a range, not one revision)")
    if not _REVISION_CHARS.fullmatch(value):
        raise ValueError(
            "may only contain A-Z a-z 0-9 . _ / - "
            "(no whitespace, control characters, ':', '@{', '^' or '~')"
        )
    if (
        value.startswith(("/", "."))
        or value.endswith(("/", ".", ".lock"))
        or "/." in value
        or "//" in value
    ):
        raise ValueError("is not a valid git ref name")
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. year 1 at +01:00: pydantic only catches ValueError
        raise ValueError("is out of range once converted to UTC") from exc


# A name is safe as a topic level, a path component and a supervisor program name.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Revision = Annotated[str, AfterValidator(check_revision)]
Label = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,128}$")]
Address = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:%_-]{1,253}$")]
SignatureText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
KeyId = Annotated[str, StringConstraints(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class InvalidMessage(AgentError):
    """Raised when an event, presence, status or config payload is malformed or unsigned."""

    code = "invalid-message"


# --- topics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """Every topic name of one stack, so no other module spells a topic by hand."""

    prefix: str
    stack: str

    def __post_init__(self) -> None:
        for segment in self.prefix.split("/"):
            _config_name("topic prefix segment", segment)
        _config_name("stack name", self.stack)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.stack}"

    @property
    def commands(self) -> str:
        return f"{self.base}/commands"

    @property
    def config(self) -> str:
        return f"{self.base}/config"

    def instance(self, instance_id: str) -> str:
        return self._per_instance("instances", instance_id)

    def events(self, instance_id: str) -> str:
        return self._per_instance("events", instance_id)

    def status(self, instance_id: str) -> str:
        return self._per_instance("status", instance_id)

    def logs(self, instance_id: str) -> str:
        return self._per_instance("logs", instance_id)

    def _wildcard(self, channel: str) -> str:
        """Every instance's topic of one channel (``P/<channel>/+``)."""
        return f"{self.base}/{channel}/+"

    @property
    def instances_wildcard(self) -> str:
        return self._wildcard("instances")

    @property
    def events_wildcard(self) -> str:
        return self._wildcard("events")

    @property
    def status_wildcard(self) -> str:
        return self._wildcard("status")

    @property
    def logs_wildcard(self) -> str:
        return self._wildcard("logs")

    def parse(self, topic: str) -> tuple[Channel, str | None] | None:
        """Return (channel, instance id) of a topic of this stack, or None for any other."""
        if not topic.startswith(self.base + "/"):
            return None
        name, sep, instance_id = topic[len(self.base) + 1 :].partition("/")
        channel = _CHANNELS.get(name)
        if channel is None:
            return None
        if channel in ("commands", "config"):
            return None if sep else (channel, None)
        return (channel, instance_id) if _NAME_RE.fullmatch(instance_id) else None

    def instance_id(self, topic: str) -> str | None:
        """Return the instance id a per-instance topic belongs to, or None."""
        parsed = self.parse(topic)
        return parsed[1] if parsed else None

    def _per_instance(self, channel: str, instance_id: str) -> str:
        return f"{self.base}/{channel}/{_config_name('instance id', instance_id)}"


def _config_name(what: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ConfigError(
            f"invalid {what} {value[:140]!r}: use 1 to 128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


# --- messages ---------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Command(_Message):
    """One operator order; ``id`` is the unit of replay detection (run each id once)."""

    signing_context: ClassVar[bytes] = b"deploy-agent command v1\n"

    id: UUID
    kind: CommandKind
    app: Name | None = None
    revision: Revision | None = None
    to_release: Name | None = None
    targets: list[Name] | None = Field(default=None, min_length=1, max_length=1000)
    restart_delay: float | None = Field(default=None, ge=0, le=3600)
    always_buildout: bool | None = None
    stack: Name | None = None
    issued_at: UtcDatetime
    issued_by: Label
    signature: SignatureText | None = None
    key_id: KeyId | None = None

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Command:
        if self.kind != "configure" and self.app is None:
            raise ValueError(f"app is required for a {self.kind} command")
        only = {"revision": "deploy", "always_buildout": "deploy", "to_release": "rollback"}
        for field, kind in only.items():
            if getattr(self, field) is not None and self.kind != kind:
                raise ValueError(f"{field} is only valid in a {kind} command")
        return self

    @classmethod
    def create(cls, kind: CommandKind, *, issued_by: str, now: datetime, **fields: Any) -> Command:
        """Build a new, unsigned command with a fresh id (the operator side)."""
        return cls(id=uuid4(), kind=kind, issued_by=issued_by, issued_at=now, **fields)


class Event(_Message):
    """Progress or result of one phase of a command (or of a membership reconfigure)."""

    instance: Name
    command_id: UUID | None = None
    kind: CommandKind | None = None
    app: Name | None = None
    phase: Name
    status: EventStatus
    message: str = Field(default="", max_length=16384)
    details: dict[str, Any] = Field(default_factory=dict)
    at: UtcDatetime


class AppPresence(_Message):
    """What runs live for one app on an instance."""

    release: Name | None = None
    revision: Revision | None = None
    deployed_at: UtcDatetime | None = None


class ClientInfo(_Message):
    """One ZEO client program and the port it listens on."""

    name: Name
    port: int = Field(ge=1, le=65535)


class Presence(_Message):
    """Retained announcement of an instance; its Last Will flips ``state`` to offline."""

    instance: Name
    state: Literal["online", "offline"]
    address: Address | None = None
    layers: list[Name] = Field(default_factory=list, max_length=256)
    apps: dict[Name, AppPresence] = Field(default_factory=dict)
    cpu_count: int | None = Field(default=None, ge=1)
    memory_mb: int | None = Field(default=None, ge=0)
    clients: list[ClientInfo] = Field(default_factory=list, max_length=1024)
    agent_version: Label
    since: UtcDatetime


class AppStatus(_Message):
    """The last result for one app, kept so a late operator can still read it."""

    command_id: UUID | None = None
    kind: CommandKind | None = None
    status: EventStatus
    release: Name | None = None
    revision: Revision | None = None
    message: str = Field(default="", max_length=16384)
    at: UtcDatetime


class StatusRecord(_Message):
    """Retained last result per app of one instance."""

    instance: Name
    apps: dict[Name, AppStatus] = Field(default_factory=dict)
    updated_at: UtcDatetime


class SignedConfig(_Message):
    """Retained stack configuration (the OpsWorks Custom JSON), signed like a command."""

    signing_context: ClassVar[bytes] = b"deploy-agent config v1\n"

    payload: dict[str, Any]
    stack: Name | None = None
    issued_at: UtcDatetime
    issued_by: Label
    signature: SignatureText | None = None
    key_id: KeyId | None = None


# --- parsing ----------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], payload: bytes, max_bytes: int, max_depth: int) -> M:
    error = CommandRejected if model is Command else InvalidMessage
    noun = model.__name__.lower()
    problem = check_json(payload, max_bytes, max_depth)
    if problem:
        raise error(f"{noun} rejected: {problem}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise error(f"{noun} rejected: {summarise(exc)}") from exc


def parse_command(
    payload: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES, max_depth: int = MAX_DEPTH
) -> Command:
    """Parse a command payload, raising CommandRejected with a reason an operator can read."""
    return _parse(Command, payload, max_bytes, max_depth)


def parse_message(
    model: type[M],
    payload: bytes,
    *,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    max_depth: int = MAX_DEPTH,
) -> M:
    """Parse an Event, Presence, StatusRecord or SignedConfig payload, raising InvalidMessage."""
    return _parse(model, payload, max_bytes, max_depth)


# --- signatures -------------------------------------------------------------------------

Signed = TypeVar("Signed", Command, SignedConfig)


def _signed_bytes(message: Command | SignedConfig) -> bytes:
    return message.signing_context + canonical_json(message.model_dump(exclude={"signature"}))


def _sign(message: Signed, private_key: Ed25519PrivateKey) -> Signed:
    keyed = message.model_copy(update={"key_id": fingerprint(private_key), "signature": None})
    return keyed.model_copy(update={"signature": sign_bytes(private_key, _signed_bytes(keyed))})


def sign_command(command: Command, private_key: Ed25519PrivateKey) -> Command:
    """Return a copy of command carrying key_id and an Ed25519 signature over all its fields."""
    return _sign(command, private_key)


def sign_config(config: SignedConfig, private_key: Ed25519PrivateKey) -> SignedConfig:
    """Return a copy of config carrying key_id and a signature over all its fields."""
    return _sign(config, private_key)


def _check_signature(
    message: Command | SignedConfig, trusted: TrustedKeys, require: bool, noun: str
) -> str | None:
    """Return why the signature is unacceptable, or None.

    Unsigned passes only when signatures are not required; a signature that is present is
    checked whenever there are keys to check it with, required or not.
    """
    keys = by_key_id(trusted)
    if message.signature is None:
        return f"unsigned {noun}" if require else None
    if not keys:
        return "signature cannot be checked: no trusted keys configured" if require else None
    if signed_by(message.signature, _signed_bytes(message), keys, message.key_id):
        return None
    return "signature does not match any trusted key"


def _check_clock(
    issued_at: datetime, now: datetime, max_clock_skew: float, noun: str, *, past_ok: bool
) -> str | None:
    if now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    ahead = (issued_at - now).total_seconds()
    if ahead > max_clock_skew:
        where = f"{ahead:.0f} s in the future"
    elif -ahead > max_clock_skew and not past_ok:
        where = f"{-ahead:.0f} s in the past"
    else:
        return None
    return f"{noun} issued_at is {where}, beyond max_clock_skew={max_clock_skew:g}"


def _check_stack(message: Command | SignedConfig, stack: str | None, noun: str) -> str | None:
    if stack is None or message.stack is None or message.stack == stack:
        return None
    return f"{noun} is for stack {message.stack!r}, this is stack {stack!r}"


def verify_command(
    command: Command,
    trusted: TrustedKeys,
    *,
    require_signatures: bool,
    max_clock_skew: float,
    now: datetime,
    stack: str | None = None,
) -> None:
    """Raise CommandRejected unless command is signed by a trusted key, fresh and ours.

    A command naming a ``stack`` is accepted only on that stack, so a captured command
    cannot be replayed onto another stack that trusts the same operator key.
    """
    problem = (
        _check_signature(command, trusted, require_signatures, "command")
        or _check_clock(command.issued_at, now, max_clock_skew, "command", past_ok=False)
        or _check_stack(command, stack, "command")
    )
    if problem:
        raise CommandRejected(problem)


def verify_config(
    config: SignedConfig,
    trusted: TrustedKeys,
    *,
    require_signatures: bool,
    max_clock_skew: float,
    now: datetime,
    stack: str | None = None,
) -> None:
    """Raise InvalidMessage unless config is signed by a trusted key and not from the future.

    A retained configuration is old by design, so only a future issued_at is refused;
    refusing one older than the configuration already applied is the daemon's job.
    """
    problem = (
        _check_signature(config, trusted, require_signatures, "configuration")
        or _check_clock(config.issued_at, now, max_clock_skew, "configuration", past_ok=True)
        or _check_stack(config, stack, "configuration")
    )
    if problem:
        raise InvalidMessage(problem)
