"""Steady GET load through a load balancer, counting what came back: the measure of "a
deploy never takes the site down"."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


class Load:
    """``loops`` GET loops on ``url`` for as long as the ``with`` block runs (bounded by
    ``limit`` seconds, whatever happens to the test); ``results`` counts ``ok``,
    ``http-<code>`` and the names of connection errors."""

    def __init__(self, url: str, loops: int = 4, limit: float = 1800) -> None:
        self.url = url
        self.limit = limit
        self.results: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(loops)]

    def loop(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    response.read()
                outcome = "ok"
            except urllib.error.HTTPError as exc:
                outcome = f"http-{exc.code}"
            except (OSError, http.client.HTTPException) as exc:
                # IncompleteRead: the answer began and was cut off (a client stopped while
                # sending it; HAProxy cannot replay a response it already forwarded).
                outcome = type(exc).__name__
            with self.lock:
                self.results[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    @property
    def failed(self) -> int:
        return sum(n for outcome, n in self.results.items() if outcome != "ok")
