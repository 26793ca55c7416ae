"""How the operator's side shows things to people: colours, tables, the run summary, the
fleet status and log lines. Every string from the broker goes through ``clean`` before it
reaches a terminal, so whoever can publish to the stack cannot smuggle escapes into it.
No I/O: the commands print what comes out.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.operator.rollouts import TIMED_OUT, RunReport
from agent.protocol import Presence, StatusRecord

LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
}
_COLORS = {"green": "32", "red": "31", "yellow": "33", "cyan": "36", "dim": "2", "bold": "1"}
OUTCOME_COLORS = {
    "succeeded": "green",
    "unchanged": "green",
    "failed": "red",
    "rejected": "red",
    "interrupted": "red",
    TIMED_OUT: "yellow",
}
LEVEL_COLORS = {
    "debug": "dim",
    "info": "green",
    "warning": "yellow",
    "warn": "yellow",
    "error": "red",
    "exception": "red",
    "critical": "red",
}


_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def clean(value: Any, limit: int = 200) -> str:
    """Text from the broker made safe for a terminal: no escapes, no newlines, bounded."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def paint(text: str, color: str | None, enabled: bool) -> str:
    return f"\x1b[{_COLORS[color]}m{text}\x1b[0m" if enabled and color else text


def age(then: datetime, now: datetime) -> str:
    """A short humanised age: 42s, 5m, 3h, 2d."""
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def short_revision(revision: str | None) -> str:
    if not revision:
        return "-"
    return revision[:10] if re.fullmatch(r"[0-9a-f]{40,64}", revision) else clean(revision, 40)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns; widths ignore colour escapes."""
    lines = [list(headers), *map(list, rows)]
    widths = [max(visible_len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            c + " " * (w - visible_len(c)) for c, w in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


def visible_len(text: str) -> int:
    return len(_ESCAPE.sub("", text))


def render_summary(report: RunReport, *, color: bool) -> str:
    """The per-instance table, the batches, and one line saying what it all means."""
    rows = [
        [
            r.instance,
            r.outcome,
            short_revision(r.revision),
            clean(r.release or "-"),
            "-" if r.seconds is None else f"{r.seconds:.1f}",
            clean(r.message, 80),
        ]
        for r in report.results
    ]
    parts = [
        table(["INSTANCE", "OUTCOME", "REVISION", "RELEASE", "SECONDS", "MESSAGE"], rows)
        if rows
        else ""
    ]
    if len(report.batches) > 1:
        parts.append("batches: " + ", ".join(f"{b.index} {b.state}" for b in report.batches))
    if report.message and report.batches:
        parts.append(report.message)
    counts = Counter(r.outcome for r in report.results)
    verdict = ", ".join(
        paint(f"{n} {o}", OUTCOME_COLORS.get(o), color) for o, n in sorted(counts.items())
    )
    if report.results:
        parts.append(f"{report.kind} {report.app}: {verdict}")
    elif report.command_ids and not report.waited:
        parts.append(
            "\n".join(f"sent {report.kind} {report.app}: command {c}" for c in report.command_ids)
        )
    return "\n".join(p for p in parts if p)


def render_status(
    presences: Mapping[str, Presence],
    statuses: Mapping[str, StatusRecord],
    *,
    now: datetime,
    color: bool,
) -> str:
    """One row per instance and app: where it is, what runs, how the last command went."""
    rows = []
    for instance, presence in sorted(presences.items()):
        record = statuses.get(instance)
        last = record.apps if record else {}
        state = paint(presence.state, "green" if presence.state == "online" else "red", color)
        head = [instance, state, age(presence.since, now), ",".join(presence.layers) or "-"]
        for app in sorted(set(presence.apps) | set(last)) or ["-"]:
            live, result = presence.apps.get(app), last.get(app)
            rows.append(
                [
                    *head,
                    app,
                    short_revision(live.revision if live else None),
                    clean(live.release or "-") if live else "-",
                    paint(result.status, OUTCOME_COLORS.get(result.status), color)
                    if result
                    else "-",
                    age(result.at, now) if result else "-",
                ]
            )
            head = ["", "", "", ""]
    if not rows:
        return "no instances"
    return table(
        [
            "INSTANCE",
            "STATE",
            "SINCE",
            "LAYERS",
            "APP",
            "REVISION",
            "RELEASE",
            "LAST RESULT",
            "AGE",
        ],
        rows,
    )


@dataclass(frozen=True, kw_only=True)
class LogFilter:
    instance: str | None = None
    app: str | None = None
    level: str = "info"

    def accepts(self, instance: str, event: Mapping[str, Any]) -> bool:
        if self.instance and instance != self.instance:
            return False
        if self.app and event.get("app") != self.app:
            return False
        level = str(event.get("level", "info")).lower()
        return LEVELS.get(level, 20) >= LEVELS.get(self.level.lower(), 20)


def render_log(instance: str, event: Mapping[str, Any], *, color: bool) -> str:
    """time instance LEVEL event key=value ... for a person reading a terminal."""
    stamp = str(event.get("timestamp", ""))
    time_part = stamp[11:19] if len(stamp) >= 19 and stamp[10] == "T" else clean(stamp, 19)
    level = str(event.get("level", "info")).lower()
    rest = " ".join(
        f"{clean(k, 40)}={clean(v, 200)}"
        for k, v in sorted(event.items())
        if k not in ("timestamp", "level", "event", "instance")
    )
    return " ".join(
        p
        for p in (
            paint(time_part, "dim", color),
            paint(clean(instance, 40), "cyan", color),
            paint(f"{clean(level, 9):<8}", LEVEL_COLORS.get(level), color),
            paint(clean(event.get("event", "?"), 80), "bold", color),
            rest,
        )
        if p
    )


RELEASE_COLUMNS = ("name", "revision", "created", "decision", "status", "reason")


def render_releases(rows: Sequence[Mapping[str, Any]]) -> str:
    """An app's releases as ``deploy-agent releases`` prints them, oldest first; ``*``
    marks ``current``. Every cell is cleaned: over the broker, rows come from presences."""
    table = [
        [("* " if row.get("current") else "  ") + clean(row.get("name", ""), 64)]
        + [clean(str(row.get("revision") or ""), 12)]
        + [clean(row.get(key) or "", 120) for key in RELEASE_COLUMNS[2:]]
        for row in rows
    ]
    header = ["  name", *RELEASE_COLUMNS[1:]]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *table]
    )
