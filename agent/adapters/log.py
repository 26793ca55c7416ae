"""structlog set up once: JSON lines off a terminal (journald), readable lines on one.

Every event carries the context bound with ``bound_contextvars`` (instance, app, command_id,
phase). Secrets are redacted by key name before any renderer or forwarder sees them.
Stdlib logging (GitPython, paho) goes through the same processors.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from agent.core.redact import redact_value

#: Called with every event that reaches the output (after redaction), e.g. the MQTT forwarder.
Sink = Callable[[MutableMapping[str, Any]], None]
_sinks: list[Sink] = []


def redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key, value in list(event.items()):
        event[key] = redact_value(key, value)
    return event


def forward(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for sink in list(_sinks):
        try:
            sink(dict(event))
        except Exception:  # noqa: S112 - a broken forwarder must never break logging
            continue
    return event


def add_sink(sink: Sink) -> None:
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
        forward,
    ]


def configure_logging(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog and stdlib logging; ``json=None`` picks by whether it's a tty."""
    stream = stream or sys.stdout
    if json is None:
        json = not stream.isatty()
    renderer: Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for noisy in ("git", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
