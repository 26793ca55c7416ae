"""What this agent tells the broker: its presence, its events and its last results.

Builders only (no I/O beyond reading release markers), so the daemon stays about lifecycle.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from agent import __version__
from agent.adapters.host import HostFacts
from agent.adapters.releases import ReleaseManager
from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.core.outcome import Outcome
from agent.core.plan import ClientLayout
from agent.core.redact import jsonable, strip_url_password
from agent.protocol import (
    AppPresence,
    AppStatus,
    ClientInfo,
    Command,
    Event,
    Presence,
    PresenceState,
    ReleaseRow,
    StatusRecord,
)


def now() -> datetime:
    return datetime.now(UTC)


def app_presence(config: AgentConfig, app: str) -> AppPresence | None:
    try:
        mgr = ReleaseManager.of(config, app)
        current = mgr.current()
    except (AgentError, OSError):
        return None
    if current is None:
        return None
    try:
        built = datetime.fromisoformat(current.built_at)
    except ValueError:
        built = None
    return AppPresence(
        release=current.name, revision=current.sha, deployed_at=built, releases=release_rows(mgr)
    )


def release_rows(mgr: ReleaseManager) -> list[ReleaseRow]:
    """The releases on this host for the operator's ``deploy-agent releases`` (the newest
    20), each reason cut to its first line."""
    rows = []
    try:
        listing = mgr.listing()[-20:]
    except (AgentError, OSError):
        return []
    for row in listing:
        reason = str(row["reason"]).splitlines()[0] if row["reason"] else ""
        rows.append(
            ReleaseRow(
                name=row["name"],
                revision=str(row["revision"])[:64],
                created=str(row["created"])[:64],
                decision=str(row["decision"])[:64],
                status=str(row["status"])[:32],
                reason=reason[:300],
                current=bool(row["current"]),
            )
        )
    return rows


def live_release(config: AgentConfig, app: str | None) -> str | None:
    if app is None or app not in config.apps:
        return None
    info = app_presence(config, app)
    return info.release if info else None


def presence(
    config: AgentConfig, facts: HostFacts, layout: ClientLayout | None, since: datetime
) -> Presence:
    """The retained announcement: who we are, what we run, which release is live."""
    apps = {}
    for app in sorted(config.apps):
        info = app_presence(config, app) if config.carries(app) else None
        if info is not None:
            apps[app] = info
    clients = []
    if layout is not None and any(config.carries(a) for a in config.apps):
        clients = [ClientInfo(name=n, port=p) for n, p in layout.ports.items()]
    return Presence(
        instance=config.instance.id,
        state="online",
        address=config.instance.address,
        layers=list(config.instance.layers),
        apps=apps,
        cpu_count=facts.cpu_count,
        memory_mb=facts.memory_mb,
        clients=clients,
        agent_version=__version__,
        since=since,
    )


def final(last: Presence, state: PresenceState) -> Presence:
    """What this agent says of its instance as it goes: its last presence (address,
    layers, clients, apps: the others keep the endpoints of a ``stopped`` instance) with
    ``state`` ``stopped`` (the agent stops, the services keep running) or ``leaving``
    (the instance is being removed)."""
    return last.model_copy(update={"state": state, "since": now()})


def will(last: Presence) -> Presence:
    """The Last Will: the broker lost the agent, nobody knows about the services."""
    return final(last, "unreachable")


def leaving(config: AgentConfig) -> Presence:
    """``deploy-agent leave``: the instance is being removed; its endpoints go out."""
    return Presence(
        instance=config.instance.id,
        state="leaving",
        address=config.instance.address,
        layers=list(config.instance.layers),
        agent_version=__version__,
        since=now(),
    )


def offline(config: AgentConfig, state: PresenceState = "stopped") -> Presence:
    """A minimal non-online presence of this instance (no clients, no apps)."""
    return Presence(
        instance=config.instance.id,
        state=state,
        address=config.instance.address,
        layers=list(config.instance.layers),
        agent_version=__version__,
        since=now(),
    )


def event(
    config: AgentConfig,
    command: Command | None,
    *,
    phase: str,
    status: str,
    message: str = "",
    app: str | None = None,
    details: dict[str, Any] | None = None,
    kind: str | None = None,
    command_id: UUID | None = None,
) -> Event:
    return Event.model_validate(
        {
            "instance": config.instance.id,
            "command_id": command.id if command else command_id,
            "kind": command.kind if command else kind,
            "app": app if app is not None else (command.app if command else None),
            "phase": phase,
            "status": status,
            "message": strip_url_password(message)[:16000],
            "details": jsonable(details or {}),
            "at": now(),
        }
    )


def result_details(outcome: Outcome) -> dict[str, Any]:
    return {
        "revision": outcome.revision,
        "release": outcome.release,
        "decision": outcome.decision,
        "error": outcome.error,
        "seconds": outcome.seconds,
        "kind": outcome.kind,
        **outcome.details,
    }


def combine(outcomes: list[Outcome]) -> tuple[str, str]:
    """One status for several apps: failed if any failed, unchanged if all were."""
    if not outcomes:
        return "unchanged", "no app of this instance to configure"
    if any(o.status == "failed" for o in outcomes):
        status = "failed"
    elif all(o.status == "unchanged" for o in outcomes):
        status = "unchanged"
    else:
        status = "succeeded"
    return status, "; ".join(f"{o.app}: {o.message}" for o in outcomes)


def status_record(
    config: AgentConfig, previous: StatusRecord | None, outcome: Outcome, command: Command | None
) -> StatusRecord:
    apps = dict(previous.apps) if previous else {}
    apps[outcome.app] = AppStatus.model_validate(
        {
            "command_id": command.id if command else None,
            "kind": outcome.kind,
            "status": outcome.status,
            "release": outcome.release,
            "revision": outcome.revision,
            "message": outcome.message[:16000],
            "at": now(),
        }
    )
    return StatusRecord(instance=config.instance.id, apps=apps, updated_at=now())
