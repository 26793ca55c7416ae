"""The fleet layer never takes the site down: a stack of three real agents (db-1 the ZEO
server, web-1 and web-2 one ZEO client each, to keep it quick), each
with its own supervisord and the example site, survives agent restarts (SIGTERM and
SIGKILL), broker restarts (with and without its persistence file) and one agent
partitioned from the broker long enough for its Last Will to fire, without one release
built or one client restarted anywhere.

``FAULT_CHURN`` sets the number of agent restarts (default 6; the issue's figure is 20),
``FAULT_CHURN_BROKER`` the number of broker restarts (default 2; the issue's is 5).
Every wait is on something an agent logged or published; timeouts only bound a hang.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fault_helpers import app_dir
from support.agents import AgentProcess, Operator, results, wait_results
from support.broker import Collector, Mosquitto, running_mosquitto
from support.logs import LogFollower, matches
from support.processes import wait_until
from support.site import SiteRepo
from support.supervisord import Supervisord, running_supervisord
from support.tally import SUMMARIES

pytestmark = pytest.mark.slow

CHURN = int(os.environ.get("FAULT_CHURN", "6"))
BROKER_RESTARTS = int(os.environ.get("FAULT_CHURN_BROKER", "2"))
ROSTER = {"zeoserver": ["db-1"], "plone_instances": ["web-*"]}
UNREACHABLE = "unreachable"
VICTIMS = ("web-1", "web-2", "db-1")
LAYERS = {"db-1": ["zeoserver"], "web-1": ["plone_instances"], "web-2": ["plone_instances"]}


def count(agent: AgentProcess, event: str, **match: str) -> int:
    return sum(
        1
        for e in agent.logs(all_runs=False)
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
    )


def wait_count(agent: AgentProcess, event: str, at_least: int, timeout: float = 90) -> None:
    wait_until(
        lambda: count(agent, event) >= at_least,
        timeout,
        lambda: f"{agent.name} logged {event} fewer than {at_least} times\n{agent.tail()}",
        interval=0.05,
    )


class Next:
    """The next such event of a follower: one logged after this was made, not before."""

    def __init__(self, follower: LogFollower, event: str, **match: str) -> None:
        follower.poll()
        self.follower, self.event, self.match = follower, event, match
        self.before = sum(1 for e in follower.seen if matches(e, event, match))

    def wait(self, timeout: float = 60) -> None:
        self.follower.wait_for(self.event, timeout, nth=self.before + 1, **self.match)


def releases(agent: AgentProcess) -> list[str]:
    directory = app_dir(agent) / "releases"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def drop_persistence(broker: Mosquitto) -> None:
    for stored in broker.directory.glob("mosquitto.db*"):
        stored.unlink()


def test_agent_churn_broker_restarts_and_a_partition_build_and_restart_nothing(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    seed = int(os.environ.get("FAULT_SEED", str(random.randrange(1_000_000))))
    rng = random.Random(seed)
    net = f"127.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"
    addresses = {"db-1": f"{net}.4", "web-1": f"{net}.2", "web-2": f"{net}.3"}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(running_mosquitto(tmp_path / "broker"))
        seen = stack.enter_context(
            Collector(
                broker.port,
                ["deploy-agent/test/events/+"],
                client_id="churn-watcher",
                clean_session=False,
            )
        )
        operator = Operator.create(broker.port, tmp_path / "operator")
        svs: dict[str, Supervisord] = {}
        agents: dict[str, AgentProcess] = {}
        for name, layers in LAYERS.items():
            include = f"{tmp_path}/{name}/srv/zeo-site/current/etc/supervisor/*.conf"
            svs[name] = stack.enter_context(
                running_supervisord(tmp_path / f"sv-{name}", include=[include])
            )
            agents[name] = AgentProcess.create(
                tmp_path,
                name,
                port=broker.port,
                repo=site_repo,
                operator=operator,
                address=addresses[name],
                layers=layers,
                clients=1,
                membership_debounce=0.2,
                shutdown_probe=None,
                supervisor={"url": svs[name].url},
                **{
                    # The ZEO address comes from the fleet: db-1, at 8001.
                    "stack_config.plone_instances.zeo": {},
                    "stack_config.roster": ROSTER,
                    "apps.zeo-site.layers": ["plone_instances", "zeoserver"],
                },
            )
        try:
            for agent in agents.values():
                agent.start()
            for agent in agents.values():
                agent.wait_logged("fleet.synced", timeout=60)
            for name in ("db-1", "web-1", "web-2"):  # the ZEO server first
                command = operator.command("deploy", targets=[name])
                operator.send(command)
                result = wait_results(seen, command, {name}, timeout=180)[name]
                assert result.status == "succeeded", result.message
            for sv in svs.values():
                sv.wait_serving(30)
            built = {name: releases(agent) for name, agent in agents.items()}
            pids = {name: sv.pids() for name, sv in svs.items()}
            assert pids["db-1"].keys() == {"zeoserver"}, pids
            assert all(pids[web].keys() >= {"client1"} for web in ("web-1", "web-2")), pids
            settled_at = datetime.now(UTC)

            restarts = 0
            for n in range(CHURN):
                # Round robin over three agents, signals alternating: with six or more
                # restarts each agent is stopped both ways, the ZEO server's included.
                victim = agents[VICTIMS[n % len(VICTIMS)]]
                sig = signal.SIGTERM if n % 2 == 0 else signal.SIGKILL
                if sig == signal.SIGTERM:
                    assert victim.stop(signal.SIGTERM) == 0, victim.tail()
                else:
                    victim.kill()
                victim.start()
                # Synced, and its own reconfigure (others are there now) ran: unchanged.
                victim.wait_logged("fleet.synced", timeout=60)
                victim.wait_logged("command.finished", timeout=120, kind="configure")
                restarts += 1

            broker_restarts = 0
            for n in range(BROKER_RESTARTS):
                synced = {name: count(agent, "fleet.synced") for name, agent in agents.items()}
                if n % 2 == 0:
                    broker.stop()  # SIGTERM: the store is saved
                else:
                    broker.kill()  # and without the store: nothing retained, no sessions
                    drop_persistence(broker)
                broker.start()
                for name, agent in agents.items():
                    wait_count(agent, "fleet.synced", synced[name] + 1)
                broker_restarts += 1

            partitioned = agents["web-2"]
            others = [agents["db-1"], agents["web-1"]]
            followers = [agent.follow() for agent in others]
            # Counted before the partition starts: each waits for one more than now.
            unreachable = [Next(f, "fleet.member_state", member="web-2", state=UNREACHABLE)
                for f in followers]  # fmt: skip
            synced_before = count(partitioned, "fleet.synced")
            assert partitioned.process is not None
            partitioned.process.send_signal(signal.SIGSTOP)
            try:
                # Longer than keepalive * 1.5: the broker gives up and the will fires.
                for waiting in unreachable:
                    waiting.wait()
                online = [Next(f, "fleet.member_state", member="web-2", state="online")
                    for f in followers]  # fmt: skip
            finally:
                partitioned.process.send_signal(signal.SIGCONT)
            wait_count(partitioned, "fleet.synced", synced_before + 1)
            for waiting in online:
                waiting.wait()

            # Each agent answers a configure: the stack as it now sees it renders nothing new.
            final = operator.command("configure")
            operator.send(final)
            answers = wait_results(seen, final, set(agents), timeout=120)
            assert {n: e.status for n, e in answers.items()} == dict.fromkeys(agents, "unchanged")
            for agent in agents.values():
                assert agent.process is not None and agent.process.poll() is None, agent.tail()
            new_releases = sum(
                len(set(releases(agent)) - set(built[name])) for name, agent in agents.items()
            )
            restarted = {
                name: sorted(
                    program for program, pid in sv.pids().items() if pids[name].get(program) != pid
                )
                for name, sv in svs.items()
            }
            client_restarts = sum(len(programs) for programs in restarted.values())
            reconfigures = [
                e
                for name, e in results(seen, kind="configure", after=settled_at).items()
                if e.details.get("decision") not in (None, "unchanged")
            ]
        finally:
            for agent in agents.values():
                if agent.process is not None and agent.process.poll() is None:
                    agent.process.send_signal(signal.SIGCONT)
                agent.stop(timeout=30)
    line = (
        f"churn: {restarts} agent restarts, {broker_restarts} broker restarts, 1 partition: "
        f"{new_releases} releases built, {client_restarts} client restarts elsewhere"
    )
    SUMMARIES.append(line)
    print(f"\nseed {seed}\n{line}")
    assert new_releases == 0, {name: releases(agent) for name, agent in agents.items()}
    assert client_restarts == 0, restarted
    assert not reconfigures, [(e.instance, e.message) for e in reconfigures]
