"""Signatures on commands and stack configurations (docs/architecture.md, "Wire protocol").

Ed25519 over the canonical JSON of every field but the signature, so the agent verifies the
values it will act on, not the bytes that happened to arrive. Key ids are OpenSSH SHA256
fingerprints, so an operator can compare one with what ``ssh-keygen -lf alice.pub`` prints.
Pure: key files are read by ``agent.adapters.keys``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.errors import CommandRejected, InvalidMessage
from agent.protocol.messages import Command, SignedConfig
from agent.protocol.wire import canonical_json

TrustedKeys = Mapping[str, Ed25519PublicKey] | Sequence[Ed25519PublicKey]


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Return the OpenSSH SHA256 fingerprint of a key (of its public half)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def by_key_id(trusted: TrustedKeys) -> Mapping[str, Ed25519PublicKey]:
    """Index trusted keys by fingerprint (a mapping is taken as already indexed)."""
    if isinstance(trusted, Mapping):
        return trusted
    return {fingerprint(key): key for key in trusted}


def sign_bytes(private_key: Ed25519PrivateKey, data: bytes) -> str:
    """Return the base64 Ed25519 signature of data."""
    return base64.b64encode(private_key.sign(data)).decode("ascii")


def signed_by(signature: str, data: bytes, trusted: TrustedKeys, key_id: str | None) -> bool:
    """Tell whether signature over data verifies with a trusted key (key_id's first)."""
    keys = by_key_id(trusted)
    try:
        raw = base64.b64decode(signature, validate=True)
    except binascii.Error:
        return False
    first = keys.get(key_id) if key_id else None
    candidates = [first] if first else list(keys.values())
    for key in candidates:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return True
    return False


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


def _verify(
    message: Command | SignedConfig,
    trusted: TrustedKeys,
    *,
    require_signatures: bool,
    max_clock_skew: float,
    now: datetime,
    stack: str | None,
    noun: str,
    past_ok: bool,
) -> str | None:
    return (
        _check_signature(message, trusted, require_signatures, noun)
        or _check_clock(message.issued_at, now, max_clock_skew, noun, past_ok=past_ok)
        or _check_stack(message, stack, noun)
    )


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
    problem = _verify(
        command,
        trusted,
        require_signatures=require_signatures,
        max_clock_skew=max_clock_skew,
        now=now,
        stack=stack,
        noun="command",
        past_ok=False,
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
    refusing one older than the configuration already applied is intake's job.
    """
    problem = _verify(
        config,
        trusted,
        require_signatures=require_signatures,
        max_clock_skew=max_clock_skew,
        now=now,
        stack=stack,
        noun="configuration",
        past_ok=True,
    )
    if problem:
        raise InvalidMessage(problem)
