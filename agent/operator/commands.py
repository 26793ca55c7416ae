"""The operator's commands: deploy/rollback over the broker, status, logs, config push.

Each command is one short clean MQTT session. What arrives from the broker is parsed with
the protocol's parsers and printed through ``agent.operator``'s sanitising renderers, so
whoever can publish to the stack cannot smuggle terminal escapes into the operator's tty.
How a rollout's progress is shown while waiting is ``agent/operator/views.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from agent.core.errors import ConfigError
from agent.core.exits import DEFAULT_CONFIG, EXIT_NO_INSTANCE, EXIT_OK
from agent.operator.config import (
    Inbox,
    OperatorConfig,
    collect_retained,
    connect,
    load_operator_config,
    load_stack_config,
    parse_event,
    parse_retained,
    signed_stack_config,
)
from agent.operator.display import (
    LogFilter,
    clean,
    render_log,
    render_releases,
    render_status,
    render_summary,
)
from agent.operator.rollouts import (
    Batch,
    RunReport,
    Tracker,
    plan_batches,
    select_targets,
    stop_reason,
)
from agent.operator.views import QuietView, make_view
from agent.protocol import (
    MAX_PAYLOAD_BYTES,
    Command,
    CommandKind,
    Presence,
    SignedConfig,
    StatusRecord,
    Topics,
    encode,
    sign_command,
)

LOGS_SECONDS = 2.0


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    """The operator config from --config, $DEPLOY_AGENT_CONFIG, the default file or env."""
    explicit = args.config or os.environ.get("DEPLOY_AGENT_CONFIG")
    path = Path(explicit or DEFAULT_CONFIG)
    return load_operator_config(path, explicit=bool(explicit), environ=os.environ)


# --- deploy and rollback ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """What the operator asked for, validated before anything is sent."""

    kind: CommandKind
    app: str
    fields: dict[str, Any]
    targets: list[str] | None
    batch_size: int | None
    max_failures: int
    timeout: float
    wait: bool


def rollout_from_args(kind: CommandKind, args: argparse.Namespace) -> Rollout:
    batch_size = 1 if getattr(args, "serial", False) else getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    fields: dict[str, Any] = {}
    if kind == "deploy":
        fields = {
            "revision": args.revision,
            "restart_delay": getattr(args, "restart_delay", None),
            "always_buildout": getattr(args, "always_buildout", False) or None,
        }
    elif kind == "restart":
        fields = {"restart_delay": getattr(args, "restart_delay", None)}
    else:
        fields = {
            "to_release": getattr(args, "to", None),
            "force": getattr(args, "force", False) or None,
        }
    return Rollout(
        kind=kind,
        app=args.app,
        fields=fields,
        targets=args.targets or None,
        batch_size=batch_size,
        max_failures=max(0, getattr(args, "max_failures", 0)),
        timeout=getattr(args, "timeout", 3600.0),
        wait=bool(args.wait or batch_size is not None),
    )


def build_command(
    config: OperatorConfig,
    rollout: Rollout,
    targets: Sequence[str] | None,
    key: Ed25519PrivateKey | None,
) -> Command:
    """A signed command (unsigned when no key is configured)."""
    fields = {k: v for k, v in rollout.fields.items() if v is not None}
    try:
        command = Command.create(
            rollout.kind,
            issued_by=config.issued_by,
            now=datetime.now(UTC),
            app=rollout.app,
            targets=list(targets) if targets else None,
            stack=config.stack,
            **fields,
        )
    except ValidationError as exc:
        problems = [".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors()]
        raise ConfigError(f"invalid {rollout.kind} command", problems) from None
    return sign_command(command, key) if key is not None else command


async def run_rollout(
    config: OperatorConfig, rollout: Rollout, key: Ed25519PrivateKey | None, view: QuietView
) -> RunReport:
    """Read presences, then send batch after batch, following each one's events."""
    topics, loop = config.topics, asyncio.get_running_loop()
    report = RunReport(kind=rollout.kind, app=rollout.app, waited=rollout.wait)
    async with connect(config) as client, Inbox(client) as inbox:
        await client.subscribe(topics.instances_wildcard, qos=1)
        presences, _ = parse_retained(topics, await collect_retained(inbox))
        selection = select_targets(presences, rollout.targets)
        if not selection.online:
            report.message = _nobody_message(config, rollout, selection.offline)
            return report
        await client.subscribe(topics.events_wildcard, qos=1)  # before any command is sent
        report.batches = [
            Batch(index=n, instances=ids)
            for n, ids in enumerate(plan_batches(selection.online, rollout.batch_size), 1)
        ]
        deadline = loop.time() + rollout.timeout
        for batch in report.batches:
            reason = stop_reason(report, rollout.max_failures) or (
                "stopped: --timeout reached" if loop.time() >= deadline else None
            )
            if reason:
                batch.state, report.message = "skipped", report.message or reason
                continue
            targets = rollout.targets if rollout.batch_size is None else batch.instances
            command = build_command(config, rollout, targets, key)
            tracker = Tracker(command.id, batch.instances, batch=batch.index, now=loop.time())
            await client.publish(topics.commands, encode(command), qos=1)
            batch.command_id, batch.state = str(command.id), "ran"
            if rollout.wait:
                view.sent(batch, len(report.batches))
                await follow(inbox, topics, tracker, deadline, view)
                report.results.extend(tracker.results())
    return report


