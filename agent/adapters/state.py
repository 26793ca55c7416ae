"""The agent's memory on disk: what is deployed, which commands ran, which are running.

Every write is atomic (temp file, fsync, rename, fsync of the directory), so a crash at any
instant leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.core.errors import StateError

MAX_PROCESSED_IDS = 1000


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old bytes or the new ones, nothing else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class AppState:
    """What is live for one app: the revision, the digest of its deploy.cfg, the release."""

    sha: str
    cfg_digest: str
    release: str
    deployed_at: str
    outcome: str = "succeeded"


@dataclass
class AgentState:
    apps: dict[str, AppState] = field(default_factory=dict)
    processed: list[str] = field(default_factory=list)
    #: issued_at of the last stack configuration applied from the broker: an older one
    #: replayed later is refused.
    config_issued_at: str | None = None

    def remember(self, command_id: str) -> None:
        """Keep the most recent ids only: enough to refuse replays within the skew window."""
        if command_id not in self.processed:
            self.processed.append(command_id)
            del self.processed[:-MAX_PROCESSED_IDS]


class StateStore:
    """``<state>/state.json`` and ``<state>/journal/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.journal_dir = directory / "journal"

    def load(self) -> AgentState:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read state file {self.path}: {exc}") from exc
        apps = {name: AppState(**value) for name, value in raw.get("apps", {}).items()}
        return AgentState(
            apps=apps,
            processed=list(raw.get("processed", [])),
            config_issued_at=raw.get("config_issued_at"),
        )

    def save(self, state: AgentState) -> None:
        data = {
            "apps": {k: asdict(v) for k, v in sorted(state.apps.items())},
            "processed": state.processed,
            "config_issued_at": state.config_issued_at,
        }
        try:
            atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        except OSError as exc:
            raise StateError(f"cannot write state file {self.path}: {exc}") from exc

    def journal(self, command_id: str, entry: dict[str, Any]) -> None:
        """Record a command before it runs, so a crash mid-run is reported, not lost."""
        try:
            atomic_write(
                self.journal_dir / f"{command_id}.json",
                json.dumps(entry, sort_keys=True, default=str).encode(),
                mode=0o600,
            )
        except OSError as exc:
            raise StateError(f"cannot write journal entry {command_id}: {exc}") from exc

    def finish(self, command_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.journal_dir / f"{command_id}.json").unlink()
            fsync_dir(self.journal_dir)

    def unfinished(self) -> list[dict[str, Any]]:
        """Entries left behind by a crash, oldest first."""
        if not self.journal_dir.is_dir():
            return []
        entries = []
        for path in sorted(self.journal_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                entries.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                entries.append({"id": path.stem, "corrupt": True})
        return entries
