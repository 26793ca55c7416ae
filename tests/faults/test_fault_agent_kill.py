"""SIGKILL of a real `deploy-agent run` at every phase of a deploy (fetch, checkout, buildout,
switch, restart), with a real broker, real git, real buildout and a real supervisord.

After each kill, with the agent still dead: ``current`` is a complete release and the data
in shared/var/filestorage is intact. After the restart: the killed command is reported
(``interrupted``), a command that was only queued runs again, and the next deploy succeeds.
``FAULT_RUNS`` sets the number of kills (default 8); ``FAULT_SEED`` replays a sequence.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from agent_helpers import AgentProcess, Operator, events, wait_results
from fault_helpers import FAULT_RUNS, LogFollower, Precious, Tally, app_dir, kill_tree
from mosquitto_helpers import Collector, running_mosquitto
from site_helpers import SiteRepo
from supervisord_helpers import Supervisord, running_supervisord

from agent.protocol import Command

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Trigger:
    """Kill ``low``..``high`` seconds (drawn at random) after the logged ``event``."""

    event: str
    match: tuple[tuple[str, str], ...]
    low: float
    high: float


def phase(name: str, status: str) -> tuple[tuple[str, str], ...]:
    return (("phase", name), ("status", status))


# The switch has no "started" event. It follows the end of the buildout subprocess by a few
# milliseconds (phase event, marker, symlink, rename, state.json), so kills drawn from
# 0-25 ms after "buildout.step.done" land on either side of the rename across runs.
TRIGGERS = {
    "fetch": Trigger("pipeline.phase", phase("fetch", "started"), 0.0, 0.05),
    "checkout": Trigger("pipeline.phase", phase("checkout", "started"), 0.0, 0.08),
    "buildout": Trigger("pipeline.phase", phase("buildout", "started"), 0.3, 1.5),
    "switch": Trigger("buildout.step.done", (("step", "buildout"),), 0.0, 0.025),
    "restart": Trigger("pipeline.phase", phase("restart", "started"), 0.0, 1.5),
}


def statuses(seen: Collector, command: Command) -> list[str]:
    return [e.status for e in events(seen) if e.command_id == command.id and e.phase == "result"]


def journal_has(agent: AgentProcess, command: Command) -> bool:
    return (agent.directory / "state" / "journal" / f"{command.id}.json").exists()


def stopped_programs(sv: Supervisord) -> list[str]:
    return sorted(i["name"] for i in sv.call("getAllProcessInfo") if i["statename"] != "RUNNING")


@dataclass
class KillRun:
    """One kill: a deploy of a new commit, killed at ``phase``; then recovery is checked."""

    agent: AgentProcess
    operator: Operator
    seen: Collector
    sv: Supervisord

    def kill_during(self, phase: str, delay: float) -> tuple[Command, Command | None, str]:
        """Send the deploy, kill at the trigger; a buildout kill also strands a queued one."""
        trigger = TRIGGERS[phase]
        live = (app_dir(self.agent) / "current").resolve()
        follower = LogFollower(self.agent)
        command = self.operator.command("deploy")
        self.operator.send(command)
        follower.wait_for(trigger.event, command_id=str(command.id), **dict(trigger.match))
        started = time.monotonic()
        queued = None
        if phase == "buildout":
            queued = self.operator.command("deploy", always_buildout=True)
            self.operator.send(queued)
            while not journal_has(self.agent, queued):
                assert time.monotonic() - started < 10, "the queued command was never journaled"
                time.sleep(0.01)
        time.sleep(max(0.0, delay - (time.monotonic() - started)))
        kill_tree(self.agent)
        where = follower.last_phase()
        if phase == "switch":
            moved = (app_dir(self.agent) / "current").resolve() != live
            where = f"switch ({'after' if moved else 'before'} the rename)"
        return command, queued, where

    def start(self, *, supervised: bool) -> None:
        """(Re)start the agent; with supervisord only when a restart is to be killed or
        redone: a health-gated roll costs seconds the other phases do not need."""
        data = yaml.safe_load(self.agent.config_path.read_text())
        if supervised:
            data["supervisor"] = {"url": self.sv.url}
        else:
            data.pop("supervisor", None)
        self.agent.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.agent.start()

    def recover(self, killed: Command, queued: Command | None, *, supervised: bool) -> list[str]:
        """Restart the agent; the killed command is reported, the next deploy succeeds."""
        self.start(supervised=supervised)
        self.agent.wait_logged("mqtt.connected")
        with contextlib.suppress(TimeoutError):  # an unreported command is counted below
            wait_results(self.seen, killed, {self.agent.name}, timeout=60)
        follow_up = queued or self.operator.command("deploy", always_buildout=True)
        if queued is None:
            self.operator.send(follow_up)
        result = wait_results(self.seen, follow_up, {self.agent.name}, timeout=90)
        event = result[self.agent.name]
        assert event.status == "succeeded", event.message
        return statuses(self.seen, killed)


def test_sigkill_at_every_phase_keeps_current_complete_data_intact_and_commands_reported(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    seed = int(os.environ.get("FAULT_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    phases = [list(TRIGGERS)[n % len(TRIGGERS)] for n in range(FAULT_RUNS)]
    tally = Tally("kills")
    landed: Counter[str] = Counter()
    reported: Counter[str] = Counter()
    stranded: list[str] = []
    include = f"{tmp_path}/web-1/srv/zeo-site/current/etc/supervisor/*.conf"
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        running_supervisord(tmp_path / "sv", include=[include]) as sv,
        Collector(
            broker.port,
            ["deploy-agent/test/events/+"],
            client_id="fault-watcher",
            clean_session=False,
        ) as seen,
    ):
        operator = Operator.create(broker.port, tmp_path / "operator")
        agent = AgentProcess.create(
            tmp_path / "web-1",
            "web-1",
            port=broker.port,
            repo=site_repo,
            operator=operator,
            address="127.0.0.2",
            layers=["plone_instances", "zeoserver"],
            clients=1,
            membership_debounce=0.2,
        )
        app = app_dir(agent)
        run = KillRun(agent, operator, seen, sv)
        run.start(supervised=phases[0] == "restart")
        try:
            agent.wait_logged("mqtt.connected")
            first = operator.command("deploy")
            operator.send(first)
            assert wait_results(seen, first, {"web-1"})["web-1"].status == "succeeded"
            precious = Precious.write(app)
            for number, phase in enumerate(phases, start=2):
                version = f"{number}\n"
                site_repo.commit({"VERSION": version})
                trigger = TRIGGERS[phase]
                killed, queued, where = run.kill_during(
                    phase, rng.uniform(trigger.low, trigger.high)
                )
                tally.tried += 1
                landed[where] += 1
                tally.check(app, precious, None)
                if down := stopped_programs(sv):
                    stranded.append(f"{where}: {', '.join(down)}")
                seen_statuses = run.recover(
                    killed, queued, supervised="restart" in phases[number - 2 : number]
                )
                reported.update(seen_statuses)
                if not seen_statuses:
                    tally.flag(tally.lost, f"command {killed.id} killed at {where} never reported")
                tally.check(app, precious, agent)
                assert (app / "current" / "VERSION").read_text() == version
                assert stopped_programs(sv) == [], "a client stayed down after the next deploy"
        finally:
            agent.stop(timeout=30)
    print(
        f"\nseed {seed}; kills landed at {dict(landed)}; killed commands reported as "
        f"{dict(reported)}; clients left stopped until the next deploy: {stranded or 'none'}"
    )
    tally.report()
