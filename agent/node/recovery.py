"""What the agent does for itself, with no command: after a crash (journal entries,
half-built releases, a roll cut short) and on the first start of a new instance.

Functions that decide and return ``Work`` for the daemon's worker; the daemon publishes and
queues. Kept apart from the daemon so its lifecycle reads on its own.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from agent.adapters.releases import ReleaseManager
from agent.adapters.state import StateStore
from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.node.announce import app_presence
from agent.protocol.protocol import Command, Presence

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Work:
    """One unit for the worker: a command, a reconfigure (``command`` None), or work of
    the agent's own for ``app`` (a repair after a crash, a first deploy)."""

    run_as: str
    command: Command | None = None
    reason: str = ""
    app: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Unfinished:
    """A journal entry left by a crash: ``queued`` runs again, ``running`` was cut short."""

    command: Command
    state: str
    run_as: str
    release_before: str | None


@dataclass(frozen=True)
class Reported:
    """A journal entry whose result was decided but maybe not delivered: sent again."""

    command_id: str
    payload: bytes


def reported(store: StateStore) -> Iterator[Reported]:
    for entry in store.unfinished():
        if entry.get("state") == "done" and isinstance(entry.get("result"), str):
            yield Reported(str(entry.get("id")), entry["result"].encode("utf-8"))


def unfinished(store: StateStore) -> Iterator[Unfinished]:
    """The journal's entries of commands not done; a corrupt one is logged and dropped."""
    for entry in store.unfinished():
        command_id = str(entry.get("id"))
        if entry.get("state") == "done":
            continue
        try:
            command = Command.model_validate_json(json.dumps(entry["command"]))
        except (KeyError, ValueError):
            log.error("journal.corrupt", command_id=command_id)
            store.finish(command_id)
            continue
        yield Unfinished(
            command=command,
            state=str(entry.get("state", "running")),
            run_as=str(entry.get("run_as", command.kind)),
            release_before=entry.get("release_before"),
        )


def live_release(config: AgentConfig, app: str | None) -> str | None:
    if app is None or app not in config.apps:
        return None
    info = app_presence(config, app)
    return info.release if info else None


def repair(config: AgentConfig, app: str | None, release_before: str | None) -> Work | None:
    """After a crash mid-command, the clients must run what ``current`` holds: if
    ``current`` moved, finish the roll (a rolling restart of every client); if not, start
    again whatever the crash left stopped."""
    if app is None or config.supervisor is None or not config.carries(app):
        return None
    moved = live_release(config, app) != release_before
    reason = "current moved: finish the rolling restart" if moved else "restart stopped clients"
    log.warning("journal.repair", app=app, reason=reason)
    return Work("restart" if moved else "heal", None, reason, app=app)


def first_deploys(config: AgentConfig, presences: Iterable[Presence]) -> list[Work]:
    """A new instance (an autoscaling join, a rebuilt server) deploys its apps at once, as
    OpsWorks' setup did: the revision the rest of the stack runs, else the app's
    configured branch or revision."""
    others = [p for p in presences if p.instance != config.instance.id and p.state == "online"]
    work = []
    for app in sorted(config.apps):
        if not config.carries(app) or live_release(config, app) is not None:
            continue
        revision = stack_revision(others, app)
        log.info("setup.first_deploy", app=app, revision=revision or "configured")
        work.append(Work("deploy", None, "first deploy of this instance", app, revision))
    return work


def stack_revision(presences: Iterable[Presence], app: str) -> str | None:
    """The revision most of these instances run for ``app`` (None when none runs it)."""
    counts: Counter[str] = Counter(p.apps[app].revision or "" for p in presences if app in p.apps)
    counts.pop("", None)
    return counts.most_common(1)[0][0] if counts else None


def check_releases(config: AgentConfig) -> dict[str, Any]:
    """Remove half-built releases and say when ``current`` is broken, for every app."""
    report: dict[str, Any] = {}
    for app, cfg in sorted(config.apps.items()):
        try:
            mgr = ReleaseManager(
                root=config.paths.root,
                app=app,
                repository=cfg.repository,
                keep_releases=cfg.keep_releases,
                shared_dirs=cfg.shared_dirs,
            )
            removed = mgr.clean_incomplete()
            current = mgr.current()
        except (AgentError, OSError) as exc:
            log.error("releases.check_failed", app=app, error=str(exc))
            continue
        if removed:
            log.warning("releases.cleaned", app=app, removed=removed)
        if current is None and mgr.current_link.is_symlink():
            log.error("releases.current_broken", app=app, target=str(mgr.current_link.readlink()))
        report[app] = {"removed": removed, "current": current.name if current else None}
    return report
