"""`make fleet-demo`: three agents, one broker, one operator, all on this machine.

A private Mosquitto, and three instances of the example site, each with its own agent
(`deploy-agent run`), its own supervisord and its own directories under .demo-fleet/:
db-1 (layer zeoserver: runs the ZEO server) and web-1, web-2 (layer plone_instances: two
ZEO clients each). Then, as an operator would: a deploy across the stack with --wait,
the fleet's status and logs, and a new commit rolled out one instance at a time.
Everything keeps running afterwards; `source .demo-fleet/env.sh` and try the commands.
"""

from __future__ import annotations

import getpass
import json
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
from demo import APP, BIN, REPO, free_port, git, make_repository, say

FLEET = REPO / ".demo-fleet"
INSTANCES = {"db-1": ["zeoserver"], "web-1": ["plone_instances"], "web-2": ["plone_instances"]}


def stop() -> None:
    """Stop whatever a previous run left (agents first, so they publish offline)."""
    pids = FLEET / "pids"
    alive = []
    if pids.exists():
        for line in reversed(pids.read_text().split()):
            try:
                os.killpg(int(line), signal.SIGTERM)
                alive.append(int(line))
            except (ProcessLookupError, ValueError, PermissionError):
                continue
    deadline = time.monotonic() + 20
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if running(pid)]
    shutil.rmtree(FLEET, ignore_errors=True)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def spawn(argv: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=FLEET
        )
    with open(FLEET / "pids", "a") as pids:
        pids.write(f"{process.pid}\n")


def start_broker() -> int:
    port = free_port(1) + 1
    directory = FLEET / "broker"
    directory.mkdir()
    conf = directory / "mosquitto.conf"
    user = f"user {getpass.getuser()}\n"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {directory}/\nset_tcp_nodelay true\n{user}"
        f"log_dest file {directory}/mosquitto.log\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    spawn([binary, "-c", str(conf)], directory / "stdout.log")
    return port


def start_supervisord(home: Path) -> str:
    sock = home / "sv.sock"
    if len(str(sock)) > 100:
        sock = Path(tempfile.gettempdir()) / f"deploy-agent-fleet-{home.name}-{os.getuid()}.sock"
    (home / "supervisord.conf").write_text(
        f"[unix_http_server]\nfile = {sock}\n\n[supervisord]\nlogfile = {home}/supervisord.log\n"
        f"pidfile = {home}/supervisord.pid\nchildlogdir = {home}\nnodaemon = true\n\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl = unix://{sock}\n\n"
        f"[include]\nfiles = {home}/srv/{APP}/current/etc/supervisor/*.conf\n"
    )
    spawn(
        [str(BIN / "supervisord"), "-c", str(home / "supervisord.conf")], home / "supervisord.out"
    )
    return f"unix://{sock}"


