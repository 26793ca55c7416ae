"""Forged presence from accounts the broker lets write a presence topic: an authorised
agent (web-1 on its own topic) and a new instance the roster does not know, each
claiming a layer or an address the signed stack configuration's roster does not give
it. Real agents (web-1, web-2, a frontend rendering the HAProxy template) on a private
Mosquitto refuse every claim: 0 renders anywhere, 0 releases, nothing written.
"""

from __future__ import annotations

import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.agents import (
    TOPICS,
    AgentProcess,
    Operator,
    running_agents,
    wait_results,
)
from support.broker import Collector, publish
from support.processes import wait_until
from support.site import REPO, SiteRepo
from support.tally import HostileTally

from agent.protocol import ClientInfo, Presence, encode

pytestmark = pytest.mark.slow
NET = "127.0.61"
ROSTER = {
    "zeoserver": ["db-1"],
    "plone_instances": [f"{NET}.0/24"],
    "frontend": ["lb-1"],
}
EVIL = "127.66.66.66"


def forged(instance: str, **fields: Any) -> bytes:
    values: dict[str, Any] = {
        "instance": instance,
        "state": "online",
        "address": EVIL,
        "layers": ["plone_instances"],
        "clients": [ClientInfo(name="client1", port=8081)],
        "agent_version": "0.1.0",
        "since": datetime.now(UTC),
    }
    values.update(fields)
    return encode(Presence(**values))


def forgeries() -> list[tuple[str, bytes, str]]:
    """(topic instance, payload, what it tries)."""
    return [
        ("web-1", forged("web-1", layers=["zeoserver"], address=f"{NET}.2"), "web-1 as ZEO"),
        ("web-1", forged("web-1"), "web-1 moving its backend outside its range"),
        (
            "web-1",
            forged("web-1", layers=["plone_instances", "zeoserver"], address=f"{NET}.2"),
            "web-1 adding the ZEO layer",
        ),
        ("web-1", forged("web-1", layers=["frontend"], address=f"{NET}.2"), "web-1 as frontend"),
        ("web-9", forged("web-9"), "a stranger backend outside the range"),
        ("db-9", forged("db-9", layers=["zeoserver"], address=f"{NET}.9"), "a second ZEO server"),
        ("web-8", forged("web-8", layers=["solr"], address=f"{NET}.8"), "an unlisted layer"),
    ]


def test_forged_layer_and_address_claims_render_nothing_anywhere(
    tmp_path: Path, broker: Any, operator: Operator, site_repo: SiteRepo, tally: HostileTally
) -> None:
    backends = tmp_path / "lb" / "haproxy.cfg"
    backends.parent.mkdir()
    template = {
        "source": str(REPO / "config" / "haproxy.cfg.tmpl"),
        "destination": str(backends),
        "reload": [sys.executable, "-c", "pass"],
        "layers": ["frontend"],
    }
    common = {"stack_config.roster": ROSTER, "shutdown_probe": None}
    lb = AgentProcess.create(
        tmp_path,
        "lb-1",
        port=broker.port,
        repo=site_repo,
        operator=operator,
        address=f"{NET}.9",
        layers=["frontend"],
        templates=[template],
        **{
            **common,
            "stack_config.haproxy": {"bind": "127.0.0.1:8000", "user": "", "group": "", "log": ""},
        },
    )
    web1 = AgentProcess.create(
        tmp_path, "web-1", port=broker.port, repo=site_repo, operator=operator,
        address=f"{NET}.2", **common,
    )  # fmt: skip
    web2 = AgentProcess.create(
        tmp_path, "web-2", port=broker.port, repo=site_repo, operator=operator,
        address=f"{NET}.3", **common,
    )  # fmt: skip
    agents = (lb, web1, web2)
    with (
        Collector(broker.port, ["deploy-agent/test/events/+"]) as seen,
        running_agents(*agents),
    ):
        deploy = operator.command("deploy")
        operator.send(deploy)
        wait_results(seen, deploy, {"web-1", "web-2", "lb-1"}, timeout=180)
        wait_until(
            lambda: backends.exists() and f"{NET}.3:" in backends.read_text(),
            60,
            lambda: f"the frontend never listed web-2\n{lb.tail()}",
        )
        rendered = backends.read_bytes()
        releases = {
            a.name: sorted((a.directory / "srv" / "zeo-site" / "releases").glob("*"))
            for a in (web1, web2)
        }
        followers = {a.name: a.follow() for a in agents}
        for follower in followers.values():
            follower.poll()  # from here on: what the forgeries did
        seen_before = {name: len(f.seen) for name, f in followers.items()}
        tried: Counter[str] = Counter()
        for instance, payload, _what in forgeries():
            with tally.attempt():
                publish(broker.port, TOPICS.instance(instance), payload, retain=True)
                tried[instance] += 1
                # Every agent but the one whose topic it is refuses it, and says so.
                for name, follower in followers.items():
                    if name != instance:
                        follower.wait_for(
                            "fleet.claim_refused", 60, nth=tried[instance], member=instance
                        )
        # A command after the forgeries: each agent answers it once it has handled them
        # (and web-1 republishes its true presence after it, as after every command).
        barrier = operator.command("configure")
        operator.send(barrier)
        answers = wait_results(seen, barrier, {"web-1", "web-2", "lb-1"}, timeout=120)
        for name, follower in followers.items():
            follower.poll()
            after = follower.seen[seen_before[name] :]
            reacted = [
                e
                for e in after
                if e.get("event")
                in ("fleet.changed", "template.written", "fleet.pinned", "configure.queued")
            ]
            tally.refuse(bool(reacted), f"{name} reacted to a forged presence: {reacted}")
        tally.refuse(backends.read_bytes() != rendered, "the HAProxy backends changed")
        assert EVIL not in backends.read_text()
        for agent in (web1, web2):
            now = sorted((agent.directory / "srv" / "zeo-site" / "releases").glob("*"))
            tally.refuse(now != releases[agent.name], f"{agent.name} built a release")
            cfg = (agent.directory / "srv" / "zeo-site" / "current" / "deploy.cfg").read_text()
            assert EVIL not in cfg
        assert {n: e.status for n, e in answers.items()} == dict.fromkeys(answers, "unchanged")
