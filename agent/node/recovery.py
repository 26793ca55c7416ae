"""What the agent does for itself, with no command: after a crash (journal entries,
half-built releases, a roll cut short) and on the first start of a new instance.

``recover`` reads the journal at start-up: a result already decided is sent again, a queued
command runs again, a command cut short is reported ``interrupted`` and its clients
repaired. The repair is journaled before the interrupted entry is finished, so a crash
during the repair leads to the repair again, never to mixed releases reported as current.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import structlog

from agent.adapters.journal import Journal, JournalEntry
from agent.adapters.releases import ReleaseManager
from agent.adapters.state import StateStore
from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.node.announce import live_release
from agent.node.publisher import Publisher
from agent.node.worker import Work, Worker
from agent.protocol import Presence

log = structlog.get_logger(__name__)

INTERRUPTED = (
    "the agent stopped while this command was running; current was left on a complete release"
)


def recover(
    *,
    config: AgentConfig,
    journal: Journal,
    store: StateStore,
    publisher: Publisher,
    worker: Worker,
    seen: set[str],
) -> None:
    """Act on every journal entry a previous run left, then clean half-built releases."""
    for entry in journal.entries():
        seen.add(entry.id)
        if entry.state == "done" and entry.result is not None:
            log.info("journal.result_resent", command_id=entry.id)
            worker.deliver(entry.id, publisher.resent(entry.result.encode("utf-8")))
        elif entry.command is None:
            log.warning("journal.repair_again", entry=entry.id, reason=entry.reason)
            worker.put(Work(entry.run_as, None, entry.reason, app=entry.app, journal_id=entry.id))
        elif entry.state == "queued":
            log.info("journal.requeued", command_id=entry.id)
            worker.put(Work(entry.run_as, entry.parsed_command()))
        else:
            interrupted(config, journal, store, publisher, worker, entry)
    check_releases(config)


def interrupted(
    config: AgentConfig,
    journal: Journal,
    store: StateStore,
    publisher: Publisher,
    worker: Worker,
    entry: JournalEntry,
) -> None:
    """Report a command cut short, after journaling the repair it needs."""
    command = entry.parsed_command()
    assert command is not None
    log.error("command.interrupted", command_id=entry.id, kind=command.kind)
    work = repair(config, command.app, entry.release_before)
    if work is not None and work.journal_id is not None:
        journal.write(
            JournalEntry(
                id=work.journal_id,
                state="queued",
                run_as=work.run_as,
                app=work.app,
                reason=work.reason,
            )
        )
        worker.put(work)
    result = publisher.result(command, status="interrupted", message=INTERRUPTED)
    store.remember(entry.id)
    journal.write(JournalEntry(id=entry.id, state="done", result=result.payload.decode("utf-8")))
    worker.deliver(entry.id, result)


def repair(config: AgentConfig, app: str | None, release_before: str | None) -> Work | None:
    """After a crash mid-command, the clients must run what ``current`` holds: start again
    whatever the crash left stopped and, if ``current`` moved, restart the clients that
    still run the release before (the ones the roll had not reached). Clients already on
    ``current`` keep serving: the site never feels more of the agent's crash than that."""
    if app is None or config.supervisor is None or not config.carries(app):
        return None
    moved = live_release(config, app) != release_before
    reason = "current moved: finish the rolling restart" if moved else "restart stopped clients"
    log.warning("journal.repair", app=app, reason=reason)
    return Work("heal", None, reason, app=app, journal_id=f"repair-{uuid.uuid4()}")


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
    for app in sorted(config.apps):
        try:
            mgr = ReleaseManager.of(config, app)
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
