"""`make plone-demo`: real Plone 6 deployed by the agent on this machine, behind HAProxy.

A git repository of examples/plone-site (an OpsWorks-era buildout: cfg/base.cfg, pinned
versions, no supervisor part), a private supervisord that includes only what the agent
writes, HAProxy from the shipped template, then what an operator would run: a first
deploy, the site created, a configuration change, a new commit, a rollback. The first run
downloads Plone into ~/.cache/buildout-deploy-agent (5 to 15 minutes); later runs reuse it.
Everything is under .plone-demo/ and keeps running; `make plone-demo-stop` stops it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from demo import BIN, REPO, free_port, git, make_repository, say, start_supervisord

from agent.adapters.templates import apply_templates, build_context
from agent.core.config import TemplateConfig
from agent.core.plan import Member
from agent.protocol import ClientInfo

DEMO = REPO / ".plone-demo"
APP = "plone"
CACHE = Path(os.environ.get("DEPLOY_AGENT_PLONE_CACHE", "~/.cache/buildout-deploy-agent"))
# Unix socket paths must stay short: not under the checkout.
SOCKET = Path(tempfile.gettempdir()) / f"deploy-agent-plone-demo-{os.getuid()}.sock"


def stop() -> None:
    for pidfile in (DEMO / "supervisord.pid", DEMO / "haproxy.pid"):
        try:
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError):
            continue
    deadline = time.monotonic() + 60
    while SOCKET.exists() and time.monotonic() < deadline:
        time.sleep(0.5)


def agent_config(bare: Path, base_port: int, zeo_port: int) -> Path:
    config = {
        "stack": "plone-demo",
        "instance": {
            "id": "web-1",
            "address": "127.0.0.1",
            "layers": ["plone_instances", "zeoserver"],
        },
        "paths": {"root": "srv", "state": "state"},
        "supervisor": {"url": f"unix://{SOCKET}"},
        "apps": {
            APP: {
                "repository": str(bare),
                "layers": ["plone_instances"],
                "buildout": {
                    "bootstrap": [
                        ["python3", "-m", "venv", "."],
                        ["bin/pip", "install", "-q", "-r", "requirements.txt"],
                    ],
                    "command": ["bin/buildout", "-c", "deploy.cfg"],
                    "timeout": 3600,
                },
                "restart": {
                    "programs": ["zeoserver", "client*"],
                    # /Plone from the first deploy: before_restart creates the site.
                    "health_url": "http://127.0.0.1:{port}/Plone",
                    "health_timeout": 300,
                },
                # Once the ZEO server is up, before the clients restart (docs/plone.md).
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
                "zeo": {"address": f"127.0.0.1:{zeo_port}"},
                "zodb_cache_size": 30000,
                "zserver_threads": 2,
            },
            "deploy": {APP: {"environment": {"TZ": "Europe/Paris"}}},
        },
    }
    path = DEMO / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("eggs", "downloads"):  # shared by every run of the demo and the tests
        target = CACHE.expanduser() / name
        target.mkdir(parents=True, exist_ok=True)
        (DEMO / "srv" / APP / "shared").mkdir(parents=True, exist_ok=True)
        (DEMO / "srv" / APP / "shared" / name).symlink_to(target)
    return path


def agent(*args: str) -> None:
    argv = [str(BIN / "deploy-agent"), *args, "--local", "-c", str(DEMO / "agent.yaml")]
    print("$ deploy-agent " + " ".join(args) + " --local -c .plone-demo/agent.yaml", flush=True)
    subprocess.run(argv, check=False, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})


def start_haproxy(ports: list[int], bind: int, stats: int) -> str:
    me = Member("web-1", "127.0.0.1", ("plone_instances",))
    context = build_context(
        stack="plone-demo",
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
                "log": "",
            }
        },
    )
    cfg = DEMO / "haproxy.cfg"
    template = TemplateConfig(source=REPO / "config" / "haproxy.cfg.tmpl", destination=cfg)
    asyncio.run(apply_templates([template], context))
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    subprocess.run([haproxy, "-D", "-f", str(cfg), "-p", str(DEMO / "haproxy.pid")], check=True)
    return f"http://127.0.0.1:{bind}"


def show(url: str, path: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            # url is always the http:// address of HAProxy started above
            with urllib.request.urlopen(f"{url}{path}", timeout=30) as response:  # noqa: S310
                body = response.read().decode(errors="replace")
                print(f"  GET {url}{path} -> {response.status} {body.strip()[:60]!r}")
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                print(f"  GET {url}{path} -> {exc}")
                return
            time.sleep(1)


def main() -> None:
    if sys.argv[1:] == ["--stop"]:
        stop()
        return
    stop()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    work, bare = make_repository(DEMO, REPO / "examples" / "plone-site")
    base_port, zeo_port = free_port(2), free_port(1) + 1
    config = agent_config(bare, base_port, zeo_port)
    start_supervisord(DEMO, SOCKET, f"{DEMO}/srv/*/supervisor.conf")
    say("1. first deploy: bootstrap, buildout (Plone from PyPI), the programs, ZEO first,")
    say("   then the before_restart hooks (create /Plone, upgrade steps), then the clients")
    agent("deploy", APP)
    say("2. HAProxy in front of both clients (its stats page lets the agent drain them)")
    stats = free_port(1) + 1
    url = start_haproxy([base_port + 1, base_port + 2], free_port(1) + 1, stats)
    show(url, "/Plone")
    show(url, "/@@deploy-version")
    say("3. a configuration change (zodb_cache_size): a new release, clients one by one")
    data = yaml.safe_load(config.read_text())
    data["stack_config"]["plone_instances"]["zodb_cache_size"] = 40000
    # Each client drained in HAProxy before it stops, and counted UP there before the next.
    data["apps"][APP]["restart"]["balancer"] = {"stats_url": f"http://127.0.0.1:{stats}/"}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    agent("deploy", APP)
    say("4. a new commit (VERSION 2.0.0)")
    (work / "VERSION").write_text("2.0.0\n")
    git("commit", "-q", "-am", "version 2", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    agent("deploy", APP)
    show(url, "/@@deploy-version")
    say("5. rollback")
    agent("rollback", APP)
    show(url, "/@@deploy-version")
    show(url, "/Plone")
    print(f"\nPlone runs behind HAProxy at {url}/Plone (admin:admin); stop: make plone-demo-stop")


if __name__ == "__main__":
    main()
