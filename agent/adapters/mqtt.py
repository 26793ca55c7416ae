"""The agent's one connection to the broker: connect, will, subscribe, outbox, reconnect.

Everything else publishes through ``MqttSession.publish`` (never blocks, never raises) and
receives through one handler called in arrival order. The session is persistent (fixed
client id, clean session off, MQTT 3.1.1), so QoS 1 commands sent while the agent was away
are delivered when it returns. Incoming QoS 1 messages are acknowledged only after the
handler returned: a command the daemon had not yet journaled when it died is delivered
again, never lost. Outgoing messages wait in a bounded outbox while the broker is
unreachable and are sent in order once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import threading
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog

from agent.adapters.configfile import read_secret
from agent.adapters.tls import client_context
from agent.core.config import BrokerConfig
from agent.core.errors import ConfigError

log = structlog.get_logger(__name__)

MessageHandler = Callable[[str, bytes, bool], Awaitable[None]]
ConnectHook = Callable[[], Awaitable[None]]
LogSink = Callable[[MutableMapping[str, Any]], None]
FORWARDED_LEVELS = frozenset({"info", "warning", "error", "critical"})


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(eq=False)
class _Entry:
    message: Outgoing
    done: asyncio.Future[bool] | None = None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class MqttSession:
    """Owns the broker connection: reconnects forever, keeps an outbox while it is down.

    One class on purpose: connect, will, subscriptions, outbox, log queue and reconnect
    share one connection state, and splitting them would spread that state around.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        will: Outgoing | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        clean_session: bool = False,
        max_outbox: int = 10_000,
        max_log_queue: int = 1_000,
        backoff: tuple[float, float] = (0.5, 30.0),
        timeout: float = 10.0,
        window: int = 16,
    ) -> None:
        if not clean_session and not client_id:
            raise ConfigError("a persistent MQTT session needs a fixed client id")
        self._broker = broker
        self._client_id = client_id
        self._will = will
        self._subscriptions = list(subscriptions)
        self._clean_session = clean_session
        self._password = read_secret(broker.password_file)
        self._tls = client_context(broker.tls)
        self._max_outbox = max(1, max_outbox)
        self._max_logs = max(1, max_log_queue)
        self._backoff = backoff
        self._timeout = timeout
        self._window = max(1, window)
        self._outbox: deque[_Entry] = deque()
        self._qos0_queued = 0
        self._logs: deque[Outgoing] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = asyncio.Event()
        self._overflow_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.connected = asyncio.Event()
        self.on_connect: list[ConnectHook] = []
        self.dropped = 0
        self.logs_dropped = 0

    def __repr__(self) -> str:
        broker = self._broker
        return f"<MqttSession {self._client_id!r} {broker.host}:{broker.port}>"

    # -- publishing ---------------------------------------------------------------------

    def publish(self, msg: Outgoing) -> None:
        """Queue ``msg``; it is sent in order as soon as (and whenever) the broker is reachable.

        Safe from any thread. When the outbox is full, QoS 0 messages go first, then the
        oldest; a warning is logged once per overflow.
        """
        if not self._call_in_loop(self._enqueue, _Entry(msg)):
            self.dropped += 1

    def publish_tracked(self, msg: Outgoing) -> asyncio.Future[bool]:
        """Queue ``msg``; the future is True once the broker confirmed it (however long
        that takes), False if it was dropped. Call from the session's loop."""
        entry = _Entry(msg, asyncio.get_running_loop().create_future())
        self._enqueue(entry)
        assert entry.done is not None
        return entry.done

    async def publish_now(self, msg: Outgoing, timeout: float) -> bool:
        """Queue ``msg`` and wait until the broker confirmed it; False after ``timeout``."""
        done = self.publish_tracked(msg)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(done)
        except TimeoutError:
            return False

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued message was confirmed (for a clean shutdown)."""
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    def log_sink(self, topic: str) -> LogSink:
        """A sink for ``agent.log.add_sink`` forwarding info-and-up events as QoS 0 JSON.

        Never blocks and never queues for long: events are dropped while disconnected
        and when the log queue is full.
        """

        def sink(event: MutableMapping[str, Any]) -> None:
            if event.get("level") not in FORWARDED_LEVELS:
                return
            if not self.connected.is_set() or len(self._logs) >= self._max_logs:
                self.logs_dropped += 1
                return
            payload = json.dumps(dict(event), default=str, ensure_ascii=False).encode()
            if not self._call_in_loop(self._enqueue_log, Outgoing(topic, payload, qos=0)):
                self.logs_dropped += 1

        return sink

    def _call_in_loop(self, function: Callable[[Any], None], item: Any) -> bool:
        """Run ``function(item)`` on the session's loop thread; False once that loop closed."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            function(item)
            return True
        try:
            loop.call_soon_threadsafe(function, item)
        except RuntimeError:  # the loop is closed: we are shutting down
            return False
        return True

    def _enqueue(self, entry: _Entry) -> None:
        if len(self._outbox) >= self._max_outbox:
            self._make_room(entry)
            if entry.message.qos == 0 and len(self._outbox) >= self._max_outbox:
                self._resolve(entry, sent=False)
                return
        self._outbox.append(entry)
        self._qos0_queued += entry.message.qos == 0
        self._drained.clear()
        self._wake.set()

    def _make_room(self, incoming: _Entry) -> None:
        """Drop the oldest QoS 0 message, else the oldest message (never QoS 1 for QoS 0)."""
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning("mqtt.outbox_full", size=len(self._outbox), topic=incoming.message.topic)
        self.dropped += 1
        if self._qos0_queued:
            victim = next(e for e in self._outbox if e.message.qos == 0)
        elif incoming.message.qos == 0:
            return
        else:
            victim = self._outbox[0]
        self._remove(victim)
        self._resolve(victim, sent=False)

    def _remove(self, entry: _Entry) -> None:
        if self._outbox and self._outbox[0] is entry:
            self._outbox.popleft()
        else:
            try:
                self._outbox.remove(entry)
            except ValueError:
                return
        self._qos0_queued -= entry.message.qos == 0
        if not self._outbox:
            self._overflow_logged = False
            self._drained.set()

    @staticmethod
    def _resolve(entry: _Entry, *, sent: bool) -> None:
        if entry.done is not None and not entry.done.done():
            entry.done.set_result(sent)

    def _enqueue_log(self, msg: Outgoing) -> None:
        if not self.connected.is_set() or len(self._logs) >= self._max_logs:
            self.logs_dropped += 1
            return
        self._logs.append(msg)
        self._wake.set()

    # -- the connection -----------------------------------------------------------------

    async def run(self, on_message: MessageHandler) -> None:
        """Stay connected until ``close()`` or cancellation, dispatching each message.

        Cancelling disconnects cleanly too, so the broker discards the will: publish the
        final presence with ``close(last=...)`` first.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        failures = 0
        while not self._closing.is_set():
            reason = "connection closed"
            try:
                await self._connect_and_serve(on_message, attempt=failures + 1)
            except aiomqtt.MqttError as exc:
                reason = _reason(exc)
            finally:
                was_connected = self._went_offline()
            if self._closing.is_set():
                break
            failures = 0 if was_connected else failures + 1
            delay = self._delay(failures)
            event = "mqtt.disconnected" if was_connected else "mqtt.connect_failed"
            log.warning(event, reason=reason, attempt=failures, retry_in=round(delay, 3))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._closing.wait()
        log.info("mqtt.closed", client_id=self._client_id, unsent=len(self._outbox))

    async def close(self, last: Outgoing | None = None, timeout: float = 5.0) -> bool:
        """Send ``last`` after everything queued, disconnect cleanly and end ``run()``.

        True when the broker confirmed all of it within ``timeout``. The clean disconnect
        means the will is not published, so ``last`` is where the offline presence goes.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            delivered = True
            if last is not None:
                delivered = await self.publish_now(last, timeout)
            remaining = max(0.0, deadline - asyncio.get_running_loop().time())
            return await self.flush(remaining) and delivered
        finally:
            self._closing.set()

    def _delay(self, failures: int) -> float:
        """Capped exponential backoff with full jitter, so a fleet does not reconnect at once."""
        base, cap = self._backoff
        return random.uniform(0, min(cap, base * 2 ** max(0, failures - 1)))  # noqa: S311

    def _went_offline(self) -> bool:
        """Mark the session offline; True when it had been connected."""
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.logs_dropped += len(self._logs)
        self._logs.clear()
        return was_connected

    def _client(self) -> aiomqtt.Client:
        will = None
        if self._will is not None:
            w = self._will
            will = aiomqtt.Will(w.topic, w.payload, w.qos, w.retain)
        client = aiomqtt.Client(
            self._broker.host,
            self._broker.port,
            username=self._broker.username,
            password=self._password,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=self._clean_session,
            keepalive=self._broker.keepalive,
            timeout=self._timeout,
            tls_context=self._tls,
            # Events are small: without this, Nagle and delayed ACKs add ~40 ms to each.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt 2.5 does not expose paho's manual acknowledgement; we ack after the
        # handler returned, so a message the agent did not journal is delivered again.
        client._client.manual_ack_set(True)
        client.pending_calls_threshold = self._window + 10
        return client

    async def _connect_and_serve(self, on_message: MessageHandler, attempt: int) -> None:
        async with self._client() as client:
            await self._subscribe(client)
            self.connected.set()
            log.info("mqtt.connected", client_id=self._client_id, attempt=attempt)
            tasks: list[asyncio.Task[Any]] = [
                asyncio.create_task(self._send_loop(client), name="mqtt-send"),
                asyncio.create_task(self._receive_loop(client, on_message), name="mqtt-receive"),
            ]
            try:
                await self._run_hooks()
                closing = asyncio.create_task(self._closing.wait(), name="mqtt-closing")
                tasks.append(closing)
                # The loops end only by failing; ``closing`` ends by ``close()``.
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """Subscribe again on every connect (cheap, and the broker resends retained state)."""
        if not self._subscriptions:
            return
        granted = await client.subscribe(self._subscriptions)
        for (topic, _), code in zip(self._subscriptions, granted, strict=False):
            if getattr(code, "is_failure", False) or code == 0x80:
                # An ACL refused it (clustered brokers say so; Mosquitto 2.0 grants and
                # filters at delivery): the agent runs on, loudly, without that topic.
                log.error("mqtt.subscribe_refused", topic=topic)

    async def _run_hooks(self) -> None:
        for hook in list(self.on_connect):
            try:
                await hook()
            except aiomqtt.MqttError:
                raise
            except Exception:
                log.exception("mqtt.on_connect_failed", hook=getattr(hook, "__name__", "?"))

    async def _receive_loop(self, client: aiomqtt.Client, on_message: MessageHandler) -> None:
        async for message in client.messages:
            topic = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else b""
            try:
                await on_message(topic, payload, message.retain)
            except Exception:
                # A handler bug must not stop the agent, nor make the broker redeliver
                # the same message forever.
                log.exception("mqtt.handler_failed", topic=topic)
            client._client.ack(message.mid, message.qos)

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            self._wake.clear()
            if self._outbox:
                await self._send_outbox(client)
            elif self._logs:
                batch = [self._logs.popleft() for _ in range(min(self._window, len(self._logs)))]
                await asyncio.gather(*(self._send(client, m) for m in batch))
            else:
                await self._wake.wait()

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        """Send a window of the outbox; remove each message only once the broker has it."""
        batch = list(itertools.islice(self._outbox, self._window))
        # Tasks start in creation order, so paho writes the messages in outbox order.
        results = await asyncio.gather(
            *(self._send(client, e.message) for e in batch), return_exceptions=True
        )
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            self._remove(entry)
            self._resolve(entry, sent=result)

    async def _send(self, client: aiomqtt.Client, msg: Outgoing) -> bool:
        """True once the broker has ``msg``; False when paho refuses it (bad topic, too big)."""
        try:
            await client.publish(msg.topic, msg.payload, msg.qos, msg.retain, timeout=self._timeout)
        except (ValueError, TypeError) as exc:
            # Retrying would refuse it again and block everything queued behind it.
            log.error("mqtt.publish_refused", topic=msg.topic, reason=_reason(exc))
            return False
        return True
