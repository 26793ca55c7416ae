"""The real Plone example (examples/plone-site) as a site's repository, and the agent
settings a Plone site needs: shared by the end-to-end test and the benchmark.

Eggs and downloads live in a cache outside the clone (``DEPLOY_AGENT_PLONE_CACHE``, default
``~/.cache/buildout-deploy-agent``), so only the first run downloads Plone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from support.site import REPO, SiteRepo

PLONE_EXAMPLE = REPO / "examples" / "plone-site"
CACHE = Path(
    os.environ.get("DEPLOY_AGENT_PLONE_CACHE", "~/.cache/buildout-deploy-agent")
).expanduser()


def plone_repository(root: Path) -> SiteRepo:
    return SiteRepo.create(root, PLONE_EXAMPLE)


def shared_caches(app_root: Path) -> None:
    """``shared/eggs`` and ``shared/downloads`` of the app pointed at the cache."""
    for name in ("eggs", "downloads"):
        target = CACHE / name
        target.mkdir(parents=True, exist_ok=True)
        link = app_root / "shared" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)


def plone_app(repository: Path, *, python: str = "python3", **buildout: Any) -> dict[str, Any]:
    """The app's configuration: bootstrap a venv from requirements.txt, then buildout."""
    return {
        "repository": str(repository),
        "branch": "main",
        "layers": ["plone_instances"],
        "buildout": {
            "bootstrap": [
                [python, "-m", "venv", "."],
                ["bin/pip", "install", "-q", "-r", "requirements.txt"],
            ],
            "command": ["bin/buildout", "-c", "deploy.cfg"],
            "timeout": 3000,
            **buildout,
        },
    }
