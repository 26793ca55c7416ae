"""The example site's WSGI app: a hit counter in the ZODB root, and nothing else.

``GET /`` says which code (VERSION), which client and which process answered, so a test
can see a deploy and a restart happen; ``POST /hit`` writes through ZEO, so a test can
see two clients share one database; ``GET /health`` is what a rolling restart waits for.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from BTrees.Length import Length
from transaction import TransactionManager
from ZODB.Connection import Connection
from ZODB.DB import DB
from ZODB.POSException import ConflictError

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

COUNTER = "hits"
RETRIES = 5


def read_version(path: str) -> str:
    """The code version a test bumps by committing a new VERSION file."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip() or "unknown"
    except FileNotFoundError:
        return "unknown"


@contextmanager
def transaction(db: DB) -> Iterator[Connection]:
    """One transaction on its own connection, committed on success.

    Unlike ``DB.transaction()``, the connection is closed even when the commit fails
    (a ConflictError there would otherwise leak it out of the pool).
    """
    tm = TransactionManager()
    conn = db.open(tm)
    try:
        tm.begin()
        yield conn
        tm.commit()
    except BaseException:
        tm.abort()
        raise
    finally:
        conn.close()


def hits(db: DB) -> int:
    """Current counter value, read in a fresh transaction."""
    with transaction(db) as conn:
        counter = conn.root().get(COUNTER)
        return counter() if counter is not None else 0


def add_hit(db: DB) -> int:
    """Increment the counter; retry when another transaction committed first.

    The counter is a ``BTrees.Length.Length``, which resolves concurrent increments on
    the server; the retry covers the rest (creating it, reading it while it changes).
    """
    for attempt in range(RETRIES):
        try:
            with transaction(db) as conn:
                root = conn.root()
                counter = root.get(COUNTER)
                if counter is None:
                    counter = root[COUNTER] = Length()
                counter.change(1)
                return int(counter())
        except ConflictError:
            if attempt == RETRIES - 1:
                raise
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))  # noqa: S311 - jitter
    raise AssertionError("unreachable")


def healthy(db: DB) -> bool:
    """True when the storage is connected and the root can be read."""
    is_connected = getattr(db.storage, "is_connected", None)
    if is_connected is not None and not is_connected():
        return False
    try:
        hits(db)
    except Exception:
        return False
    return True


def make_app(db: DB, *, client: str, version: str) -> WSGIApp:
    """Build the WSGI callable for one ZEO client process."""
    pid = os.getpid()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if path == "/" and method in ("GET", "HEAD"):
            body = f"zeosite version={version} client={client} pid={pid} hits={hits(db)}\n"
            return respond(start_response, "200 OK", body)
        if path == "/hit" and method == "POST":
            return respond(start_response, "200 OK", f"hits={add_hit(db)}\n")
        if path == "/health" and method in ("GET", "HEAD"):
            if healthy(db):
                return respond(start_response, "200 OK", "ok\n")
            return respond(start_response, "503 Service Unavailable", "database unreachable\n")
        return respond(start_response, "404 Not Found", "not found\n")

    return app


def respond(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    """Send a small text/plain response."""
    data = body.encode("utf-8")
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]
