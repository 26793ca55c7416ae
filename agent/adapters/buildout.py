"""Bootstrap commands and buildout, run as subprocesses in the release directory.

Output is streamed line by line into the structured log (one ``buildout.line`` event per
line), the last lines are kept for the error report, and a timeout kills the whole process
group: buildout's own children (compilers, pip, recipes' subprocesses) go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from agent.adapters.bootstrap import (
    PROBE_TIMEOUT,
    NotReusable,
    bootstrap_key,
    prepare,
    prune_unused,
)
from agent.core.errors import BuildoutFailed

log = structlog.get_logger(__name__)
TAIL_LINES = 40
KILL_GRACE = 5.0


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The agent's environment, its own venv's bin dir last on PATH (so a buildout installed
    beside the agent is found when the system has none), plus the app's variables."""
    env = dict(os.environ)
    own_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", os.defpath).split(os.pathsep)
    if own_bin not in path:
        path.append(own_bin)
    env["PATH"] = os.pathsep.join(path)
    env.update(extra or {})
    return env


async def _stream(stream: asyncio.StreamReader, step: str, tail: deque[str]) -> None:
    while line := await stream.readline():
        text = line.decode("utf-8", errors="replace").rstrip()
        tail.append(text)
        log.info("buildout.line", step=step, line=text)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the whole group, SIGKILL if it is still there after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), KILL_GRACE)
            return
        except TimeoutError:
            continue


async def run_step(
    argv: Sequence[str], *, cwd: Path, step: str, timeout: float, env: Mapping[str, str]
) -> float:
    """Run one command to completion; raises BuildoutFailed on a non-zero exit or timeout."""
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    log.info("buildout.step.started", step=step, argv=list(argv))
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise BuildoutFailed(
            f"{step}: cannot run {argv[0]!r}: {exc.strerror}",
            step=step,
            returncode=None,
            output_tail=[],
        ) from exc
    assert process.stdout is not None
    try:
        await asyncio.wait_for(_stream(process.stdout, step, tail), timeout)
        returncode = await asyncio.wait_for(process.wait(), max(1.0, timeout))
    except TimeoutError:
        await _terminate(process)
        raise BuildoutFailed(
            f"{step} timed out after {timeout:.0f} s and was killed",
            step=step,
            returncode=None,
            output_tail=list(tail),
            timed_out=True,
        ) from None
    except BaseException:
        await asyncio.shield(_terminate(process))
        raise
    seconds = time.monotonic() - started
    if returncode != 0:
        raise BuildoutFailed(
            f"{step} failed with exit status {returncode}",
            step=step,
            returncode=returncode,
            output_tail=list(tail),
        )
    log.info("buildout.step.done", step=step, seconds=round(seconds, 2))
    return seconds


async def run_buildout(
    release: Path,
    *,
    bootstrap: Sequence[Sequence[str]],
    command: Sequence[str],
    timeout: float,
    environment: Mapping[str, str] | None = None,
    bootstrap_cache: Path | None = None,
) -> float:
    """Bootstrap commands then buildout, all within one overall timeout; returns seconds.

    With ``bootstrap_cache`` (``apps.<app>.buildout.reuse_bootstrap``), the bootstrap runs
    once per digest of its inputs in a shared directory there and the release is linked to
    it (``agent.adapters.bootstrap``); without, it runs in the release as it always did.
    """
    deadline = time.monotonic() + timeout
    env = subprocess_env(environment)
    total = 0.0
    steps = [(f"bootstrap[{i}]", argv) for i, argv in enumerate(bootstrap)]
    if bootstrap and bootstrap_cache is not None:
        try:
            key = await bootstrap_key(
                release,
                bootstrap,
                env=env,
                environment=environment or {},
                timeout=min(PROBE_TIMEOUT, max(1.0, deadline - time.monotonic())),
            )
        except NotReusable as exc:
            log.warning("bootstrap.not_reusable", reason=str(exc))
        else:

            async def run(argv: Sequence[str], cwd: Path, step: str, limit: float) -> float:
                return await run_step(argv, cwd=cwd, step=step, timeout=limit, env=env)

            prepared = await prepare(
                release,
                key,
                cache=bootstrap_cache,
                bootstrap=bootstrap,
                run=run,
                deadline=deadline,
            )
            total += prepared.seconds
            steps = []
    elif bootstrap_cache is not None:
        await prune_unused(bootstrap_cache, release.parent, deadline=deadline)
    steps.append(("buildout", command))
    for step, argv in steps:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildoutFailed(
                f"{step} not started: the {timeout:.0f} s timeout ran out",
                step=step,
                returncode=None,
                output_tail=[],
                timed_out=True,
            )
        total += await run_step(argv, cwd=release, step=step, timeout=remaining, env=env)
    return total
