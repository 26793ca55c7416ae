"""The agent's configuration: one YAML file, validated once at start-up, passed everywhere.

The keys are those of DESIGN.md's "Configuration" section (a contract: keys may be added,
none renamed). Unknown keys are errors, so a typo never silently falls back to a default.
Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import json
import math
import re
import socket
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import psutil
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from agent.core.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
#: A host name or an IPv4/IPv6 address: what a presence message may carry.
Address = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:%_-]{1,253}$")]
Argv = Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
#: The stack configuration travels as one MQTT payload (64 KiB); leave room for the envelope.
MAX_STACK_CONFIG = 60 * 1024
MAX_STACK_CONFIG_NODES = 20_000
MAX_STACK_CONFIG_DEPTH = 32
DEFAULT_SHARED_DIRS = ("var/filestorage", "var/blobstorage", "var/log")


class Model(BaseModel):
    """Strict base: unknown keys are reported instead of ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_instance_id() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _primary_address() -> str:
    """First non-loopback IPv4 address of this host; loopback when there is none."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return "127.0.0.1"


class InstanceConfig(Model):
    id: Name = Field(default_factory=_default_instance_id)
    address: Address = Field(default_factory=_primary_address)
    layers: list[Name] = Field(default_factory=list)


class PathsConfig(Model):
    root: Path = Path("/srv/deploy")
    state: Path = Path("/var/lib/deploy-agent")


class TlsConfig(Model):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class BrokerConfig(Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: Name = "deploy-agent"
    keepalive: int = Field(default=30, ge=5, le=3600)
    username: str | None = None
    password_file: Path | None = None
    tls: TlsConfig | None = None
    client_id: str | None = None


class SecurityConfig(Model):
    trusted_keys: list[Path] = Field(default_factory=list)
    require_signatures: bool = True
    max_clock_skew: float = Field(default=300, gt=0)


class SupervisorConfig(Model):
    url: str = "unix:///run/supervisor.sock"
    username: str | None = None
    password_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("unix://", "http://", "https://")):
            raise ValueError("must start with unix://, http:// or https://")
        return url


class BuildoutConfig(Model):
    config: str | None = None
    bootstrap: list[Argv] = Field(default_factory=list)
    command: Argv = Field(default_factory=lambda: ["bin/buildout", "-c", "deploy.cfg"])
    timeout: float = Field(default=1800, gt=0)
    environment: dict[str, str] = Field(default_factory=dict)


class RestartConfig(Model):
    programs: list[str] = Field(default_factory=lambda: ["client*"], min_length=1)
    strategy: Literal["rolling", "all"] = "rolling"
    restart_delay: float | None = Field(default=None, ge=0, le=3600)
    health_url: str | None = "http://127.0.0.1:{port}/"
    health_timeout: float = Field(default=60, gt=0)
    on_failure: Literal["halt", "rollback"] = "halt"


def _safe_relative(path: str) -> str:
    """A shared dir is a plain relative path inside the release: no '..', no absolute."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\x00" in path:
        raise ValueError(f"{path!r} must be a relative path inside the release, without '..'")
    return str(pure)


class AppConfig(Model):
    repository: str = Field(min_length=1)
    branch: str | None = "main"
    revision: str | None = None
    layers: list[Name] = Field(default_factory=list)
    keep_releases: int = Field(default=5, ge=2, le=100)
    shared_dirs: list[str] = Field(default_factory=lambda: list(DEFAULT_SHARED_DIRS))
    always_buildout_on_deploy: bool = False
    buildout: BuildoutConfig = Field(default_factory=BuildoutConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)

    @field_validator("shared_dirs")
    @classmethod
    def _shared_dirs_are_relative(cls, dirs: list[str]) -> list[str]:
        return [_safe_relative(d) for d in dirs]

    @field_validator("branch", "revision")
    @classmethod
    def _ref_is_not_an_option(cls, ref: str | None) -> str | None:
        if ref is not None and (ref.startswith("-") or not re.fullmatch(r"[\w./+-]{1,200}", ref)):
            raise ValueError(f"{ref!r} is not a valid git branch, tag or sha")
        return ref


