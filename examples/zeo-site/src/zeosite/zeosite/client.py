"""Entry point of ``bin/client<n>``: the WSGI app under waitress on a ZEO ClientStorage.

Lifecycle: ``startup()`` opens the database and binds the port, ``main_loop()`` serves
until SIGTERM/SIGINT, ``shutdown()`` stops accepting, lets in-flight requests finish for
up to ``shutdown_timeout`` seconds, closes the database and returns 0, so supervisord
sees a clean stop and a load balancer sees refused connections, not cut responses.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import struct
import sys
import time
from types import FrameType
from typing import Any

import waitress
from waitress import wasyncore
from waitress.server import BaseWSGIServer
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZODB.DB import DB

from zeosite.app import make_app, read_version

log = logging.getLogger("zeosite.client")

UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
LOOP_TIMEOUT = 0.2
SETTLE_TIME = 0.2
STARTUP_FAILURE = 3


def parse_size(value: str) -> int:
    """``20MB`` → bytes, as zope2instance's ``zeo-client-cache-size``."""
    text = value.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def zeo_address(value: str) -> tuple[str, int] | str:
    """``host:port`` → a tuple; anything without a port is a unix socket path."""
    host, sep, port = value.rpartition(":")
    return (host or "127.0.0.1", int(port)) if sep else value


class Client:
    """One ZEO client process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.should_exit = False
        self.db: DB | None = None
        self.server: BaseWSGIServer | None = None

    def serve(self) -> int:
        """Run the three phases; reading this is the whole story."""
        try:
            self.startup()
        except (ClientDisconnected, OSError) as exc:
            # Until it serves, a client has nothing to finish: one line, a distinct code,
            # and supervisord's autorestart tries again.
            log.error("client %s cannot start: %s", self.config["name"], exc)
            self.shutdown()
            return STARTUP_FAILURE
        try:
            self.main_loop()
        finally:
            self.shutdown()
        return 0

    def startup(self) -> None:
        cfg = self.config
        os.environ.update(cfg["environment"])
        if "TZ" in cfg["environment"]:
            time.tzset()
        storage = ClientStorage(
            zeo_address(cfg["zeo_address"]),
            blob_dir=cfg["blob_dir"],
            shared_blob_dir=True,
            client=cfg["client"],
            var=cfg["cache_dir"],
            cache_size=parse_size(cfg["zeo_cache_size"]),
            # A read after another client's commit must see it: sync with the server.
            server_sync=True,
        )
        self.db = DB(storage, cache_size=cfg["zodb_cache_size"])
        app = make_app(self.db, client=cfg["name"], version=read_version(cfg["version_file"]))
        self.server = waitress.create_server(
            app, host=cfg["host"], port=cfg["port"], threads=cfg["threads"], ident="zeosite"
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_exit)
        log.info("client %s serving on %s:%s", cfg["name"], cfg["host"], cfg["port"])

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Signals only set a flag; the loop notices within LOOP_TIMEOUT.
        self.should_exit = True

    def main_loop(self) -> None:
        assert self.server is not None
        while not self.should_exit:
            wasyncore.loop(timeout=LOOP_TIMEOUT, map=self.server._map, count=1)

    def shutdown(self) -> None:
        server = self.server
        if server is not None:
            stop_accepting(server)
            started = time.monotonic()
            deadline = started + self.config["shutdown_timeout"]
            # A connection accepted just now may not have sent its request yet: give it
            # a moment before calling the server idle.
            while time.monotonic() < deadline and (
                busy(server) or time.monotonic() - started < SETTLE_TIME
            ):
                wasyncore.loop(timeout=LOOP_TIMEOUT / 4, map=server._map, count=1)
            server.task_dispatcher.shutdown(timeout=1)
            wasyncore.close_all(server._map)
        if self.db is not None:
            self.db.close()
        log.info("client %s stopped", self.config["name"])


def stop_accepting(server: BaseWSGIServer) -> None:
    """Take what is already in the listen backlog, then close the listening socket.

    Closing with connections still queued would reset them, and a connection can enter
    the backlog between the last accept and the close. So the kernel is first told to
    drop new connection attempts (a socket filter that accepts nothing): after that the
    backlog can only shrink, it is drained, and the socket closed. A client whose attempt
    was dropped retries it and is refused, which a load balancer retries elsewhere.
    """
    drop_new_connections(server.socket)
    for _ in range(server.adj.backlog + 1):
        before = len(server.active_channels)
        server.handle_accept()
        if len(server.active_channels) == before:
            break
    server.del_channel()
    server.socket.close()


SO_ATTACH_FILTER = 26  # Linux; the socket module does not name it
DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: "ret #0", keep no packet


def drop_new_connections(sock: socket.socket) -> None:
    """Make the listening socket ignore new SYNs; a no-op where the kernel has no filters."""
    program = ctypes.create_string_buffer(DROP_ALL)
    fprog = struct.pack("HL", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.warning("cannot filter new connections during shutdown: %s", exc)


def busy(server: BaseWSGIServer) -> bool:
    """True while a connection has a request being read, run or answered."""
    return any(
        ch.request is not None or ch.requests or ch.total_outbufs_len
        for ch in server.active_channels.values()
    )


#: What ``bin/client<n>`` accepts: nothing, or plone.recipe.zope2instance's ``console``
#: (run in the foreground, as supervisord needs): the programs the agent generates run
#: ``bin/client<n> console``, as the OpsWorks cookbook's did.
FOREGROUND_MODES = ((), ("console",), ("fg",))


def main(config: dict[str, Any], argv: list[str] | None = None) -> int:
    args = tuple(sys.argv[1:] if argv is None else argv)
    if args not in FOREGROUND_MODES:
        print(f"usage: bin/{config['name']} [console]  (got {' '.join(args)})", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return Client(config).serve()
