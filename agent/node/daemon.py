"""``deploy-agent run``: the long-running agent (docs/architecture.md, "Wire protocol").

``Daemon.serve()`` tells the whole story: ``startup()`` (recovery), ``main_loop()`` (broker
session, worker, membership reconfigure, watchdog) and ``shutdown()`` (stop taking
commands, let the running one reach its end within the grace period, say ``stopped``, or
``leaving`` when the host shuts down or ``deploy-agent leave`` asked). The daemon composes
and routes; intake, the worker, the publisher, the journal, recovery, the membership
(``agent/node/membership.py``: presence, barrier, roster, pins) and stopping
(``agent/node/stopping.py``: signals, grace, the last word) each own their job in their
own module.
"""

from __future__ import annotations

import asyncio
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
from agent.core.stackconfig import stack_settings
from agent.node import announce, recovery
from agent.node.fleet import Debouncer
from agent.node.intake import (
    ConfigAccepted,
    ConfigRefused,
    Ignored,
    Rejected,
    accept,
    accept_config,
)
from agent.node.membership import Membership, own_presence
from agent.node.pipeline import Pipeline
from agent.node.publisher import Publisher
from agent.node.restart import restarter_for
from agent.node.stopping import Stopping
from agent.node.worker import Work, Worker
from agent.protocol import Topics, encode

log = structlog.get_logger(__name__)


class Daemon:
    """One agent on one instance; everything it owns is created here and closed in
    ``shutdown()``.

    Its size is composition (the constructor wires its parts), the lifecycle and one short
    handler per topic; every decision lives in intake, membership, fleet, worker, stopping
    or recovery.
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
        own = own_presence(config, self.facts, self.stack_config, self.started_at)
        self.stop = Stopping(config)
        self.session = MqttSession(
            config.broker,
            client_id=config.broker.client_id
            or f"deploy-agent-{config.stack}-{config.instance.id}",
            will=Outgoing(
                self.topics.instance(config.instance.id),
                encode(announce.will(own)),
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
        self.reconfigure = Debouncer(
            config.membership_debounce, self.enqueue_configure, name="membership"
        )
        self.membership = Membership(
            config,
            own,
            facts=self.facts,
            stack_config=lambda: self.stack_config,
            started_at=self.started_at,
            publisher=self.publisher,
            reconfigure=self.reconfigure,
            stopping=lambda: self.stop.requested,
            leave=self.stop.leave,
        )
        self.fleet = self.membership.fleet
        self.pipeline = Pipeline(
            config,
            store=self.store,
            restarter=restarter_for(config),
            members=self.fleet.members,
            stack_config=lambda: self.stack_config,
            facts=self.facts,
            pins=self.fleet.pins,
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
            announce_presence=self.membership.announce,
        )
        self.session.on_connect.append(self.membership.begin_sync)
        self.session.on_connect.append(self.membership.announce)
        self.session.on_connect.append(self.connected_status)
        self.log_sink = self.session.log_sink(self.topics.logs(config.instance.id))

    # -- the story ------------------------------------------------------------------------
    async def serve(self) -> int:
        with self.stop.capture_signals():
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
            asyncio.create_task(self.membership.expiry(), name="member-timeout"),
        ]
        notify("READY=1", "STATUS=connecting to the broker")
        try:
            stopper = asyncio.create_task(self.stop.asked.wait(), name="exit")
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    task.result()  # a crashed task is a bug: surface it
            await self.stop.drain(self.worker.idle)
        finally:
            worker, mqtt = tasks[1], tasks[0]
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            await self.reconfigure.close()
            # The last word goes out while the session still runs: a clean disconnect
            # discards the Last Will, so nobody else would say it.
            if not mqtt.done():
                state = await self.stop.final_state()
                last = Outgoing(
                    self.publisher.own_topic,
                    encode(announce.final(self.membership.presence(), state)),
                    qos=1,
                    retain=True,
                )
                delivered = await self.session.close(last=last, timeout=5)
                log.info("agent.offline_published", state=state, delivered=delivered)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown(self) -> None:
        remove_sink(self.log_sink)
        log.info("agent.stopped")

    # -- the worker and liveness ----------------------------------------------------------
    async def work(self) -> None:
        await self.membership.synced.wait()  # the broker replayed every retained presence
        if self.config.first_deploy:
            for item in recovery.first_deploys(self.config, self.fleet.presences().values()):
                self.worker.put(item)
        await self.worker.run(lambda: self.stop.requested)

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

    # -- routing --------------------------------------------------------------------------
    async def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.topics.commands:
            self.on_command(payload)
        elif topic == self.topics.config:
            self.on_config(payload)
        elif (instance := self.topics.instance_id(topic)) is not None:
            self.membership.on_presence(instance, payload, retain)

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
        if self.stop.requested:
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
        self.fleet.configure(stack_settings(self.stack_config))
        self.membership.save_pins()

        def remember(state: Any) -> None:
            state.config_issued_at = verdict.issued_at
            state.stack_config = verdict.payload

        self.store.update(remember)
        self.reconfigure.trigger()

    async def enqueue_configure(self) -> None:
        if not self.stop.requested:
            self.worker.enqueue_configure()
