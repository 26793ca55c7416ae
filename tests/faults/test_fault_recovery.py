"""Faults the suite first found the agent did not survive, now regression tests: a fetch
killed midway, a roll killed between a client's stop and start, and releases on another
filesystem than the mirror (docs/reliability.md, "Found by this suite, fixed")."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.agents import APP, AgentProcess, Operator, wait_results
from support.broker import Collector, running_mosquitto
from support.components import unavailable
from support.processes import wait_until
from support.site import SiteRepo, write_config
from support.supervisord import Supervisord, running_supervisord

from agent.adapters.host import HostFacts
from agent.node.pipeline import Pipeline

pytestmark = pytest.mark.slow


@contextmanager
def tmpfs(directory: Path, size: str = "8m") -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
        ).returncode
        != 0
    ):
        unavailable("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


async def test_releases_on_another_filesystem_than_the_mirror_still_deploy(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = write_config(tmp_path, site_repo)
    with tmpfs(config.paths.root / APP / "releases"):
        outcome = await Pipeline(config, facts=HostFacts(cpu_count=2, memory_mb=4096)).deploy(APP)
        assert outcome.status == "succeeded", outcome.message


def client1_state(sv: Supervisord) -> str:
    return str(sv.call("getProcessInfo", "client1:client1")["statename"])


def test_a_client_stopped_by_a_killed_roll_runs_again_after_the_agent_restarts(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    include = f"{tmp_path}/web-1/srv/{APP}/current/etc/supervisor/*.conf"
    with (
        running_mosquitto(tmp_path / "broker") as broker,
        running_supervisord(tmp_path / "sv", include=[include]) as sv,
        Collector(broker.port, ["deploy-agent/test/events/+"]) as seen,
    ):
        operator = Operator.create(broker.port, tmp_path / "operator")
        agent = AgentProcess.create(
            tmp_path,
            port=broker.port,
            repo=site_repo,
            operator=operator,
            layers=["plone_instances", "zeoserver"],
            clients=1,
            supervisor={"url": sv.url},
        )
        agent.start()
        try:
            agent.wait_logged("mqtt.connected")
            first = operator.command("deploy")
            operator.send(first)
            assert wait_results(seen, first, {"web-1"})["web-1"].status == "succeeded"
            site_repo.commit({"VERSION": "2\n"})
            second = operator.command("deploy")
            operator.send(second)
            agent.follow().wait_for("pipeline.phase", phase="restart", status="started")
            wait_until(
                lambda: client1_state(sv) != "RUNNING", 30, "client1 was never stopped", 0.005
            )
            agent.kill_tree()  # the agent dies waiting for the stop: start is never sent
            agent.start()
            agent.wait_logged("mqtt.connected")
            assert wait_results(seen, second, {"web-1"})["web-1"].status == "interrupted"
            same = operator.command("deploy")  # same revision, same cfg: nothing to do
            operator.send(same)
            assert wait_results(seen, same, {"web-1"})["web-1"].status == "unchanged"
            wait_until(
                lambda: client1_state(sv) == "RUNNING", 15, "client1 is still down after recovery"
            )
        finally:
            agent.stop(timeout=30)


async def test_a_fetch_killed_midway_does_not_block_the_next_deploys(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = write_config(tmp_path, site_repo)
    pipeline = Pipeline(config, facts=HostFacts(cpu_count=2, memory_mb=4096))
    assert (await pipeline.deploy(APP)).status == "succeeded"
    site_repo.commit({"VERSION": "2\n"})
    # What SIGKILL of the agent's cgroup during `git fetch` leaves behind (seen in
    # test_fault_agent_kill.py): git's lock on the ref it was updating.
    (config.paths.root / APP / "repo.git" / "refs" / "heads" / "main.lock").write_text("")
    outcome = await pipeline.deploy(APP)
    assert outcome.status == "succeeded", outcome.message
