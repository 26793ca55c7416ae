"""End to end: a real ``deploy-agent run`` on a private Mosquitto takes a burst of hostile
messages on commands, config and instances, then one valid signed deploy. Every hostile
command gets a ``rejected`` event with a reason, the deploy succeeds, the agent is still
running, and neither its retained presence nor deploy.cfg shows a trace of the burst.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.agents import (
    APP,
    STACK,
    TOPICS,
    AgentProcess,
    Operator,
    events,
    results,
    running_agents,
)
from support.agents import wait_results as wait_for_results
from support.broker import Collector, publish, retained
from support.processes import wait_until
from support.site import REPO, SiteRepo
from support.tally import HostileTally

from agent.adapters.keys import load_private_key
from agent.protocol import (
    Presence,
    SignedConfig,
    encode,
    fingerprint,
    parse_message,
    sign_command,
    sign_config,
)

pytestmark = pytest.mark.slow
EVIL_ADDRESS = "6.6.6.6"
MARKERS = ("6.6.6.6", "PWNED", "evil", "[buildout]\nparts")


def cmd(operator: Operator, **fields: Any) -> dict[str, Any]:
    return json.loads(encode(operator.command(**fields)))


def hostile_commands(operator: Operator, stranger: Operator) -> list[bytes]:
    """About thirty, each one a different way to be wrong; all must be rejected."""
    good = cmd(operator)
    other = cmd(operator, revision="v2")
    stale = operator.command(sign=False).model_copy(
        update={"issued_at": datetime.now(UTC) - timedelta(hours=2)}
    )
    future = operator.command(sign=False).model_copy(
        update={"issued_at": datetime.now(UTC) + timedelta(hours=2)}
    )
    key = load_private_key(operator.key_path)
    elsewhere = operator.command(sign=False).model_copy(update={"stack": "production"})
    as_json = [
        cmd(operator, sign=False),
        cmd(stranger),
        cmd(stranger, targets=["web-2"]),
        json.loads(encode(sign_command(elsewhere, key))),
        json.loads(encode(sign_command(stale, key))),
        json.loads(encode(sign_command(future, key))),
        good | {"revision": "v3"},
        other | {"signature": good["signature"]},
        cmd(stranger) | {"key_id": fingerprint(key)},
        cmd(operator, app="no-such-app"),
        good | {"revision": "--upload-pack=touch PWNED"},
        good | {"revision": "HEAD@{1}"},
        good | {"app": "../../etc"},
        good | {"kind": "rollback", "revision": None, "to_release": "../../etc"},
        good | {"issued_by": "x\n[buildout]\nparts = evil"},
        good | {"targets": ["../x"]},
        good | {"restart_delay": -1},
        good | {"colour": "red"},
        good | {"id": "\u001b[31mPWNED"},
    ]
    raw = [
        b"",
        b"{not json",
        b"\xff\xfe\xfd",
        b"[]",
        b"null",
        b"[" * 100_000,
        json.dumps(good | {"revision": "a" * 70_000}).encode(),
        b'{"kind": "deploy", "kind": "configure"}',
        b'{"restart_delay": NaN}',
        b'{"issued_by": "\\ud800"}',
        b'{"restart_delay": ' + b"9" * 5000 + b"}",
    ]
    return [json.dumps(c).encode() for c in as_json] + raw


def hostile_configs(operator: Operator, stranger: Operator) -> list[bytes]:
    key = load_private_key(operator.key_path)

    def config(payload: dict[str, Any], **fields: Any) -> SignedConfig:
        fields.setdefault("issued_at", datetime.now(UTC))
        fields.setdefault("stack", STACK)
        return SignedConfig(payload=payload, issued_by="t", **fields)

    signed = json.loads(encode(sign_config(config({"custom": {"k": "good"}}), key)))
    evil = {"plone_instances": {"zeo": {"address": EVIL_ADDRESS}}}
    return [
        encode(config(evil)),
        encode(sign_config(config(evil), load_private_key(stranger.key_path))),
        encode(sign_config(config(evil, stack="production"), key)),
        encode(sign_config(config(evil, issued_at=datetime.now(UTC) + timedelta(hours=1)), key)),
        json.dumps(signed | {"payload": evil}).encode(),
        encode(sign_config(config({"plone_instances": {"per_cpu": "many"}}), key)),
        b"{" + b'"a":{' * 5000,
        b'{"payload": "' + b"x" * 200_000 + b'"}',
        b"not json at all",
        b"\x00" * 100,
    ]


def hostile_presences() -> list[tuple[str, bytes]]:
    base = {
        "state": "online",
        "layers": ["plone_instances"],
        "agent_version": "0",
        "since": datetime.now(UTC).isoformat(),
    }

    def presence(instance: str, **fields: Any) -> bytes:
        return json.dumps(base | {"instance": instance, "address": EVIL_ADDRESS} | fields).encode()

    return [
        (TOPICS.instance("evil-1"), presence("evil-1", address="1.2.3.4\n[buildout]")),
        (TOPICS.instance("evil-2"), presence("evil-2", layers=["../x"])),
        (TOPICS.instance("evil-3"), presence("evil-3", address="${buildout:directory}")),
        (TOPICS.instance("evil-4"), presence("web-1")),  # claims to be someone else
        (TOPICS.instance("evil-5"), presence("evil-5", clients=[{"name": "c", "port": 1}] * 2000)),
        (TOPICS.instance("evil-6"), presence("evil-6", clients=[{"name": "c", "port": 70000}])),
        (TOPICS.instance("evil-7"), presence("evil-7", extra=True)),
        (TOPICS.instance("evil-8"), b"[" * 100_000),
        (TOPICS.instance("evil-9"), b"x" * 300_000),
        (TOPICS.instance("web-1"), presence("web-1")),  # a forged presence of the agent itself
    ]


def test_a_burst_of_hostile_messages_is_rejected_and_the_agent_keeps_serving(
    tally: HostileTally, tmp_path: Path, broker: Any, operator: Operator, site_repo: SiteRepo
) -> None:
    stranger = Operator.create(broker.port, tmp_path / "stranger")
    agent = AgentProcess.create(tmp_path, port=broker.port, repo=site_repo, operator=operator)
    commands = hostile_commands(operator, stranger)
    configs = hostile_configs(operator, stranger)
    presences = hostile_presences()
    with Collector(broker.port, [f"deploy-agent/{STACK}/events/+"]) as seen, running_agents(agent):
        assert agent.process is not None
        rss_before = psutil.Process(agent.process.pid).memory_info().rss
        for payload in configs:
            tally.tried += 1
            publish(broker.port, TOPICS.config, payload, retain=True)
        for topic, payload in presences:
            tally.tried += 1
            publish(broker.port, topic, payload, retain=True)
        for payload in commands:
            tally.tried += 1
            publish(broker.port, TOPICS.commands, payload)

        def rejected() -> list[Any]:
            return [e for e in events(seen) if e.status == "rejected"]

        wait_until(
            lambda: len(rejected()) >= len(commands),
            60,
            f"{len(rejected())} of {len(commands)} hostile commands rejected",
        )
        assert all(e.message for e in rejected())
        tally.wrongly_accepted += sum(1 for e in events(seen) if e.status != "rejected")
        assert tally.wrongly_accepted == 0, [e for e in events(seen) if e.status != "rejected"]

        good = operator.command("deploy")
        operator.send(good)
        result = wait_for_results(seen, good, {"web-1"})["web-1"]
        assert result.status == "succeeded", result.message
        operator.send(good)  # and its replay
        wait_until(lambda: len(rejected()) == len(commands) + 1, 30, "the replay was not rejected")
        assert "already received" in rejected()[-1].message

        tally.crashed += agent.process.poll() is not None
        assert agent.process.poll() is None, agent.tail()
        growth = psutil.Process(agent.process.pid).memory_info().rss - rss_before
        assert growth < 150 * 1024 * 1024, f"agent grew by {growth // 1024 // 1024} MB"
        presence = parse_message(Presence, retained(broker.port, TOPICS.instance("web-1")).payload)
        assert (presence.state, presence.address) == ("online", "127.0.0.2")
        assert presence.layers == ["plone_instances"] and presence.apps[APP].revision
    cfg = (tmp_path / "web-1" / "srv" / APP / "current" / "deploy.cfg").read_text()
    assert not [m for m in MARKERS if m in cfg], cfg
    # The instance's own facts, and nothing any presence said (the fleet is not in it).
    assert "instance_address = 127.0.0.2\n" in cfg and "[instances]" not in cfg
    logged = {e.get("event") for e in agent.logs()}
    assert "mqtt.handler_failed" not in logged
    assert "Traceback" not in agent.tail(lines=10_000)
    assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()


def test_a_signed_config_with_an_absurd_client_count_does_not_kill_the_agent(
    tally: HostileTally, tmp_path: Path, broker: Any, operator: Operator, site_repo: SiteRepo
) -> None:
    agent = AgentProcess.create(tmp_path, port=broker.port, repo=site_repo, operator=operator)
    absurd = SignedConfig(
        payload={"plone_instances": {"per_cpu": 1000}},
        stack=STACK,
        issued_by="t",
        issued_at=datetime.now(UTC),
    )
    with Collector(broker.port, [f"deploy-agent/{STACK}/events/+"]) as seen, running_agents(agent):
        assert agent.process is not None
        tally.tried += 1
        publish(
            broker.port,
            TOPICS.config,
            encode(sign_config(absurd, load_private_key(operator.key_path))),
            retain=True,
        )
        # The agent has taken the configuration in (or refused it) before the probe.
        wait_until(
            lambda: any(
                e.get("event") in ("stack_config.changed", "stack_config.rejected")
                for e in agent.logs(all_runs=False)
            ),
            60,
            "the agent never read the configuration",
        )
        probe = operator.command("configure")
        operator.send(probe)
        process = agent.process
        wait_until(
            lambda: process.poll() is not None or bool(results(seen, probe)),
            30,
            "no result for the probe and the agent is still running",
        )
        tally.known_bugs += process.poll() is not None
        assert process.poll() is None, agent.tail()
