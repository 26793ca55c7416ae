"""INI injection into deploy.cfg, checked with zc.buildout's own parser.

Data reaches deploy.cfg from the stack configuration (keys and values), this instance's
configuration (address) and other agents' presence messages (addresses, layers). None of it
may open a section, add an option, trigger a ``${...}`` substitution, or produce a
``[section:expression]`` header, which buildout would EVAL. The one raw path is the
cookbook's ``buildout_additional_config`` (the operator's own buildout text, by design).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import INI_INJECTIONS, any_text, examples, json_values, nasty_text
from hypothesis import given
from hypothesis import strategies as st
from support.tally import HostileTally
from zc.buildout.configparser import parse as buildout_parse
from zc.buildout.configparser import section_header

from agent.core.errors import AgentError, ConfigError
from agent.core.plan import Member, client_layout
from agent.core.render import RenderInput, render_deploy_cfg
from agent.core.stackconfig import stack_settings
from agent.node.fleet import Fleet
from agent.protocol import InvalidMessage, Presence, parse_message

ROOT = Path("/srv/deploy/mysite")
OWN = {
    "instance": "web-1",
    "state": "online",
    "address": "10.0.0.12",
    "layers": ["plone_instances"],
    "agent_version": "0.1.0",
    "since": "2024-05-01T12:00:00Z",
}


def render(
    stack_config: dict[str, Any],
    members: tuple[Member, ...] | None = None,
    address: str = "10.0.0.12",
) -> bytes:
    settings = stack_settings(stack_config)
    return render_deploy_cfg(
        RenderInput(
            stack="mysite",
            app="mysite",
            instance_id="web-1",
            instance_address=address,
            layers=("plone_instances",),
            revision="3f2a" * 10,
            app_root=ROOT,
            layout=client_layout(settings.plone_instances, cpu_count=2, memory_mb=4096),
            settings=settings,
            stack_config=stack_config,
            members=members
            or (
                Member("web-1", "10.0.0.12", ("plone_instances",)),
                Member("zeo-1", "10.0.0.5", ("zeoserver",)),
            ),
        )
    )


def never_eval() -> dict[str, Any]:
    raise AssertionError("buildout was about to EVAL a section expression from deploy.cfg")


def parsed(cfg: bytes) -> dict[str, dict[str, str]]:
    """deploy.cfg as buildout reads it; fails on any section header with an expression."""
    text = cfg.decode("utf-8")
    for line in text.split("\n"):  # buildout reads with readline(): only \n ends a line
        header = section_header(line)
        assert header is None or not header.group("expression"), line
    return buildout_parse(io.StringIO(text), "deploy.cfg", never_eval)


def expected_sections(stack_config: dict[str, Any]) -> set[str]:
    """Every section deploy.cfg may have for this stack config (an upper bound: zeo-host
    appears when an address is configured or a zeoserver member is online)."""
    settings = stack_settings(stack_config)
    clients = client_layout(settings.plone_instances, cpu_count=2, memory_mb=4096).names
    sections = {
        "buildout",
        "deploy",
        "instances",
        "stack_config",
        "zeo-host",
        "zeoserver",
        *clients,
    }
    plone = settings.plone_instances
    if plone.solr_enabled:
        sections.add("solr-host")
    if plone.enable_celery:
        sections |= {"celery-broker", "celery"}
    return sections


def check_no_injection(cfg: bytes, stack_config: dict[str, Any]) -> dict[str, dict[str, str]]:
    sections = parsed(cfg)
    extra = set(sections) - expected_sections(stack_config)
    assert not extra, f"sections injected: {extra}"
    for name in ("stack_config", "instances"):
        for option, value in sections.get(name, {}).items():
            assert "$" not in value.replace("$$", ""), f"[{name}] {option} = {value!r}"
    return sections


def try_render(tally: HostileTally, stack_config: dict[str, Any], **kwargs: Any) -> bytes | None:
    with tally.attempt():
        try:
            return render(stack_config, **kwargs)
        except (AgentError, ConfigError):
            return None


# -- stack configuration --------------------------------------------------------------------

keys = st.one_of(
    any_text,
    st.sampled_from(INI_INJECTIONS),
    st.sampled_from(
        ["plone_instances", "deploy", "zeo", "address", "environment", "mysite", "a.b", "x y"]
    ),
)
stack_configs = st.recursive(
    st.dictionaries(keys, json_values, max_size=4),
    lambda inner: st.dictionaries(keys, inner | json_values, max_size=3),
    max_leaves=10,
).filter(lambda d: "buildout_additional_config" not in json.dumps(d))


@examples(80)
@given(stack_configs)
def test_arbitrary_stack_config_keys_and_values_never_inject_into_deploy_cfg(
    tally: HostileTally, stack_config: dict[str, Any]
) -> None:
    cfg = try_render(tally, stack_config)
    if cfg is not None:
        check_no_injection(cfg, stack_config)


SINGLE_VALUE_PATHS = [
    ("zeo address", lambda v: {"plone_instances": {"zeo": {"address": v}}}),
    ("solr host", lambda v: {"plone_instances": {"solr_enabled": True, "solr_host": v}}),
    ("celery host", lambda v: {"plone_instances": {"enable_celery": True, "broker": {"host": v}}}),
    ("environment", lambda v: {"deploy": {"mysite": {"environment": {"TZ": v}}}}),
    ("environment name", lambda v: {"deploy": {"mysite": {"environment": {v: "x"}}}}),
    ("extends", lambda v: {"deploy": {"mysite": {"buildout_extends": [v]}}}),
    ("parts", lambda v: {"deploy": {"mysite": {"buildout_parts_to_include": [v]}}}),
    ("base_config", lambda v: {"plone_instances": {"base_config": v}}),
    ("custom value", lambda v: {"custom": {"k": v}}),
    ("custom key", lambda v: {"custom": {v: "x"}}),
    ("zeo layer", lambda v: {"plone_instances": {"zeo_layer": v}}),
]


@pytest.mark.parametrize("injection", INI_INJECTIONS)
@pytest.mark.parametrize(
    ("where", "build"), SINGLE_VALUE_PATHS, ids=[p[0] for p in SINGLE_VALUE_PATHS]
)
def test_ini_injections_in_every_stack_config_path_are_refused_or_neutralised(
    tally: HostileTally, where: str, build: Any, injection: str
) -> None:
    stack_config = build(injection)
    cfg = try_render(tally, stack_config)
    if cfg is not None:
        check_no_injection(cfg, stack_config)


@pytest.mark.parametrize("injection", INI_INJECTIONS)
def test_ini_injections_in_this_instance_address_are_refused_or_neutralised(
    tally: HostileTally, injection: str
) -> None:
    cfg = try_render(tally, {}, address=injection)
    if cfg is not None:
        check_no_injection(cfg, {})


@pytest.mark.parametrize(
    "stack_config",
    [
        {"custom": {"key\n": "x"}},
        {"key\n": "x"},
        {"custom": {"key\n": "multi\nline"}},
        {"deploy": {"mysite": {"environment": {"TZ\n": "UTC"}}}},
    ],
    ids=["nested-key", "top-key", "multiline-value", "environment-name"],
)
def test_an_option_name_ending_in_a_newline_is_refused(
    tally: HostileTally, stack_config: dict[str, Any]
) -> None:
    cfg = try_render(tally, stack_config)
    tally.refuse(
        cfg is not None
        and any(
            line and not line.startswith((" ", "[", "#")) and "=" not in line
            for line in cfg.decode().split("\n")
        ),
        "a line break from a key reached deploy.cfg",
    )


# -- presence messages from other agents ------------------------------------------------------

presences = st.fixed_dictionaries(
    {
        "instance": st.one_of(st.just("web-2"), nasty_text),
        "state": st.sampled_from(["online", "offline", "gone"]),
        "address": st.one_of(st.sampled_from(INI_INJECTIONS), nasty_text, st.just("10.0.0.13")),
        "layers": st.lists(
            st.one_of(
                st.sampled_from(["plone_instances", "zeoserver"]),
                st.sampled_from(INI_INJECTIONS),
                nasty_text,
            ),
            max_size=3,
        ),
        "agent_version": st.just("0.1.0"),
        "since": st.just("2024-05-01T12:00:00Z"),
    },
    optional={
        "clients": st.lists(
            st.fixed_dictionaries({"name": nasty_text, "port": st.integers(-1, 70000)}), max_size=2
        ),
        "extra": json_values,
    },
)


@examples(100)
@given(presences, st.booleans())
def test_presence_messages_never_inject_into_deploy_cfg(
    tally: HostileTally, data: dict[str, Any], ascii_only: bool
) -> None:
    fleet = Fleet(parse_message(Presence, json.dumps(OWN).encode()))
    payload = json.dumps(data, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    with tally.attempt():
        try:
            presence = parse_message(Presence, payload)
        except InvalidMessage:
            return
        fleet.apply(presence.instance, presence)
    cfg = try_render(tally, {}, members=fleet.members())
    assert cfg is not None, "a presence that parses must render"
    sections = check_no_injection(cfg, {})
    assert "instances" not in sections  # who else is online is never in deploy.cfg
    zeo_host = sections.get("zeo-host", {}).get("address", "")
    assert zeo_host.rpartition(":")[0] in {"", "10.0.0.12", presence.address}
