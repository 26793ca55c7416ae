"""The operator's command line driven as a subprocess against real agent daemons (real
Mosquitto, real git, real buildout): what a CI job that runs `deploy --wait` relies on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from support.agents import APP, AgentProcess, Operator, events, running_agents
from support.broker import Collector
from support.cli import cli_env, run_cli
from support.processes import wait_until
from support.site import SiteRepo

pytestmark = pytest.mark.slow


def cli(broker, key: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = cli_env(
        DEPLOY_AGENT_BROKER=f"mqtt://127.0.0.1:{broker.port}",
        DEPLOY_AGENT_STACK="test",
        DEPLOY_AGENT_KEY=str(key),
    )
    return run_cli(*args, env=env, timeout=timeout)


def fleet(
    tmp_path: Path, broker, repo: SiteRepo, operator: Operator, **web2_overrides
) -> tuple[AgentProcess, AgentProcess]:
    web1 = AgentProcess.create(tmp_path, port=broker.port, repo=repo, operator=operator)
    web2 = AgentProcess.create(
        tmp_path,
        "web-2",
        port=broker.port,
        repo=repo,
        operator=operator,
        address="127.0.0.3",
        **web2_overrides,
    )
    return web1, web2


def test_deploy_wait_exits_0_with_a_summary_then_status_and_logs_show_the_fleet(
    tmp_path, broker, operator, site_repo
):
    with running_agents(*fleet(tmp_path, broker, site_repo, operator)):
        result = cli(broker, operator.key_path, "deploy", APP, "--wait", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        by_instance = {r["instance"]: r for r in report["results"]}
        assert set(by_instance) == {"web-1", "web-2"}
        assert all(r["outcome"] == "succeeded" for r in by_instance.values())
        assert by_instance["web-1"]["revision"] == site_repo.head()
        status = cli(broker, operator.key_path, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert site_repo.head()[:7] in status.stdout and "web-2" in status.stdout
        logs = cli(broker, operator.key_path, "logs", "--json", "--instance", "web-1")
        assert logs.returncode == 0, logs.stderr
        again = cli(broker, operator.key_path, "deploy", APP, "--wait")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "unchanged" in again.stdout


def test_one_failed_instance_exits_1_and_names_it(tmp_path, broker, operator, site_repo):
    broken = {
        "apps.zeo-site.buildout": {
            "command": [sys.executable, "-c", "raise SystemExit('buildout broke')"]
        }
    }
    with running_agents(*fleet(tmp_path, broker, site_repo, operator, **broken)):
        result = cli(broker, operator.key_path, "deploy", APP, "--wait", "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        outcomes = {r["instance"]: r for r in json.loads(result.stdout)["results"]}
        assert outcomes["web-1"]["outcome"] == "succeeded"
        assert outcomes["web-2"]["outcome"] == "failed"
        assert "buildout" in outcomes["web-2"]["message"]


def test_an_instance_that_does_not_answer_times_out_with_exit_3(
    tmp_path, broker, operator, site_repo
):
    # A keepalive longer than the test, so web-2 stays retained online however slowly the
    # CLI starts: its Last Will cannot fire before the deploy times out.
    web1, web2 = fleet(
        tmp_path,
        broker,
        site_repo,
        operator,
        **{"broker.keepalive": 600},
    )
    with running_agents(web1, web2):
        assert web2.process is not None
        web2.process.send_signal(signal.SIGSTOP)  # alive, retained online, silent
        try:
            result = cli(
                broker, operator.key_path, "deploy", APP, "--wait", "--json", "--timeout", "25"
            )
        finally:
            web2.process.send_signal(signal.SIGCONT)
        assert result.returncode == 3, result.stdout + result.stderr
        outcomes = {r["instance"]: r["outcome"] for r in json.loads(result.stdout)["results"]}
        assert outcomes["web-1"] == "succeeded"


def test_no_targeted_instance_exits_4(tmp_path, broker, operator, site_repo):
    with running_agents(*fleet(tmp_path, broker, site_repo, operator)):
        result = cli(
            broker, operator.key_path, "deploy", APP, "--wait", "--targets", "no-such-instance"
        )
        assert result.returncode == 4, result.stdout + result.stderr


def test_batches_roll_one_instance_at_a_time(tmp_path, broker, operator, site_repo):
    with (
        Collector(broker.port, ["deploy-agent/test/events/+"]) as seen,
        running_agents(*fleet(tmp_path, broker, site_repo, operator)),
    ):
        result = cli(broker, operator.key_path, "deploy", APP, "--batch-size", "1", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert len(report["batches"]) == 2 and len(report["command_ids"]) == 2
        final = {
            e.instance: e.at
            for e in events(seen)
            if e.phase == "result" and e.command_id is not None
        }
        started = {e.instance: e.at for e in events(seen) if e.phase == "received"}
        first, second = sorted(final, key=final.get)
        assert started[second] > final[first]  # batch 2 began after batch 1 ended


def test_a_command_signed_by_an_untrusted_key_is_rejected_and_the_cli_says_so(
    tmp_path, broker, operator, site_repo
):
    stranger = Operator.create(broker.port, tmp_path / "stranger")
    with running_agents(*fleet(tmp_path, broker, site_repo, operator)):
        result = cli(broker, stranger.key_path, "deploy", APP, "--wait")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "rejected" in result.stdout and "trusted key" in result.stdout


def test_config_push_reconfigures_the_agents(tmp_path, broker, operator, site_repo):
    web1, web2 = fleet(tmp_path, broker, site_repo, operator)
    with running_agents(web1, web2):
        assert cli(broker, operator.key_path, "deploy", APP, "--wait").returncode == 0
        stack = tmp_path / "stack.yaml"
        config = yaml.safe_load(web1.config_path.read_text())["stack_config"]
        config["plone_instances"]["zodb_cache_size"] = 1234
        stack.write_text(json.dumps(config))
        pushed_at = datetime.now(UTC)
        result = cli(broker, operator.key_path, "config", "push", str(stack))
        assert result.returncode == 0, result.stdout + result.stderr
        web1.wait_logged("stack_config.changed", timeout=30)
        deadline = pushed_at.timestamp() + 60
        cfg = web1.directory / "srv" / APP / "current" / "deploy.cfg"
        while "zodb-cache-size = 1234" not in cfg.read_text():
            assert datetime.now(UTC).timestamp() < deadline, cfg.read_text()
            time.sleep(0.5)


def test_releases_per_instance_and_a_forced_rollback_onto_a_bad_release_over_the_broker(
    tmp_path, broker, operator, site_repo
):
    """`releases APP` lists each instance's releases (from its presence: status, reason);
    `rollback --to` a bad release is refused over the broker, and done with --force."""
    fails_on_2 = (
        "import os, sys; sys.exit(os.environ['DEPLOY_KIND'] == 'deploy'"
        " and open('VERSION').read().strip() == '2')"
    )
    hooks = {"apps.zeo-site.hooks": {"after_restart": [[sys.executable, "-c", fails_on_2]]}}
    with running_agents(*fleet(tmp_path, broker, site_repo, operator, **hooks)):
        assert cli(broker, operator.key_path, "deploy", APP, "--wait").returncode == 0
        site_repo.commit({"VERSION": "2\n"})
        second = cli(broker, operator.key_path, "deploy", APP, "--wait", "--json")
        assert second.returncode == 1, second.stdout + second.stderr  # web-2's hook failed

        def listed() -> dict | None:
            done = cli(broker, operator.key_path, "releases", APP, "--json")
            assert done.returncode == 0, done.stderr
            instances = json.loads(done.stdout)["instances"]
            web2 = instances.get("web-2", [])
            return instances if len(web2) == 2 and web2[1]["status"] == "bad" else None

        instances = wait_until(listed, 60, "web-2's presence never listed its bad release")
        assert [r["status"] for r in instances["web-1"]] == ["complete", "complete"]
        good, bad = instances["web-2"]
        assert good["status"] == "complete" and not good["current"]
        assert bad["current"] and "after_restart" in bad["reason"]
        assert bad["revision"] == site_repo.head()
        table = cli(broker, operator.key_path, "releases", APP).stdout
        assert "web-2 (online)" in table and "* " + bad["name"] in table

        web2 = ("--targets", "web-2", "--wait", "--json")
        back = cli(broker, operator.key_path, "rollback", APP, *web2)
        assert back.returncode == 0, back.stdout + back.stderr
        refused = cli(broker, operator.key_path, "rollback", APP, "--to", bad["name"], *web2)
        assert refused.returncode == 1 and "--force" in refused.stdout, refused.stdout
        forced = cli(
            broker, operator.key_path, "rollback", APP, "--to", bad["name"], "--force", *web2
        )
        assert forced.returncode == 0, forced.stdout + forced.stderr
        [result] = json.loads(forced.stdout)["results"]
        assert result["instance"] == "web-2" and result["release"] == bad["name"]
