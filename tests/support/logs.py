"""The agent's structured log (one JSON object a line), read as it is written."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any


def parse_events(data: bytes | str) -> list[dict[str, Any]]:
    """The JSON lines of a log; anything else (a traceback, a partial line) is left out."""
    events = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                events.append(item)
    return events


def matches(item: dict[str, Any], event: str, match: dict[str, Any]) -> bool:
    return item.get("event") == event and all(item.get(k) == v for k, v in match.items())


class LogFollower:
    """Reads one log file incrementally: each poll reads only what was appended, so a
    test can act within milliseconds of an event."""

    def __init__(self, path: Path, *, describe: str | None = None) -> None:
        self.path = path
        self.describe = describe or str(path)
        self.offset = 0
        self.pending = b""
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """The events appended since the last poll (also kept in ``seen``)."""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
            self.offset += len(chunk)
            self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        new = parse_events(b"\n".join(lines))
        self.seen.extend(new)
        return new

    def wait_for(
        self,
        event: str,
        timeout: float = 120,
        nth: int = 1,
        *,
        interval: float = 0.005,
        **match: Any,
    ) -> dict[str, Any]:
        """The ``nth`` matching event of the whole file, polled every few milliseconds.
        The timeout only bounds a hang: nothing waits for it to pass."""
        deadline = time.monotonic() + timeout
        checked = 0
        found = 0
        while True:
            self.poll()
            for item in self.seen[checked:]:
                if matches(item, event, match):
                    found += 1
                    if found == nth:
                        return item
            checked = len(self.seen)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.describe} never logged {event} {match} #{nth}; last: {self.seen[-5:]}"
                )
            time.sleep(interval)

    def last_phase(self) -> str:
        """``phase/status`` of the last pipeline event: where a kill actually landed."""
        self.poll()
        phases = [e for e in self.seen if e.get("event") == "pipeline.phase"]
        return f"{phases[-1]['phase']}/{phases[-1]['status']}" if phases else "before-fetch"
