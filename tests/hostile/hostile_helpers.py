"""Shared pieces of the hostile-input suite: keys, a real agent configuration, signed
commands and hypothesis strategies for hostile values (the per-file tally is
support.tally.HostileTally)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from agent.adapters.keys import public_key_line
from agent.core.config import AgentConfig, parse_config
from agent.protocol import Command, fingerprint, sign_command

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
STACK = "mysite"
ALICE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # trusted
BOB = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))  # trusted
MALLORY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))  # not trusted
TRUSTED = {fingerprint(key): key.public_key() for key in (ALICE, BOB)}

#: Strings crafted against git, the file system, buildout and the logs.
GIT_OPTIONS = [
    "--upload-pack=touch PWNED",
    "-c core.sshCommand=touch PWNED",
    "-ccore.sshCommand=touch PWNED",
    "--output=PWNED",
    "--exec=touch PWNED",
    "-",
    "-h",
    "--",
]
GIT_REVISION_TRICKS = [
    "HEAD@{1}",
    "main@{-1}",
    "@{u}",
    "HEAD~1",
    "HEAD^",
    "main:etc/passwd",
    "HEAD..main",
    "a...b",
    ":/root",
    "main^{tree}",
    "@",
]
PATH_TRAVERSALS = [
    "../../etc",
    "..",
    ".",
    "/etc/passwd",
    "/abs",
    "..%2f..%2fetc",
    "a/../../b",
    "a\x00b",
    "~root",
    "a/b",
    "a\\..\\b",
    "\u2024\u2024/etc",
]
INI_INJECTIONS = [
    "x\n[buildout]\nparts = evil",
    "x\r[buildout]",
    "x\n[evil:__import__('os').system('touch PWNED')]",
    "${buildout:directory}",
    "$${x}",
    "x\x0b[y]",
    "x\x0c[y]",
    "x\u2028[y:True]",
    "x\x85[y]",
    "[evil:True]",
]
HOSTILE_STRINGS = [
    *GIT_OPTIONS,
    *GIT_REVISION_TRICKS,
    *PATH_TRAVERSALS,
    *INI_INJECTIONS,
    "",
    " ",
    "\x00",
    "\ud800",
    "a" * 300,
    "\u202e",
    "\x1b[31m",
    "é" * 129,
]


def examples(default: int) -> settings:
    """Hypothesis settings for one property; ``HOSTILE_EXAMPLES`` may raise the count."""
    wanted = int(os.environ.get("HOSTILE_EXAMPLES") or 0)
    return settings(
        max_examples=max(default, wanted),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


# -- configuration and commands -------------------------------------------------------------


def config_data(tmp: Path) -> dict[str, Any]:
    """A plain agent configuration: two apps, one of them on a layer we do not carry."""
    return {
        "stack": STACK,
        "instance": {"id": "web-1", "address": "10.0.0.12", "layers": ["plone_instances"]},
        "paths": {"root": str(tmp / "srv"), "state": str(tmp / "state")},
        "security": {"require_signatures": True, "max_clock_skew": 300},
        "apps": {
            "mysite": {"repository": str(tmp / "upstream.git"), "layers": ["plone_instances"]},
            "frontend": {"repository": str(tmp / "upstream.git"), "layers": ["haproxy"]},
        },
        "membership_debounce": 600,
    }


def agent_config(tmp: Path, **overrides: Any) -> AgentConfig:
    return parse_config({**config_data(tmp), **overrides})


def write_public_keys(directory: Path) -> list[Path]:
    """ALICE's and BOB's public keys as files, for configurations that load them."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, key in (("alice", ALICE), ("bob", BOB)):
        path = directory / f"{name}.pub"
        path.write_text(public_key_line(key.public_key(), name))
        paths.append(path)
    return paths


def command(
    kind: str = "deploy",
    *,
    key: Ed25519PrivateKey | None = ALICE,
    now: datetime = NOW,
    **fields: Any,
) -> Command:
    """A fresh command, signed by ``key`` (None: unsigned)."""
    fields.setdefault("app", "mysite" if kind != "configure" else None)
    fields.setdefault("stack", STACK)
    fields.setdefault("issued_by", "alice@ci")
    made = Command(id=uuid4(), kind=kind, issued_at=now, **fields)
    return sign_command(made, key) if key is not None else made


def as_dict(cmd: Command) -> dict[str, Any]:
    return json.loads(cmd.model_dump_json())


# -- hypothesis strategies -----------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=40)
nasty_text = st.one_of(
    any_text,
    st.sampled_from(HOSTILE_STRINGS),
    st.builds(lambda c, n: c * n, st.sampled_from("a[\n$-/{"), st.integers(1000, 70_000)),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
