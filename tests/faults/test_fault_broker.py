"""Mosquitto SIGKILLed and restarted, while an agent is idle and in the middle of a deploy:
the agent reconnects by itself, the result of the deploy reaches a persistent-session
observer, and the retained presence says online again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fault_helpers import app_dir
from support.agents import TOPICS, AgentProcess, Operator, wait_results
from support.broker import Collector, Mosquitto, retained, running_mosquitto
from support.processes import wait_until
from support.site import SiteRepo
from support.tally import FaultTally, Precious

from agent.protocol import Presence, parse_message

pytestmark = pytest.mark.slow
OUTAGE = 2.0  # seconds the broker stays down


def connections(agent: AgentProcess) -> int:
    return sum(1 for e in agent.logs(all_runs=False) if e.get("event") == "mqtt.connected")


def wait_online(
    broker: Mosquitto, agent: AgentProcess, connections_at_least: int, timeout: float = 30
) -> Presence:
    """The retained presence, once the agent reconnected and republished it."""

    def online() -> Presence | None:
        try:
            presence = parse_message(
                Presence, retained(broker.port, TOPICS.instance(agent.name), timeout=2).payload
            )
        except (TimeoutError, OSError):
            return None
        if presence.state == "online" and connections(agent) >= connections_at_least:
            return presence
        return None

    return wait_until(
        online, timeout, lambda: f"presence never back online: {agent.tail()}", interval=0.3
    )


def outage(broker: Mosquitto) -> None:
    broker.kill()
    time.sleep(OUTAGE)
    broker.start()


def test_broker_sigkill_while_idle_and_mid_deploy_loses_no_result_and_presence_comes_back(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    tally = FaultTally("broker kills")
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        Collector(
            broker.port,
            ["deploy-agent/test/events/+"],
            client_id="fault-watcher",
            clean_session=False,
        ) as seen,
    ):
        operator = Operator.create(broker.port, tmp_path / "operator")
        agent = AgentProcess.create(tmp_path, port=broker.port, repo=site_repo, operator=operator)
        app = app_dir(agent)
        agent.start()
        try:
            agent.wait_logged("mqtt.connected")
            first = operator.command("deploy")
            operator.send(first)
            assert wait_results(seen, first, {"web-1"})["web-1"].status == "succeeded"
            precious = Precious.write(app)
            broker.wait_saved()

            # 1. idle
            tally.tried += 1
            outage(broker)
            wait_online(broker, agent, 2)
            tally.check(app, precious, agent)

            # 2. mid-deploy: the result is produced while the broker is down
            site_repo.commit({"VERSION": "2\n"})
            second = operator.command("deploy")
            operator.send(second)
            agent.wait_logged("pipeline.phase", phase="buildout", status="started")
            broker.wait_saved()
            tally.tried += 1
            broker.kill()
            agent.wait_logged("pipeline.phase", phase="switch", status="done", timeout=60)
            time.sleep(OUTAGE)
            broker.start()
            found = wait_results(seen, second, {"web-1"}, timeout=60)
            if found["web-1"].status != "succeeded":
                tally.flag(tally.lost, f"deploy after the outage: {found['web-1'].message}")
            wait_online(broker, agent, 3)
            presence = parse_message(
                Presence, retained(broker.port, TOPICS.instance("web-1")).payload
            )
            assert presence.apps["zeo-site"].revision == site_repo.head()
            tally.check(app, precious, agent)
            assert (app / "current" / "VERSION").read_text() == "2\n"

            # and it still takes commands
            third = operator.command("deploy", always_buildout=True)
            operator.send(third)
            assert wait_results(seen, third, {"web-1"})["web-1"].status == "succeeded"
        finally:
            agent.stop(timeout=30)
    reconnects = sum(1 for e in agent.logs() if e.get("event") == "mqtt.connected") - 1
    print(f"\nbroker outages of {OUTAGE:g} s: the agent reconnected {reconnects} times")
    tally.report()
