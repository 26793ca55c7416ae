"""``deploy-agent run``: the long-running agent of DESIGN.md "Wire protocol".

``Daemon.serve()`` tells the whole story: ``startup()`` (state, recovery, presence),
``main_loop()`` (broker session, command worker, membership reconfigure, watchdog) and
``shutdown()`` (stop taking commands, let the running one reach its end within the grace
period, publish offline, flush). Signals only set flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Iterator
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from agent.adapters.keys import load_trusted_keys
from agent.adapters.log import add_sink, remove_sink
from agent.adapters.mqtt import MqttSession, Outgoing
from agent.adapters.sdnotify import notify, watchdog_interval
from agent.adapters.state import StateStore
from agent.adapters.templates import apply_templates
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, ConfigError
from agent.core.plan import client_layout
from agent.core.stackconfig import stack_settings
from agent.node import announce, recovery
from agent.node.fleet import Debouncer, Fleet
from agent.node.intake import Ignored, Rejected, accept
from agent.node.pipeline import HostFacts, Outcome, Pipeline
from agent.node.recovery import Work
from agent.node.restart import restarter_for
from agent.protocol.protocol import (
    Command,
    InvalidMessage,
    Presence,
    SignedConfig,
    StatusRecord,
    Topics,
    encode,
    parse_message,
    verify_config,
)

log = structlog.get_logger(__name__)


class Daemon:
    """One agent on one instance; everything it owns is created here and closed in
    ``shutdown()``."""

    def __init__(self, config: AgentConfig) -> None:
        if config.broker is None:
            raise ConfigError("`deploy-agent run` needs a broker section in the configuration")
        self.config = config
        self.topics = Topics(config.broker.topic_prefix, config.stack)
        self.store = StateStore(config.paths.state)
        self.facts = HostFacts.probe()
        self.trusted = load_trusted_keys(config.security.trusted_keys)
        self.stack_config: dict[str, Any] = dict(config.stack_config)
        self.started_at = announce.now()
        self.fleet = Fleet(self.presence())
        self.queue: asyncio.Queue[Work] = asyncio.Queue()
        self.seen: set[str] = set(self.store.load().processed)
        self.status_record: StatusRecord | None = None
        self.configure_queued = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.should_exit = False
        self.exit_requested = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.session = MqttSession(
            config.broker,
            client_id=config.broker.client_id
            or f"deploy-agent-{config.stack}-{config.instance.id}",
            will=Outgoing(
                self.topics.instance(config.instance.id),
                encode(announce.offline(config)),
                qos=1,
                retain=True,
            ),
            subscriptions=[
                (self.topics.commands, 1),
                (self.topics.instances_wildcard, 1),
                (self.topics.config, 1),
            ],
        )
        self.session.on_connect.append(self.announce)
        self.session.on_connect.append(self.connected_status)
        self.reconfigure = Debouncer(
            config.membership_debounce, self.enqueue_configure, name="membership"
        )
        self.log_sink = self.session.log_sink(self.topics.logs(config.instance.id))

    # -- the story ------------------------------------------------------------------------
    async def serve(self) -> int:
        with self.capture_signals():
            await self.startup()
            try:
                await self.main_loop()
            finally:
                await self.shutdown()
        return 0

    async def startup(self) -> None:
        add_sink(self.log_sink)
        self.recover()
        log.info(
            "agent.started",
            instance=self.config.instance.id,
            stack=self.config.stack,
            apps=sorted(self.config.apps),
            layers=self.config.instance.layers,
        )

    async def main_loop(self) -> None:
        tasks = [
            asyncio.create_task(self.session.run(self.on_message), name="mqtt"),
            asyncio.create_task(self.worker(), name="worker"),
            asyncio.create_task(self.watchdog(), name="watchdog"),
        ]
        notify("READY=1", "STATUS=connecting to the broker")
        try:
            stopper = asyncio.create_task(self.exit_requested.wait(), name="exit")
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a crashed task is a bug: surface it
            await self.drain()
        finally:
            worker, mqtt = tasks[1], tasks[0]
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            await self.reconfigure.close()
            # Offline goes out while the session still runs: a clean disconnect
            # discards the Last Will, so nobody else would say it.
            if not mqtt.done():
                delivered = await self.session.close(last=self.offline_message(), timeout=5)
                log.info("agent.offline_published", delivered=delivered)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Stop taking commands; let the running one finish within ``shutdown_grace``."""
        notify("STOPPING=1")
        log.info("agent.stopping", running=not self.idle.is_set(), grace=self.config.shutdown_grace)
        waits = [asyncio.create_task(self.idle.wait()), asyncio.create_task(self.force_exit.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.config.shutdown_grace, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
        if not self.idle.is_set():
            log.error("agent.grace_expired", grace=self.config.shutdown_grace)

    async def shutdown(self) -> None:
        remove_sink(self.log_sink)
        log.info("agent.stopped")

    def offline_message(self) -> Outgoing:
        return self.retained(
            self.topics.instance(self.config.instance.id), encode(announce.offline(self.config))
        )

    # -- signals --------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: signal.Signals) -> None:
        """First signal: finish what runs, then stop. A second SIGINT: stop now."""
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit.set()
        self.should_exit = True
        self.exit_requested.set()

    # -- inputs ---------------------------------------------------------------------------
    def presence(self) -> Presence:
        settings = stack_settings(self.stack_config)
        layout = client_layout(
            settings.plone_instances,
            cpu_count=self.facts.cpu_count,
            memory_mb=self.facts.memory_mb,
            layers=self.config.instance.layers,
        )
        return announce.presence(self.config, self.facts, layout, self.started_at)

    def pipeline(self, command: Command | None) -> Pipeline:
        async def emit(phase: str, status: str, message: str, details: dict[str, Any]) -> None:
            self.publish_event(
                command,
                phase=phase,
                status="progress",
                message=message,
                details={"step": status, **details},
            )

        return Pipeline(
            self.config,
            store=self.store,
            restarter=restarter_for(self.config),
            members=self.fleet.members,
            stack_config=self.stack_config,
            facts=self.facts,
            emit=emit,
        )

    async def connected_status(self) -> None:
        broker = self.config.broker
        assert broker is not None
        notify(f"STATUS=connected to {broker.host}:{broker.port}, idle")

    @staticmethod
    def retained(topic: str, payload: bytes) -> Outgoing:
        return Outgoing(topic, payload, qos=1, retain=True)

    async def announce(self) -> None:
        """(Re)publish our presence: on every connect and after every command."""
        own = self.presence()
        self.fleet.apply(own.instance, own)
        self.session.publish(self.retained(self.topics.instance(own.instance), encode(own)))

    def publish_event(self, command: Command | None, **fields: Any) -> None:
        event = announce.event(self.config, command, **fields)
        self.session.publish(Outgoing(self.topics.events(self.config.instance.id), encode(event)))

    async def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.topics.commands:
            self.on_command(payload)
        elif topic == self.topics.config:
            self.on_config(payload)
        elif (instance := self.topics.instance_id(topic)) is not None:
            self.on_presence(instance, payload)

    def on_command(self, payload: bytes) -> None:
        """Parse, verify, journal, queue: the broker's ack follows this return."""
        verdict = accept(
            payload, config=self.config, trusted=self.trusted, seen=self.seen, now=announce.now()
        )
        if isinstance(verdict, Ignored):
            return
        if isinstance(verdict, Rejected):
            log.warning(
                "command.rejected",
                reason=verdict.reason,
                command_id=str(verdict.command.id) if verdict.command else None,
            )
            self.publish_event(
                verdict.command, phase="result", status="rejected", message=verdict.reason
            )
            return
        command = verdict.command
        if self.should_exit:
            log.info("command.deferred", command_id=str(command.id))
        self.store.journal(
            str(command.id),
            {
                "id": str(command.id),
                "state": "queued",
                "run_as": verdict.run_as,
                "command": json.loads(encode(command)),
            },
        )
        self.seen.add(str(command.id))
        log.info("command.queued", command_id=str(command.id), run_as=verdict.run_as)
        self.publish_event(
            command, phase="received", status="started", message=f"queued as {verdict.run_as}"
        )
        self.queue.put_nowait(Work(verdict.run_as, command))

    def on_presence(self, instance: str, payload: bytes) -> None:
        presence = None
        if payload:
            try:
                presence = parse_message(Presence, payload)
            except InvalidMessage as exc:
                log.warning("presence.invalid", instance=instance, reason=str(exc))
                return
        if instance == self.config.instance.id:
            stale = presence is None or (
                presence.state == "offline" and presence.since < self.started_at
            )
            if stale and not self.should_exit:
                # A Last Will left by a previous run of this agent: say we are here.
                self.session.publish(
                    self.retained(self.topics.instance(instance), encode(self.presence()))
                )
            return
        if self.fleet.apply(instance, presence):
            log.info(
                "fleet.changed",
                instance=instance,
                state=presence.state if presence else "cleared",
                online=self.fleet.online_count(),
            )
            self.reconfigure.trigger()

    def on_config(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            signed = parse_message(SignedConfig, payload)
            verify_config(
                signed,
                self.trusted,
                require_signatures=self.config.security.require_signatures,
                max_clock_skew=self.config.security.max_clock_skew,
                now=announce.now(),
                stack=self.config.stack,
            )
            stack_settings(signed.payload)
        except AgentError as exc:
            log.error("stack_config.rejected", reason=str(exc))
            return
        state = self.store.load()
        applied = state.config_issued_at
        if applied and signed.issued_at.isoformat() < applied:
            log.error(
                "stack_config.rejected",
                issued_at=signed.issued_at.isoformat(),
                reason=f"older than the configuration applied ({applied}): a replay?",
            )
            return
        if signed.payload == self.stack_config:
            return
        log.info("stack_config.changed", issued_by=signed.issued_by)
        self.stack_config = dict(signed.payload)
        state.config_issued_at = signed.issued_at.isoformat()
        self.store.save(state)
        self.reconfigure.trigger()

    async def enqueue_configure(self) -> None:
        """Repeated membership or config triggers coalesce into one queued configure."""
        if not self.configure_queued and not self.should_exit:
            self.configure_queued = True
            log.info("configure.queued", reason="membership or stack config changed")
            self.queue.put_nowait(Work("configure", None, "membership or stack config changed"))

    # -- the worker -----------------------------------------------------------------------
    async def worker(self) -> None:
        """One command at a time, in arrival order."""
        await self.session.connected.wait()
        await asyncio.sleep(self.config.membership_debounce)  # let retained presence arrive
        if self.config.first_deploy:
            for work in recovery.first_deploys(self.config, self.fleet.presences().values()):
                self.queue.put_nowait(work)
        while not self.should_exit:
            work = await self.queue.get()
            if self.should_exit:
                break
            self.idle.clear()
            try:
                await self.execute(work)
            finally:
                self.idle.set()

    async def execute(self, work: Work) -> None:
        command = work.command
        command_id = str(command.id) if command else None
        if work.command is None and work.run_as == "configure":
            self.configure_queued = False
        with bound_contextvars(command_id=command_id, instance=self.config.instance.id):
            if command is not None:
                self.store.journal(
                    command_id or "",
                    {
                        "id": command_id,
                        "state": "running",
                        "run_as": work.run_as,
                        "command": json.loads(encode(command)),
                        "release_before": recovery.live_release(self.config, command.app),
                    },
                )
            notify(f"STATUS=running {work.run_as}")
            try:
                outcomes = await self.run(work)
            except Exception as exc:  # a bug must cost one command, never the agent
                log.exception("command.crashed", run_as=work.run_as)
                outcomes = [
                    Outcome(
                        kind=work.run_as,
                        app=command.app if command and command.app else "agent",
                        status="failed",
                        message=f"internal error: {type(exc).__name__}: {exc}"[:2000],
                        error="internal-error",
                    )
                ]
            result = self.report(command, outcomes, work.run_as)
            if command_id:
                # The result is journaled before it is sent, and the entry is finished only
                # once the broker has it: a crash in between publishes it again at start-up.
                state = self.store.load()
                state.remember(command_id)
                self.store.save(state)
                self.journal_result(command_id, result)
            self.deliver(command_id, result)
            try:
                await self.announce()
            except Exception:
                log.exception("presence.failed")
            notify("STATUS=idle")

    def journal_result(self, command_id: str, result: Outgoing) -> None:
        self.store.journal(
            command_id,
            {"id": command_id, "state": "done", "result": result.payload.decode("utf-8")},
        )

    def deliver(self, command_id: str | None, result: Outgoing) -> None:
        """Publish a final event; its journal entry goes once the broker confirmed it."""
        done = self.session.publish_tracked(result)
        if command_id is None:
            return

        def finished(future: asyncio.Future[bool]) -> None:
            if not future.cancelled() and future.result():
                self.store.finish(command_id)

        done.add_done_callback(finished)

    async def run(self, work: Work) -> list[Outcome]:
        command = work.command
        pipe = self.pipeline(command)
        if work.run_as == "configure":
            return await self.configure_all(pipe)
        if command is None and work.app is not None:  # the agent's own work
            if work.run_as == "deploy":
                return [await pipe.deploy(work.app, revision=work.revision)]
            if work.run_as == "heal":
                return [await pipe.heal(work.app)]
            return [await pipe.restart(work.app)]
        assert command is not None and command.app is not None
        if command.kind == "deploy":
            return [
                await pipe.deploy(
                    command.app,
                    revision=command.revision,
                    always_buildout=command.always_buildout,
                    restart_delay=command.restart_delay,
                )
            ]
        if command.kind == "rollback":
            return [await pipe.rollback(command.app, to_release=command.to_release)]
        return [await pipe.restart(command.app, restart_delay=command.restart_delay)]

    async def configure_all(self, pipe: Pipeline) -> list[Outcome]:
        outcomes = [
            await pipe.configure(app)
            for app in sorted(self.config.apps)
            if self.config.carries(app)
        ]
        if self.config.templates:
            outcomes.append(await self.apply_templates())
        return outcomes

    async def apply_templates(self) -> Outcome:
        context = self.fleet.template_context(
            stack=self.config.stack, stack_config=self.stack_config
        )
        try:
            results = await apply_templates(self.config.templates, context)
        except AgentError as exc:
            return Outcome(
                kind="configure", app="templates", status="failed", message=str(exc), error=exc.code
            )
        changed = [str(r.destination) for r in results if r.changed]
        return Outcome(
            kind="configure",
            app="templates",
            status="succeeded" if changed else "unchanged",
            message=f"rewrote and reloaded {', '.join(changed)}"
            if changed
            else "templates unchanged",
            details={"changed": changed},
        )

    def report(self, command: Command | None, outcomes: list[Outcome], run_as: str) -> Outgoing:
        """The retained last result per app; returns the command's final event, for the
        caller to publish once it is journaled."""
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
        event = announce.event(
            self.config,
            command,
            phase="result",
            status=status,
            message=message,
            details=details,
            kind=("restart" if run_as == "heal" else run_as) if command is None else None,
        )
        result = Outgoing(self.topics.events(self.config.instance.id), encode(event))
        for outcome in outcomes:
            # A reconfigure that changed nothing is not news: keep the last real result.
            quiet = outcome.kind == "configure" and outcome.status == "unchanged"
            if outcome.app in self.config.apps and not quiet:
                self.status_record = announce.status_record(
                    self.config, self.status_record, outcome, command
                )
        if self.status_record is not None:
            self.session.publish(
                self.retained(
                    self.topics.status(self.config.instance.id), encode(self.status_record)
                )
            )
        return result

    # -- recovery and liveness ------------------------------------------------------------
    def recover(self) -> None:
        """Journal entries left by a crash: queued ones run again, a running one is
        reported ``interrupted`` and its clients repaired. Half-built releases are removed."""
        for done in recovery.reported(self.store):
            log.info("journal.result_resent", command_id=done.command_id)
            self.seen.add(done.command_id)
            topic = self.topics.events(self.config.instance.id)
            self.deliver(done.command_id, Outgoing(topic, done.payload))
        for entry in recovery.unfinished(self.store):
            command, command_id = entry.command, str(entry.command.id)
            self.seen.add(command_id)
            if entry.state == "queued":
                log.info("journal.requeued", command_id=command_id)
                self.queue.put_nowait(Work(entry.run_as, command))
                continue
            log.error("command.interrupted", command_id=command_id, kind=command.kind)
            event = announce.event(
                self.config,
                command,
                phase="result",
                status="interrupted",
                message="the agent stopped while this command was running; "
                "current was left on a complete release",
            )
            result = Outgoing(self.topics.events(self.config.instance.id), encode(event))
            repair = recovery.repair(self.config, command.app, entry.release_before)
            if repair is not None:
                self.queue.put_nowait(repair)
            state = self.store.load()
            state.remember(command_id)
            self.store.save(state)
            self.journal_result(command_id, result)
            self.deliver(command_id, result)
        recovery.check_releases(self.config)

    async def watchdog(self) -> None:
        interval = watchdog_interval()
        while True:
            if interval is None:
                await asyncio.Event().wait()
            notify("WATCHDOG=1")
            await asyncio.sleep(interval or 60)