async def follow(
    inbox: Inbox, topics: Topics, tracker: Tracker, deadline: float, view: QuietView
) -> None:
    """Feed events to the tracker until every instance answered or the deadline passed."""
    loop = asyncio.get_running_loop()
    while not tracker.done and loop.time() < deadline:
        message = await inbox.get(min(view.tick_seconds, deadline - loop.time()))
        event = parse_event(topics, message) if message is not None else None
        progress = tracker.feed(event, loop.time()) if event is not None else None
        view.update(tracker, progress, loop.time())
    if not tracker.done:
        tracker.expire(loop.time())
    view.finish(tracker, loop.time())


def _nobody_message(config: OperatorConfig, rollout: Rollout, offline: Sequence[str]) -> str:
    wanted = " ".join(rollout.targets) if rollout.targets else f"stack {config.stack}"
    text = f"no online instance matches {wanted}"
    return text + (f" (offline: {', '.join(offline)})" if offline else "")


def _remote(kind: CommandKind, args: argparse.Namespace) -> int:
    config = operator_config(args)
    rollout = rollout_from_args(kind, args)
    key = config.private_key()
    build_command(config, rollout, rollout.targets, key)  # bad arguments fail before connecting
    if key is None:
        print(
            "deploy-agent: no signing key configured; agents that require signatures "
            "will reject this command",
            file=sys.stderr,
        )
    view = make_view(json_output=args.json, stream=sys.stdout)
    report = asyncio.run(run_rollout(config, rollout, key, view))
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    elif summary := render_summary(report, color=sys.stdout.isatty()):
        print(summary)
    if report.exit_code == EXIT_NO_INSTANCE:
        print(f"deploy-agent: {report.message or 'no instance answered'}", file=sys.stderr)
    return report.exit_code


def remote_deploy(args: argparse.Namespace, config_path: Path | None = None) -> int:
    """``deploy APP`` without --local: publish to the stack and, with --wait, follow it.

    ``config_path`` is accepted for the caller's convenience; the file is found the same
    way from ``args`` (--config, $DEPLOY_AGENT_CONFIG, the default path, the environment).
    """
    return _remote("deploy", args)


def remote_rollback(args: argparse.Namespace, config_path: Path | None = None) -> int:
    """``rollback APP`` without --local."""
    return _remote("rollback", args)


def remote_restart(args: argparse.Namespace, config_path: Path | None = None) -> int:
    """``restart APP`` without --local: a rolling restart of the live release everywhere."""
    return _remote("restart", args)


# --- status -----------------------------------------------------------------------------


async def read_fleet(config: OperatorConfig) -> tuple[dict[str, Presence], dict[str, StatusRecord]]:
    async with connect(config) as client, Inbox(client) as inbox:
        await client.subscribe(
            [(config.topics.instances_wildcard, 1), (config.topics.status_wildcard, 1)]
        )
        return parse_retained(config.topics, await collect_retained(inbox))


def cmd_status(args: argparse.Namespace) -> int:
    """Fleet table from the retained presences and status records."""
    config = operator_config(args)
    presences, statuses = asyncio.run(read_fleet(config))
    if args.json:
        instances = {
            i: {
                "presence": p.model_dump(mode="json"),
                "status": statuses[i].model_dump(mode="json") if i in statuses else None,
            }
            for i, p in sorted(presences.items())
        }
        print(json.dumps({"stack": config.stack, "instances": instances}, indent=2, sort_keys=True))
    else:
        print(render_status(presences, statuses, now=datetime.now(UTC), color=sys.stdout.isatty()))
    if not presences:
        print(
            f"deploy-agent: no instance has announced itself on stack {config.stack}",
            file=sys.stderr,
        )
        return EXIT_NO_INSTANCE
    return EXIT_OK


