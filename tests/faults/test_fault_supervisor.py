"""supervisord gone in the middle of a deploy, and a ZEO client that crashes at start during
the roll, with the example site's real ZEO server and clients under a real supervisord."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from fault_helpers import app_dir
from support.agents import APP, AgentProcess, Operator, wait_results
from support.broker import Collector, running_mosquitto
from support.processes import wait_until
from support.site import SiteRepo, write_config
from support.supervisord import Supervisord, running_supervisord, supervisord_again
from support.tally import FaultTally, Precious

from agent.adapters.host import HostFacts
from agent.node.pipeline import Pipeline
from agent.node.restart import restarter_for

pytestmark = pytest.mark.slow


def states(sv: Supervisord) -> dict[str, str]:
    return {i["name"]: i["statename"] for i in sv.call("getAllProcessInfo")}


def wait_all_running(sv: Supervisord, timeout: float = 30) -> dict[str, str]:
    found: dict[str, str] = {}

    def all_running() -> dict[str, str] | None:
        found.clear()
        found.update(states(sv))
        return dict(found) if set(found.values()) == {"RUNNING"} else None

    return wait_until(all_running, timeout, lambda: f"not all RUNNING: {found}", interval=0.1)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_supervisord_down_mid_deploy_fails_clearly_and_the_next_deploy_succeeds_once_back(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    tally = FaultTally("supervisord outages")
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
        app = app_dir(agent)
        agent.start()
        try:
            agent.wait_logged("mqtt.connected")
            first = operator.command("deploy")
            operator.send(first)
            assert wait_results(seen, first, {"web-1"})["web-1"].status == "succeeded"
            precious = Precious.write(app)
            old = (app / "current").resolve().name

            site_repo.commit({"VERSION": "2\n"})
            second = operator.command("deploy")
            operator.send(second)
            agent.wait_logged("pipeline.phase", phase="buildout", status="started")
            sv.stop()  # `systemctl stop supervisor`: programs stopped, socket gone
            tally.tried += 1
            result = wait_results(seen, second, {"web-1"})["web-1"]
            assert result.status == "failed"
            assert result.details["error"] == "supervisor-error"
            assert "supervisord not reachable" in result.message, result.message
            assert str(sv.socket_path) in result.message
            # The switch comes before the restart: the new release is live on disk, and
            # supervisord will start it when it comes back.
            live = (app / "current").resolve().name
            assert live != old and (app / "current" / "VERSION").read_text() == "2\n"
            tally.check(app, precious, agent)

            # The agent keeps serving meanwhile. Its release is live, but whether the
            # clients run it cannot be told without supervisord: not "unchanged", which
            # means they do, but a clear failure.
            still = operator.command("deploy")
            operator.send(still)
            meanwhile = wait_results(seen, still, {"web-1"})["web-1"]
            assert meanwhile.status == "failed", meanwhile.message
            assert meanwhile.details["error"] == "supervisor-error"
            assert "supervisord not reachable" in meanwhile.message

            with supervisord_again(sv) as back:
                wait_all_running(back)
                again = operator.command("deploy", always_buildout=True)
                operator.send(again)
                found = wait_results(seen, again, {"web-1"})["web-1"]
                assert found.status == "succeeded", found.message
                assert [p["name"] for p in found.details["restart"]["programs"]] == ["client1"]
                wait_all_running(back)
                tally.check(app, precious, agent)
        finally:
            agent.stop(timeout=30)
    print(
        f"\nsupervisord down mid-deploy: failed with a supervisor-error, current on the new "
        f"release {live} (was {old})"
    )
    tally.report()


async def test_a_client_that_crashes_at_start_halts_the_roll_and_the_result_names_it(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    tally = FaultTally("client crashes")
    include = f"{tmp_path}/srv/{APP}/current/etc/supervisor/*.conf"
    with running_supervisord(tmp_path / "sv", include=[include]) as sv:
        config = write_config(
            tmp_path,
            site_repo,
            clients=3,
            supervisor={"url": sv.url},
            **{"apps.zeo-site.restart.health_timeout": 12},
        )
        pipeline = Pipeline(
            config, restarter=restarter_for(config), facts=HostFacts(cpu_count=2, memory_mb=4096)
        )
        first = await pipeline.deploy(APP)
        assert first.status == "succeeded", first.message
        app = config.paths.root / APP
        precious = Precious.write(app)
        base = config.stack_config["plone_instances"]["base_port"]
        pid3 = get(f"http://127.0.0.1:{base + 3}/").split()[3]
        client_py = "src/zeosite/zeosite/client.py"
        good = (site_repo.work / client_py).read_text()
        serve = "    return Client(config).serve()"
        assert serve in good
        crashing = good.replace(
            serve, "    if config['name'] == 'client2':\n        return STARTUP_FAILURE\n" + serve
        )
        site_repo.commit({"VERSION": "2\n", client_py: crashing})
        tally.tried += 1
        outcome = await pipeline.deploy(APP)
        assert outcome.status == "failed" and outcome.error == "restart-halted", outcome.message
        assert "client2" in outcome.message and "client1" in outcome.message
        tally.check(app, precious, None)
        # client1 runs the new code, client2 is down, client3 was never touched.
        assert get(f"http://127.0.0.1:{base + 1}/").split()[1] == "version=2"
        # client2 never serves: supervisord may show it RUNNING for the moment between a
        # restart and its next crash, but it never answers.
        with pytest.raises(OSError):
            get(f"http://127.0.0.1:{base + 2}/")
        assert get(f"http://127.0.0.1:{base + 3}/").split()[1:4:2] == ["version=1", pid3]

        site_repo.commit({client_py: good})
        fixed = await pipeline.deploy(APP)
        assert fixed.status == "succeeded", fixed.message
        wait_all_running(sv)
        tally.check(app, precious, None)
    print(f"\nclient2 crashing at start: {outcome.message}")
    tally.report()


async def test_a_zeo_server_that_does_not_start_halts_before_any_client_and_rollback_restores(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    """Generated programs; a commit breaks the ZEO server's configuration (its zeo.conf
    changes, so it is restarted first). It never comes up: no client is touched, and
    on_failure: rollback puts the previous release back and the server with it."""
    tally = FaultTally("ZEO server failures")
    include = f"{tmp_path}/srv/*/supervisor.conf"
    with running_supervisord(tmp_path / "sv", include=[include]) as sv:
        config = write_config(
            tmp_path,
            site_repo,
            clients=2,
            supervisor={"url": sv.url},
            **{
                f"apps.{APP}.programs": {
                    "generate": True,
                    "startsecs": 1,
                    "zeoserver_startsecs": 1,
                    "startretries": 0,
                },
                f"apps.{APP}.restart.health_timeout": 15,
                f"apps.{APP}.restart.on_failure": "rollback",
            },
        )
        pipeline = Pipeline(
            config, restarter=restarter_for(config), facts=HostFacts(cpu_count=2, memory_mb=4096)
        )
        first = await pipeline.deploy(APP)
        assert first.status == "succeeded", first.message
        app = config.paths.root / APP
        precious = Precious.write(app)
        base = config.stack_config["plone_instances"]["base_port"]
        clients = {n: get(f"http://127.0.0.1:{base + n}/").split()[3] for n in (1, 2)}
        recipe = "src/zeosite/zeosite/recipe.py"
        good = (site_repo.work / recipe).read_text()
        assert "invalidation-queue-size 100" in good
        site_repo.commit({recipe: good.replace("queue-size 100", "queue-size lots")})
        tally.tried += 1
        outcome = await pipeline.deploy(APP)
        assert outcome.status == "failed" and outcome.error == "restart-halted", outcome.message
        assert "zeoserver did not come back healthy" in outcome.message, outcome.message
        assert "restarted before it: none" in outcome.message
        assert outcome.release == first.release and "rolled back" in outcome.message
        assert (app / "current").resolve().name == first.release
        wait_all_running(sv)
        # The clients were never restarted, and serve from the restored ZEO server.
        for n, pid in clients.items():
            assert get(f"http://127.0.0.1:{base + n}/").split()[3] == pid
        wait_until(
            lambda: get(f"http://127.0.0.1:{base + 1}/health") is not None,
            30,
            "client1 not healthy again",
        )
        tally.check(app, precious, None)
    print(f"\nZEO server not starting: {outcome.message}")
    tally.report()