class TemplateConfig(Model):
    source: Path
    destination: Path
    reload: Argv | None = None
    layers: list[Name] | None = None


class AgentConfig(Model):
    stack: Name
    instance: InstanceConfig = Field(default_factory=InstanceConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    broker: BrokerConfig | None = None
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    supervisor: SupervisorConfig | None = None
    apps: dict[Name, AppConfig] = Field(default_factory=dict)
    stack_config: dict[str, Any] = Field(default_factory=dict)
    templates: list[TemplateConfig] = Field(default_factory=list)
    shutdown_grace: float = Field(default=600, ge=0)
    membership_debounce: float = Field(default=2.0, ge=0, le=600)
    #: A new or rebuilt instance deploys its apps when it starts, as OpsWorks' setup did.
    first_deploy: bool = True

    def app(self, name: str) -> AppConfig:
        """The app called ``name``; a clear error naming the known ones otherwise."""
        try:
            return self.apps[name]
        except KeyError:
            known = ", ".join(sorted(self.apps)) or "none"
            raise ConfigError(f"unknown app {name!r} (configured apps: {known})") from None

    def carries(self, app: str) -> bool:
        """True when this instance carries one of the app's layers (or the app has none)."""
        layers = self.apps[app].layers
        return not layers or bool(set(layers) & set(self.instance.layers))


PATH_KEYS = {
    ("paths", "root"),
    ("paths", "state"),
    ("broker", "password_file"),
    ("supervisor", "password_file"),
}


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative file paths relative to the configuration file, not to the cwd."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            try:
                return str((base / value).resolve())
            except (ValueError, OSError):
                return value  # NUL and the like: the model refuses it with its key path
        return value

    for section, key in PATH_KEYS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = fix(data[section][key])
    security = data.get("security")
    if isinstance(security, dict) and isinstance(security.get("trusted_keys"), list):
        security["trusted_keys"] = [fix(k) for k in security["trusted_keys"]]
    tls = (data.get("broker") or {}).get("tls") if isinstance(data.get("broker"), dict) else None
    if isinstance(tls, dict):
        for key in ("ca", "cert", "key"):
            if key in tls:
                tls[key] = fix(tls[key])
    templates = data.get("templates")
    for template in templates if isinstance(templates, list) else []:
        if isinstance(template, dict):
            for key in ("source", "destination"):
                if key in template:
                    template[key] = fix(template[key])


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against config/agent.example.yaml)"
        problems.append(f"{where}: {message}")
    return problems


def parse_config(data: Any, *, source: str = "<config>", base: Path | None = None) -> AgentConfig:
    """Validate already-loaded YAML data; every problem is reported with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of keys")
    _check_plain_data(data.get("stack_config", {}), source)
    if base is not None:
        _resolve_paths(data, base)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration", _describe(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source}: invalid configuration: {str(exc)[:200]}") from None


def _check_plain_data(value: Any, source: str) -> None:
    """stack_config is rendered into deploy.cfg and published as JSON: it must be finite
    plain data. A YAML alias cycle or a billion-laughs expansion is not, and a bounded
    walk finds out without expanding it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_STACK_CONFIG_NODES or depth > MAX_STACK_CONFIG_DEPTH:
            raise ConfigError(
                f"{source}: stack_config is too large or refers to itself "
                f"(more than {MAX_STACK_CONFIG_NODES} values or "
                f"{MAX_STACK_CONFIG_DEPTH} levels)"
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{source}: stack_config holds {item}, not a finite number")
    if len(json.dumps(value, default=str)) > MAX_STACK_CONFIG:
        raise ConfigError(
            f"{source}: stack_config is over {MAX_STACK_CONFIG} bytes as JSON "
            "(it must fit in one broker message)"
        )


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate a YAML configuration file."""
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
    return parse_config(data, source=str(path), base=path.resolve().parent)


def read_secret(path: Path | None) -> str | None:
    """The first line of a secret file, or None; the value is never logged."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"cannot read secret file {path}") from exc
