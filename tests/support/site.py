"""Real git repositories of the example site, and agent configurations pointing at them."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.adapters.configfile import load_config
from agent.core.config import AgentConfig
from support.ports import free_port_block

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "zeo-site"
IGNORED = shutil.ignore_patterns(
    "bin",
    "parts",
    "develop-eggs",
    "eggs",
    ".installed.cfg",
    "var",
    "__pycache__",
    "*.egg-info",
    "deploy.cfg",
    "lib",
    "lib64",
    "include",
    "pyvenv.cfg",
)


def git(*args: str, cwd: Path) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "PATH": "/usr/bin:/bin",
        "HOME": str(cwd),
    }
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


@dataclass
class SiteRepo:
    """An upstream bare repository of the example site, with a work tree to commit from."""

    work: Path
    bare: Path

    @classmethod
    def create(cls, root: Path, source: Path = EXAMPLE) -> SiteRepo:
        """``source`` (an example site) as a site's repository: upstream and work tree."""
        work, bare = root / f"{source.name}-work", root / f"{source.name}-upstream.git"
        shutil.copytree(source, work, ignore=IGNORED)
        git("init", "-q", "-b", "main", cwd=work)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "initial", cwd=work)
        git("init", "-q", "--bare", "-b", "main", str(bare), cwd=root)
        git("remote", "add", "origin", str(bare), cwd=work)
        git("push", "-q", "origin", "main", cwd=work)
        return cls(work=work, bare=bare)

    def commit(
        self, files: dict[str, str], message: str = "change", *, executable: bool = False
    ) -> str:
        """Write ``files`` (text; mode 0755 with ``executable``), commit and push."""
        for name, text in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            if executable:
                path.chmod(0o755)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        git("push", "-q", "origin", "main", cwd=self.work)
        return self.head()

    def head(self) -> str:
        return git("rev-parse", "HEAD", cwd=self.work)


def write_config(root: Path, repo: SiteRepo, **overrides: Any) -> AgentConfig:
    """An agent configuration for the example site under ``root``; returns it loaded."""
    clients = overrides.pop("clients", 2)
    zeo_port = free_port_block(1) + 1
    data: dict[str, Any] = {
        "stack": "test",
        "instance": {
            "id": "web-1",
            "address": "127.0.0.1",
            "layers": ["plone_instances", "zeoserver"],
        },
        "paths": {"root": str(root / "srv"), "state": str(root / "state")},
        "apps": {
            "zeo-site": {
                "repository": str(repo.bare),
                "branch": "main",
                "layers": ["plone_instances"],
                "keep_releases": 3,
                "buildout": {"command": ["buildout", "-c", "deploy.cfg"], "timeout": 300},
                "restart": {
                    "programs": ["client*"],
                    "health_url": "http://127.0.0.1:{port}/health",
                    "health_timeout": 30,
                },
                # The example site's own supervisor part writes current/etc/supervisor/
                # *.conf; a test that wants the agent's generated programs says so.
                "programs": {"generate": False},
            }
        },
        "stack_config": {
            "plone_instances": {
                "instance_count": clients,
                "base_port": free_port_block(clients),
                "zeo": {"address": f"127.0.0.1:{zeo_port}"},
                "zodb_cache_size": 5000,
            }
        },
    }
    for key, value in overrides.items():
        target = data
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    path = root / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(path)
