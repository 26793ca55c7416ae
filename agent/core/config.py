"""The agent's configuration: one YAML file, validated once at start-up, passed everywhere.

The keys are those of docs/architecture.md, "Configuration" (a contract: keys may be added,
none renamed). Unknown keys are errors, so a typo never silently falls back to a default.
Relative paths are resolved against the directory of the configuration file. Pure: the
file is read, and the host's name and address filled in, by ``agent.adapters.configfile``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.errors import ConfigError
from agent.core.names import Address, Name, check_revision

Argv = Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
#: The stack configuration travels as one MQTT payload (64 KiB); leave room for the envelope.
MAX_STACK_CONFIG = 60 * 1024
MAX_STACK_CONFIG_NODES = 20_000
MAX_STACK_CONFIG_DEPTH = 32
DEFAULT_SHARED_DIRS = ("var/filestorage", "var/blobstorage", "var/log")


class Model(BaseModel):
    """Strict base: unknown keys are reported instead of ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InstanceConfig(Model):
    #: Defaults for a file that names neither; the loader on the agent's host puts the
    #: host name and primary address in their place before validation.
    id: Name = "localhost"
    address: Address = "127.0.0.1"
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
    #: Build the bootstrap once per digest of its inputs in ``shared/bootstrap/<digest>``
    #: and link each release to it (agent/adapters/bootstrap.py); false: one per release.
    reuse_bootstrap: bool = True


class BalancerConfig(Model):
    """HAProxy's stats page, read so that the roll waits for HAProxy to count a restarted
    client UP before it stops the next (docs/architecture.md, "Restarts")."""

    #: The stats page (``stack_config.haproxy.stats_bind`` of the shipped template), e.g.
    #: ``http://10.0.0.5:8404/``; its CSV export (``;csv``) is read.
    stats_url: str = Field(max_length=2000, pattern=r"^https?://[^\s/?#]+(/[^\s#]*)?$")
    backend: str = Field(default="zeo_clients", min_length=1, max_length=200)
    #: HAProxy's name of a program of this instance; the shipped template's by default.
    server: str = Field(default="{instance}-{name}", min_length=1, max_length=200)
    #: Before a client stops: HAProxy sends it no new request (the stats page's admin form,
    #: ``stats admin``) and the roll waits until it answers nothing, at most
    #: ``drain_timeout`` seconds; it is set ready again once it answers.
    drain: bool = True
    drain_timeout: float = Field(default=30, ge=0, le=3600)


class RestartConfig(Model):
    programs: list[str] = Field(default_factory=lambda: ["client*"], min_length=1)
    strategy: Literal["rolling", "all"] = "rolling"
    restart_delay: float | None = Field(default=None, ge=0, le=3600)
    health_url: str | None = "http://127.0.0.1:{port}/"
    health_timeout: float = Field(default=60, gt=0)
    #: After a restarted client first answers its health URL: this many further
    #: consecutive healthy answers, ``health_interval`` seconds apart, before the next
    #: client is stopped. The shipped HAProxy template (``inter 500ms rise 1``) needs
    #: one successful check after the client is up: 0.5 s plus the check's own time, which
    #: for a just-started Zope on a busy host is seconds (``balancer`` waits for it).
    health_rise: int = Field(default=2, ge=0, le=100)
    health_interval: float = Field(default=0.5, gt=0, le=60)
    #: Also wait for HAProxy to count the client UP (its own check of a just-started Zope
    #: can take seconds longer than the agent's) before the next one stops.
    balancer: BalancerConfig | None = None
    on_failure: Literal["halt", "rollback"] = "halt"
    #: Rolling: how many clients of this host may be down at once. They restart in waves
    #: of this size (stopped together, started together, all healthy before the next).
    max_unavailable: int = Field(default=1, ge=1, le=100)


class HooksConfig(Model):
    """Commands run at fixed points of a deploy (docs/architecture.md, "Hooks"), in the
    release directory; the repository's executable ``deploy/<hook>`` runs after them."""

    before_switch: list[Argv] = Field(default_factory=list)
    before_restart: list[Argv] = Field(default_factory=list)
    after_restart: list[Argv] = Field(default_factory=list)
    on_failure: list[Argv] = Field(default_factory=list)
    #: Seconds for each hook command; a command still running then is killed (its group).
    timeout: float = Field(default=600, gt=0)


#: Program names the agent generates (besides ``client<n>``).
ProgramName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
#: One supervisord command line: no line breaks, no leading option-like dash.
CommandLine = Annotated[
    str, StringConstraints(min_length=1, max_length=1000, pattern=r"^[^\r\n\x00;-][^\r\n\x00]*$")
]


