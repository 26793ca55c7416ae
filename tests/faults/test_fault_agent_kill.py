"""SIGKILL of a real `deploy-agent run` at every phase of a deploy (fetch, checkout, buildout,
switch, restart), with a real broker, real git, real buildout and a real supervisord.

After each kill, with the agent still dead: ``current`` is a complete release and the data
in shared/var/filestorage is intact. After the restart: the killed command is reported
(``interrupted``), a command that was only queued runs again, and the next deploy succeeds.
``FAULT_RUNS`` sets the number of kills (default 8); ``FAULT_SEED`` replays a sequence.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fault_helpers import FAULT_RUNS, app_dir
from support.agents import AgentProcess, Operator, events, wait_results
from support.broker import Collector, running_mosquitto
from support.site import SiteRepo
from support.supervisord import Supervisord, running_supervisord
from support.tally import FaultTally, Precious

from agent.protocol import Command

# Bounds a hang only: every kill costs a deploy and a recovery, more with FAULT_RUNS.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 + 120 * FAULT_RUNS)]


@dataclass(frozen=True)
class Trigger:
    """Kill right after the ``nth`` matching event the agent logs, ``nth`` drawn from
    ``low``..``high``: where the kill lands follows the agent's own progress, never a
    wall-clock window sized for one machine."""

    event: str
    match: tuple[tuple[str, str], ...]
    low: int = 1
    high: int = 1


def phase(name: str, status: str) -> tuple[tuple[str, str], ...]:
    return (("phase", name), ("status", status))


# The switch has no "started" event: it follows the end of the buildout subprocess by a few
# milliseconds (phase event, marker, symlink, rename, state.json), so a kill right after
# "buildout.step.done" lands on either side of the rename, depending on the machine; the
# test reads which side from the disk. A buildout kill lands after its nth line of output.
TRIGGERS = {
    "fetch": Trigger("pipeline.phase", phase("fetch", "started")),
    "checkout": Trigger("pipeline.phase", phase("checkout", "started")),
    "buildout": Trigger("buildout.line", (("step", "buildout"),), 1, 3),
    "switch": Trigger("buildout.step.done", (("step", "buildout"),)),
    "restart": Trigger("pipeline.phase", phase("restart", "started")),
}


def statuses(seen: Collector, command: Command) -> list[str]:
    return [e.status for e in events(seen) if e.command_id == command.id and e.phase == "result"]


def journal_state(agent: AgentProcess, command: Command | None) -> str:
    """What the agent's journal says of ``command`` after a kill: ``queued`` (received, not
    started), ``running`` (cut short), ``done:<status>`` (its result decided, maybe not yet
    delivered) or ``finished`` (the broker had its result)."""
    if command is None:
        return "none"
    path = agent.directory / "state" / "journal" / f"{command.id}.json"
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return "finished"
    if entry["state"] == "done":
        return f"done:{json.loads(entry['result'])['status']}"
    return str(entry["state"])


def expected_status(state: str) -> str:
    """What a command must end as after the restart, by its journal state at the kill."""
    if state.startswith("done:"):
        return state.removeprefix("done:")
    return {"running": "interrupted", "queued": "succeeded", "finished": "succeeded"}[state]


def stopped_programs(sv: Supervisord) -> list[str]:
    return sorted(i["name"] for i in sv.call("getAllProcessInfo") if i["statename"] != "RUNNING")


@dataclass
class Landing:
    """Where a kill landed: the last phase logged, and each command's journal state."""

    where: str
    killed: tuple[Command, str]
    queued: tuple[Command, str] | None

    def states(self) -> str:
        return self.killed[1] + (f" + queued {self.queued[1]}" if self.queued else "")


@dataclass
class KillRun:
    """One kill: a deploy of a new commit, killed at ``phase``; then recovery is checked."""

    agent: AgentProcess
    operator: Operator
    seen: Collector
    sv: Supervisord

    def kill_during(self, at: str, nth: int) -> Landing:
        """Send the deploy, kill at the trigger; a buildout kill also strands a queued one."""
        trigger = TRIGGERS[at]
        live = (app_dir(self.agent) / "current").resolve()
        follower = self.agent.follow()
        command = self.operator.command("deploy")
        self.operator.send(command)
        queued = None
        if at == "buildout":
            started = dict(phase("buildout", "started"))
            follower.wait_for("pipeline.phase", command_id=str(command.id), **started)
            queued = self.operator.command("deploy", always_buildout=True)
            self.operator.send(queued)
            follower.wait_for("command.queued", command_id=str(queued.id))
        follower.wait_for(trigger.event, nth=nth, command_id=str(command.id), **dict(trigger.match))
        self.agent.kill_tree()
        where = follower.last_phase()
        if at == "switch":
            moved = (app_dir(self.agent) / "current").resolve() != live
            where = f"switch ({'after' if moved else 'before'} the rename)"
        return Landing(
            where,
            (command, journal_state(self.agent, command)),
            (queued, journal_state(self.agent, queued)) if queued else None,
        )

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

    def recover(self, landing: Landing, *, supervised: bool) -> list[str]:
        """Restart the agent; every command ends as its journal state at the kill says (a
        running one ``interrupted``, a queued one re-run), and the next deploy succeeds."""
        self.start(supervised=supervised)
        self.agent.wait_logged("mqtt.connected")
        commands = [landing.killed, *([landing.queued] if landing.queued else [])]
        for command, state in commands:
            result = wait_results(self.seen, command, {self.agent.name}, timeout=90)
            event = result[self.agent.name]
            assert event.status == expected_status(state), (
                f"{command.id} was {state} at the kill ({landing.where}): {event.message}"
            )
        follow_up = self.operator.command("deploy", always_buildout=True)
        self.operator.send(follow_up)
        event = wait_results(self.seen, follow_up, {self.agent.name}, timeout=90)[self.agent.name]
        assert event.status == "succeeded", event.message
        return statuses(self.seen, landing.killed[0])


def test_sigkill_at_every_phase_keeps_current_complete_data_intact_and_commands_reported(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    seed = int(os.environ.get("FAULT_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    phases = [list(TRIGGERS)[n % len(TRIGGERS)] for n in range(FAULT_RUNS)]
    tally = FaultTally("kills")
    landed: Counter[str] = Counter()
    reported: Counter[str] = Counter()
    states: Counter[str] = Counter()
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
            tmp_path,
            port=broker.port,
            repo=site_repo,
            operator=operator,
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
                landing = run.kill_during(phase, rng.randint(trigger.low, trigger.high))
                tally.tried += 1
                landed[landing.where] += 1
                states[landing.states()] += 1
                tally.check(app, precious, None)
                if down := stopped_programs(sv):
                    stranded.append(f"{landing.where}: {', '.join(down)}")
                seen_statuses = run.recover(
                    landing, supervised="restart" in phases[number - 2 : number]
                )
                reported.update(seen_statuses)
                if not seen_statuses:
                    tally.flag(tally.lost, f"command killed at {landing.where} never reported")
                tally.check(app, precious, agent)
                assert (app / "current" / "VERSION").read_text() == version
                assert stopped_programs(sv) == [], "a client stayed down after the next deploy"
        finally:
            agent.stop(timeout=30)
    print(
        f"\nseed {seed}; kills landed at {dict(landed)}; journal at the kill {dict(states)}; "
        f"killed commands reported as "
        f"{dict(reported)}; clients left stopped until the next deploy: {stranded or 'none'}"
    )
    tally.report()
