"""The agent's memory on disk: what is deployed, which command ids ran, and the newest
signed stack configuration accepted (docs/architecture.md, "On disk").

Every write is atomic, and every read-modify-write holds an exclusive lock on
``state.json.lock``, so the daemon and a ``deploy --local`` beside it never lose each
other's updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.adapters.files import atomic_write
from agent.core.errors import StateError

MAX_PROCESSED_IDS = 1000


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
    #: That configuration itself, so a restart uses it rather than the file's.
    stack_config: dict[str, Any] | None = None

    def remember(self, command_id: str) -> None:
        """Keep the most recent ids only: enough to refuse replays within the skew window."""
        if command_id not in self.processed:
            self.processed.append(command_id)
            del self.processed[:-MAX_PROCESSED_IDS]


class StateStore:
    """``<state>/state.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.json"
        self.lock_path = directory / "state.json.lock"

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
            stack_config=raw.get("stack_config"),
        )

    def save(self, state: AgentState) -> None:
        data = {
            "apps": {k: asdict(v) for k, v in sorted(state.apps.items())},
            "processed": state.processed,
            "config_issued_at": state.config_issued_at,
            "stack_config": state.stack_config,
        }
        try:
            atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        except OSError as exc:
            raise StateError(f"cannot write state file {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state lock (across processes) for one read-modify-write."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a+")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise StateError(f"cannot lock state file {self.path}: {exc}") from exc
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def update(self, change: Callable[[AgentState], None]) -> AgentState:
        """Load, apply ``change``, save: under the lock, so no concurrent update is lost."""
        with self.locked():
            state = self.load()
            change(state)
            self.save(state)
            return state

    def update_app(self, app: str, live: AppState) -> None:
        self.update(lambda state: state.apps.__setitem__(app, live))

    def remember(self, command_id: str) -> None:
        self.update(lambda state: state.remember(command_id))
