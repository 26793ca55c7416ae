"""The worker: one unit of work at a time, in arrival order, each ending in one result
(docs/architecture.md, "Safety invariants").

A command is marked ``running`` in the journal before it starts; its result is journaled
before it is sent and the entry finished only once the broker confirmed the result. Work of
the agent's own (a repair after a crash) is journaled too, so a second crash re-runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from agent.adapters.journal import Journal, JournalEntry
from agent.adapters.mqtt import Outgoing
from agent.adapters.sdnotify import notify
from agent.adapters.state import StateStore
from agent.adapters.templates import apply_templates
from agent.core.config import AgentConfig
from agent.core.errors import INTERNAL_ERROR, AgentError
from agent.core.outcome import Outcome
from agent.node import announce
from agent.node.pipeline import Pipeline
from agent.node.publisher import CommandProgress, Publisher
from agent.protocol import Command

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Work:
    """One unit for the worker: a command, a reconfigure (``command`` None), or work of
    the agent's own for ``app`` (a repair after a crash, a first deploy). ``journal_id``
    names the journal entry of work that must survive a crash."""

    run_as: str
    command: Command | None = None
    reason: str = ""
    app: str | None = None
    revision: str | None = None
    journal_id: str | None = None


class Worker:
    def __init__(
        self,
        *,
        config: AgentConfig,
        pipeline: Pipeline,
        journal: Journal,
        store: StateStore,
        publisher: Publisher,
        template_context: Callable[[], Mapping[str, Any]],
        announce_presence: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.journal = journal
        self.store = store
        self.publisher = publisher
        self.template_context = template_context
        self.announce_presence = announce_presence
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self.idle = asyncio.Event()
        self.idle.set()
        self.configure_queued = False

    def put(self, work: Work) -> None:
        self.queue.put_nowait(work)

    def enqueue_configure(self) -> None:
        """Repeated membership or config triggers coalesce into one queued configure."""
        if not self.configure_queued:
            self.configure_queued = True
            log.info("configure.queued", reason="membership or stack config changed")
            self.put(Work("configure", None, "membership or stack config changed"))

    async def run(self, should_exit: Callable[[], bool]) -> None:
        while not should_exit():
            work = await self.queue.get()
            if should_exit():
                break
            self.idle.clear()
            try:
                await self.execute(work)
            finally:
                self.idle.set()

    async def execute(self, work: Work) -> None:
        command = work.command
        command_id = str(command.id) if command else None
        if command is None and work.run_as == "configure":
            self.configure_queued = False
        with bound_contextvars(command_id=command_id, instance=self.config.instance.id):
            self.mark_running(work)
            notify(f"STATUS=running {work.run_as}")
            try:
                outcomes = await self.dispatch(work)
            except Exception as exc:  # a bug must cost one command, never the agent
                log.exception("command.crashed", run_as=work.run_as)
                app = command.app if command and command.app else work.app or "agent"
                outcomes = [
                    Outcome.failed(
                        work.run_as,
                        app,
                        f"internal error: {type(exc).__name__}: {exc}"[:2000],
                        error=INTERNAL_ERROR,
                    )
                ]
            self.finish(work, outcomes)
            try:
                await self.announce_presence()
            except Exception:
                log.exception("presence.failed")
            notify("STATUS=idle")

    def mark_running(self, work: Work) -> None:
        command = work.command
        if command is not None:
            self.journal.write(
                replace(
                    self.journal_entry(work, "running"),
                    release_before=announce.live_release(self.config, command.app),
                )
            )
        elif work.journal_id is not None:
            self.journal.write(self.journal_entry(work, "running"))

    def journal_entry(self, work: Work, state: str) -> JournalEntry:
        command = work.command
        if command is not None:
            entry = self.journal.queued_entry(command, work.run_as)
            return replace(entry, state=state)  # type: ignore[arg-type]
        assert work.journal_id is not None
        return JournalEntry(
            id=work.journal_id,
            state=state,  # type: ignore[arg-type]
            run_as=work.run_as,
            app=work.app,
            reason=work.reason,
        )

    def finish(self, work: Work, outcomes: list[Outcome]) -> None:
        """Publish the result: journaled first when it has a command, so it survives."""
        command = work.command
        result = self.result_message(command, outcomes, work.run_as)
        self.publisher.statuses(outcomes, command)
        if command is None:
            if work.journal_id is not None:
                self.journal.finish(work.journal_id)
            self.publisher.deliver(result)
            return
        command_id = str(command.id)
        self.store.remember(command_id)
        self.journal.write(
            JournalEntry(id=command_id, state="done", result=result.payload.decode("utf-8"))
        )
        self.deliver(command_id, result)

    def deliver(self, entry_id: str, result: Outgoing) -> None:
        """Send a journaled result; its entry goes once the broker confirmed it."""
        done = self.publisher.deliver(result)

        def confirmed(future: asyncio.Future[bool]) -> None:
            if not future.cancelled() and future.result():
                self.journal.finish(entry_id)

        done.add_done_callback(confirmed)

    def result_message(
        self, command: Command | None, outcomes: list[Outcome], run_as: str
    ) -> Outgoing:
        status: str
        if len(outcomes) == 1:
            outcome = outcomes[0]
            status, message = outcome.status, outcome.message
            details = announce.result_details(outcome)
        else:
            status, message = announce.combine(outcomes)
            details = {
                "kind": run_as,
                "outcomes": [announce.result_details(o) | {"app": o.app} for o in outcomes],
            }
        return self.publisher.result(
            command,
            status=status,
            message=message,
            details=details,
            kind=("restart" if run_as == "heal" else run_as) if command is None else None,
        )

    async def dispatch(self, work: Work) -> list[Outcome]:
        pipe, command = self.pipeline, work.command
        progress = CommandProgress(self.publisher, command)
        if work.run_as == "configure":
            return await self.configure_all(progress)
        if command is None and work.app is not None:  # the agent's own work
            if work.run_as == "deploy":
                return [await pipe.deploy(work.app, revision=work.revision, progress=progress)]
            if work.run_as == "heal":
                return [await pipe.heal(work.app, progress=progress)]
            return [await pipe.restart(work.app, progress=progress)]
        assert command is not None and command.app is not None
        if command.kind == "deploy":
            return [
                await pipe.deploy(
                    command.app,
                    revision=command.revision,
                    always_buildout=command.always_buildout,
                    restart_delay=command.restart_delay,
                    progress=progress,
                )
            ]
        if command.kind == "rollback":
            return [
                await pipe.rollback(
                    command.app,
                    to_release=command.to_release,
                    force=bool(command.force),
                    progress=progress,
                )
            ]
        return [
            await pipe.restart(command.app, restart_delay=command.restart_delay, progress=progress)
        ]

    async def configure_all(self, progress: CommandProgress) -> list[Outcome]:
        outcomes = [
            await self.pipeline.configure(app, progress=progress)
            for app in sorted(self.config.apps)
            if self.config.carries(app)
        ]
        if self.config.templates:
            outcomes.append(await self.apply_templates())
        return outcomes

    async def apply_templates(self) -> Outcome:
        try:
            results = await apply_templates(self.config.templates, self.template_context())
        except AgentError as exc:
            return Outcome.failed("configure", "templates", str(exc), error=exc.code)
        changed = [str(r.destination) for r in results if r.changed]
        if not changed:
            return Outcome.unchanged("configure", "templates", "templates unchanged")
        return Outcome.succeeded(
            "configure",
            "templates",
            f"rewrote and reloaded {', '.join(changed)}",
            details={"changed": changed},
        )
