"""Oversized, deeply nested and arbitrary payloads on every topic the daemon reads
(commands, config, instances), delivered to the real handlers of a Daemon in this process:
dropped fast, no RecursionError, memory bounded, and the agent's state untouched.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
from daemon_fixture import InProcessAgent, in_process_agent
from hostile_helpers import command, examples, json_values
from hypothesis import given
from hypothesis import strategies as st
from support.tally import HostileTally

from agent.protocol import encode

MB = 1024 * 1024
SECONDS = 5.0  # generous: a rejection takes milliseconds; the machine is shared
PEAK_BYTES = 32 * MB  # beyond the payload itself


def shapes() -> dict[str, Callable[[], bytes]]:
    """Each makes a payload; sizes straddle the 64 KiB limit on purpose."""
    return {
        "10MB-of-a": lambda: b"a" * (10 * MB),
        "10MB-json-string": lambda: b'{"id": "' + b"x" * (10 * MB) + b'"}',
        "1M-open-brackets": lambda: b"[" * MB,
        "60KB-open-brackets": lambda: b"[" * 60_000,
        "60KB-open-objects": lambda: b'{"a":' * 12_000,
        "60KB-balanced-nesting": lambda: b"[" * 30_000 + b"]" * 30_000,
        "depth-17-in-60KB": lambda: b'{"a":' + b"[" * 16 + b"]" * 16 + b"}",
        "wide-object-5000-keys": lambda: (
            "{" + ",".join(f'"k{i}":{i}' for i in range(5000)) + "}"
        ).encode(),
        "wide-array-30000": lambda: b'{"layers": [' + b"[]," * 20_000 + b"[]]}",
        "60KB-number": lambda: b'{"port": ' + b"9" * 60_000 + b"}",
        "backslash-runs": lambda: b'{"a": "' + b"\\\\\\" * 20_000 + b'"}',
        "quote-escapes": lambda: b'"\\"' * 20_000,
        "emoji-string": lambda: ('{"issued_by": "' + "\U0001f600" * 15_000 + '"}').encode(),
        "nul-bytes": lambda: b"\x00" * 60_000,
        "invalid-utf8": lambda: b"\xff\xfe" * 30_000,
        "surrogate-escapes": lambda: b'{"a": "' + b"\\ud800" * 8_000 + b'"}',
        "duplicate-keys": lambda: b'{"kind": "deploy", "kind": "configure"}',
        "bom-prefixed": lambda: b"\xef\xbb\xbf{}",
        "empty": lambda: b"",
    }


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessAgent]:
    yield from in_process_agent(tmp_path_factory.mktemp("agent"))


def topics(agent: InProcessAgent) -> dict[str, str]:
    return {
        "commands": agent.topics.commands,
        "config": agent.topics.config,
        "instances": agent.topics.instance("web-2"),
    }


def expected_log(channel: str, payload: bytes) -> set[str]:
    """What the agent logs when it drops a payload on that channel."""
    if channel == "commands":
        return {"command.rejected"}
    if not payload:  # an empty retained message clears; nothing to log
        return set()
    return {"stack_config.rejected"} if channel == "config" else {"presence.invalid"}


@pytest.mark.parametrize("shape", sorted(shapes()))
@pytest.mark.parametrize("channel", ["commands", "config", "instances"])
def test_oversized_and_nested_payloads_are_dropped_fast_with_bounded_memory(
    tally: HostileTally, agent: InProcessAgent, channel: str, shape: str
) -> None:
    payload = shapes()[shape]()
    before = agent.state()
    tracemalloc.start()
    try:
        started = time.monotonic()
        with tally.attempt():
            logs = agent.feed(topics(agent)[channel], payload)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS, f"{shape} on {channel} took {elapsed:.1f} s"
    assert peak < PEAK_BYTES, f"{shape} on {channel} peaked at {peak / MB:.0f} MB"
    events = {entry["event"] for entry in logs}
    assert expected_log(channel, payload) <= events, logs
    tally.refuse(agent.state() != before, f"{shape} on {channel} changed the agent's state")
    if channel == "commands":
        reason = next(e["reason"] for e in logs if e["event"] == "command.rejected")
        assert 0 < len(reason) < 2000


payloads = st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            [
                "instance",
                "state",
                "address",
                "layers",
                "payload",
                "issued_at",
                "issued_by",
                "signature",
                "key_id",
                "id",
                "kind",
                "stack",
                "since",
                "agent_version",
                "clients",
            ]
        ),
        json_values,
        max_size=8,
    ).map(lambda v: json.dumps(v).encode()),
)
channels = st.sampled_from(["commands", "config", "instances", "own-instance", "foreign"])


@examples(250)
@given(channels, payloads)
def test_arbitrary_payloads_on_any_topic_never_raise_from_the_handlers(
    tally: HostileTally, agent: InProcessAgent, channel: str, payload: bytes
) -> None:
    topic = {
        **topics(agent),
        "own-instance": agent.topics.instance("web-1"),
        "foreign": "deploy-agent/other/commands",
    }[channel]
    before = agent.state()
    with tally.attempt():
        logs = agent.feed(topic, payload)
    assert not [e for e in logs if e.get("log_level") in ("critical", "exception")], logs
    tally.refuse(
        agent.state() != before and channel != "instances",
        f"{payload[:100]!r} on {channel} changed the agent's state",
    )
    if channel == "instances" and agent.state() != before:
        # Only a well-formed presence for that instance may change the fleet view.
        assert any(e["event"] == "fleet.changed" for e in logs), logs


def test_the_in_process_agent_is_still_serving_after_all_that(
    tally: HostileTally, agent: InProcessAgent
) -> None:
    with tally.attempt():
        fresh = command("configure", now=datetime.now(UTC))
        logs = agent.feed(agent.topics.commands, encode(fresh))
    assert "command.rejected" not in {e["event"] for e in logs}, logs
    assert agent.daemon.worker.queue.qsize() >= 1
