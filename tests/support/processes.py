"""Waiting on real processes and conditions, and killing process trees.

Every wait polls its condition and returns as soon as it holds: a timeout only bounds a
hang, nothing ever waits for it to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A condition that never held: a failed expectation (AssertionError) that callers
    may also catch as the TimeoutError it is."""


class _Poll:
    """One condition, checked until it holds or its deadline passed."""

    def __init__(
        self, predicate: Callable[[], T], timeout: float, what: str | Callable[[], str]
    ) -> None:
        self.predicate, self.what = predicate, what
        self.deadline = time.monotonic() + timeout

    def check(self) -> T | None:
        if result := self.predicate():
            return result
        if time.monotonic() >= self.deadline:
            raise WaitTimeout(self.what() if callable(self.what) else self.what)
        return None


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    ``what`` (or what it returns, computed only on failure) describes the condition."""
    poll = _Poll(predicate, timeout, what)
    while (result := poll.check()) is None:
        time.sleep(interval)
    return result


async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.02,
) -> T:
    """``wait_until`` for async tests: the event loop runs while it waits."""
    poll = _Poll(predicate, timeout, what)
    while (result := poll.check()) is None:
        await asyncio.sleep(interval)
    return result


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a process and every process below it (a child in its own session, such as
    buildout, would survive a plain kill; systemd kills the whole cgroup)."""
    below = children(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    for child in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=10)
    psutil.wait_procs(below, timeout=5)
