"""The broker session against a real, private Mosquitto: persistence, will, outbox, logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support.broker import (
    Collector,
    Mosquitto,
    publish,
    retained,
    running_mosquitto,
)
from support.ports import free_port
from support.processes import wait_until_async
from support.site import REPO

from agent.adapters.mqtt import MqttSession, Outgoing
from agent.core.config import BrokerConfig

AGENT_SCRIPT = """
import asyncio, sys
from agent.core.config import BrokerConfig
from agent.adapters.mqtt import MqttSession, Outgoing

port, topic, keepalive = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

async def ignore(topic, payload, retain):
    pass

async def main():
    session = MqttSession(
        BrokerConfig(port=port, keepalive=keepalive),
        client_id="agent-will",
        will=Outgoing(topic, b"offline", retain=True),
    )

    async def announce():
        session.publish(Outgoing(topic, b"online", retain=True))

    session.on_connect.append(announce)
    await session.run(ignore)

asyncio.run(main())
"""


def broker_config(broker: Mosquitto, **overrides: object) -> BrokerConfig:
    return BrokerConfig.model_validate({"host": "127.0.0.1", "port": broker.port, **overrides})


class Inbox:
    """An ``on_message`` handler that records (topic, payload, retain)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    async def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((topic, payload, retain))

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
        await wait_until_async(lambda: len(self.messages) >= count, timeout, "messages")
        return self.messages


@asynccontextmanager
async def running(
    session: MqttSession, handler: Inbox | None = None, *, wait: bool = True
) -> AsyncIterator[MqttSession]:
    """Run the session in a task; cancel it (a clean disconnect) on the way out."""
    task = asyncio.create_task(session.run(handler or Inbox()))
    try:
        if wait:
            await asyncio.wait_for(session.connected.wait(), 10)
        yield session
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_session_receives_subscribed_messages_in_arrival_order(broker: Mosquitto) -> None:
    publish(broker.port, "p/config", b"stack-config", retain=True)
    inbox = Inbox()
    session = MqttSession(
        broker_config(broker),
        client_id="agent-order",
        subscriptions=[("p/commands", 1), ("p/config", 1)],
    )
    async with running(session, inbox):
        for n in range(5):
            publish(broker.port, "p/commands", str(n).encode())
        received = await inbox.wait_for(6)
    assert received[0] == ("p/config", b"stack-config", True)
    assert received[1:] == [("p/commands", str(n).encode(), False) for n in range(5)]


async def test_qos1_command_sent_while_agent_is_away_is_delivered_when_it_returns(
    broker: Mosquitto,
) -> None:
    def agent_session() -> MqttSession:
        return MqttSession(
            broker_config(broker), client_id="agent-away", subscriptions=[("p/commands", 1)]
        )

    async with running(agent_session()):
        pass
    publish(broker.port, "p/commands", b"deploy while away")
    inbox = Inbox()
    async with running(agent_session(), inbox):
        assert await inbox.wait_for(1) == [("p/commands", b"deploy while away", False)]


async def test_command_whose_handler_did_not_finish_is_delivered_again(broker: Mosquitto) -> None:
    """Acknowledged only after the handler returned: a crash before journaling loses nothing."""
    started = asyncio.Event()

    async def stuck(topic: str, payload: bytes, retain: bool) -> None:
        started.set()
        await asyncio.Event().wait()

    def agent_session() -> MqttSession:
        return MqttSession(
            broker_config(broker), client_id="agent-stuck", subscriptions=[("p/commands", 1)]
        )

    first = agent_session()
    task = asyncio.create_task(first.run(stuck))
    await asyncio.wait_for(first.connected.wait(), 10)
    publish(broker.port, "p/commands", b"deploy")
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task
    inbox = Inbox()
    async with running(agent_session(), inbox):
        assert await inbox.wait_for(1) == [("p/commands", b"deploy", False)]


async def test_failing_handler_is_logged_and_the_next_message_still_arrives(
    broker: Mosquitto,
) -> None:
    inbox = Inbox()

    async def handler(topic: str, payload: bytes, retain: bool) -> None:
        if payload == b"boom":
            raise ValueError("handler bug")
        await inbox(topic, payload, retain)

    session = MqttSession(broker_config(broker), client_id="agent-bug", subscriptions=[("t", 1)])
    with capture_logs() as logs:
        task = asyncio.create_task(session.run(handler))
        await asyncio.wait_for(session.connected.wait(), 10)
        publish(broker.port, "t", b"boom")
        publish(broker.port, "t", b"fine")
        assert await inbox.wait_for(1) == [("t", b"fine", False)]
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
    assert events(logs, "mqtt.handler_failed")[0]["topic"] == "t"


