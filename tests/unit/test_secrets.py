"""Secrets (passwords, tokens, private keys) never reach a log line or an event."""

from __future__ import annotations

import io
import json

import structlog

from agent.adapters.log import configure_logging
from agent.core.config import parse_config
from agent.node import announce

CONFIG = parse_config(
    {
        "stack": "s",
        "instance": {"id": "web-1", "address": "10.0.0.1"},
        "apps": {"a": {"repository": "/r.git"}},
    }
)


def test_log_lines_mask_url_passwords_and_redact_secret_keys():
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    try:
        structlog.get_logger("t").info(
            "x",
            url="https://bob:hunter2@git.example.org/r.git",
            broker_password="hunter2",
            token="hunter2",
            private_key="-----BEGIN",
            key_id="SHA256:abc",
        )
    finally:
        configure_logging(json=True)
    line = json.loads(out.getvalue().splitlines()[-1])
    assert "hunter2" not in out.getvalue() and "BEGIN" not in out.getvalue()
    assert line["url"] == "https://bob:***@git.example.org/r.git"
    assert line["key_id"] == "SHA256:abc"  # an identifier, not a secret


def test_events_mask_url_passwords_in_messages_and_details():
    event = announce.event(
        CONFIG,
        None,
        phase="fetch",
        status="progress",
        kind="deploy",
        message="fetching https://bob:hunter2@git.example.org/r.git",
        details={
            "remote": "ssh://deploy:hunter2@h/r",
            "password": "hunter2",
            "nested": {"secret": "hunter2"},
        },
    )
    text = event.model_dump_json()
    assert "hunter2" not in text
    assert "bob:***@git.example.org" in event.message
