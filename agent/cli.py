"""The ``deploy-agent`` command line.

Exit codes: 0 success (or nothing to do), 1 a command failed, 2 bad usage or configuration,
3 timed out, 4 no instance answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent import __version__
from agent.adapters.configfile import load_config
from agent.adapters.log import configure_logging
from agent.core.config import AgentConfig
from agent.core.errors import AgentError, BrokerUnreachable, ConfigError
from agent.core.exits import DEFAULT_CONFIG, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from agent.operator.display import render_releases

if TYPE_CHECKING:  # imported lazily: `config check` should not pay for GitPython
    from agent.node.pipeline import Pipeline

log = structlog.get_logger("agent.cli")


def config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("DEPLOY_AGENT_CONFIG") or DEFAULT_CONFIG)


def local_pipeline(config: AgentConfig) -> Pipeline:
    """The pipeline of this host, with supervisord restarts when supervisor is configured."""
    from agent.node.pipeline import Pipeline
    from agent.node.restart import restarter_for

    return Pipeline(config, restarter=restarter_for(config))


def print_outcome(outcome: object, *, as_json: bool) -> None:
    data = asdict(outcome)  # type: ignore[call-overload]
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    print(f"{data['kind']} {data['app']}: {data['status']} - {data['message']}")
    for key in ("decision", "revision", "release"):
        if data.get(key):
            print(f"  {key}: {data[key]}")
    print(f"  seconds: {data['seconds']}")


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: JSON lines on stdout for journald, unless stdout is a terminal."""
    config = load_config(config_path(args))
    configure_logging(level=args.log_level, stream=sys.stdout)
    from agent.node.daemon import Daemon

    return asyncio.run(Daemon(config).serve())


def cmd_deploy(args: argparse.Namespace) -> int:
    if not args.local:  # the operator's config may be an operator file, not an agent config
        from agent.operator.commands import remote_deploy

        return remote_deploy(args, config_path(args))
    config = load_config(config_path(args))
    pipeline = local_pipeline(config)
    outcome = asyncio.run(
        pipeline.deploy(
            args.app,
            revision=args.revision,
            restart_delay=args.restart_delay,
            always_buildout=args.always_buildout or None,
        )
    )
    print_outcome(outcome, as_json=args.json)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def cmd_rollback(args: argparse.Namespace) -> int:
    if not args.local:
        from agent.operator.commands import remote_rollback

        return remote_rollback(args, config_path(args))
    config = load_config(config_path(args))
    outcome = asyncio.run(
        local_pipeline(config).rollback(args.app, to_release=args.to, force=args.force)
    )
    print_outcome(outcome, as_json=args.json)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def cmd_restart(args: argparse.Namespace) -> int:
    """A rolling, health-gated restart of the live release, building nothing."""
    if not args.local:
        from agent.operator.commands import remote_restart

        return remote_restart(args, config_path(args))
    config = load_config(config_path(args))
    outcome = asyncio.run(
        local_pipeline(config).restart(args.app, restart_delay=args.restart_delay)
    )
    print_outcome(outcome, as_json=args.json)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def cmd_releases(args: argparse.Namespace) -> int:
    """The releases of an app, oldest first; ``*`` marks ``current``. With --local, this
    host's; otherwise every instance's, as their presences on the broker list them."""
    if not args.local:
        from agent.operator.commands import remote_releases

        return remote_releases(args)
    from agent.adapters.releases import ReleaseManager

    config = load_config(config_path(args))
    rows = ReleaseManager.of(config, args.app).listing()
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    print(render_releases(rows))
    return EXIT_OK


def cmd_configure(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    pipeline = local_pipeline(config)
    apps = [args.app] if args.app else [a for a in config.apps if config.carries(a)]
    worst = EXIT_OK
    for app in apps:
        outcome = asyncio.run(pipeline.configure(app))
        print_outcome(outcome, as_json=args.json)
        worst = worst if outcome.ok else EXIT_FAILED
    return worst


def cmd_leave(args: argparse.Namespace) -> int:
    """Say this instance is being removed: a retained ``leaving`` presence, after which
    every agent takes its endpoints out of rendered configuration (HAProxy backends, the
    ZEO server once another one is there). A running agent of this instance sees it and
    stops. Its services are not touched: stop them once the others have reconfigured."""
    config = load_config(config_path(args))
    if config.broker is None:
        raise ConfigError("`deploy-agent leave` needs a broker section in the configuration")
    delivered = asyncio.run(publish_leaving(config, timeout=args.timeout))
    if not delivered:
        broker = config.broker
        raise BrokerUnreachable(
            f"the broker at {broker.host}:{broker.port} did not confirm the leaving presence "
            f"within {args.timeout:g} s"
        )
    print(f"{config.instance.id}: leaving (stack {config.stack})")
    return EXIT_OK


async def publish_leaving(config: AgentConfig, *, timeout: float) -> bool:
    from agent.adapters.mqtt import MqttSession, Outgoing
    from agent.node.announce import leaving
    from agent.protocol import Topics, encode

    assert config.broker is not None
    topics = Topics(config.broker.topic_prefix, config.stack)
    session = MqttSession(
        config.broker,
        client_id=f"deploy-agent-leave-{config.stack}-{config.instance.id}",
        clean_session=True,
        backoff=(0.2, 2.0),
    )
    runner = asyncio.create_task(session.run(_ignore), name="mqtt")
    message = Outgoing(
        topics.instance(config.instance.id), encode(leaving(config)), qos=1, retain=True
    )
    try:
        return await session.close(last=message, timeout=timeout)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _ignore(topic: str, payload: bytes, retain: bool) -> None:
    return None


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file, probe_host=False)
    from agent.core.stackconfig import stack_settings

    stack_settings(config.stack_config)
    apps = ", ".join(sorted(config.apps)) or "none"
    print(f"{args.file}: OK (stack {config.stack}, instance {config.instance.id}, apps: {apps})")
    return EXIT_OK


