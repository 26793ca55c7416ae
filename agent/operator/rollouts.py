"""The operator's side of a command, as pure logic: whom it targets, in which batches,
what each instance answered, what that means as an exit code, and how to show it.

No I/O here: the command line feeds presences and events in and prints the strings that
come out. Every string from the broker goes through ``clean`` before it reaches a terminal.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from agent.protocol.protocol import Event, Presence, StatusRecord

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_NO_INSTANCE = 0, 1, 2, 3, 4
FINAL_STATUSES = frozenset({"succeeded", "failed", "unchanged", "rejected", "interrupted"})
OK_OUTCOMES = frozenset({"succeeded", "unchanged"})
TIMED_OUT = "timed-out"
BatchState = Literal["pending", "ran", "skipped"]


# --- targets and batches ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The instances a command reaches, and the names that reach nothing online."""

    online: tuple[str, ...]
    offline: tuple[str, ...]
    unmatched: tuple[str, ...]


def _matches(presence: Presence, targets: Sequence[str] | None) -> bool:
    if targets is None:
        return True
    return presence.instance in targets or bool(set(presence.layers) & set(targets))


def select_targets(presences: Mapping[str, Presence], targets: Sequence[str] | None) -> Selection:
    """Which known instances a command with ``targets`` (ids and/or layers) addresses.

    The agents apply the same rule, so the operator can expect one answer from each
    online instance selected here.
    """
    chosen = [p for p in presences.values() if _matches(p, targets)]
    known = {p.instance for p in presences.values()}
    known |= {layer for p in presences.values() for layer in p.layers}
    return Selection(
        online=tuple(sorted(p.instance for p in chosen if p.state == "online")),
        offline=tuple(sorted(p.instance for p in chosen if p.state != "online")),
        unmatched=tuple(t for t in targets or () if t not in known),
    )


def plan_batches(instances: Sequence[str], batch_size: int | None) -> list[tuple[str, ...]]:
    """Split instances into consecutive batches of at most batch_size (None: one batch)."""
    ordered = tuple(sorted(instances))
    if not ordered:
        return []
    if batch_size is None:
        return [ordered]
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


# --- following one command --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstanceResult:
    """The final answer of one instance to one command (or the lack of one)."""

    instance: str
    outcome: str
    command_id: str
    batch: int
    revision: str | None = None
    release: str | None = None
    decision: str | None = None
    seconds: float | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "outcome": self.outcome,
            "command_id": self.command_id,
            "batch": self.batch,
            "revision": self.revision,
            "release": self.release,
            "decision": self.decision,
            "seconds": self.seconds,
            "message": self.message,
        }


@dataclass(kw_only=True)
class Progress:
    """What is known so far of one instance: the last phase, and the result once final."""

    instance: str
    sent_at: float
    phase: str = "waiting"
    status: str = "pending"
    message: str = ""
    result: InstanceResult | None = None

    def elapsed(self, now: float) -> float:
        if self.result is not None and self.result.seconds is not None:
            return self.result.seconds
        return max(0.0, now - self.sent_at)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _seconds(value: Any, fallback: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return round(float(value), 1)
    return round(fallback, 1)


def is_final(event: Event) -> bool:
    """The one result event per instance; a rejection is final whatever its phase."""
    if event.status not in FINAL_STATUSES:
        return False
    return event.phase == "result" or event.status == "rejected"


class Tracker:
    """Follows the events of one command until every expected instance sent its result."""

    def __init__(self, command_id: UUID, expected: Iterable[str], *, batch: int, now: float):
        self.command_id = command_id
        self.batch = batch
        self.expected = tuple(sorted(expected))
        self.progress = {i: Progress(instance=i, sent_at=now) for i in self.expected}

    def feed(self, event: Event, now: float) -> Progress | None:
        """Record an event; returns the instance's progress, or None if not this command's."""
        if event.command_id != self.command_id:
            return None
        progress = self.progress.setdefault(
            event.instance, Progress(instance=event.instance, sent_at=now)
        )
        if progress.result is not None:
            return progress  # exactly one final per instance: later ones change nothing
        progress.phase, progress.status, progress.message = event.phase, event.status, event.message
        if is_final(event):
            progress.result = self._result(event, now - progress.sent_at)
        return progress

    def _result(self, event: Event, elapsed: float) -> InstanceResult:
        details = event.details
        return InstanceResult(
            instance=event.instance,
            outcome=event.status,
            command_id=str(self.command_id),
            batch=self.batch,
            revision=_text(details.get("revision")),
            release=_text(details.get("release")),
            decision=_text(details.get("decision")),
            seconds=_seconds(details.get("seconds"), elapsed),
            message=event.message or _text(details.get("error")) or "",
        )

    @property
    def done(self) -> bool:
        return all(self.progress[i].result is not None for i in self.expected)

    def expire(self, now: float) -> None:
        """Give every instance still without a result the outcome timed-out."""
        for progress in self.progress.values():
            if progress.result is None:
                progress.result = InstanceResult(
                    instance=progress.instance,
                    outcome=TIMED_OUT,
                    command_id=str(self.command_id),
                    batch=self.batch,
                    seconds=round(now - progress.sent_at, 1),
                    message="no answer at all"
                    if progress.phase == "waiting"
                    else f"no result (last phase: {progress.phase})",
                )

    def results(self) -> list[InstanceResult]:
        return [
            p.result
            for p in sorted(self.progress.values(), key=lambda p: p.instance)
            if p.result is not None
        ]


# --- the whole run ----------------------------------------------------------------------


@dataclass(kw_only=True)
class Batch:
    index: int
    instances: tuple[str, ...]
    command_id: str | None = None
    state: BatchState = "pending"


@dataclass(kw_only=True)
class RunReport:
    """Everything a deploy or rollback run did, for the summary and for --json."""

    kind: str
    app: str
    waited: bool = True
    batches: list[Batch] = field(default_factory=list)
    results: list[InstanceResult] = field(default_factory=list)
    message: str = ""

    @property
    def command_ids(self) -> list[str]:
        return [b.command_id for b in self.batches if b.command_id]

    def failures(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    @property
    def exit_code(self) -> int:
        targeted = any(b.instances for b in self.batches)
        if targeted and not self.waited:
            return EXIT_OK  # published; nobody asked to hear how it went
        return exit_code(self.results, targeted=targeted)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "app": self.app,
            "command_ids": self.command_ids,
            "batches": [
                {
                    "index": b.index,
                    "instances": list(b.instances),
                    "command_id": b.command_id,
                    "state": b.state,
                }
                for b in self.batches
            ],
            "results": [r.to_json() for r in self.results],
            "message": self.message,
            "exit_code": self.exit_code,
        }


def exit_code(results: Sequence[InstanceResult], *, targeted: bool) -> int:
    """0 all ok, 1 any failed or rejected, 3 none failed but some timed out, 4 none targeted.

    A definite failure outranks a timeout: it is the more actionable news.
    """
    if not targeted or not results:
        return EXIT_NO_INSTANCE
    outcomes = {r.outcome for r in results}
    if outcomes <= OK_OUTCOMES:
        return EXIT_OK
    if outcomes - OK_OUTCOMES - {TIMED_OUT}:
        return EXIT_FAILED
    return EXIT_TIMEOUT


def stop_reason(report: RunReport, max_failures: int) -> str | None:
    """Why the roll must stop before the next batch: more failures than allowed."""
    if report.failures() <= max_failures:
        return None
    return (
        f"stopped: {report.failures()} instance(s) did not succeed, "
        f"more than --max-failures {max_failures}"
    )


# --- rendering for people ---------------------------------------------------------------

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
