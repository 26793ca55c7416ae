"""``deploy-agent run``: the long-running agent (docs/architecture.md, "Wire protocol").

``Daemon.serve()`` tells the whole story: ``startup()`` (recovery), ``main_loop()`` (broker
session, worker, membership reconfigure, watchdog) and ``shutdown()`` (stop taking
commands, let the running one reach its end within the grace period, publish offline).
Signals only set flags. The daemon composes and routes; intake, the worker, the publisher,
the journal and recovery each own their job in their own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import structlog

from agent.adapters.host import HostFacts
from agent.adapters.journal import Journal
from agent.adapters.keys import load_trusted_keys
from agent.adapters.log import add_sink, remove_sink
from agent.adapters.mqtt import MqttSession, Outgoing
from agent.adapters.sdnotify import notify, watchdog_interval
from agent.adapters.state import StateStore
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError, StateError
from agent.core.plan import client_layout
from agent.core.stackconfig import stack_settings
from agent.node import announce, recovery
from agent.node.fleet import Debouncer, Fleet
from agent.node.intake import (
    ConfigAccepted,
    ConfigRefused,
    Ignored,
    Rejected,
    accept,
    accept_config,
)
from agent.node.pipeline import Pipeline
from agent.node.publisher import Publisher
from agent.node.restart import restarter_for
from agent.node.worker import Work, Worker
from agent.protocol import InvalidMessage, Presence, Topics, encode, parse_message

log = structlog.get_logger(__name__)


class Daemon:
    """One agent on one instance; everything it owns is created here and closed in
    ``shutdown()``.

    Its size is composition (the constructor wires eight parts), the lifecycle and one
    short handler per topic; every decision lives in intake, fleet, worker or recovery.
    """

    def __init__(self, config: AgentConfig) -> None:
        if config.broker is None:
            raise ConfigError("`deploy-agent run` needs a broker section in the configuration")
        self.config = config
        self.topics = Topics(config.broker.topic_prefix, config.stack)
        self.store = StateStore(config.paths.state)
        self.journal = Journal(config.paths.state / "journal")
        self.facts = HostFacts.probe()
        self.trusted = load_trusted_keys(config.security.trusted_keys)
        state = self.store.load()
        # The newest signed stack configuration accepted survives a restart.
        self.stack_config: dict[str, Any] = dict(state.stack_config or config.stack_config)
        self.seen: set[str] = set(state.processed)
        self.started_at = announce.now()
        self.fleet = Fleet(self.presence())
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
        self.publisher = Publisher(config, self.session, self.topics)
        self.pipeline = Pipeline(
            config,
            store=self.store,
            restarter=restarter_for(config),
            members=self.fleet.members,
            stack_config=lambda: self.stack_config,
            facts=self.facts,
        )
        self.worker = Worker(
            config=config,
            pipeline=self.pipeline,
            journal=self.journal,
            store=self.store,
            publisher=self.publisher,
            template_context=lambda: self.fleet.template_context(
                stack=config.stack, stack_config=self.stack_config
            ),
            announce_presence=self.announce,
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
        recovery.recover(
            config=self.config,
            journal=self.journal,
            store=self.store,
            publisher=self.publisher,
            worker=self.worker,
            seen=self.seen,
        )
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
            asyncio.create_task(self.work(), name="worker"),
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
                delivered = await self.session.close(last=self.publisher.offline(), timeout=5)
                log.info("agent.offline_published", delivered=delivered)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Stop taking commands; let the running one finish within ``shutdown_grace``."""
        notify("STOPPING=1")
        idle = self.worker.idle
        log.info("agent.stopping", running=not idle.is_set(), grace=self.config.shutdown_grace)
        waits = [asyncio.create_task(idle.wait()), asyncio.create_task(self.force_exit.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.config.shutdown_grace, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                task.cancel()
        if not idle.is_set():
            log.error("agent.grace_expired", grace=self.config.shutdown_grace)

    async def shutdown(self) -> None:
        remove_sink(self.log_sink)
        log.info("agent.stopped")

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

    # -- the worker and liveness ----------------------------------------------------------
    async def work(self) -> None:
        await self.session.connected.wait()
        await asyncio.sleep(self.config.membership_debounce)  # let retained presence arrive
        if self.config.first_deploy:
            for item in recovery.first_deploys(self.config, self.fleet.presences().values()):
                self.worker.put(item)
        await self.worker.run(lambda: self.should_exit)

    async def watchdog(self) -> None:
        interval = watchdog_interval()
        while True:
            if interval is None:
                await asyncio.Event().wait()
            notify("WATCHDOG=1")
            await asyncio.sleep(interval or 60)

    async def connected_status(self) -> None:
        broker = self.config.broker
        assert broker is not None
        notify(f"STATUS=connected to {broker.host}:{broker.port}, idle")

    # -- presence -------------------------------------------------------------------------
    def presence(self) -> Presence:
        settings = stack_settings(self.stack_config)
        layout = client_layout(
            settings.plone_instances,
            cpu_count=self.facts.cpu_count,
            memory_mb=self.facts.memory_mb,
            layers=self.config.instance.layers,
        )
        return announce.presence(self.config, self.facts, layout, self.started_at)

    async def announce(self) -> None:
        """(Re)publish our presence: on every connect and after every command."""
        own = self.presence()
        self.fleet.apply(own.instance, own)
        self.publisher.presence(own)

    # -- routing --------------------------------------------------------------------------
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
            command_id = str(verdict.command.id) if verdict.command else None
            log.warning("command.rejected", reason=verdict.reason, command_id=command_id)
            self.publisher.event(
                verdict.command, phase="result", status="rejected", message=verdict.reason
            )
            return
        command = verdict.command
        if self.should_exit:
            log.info("command.deferred", command_id=str(command.id))
        try:
            self.journal.queued(command, verdict.run_as)
        except StateError as exc:
            # Nothing may run unjournaled; the operator hears why instead of nothing.
            log.error("command.not_journaled", command_id=str(command.id), reason=str(exc))
            self.publisher.event(
                command,
                phase="result",
                status="rejected",
                message=f"cannot journal the command, so it was not run: {exc}",
            )
            return
        self.seen.add(str(command.id))
        log.info("command.queued", command_id=str(command.id), run_as=verdict.run_as)
        self.publisher.event(
            command, phase="received", status="started", message=f"queued as {verdict.run_as}"
        )
        self.worker.put(Work(verdict.run_as, command))

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
                self.publisher.presence(self.presence())
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
        applied = self.store.load()
        verdict = accept_config(
            payload,
            config=self.config,
            trusted=self.trusted,
            now=announce.now(),
            applied=self.stack_config,
            applied_issued_at=applied.config_issued_at,
        )
        if isinstance(verdict, ConfigRefused):
            log.error("stack_config.rejected", reason=verdict.reason, issued_at=verdict.issued_at)
            return
        if not isinstance(verdict, ConfigAccepted):
            return
        log.info("stack_config.changed", issued_by=verdict.issued_by)
        self.stack_config = verdict.payload

        def remember(state: Any) -> None:
            state.config_issued_at = verdict.issued_at
            state.stack_config = verdict.payload

        self.store.update(remember)
        self.reconfigure.trigger()

    async def enqueue_configure(self) -> None:
        if not self.should_exit:
            self.worker.enqueue_configure()
