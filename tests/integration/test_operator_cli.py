"""The operator's command line against a real Mosquitto, driven as a subprocess.

Until the daemon lands, small scripted agents play the agents' part: they publish a
retained presence and answer commands with events exactly as the broker contract says
(received → progress → one final result, "rejected" for a command they do not trust).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from support.broker import retained, running_mosquitto
from support.cli import CliResult, cli_env, run_cli, run_cli_async
from support.ports import free_port

from agent.adapters.keys import generate_keypair, load_public_key
from agent.core.errors import CommandRejected
from agent.protocol import (
    AppPresence,
    AppStatus,
    Event,
    Presence,
    SignedConfig,
    StatusRecord,
    Topics,
    encode,
    parse_command,
    parse_message,
    verify_command,
    verify_config,
)

pytestmark = pytest.mark.slow
SHA = "3f2a9c0d1e2b3c4d5e6f708192a3b4c5d6e7f809"


@dataclass
class Broker:
    port: int


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with running_mosquitto(tmp_path_factory.mktemp("mosquitto")) as mosquitto:
        yield Broker(port=mosquitto.port)


@dataclass
class Operator:
    """One test's stack, its operator config file and the agents' trusted key."""

    stack: str
    config: Path
    trusted: Ed25519PublicKey
    port: int
    topics: Topics = field(init=False)

    def __post_init__(self) -> None:
        self.topics = Topics("deploy-agent", self.stack)


@pytest.fixture
def operator(broker: Broker, tmp_path: Path) -> Operator:
    key = generate_keypair(tmp_path / "operator")
    stack = f"s{uuid4().hex[:10]}"  # retained messages of other tests stay out of sight
    config = tmp_path / "operator.yaml"
    config.write_text(
        f"stack: {stack}\nbroker: {{host: 127.0.0.1, port: {broker.port}}}\n"
        f"key: operator\nissued_by: ci@test\n"
    )
    return Operator(stack, config, load_public_key(key.public_path), broker.port)


Timeline = list[tuple[str, str, str]]  # (what, instance, command id), in order of happening


@dataclass
class FakeAgent:
    """An instance as the broker contract describes it, with a scripted outcome."""

    op: Operator
    instance: str
    timeline: Timeline
    layers: list[str] = field(default_factory=lambda: ["plone_instances"])
    behaviour: str = "succeed"  # succeed | fail | silent
    trusted: Ed25519PublicKey | None = None
    state: str = "online"
    delay: float = 0.15

    def presence(self) -> Presence:
        return Presence(
            instance=self.instance,
            state=self.state,
            layers=self.layers,
            apps={"mysite": AppPresence(release="20250101T000000Z", revision=SHA)},
            agent_version="0.1.0",
            since=datetime.now(UTC),
        )

    async def publish_event(
        self,
        client: aiomqtt.Client,
        command: Any,
        phase: str,
        status: str,
        message: str = "",
        **details: Any,
    ) -> None:
        event = Event(
            instance=self.instance,
            command_id=command.id if command else None,
            kind=command.kind if command else None,
            app=command.app if command else None,
            phase=phase,
            status=status,
            message=message,
            details=details,
            at=datetime.now(UTC),
        )
        await client.publish(self.op.topics.events(self.instance), encode(event), qos=1)

    def addressed(self, targets: list[str] | None) -> bool:
        return targets is None or self.instance in targets or bool(set(self.layers) & set(targets))

    async def answer(self, client: aiomqtt.Client, payload: bytes) -> None:
        try:
            command = parse_command(payload)
        except CommandRejected as exc:
            await self.publish_event(client, None, "result", "rejected", str(exc))
            return
        if not self.addressed(command.targets):
            return
        try:
            verify_command(
                command,
                [self.trusted or self.op.trusted],
                require_signatures=True,
                max_clock_skew=300,
                now=datetime.now(UTC),
                stack=self.op.stack,
            )
        except CommandRejected as exc:
            await self.publish_event(client, command, "result", "rejected", str(exc))
            return
        self.timeline.append(("received", self.instance, str(command.id)))
        if self.behaviour == "silent":
            return
        await self.publish_event(client, command, "received", "started")
        await asyncio.sleep(self.delay)
        await self.publish_event(client, command, "buildout", "progress", "running buildout")
        await asyncio.sleep(self.delay)
        outcome = "failed" if self.behaviour == "fail" else "succeeded"
        self.timeline.append(("final", self.instance, str(command.id)))
        await self.publish_event(
            client,
            command,
            "result",
            outcome,
            "buildout exited 1" if outcome == "failed" else "",
            revision=SHA,
            release="20250102T000000Z",
            decision="new-revision",
            seconds=0.3,
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[aiomqtt.Client]:
        async with aiomqtt.Client(
            "127.0.0.1", self.op.port, identifier=self.instance + uuid4().hex[:6]
        ) as client:
            await client.publish(
                self.op.topics.instance(self.instance), encode(self.presence()), qos=1, retain=True
            )
            if self.state == "online":  # an offline one only left its retained presence
                await client.subscribe(self.op.topics.commands, qos=1)

            async def serve() -> None:
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    await self.answer(client, message.payload)

            task = asyncio.create_task(serve())
            try:
                yield client
            finally:
                task.cancel()
                await asyncio.wait([task])


@asynccontextmanager
async def fleet(*agents: FakeAgent) -> AsyncIterator[list[aiomqtt.Client]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(agent.running()) for agent in agents]


def outcomes(result: CliResult) -> dict[str, str]:
    return {r["instance"]: r["outcome"] for r in result.json()["results"]}


# --- deploy and rollback ----------------------------------------------------------------


async def test_deploy_wait_exits_0_when_every_instance_succeeded(operator: Operator) -> None:
    timeline: Timeline = []
    agents = [FakeAgent(operator, f"web-{n}", timeline) for n in (1, 2)]
    offline = FakeAgent(operator, "web-9", timeline, state="offline")
    async with fleet(*agents, offline):
        result = await run_cli_async(
            "deploy", "mysite", "--wait", "--timeout", "30", "--config", str(operator.config)
        )
    assert result.returncode == 0, result
    assert "web-1" in result.stdout and "web-2" in result.stdout and "web-9" not in result.stdout
    assert (
        "succeeded" in result.stdout
        and SHA[:10] in result.stdout
        and "20250102T000000Z" in result.stdout
    )
    assert "2 succeeded" in result.stdout
    assert {entry[1] for entry in timeline if entry[0] == "received"} == {"web-1", "web-2"}


async def test_deploy_json_reports_one_failed_instance_and_exits_1(operator: Operator) -> None:
    timeline: Timeline = []
    agents = [
        FakeAgent(operator, "web-1", timeline),
        FakeAgent(operator, "web-2", timeline, behaviour="fail"),
    ]
    async with fleet(*agents):
        result = await run_cli_async(
            "deploy",
            "mysite",
            "--revision",
            "main",
            "--wait",
            "--json",
            "--config",
            str(operator.config),
        )
    assert result.returncode == 1, result
    document = result.json()
    assert document["exit_code"] == 1 and len(document["command_ids"]) == 1
    assert outcomes(result) == {"web-1": "succeeded", "web-2": "failed"}
    failed = next(r for r in document["results"] if r["instance"] == "web-2")
    assert failed["message"] == "buildout exited 1"


async def test_an_instance_that_never_answers_times_out_with_exit_3(operator: Operator) -> None:
    timeline: Timeline = []
    agents = [
        FakeAgent(operator, "web-1", timeline),
        FakeAgent(operator, "web-2", timeline, behaviour="silent"),
    ]
    async with fleet(*agents):
        started = time.monotonic()
        result = await run_cli_async(
            "deploy",
            "mysite",
            "--wait",
            "--timeout",
            "2",
            "--json",
            "--config",
            str(operator.config),
        )
    assert result.returncode == 3, result
    assert outcomes(result) == {"web-1": "succeeded", "web-2": "timed-out"}
    assert time.monotonic() - started < 15


async def test_no_online_instance_exits_4_without_sending(operator: Operator) -> None:
    timeline: Timeline = []
    async with fleet(FakeAgent(operator, "web-1", timeline, state="offline")):
        result = await run_cli_async("deploy", "mysite", "--wait", "--config", str(operator.config))
        targeted = await run_cli_async(
            "deploy", "mysite", "--targets", "db-layer", "--config", str(operator.config)
        )
    assert result.returncode == 4, result
    assert "no online instance matches stack" in result.stderr and "offline: web-1" in result.stderr
    assert targeted.returncode == 4 and "no online instance matches db-layer" in targeted.stderr
    assert timeline == []


async def test_batches_never_overlap_and_each_gets_its_own_command(operator: Operator) -> None:
    timeline: Timeline = []
    agents = [FakeAgent(operator, f"web-{n}", timeline) for n in (1, 2, 3, 4)]
    async with fleet(*agents):
        result = await run_cli_async(
            "deploy", "mysite", "--batch-size", "2", "--json", "--config", str(operator.config)
        )
    assert result.returncode == 0, result
    batches = result.json()["batches"]
    assert [b["instances"] for b in batches] == [["web-1", "web-2"], ["web-3", "web-4"]]
    assert [b["state"] for b in batches] == ["ran", "ran"]
    first, second = (b["command_id"] for b in batches)
    assert first != second
    last_final_of_first = max(
        i for i, e in enumerate(timeline) if e[2] == first and e[0] == "final"
    )
    first_receipt_of_second = min(i for i, e in enumerate(timeline) if e[2] == second)
    assert last_final_of_first < first_receipt_of_second
    assert {e[1] for e in timeline if e[2] == second} == {"web-3", "web-4"}


async def test_serial_rollout_stops_after_max_failures(operator: Operator) -> None:
    timeline: Timeline = []
    agents = [
        FakeAgent(operator, "web-1", timeline),
        FakeAgent(operator, "web-2", timeline, behaviour="fail"),
        FakeAgent(operator, "web-3", timeline),
        FakeAgent(operator, "web-4", timeline),
    ]
    async with fleet(*agents):
        result = await run_cli_async(
            "deploy", "mysite", "--serial", "--max-failures", "0", "--config", str(operator.config)
        )
    assert result.returncode == 1, result
    assert "batches: 1 ran, 2 ran, 3 skipped, 4 skipped" in result.stdout
    assert {e[1] for e in timeline} == {"web-1", "web-2"}


async def test_untrusted_key_is_rejected_and_the_cli_says_so(
    operator: Operator, tmp_path: Path
) -> None:
    other = load_public_key(generate_keypair(tmp_path / "someone-else").public_path)
    timeline: Timeline = []
    async with fleet(FakeAgent(operator, "web-1", timeline, trusted=other)):
        result = await run_cli_async("deploy", "mysite", "--wait", "--config", str(operator.config))
    assert result.returncode == 1, result
    assert (
        "rejected" in result.stdout and "signature does not match any trusted key" in result.stdout
    )
    assert timeline == []


async def test_rollback_wait_follows_the_same_flow(operator: Operator) -> None:
    timeline: Timeline = []
    async with fleet(FakeAgent(operator, "web-1", timeline)):
        result = await run_cli_async(
            "rollback",
            "mysite",
            "--to",
            "20250101T000000Z",
            "--wait",
            "--json",
            "--config",
            str(operator.config),
        )
    assert result.returncode == 0, result
    assert result.json()["kind"] == "rollback" and outcomes(result) == {"web-1": "succeeded"}


async def test_restart_wait_sends_a_restart_command_and_follows_it(operator: Operator) -> None:
    timeline: Timeline = []
    async with fleet(FakeAgent(operator, "web-1", timeline)):
        result = await run_cli_async(
            "restart", "mysite", "--wait", "--json", "--config", str(operator.config)
        )
    assert result.returncode == 0, result
    assert result.json()["kind"] == "restart" and outcomes(result) == {"web-1": "succeeded"}
    assert [step for step, *_ in timeline] == ["received", "final"]


async def test_without_wait_prints_the_command_id_and_exits_0(operator: Operator) -> None:
    timeline: Timeline = []
    env = cli_env(
        DEPLOY_AGENT_BROKER=f"mqtt://127.0.0.1:{operator.port}",
        DEPLOY_AGENT_STACK=operator.stack,
        DEPLOY_AGENT_KEY=str(operator.config.parent / "operator"),
    )
    async with fleet(FakeAgent(operator, "web-1", timeline)):
        result = await run_cli_async("deploy", "mysite", env=env)
        deadline = time.monotonic() + 30
        while not timeline and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    assert result.returncode == 0, result
    assert timeline and timeline[0][2] in result.stdout


async def test_broker_down_is_one_clear_line_and_exit_2(operator: Operator) -> None:
    port = free_port()
    env = cli_env(
        DEPLOY_AGENT_BROKER=f"mqtt://127.0.0.1:{port}",
        DEPLOY_AGENT_STACK="demo",
        DEPLOY_AGENT_KEY=str(operator.config.parent / "operator"),
    )
    for args in (["deploy", "mysite", "--wait"], ["status"], ["logs"]):
        result = await run_cli_async(*args, env=env)
        assert result.returncode == 2, result
        assert result.stderr.strip() == (
            f"deploy-agent: cannot reach the broker at 127.0.0.1:{port}: "
            "[Errno 111] Connection refused"
        )


# --- status, logs, config push ----------------------------------------------------------


async def test_status_shows_presence_and_last_result(operator: Operator) -> None:
    timeline: Timeline = []
    agent = FakeAgent(operator, "web-1", timeline)
    record = StatusRecord(
        instance="web-1",
        updated_at=datetime.now(UTC),
        apps={
            "mysite": AppStatus(
                status="failed",
                release="20250101T000000Z",
                revision=SHA,
                message="buildout exited 1",
                at=datetime.now(UTC),
            )
        },
    )
    async with fleet(
        agent, FakeAgent(operator, "db-1", timeline, layers=["zeoserver"], state="offline")
    ) as (client, _):
        await client.publish(operator.topics.status("web-1"), encode(record), qos=1, retain=True)
        table = await run_cli_async("status", "--config", str(operator.config))
        document = await run_cli_async("status", "--json", "--config", str(operator.config))
    assert table.returncode == 0, table
    web = next(line for line in table.stdout.splitlines() if line.startswith("web-1"))
    assert all(
        word in web
        for word in ("online", "plone_instances", "mysite", SHA[:10], "20250101T000000Z", "failed")
    )
    assert "offline" in next(line for line in table.stdout.splitlines() if line.startswith("db-1"))
    instances = document.json()["instances"]
    assert instances["web-1"]["status"]["apps"]["mysite"]["status"] == "failed"
    assert instances["db-1"]["presence"]["state"] == "offline"


async def test_status_of_an_empty_stack_exits_4(operator: Operator) -> None:
    result = await run_cli_async("status", "--config", str(operator.config))
    assert result.returncode == 4 and "no instance has announced itself" in result.stderr


async def test_logs_prints_what_arrives_filtered_as_json_lines(operator: Operator) -> None:
    stop = asyncio.Event()

    async def chatter(client: aiomqtt.Client, instance: str) -> None:
        # Stopped by an event, never cancelled mid-publish: a publish cut off by a
        # cancellation can leave aiomqtt waiting for an acknowledgement at disconnect.
        while not stop.is_set():
            for level in ("debug", "info", "error"):
                line = {
                    "event": "buildout.line",
                    "level": level,
                    "app": "mysite",
                    "timestamp": datetime.now(UTC).isoformat(),
                    "line": "Installing \x1b[31m",
                }
                await client.publish(operator.topics.logs(instance), json.dumps(line))
            await asyncio.sleep(0.1)

    timeline: Timeline = []
    async with fleet(
        FakeAgent(operator, "web-1", timeline), FakeAgent(operator, "web-2", timeline)
    ) as clients:
        tasks = [asyncio.create_task(chatter(c, f"web-{n}")) for n, c in enumerate(clients, 1)]
        started = time.monotonic()
        result = await run_cli_async(
            "logs", "--instance", "web-2", "--level", "info", "--config", str(operator.config)
        )
        stop.set()
        await asyncio.wait(tasks, timeout=10)
    assert result.returncode == 0, result
    assert time.monotonic() - started < 10
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events, result
    assert {e["instance"] for e in events} == {"web-2"}
    assert {e["level"] for e in events} == {"info", "error"}


def test_config_push_publishes_the_signed_stack_config_retained(
    operator: Operator, tmp_path: Path
) -> None:
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text(
        "plone_instances: {per_cpu: 1, restart_delay: 5}\n"
        "deploy: {mysite: {environment: {TZ: UTC}}}\n"
    )
    result = run_cli("config", "push", str(stack_file), "--config", str(operator.config))
    assert result.returncode == 0, result
    message = retained(operator.port, operator.topics.config)
    signed = parse_message(SignedConfig, message.payload)
    verify_config(
        signed,
        [operator.trusted],
        require_signatures=True,
        max_clock_skew=300,
        now=datetime.now(UTC),
        stack=operator.stack,
    )
    assert signed.payload["plone_instances"] == {"per_cpu": 1, "restart_delay": 5}
    assert signed.issued_by == "ci@test"


def test_config_push_refuses_an_invalid_stack_config(operator: Operator, tmp_path: Path) -> None:
    stack_file = tmp_path / "stack.yaml"
    stack_file.write_text("plone_instances: {per_cpu: lots}\n")
    result = run_cli("config", "push", str(stack_file), "--config", str(operator.config))
    assert result.returncode == 2
    assert "stack_config.plone_instances.per_cpu" in result.stderr
