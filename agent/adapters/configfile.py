"""Reading the agent's configuration file and secret files, and filling in this host's
name and address: the I/O around the pure ``agent.core.config``."""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.adapters.host import default_instance_id, primary_address
from agent.core.config import AgentConfig, parse_config
from agent.core.errors import ConfigError


def load_config(path: Path | str, *, probe_host: bool = True) -> AgentConfig:
    """Read and validate a YAML configuration file.

    With ``probe_host`` (the agent on its own host) a missing ``instance.id`` is the host
    name and a missing ``instance.address`` its primary address; without it (checking a
    file elsewhere) they keep neutral placeholders, and nothing is probed.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not usable YAML: {str(exc)[:200]}") from exc
    defaults = None
    if probe_host and isinstance(data, dict):
        given = data.get("instance")
        instance: dict[str, object] = given if isinstance(given, dict) else {}
        defaults = {}
        if "id" not in instance:
            defaults["id"] = default_instance_id()
        if "address" not in instance:
            defaults["address"] = primary_address()
    return parse_config(
        data, source=str(path), base=path.resolve().parent, instance_defaults=defaults
    )


def read_secret(path: Path | None) -> str | None:
    """The first line of a secret file, or None; the value is never logged."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"cannot read secret file {path}") from exc