def start_agent_process(broker: Mosquitto, topic: str, keepalive: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(broker.port), topic, str(keepalive)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("how", "within"),
    [
        pytest.param(signal.SIGKILL, 5.0, id="killed"),
        # SIGSTOP keeps the socket open but silent: the broker waits at least 1.5 x keepalive
        # (7.5 s); Mosquitto 2.0.11 takes about 11 s with keepalive 5.
        pytest.param(signal.SIGSTOP, 16.0, id="hung"),
    ],
)
def test_last_will_marks_the_instance_offline(
    broker: Mosquitto, how: signal.Signals, within: float
) -> None:
    topic = "deploy-agent/s/instances/web-1"
    agent = start_agent_process(broker, topic, keepalive=5)
    try:
        with Collector(broker.port, [topic]) as seen:
            assert seen.wait_for(1, timeout=15) == [b"online"]
            agent.send_signal(how)
            started = time.monotonic()
            assert seen.wait_for(2, timeout=within) == [b"online", b"offline"]
            if how == signal.SIGSTOP:
                assert time.monotonic() - started > 4, "the will fired before the keepalive ran out"
    finally:
        agent.kill()
        agent.wait(5)
    last = retained(broker.port, topic)
    assert (last.payload, last.retain) == (b"offline", True)


async def test_close_sends_the_queue_then_the_last_message_and_not_the_will(
    broker: Mosquitto,
) -> None:
    presence, events_topic = "deploy-agent/s/instances/web-2", "deploy-agent/s/events/web-2"
    session = MqttSession(
        broker_config(broker),
        client_id="agent-clean",
        will=Outgoing(presence, b"offline (will)", retain=True),
    )
    with Collector(broker.port, [presence, events_topic]) as seen, capture_logs() as logs:
        task = asyncio.create_task(session.run(Inbox()))
        await asyncio.wait_for(session.connected.wait(), 10)
        for n in range(3):
            session.publish(Outgoing(events_topic, str(n).encode()))
        assert await session.close(last=Outgoing(presence, b"offline", retain=True), timeout=5)
        await asyncio.wait_for(task, 5)  # run() returns on its own
        assert await seen.gathered(4) == [b"0", b"1", b"2", b"offline"]
    assert retained(broker.port, presence).payload == b"offline"
    assert events(logs, "mqtt.closed")[0]["unsent"] == 0


async def test_outbox_survives_a_broker_restart_in_order_and_reconnects(
    broker: Mosquitto,
) -> None:
    topic = "deploy-agent/s/events/web-1"
    connects = []

    async def on_connect() -> None:
        connects.append(time.monotonic())

    session = MqttSession(broker_config(broker), client_id="agent-outbox", backoff=(0.05, 0.2))
    session.on_connect.append(on_connect)
    with (
        Collector(broker.port, [topic], client_id="operator", clean_session=False) as seen,
        capture_logs() as logs,
    ):
        async with running(session):
            session.publish(Outgoing(topic, b"0"))
            await seen.gathered(1)
            broker.stop()
            await wait_until_async(lambda: not session.connected.is_set(), 10, "still connected")
            for n in range(1, 6):
                session.publish(Outgoing(topic, str(n).encode()))
            assert not await session.flush(0.3), "nothing can be delivered while it is down"
            broker.start()
            assert await session.flush(10)
            payloads = await seen.gathered(6)
    assert payloads == [str(n).encode() for n in range(6)]
    assert len(connects) == 2, "on_connect hooks run again after a reconnect"
    assert events(logs, "mqtt.disconnected")
    assert all(e["retry_in"] <= 0.2 for e in events(logs, "mqtt.connect_failed"))
    reconnected = events(logs, "mqtt.connected")[-1]
    assert reconnected["attempt"] >= 2, reconnected


