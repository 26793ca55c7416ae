"""`make demo`: a real deploy of the bundled example site on this machine, start to finish.

It makes a git repository of examples/zeo-site, an agent configuration and a private
supervisord under .demo/, then runs the same commands an operator would:
first deploy, a no-op deploy, a configuration change, a new commit, and a rollback,
showing what the ZEO clients serve after each step.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / ".demo"
APP = "zeo-site"
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def git(*args: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "demo",
        "GIT_AUTHOR_EMAIL": "demo@example.org",
        "GIT_COMMITTER_NAME": "demo",
        "GIT_COMMITTER_EMAIL": "demo@example.org",
    }
    subprocess.run(["git", *args], cwd=cwd, check=True, env=env, capture_output=True)


def free_port(count: int = 1) -> int:
    """A base port with ``count`` free ports after it, below the kernel's ephemeral range
    (32768 and up): a client polled before it listens on an ephemeral port can be
    "answered" by the poller's own socket (a TCP self-connect)."""
    for _ in range(500):
        base = random.randrange(10_000, 32_000)  # noqa: S311 (a port, not a secret)
        if all(port_free(base + n) for n in range(1, count + 1)):
            return base
    raise SystemExit("no free ports on 127.0.0.1")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_previous() -> None:
    pidfile = DEMO / "supervisord.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            time.sleep(3)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(DEMO, ignore_errors=True)


def make_repository(directory: Path = DEMO, source: Path = HERE / APP) -> tuple[Path, Path]:
    """A git repository of an example site: a work tree to commit from and a bare
    upstream to deploy from."""
    work, bare = directory / "site-work", directory / "site.git"
    shutil.copytree(
        source,
        work,
        ignore=shutil.ignore_patterns(
            "bin",
            "parts",
            "develop-eggs",
            ".installed.cfg",
            "var",
            "__pycache__",
            "*.egg-info",
            "lib",
            "include",
            "pyvenv.cfg",
        ),
    )
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "first version", cwd=work)
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=directory)
    git("remote", "add", "origin", str(bare), cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    return work, bare


def socket_path() -> Path:
    path = DEMO / "supervisor.sock"
    if len(str(path)) < 100:
        return path
    return Path(tempfile.gettempdir()) / f"deploy-agent-demo-{os.getuid()}.sock"


def write_config(bare: Path, base_port: int, zeo_port: int) -> Path:
    config = {
        "stack": "demo",
        "instance": {
            "id": "demo-1",
            "address": "127.0.0.1",
            "layers": ["plone_instances", "zeoserver"],
        },
        "paths": {"root": "srv", "state": "state"},
        "supervisor": {"url": f"unix://{socket_path()}"},
        "apps": {
            APP: {
                "repository": str(bare),
                "branch": "main",
                "layers": ["plone_instances"],
                "keep_releases": 3,
                "buildout": {"command": ["buildout", "-c", "deploy.cfg"], "timeout": 600},
                # The example site's buildout writes its own supervisord programs.
                "programs": {"generate": False},
                "restart": {
                    "programs": ["client*"],
                    "health_url": "http://127.0.0.1:{port}/health",
                    "health_timeout": 60,
                },
            }
        },
        "stack_config": {
            "plone_instances": {
                "instance_count": 2,
                "base_port": base_port,
                "zeo": {"address": f"127.0.0.1:{zeo_port}"},
                "zodb_cache_size": 30000,
                "restart_delay": 1,
            },
            "deploy": {APP: {"environment": {"TZ": "UTC"}}},
        },
    }
    path = DEMO / "agent.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_supervisord(
    directory: Path = DEMO, sock: Path | None = None, include: str | None = None
) -> None:
    """A private supervisord under ``directory``, including ``include`` (a glob)."""
    sock = sock or socket_path()
    include = include or f"{DEMO}/srv/{APP}/current/etc/supervisor/*.conf"
    conf = directory / "supervisord.conf"
    conf.write_text(f"""[unix_http_server]
file = {sock}

[supervisord]
logfile = {directory}/supervisord.log
pidfile = {directory}/supervisord.pid
childlogdir = {directory}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{sock}

[include]
files = {include}
""")
    subprocess.run([str(BIN / "supervisord"), "-c", str(conf)], check=True)
    deadline = time.monotonic() + 15
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def agent(*args: str) -> None:
    argv = [str(BIN / "deploy-agent"), *args, "--local", "-c", str(DEMO / "agent.yaml")]
    print("$ deploy-agent " + " ".join(args) + " --local -c .demo/agent.yaml", flush=True)
    subprocess.run(argv, check=False, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})


def show_site(base_port: int) -> None:
    for n in (1, 2):
        url = f"http://127.0.0.1:{base_port + n}/"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                print(f"  GET {url} -> {response.read().decode().strip()}")
        except OSError as exc:
            print(f"  GET {url} -> {exc}")


def change_config(path: Path, cache_size: int) -> None:
    data = yaml.safe_load(path.read_text())
    data["stack_config"]["plone_instances"]["zodb_cache_size"] = cache_size
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def main() -> None:
    stop_previous()
    DEMO.mkdir()
    work, bare = make_repository()
    base_port, zeo_port = free_port(2), free_port(1) + 1
    config = write_config(bare, base_port, zeo_port)
    start_supervisord()
    say("1. first deploy: mirror, release, buildout, switch, start the clients")
    agent("deploy", APP)
    show_site(base_port)
    say("2. deploy again with nothing changed: nothing to do")
    agent("deploy", APP)
    say("3. a configuration change (zodb_cache_size): a new release of the same revision")
    change_config(config, 40000)
    agent("deploy", APP)
    say("4. a new commit (VERSION 2): a new release, clients restarted one by one")
    (work / "VERSION").write_text("2\n")
    git("commit", "-q", "-am", "version 2", cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    agent("deploy", APP)
    show_site(base_port)
    say("5. rollback: back to the previous release (same code, and its own deploy.cfg)")
    agent("rollback", APP)
    show_site(base_port)
    say("releases on disk")
    releases = DEMO / "srv" / APP / "releases"
    current = (DEMO / "srv" / APP / "current").resolve().name
    for release in sorted(releases.iterdir()):
        print(f"  {release.name}{'  <- current' if release.name == current else ''}")
    print(f"\nThe site keeps running under supervisord ({DEMO / 'supervisord.conf'}).")
    print(f"Try: {BIN}/deploy-agent deploy {APP} --local -c .demo/agent.yaml")
    print(f"Stop it: {BIN}/supervisorctl -c .demo/supervisord.conf shutdown")


if __name__ == "__main__":
    main()