def remote_releases(args: argparse.Namespace) -> int:
    """``releases APP`` without --local: each instance's releases of the app, from the
    presences (an agent announces them after every command)."""
    config = operator_config(args)
    presences, _ = asyncio.run(read_fleet(config))
    found = {
        instance: [row.model_dump(mode="json") for row in presence.apps[args.app].releases]
        for instance, presence in sorted(presences.items())
        if args.app in presence.apps
    }
    if args.json:
        print(json.dumps({"app": args.app, "instances": found}, indent=2, sort_keys=True))
    else:
        for instance, rows in found.items():
            state = presences[instance].state
            print(f"{clean(instance, 64)} ({clean(state, 16)})\n{render_releases(rows)}\n")
    if not found:
        print(f"deploy-agent: no instance of stack {config.stack} runs {args.app}", file=sys.stderr)
        return EXIT_NO_INSTANCE
    return EXIT_OK


# --- logs -------------------------------------------------------------------------------


def parse_log(payload: Any) -> dict[str, Any] | None:
    """A forwarded log event as a dict, or None for anything else (never raises)."""
    if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


async def stream_logs(
    config: OperatorConfig, wanted: LogFilter, *, follow: bool, json_output: bool, color: bool
) -> None:
    loop = asyncio.get_running_loop()
    async with connect(config) as client, Inbox(client) as inbox:
        await client.subscribe(config.topics.logs_wildcard, qos=0)
        end = None if follow else loop.time() + LOGS_SECONDS
        while end is None or loop.time() < end:
            message = await inbox.get(1.0 if end is None else end - loop.time())
            if message is None:
                continue
            instance = config.topics.instance_id(str(message.topic))
            event = parse_log(message.payload)
            if instance is None or event is None or not wanted.accepts(instance, event):
                continue
            if json_output:
                print(json.dumps({**event, "instance": instance}, sort_keys=True), flush=True)
            else:
                print(render_log(instance, event, color=color), flush=True)


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the fleet's forwarded log events (for ~2 s, or until Ctrl-C with -f)."""
    config = operator_config(args)
    wanted = LogFilter(instance=args.instance, app=args.app, level=args.level)
    tty = sys.stdout.isatty()
    with contextlib.suppress(KeyboardInterrupt):  # -f ends with Ctrl-C, and that is fine
        asyncio.run(
            stream_logs(
                config, wanted, follow=args.follow, json_output=args.json or not tty, color=tty
            )
        )
    return EXIT_OK


# --- config push ------------------------------------------------------------------------


async def publish_config(config: OperatorConfig, signed: SignedConfig) -> None:
    async with connect(config) as client:
        await client.publish(config.topics.config, encode(signed), qos=1, retain=True)


def cmd_config_push(args: argparse.Namespace) -> int:
    """Validate, sign and publish the stack configuration, retained, to ``P/config``."""
    config = operator_config(args)
    signed = signed_stack_config(config, load_stack_config(Path(args.file), config.stack))
    asyncio.run(publish_config(config, signed))
    signer = signed.key_id or "unsigned"
    print(
        f"published the stack configuration of {config.stack} to {config.topics.config} "
        f"({len(signed.payload)} top-level keys, {signer})"
    )
    return EXIT_OK


# --- argparse ---------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="operator or agent configuration (default "
        f"{DEFAULT_CONFIG}, $DEPLOY_AGENT_CONFIG, else DEPLOY_AGENT_* vars)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_operator_arguments(subparsers: Any) -> None:
    """Add ``status`` and ``logs`` to the command line's subparsers."""
    status = subparsers.add_parser("status", help="fleet table from the retained topics")
    _common(status)
    status.set_defaults(func=cmd_status)
    logs = subparsers.add_parser("logs", help="the fleet's structured log events")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until Ctrl-C")
    logs.add_argument("--instance", help="only this instance")
    logs.add_argument("--app", help="only this app")
    logs.add_argument("--level", default="info", help="minimum level (default info)")
    _common(logs)
    logs.set_defaults(func=cmd_logs)


def add_config_push(config_subparsers: Any) -> None:
    """Add ``config push FILE`` under the ``config`` command."""
    push = config_subparsers.add_parser("push", help="sign and publish the stack configuration")
    push.add_argument(
        "file", help="an agent configuration (its stack_config is published) or a stack-config YAML"
    )
    _common(push)
    push.set_defaults(func=cmd_config_push)
