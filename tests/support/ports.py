"""Loopback TCP ports for the components a test starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """A base port such that base+1 .. base+count (the clients' ports) are free."""
    start = free_port()
    for base in range(start, start + 2000, count + 1):
        if base + count < 65000 and all(port_is_free(base + n) for n in range(1, count + 1)):
            return base
    raise RuntimeError("no free block of ports")
