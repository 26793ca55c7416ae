"""The wire protocol: topics, strict message parsing with limits, canonical JSON, signatures."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import CommandRejected, ConfigError
from agent.core.names import check_revision
from agent.protocol import (
    MAX_PAYLOAD_BYTES,
    AppPresence,
    AppStatus,
    ClientInfo,
    Command,
    Event,
    InvalidMessage,
    Presence,
    SignedConfig,
    StatusRecord,
    Topics,
    canonical_json,
    encode,
    fingerprint,
    parse_command,
    parse_message,
    sign_command,
    sign_config,
    verify_command,
    verify_config,
)
from agent.protocol.wire import nested_deeper_than

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
COMMAND_ID = "0b5e4c1e-8d8f-4c55-9a34-3f7a3f0e9b10"
ALICE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
MALLORY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def command_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": COMMAND_ID,
        "kind": "deploy",
        "app": "mysite",
        "revision": "main",
        "issued_at": "2024-05-01T12:00:00Z",
        "issued_by": "alice",
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not ...}


def payload(**overrides: Any) -> bytes:
    return json.dumps(command_dict(**overrides)).encode()


def rejection(data: bytes, **limits: int) -> str:
    with pytest.raises(CommandRejected) as info:
        parse_command(data, **limits)
    return str(info.value)


def verify(command: Command, trusted: Any = (), **options: Any) -> None:
    settings: dict[str, Any] = {"require_signatures": True, "max_clock_skew": 300, "now": NOW}
    settings.update(options)
    verify_command(command, list(trusted) or [ALICE.public_key()], **settings)


def signed(**overrides: Any) -> Command:
    return sign_command(parse_command(payload(**overrides)), ALICE)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)

# --- topics -----------------------------------------------------------------------------


def test_topics_follow_the_wire_protocol_table() -> None:
    topics = Topics("deploy-agent", "mysite")
    assert topics.commands == "deploy-agent/mysite/commands"
    assert topics.config == "deploy-agent/mysite/config"
    assert topics.instance("web-1") == "deploy-agent/mysite/instances/web-1"
    assert topics.events("web-1") == "deploy-agent/mysite/events/web-1"
    assert topics.status("web-1") == "deploy-agent/mysite/status/web-1"
    assert topics.logs("web-1") == "deploy-agent/mysite/logs/web-1"
    assert topics.instances_wildcard == "deploy-agent/mysite/instances/+"
    assert topics.events_wildcard == "deploy-agent/mysite/events/+"
    assert topics.status_wildcard == "deploy-agent/mysite/status/+"
    assert topics.logs_wildcard == "deploy-agent/mysite/logs/+"


def test_topic_parse_gives_back_channel_and_instance_id() -> None:
    topics = Topics("org/deploy-agent", "mysite")
    assert topics.parse(topics.instance("web-1.example")) == ("instances", "web-1.example")
    assert topics.parse(topics.logs("db_2")) == ("logs", "db_2")
    assert topics.parse(topics.commands) == ("commands", None)
    assert topics.instance_id(topics.status("web-3")) == "web-3"


@pytest.mark.parametrize(
    "topic",
    [
        "deploy-agent/other/instances/web-1",
        "x/deploy-agent/mysite/instances/web-1",
        "deploy-agent/mysite/instances/+",
        "deploy-agent/mysite/instances/web-1/extra",
        "deploy-agent/mysite/unknown/web-1",
        "deploy-agent/mysite/instances/",
        "deploy-agent/mysite",
        "deploy-agent/mysite/commands/web-1",
        "deploy-agent/mysitex/commands",
    ],
)
def test_topic_parse_ignores_foreign_or_malformed_topics(topic: str) -> None:
    assert Topics("deploy-agent", "mysite").instance_id(topic) is None


@pytest.mark.parametrize(
    "name", ["", "a+b", "a#", "a/b", "a\x00b", "x" * 129, ".", "..", "-x", "a b", "é"]
)
def test_topics_refuse_names_that_are_not_one_safe_topic_level(name: str) -> None:
    with pytest.raises(ConfigError):
        Topics("deploy-agent", name)
    with pytest.raises(ConfigError):
        Topics("deploy-agent", "mysite").instance(name)


def test_topics_accept_the_longest_allowed_name() -> None:
    assert Topics("deploy-agent", "s").events("w" * 128).endswith("/" + "w" * 128)


# --- parsing: what is accepted ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"kind": "rollback", "revision": None, "to_release": "20240501T120000Z"},
        {"kind": "rollback", "revision": None},
        {"kind": "configure", "app": None, "revision": None},
        {"kind": "restart", "revision": None, "restart_delay": 2, "targets": ["web-1", "zeo"]},
        {"always_buildout": True, "restart_delay": 0.5, "stack": "mysite"},
    ],
)
def test_valid_commands_survive_an_encode_parse_round_trip(fields: dict[str, Any]) -> None:
    command = parse_command(payload(**fields))
    assert parse_command(encode(command)) == command


def test_parsed_times_are_normalised_to_utc() -> None:
    command = parse_command(payload(issued_at="2024-05-01T14:00:00+02:00"))
    assert command.issued_at == NOW
    assert command.issued_at.utcoffset() == timedelta(0)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert parse_command(payload(issued_by="[" * 100 + "{" * 20)).issued_by.startswith("[[[")


def test_new_commands_get_distinct_ids_the_daemon_deduplicates_on() -> None:
    first = Command.create("deploy", app="mysite", issued_by="ci", now=NOW)
    second = Command.create("deploy", app="mysite", issued_by="ci", now=NOW)
    assert isinstance(first.id, UUID)
    assert first.id != second.id
    assert sign_command(first, ALICE).id == first.id


# --- parsing: every rejection reason ----------------------------------------------------


def test_oversized_payload_is_rejected() -> None:
    assert "over the limit of 100" in rejection(payload(issued_by="a" * 100), max_bytes=100)


def test_payload_that_is_not_utf8_is_rejected() -> None:
    assert "not valid UTF-8" in rejection(b'{"issued_by": "\xff"}')


@pytest.mark.parametrize("data", [b"", b"{", b"{'id': 1}", b'{"a": 1} x', b"\xef\xbb\xbf{}"])
def test_payload_that_is_not_json_is_rejected(data: bytes) -> None:
    assert "not JSON" in rejection(data)


@pytest.mark.parametrize("data", [b"[]", b'"deploy"', b"1", b"null"])
def test_payload_that_is_not_an_object_is_rejected(data: bytes) -> None:
    assert "not an object" in rejection(data)


def test_payload_with_a_duplicate_key_is_rejected_as_ambiguous() -> None:
    data = payload().replace(b'"kind": "deploy"', b'"kind": "configure", "kind": "deploy"')
    assert "duplicate key" in rejection(data)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_rejected(constant: bytes) -> None:
    data = payload(restart_delay=7).replace(b'"restart_delay": 7', b'"restart_delay": ' + constant)
    assert "not JSON" in rejection(data)


def test_numbers_that_overflow_to_infinity_are_rejected() -> None:
    data = payload(restart_delay=7).replace(b'"restart_delay": 7', b'"restart_delay": 1e400')
    assert "no canonical form" in rejection(data)


def test_lone_surrogate_escapes_are_rejected() -> None:
    assert "lone surrogate" in rejection(payload(issued_by="x").replace(b'"x"', b'"\\ud800"'))


def test_nesting_beyond_max_depth_is_rejected() -> None:
    data = payload(details={"a": {"b": {"c": {}}}})
    assert "nested deeper than 3 levels" in rejection(data, max_depth=3)


def test_a_payload_nested_100000_deep_is_rejected_quickly_without_recursion_error() -> None:
    hostile = b"[" * 100_000 + b"]" * 100_000
    started = time.monotonic()
    assert "nested deeper than 16" in rejection(hostile, max_bytes=1_000_000)
    assert "over the limit" in rejection(hostile)
    # A bound on a hang, not a speed: it takes milliseconds; recursion or a quadratic
    # scan of 200,000 brackets would take minutes or crash.
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "hostile",
    [b'"' + b'\\"' * 30_000, b'"\\' * 30_000, b'"' * 65_536, b'["' * 30_000, b"\\" * 65_536],
    ids=["escaped-quotes", "quote-backslash", "quotes", "open-strings", "backslashes"],
)
def test_hostile_quoting_is_rejected_in_linear_time(hostile: bytes) -> None:
    started = time.monotonic()
    rejection(hostile[:MAX_PAYLOAD_BYTES])
    # Milliseconds when linear; a quadratic scan of 65,536 bytes is ~4e9 steps (minutes).
    assert time.monotonic() - started < 10


def nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


@given(json_values, st.integers(min_value=0, max_value=6), st.booleans())
def test_the_depth_scan_agrees_with_the_real_nesting_of_any_json(
    value: Any, limit: int, ascii_only: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert nested_deeper_than(text, limit) == (nesting(value) > limit)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"surprise": 1}, "surprise: unknown field"),
        ({"kind": ...}, "kind: required field missing"),
        ({"id": "not-a-uuid"}, "id: "),
        ({"id": 42}, "id: "),
        ({"kind": "destroy"}, "kind: "),
        ({"kind": 1}, "kind: "),
        ({"restart_delay": "5"}, "restart_delay: "),
        ({"restart_delay": 3601}, "restart_delay: "),
        ({"restart_delay": -1}, "restart_delay: "),
        ({"always_buildout": "true"}, "always_buildout: "),
        ({"always_buildout": 1}, "always_buildout: "),
        ({"issued_at": "2024-05-01T12:00:00"}, "issued_at: Input should have timezone info"),
        ({"issued_at": 1714564800}, "issued_at: "),
        ({"issued_at": "0001-01-01T00:00:00+01:00"}, "issued_at: is out of range"),
        ({"issued_by": ""}, "issued_by: "),
        ({"issued_by": "alice\nbob"}, "issued_by: "),
        ({"app": "../etc"}, "app: "),
        ({"app": "my site"}, "app: "),
        ({"targets": []}, "targets: "),
        ({"targets": ["web-1", "a/b"]}, "targets.1: "),
        ({"targets": "web-1"}, "targets: "),
        ({"signature": "not base64!"}, "signature: "),
        ({"key_id": "alice"}, "key_id: "),
        ({"app": None}, "app is required for a deploy command"),
        ({"kind": "rollback"}, "revision is only valid in a deploy command"),
        ({"to_release": "20240501T120000Z"}, "to_release is only valid in a rollback command"),
        ({"force": True}, "force is only valid in a rollback command"),
        ({"kind": "rollback", "revision": None, "force": "yes"}, "force: "),
        ({"kind": "restart", "revision": None, "always_buildout": True}, "always_buildout is only"),
    ],
)
def test_bad_fields_are_rejected_naming_the_field(fields: dict[str, Any], expected: str) -> None:
    assert expected in rejection(payload(**fields))


def test_rejection_reasons_never_echo_the_offending_value() -> None:
    reason = rejection(payload(issued_by="hunter2\x00secret", app="p@ssw0rd"))
    assert "hunter2" not in reason
    assert "p@ssw0rd" not in reason


def test_rejection_reasons_are_bounded_when_everything_is_wrong() -> None:
    data = json.dumps({f"field{i}": i for i in range(50)}).encode()
    reason = rejection(data)
    assert "and " in reason
    assert len(reason) < 1000


@pytest.mark.parametrize(
    "revision",
    [
        "--upload-pack=x",
        "-c",
        "-",
        "HEAD..x",
        "a...b",
        "a b",
        "x\n[buildout]",
        "main\n",
        "\tmain",
        "origin:main",
        "main@{1}",
        "HEAD~1",
        "HEAD^",
        "main:path",
        "refs/heads/.hidden",
        "a//b",
        "/main",
        "main/",
        "main.",
        "main.lock",
        "ma*in",
        "ma?in",
        "ma[in",
        "ma\\in",
        "a\x00b",
        "x" * 201,
        "",
    ],
)
def test_revisions_crafted_for_git_option_or_config_injection_are_rejected(revision: str) -> None:
    assert "revision: " in rejection(payload(revision=revision))


@pytest.mark.parametrize(
    "revision",
    ["main", "v1.2.3", "release/2024-05", "feature_x", "3f2a" + "0" * 36, "a" * 200],
)
def test_ordinary_branches_tags_and_shas_are_accepted(revision: str) -> None:
    assert parse_command(payload(revision=revision)).revision == revision


@given(st.text(max_size=250))
def test_any_accepted_revision_is_one_harmless_git_word(revision: str) -> None:
    try:
        check_revision(revision)
    except ValueError:
        return
    assert not revision.startswith(("-", ".", "/"))
    assert ".." not in revision and "@{" not in revision and ":" not in revision
    assert revision.isascii() and revision.isprintable() and " " not in revision


# --- parsing: hostile input never escapes as anything but CommandRejected ----------------

command_fields = st.sampled_from([*sorted(Command.model_fields), "extra"])


def parse_or_reject(data: bytes) -> None:
    with contextlib.suppress(CommandRejected):
        parse_command(data)


@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_ever_raise_command_rejected(data: bytes) -> None:
    parse_or_reject(data)


@given(json_values)
def test_arbitrary_json_values_only_ever_raise_command_rejected(value: Any) -> None:
    parse_or_reject(json.dumps(value).encode())


@given(st.dictionaries(command_fields, json_values, max_size=14))
def test_arbitrary_dicts_of_command_fields_only_ever_raise_command_rejected(
    fields: dict[str, Any],
) -> None:
    parse_or_reject(json.dumps(fields).encode())


@given(st.dictionaries(command_fields, json_values, max_size=6))
def test_valid_commands_with_arbitrary_fields_only_ever_raise_command_rejected(
    fields: dict[str, Any],
) -> None:
    parse_or_reject(json.dumps(command_dict(**fields)).encode())


# --- canonical JSON ---------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8_with_utc_times() -> None:
    paris = timezone(timedelta(hours=2))
    value = {"b": [1, 2.5], "a": "café", "t": datetime(2024, 5, 1, 14, tzinfo=paris)}
    assert canonical_json(value) == '{"a":"café","b":[1,2.5],"t":"2024-05-01T12:00:00Z"}'.encode()


@given(st.dictionaries(st.text(), json_values, max_size=8))
def test_canonical_json_does_not_depend_on_key_order(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_json(reordered) == canonical_json(value)
    assert json.loads(canonical_json(value)) == value


@pytest.mark.parametrize("value", [float("nan"), datetime(2024, 5, 1), "\ud800"])
def test_canonical_json_refuses_values_without_one_canonical_form(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json({"v": value})


# --- signatures -------------------------------------------------------------------------


def test_a_signed_command_verifies_after_the_wire_round_trip() -> None:
    command = signed()
    assert command.key_id == fingerprint(ALICE.public_key())
    verify(parse_command(encode(command)))


def test_trusted_keys_may_be_given_by_key_id() -> None:
    verify_command(
        signed(),
        {fingerprint(ALICE): ALICE.public_key()},
        require_signatures=True,
        max_clock_skew=300,
        now=NOW,
    )


TAMPERED = {
    "id": UUID("00000000-0000-4000-8000-000000000000"),
    "kind": "configure",
    "app": "othersite",
    "revision": "evil",
    "to_release": "20240101T000000Z",
    "force": True,
    "targets": ["web-9"],
    "restart_delay": 0.0,
    "always_buildout": True,
    "stack": "otherstack",
    "issued_at": NOW + timedelta(seconds=1),
    "issued_by": "mallory",
    "key_id": fingerprint(MALLORY),
}


def test_the_signature_covers_every_field_but_itself() -> None:
    assert set(TAMPERED) == set(Command.model_fields) - {"signature"}


@pytest.mark.parametrize("field", sorted(TAMPERED))
def test_tampering_with_any_field_breaks_the_signature(field: str) -> None:
    tampered = signed().model_copy(update={field: TAMPERED[field]})
    with pytest.raises(CommandRejected, match="does not match any trusted key"):
        verify(tampered)


def test_tampering_on_the_wire_breaks_the_signature() -> None:
    wire = encode(signed()).replace(b'"revision":"main"', b'"revision":"evil"')
    with pytest.raises(CommandRejected, match="does not match any trusted key"):
        verify(parse_command(wire))


def test_a_command_signed_by_an_untrusted_key_is_rejected() -> None:
    forged = sign_command(parse_command(payload()), MALLORY)
    with pytest.raises(CommandRejected, match="does not match any trusted key"):
        verify(forged)


def test_a_command_claiming_a_trusted_key_id_but_signed_by_another_is_rejected() -> None:
    forged = sign_command(parse_command(payload()), MALLORY)
    forged = forged.model_copy(update={"key_id": fingerprint(ALICE)})
    with pytest.raises(CommandRejected, match="does not match any trusted key"):
        verify(forged)


def test_a_signature_is_accepted_from_any_of_several_trusted_keys() -> None:
    trusted = [ALICE.public_key(), MALLORY.public_key()]
    verify(sign_command(parse_command(payload()), MALLORY), trusted)


def test_unsigned_commands_are_rejected_when_signatures_are_required() -> None:
    with pytest.raises(CommandRejected, match="unsigned command"):
        verify(parse_command(payload()))


def test_unsigned_commands_pass_when_signatures_are_not_required() -> None:
    verify(parse_command(payload()), require_signatures=False)


def test_a_bad_signature_is_rejected_even_when_signatures_are_not_required() -> None:
    forged = sign_command(parse_command(payload()), MALLORY)
    with pytest.raises(CommandRejected, match="does not match"):
        verify(forged, require_signatures=False)


def test_required_signatures_with_no_trusted_keys_reject_everything() -> None:
    with pytest.raises(CommandRejected, match="no trusted keys configured"):
        verify_command(signed(), [], require_signatures=True, max_clock_skew=300, now=NOW)


@pytest.mark.parametrize(("offset", "where"), [(301, "in the future"), (-301, "in the past")])
def test_commands_outside_the_clock_skew_are_rejected(offset: int, where: str) -> None:
    command = signed(issued_at=(NOW + timedelta(seconds=offset)).isoformat())
    with pytest.raises(CommandRejected, match=f"301 s {where}, beyond max_clock_skew=300"):
        verify(command)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_commands_within_the_clock_skew_are_accepted(offset: int) -> None:
    verify(signed(issued_at=(NOW + timedelta(seconds=offset)).isoformat()))


def test_a_command_for_another_stack_is_rejected() -> None:
    with pytest.raises(CommandRejected, match="for stack 'staging'"):
        verify(signed(stack="staging"), stack="mysite")
    verify(signed(stack="mysite"), stack="mysite")


# --- stack configuration ----------------------------------------------------------------


def stack_config(**overrides: Any) -> SignedConfig:
    fields: dict[str, Any] = {
        "payload": {"plone_instances": {"per_cpu": 2, "base_port": 8080}},
        "issued_at": NOW,
        "issued_by": "alice",
    }
    fields.update(overrides)
    return SignedConfig(**fields)


def verify_stack_config(config: SignedConfig, **options: Any) -> None:
    settings: dict[str, Any] = {"require_signatures": True, "max_clock_skew": 300, "now": NOW}
    settings.update(options)
    verify_config(config, [ALICE.public_key()], **settings)


def test_a_signed_config_verifies_after_the_wire_round_trip_even_when_old() -> None:
    config = sign_config(stack_config(issued_at=NOW - timedelta(days=30)), ALICE)
    verify_stack_config(parse_message(SignedConfig, encode(config)))


def test_a_config_with_a_tampered_payload_is_rejected() -> None:
    config = sign_config(stack_config(), ALICE)
    tampered = config.model_copy(update={"payload": {"plone_instances": {"per_cpu": 64}}})
    with pytest.raises(InvalidMessage, match="does not match any trusted key"):
        verify_stack_config(tampered)


def test_an_unsigned_or_future_config_is_rejected() -> None:
    with pytest.raises(InvalidMessage, match="unsigned configuration"):
        verify_stack_config(stack_config())
    future = sign_config(stack_config(issued_at=NOW + timedelta(hours=1)), ALICE)
    with pytest.raises(InvalidMessage, match="3600 s in the future"):
        verify_stack_config(future)


def test_a_config_payload_nested_too_deep_is_rejected() -> None:
    deep: dict[str, Any] = {}
    for _ in range(20):
        deep = {"x": deep}
    with pytest.raises(InvalidMessage, match="nested deeper"):
        parse_message(SignedConfig, encode(stack_config(payload=deep)))


# --- events, presence, status -----------------------------------------------------------


def test_event_presence_and_status_survive_the_wire_round_trip() -> None:
    event = Event(
        instance="web-1",
        command_id=UUID(COMMAND_ID),
        kind="deploy",
        app="mysite",
        phase="buildout",
        status="failed",
        message="buildout exited 1\nsee log",
        details={"returncode": 1, "tail": ["Error: x"]},
        at=NOW,
    )
    presence = Presence(
        instance="web-1",
        state="online",
        address="fe80::1%eth0",
        layers=["plone_instances"],
        apps={"mysite": AppPresence(release="20240501T120000Z", revision="3f2a", deployed_at=NOW)},
        cpu_count=2,
        memory_mb=4096,
        clients=[ClientInfo(name="client1", port=8081)],
        agent_version="0.1.0",
        since=NOW,
    )
    status = StatusRecord(
        instance="web-1",
        apps={"mysite": AppStatus(command_id=None, status="unchanged", at=NOW)},
        updated_at=NOW,
    )
    for message in (event, presence, status):
        assert parse_message(type(message), encode(message)) == message


def test_a_minimal_offline_presence_is_valid_for_the_last_will() -> None:
    will = Presence(instance="web-1", state="offline", agent_version="0.1.0", since=NOW)
    assert parse_message(Presence, encode(will)).state == "offline"


@pytest.mark.parametrize(
    "fields",
    [
        {"state": "gone"},
        {"clients": [{"name": "client1", "port": 70000}]},
        {"address": "10.0.0.1\n[buildout]"},
        {"layers": ["a/b"]},
        {"cpu_count": 0},
    ],
)
def test_malformed_presence_is_an_invalid_message(fields: dict[str, Any]) -> None:
    data = {"instance": "web-1", "state": "online", "agent_version": "0.1.0"}
    data |= {"since": "2024-05-01T12:00:00Z", **fields}
    with pytest.raises(InvalidMessage, match="presence rejected"):
        parse_message(Presence, json.dumps(data).encode())
