"""Replayed and forged signatures, through the intake and through a real Daemon's handlers.

``tests/test_protocol.py`` checks ``verify_command``/``verify_config`` alone; here the same
attacks go through everything the agent does with a message (parse, verify, replay
memory, targeting, applying a stack configuration).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from daemon_fixture import InProcessAgent, in_process_agent
from hostile_helpers import (
    ALICE,
    BOB,
    MALLORY,
    NOW,
    STACK,
    TRUSTED,
    agent_config,
    as_dict,
    command,
)
from support.tally import HostileTally

from agent.node.intake import Accepted, Rejected, accept
from agent.protocol import (
    Command,
    SignedConfig,
    canonical_json,
    encode,
    fingerprint,
    sign_bytes,
    sign_config,
)

CONFIG = agent_config(Path("/nonexistent/hostile"))


def verdict(tally: HostileTally, payload: bytes, seen: frozenset[str] = frozenset()) -> Any:
    with tally.attempt():
        return accept(payload, config=CONFIG, trusted=TRUSTED, seen=seen, now=NOW)


def rejected(tally: HostileTally, payload: bytes, because: str, **kwargs: Any) -> None:
    result = verdict(tally, payload, **kwargs)
    tally.refuse(not isinstance(result, Rejected), f"{payload[:160]!r} -> {result}")
    assert because in result.reason, result.reason


def wire(data: dict[str, Any]) -> bytes:
    return canonical_json(data)


# -- commands through the intake -----------------------------------------------------------


def test_a_signature_copied_onto_a_different_command_is_rejected(tally: HostileTally) -> None:
    signed, other = command(revision="v1"), command(revision="v2")
    forged = as_dict(other) | {"signature": signed.signature, "key_id": signed.key_id}
    rejected(tally, wire(forged), "signature does not match")


def test_a_signature_copied_with_its_id_onto_different_fields_is_rejected(
    tally: HostileTally,
) -> None:
    signed = command(revision="v1", targets=["web-2"])
    for change in (
        {"revision": "v2"},
        {"targets": ["web-1"]},
        {"kind": "restart", "revision": None},
        {"app": "frontend"},
        {"restart_delay": 0.0},
    ):
        rejected(tally, wire(as_dict(signed) | change), "signature does not match")


CHANGES: dict[str, Any] = {
    "id": "0b5e4c1e-8d8f-4c55-9a34-3f7a3f0e9b10",
    "kind": "restart",
    "app": "frontend",
    "revision": "other",
    "to_release": "20240501120000",
    "force": True,
    "targets": ["plone_instances"],
    "restart_delay": 2.0,
    "always_buildout": True,
    "stack": None,
    "issued_at": "2024-05-01T12:00:01Z",
    "issued_by": "mallory@ci",
    "key_id": fingerprint(BOB),
}


def test_every_field_is_covered_by_the_tampering_table() -> None:
    assert set(CHANGES) == set(Command.model_fields) - {"signature"}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_signed_command_with_any_field_changed_after_signing_is_rejected(
    tally: HostileTally, field: str
) -> None:
    signed = command(revision="main", targets=["web-1"], restart_delay=1.0, always_buildout=False)
    changed = as_dict(signed) | {field: CHANGES[field]}
    result = verdict(tally, wire(changed))
    tally.refuse(not isinstance(result, Rejected), f"{field} changed -> {result}")
    reasons = ("signature does not match", f"{field}: ", "only valid in")
    assert any(r in result.reason for r in reasons), result


def test_a_command_signed_for_another_stack_is_rejected(tally: HostileTally) -> None:
    rejected(tally, encode(command(stack="production")), "for stack 'production'")


def test_a_trusted_key_id_with_another_trusted_keys_signature_is_rejected(
    tally: HostileTally,
) -> None:
    """The key id names the one key to check: BOB's valid signature under ALICE's key id
    must not pass just because BOB is trusted too."""
    by_bob = command(key=BOB)
    claimed = as_dict(by_bob) | {"key_id": fingerprint(ALICE)}
    rejected(tally, wire(claimed), "signature does not match")


def test_a_trusted_key_id_with_an_untrusted_signature_is_rejected(tally: HostileTally) -> None:
    by_mallory = command(key=MALLORY).model_copy(update={"key_id": fingerprint(ALICE)})
    rejected(tally, encode(by_mallory), "signature does not match")


def test_a_signature_made_without_the_signing_context_is_rejected(tally: HostileTally) -> None:
    """Domain separation: bytes signed for some other purpose never verify as a command."""
    unsigned = command(key=None).model_copy(update={"key_id": fingerprint(ALICE)})
    raw = canonical_json(unsigned.model_dump(exclude={"signature"}))
    for data in (raw, b"deploy-agent config v1\n" + raw):
        forged = unsigned.model_copy(update={"signature": sign_bytes(ALICE, data)})
        rejected(tally, encode(forged), "signature does not match")


def test_malformed_signatures_are_rejected(tally: HostileTally) -> None:
    signed = as_dict(command())
    sig = base64.b64decode(signed["signature"])
    for bad in (
        base64.b64encode(sig[::-1]).decode(),
        base64.b64encode(bytes(64)).decode(),
        "A" * 86 + "==",
        flip_one_character(signed["signature"]),
        "",
        None,
        0,
        [sig.hex()],
    ):
        rejected(tally, wire(signed | {"signature": bad}), "")


def flip_one_character(signature: str) -> str:
    """Change a character in the middle: unlike the last one before the padding, which
    carries unused bits, this always changes the decoded signature."""
    middle = len(signature) // 2
    return signature[:middle] + ("B" if signature[middle] != "B" else "C") + signature[middle + 1 :]


def test_the_same_signed_command_twice_is_a_replay(tally: HostileTally) -> None:
    signed = command()
    first = verdict(tally, encode(signed))
    assert isinstance(first, Accepted)
    rejected(tally, encode(signed), "already received", seen=frozenset({str(signed.id)}))


def test_an_old_signed_command_is_rejected_as_stale_even_with_a_new_id_field_order(
    tally: HostileTally,
) -> None:
    stale = command(now=NOW - timedelta(hours=1))
    reordered = dict(reversed(list(as_dict(stale).items())))
    rejected(tally, wire(reordered), "in the past")


# -- through the daemon's own handlers -----------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[InProcessAgent]:
    yield from in_process_agent(tmp_path)


def now() -> datetime:
    return datetime.now(UTC)


def test_the_daemon_runs_a_signed_command_once_and_rejects_its_replay(
    tally: HostileTally, agent: InProcessAgent
) -> None:
    signed = command("configure", now=now())
    with tally.attempt():
        first = agent.feed(agent.topics.commands, encode(signed))
        second = agent.feed(agent.topics.commands, encode(signed))
    assert "command.rejected" not in {e["event"] for e in first}
    replays = [e for e in second if e["event"] == "command.rejected"]
    tally.refuse(not replays, "the daemon accepted a replayed command")
    assert "already received" in replays[0]["reason"]
    assert agent.daemon.worker.queue.qsize() == 1


def signed_config(
    payload: dict[str, Any],
    *,
    key: Any = ALICE,
    issued_at: datetime | None = None,
    stack: str | None = STACK,
) -> SignedConfig:
    config = SignedConfig(
        payload=payload, stack=stack, issued_by="alice@ci", issued_at=issued_at or now()
    )
    return sign_config(config, key) if key is not None else config


@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("untrusted key", lambda: encode(signed_config({"evil": 1}, key=MALLORY))),
        ("unsigned", lambda: encode(signed_config({"evil": 1}, key=None))),
        ("another stack", lambda: encode(signed_config({"evil": 1}, stack="production"))),
        (
            "from the future",
            lambda: encode(signed_config({"evil": 1}, issued_at=now() + timedelta(hours=1))),
        ),
        (
            "payload changed after signing",
            lambda: wire(as_dict_config(signed_config({"good": 1})) | {"payload": {"evil": 1}}),
        ),
        (
            "trusted key id, untrusted signature",
            lambda: encode(
                signed_config({"evil": 1}, key=MALLORY).model_copy(
                    update={"key_id": fingerprint(ALICE)}
                )
            ),
        ),
        (
            "trusted key id, other trusted key's signature",
            lambda: encode(
                signed_config({"evil": 1}, key=BOB).model_copy(
                    update={"key_id": fingerprint(ALICE)}
                )
            ),
        ),
        (
            "a command's signature",
            lambda: wire(
                as_dict_config(signed_config({"evil": 1})) | {"signature": command().signature}
            ),
        ),
        (
            "invalid cookbook types",
            lambda: encode(signed_config({"plone_instances": {"per_cpu": "many"}})),
        ),
    ],
)
def test_a_forged_or_invalid_stack_config_is_not_applied(
    tally: HostileTally, agent: InProcessAgent, what: str, make: Any
) -> None:
    before = dict(agent.daemon.stack_config)
    with tally.attempt():
        logs = agent.feed(agent.topics.config, make())
    tally.refuse(agent.daemon.stack_config != before, f"config {what} was applied")
    assert "stack_config.rejected" in {e["event"] for e in logs}, logs


def as_dict_config(config: SignedConfig) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump(mode="json").items()}


def test_a_valid_signed_stack_config_is_applied_so_the_refusals_above_mean_something(
    tally: HostileTally, agent: InProcessAgent
) -> None:
    with tally.attempt():
        agent.feed(agent.topics.config, encode(signed_config({"custom": {"k": 1}})))
    assert agent.daemon.stack_config == {"custom": {"k": 1}}


def test_an_older_signed_config_replayed_after_a_newer_one_is_not_applied(
    tally: HostileTally, agent: InProcessAgent
) -> None:
    old = signed_config({"version": 1}, issued_at=now() - timedelta(minutes=5))
    new = signed_config({"version": 2})
    with tally.attempt():
        agent.feed(agent.topics.config, encode(old))
        agent.feed(agent.topics.config, encode(new))
        agent.feed(agent.topics.config, encode(old))
    tally.refuse(agent.daemon.stack_config != {"version": 2}, "an older config replaced a newer")
