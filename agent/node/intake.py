"""Command intake: from bytes on ``P/commands`` to a command this agent will run, or a
rejection with a reason. Validation, signature, clock skew, stack, replay and targeting.

Pure apart from the clock passed in, so every rejection reason has a fast unit test.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.config import AgentConfig
from agent.core.errors import CommandRejected
from agent.protocol.protocol import Command, parse_command, verify_command


@dataclass(frozen=True)
class Accepted:
    """A valid command for this instance; ``run_as`` says what it does here."""

    command: Command
    run_as: str  # the command's kind, or "configure" when the app's layers are not ours


@dataclass(frozen=True)
class Ignored:
    """A valid command that targets other instances only: no event, nothing to do."""

    command: Command


@dataclass(frozen=True)
class Rejected:
    """Refused, with a reason for the operator; ``command`` when it could be parsed."""

    reason: str
    command: Command | None = None


def targets_me(command: Command, config: AgentConfig) -> bool:
    """No targets means the whole stack; otherwise our id or one of our layers."""
    if command.targets is None:
        return True
    mine = {config.instance.id, *config.instance.layers}
    return bool(mine & set(command.targets))


def accept(
    payload: bytes,
    *,
    config: AgentConfig,
    trusted: Mapping[str, Ed25519PublicKey],
    seen: Collection[str],
    now: datetime,
) -> Accepted | Ignored | Rejected:
    """Decide what to do with one message from the commands topic."""
    try:
        command = parse_command(payload)
    except CommandRejected as exc:
        return Rejected(str(exc))
    try:
        verify_command(
            command,
            trusted,
            require_signatures=config.security.require_signatures,
            max_clock_skew=config.security.max_clock_skew,
            now=now,
            stack=config.stack,
        )
    except CommandRejected as exc:
        return Rejected(str(exc), command)
    if not targets_me(command, config):
        return Ignored(command)
    if str(command.id) in seen:
        return Rejected(f"command {command.id} was already received (replay or duplicate)", command)
    if command.app is not None and command.app not in config.apps:
        known = ", ".join(sorted(config.apps)) or "none"
        return Rejected(f"unknown app {command.app!r} (configured apps: {known})", command)
    if command.kind == "configure" or command.app is None:
        return Accepted(command, "configure")
    if not config.carries(command.app):
        return Accepted(command, "configure")
    return Accepted(command, command.kind)
