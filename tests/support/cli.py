"""The agent's command line (``python -m agent.cli``) run as a subprocess, the way an
operator or a CI job runs it: one runner, with a synchronous and an async variant."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.site import REPO


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without the tester's own DEPLOY_AGENT_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOY_AGENT_")}
    return {**env, **extra}


class CliResult(subprocess.CompletedProcess[str]):
    """What the command line did: ``returncode``, ``stdout``, ``stderr``."""

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = REPO
) -> CliResult:
    """Run ``deploy-agent ARGS`` to its end; ``env`` defaults to ``cli_env()``."""
    argv = cli_argv(*args)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env or cli_env()
    )
    return CliResult(argv, done.returncode, done.stdout, done.stderr)


async def run_cli_async(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = REPO
) -> CliResult:
    """``run_cli`` for async tests: the event loop (and the fake agents on it) runs on."""
    argv = cli_argv(*args)
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env or cli_env(),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return CliResult(argv, process.returncode, out.decode(), err.decode())
