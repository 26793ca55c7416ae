"""A crash in the roll, then another in the repair roll: the repair is journaled before the
interrupted command is finished, so the third start repairs again, and every client ends
on ``current``'s code. The repair restarts only the clients the roll had not reached: the
one already on ``current`` keeps its process throughout. Kills land right after a logged
event (a client restarted), never after a wall-clock delay.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import yaml
from fault_helpers import app_dir
from support.agents import AgentProcess, Operator, wait_results
from support.broker import Collector, running_mosquitto
from support.processes import wait_until
from support.site import SiteRepo
from support.supervisord import running_supervisord
from support.tally import FaultTally, Precious

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def answer(port: int) -> list[str]:
    """``zeosite version=N client=... pid=P ...`` split; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return response.read().decode().split()
    except OSError:
        return []


def served(port: int) -> str | None:
    """The version a client serves, or None while it does not answer."""
    words = answer(port)
    return words[1] if len(words) > 1 else None


def test_a_kill_in_the_roll_then_in_the_repair_ends_with_every_client_on_current(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    tally = FaultTally("double kills (roll, then repair)")
    include = f"{tmp_path}/web-1/srv/zeo-site/current/etc/supervisor/*.conf"
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        running_supervisord(tmp_path / "sv", include=[include]) as sv,
        Collector(
            broker.port, ["deploy-agent/test/events/+"], client_id="watcher", clean_session=False
        ) as seen,
    ):
        operator = Operator.create(broker.port, tmp_path / "operator")
        agent = AgentProcess.create(
            tmp_path,
            port=broker.port,
            repo=site_repo,
            operator=operator,
            layers=["plone_instances", "zeoserver"],
            clients=3,
            supervisor={"url": sv.url},
        )
        app = app_dir(agent)
        agent.start()
        try:
            agent.wait_logged("mqtt.connected")
            first = operator.command("deploy")
            operator.send(first)
            assert wait_results(seen, first, {"web-1"})["web-1"].status == "succeeded"
            precious = Precious.write(app)
            settings = yaml.safe_load(agent.config_path.read_text())["stack_config"]
            base = settings["plone_instances"]["base_port"]
            ports = [base + 1, base + 2, base + 3]
            site_repo.commit({"VERSION": "2\n"})
            tally.tried += 1
            # 1. Killed in the roll, right after client1 came back on the new code.
            deploy = operator.command("deploy")
            operator.send(deploy)
            agent.follow().wait_for(
                "restart.program", 120, program="client1", command_id=str(deploy.id)
            )
            agent.kill_tree()
            tally.check(app, precious, None)
            client1 = answer(ports[0])
            assert client1[1:2] == ["version=2"], client1
            # 2. Started again: the repair (finish the roll) runs; killed after its first
            # client, which is client2: client1 runs current already.
            agent.start()
            agent.follow().wait_for("journal.repair", 60)
            agent.follow().wait_for("restart.program", 120, program="client2")
            agent.kill_tree()
            tally.check(app, precious, None)
            # 3. Started again: the repair was journaled, so it runs again, to its end.
            agent.start()
            agent.follow().wait_for("journal.repair_again", 60)
            wait_until(
                lambda: all(served(port) == "version=2" for port in ports),
                120,
                lambda: f"clients serve {[served(p) for p in ports]}, current is version 2",
            )
            assert (app / "current" / "VERSION").read_text() == "2\n"
            assert answer(ports[0])[:4] == client1[:4]  # the same pid: never restarted again
            wait_until(
                lambda: not list((agent.directory / "state" / "journal").glob("repair-*")),
                60,
                "the repair's journal entry stayed",
            )
            events = wait_results(seen, deploy, {"web-1"})
            assert events["web-1"].status == "interrupted"
            tally.check(app, precious, agent)
        finally:
            agent.stop(timeout=30)
    tally.report()
