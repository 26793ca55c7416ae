"""Real Plone 6, end to end: examples/plone-site (an OpsWorks-era buildout from PyPI: a
cfg/base.cfg with plone.recipe.zope2instance and plone.recipe.zeoserver, no supervisor
part) deployed by the agent from an empty root, with the supervisord programs the agent
generates, behind HAProxy rendered from the shipped template, under GET load.

The first run downloads Plone (~70 MB, ~250 distributions) into the egg cache
(``DEPLOY_AGENT_PLONE_CACHE``, default ``~/.cache/buildout-deploy-agent``, outside the clone
so later runs reuse it); under CI an unreachable PyPI fails the test, it is never skipped.
"""

from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from support.components import require_binary
from support.load import Load
from support.plone import plone_app, plone_repository, shared_caches
from support.ports import free_port_block
from support.processes import wait_until
from support.site import git
from support.supervisord import Supervisord, running_supervisord

from agent.adapters.configfile import load_config
from agent.adapters.host import HostFacts
from agent.adapters.templates import apply_templates, build_context
from agent.core.config import BalancerConfig, TemplateConfig
from agent.core.outcome import Outcome
from agent.core.plan import Member
from agent.node.pipeline import Pipeline
from agent.node.restart import restarter_for
from agent.protocol import ClientInfo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "config" / "haproxy.cfg.tmpl"
APP = "plone"


