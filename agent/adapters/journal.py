"""The command journal: ``<state>/journal/<id>.json``, one typed entry per command not yet
finished (docs/architecture.md, "Safety invariants").

A command is journaled ``queued`` before its message is acknowledged, ``running`` before
it starts, and ``done`` with its result before the result is sent; the entry goes only once
the broker confirmed the result. A crash at any point therefore leaves an entry that says
what to do at the next start: run it again, report it interrupted, or send its result.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from agent.adapters.files import atomic_write, fsync_dir
from agent.core.errors import StateError
from agent.protocol import Command, encode

log = structlog.get_logger(__name__)

EntryState = Literal["queued", "running", "done"]


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    id: str
    state: EntryState
    run_as: str = ""
    #: The command as it arrived (canonical JSON); None for the agent's own work.
    command: dict[str, Any] | None = None
    #: The app's live release when the command started: did ``current`` move?
    release_before: str | None = None
    #: What the agent does for itself (a repair after a crash), when there is no command.
    app: str | None = None
    reason: str = ""
    #: The final event's payload, once the result is decided.
    result: str | None = None

    def parsed_command(self) -> Command | None:
        if self.command is None:
            return None
        return Command.model_validate_json(json.dumps(self.command))


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, entry_id: str) -> Path:
        return self.directory / f"{entry_id}.json"

    def write(self, entry: JournalEntry) -> None:
        """Record ``entry`` durably; StateError when the disk refuses (full, read-only)."""
        data = {k: v for k, v in asdict(entry).items() if v not in (None, "")}
        try:
            atomic_write(self.path(entry.id), json.dumps(data, sort_keys=True).encode(), mode=0o600)
        except OSError as exc:
            raise StateError(f"cannot write journal entry {entry.id}: {exc}") from exc

    @staticmethod
    def queued_entry(command: Command, run_as: str) -> JournalEntry:
        return JournalEntry(
            id=str(command.id), state="queued", run_as=run_as, command=json.loads(encode(command))
        )

    def queued(self, command: Command, run_as: str) -> JournalEntry:
        """Record a received command before its message is acknowledged."""
        entry = self.queued_entry(command, run_as)
        self.write(entry)
        return entry

    def finish(self, entry_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(entry_id).unlink()
            fsync_dir(self.directory)

    def entries(self) -> Iterator[JournalEntry]:
        """Entries left behind, oldest first; an unreadable one is logged and removed."""
        if not self.directory.is_dir():
            return
        paths = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                entry = JournalEntry(**raw)
                entry.parsed_command()
            except (OSError, ValueError, TypeError) as exc:
                log.error("journal.corrupt", entry=path.stem, reason=str(exc)[:200])
                self.finish(path.stem)
                continue
            yield entry