class ProgramsConfig(Model):
    """The supervisord programs the agent writes for an app (``<root>/<app>/supervisor.conf``),
    as the OpsWorks cookbook generated them. ``generate: false`` for a buildout that writes
    its own program sections."""

    generate: bool = True
    #: Seconds a program must stay up to count as started (Plone takes 5-30 s to listen;
    #: the health URL, not this, gates a roll).
    startsecs: int = Field(default=5, ge=0, le=3600)
    #: Seconds supervisord waits after SIGTERM before SIGKILL (Zope finishes requests).
    stopwaitsecs: int = Field(default=30, ge=1, le=3600)
    startretries: int = Field(default=3, ge=0, le=100)
    #: ``auto``: when this instance carries ``plone_instances.zeo_layer``.
    zeoserver: bool | Literal["auto"] = "auto"
    zeoserver_name: ProgramName = "zeoserver"
    #: Relative to ``current``; ``bin/zeoserver fg`` runs runzeo as a child, hence
    #: ``stopasgroup``/``killasgroup`` on every generated program.
    zeoserver_command: CommandLine = "bin/zeoserver fg"
    zeoserver_startsecs: int = Field(default=2, ge=0, le=3600)
    #: What the ZEO server runs, relative to a release: when these differ (release paths
    #: left out) between the release it runs from and ``current``, it is restarted
    #: before the clients; otherwise it keeps running from its release.
    zeoserver_files: list[str] = Field(
        default_factory=lambda: ["bin/zeoserver", "parts/zeoserver"], min_length=1
    )
    #: ``{name}`` is the client's program name (client1, client2...).
    client_command: CommandLine = "bin/{name} console"
    celery_name: ProgramName = "celery"
    celery_command: CommandLine = "bin/celery worker"
    #: ``shared``: ``<root>/<app>/shared/var/log/<program>.log``; ``supervisord``: its
    #: AUTO child logs (``childlogdir``).
    logs: Literal["shared", "supervisord"] = "shared"
    #: The user the programs run as (supervisord's ``user``; it must run as root for
    #: that): the one who owns the releases and shared/var, as OpsWorks' deploy user.
    user: Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] | None = None
    #: Extra ``environment`` for every program (``KEY=value`` pairs, supervisord syntax).
    environment: dict[
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")],
        Annotated[str, StringConstraints(max_length=1000, pattern=r"^[^\r\n\x00\"%]*$")],
    ] = Field(default_factory=dict)

    @field_validator("zeoserver_files")
    @classmethod
    def _files_are_relative(cls, paths: list[str]) -> list[str]:
        return [_safe_relative(p) for p in paths]


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
    programs: ProgramsConfig = Field(default_factory=ProgramsConfig)
    hooks: HooksConfig = Field(default_factory=HooksConfig)

    @field_validator("shared_dirs")
    @classmethod
    def _shared_dirs_are_relative(cls, dirs: list[str]) -> list[str]:
        return [_safe_relative(d) for d in dirs]

    @field_validator("branch", "revision")
    @classmethod
    def _ref_is_one_revision(cls, ref: str | None) -> str | None:
        if ref is None:
            return None
        try:
            return check_revision(ref)
        except ValueError as exc:
            raise ValueError(
                f"{ref[:200]!r} is not a valid git branch, tag or sha: {exc}"
            ) from None


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
    #: How long a member whose agent is stopped or unreachable keeps its endpoints in
    #: everyone's rendered configuration (its services usually still run).
    member_timeout: float = Field(default=1800, gt=0, le=30 * 86400)
    #: Asked when SIGTERM arrives: "stopping" means the host shuts down, and the agent
    #: says ``leaving`` instead of ``stopped``. None: never (always ``stopped``).
    shutdown_probe: Argv | None = Field(default_factory=lambda: ["systemctl", "is-system-running"])
    #: A new or rebuilt instance deploys its apps when it starts, as OpsWorks' setup did.
    first_deploy: bool = True

    @model_validator(mode="after")
    def _one_app_generates_programs(self) -> AgentConfig:
        """Generated programs are named ``client<n>`` and ``zeoserver`` for every app, and
        supervisord keeps one program of a name: two apps generating them on one instance
        would silently replace each other's."""
        generating = sorted(
            name for name, app in self.apps.items() if app.programs.generate and self.carries(name)
        )
        if len(generating) > 1:
            raise ValueError(
                f"apps {', '.join(generating)} all generate supervisord programs on this "
                "instance (client1, zeoserver...: the same names): set programs.generate: "
                "false for all but one and have their buildouts write programs of their own"
            )
        return self

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


def parse_config(
    data: Any,
    *,
    source: str = "<config>",
    base: Path | None = None,
    instance_defaults: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Validate already-loaded YAML data; every problem is reported with its key path.

    ``instance_defaults`` (``id``, ``address``) fill what ``instance`` leaves out."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of keys")
    _check_plain_data(data.get("stack_config", {}), source)
    if base is not None:
        _resolve_paths(data, base)
    if instance_defaults:
        instance = data.get("instance")
        if instance is None:
            instance = data["instance"] = {}
        if isinstance(instance, dict):
            for key, value in instance_defaults.items():
                instance.setdefault(key, value)
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