async def test_connect_attempts_back_off_with_jitter_up_to_the_cap() -> None:
    session = MqttSession(
        BrokerConfig(port=free_port()), client_id="agent-nobroker", backoff=(0.01, 0.05)
    )
    with capture_logs() as logs:
        async with running(session, wait=False):
            await wait_until_async(
                lambda: len(events(logs, "mqtt.connect_failed")) >= 8, 60, "8 failed connects"
            )
    failed = events(logs, "mqtt.connect_failed")
    assert [e["attempt"] for e in failed] == list(range(1, len(failed) + 1))
    assert len(failed) >= 8, "the cap keeps retries frequent"
    assert all(0 <= e["retry_in"] <= 0.05 for e in failed)
    assert len({e["retry_in"] for e in failed}) > 1, "full jitter spreads the retries"
    assert "refused" in str(failed[0]["reason"]).lower()


async def test_full_outbox_drops_qos0_first_then_the_oldest(broker: Mosquitto) -> None:
    topic = "deploy-agent/s/events/web-3"
    session = MqttSession(broker_config(broker), client_id="agent-full", max_outbox=4)
    with capture_logs() as logs:
        for name, qos in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", 1), ("f", 1), ("g", 1)]:
            session.publish(Outgoing(topic, name.encode(), qos=qos))
        session.publish(Outgoing(topic, b"h", qos=0))  # never evicts a QoS 1 message
    assert session.dropped == 4
    assert len(events(logs, "mqtt.outbox_full")) == 1, "warned once, not per message"
    with Collector(broker.port, [topic]) as seen:
        async with running(session):
            assert await session.flush(5)
            assert await seen.gathered(4) == [b"c", b"e", b"f", b"g"]
            await asyncio.sleep(0.2)
    assert seen.payloads() == [b"c", b"e", b"f", b"g"]


async def test_log_sink_forwards_info_and_up_and_never_blocks(broker: Mosquitto) -> None:
    topic = "deploy-agent/s/logs/web-1"
    session = MqttSession(broker_config(broker), client_id="agent-logs", max_log_queue=50)
    sink = session.log_sink(topic)
    started = time.perf_counter()
    for n in range(20_000):
        sink({"event": "offline.noise", "level": "info", "n": n})
    assert session.logs_dropped == 20_000, "dropped while disconnected, not queued"
    with Collector(broker.port, [topic]) as seen:
        async with running(session):
            sink({"event": "debug.noise", "level": "debug"})
            sink({"event": "deploy.started", "level": "info", "app": "site", "path": Path("/x")})
            await seen.gathered(1)
            for n in range(20_000):  # the loop cannot drain meanwhile: bounded, not blocking
                sink({"event": "burst", "level": "warning", "n": n})
            await seen.gathered(51)
            await asyncio.to_thread(sink, {"event": "from.thread", "level": "error"})
            received = [json.loads(p) for p in await seen.gathered(52)]
    assert time.perf_counter() - started < 5
    assert received[0] == {"event": "deploy.started", "level": "info", "app": "site", "path": "/x"}
    assert [e["event"] for e in received[1:]] == ["burst"] * 50 + ["from.thread"]
    assert session.logs_dropped >= 20_000 + 19_950


async def test_broker_password_is_used_but_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-" + secrets.token_hex(8)
    good, bad = tmp_path / "broker.pass", tmp_path / "wrong.pass"
    good.write_text(password + "\n")
    bad.write_text("not-" + password + "\n")
    caplog.set_level(logging.DEBUG)
    with (
        running_mosquitto(tmp_path / "broker", passwords={"agent-web-1": password}) as broker,
        capture_logs() as logs,
    ):
        accepted = MqttSession(
            broker_config(broker, username="agent-web-1", password_file=good),
            client_id="agent-web-1",
        )
        async with running(accepted):
            pass
        refused = MqttSession(
            broker_config(broker, username="agent-web-1", password_file=bad),
            client_id="agent-web-1b",
            backoff=(0.05, 0.1),
        )
        async with running(refused, wait=False):
            await wait_until_async(
                lambda: events(logs, "mqtt.connect_failed"), 10, "a failed connect"
            )
        broker_log = broker.log_text()
    assert "authoriz" in str(events(logs, "mqtt.connect_failed")[0]["reason"]).lower()
    everything = "\n".join([repr(logs), caplog.text, broker_log, repr(accepted), repr(refused)])
    assert password not in everything
