"""buildout-deploy-agent: deploy zc.buildout sites from git, one atomic release at a time."""

from __future__ import annotations

__version__ = "0.1.0"