def write_agent_config(
    name: str,
    layers: list[str],
    first_deploy: bool,
    *,
    port: int,
    bare: Path,
    zeo_port: int,
    base_port: int,
    supervisor: str,
) -> Path:
    home = FLEET / name
    config = {
        "stack": "demo",
        "instance": {"id": name, "address": "127.0.0.1", "layers": layers},
        "paths": {"root": "srv", "state": "state"},
        "broker": {"host": "127.0.0.1", "port": port, "keepalive": 10},
        "security": {"trusted_keys": [str(FLEET / "operator.pub")]},
        "supervisor": {"url": supervisor},
        "membership_debounce": 1,
        # The first three wait for the operator's deploy in this demo; web-3 joins later
        # and deploys by itself, as a new instance would.
        "first_deploy": first_deploy,
        "apps": {
            APP: {
                "repository": str(bare),
                "branch": "main",
                "keep_releases": 3,
                "layers": ["plone_instances", "zeoserver"],
                "buildout": {"command": ["buildout", "-c", "deploy.cfg"], "timeout": 600},
                # The example site's buildout writes its own supervisord programs.
                "programs": {"generate": False},
                "restart": {
                    "programs": ["client*"],
                    "health_url": "http://127.0.0.1:{port}/health",
                    "health_timeout": 90,
                },
            }
        },
        "stack_config": {
            "plone_instances": {
                "instance_count": 2,
                "base_port": base_port,
                "restart_delay": 1,
                "zeo": {"address": f"127.0.0.1:{zeo_port}"},
            }
        },
    }
    path = home / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def operator_env(port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DEPLOY_AGENT_BROKER": f"mqtt://127.0.0.1:{port}",
        "DEPLOY_AGENT_STACK": "demo",
        "DEPLOY_AGENT_KEY": str(FLEET / "operator"),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


def operator(port: int, *args: str) -> int:
    print(f"$ deploy-agent {' '.join(args)}", flush=True)
    return subprocess.run(
        [str(BIN / "deploy-agent"), *args], env=operator_env(port), check=False
    ).returncode


def wait_online(port: int, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [str(BIN / "deploy-agent"), "status", "--json"],
            env=operator_env(port),
            capture_output=True,
            text=True,
        )
        if result.returncode == 0 and result.stdout.count('"online"') >= count:
            return
        time.sleep(1)
    raise SystemExit("the agents did not come online: see .demo-fleet/*/agent.log")


def fetch(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            return str(response.read().decode())
    except OSError as exc:
        return str(exc)


def show(base_ports: dict[str, int]) -> None:
    for name, base in base_ports.items():
        for n in (1, 2):
            url = f"http://127.0.0.1:{base + n}/"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    print(f"  {name} GET {url} -> {response.read().decode().strip()}")
            except OSError as exc:
                print(f"  {name} GET {url} -> {exc}")


def main() -> None:
    if "--stop" in sys.argv:
        stop()
        print("stopped, and .demo-fleet/ removed")
        return
    stop()
    FLEET.mkdir()
    port = start_broker()
    subprocess.run(
        [
            str(BIN / "deploy-agent"),
            "keys",
            "generate",
            "-o",
            str(FLEET / "operator"),
            "--comment",
            "demo@fleet",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    work, bare = make_repository(FLEET)
    zeo_port = free_port(1) + 1
    base_ports = {name: free_port(2) for name in INSTANCES if name.startswith("web")}

    def start_instance(name: str, layers: list[str], *, first_deploy: bool) -> None:
        home = FLEET / name
        home.mkdir()
        config = write_agent_config(
            name,
            layers,
            first_deploy,
            port=port,
            bare=bare,
            zeo_port=zeo_port,
            base_port=base_ports.get(name, free_port(2)),
            supervisor=start_supervisord(home),
        )
        spawn([str(BIN / "deploy-agent"), "run", "-c", str(config)], home / "agent.adapters.log")

    for name, layers in INSTANCES.items():
        start_instance(name, layers, first_deploy=False)
    env_file = FLEET / "env.sh"
    env_file.write_text(
        f"export DEPLOY_AGENT_BROKER=mqtt://127.0.0.1:{port}\n"
        f"export DEPLOY_AGENT_STACK=demo\n"
        f"export DEPLOY_AGENT_KEY={FLEET / 'operator'}\n"
        f"export PATH={BIN}:$PATH\n"
    )
    say("0. a broker and three agents (db-1: zeoserver; web-1, web-2: plone_instances)")
    wait_online(port, 3)
    operator(port, "status")
    say("1. deploy across the stack and wait for every instance")
    operator(port, "deploy", APP, "--wait")
    show(base_ports)
    say("2. the fleet's status")
    operator(port, "status")
    say("3. a new commit, rolled out one instance at a time, while following web-2's logs")
    (work / "VERSION").write_text("2\n")
    git("commit", "-q", "-am", "version 2", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    logs_file = FLEET / "web-2-logs.txt"
    with open(logs_file, "wb") as out:
        follower = subprocess.Popen(
            [str(BIN / "deploy-agent"), "logs", "-f", "--instance", "web-2", "--level", "info"],
            env=operator_env(port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1)
        operator(port, "deploy", APP, "--batch-size", "1")
        time.sleep(1)
        follower.terminate()
        follower.wait(timeout=10)
    show(base_ports)
    say("4. what `deploy-agent logs -f --instance web-2` showed meanwhile (first lines)")
    shown = 0
    for line in logs_file.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "buildout.line" or shown >= 15:
            continue
        shown += 1
        what = event.get("message") or event.get("line") or ""
        print(
            f"  {event.get('timestamp', '')[11:19]} {event.get('instance')} "
            f"{event.get('level')} {event.get('event')} {what}"
        )
    say("5. a new instance joins (an autoscaling event): web-3 deploys what the stack runs")
    base_ports["web-3"] = free_port(2)
    start_instance("web-3", ["plone_instances"], first_deploy=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "version=2" not in fetch(base_ports["web-3"] + 1):
        time.sleep(1)
    time.sleep(5)  # its presence follows the result, and the others reconfigure for it
    operator(port, "status")
    show({"web-3": base_ports["web-3"]})
    print("\nEverything keeps running. Try it yourself:")
    print("  source .demo-fleet/env.sh")
    print("  deploy-agent status; deploy-agent logs -f; deploy-agent deploy zeo-site --wait")
    print("  deploy-agent rollback zeo-site --wait")
    print(f"Stop it all: {BIN}/python examples/fleet_demo.py --stop")


if __name__ == "__main__":
    main()
