"""The operator's side of a command, as pure logic: whom it targets, in which batches,
what each instance answered, what that means as an exit code, and how to show it.

No I/O here: the command line feeds presences and events in and prints the strings that
come out. Every string from the broker goes through ``clean`` before it reaches a terminal.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from agent.core.exits import EXIT_FAILED, EXIT_NO_INSTANCE, EXIT_OK, EXIT_TIMEOUT
from agent.protocol import (
    FINAL_STATUSES,
    OK_STATUSES,
    Event,
    Presence,
    targets_instance,
)

OK_OUTCOMES = OK_STATUSES
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
    return targets_instance(targets, presence.instance, presence.layers)


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
