"""The whole command intake (``agent.intake.accept`` with a real configuration and trusted
keys) under fuzzing: whatever arrives on ``P/commands``, the verdict is Accepted, Ignored
or Rejected, never an exception, and only an intact signed command is ever let through.

``tests/test_protocol.py`` fuzzes ``parse_command`` alone; this goes through signature,
clock, stack, replay, targeting and app checks too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import (
    HOSTILE_STRINGS,
    MALLORY,
    NOW,
    TRUSTED,
    agent_config,
    as_dict,
    command,
    examples,
    json_values,
    nasty_text,
)
from hypothesis import given
from hypothesis import strategies as st
from support.tally import HostileTally

from agent.core.errors import CommandRejected
from agent.node.intake import Accepted, Ignored, Rejected, accept
from agent.protocol import Command, encode, parse_command

CONFIG = agent_config(Path("/nonexistent/hostile"))  # intake never touches the disk
FIELDS = sorted(Command.model_fields)
STRING_FIELDS = [
    "id",
    "kind",
    "app",
    "revision",
    "to_release",
    "stack",
    "issued_at",
    "issued_by",
    "signature",
    "key_id",
]
Verdict = Accepted | Ignored | Rejected


def verdict_of(tally: HostileTally, payload: bytes, seen: frozenset[str] = frozenset()) -> Verdict:
    with tally.attempt():
        verdict = accept(payload, config=CONFIG, trusted=TRUSTED, seen=seen, now=NOW)
    assert isinstance(verdict, Accepted | Ignored | Rejected), verdict
    if isinstance(verdict, Rejected):
        reason = verdict.reason
        assert reason and len(reason) < 2000, reason
        assert reason.isprintable(), f"a rejection reason with control characters: {reason!r}"
    return verdict


def must_reject(tally: HostileTally, payload: bytes) -> Rejected:
    verdict = verdict_of(tally, payload)
    tally.refuse(not isinstance(verdict, Rejected), f"{payload[:200]!r} -> {verdict}")
    assert isinstance(verdict, Rejected)
    return verdict


def dumps(data: Any, ascii_only: bool) -> bytes:
    """JSON as an attacker may send it: escaped, or raw UTF-8 with lone surrogates kept."""
    return json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# -- arbitrary input ----------------------------------------------------------------------


@examples(200)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected_by_the_intake(tally: HostileTally, data: bytes) -> None:
    must_reject(tally, data)


@examples(120)
@given(json_values, st.booleans())
def test_arbitrary_json_documents_are_rejected_by_the_intake(
    tally: HostileTally, value: Any, ascii_only: bool
) -> None:
    must_reject(tally, dumps(value, ascii_only))


@examples(120)
@given(st.dictionaries(st.sampled_from([*FIELDS, "extra"]), json_values, max_size=8), st.booleans())
def test_command_shaped_objects_without_a_valid_signature_are_rejected(
    tally: HostileTally, fields: dict[str, Any], ascii_only: bool
) -> None:
    base = as_dict(command(key=None))
    must_reject(tally, dumps({**base, **fields}, ascii_only))


# -- mutations of a valid signed command -----------------------------------------------------

kinds = st.sampled_from(
    [
        {"kind": "deploy", "revision": "main"},
        {"kind": "deploy", "targets": ["web-1"], "always_buildout": True, "restart_delay": 1.5},
        {"kind": "rollback", "to_release": "20240501120000"},
        {"kind": "restart", "targets": ["plone_instances"]},
        {"kind": "configure"},
    ]
)
mutation = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(FIELDS), st.none(), st.floats(0, 1)),
    st.tuples(
        st.just("set"),
        st.sampled_from([*FIELDS, "extra", "ID", "kind "]),
        json_values,
        st.floats(0, 1),
    ),
    st.tuples(st.just("splice"), st.sampled_from(STRING_FIELDS), nasty_text, st.floats(0, 1)),
    st.tuples(
        st.just("retype"),
        st.sampled_from(FIELDS),
        st.sampled_from([0, 1, -1, 1e308, True, None, [], {}, "", [None], {"": None}]),
        st.floats(0, 1),
    ),
)


def mutate(data: dict[str, Any], op: str, field: str, value: Any, where: float) -> None:
    if op == "delete":
        data.pop(field, None)
    elif op == "splice" and isinstance(data.get(field), str):
        text = data[field]
        cut = int(len(text) * where)
        data[field] = text[:cut] + value + text[cut:]
    else:
        data[field] = value


@examples(200)
@given(kinds, st.lists(mutation, min_size=1, max_size=3), st.booleans())
def test_a_signed_command_mutated_in_any_field_is_accepted_only_if_it_is_still_the_same(
    tally: HostileTally, fields: dict[str, Any], mutations: list[tuple[Any, ...]], ascii_only: bool
) -> None:
    original = command(**fields)
    data = as_dict(original)
    for op in mutations:
        mutate(data, *op)
    payload = dumps(data, ascii_only)
    verdict = verdict_of(tally, payload)
    if not isinstance(verdict, Rejected):
        tally.refuse(parse_command(payload) != original, f"{data!r} -> {verdict}")


@examples(150)
@given(kinds, st.data())
def test_byte_level_damage_to_a_signed_command_is_never_accepted(
    tally: HostileTally, fields: dict[str, Any], data: st.DataObject
) -> None:
    original = command(**fields)
    payload = bytearray(encode(original))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        how = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if how == "flip":
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del payload[at]
        elif how == "truncate":
            del payload[at:]
        if not payload:
            payload = bytearray(b" ")
    verdict = verdict_of(tally, bytes(payload))
    if not isinstance(verdict, Rejected):
        try:
            same = parse_command(bytes(payload)) == original
        except CommandRejected:
            same = False
        tally.refuse(not same, f"{bytes(payload)!r} -> {verdict}")


@pytest.mark.parametrize("field", ["app", "revision", "issued_by", "stack", "to_release"])
@pytest.mark.parametrize("value", HOSTILE_STRINGS)
def test_hostile_strings_in_any_field_are_refused_even_when_signed_by_a_trusted_key(
    tally: HostileTally, field: str, value: str
) -> None:
    """Tampered on the wire, the signature fails; signed as it is (a compromised CI job),
    validation alone must stand between the value and git or the file system."""
    kind = "rollback" if field == "to_release" else "deploy"
    tampered = as_dict(command(kind)) | {field: value}
    for ascii_only in (True, False):
        must_reject(tally, dumps(tampered, ascii_only))
    try:
        resigned = command(kind, **{field: value})
    except ValueError:  # pydantic refuses to even build it
        tally.tried += 1
        return
    verdict = verdict_of(tally, encode(resigned))
    if not isinstance(verdict, Rejected) and field != "issued_by":  # issued_by: free text
        tally.refuse(
            not is_one_harmless_word(value, slash_ok=field == "revision"),
            f"signed {field}={value!r} -> {verdict}",
        )


def is_one_harmless_word(value: str, *, slash_ok: bool) -> bool:
    """What git, a path join and a buildout value can all take as one plain word."""
    return (
        value.isascii()
        and value.isprintable()
        and " " not in value
        and not value.startswith(("-", ".", "/"))
        and ":" not in value
        and "@{" not in value
        and "\\" not in value
        and (slash_ok or "/" not in value)
        and not (slash_ok and ".." in value)
    )


# -- what must pass ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"kind": "deploy", "revision": "main"}, ("Accepted", "deploy")),
        ({"kind": "rollback"}, ("Accepted", "rollback")),
        ({"kind": "restart"}, ("Accepted", "restart")),
        ({"kind": "configure"}, ("Accepted", "configure")),
        ({"kind": "deploy", "app": "frontend"}, ("Accepted", "configure")),
        ({"kind": "deploy", "targets": ["web-2", "haproxy"]}, ("Ignored", None)),
        ({"kind": "deploy", "targets": ["plone_instances"]}, ("Accepted", "deploy")),
    ],
)
def test_intact_signed_commands_still_pass_so_the_properties_above_are_not_vacuous(
    tally: HostileTally, fields: dict[str, Any], expected: tuple[str, str | None]
) -> None:
    verdict = verdict_of(tally, encode(command(**fields)))
    assert type(verdict).__name__ == expected[0], verdict
    if isinstance(verdict, Accepted):
        assert verdict.run_as == expected[1]


def test_a_forged_command_targeting_other_instances_is_rejected_not_silently_ignored(
    tally: HostileTally,
) -> None:
    forged = command(targets=["web-2"], key=MALLORY)
    verdict = must_reject(tally, encode(forged))
    assert "trusted key" in verdict.reason


@pytest.mark.parametrize(
    "lookalike",
    [
        "web\u20111",
        "\uff57eb-1",
        "web-1\u200b",
        "WEB-1",
        "web-1 ",
        "web-1\n",
        "plone_instances\x00",
    ],
)
def test_lookalikes_of_our_instance_id_never_target_us(tally: HostileTally, lookalike: str) -> None:
    try:
        signed = command(targets=[lookalike])
    except ValueError:
        must_reject(tally, dumps(as_dict(command()) | {"targets": [lookalike]}, False))
        return
    assert isinstance(verdict_of(tally, encode(signed)), Ignored)


def test_rejection_reasons_never_quote_control_characters_from_the_payload(
    tally: HostileTally,
) -> None:
    data = as_dict(command()) | {"id": "\x1b" + as_dict(command())["id"][1:]}
    reason = must_reject(tally, dumps(data, True)).reason
    assert reason.isprintable(), reason
