"""``deploy-agent run``: the long-running agent (docs/architecture.md, "Wire protocol").

``Daemon.serve()`` tells the whole story: ``startup()`` (recovery), ``main_loop()`` (broker
session, worker, membership reconfigure, watchdog) and ``shutdown()`` (stop taking
commands, let the running one reach its end within the grace period, say ``stopped``, or
``leaving`` when the host shuts down or ``deploy-agent leave`` asked). Signals only set
flags (and start the shutdown probe). The daemon composes and routes; intake, the worker,
the publisher, the journal and recovery each own their job in their own module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from agent.adapters.files import atomic_write
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
from agent.protocol import InvalidMessage, Presence, PresenceState, Topics, encode, parse_message

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
        self.pins_path = config.paths.state / "fleet.json"
        self.saved_pins = load_pins(self.pins_path)
        own = self.presence()
        self.fleet = Fleet(own, member_timeout=config.member_timeout, pins=self.saved_pins)
        self.fleet.configure(stack_settings(self.stack_config))
        self.fleet.begin_sync()  # nothing is compared before the first replay is over
        self.synced = asyncio.Event()
        self.sync_token: bytes | None = None
        self.sync_generation = 0
        self.fleet_woken = asyncio.Event()
        self.should_exit = False
        #: Set when this instance is being removed: the last word is ``leaving``.
        self.leaving = False
        self.shutdown_probe: asyncio.Task[bool] | None = None
        self.exit_requested = asyncio.Event()
        self.force_exit = asyncio.Event()
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
            announce_presence=self.announce,
        )
        self.session.on_connect.append(self.begin_sync)
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
            asyncio.create_task(self.expiry(), name="member-timeout"),
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
            # The last word goes out while the session still runs: a clean disconnect
            # discards the Last Will, so nobody else would say it.
            if not mqtt.done():
                state = await self.final_state()
                last = Outgoing(
                    self.publisher.own_topic,
                    encode(announce.final(self.presence(), state)),
                    qos=1,
                    retain=True,
                )
                delivered = await self.session.close(last=last, timeout=5)
                log.info("agent.offline_published", state=state, delivered=delivered)
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
        if not self.should_exit and self.config.shutdown_probe:
            # Asked now, while systemd still says why we are being stopped.
            self.shutdown_probe = asyncio.get_running_loop().create_task(
                host_shutting_down(self.config.shutdown_probe), name="shutdown-probe"
            )
        self.should_exit = True
        self.exit_requested.set()

    async def final_state(self) -> PresenceState:
        """``leaving`` when the instance is being removed (``deploy-agent leave``, or the
        host shutting down), else ``stopped``: the services keep running."""
        if self.leaving:
            return "leaving"
        if self.shutdown_probe is not None:
            try:
                if await asyncio.wait_for(asyncio.shield(self.shutdown_probe), timeout=5):
                    log.info("agent.host_shutting_down")
                    return "leaving"
            except (TimeoutError, OSError):
                log.warning("agent.shutdown_probe_failed")
        return "stopped"

    # -- the worker and liveness ----------------------------------------------------------
    async def work(self) -> None:
        await self.synced.wait()  # the broker replayed every retained presence
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

    async def expiry(self) -> None:
        """Re-check ``member_timeout`` when the next resting member is due, or when a
        presence changed who is due."""
        while True:
            wait = self.fleet.next_expiry()
            self.fleet_woken.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if wait is None else wait + 0.05):
                    await self.fleet_woken.wait()
            if self.fleet.expire():
                log.info("fleet.member_expired", timeout=self.config.member_timeout)
                self.membership_changed()

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
        """(Re)publish our presence: on every connect and after every command. Until a
        sync is over, its echo is the barrier: it comes back after every retained
        presence the broker replays for our subscription."""
        own = self.presence()
        if self.fleet.apply(own.instance, own):
            self.membership_changed()
        self.sync_token = encode(own)
        self.publisher.presence(own)

    async def begin_sync(self) -> None:
        """A (re)connect: compare nothing until the broker replayed retained presences."""
        self.fleet.begin_sync()
        self.sync_generation += 1
        generation = self.sync_generation
        broker = self.config.broker
        assert broker is not None
        # Only bounds a broker that never echoes us (an ACL without read of our own
        # presence): then we stop waiting, loudly.
        asyncio.get_running_loop().call_later(
            max(10.0, broker.keepalive * 2.0), self.sync_timeout, generation
        )

    def sync_timeout(self, generation: int) -> None:
        if generation == self.sync_generation and not self.fleet.synced:
            log.warning("fleet.barrier_timeout", hint="our own presence never came back")
            self.end_sync()

    def end_sync(self) -> None:
        changed = self.fleet.end_sync()
        log.info("fleet.synced", changed=changed, members=len(self.fleet.presences()))
        self.synced.set()
        if changed:
            self.membership_changed()

    def membership_changed(self) -> None:
        self.save_pins()
        self.fleet_woken.set()
        self.reconfigure.trigger()

    def save_pins(self) -> None:
        pins = self.fleet.pins()
        if pins == self.saved_pins:
            return
        try:
            atomic_write(self.pins_path, json.dumps({"pins": pins}, sort_keys=True).encode())
        except OSError as exc:
            log.error("fleet.pins_not_saved", reason=str(exc))
            return
        self.saved_pins = pins

    # -- routing --------------------------------------------------------------------------
    async def on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic == self.topics.commands:
            self.on_command(payload)
        elif topic == self.topics.config:
            self.on_config(payload)
        elif (instance := self.topics.instance_id(topic)) is not None:
            self.on_presence(instance, payload, retain)

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

    def on_presence(self, instance: str, payload: bytes, retain: bool = True) -> None:
        if instance == self.config.instance.id:
            self.on_own_presence(payload, retain)
            return
        presence = None
        if payload:
            try:
                presence = parse_message(Presence, payload)
            except InvalidMessage as exc:
                log.warning("presence.invalid", instance=instance, reason=str(exc))
                return
        if self.fleet.apply(instance, presence):
            log.info(
                "fleet.changed",
                instance=instance,
                state=presence.state if presence else "cleared",
                online=self.fleet.online_count(),
            )
            self.membership_changed()
        else:
            self.fleet_woken.set()  # a member may have started resting: a new expiry

    def on_own_presence(self, payload: bytes, retain: bool) -> None:
        if not self.fleet.synced and not retain and payload == self.sync_token:
            self.end_sync()  # our echo: every retained presence was delivered before it
            return
        if self.should_exit:
            return
        presence = None
        if payload:
            try:
                presence = parse_message(Presence, payload)
            except InvalidMessage as exc:
                log.warning("presence.invalid", instance=self.config.instance.id, reason=str(exc))
        if presence is not None and presence.state == "online":
            if payload != self.sync_token:
                # Not what we said last (an older echo, or someone else with our account):
                # the retained presence must be ours.
                log.info("presence.own_corrected")
                self.republish()
            return
        if (
            presence is not None
            and presence.state == "leaving"
            and presence.since >= self.started_at
        ):
            # `deploy-agent leave` while we run: go, and say leaving as we do.
            log.warning("agent.leave_requested", since=presence.since.isoformat())
            self.leaving = True
            self.should_exit = True
            self.exit_requested.set()
            return
        # A Last Will (ours, late, or a previous run's), a stale leave or a cleared
        # presence: we are here, say so.
        self.republish()

    def republish(self) -> None:
        own = self.presence()
        self.sync_token = encode(own)
        self.publisher.presence(own)

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
        self.save_pins()

        def remember(state: Any) -> None:
            state.config_issued_at = verdict.issued_at
            state.stack_config = verdict.payload

        self.store.update(remember)
        self.reconfigure.trigger()

    async def enqueue_configure(self) -> None:
        if not self.should_exit:
            self.worker.enqueue_configure()


def load_pins(path: Path) -> dict[str, str]:
    """The service members this agent pinned before it restarted (none when unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("fleet.pins_unreadable", path=str(path), reason=str(exc))
        return {}
    pins = data.get("pins") if isinstance(data, dict) else None
    if not isinstance(pins, dict):
        return {}
    return {str(k): str(v) for k, v in pins.items() if isinstance(v, str)}


async def host_shutting_down(argv: list[str]) -> bool:
    """True when ``argv`` (``systemctl is-system-running``) says ``stopping``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return False  # no systemd here: a plain stop
    try:
        async with asyncio.timeout(5):
            output, _ = await proc.communicate()
    except TimeoutError:
        return False
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return output.decode(errors="replace").strip() == "stopping"