def cmd_keys_generate(args: argparse.Namespace) -> int:
    import getpass
    import socket

    from agent.adapters.keys import generate_keypair

    comment = args.comment or f"{getpass.getuser()}@{socket.gethostname()}"
    key = generate_keypair(Path(args.output), comment=comment, force=args.force)
    print(f"private key: {key.private_path} (mode 0600: keep it secret)")
    print(f"public key:  {key.public_path} (add it to security.trusted_keys on every agent)")
    print(f"key id:      {key.key_id}")
    return EXIT_OK


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help=f"agent configuration (default {DEFAULT_CONFIG} or $DEPLOY_AGENT_CONFIG)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_rollout_options(parser: argparse.ArgumentParser) -> None:
    batches = parser.add_mutually_exclusive_group()
    batches.add_argument("--batch-size", type=int, help="instances per batch (implies --wait)")
    batches.add_argument("--serial", action="store_true", help="one instance at a time")
    parser.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="stop rolling once more instances than this failed",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deploy-agent {__version__}")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the agent daemon (systemd runs this)")
    run.add_argument("--config", "-c", help=f"agent configuration (default {DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)

    deploy = sub.add_parser("deploy", help="deploy an app (--local: on this host, no broker)")
    deploy.add_argument("app")
    deploy.add_argument("--revision", "-r")
    deploy.add_argument("--local", action="store_true")
    deploy.add_argument("--wait", action="store_true")
    deploy.add_argument("--restart-delay", type=float)
    deploy.add_argument("--always-buildout", action="store_true")
    add_rollout_options(deploy)
    deploy.add_argument("--timeout", type=float, default=3600)
    deploy.add_argument("--targets", nargs="*")
    add_common(deploy)
    deploy.set_defaults(func=cmd_deploy)

    rollback = sub.add_parser("rollback", help="switch an app back to an earlier release")
    rollback.add_argument("app")
    rollback.add_argument(
        "--to",
        help="release name, or a revision (sha, tag, branch: its newest good release); "
        "default: the newest good release before current",
    )
    rollback.add_argument("--force", action="store_true", help="allow --to a release marked bad")
    rollback.add_argument("--local", action="store_true")
    rollback.add_argument("--wait", action="store_true")
    add_rollout_options(rollback)
    rollback.add_argument("--timeout", type=float, default=3600)
    rollback.add_argument("--targets", nargs="*")
    add_common(rollback)
    rollback.set_defaults(func=cmd_rollback)

    restart = sub.add_parser("restart", help="rolling restart of an app's live release")
    restart.add_argument("app")
    restart.add_argument("--local", action="store_true")
    restart.add_argument("--wait", action="store_true")
    restart.add_argument("--restart-delay", type=float)
    add_rollout_options(restart)
    restart.add_argument("--timeout", type=float, default=3600)
    restart.add_argument("--targets", nargs="*")
    add_common(restart)
    restart.set_defaults(func=cmd_restart)

    releases = sub.add_parser("releases", help="list an app's releases, per instance")
    releases.add_argument("app")
    releases.add_argument("--local", action="store_true", help="this host's releases")
    add_common(releases)
    releases.set_defaults(func=cmd_releases)

    configure = sub.add_parser("configure", help="re-render deploy.cfg here, apply if changed")
    configure.add_argument("app", nargs="?")
    add_common(configure)
    configure.set_defaults(func=cmd_configure)

    leave = sub.add_parser(
        "leave", help="announce that this instance is being removed from the stack"
    )
    leave.add_argument("--config", "-c", help=f"agent configuration (default {DEFAULT_CONFIG})")
    leave.add_argument("--timeout", type=float, default=30, help="seconds to reach the broker")
    leave.set_defaults(func=cmd_leave)

    config = sub.add_parser("config", help="validate or publish configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate an agent configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    from agent.operator.commands import add_config_push, add_operator_arguments

    add_config_push(config_sub)
    add_operator_arguments(sub)

    keys = sub.add_parser("keys", help="operator signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="write an Ed25519 key pair")
    generate.add_argument(
        "--output",
        "-o",
        default="deploy-operator",
        help="path prefix: writes PREFIX (private) and PREFIX.pub",
    )
    generate.add_argument("--comment", help="a label for the key (default user@host)")
    generate.add_argument("--force", action="store_true")
    generate.set_defaults(func=cmd_keys_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level, stream=sys.stderr)
    try:
        return int(args.func(args))
    except (ConfigError, BrokerUnreachable) as exc:
        # Nothing was sent: fix the configuration or the network and run it again.
        print(f"deploy-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"deploy-agent: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("deploy-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
