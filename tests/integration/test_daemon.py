"""The agent daemon against a real private Mosquitto, with several agents in their own
processes deploying the example site with real git and real buildout runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.agents import (
    APP,
    TOPICS,
    AgentProcess,
    Operator,
    events,
    results,
    running_agents,
    wait_results,
)
from support.broker import Collector, publish, retained
from support.cli import run_cli
from support.components import require_binary
from support.processes import wait_until
from support.site import REPO, SiteRepo

from agent.protocol import Presence, StatusRecord, encode, parse_message

pytestmark = pytest.mark.slow


def agent(
    tmp_path: Path,
    name: str,
    broker,
    site_repo: SiteRepo,
    operator: Operator,
    address: str,
    **overrides,
) -> AgentProcess:
    return AgentProcess.create(
        tmp_path,
        name,
        port=broker.port,
        repo=site_repo,
        operator=operator,
        address=address,
        **overrides,
    )


def presence_of(broker, name: str) -> Presence:
    return parse_message(Presence, retained(broker.port, TOPICS.instance(name)).payload)


def test_a_deploy_reaches_every_targeted_agent_and_each_reports(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    web2 = agent(tmp_path, "web-2", broker, site_repo, operator, "127.0.0.3")
    db = agent(
        tmp_path,
        "db-1",
        broker,
        site_repo,
        operator,
        "127.0.0.4",
        **{"instance.layers": ["zeoserver"]},
    )
    with (
        Collector(broker.port, ["deploy-agent/test/events/+"]) as seen,
        running_agents(web1, web2, db),
    ):
        command = operator.command("deploy")
        operator.send(command)
        found = wait_results(seen, command, {"web-1", "web-2", "db-1"})
        for name in ("web-1", "web-2"):
            assert found[name].status == "succeeded", found[name].message
            assert found[name].details["revision"] == site_repo.head()
            assert found[name].details["decision"] == "new-revision"
        # db-1 does not carry the app's layer: it ran configure instead, and said so.
        assert found["db-1"].status == "unchanged" and found["db-1"].kind == "deploy"
        phases = [
            e.phase for e in events(seen) if e.instance == "web-1" and e.command_id == command.id
        ]
        assert phases[0] == "received" and phases[-1] == "result"
        assert {"fetch", "buildout", "switch"} <= set(phases)
        presence = presence_of(broker, "web-1")
        assert presence.state == "online"
        assert presence.apps[APP].revision == site_repo.head()
        status = parse_message(StatusRecord, retained(broker.port, TOPICS.status("web-1")).payload)
        assert status.apps[APP].status == "succeeded"
        targeted = operator.command("deploy", targets=["web-2"], always_buildout=True)
        operator.send(targeted)
        only = wait_results(seen, targeted, {"web-2"})
        assert only["web-2"].status == "succeeded"
        # Each agent takes commands in order: once web-1 answered the next one, it has
        # had the targeted one, and answered nothing.
        barrier = operator.command("deploy", targets=["web-1"])
        operator.send(barrier)
        wait_results(seen, barrier, {"web-1"})
        assert set(results(seen, targeted)) == {"web-2"}


def test_a_command_sent_while_an_agent_is_down_runs_when_it_comes_back(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen:
        with running_agents(web1):
            pass  # first run: the persistent session and its subscriptions now exist
        command = operator.command("deploy")
        operator.send(command)  # confirmed by the broker (QoS 1) before this returns
        with running_agents(web1):
            found = wait_results(seen, command, {"web-1"})
        assert found["web-1"].status == "succeeded", found["web-1"].message


def test_bad_commands_are_rejected_with_a_reason_and_the_agent_keeps_serving(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    stranger = Operator.create(broker.port, tmp_path / "stranger")
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen, running_agents(web1):
        unsigned = operator.command("deploy", sign=False)
        forged = stranger.command("deploy")
        stale = operator.command("deploy", sign=False).model_copy(
            update={"issued_at": datetime.now(UTC) - timedelta(hours=2)}
        )
        from agent.adapters.keys import load_private_key
        from agent.protocol import sign_command

        stale = sign_command(stale, load_private_key(operator.key_path))
        unknown = operator.command("deploy", app="no-such-app")
        for bad in (unsigned, forged, stale, unknown):
            operator.send(bad)
        operator.send(b"{not json")
        operator.send(json.dumps({"id": "x", "kind": "deploy", "colour": "red"}).encode())
        operator.send(b"[" * 10_000)
        reasons = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(reasons) < 7:
            reasons = {
                i: e.message
                for i, e in enumerate(e for e in events(seen) if e.status == "rejected")
            }
            time.sleep(0.2)
        text = "\n".join(reasons.values())
        assert len(reasons) == 7, text
        for expected in ("unsigned", "trusted key", "past", "unknown app", "JSON", "nested"):
            assert expected in text, (expected, text)
        good = operator.command("deploy")
        operator.send(good)
        assert wait_results(seen, good, {"web-1"})["web-1"].status == "succeeded"
        operator.send(good)  # the same id again: a replay
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            replays = [
                e for e in events(seen) if e.command_id == good.id and e.status == "rejected"
            ]
            if replays:
                break
            time.sleep(0.2)
        assert replays and "already received" in replays[0].message
        assert web1.process is not None and web1.process.poll() is None


def test_sigkill_marks_the_agent_unreachable_and_the_others_change_nothing(
    tmp_path, broker, operator, site_repo
):
    """Its clients keep serving: an unreachable agent is no reason to re-render."""
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    web2 = agent(tmp_path, "web-2", broker, site_repo, operator, "127.0.0.3")
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen, running_agents(web1, web2):
        command = operator.command("deploy")
        operator.send(command)
        wait_results(seen, command, {"web-1", "web-2"})
        releases = sorted((tmp_path / "web-1" / "srv" / APP / "releases").iterdir())
        follower = web1.follow()
        web2.kill()
        # The will fires after 1.5 keepalives; web-1 logs the state as it applies it.
        follower.wait_for("fleet.member_state", 60, member="web-2", state="unreachable")
        assert presence_of(broker, "web-2").state == "unreachable"
        after = follower.seen[
            next(
                i
                for i, e in enumerate(follower.seen)
                if e.get("event") == "fleet.member_state"
                and e.get("member") == "web-2"
                and e.get("state") == "unreachable"
            ) :
        ]
        assert not [e for e in after if e.get("event") in ("fleet.changed", "configure.queued")]
        assert sorted((tmp_path / "web-1" / "srv" / APP / "releases").iterdir()) == releases


def test_a_burst_of_joins_gives_one_debounced_reconfigure(tmp_path, broker, operator, site_repo):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2", membership_debounce=3)
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen, running_agents(web1):
        command = operator.command("deploy", targets=["web-1"])
        operator.send(command)
        wait_results(seen, command, {"web-1"})
        joined_at = datetime.now(UTC)
        # Three instances announce themselves at once, as an autoscaling group does: the
        # test publishes the burst itself, so its spread does not depend on start-up times.
        for n in (3, 4, 5):
            joining = Presence(
                instance=f"web-{n}",
                state="online",
                address=f"127.0.0.{n}",
                layers=["plone_instances"],
                agent_version="test",
                since=datetime.now(UTC),
            )
            publish(broker.port, TOPICS.instance(f"web-{n}"), encode(joining), retain=True)
        found = wait_results(seen, None, {"web-1"}, kind="configure", timeout=60, after=joined_at)
        # Who else is online is not in deploy.cfg: the reconfigure built nothing.
        assert found["web-1"].status == "unchanged", found["web-1"].message
        logged = web1.logs(all_runs=False)
        deployed = next(
            i
            for i, e in enumerate(logged)
            if e.get("event") == "command.finished" and e.get("command_id") == str(command.id)
        )
        logged = logged[deployed:]
        changes = [i for i, e in enumerate(logged) if e.get("event") == "fleet.changed"]
        queued = [i for i, e in enumerate(logged) if e.get("event") == "configure.queued"]
        # One reconfigure, queued after the last of the three changes: with nothing left
        # to change, no second one can follow.
        assert len(changes) == 3, [logged[i] for i in changes]
        assert len(queued) == 1 and queued[0] > changes[-1], [logged[i] for i in queued]


def test_broker_restart_mid_deploy_agents_reconnect_and_report(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    with (
        Collector(
            broker.port, ["deploy-agent/test/events/+"], client_id="watcher", clean_session=False
        ) as seen,
        running_agents(web1),
    ):
        command = operator.command("deploy")
        operator.send(command)
        web1.wait_logged("pipeline.phase", phase="buildout", status="started")
        broker.stop()
        time.sleep(2)
        broker.start()
        found = wait_results(seen, command, {"web-1"}, timeout=120)
        assert found["web-1"].status == "succeeded", found["web-1"].message
        web1.wait_logged("mqtt.disconnected")
        assert len([e for e in web1.logs() if e.get("event") == "mqtt.connected"]) >= 2


def test_sigterm_waits_for_the_running_deploy_then_publishes_stopped(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen:
        web1.start()
        web1.wait_logged("mqtt.connected")
        command = operator.command("deploy")
        operator.send(command)
        web1.wait_logged("pipeline.phase", phase="buildout", status="started")
        assert web1.stop(signal.SIGTERM) == 0
        assert results(seen, command)["web-1"].status == "succeeded"
        stopped = presence_of(broker, "web-1")
        # Its clients keep running: the others keep its endpoints (and need them).
        assert stopped.state == "stopped" and stopped.clients and stopped.address == "127.0.0.2"


def test_sigterm_while_the_host_shuts_down_says_leaving(tmp_path, broker, operator, site_repo):
    """systemd's `is-system-running` says "stopping" during a shutdown (shutdown_probe)."""
    probe = [sys.executable, "-c", "print('stopping')"]
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2", shutdown_probe=probe)
    with running_agents(web1):
        web1.wait_logged("fleet.synced")
    assert presence_of(broker, "web-1").state == "leaving"
    assert web1.wait_logged("agent.offline_published")["state"] == "leaving"


