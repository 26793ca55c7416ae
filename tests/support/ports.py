"""Loopback TCP ports for the components a test starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago, below the ephemeral range: a port
    the kernel hands out (bind to 0) is also one it gives any outgoing connection of any
    process, so another test's connection can take it before the server binds it
    ("Address already in use", seen with two suites side by side)."""
    return free_port_block(1) + 1


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port_block(count: int) -> int:
    """A base port such that base+1 .. base+count (the clients' ports) are free, below the
    ephemeral range: a program polled before it listens (a Zope client takes minutes) on an
    ephemeral port can be "answered" by the poller's own socket (TCP self-connect: the
    connection's local port is the port it dials, and it reads back its own request)."""
    low, _ = ephemeral_range()
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(10_000, max(10_001, low - count - 1))
        if all(port_is_free(base + n) for n in range(1, count + 1)):
            return base
    raise RuntimeError("no free block of ports below the ephemeral range")
