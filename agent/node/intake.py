"""Intake: from bytes on ``P/commands`` to a command this agent will run, or a rejection
with a reason (validation, signature, clock skew, stack, replay, targeting); and from bytes
on ``P/config`` to a stack configuration to apply, or a reason to keep the one we have.

Pure apart from the clock passed in, so every rejection reason has a fast unit test.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.core.config import AgentConfig
from agent.core.errors import AgentError, CommandRejected
from agent.core.outcome import RunKind
from agent.core.stackconfig import stack_settings
from agent.protocol import (
    Command,
    SignedConfig,
    parse_command,
    parse_message,
    targets_instance,
    verify_command,
    verify_config,
)


@dataclass(frozen=True)
class Accepted:
    """A valid command for this instance; ``run_as`` says what it does here."""

    command: Command
    run_as: RunKind  # the command's kind, or "configure" when the app's layers are not ours


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
    return targets_instance(command.targets, config.instance.id, config.instance.layers)


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
    if command.stack is None:
        # A command naming no stack would run on every stack that trusts the key.
        return Rejected("command names no stack: refused on every stack", command)
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


@dataclass(frozen=True)
class ConfigAccepted:
    """A newer signed stack configuration: apply it and remember it."""

    payload: dict[str, Any]
    issued_at: str
    issued_by: str


@dataclass(frozen=True)
class ConfigKept:
    """Nothing to do: the payload is the one applied (an echo, a broker replay)."""


@dataclass(frozen=True)
class ConfigRefused:
    """Refused, with a reason for the log; the applied configuration stays."""

    reason: str
    issued_at: str | None = None


def accept_config(
    payload: bytes,
    *,
    config: AgentConfig,
    trusted: Mapping[str, Ed25519PublicKey],
    now: datetime,
    applied: Mapping[str, Any],
    applied_issued_at: str | None,
) -> ConfigAccepted | ConfigKept | ConfigRefused:
    """Decide what to do with the retained message on ``P/config``.

    A configuration older than the one applied is refused (a replay must not roll the
    stack back), and so is one that is not a valid stack configuration.
    """
    try:
        signed = parse_message(SignedConfig, payload)
        verify_config(
            signed,
            trusted,
            require_signatures=config.security.require_signatures,
            max_clock_skew=config.security.max_clock_skew,
            now=now,
            stack=config.stack,
        )
        stack_settings(signed.payload)
    except AgentError as exc:
        return ConfigRefused(str(exc))
    issued_at = signed.issued_at.isoformat()
    if applied_issued_at and issued_at < applied_issued_at:
        return ConfigRefused(
            f"older than the configuration applied ({applied_issued_at}): a replay?", issued_at
        )
    if signed.payload == dict(applied):
        return ConfigKept()
    return ConfigAccepted(dict(signed.payload), issued_at, signed.issued_by)
