"""A typed view of the stack configuration (the OpsWorks "Custom JSON" equivalent).

It takes the keys of the OpsWorks Plone cookbook (``plone_instances.*``, ``deploy.<app>.*``)
so Custom JSON from an OpsWorks stack works as it is. Unknown keys are kept, not refused:
a Custom JSON carries keys for other cookbooks too, and they all go into ``[stack_config]``.
"""

from __future__ import annotations

import ipaddress
from fnmatch import fnmatchcase
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.core.errors import ConfigError


class Loose(BaseModel):
    """Tolerant of extra keys, strict on the types of the keys we use."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class ZeoSettings(Loose):
    address: str | None = None


class BrokerSettings(Loose):
    host: str | None = None
    port: int = Field(default=6379, ge=1, le=65535)


class PloneInstances(Loose):
    base_config: str = "cfg/base.cfg"
    per_cpu: float = Field(default=2, gt=0, le=64)
    instance_count: int | None = Field(default=None, ge=1, le=256)
    client_memory_mb: int | None = Field(default=None, ge=1)
    base_port: int = Field(default=8080, ge=1, le=65000)
    restart_delay: float = Field(default=0, ge=0, le=3600)
    zeo_layer: str = "zeoserver"
    zeo: ZeoSettings = Field(default_factory=ZeoSettings)
    zodb_cache_size: int | None = None
    zserver_threads: int | None = None
    persistent_cache: bool = True
    solr_enabled: bool = False
    solr_layer: str = "solr"
    solr_host: str | None = None
    enable_celery: bool = False
    broker_layer: str = "celery_broker"
    broker: BrokerSettings = Field(default_factory=BrokerSettings)


class AppDeploySettings(Loose):
    always_buildout_on_deploy: bool = False
    environment: dict[str, str] = Field(default_factory=dict)
    buildout_extends: list[str] = Field(default_factory=list)
    buildout_parts_to_include: list[str] = Field(default_factory=list)
    buildout_additional_config: str = ""

    @model_validator(mode="before")
    @classmethod
    def _cookbook_spelling(cls, data: Any) -> Any:
        """The cookbook's code reads ``always_build_on_deploy``, its docs say
        ``always_buildout_on_deploy``: both mean the same."""
        if isinstance(data, dict) and "always_build_on_deploy" in data:
            data = dict(data)
            legacy = data.pop("always_build_on_deploy")
            data.setdefault("always_buildout_on_deploy", legacy)
        return data


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(entry: str) -> IpNetwork | None:
    """The address range an entry names (``10.0.0.0/24``, or one address), else None."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def _address_in(address: str, network: IpNetwork) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


class Roster(BaseModel):
    """Who may hold which layer (``stack_config.roster``): per layer, instance ids, fnmatch
    globs of ids (``web-*``) and/or address ranges (``10.0.0.0/24``, or one address).

    A presence's claim to a layer counts only when one entry of that layer matches its id
    or its address. A layer the roster does not name is held by nobody but the instance
    itself (list ``"*"`` to let any instance claim it).
    """

    model_config = ConfigDict(frozen=True)

    layers: dict[str, tuple[str, ...]]

    def allows(self, layer: str, instance_id: str, address: str | None) -> bool:
        for entry in self.layers.get(layer, ()):
            network = _network(entry)
            if network is not None:
                if address and _address_in(address, network):
                    return True
            elif fnmatchcase(instance_id, entry):
                return True
        return False

    def refused(self, instance_id: str, address: str | None, layers: list[str]) -> list[str]:
        """The claimed layers this roster does not give the instance, sorted."""
        return sorted({x for x in layers if not self.allows(x, instance_id, address)})


class StackSettings(Loose):
    plone_instances: PloneInstances = Field(default_factory=PloneInstances)
    deploy: dict[str, AppDeploySettings] = Field(default_factory=dict)
    #: Layer -> ids, globs and address ranges (see ``Roster``); None: any claim counts.
    roster: dict[str, list[str]] | None = None

    @field_validator("roster")
    @classmethod
    def _roster_entries(cls, roster: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        for layer, entries in (roster or {}).items():
            for entry in entries:
                if not entry or ("/" in entry and _network(entry) is None):
                    raise ValueError(f"{layer}: {entry!r} is neither an id, a glob nor a range")
        return roster

    def roster_view(self) -> Roster | None:
        if self.roster is None:
            return None
        return Roster(layers={k: tuple(v) for k, v in self.roster.items()})

    def app(self, name: str) -> AppDeploySettings:
        return self.deploy.get(name) or AppDeploySettings()


def stack_settings(data: dict[str, Any]) -> StackSettings:
    """Validate the stack configuration; a wrong type names the key path."""
    try:
        return StackSettings.model_validate(data)
    except ValidationError as exc:
        problems = [
            "stack_config." + ".".join(str(p) for p in item["loc"]) + ": " + item["msg"]
            for item in exc.errors()
        ]
        raise ConfigError("invalid stack configuration", problems) from None