def commit(work: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (work / name).write_text(text)
    git("commit", "-q", "-am", "change", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)


def agent_config(root: Path, bare: Path, sv: Supervisord, base_port: int, zeo: int) -> Path:
    data: dict[str, Any] = {
        "stack": "plone-test",
        "instance": {
            "id": "web-1",
            "address": "127.0.0.1",
            "layers": ["plone_instances", "zeoserver"],
        },
        "paths": {"root": str(root / "srv"), "state": str(root / "state")},
        "supervisor": {"url": sv.url},
        "apps": {
            APP: {
                **plone_app(bare),
                "restart": {
                    "programs": ["zeoserver", "client*"],
                    # /Plone from the first deploy: before_restart creates the site.
                    "health_url": "http://127.0.0.1:{port}/Plone",
                    "health_timeout": 300,
                },
                # After the ZEO server is up, before the clients (re)start, on every deploy:
                # both scripts are idempotent. Later deploys run them while clients serve.
                "hooks": {
                    "before_restart": [
                        ["bin/client1", "run", "scripts/create_site.py"],
                        ["bin/client1", "run", "scripts/upgrade.py"],
                    ],
                    "timeout": 900,
                },
            }
        },
        "stack_config": {
            "plone_instances": {
                "instance_count": 2,
                "base_port": base_port,
                "zeo": {"address": f"127.0.0.1:{zeo}"},
                "zodb_cache_size": 20000,
                "zserver_threads": 3,
            },
            # cfg/base.cfg sets TZ too: deploy.cfg must merge, never repeat it.
            "deploy": {APP: {"environment": {"TZ": "Europe/Paris"}}},
        },
    }
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def get(url: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def answers(url: str) -> tuple[int, str]:
    """``get`` for polling: a refused connection is (0, "") rather than an error."""
    try:
        return get(url)
    except OSError:
        return 0, ""


async def haproxy(
    tmp_path: Path, ports: list[int], stats: int
) -> tuple[subprocess.Popen[bytes], str]:
    """HAProxy from the shipped template, its checks and retries as a user gets them."""
    binary = require_binary("haproxy")
    bind = free_port_block(1) + 1
    me = Member("web-1", "127.0.0.1", ("plone_instances",))
    context = build_context(
        stack="plone-test",
        instance=me,
        members=[me],
        clients={"web-1": [ClientInfo(name=f"client{n}", port=p) for n, p in enumerate(ports, 1)]},
        stack_config={
            "haproxy": {
                "bind": f"127.0.0.1:{bind}",
                # Started once the site exists: a client enters the pool once it renders
                # the site, not while its first page takes seconds (docs/plone.md).
                "check_path": "/Plone",
                "stats_bind": f"127.0.0.1:{stats}",
                "user": "",
                "group": "",
                # HAProxy's own log (server state changes with their reason, each request
                # with its status) into haproxy.log: what the balancer saw of each roll.
                "log": "stdout format raw local0",
            }
        },
    )
    destination = tmp_path / "haproxy.cfg"
    await apply_templates([TemplateConfig(source=TEMPLATE, destination=destination)], context)
    with (tmp_path / "haproxy.log").open("wb") as log:
        process = subprocess.Popen(
            [binary, "-db", "-f", str(destination)], stdout=log, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{bind}"


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def pid(sv: Supervisord, program: str) -> int:
    return int(sv.call("getProcessInfo", program)["pid"])


def deployed(outcome: Outcome) -> Outcome:
    assert outcome.status == "succeeded", outcome.message
    return outcome


async def test_plone_deploys_from_an_empty_root_and_rolls_with_the_pool_never_empty(
    tmp_path: Path,
) -> None:
    require_binary("git")
    repo = plone_repository(tmp_path)
    work, bare = repo.work, repo.bare
    base_port, zeo_port = free_port_block(2), free_port_block(1) + 1
    ports = [base_port + 1, base_port + 2]
    app_root = tmp_path / "srv" / APP
    with running_supervisord(tmp_path / "sv", include=[f"{app_root}/supervisor.conf"]) as sv:
        config = load_config(agent_config(tmp_path, bare, sv, base_port, zeo_port))
        shared_caches(app_root)
        pipeline = Pipeline(
            config, restarter=restarter_for(config), facts=HostFacts(cpu_count=2, memory_mb=4096)
        )
        # 1. First deploy from an empty root: the agent writes the supervisord programs.
        first = deployed(await pipeline.deploy(APP))
        running = {p["name"] for p in sv.call("getAllProcessInfo") if p["statename"] == "RUNNING"}
        assert {"zeoserver", "client1", "client2"} <= running
        current = app_root / "current"
        assert listening(f"127.0.0.1:{zeo_port}"), "the ZEO server listens on the stack's address"
        assert "threads = 3" in (current / "parts" / "client1" / "etc" / "wsgi.ini").read_text()
        zope_conf = (current / "parts" / "client1" / "etc" / "zope.conf").read_text()
        assert zope_conf.count("TZ ") == 1 and "TZ Europe/Paris" in zope_conf
        # The before_restart hook created the site: the /Plone health gate passed.
        for port in ports:
            assert get(f"http://127.0.0.1:{port}/Plone")[0] == 200
        stats = free_port_block(1) + 1
        process, url = await haproxy(tmp_path, ports, stats)
        try:
            wait_until(
                lambda: answers(f"{url}/Plone")[0] == 200, 120, "HAProxy never served /Plone"
            )
            # 2. A configuration change, rolled under load.
            stack = dict(config.stack_config)
            stack["plone_instances"] = {**stack["plone_instances"], "zodb_cache_size": 25000}
            app = config.apps[APP]
            # The roll drains each client in HAProxy and waits for HAProxy to count it UP
            # again (docs/plone.md).
            balancer = BalancerConfig(stats_url=f"http://127.0.0.1:{stats}/")
            restart = app.restart.model_copy(update={"balancer": balancer})
            apps = {**config.apps, APP: app.model_copy(update={"restart": restart})}
            changed = config.model_copy(update={"stack_config": stack, "apps": apps})
            pipeline = Pipeline(
                changed,
                restarter=restarter_for(changed),
                facts=HostFacts(cpu_count=2, memory_mb=4096),
            )
            zeo_pid = pid(sv, "zeoserver")
            with structlog.testing.capture_logs() as logs:
                with Load(f"{url}/Plone", loops=2) as config_load:
                    second = deployed(await pipeline.deploy(APP))
                assert second.decision == "config-changed"
                # Nothing the ZEO server runs changed: it kept running (a ZEO restart would
                # interrupt every client).
                assert pid(sv, "zeoserver") == zeo_pid
                # 3. A new commit, rolled under load; every client serves it.
                commit(work, {"VERSION": "2.0.0\n"})
                with Load(f"{url}/Plone", loops=2) as commit_load:
                    third = deployed(await pipeline.deploy(APP))
                assert third.decision == "new-revision"
                for port in ports:
                    assert get(f"http://127.0.0.1:{port}/@@deploy-version")[1].strip() == "2.0.0"
                # 4. A rollback puts the previous release back, its code and its deploy.cfg.
                with Load(f"{url}/Plone", loops=2) as rollback_load:
                    back = deployed(await pipeline.rollback(APP))
                assert back.release == second.release
                for port in ports:
                    wait_until(
                        lambda p=port: (
                            answers(f"http://127.0.0.1:{p}/@@deploy-version")[1].strip() == "1.0.0"
                        ),
                        600,
                        "the rollback never served the previous version",
                    )
            # The upgrade hook ran next to the serving clients (bin/client1 run opens a
            # temporary ZEO cache, not client1's locked one), before each roll: the config
            # change, the new commit and the rollback.
            hook_lines = [str(e.get("line", "")) for e in logs]
            assert hook_lines.count("upgrade: no pending upgrades") == 3, hook_lines
            # Each roll drained both clients in HAProxy before stopping them.
            assert [e["servers"] for e in logs if e["event"] == "restart.drained"] == [
                ["web-1-client1"],
                ["web-1-client2"],
            ] * 3, [e for e in logs if e["event"].startswith("restart.")]
        finally:
            process.terminate()
            process.wait(timeout=30)
        assert sum(config_load.results.values()) > 0 and sum(commit_load.results.values()) > 0
        states = [
            line
            for line in (tmp_path / "haproxy.log").read_text(errors="replace").splitlines()
            if any(word in line for word in (" is DOWN", " is UP", "drain", "no server available"))
        ]
        print("\nHAProxy server states:\n  " + "\n  ".join(states))
        print(
            f"\nplone: first deploy {first.seconds} s, config change {second.seconds} s "
            f"({dict(config_load.results)}), new commit {third.seconds} s "
            f"({dict(commit_load.results)}), rollback {back.seconds} s "
            f"({dict(rollback_load.results)})"
        )
        # Every GET is answered. An answer a client was sending when it stopped would be cut
        # off (HAProxy cannot replay it; once in six runs before draining): the roll drains
        # each client in HAProxy first, through the stats page's admin form.
        for name, load in (
            ("config", config_load),
            ("commit", commit_load),
            ("rollback", rollback_load),
        ):
            assert load.failed == 0, f"GETs lost in the {name} roll: {load.results} {states}"
