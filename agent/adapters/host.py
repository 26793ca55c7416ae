"""This host: its name, primary address, CPU and memory (psutil), and the per-app lock
that keeps one command per app at a time across processes (the CLI beside the daemon)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.core.errors import ReleaseError


@dataclass(frozen=True)
class HostFacts:
    cpu_count: int
    memory_mb: int

    @classmethod
    def probe(cls) -> HostFacts:
        return cls(
            cpu_count=psutil.cpu_count() or 1,
            memory_mb=psutil.virtual_memory().total // (1024 * 1024),
        )


def default_instance_id() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def primary_address() -> str:
    """First non-loopback IPv4 address of this host; loopback when there is none."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


@contextlib.contextmanager
def app_lock(app_dir: Path) -> Iterator[None]:
    """One command per app at a time on this host, across processes (CLI and daemon)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    path = app_dir / ".deploy.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ReleaseError(f"another command is running on {app_dir.name} ({holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