def test_sigkill_mid_deploy_is_reported_interrupted_and_current_stays_valid(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen:
        with running_agents(web1):
            first = operator.command("deploy")
            operator.send(first)
            wait_results(seen, first, {"web-1"})
        live = (tmp_path / "web-1" / "srv" / APP / "current").resolve()
        site_repo.commit({"VERSION": "2\n"})
        web1.start()
        web1.wait_logged("mqtt.connected")
        second = operator.command("deploy")
        operator.send(second)
        web1.wait_logged("pipeline.phase", phase="buildout", status="started")
        web1.kill()
        assert (tmp_path / "web-1" / "srv" / APP / "current").resolve() == live
        with running_agents(web1):
            found = wait_results(seen, second, {"web-1"})
            assert found["web-1"].status == "interrupted"
            third = operator.command("deploy")
            operator.send(third)
            assert wait_results(seen, third, {"web-1"})["web-1"].status == "succeeded"
        releases = sorted(p.name for p in (tmp_path / "web-1" / "srv" / APP / "releases").iterdir())
        assert len(releases) == 2  # the half-built one was cleaned at start-up
        assert (tmp_path / "web-1" / "srv" / APP / "current" / "VERSION").read_text() == "2\n"


def test_a_frontend_keeps_a_stopped_backend_and_drops_one_that_leaves(
    tmp_path, broker, operator, site_repo
):
    backends = tmp_path / "lb" / "haproxy.cfg"
    reloads = tmp_path / "lb" / "reloads"
    backends.parent.mkdir()
    template = {
        "source": str(REPO / "config" / "haproxy.cfg.tmpl"),
        "destination": str(backends),
        "reload": [sys.executable, "-c", f"open({str(reloads)!r}, 'a').write('reload\\n')"],
        "layers": ["frontend"],
    }
    lb = agent(
        tmp_path,
        "lb-1",
        broker,
        site_repo,
        operator,
        "127.0.0.9",
        **{
            "instance.layers": ["frontend"],
            "templates": [template],
            "stack_config.haproxy": {"bind": "127.0.0.1:8000", "user": "", "group": "", "log": ""},
        },
    )
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    web2 = agent(tmp_path, "web-2", broker, site_repo, operator, "127.0.0.3")

    def written(text: str, present: bool = True) -> None:
        wait_until(
            lambda: backends.exists() and (text in backends.read_text()) == present,
            60,
            lambda: f"{text} {'never' if present else 'still'} in the backends\n{lb.tail()}",
            interval=0.1,
        )

    with running_agents(lb, web1):
        written("127.0.0.2:")
        with running_agents(web2):
            written("127.0.0.3:")
        # web-2's agent stopped, its clients did not: the frontend keeps the backend.
        lb.wait_logged("fleet.member_state", 60, member="web-2", state="stopped")
        assert "127.0.0.3:" in backends.read_text()
        with running_agents(web2):
            # A real leave while its agent runs: the agent goes, saying leaving.
            left = run_cli("leave", "-c", str(web2.config_path))
            assert left.returncode == 0, left.stderr
            assert web2.process is not None and web2.process.wait(60) == 0
            written("127.0.0.3:", present=False)
        assert presence_of(broker, "web-2").state == "leaving"
        haproxy = require_binary("haproxy")
        check = subprocess.run(
            [haproxy, "-c", "-q", "-f", str(backends)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr + backends.read_text()
        assert reloads.read_text().count("reload") >= 3


def test_a_new_instance_deploys_the_revision_the_stack_runs_when_it_starts(
    tmp_path, broker, operator, site_repo
):
    web1 = agent(tmp_path, "web-1", broker, site_repo, operator, "127.0.0.2")
    web2 = agent(tmp_path, "web-2", broker, site_repo, operator, "127.0.0.3", first_deploy=True)
    with Collector(broker.port, ["deploy-agent/test/events/+"]) as seen, running_agents(web1):
        command = operator.command("deploy")
        operator.send(command)
        deployed = wait_results(seen, command, {"web-1"})["web-1"].details["revision"]
        site_repo.commit({"VERSION": "2\n"})  # on the branch, but not deployed anywhere
        with running_agents(web2):
            found = wait_results(seen, None, {"web-2"}, kind="deploy", timeout=90)
            assert found["web-2"].status == "succeeded", found["web-2"].message
            assert found["web-2"].details["revision"] == deployed != site_repo.head()
            assert presence_of(broker, "web-2").apps[APP].revision == deployed


def test_a_stopped_backend_goes_after_member_timeout(tmp_path, broker, operator, site_repo):
    """The timer re-checks when the stopped member is due; the normal reconfigure follows."""
    backends = tmp_path / "lb" / "haproxy.cfg"
    backends.parent.mkdir()
    template = {
        "source": str(REPO / "config" / "haproxy.cfg.tmpl"),
        "destination": str(backends),
        "reload": [sys.executable, "-c", "pass"],
        "layers": ["frontend"],
    }
    lb = agent(
        tmp_path,
        "lb-1",
        broker,
        site_repo,
        operator,
        "127.0.0.9",
        member_timeout=3,
        **{
            "instance.layers": ["frontend"],
            "templates": [template],
            "stack_config.haproxy": {"bind": "127.0.0.1:8000", "user": "", "group": "", "log": ""},
        },
    )
    web2 = agent(tmp_path, "web-2", broker, site_repo, operator, "127.0.0.3")
    with running_agents(lb):
        with running_agents(web2):
            wait_until(
                lambda: backends.exists() and "127.0.0.3:" in backends.read_text(),
                60,
                lambda: f"web-2 never became a backend\n{lb.tail()}",
            )
        lb.wait_logged("fleet.member_state", 60, member="web-2", state="stopped")
        lb.wait_logged("fleet.member_expired", 60)
        wait_until(
            lambda: "127.0.0.3:" not in backends.read_text(),
            60,
            lambda: f"web-2 stayed a backend after member_timeout\n{lb.tail()}",
        )
