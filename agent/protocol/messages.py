"""The messages both sides of the broker exchange (docs/architecture.md, "Wire protocol").

Pure (no I/O). Every payload from the broker is hostile until ``parse_*`` accepted it: size
and nesting are checked before any JSON parser recurses. Statuses and kinds are ``Literal``
types defined here once; the targeting rule is ``targets_instance``, which the agents and the
operator both apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args
from uuid import UUID, uuid4

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

from agent.core.errors import CommandRejected, InvalidMessage
from agent.core.names import Address, Label, Name, Revision
from agent.core.outcome import OutcomeStatus
from agent.protocol.wire import check_json, summarise

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_DEPTH = 16

CommandKind = Literal["deploy", "rollback", "configure", "restart"]
#: How a command ends on one instance; ``rejected`` and ``interrupted`` never run to an end.
FinalStatus = Literal[OutcomeStatus, "rejected", "interrupted"]
EventStatus = Literal["started", "progress", FinalStatus]
FINAL_STATUSES: frozenset[str] = frozenset(get_args(OutcomeStatus)) | {"rejected", "interrupted"}
OK_STATUSES: frozenset[str] = frozenset({"succeeded", "unchanged"})
#: What the *agent* of an instance is doing (docs/architecture.md, "Membership"): its
#: services keep running while it is ``stopped`` or ``unreachable``; only ``leaving``
#: takes its endpoints out of the others' configuration at once. ``offline`` is what
#: agents before these states said, in their will and at a clean stop: read as
#: ``unreachable``.
PresenceState = Literal["online", "stopped", "unreachable", "leaving", "offline"]
#: The states in which an instance's endpoints still count, until ``member_timeout``.
RESTING_STATES: frozenset[str] = frozenset({"stopped", "unreachable", "offline"})

SignatureText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
KeyId = Annotated[str, StringConstraints(pattern=r"^SHA256:[A-Za-z0-9+/]{43}$")]


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # e.g. year 1 at +01:00: pydantic only catches ValueError
        raise ValueError("is out of range once converted to UTC") from exc


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


def targets_instance(
    targets: Sequence[str] | None, instance_id: str, layers: Iterable[str]
) -> bool:
    """No targets means the whole stack; otherwise the instance's id or one of its layers."""
    if targets is None:
        return True
    return bool({instance_id, *layers} & set(targets))


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
    #: Rollback only: allow ``to_release`` to be a release marked bad.
    force: bool | None = None
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
        only = {
            "revision": "deploy",
            "always_buildout": "deploy",
            "to_release": "rollback",
            "force": "rollback",
        }
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


class ReleaseRow(_Message):
    """One release directory of an app on an instance, as ``deploy-agent releases`` lists it."""

    name: Name
    revision: str = Field(default="", max_length=64)
    created: str = Field(default="", max_length=64)
    decision: str = Field(default="", max_length=64)
    status: str = Field(default="", max_length=32)
    #: Why it failed or was marked bad: its first line, cut to 300 characters.
    reason: str = Field(default="", max_length=300)
    current: bool = False


class AppPresence(_Message):
    """What runs live for one app on an instance, and the releases it keeps."""

    release: Name | None = None
    revision: Revision | None = None
    deployed_at: UtcDatetime | None = None
    #: The newest ones (20 at most are sent, so a presence stays far below 64 KiB).
    releases: list[ReleaseRow] = Field(default_factory=list, max_length=50)


class ClientInfo(_Message):
    """One ZEO client program and the port it listens on."""

    name: Name
    port: int = Field(ge=1, le=65535)


class Presence(_Message):
    """Retained announcement of an instance; its Last Will flips ``state`` to unreachable."""

    instance: Name
    state: PresenceState
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
