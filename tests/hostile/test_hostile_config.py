"""Configuration under hostile input: ``parse_config`` on arbitrary YAML-shaped data and
``load_config`` on arbitrary file contents end in an AgentConfig or a ConfigError, never a
traceback; names and paths that could reach git or the file system are refused.
"""

from __future__ import annotations

import string
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import (
    GIT_OPTIONS,
    GIT_REVISION_TRICKS,
    PATH_TRAVERSALS,
    config_data,
    examples,
    json_values,
    nasty_text,
)
from hypothesis import given
from hypothesis import strategies as st
from support.tally import HostileTally

from agent.adapters.configfile import load_config
from agent.adapters.gitmirror import check_revision
from agent.core.config import AgentConfig, parse_config
from agent.core.errors import ConfigError, RevisionNotFound
from agent.core.stackconfig import stack_settings
from agent.node.daemon import Daemon
from agent.protocol import canonical_json

BASE = Path("/nonexistent/hostile")
SECTION_KEYS = {
    "instance": ["id", "address", "layers"],
    "paths": ["root", "state"],
    "broker": [
        "host",
        "port",
        "topic_prefix",
        "keepalive",
        "username",
        "password_file",
        "tls",
        "client_id",
    ],
    "security": ["trusted_keys", "require_signatures", "max_clock_skew"],
    "supervisor": ["url", "username", "password_file"],
}
APP_KEYS = [
    "repository",
    "branch",
    "revision",
    "layers",
    "keep_releases",
    "shared_dirs",
    "always_buildout_on_deploy",
    "buildout",
    "restart",
]
TEMPLATE_KEYS = ["source", "destination", "reload", "layers"]


def outcome(tally: HostileTally, run: Any) -> AgentConfig | ConfigError:
    """Run a parse; only AgentConfig or ConfigError may come out."""
    with tally.attempt():
        try:
            return run()
        except ConfigError as exc:
            assert str(exc)
            return exc


# -- parse_config on arbitrary data ---------------------------------------------------------

section = st.one_of(
    json_values,
    *(
        st.dictionaries(
            st.sampled_from([*keys, "extra"]), st.one_of(nasty_text, json_values), max_size=4
        )
        for keys in SECTION_KEYS.values()
    ),
)
apps = st.dictionaries(
    st.one_of(st.sampled_from(["mysite", *PATH_TRAVERSALS]), nasty_text),
    st.dictionaries(st.sampled_from(APP_KEYS), json_values, max_size=5),
    max_size=2,
)
templates = st.one_of(
    json_values,
    st.lists(st.dictionaries(st.sampled_from(TEMPLATE_KEYS), json_values, max_size=4), max_size=2),
)
config_like = st.fixed_dictionaries(
    {},
    optional={
        "stack": st.one_of(st.just("mysite"), nasty_text),
        **{key: section for key in SECTION_KEYS},
        "apps": apps,
        "templates": templates,
        "stack_config": json_values,
        "extra": json_values,
    },
)


@examples(100)
@given(config_like, st.booleans())
def test_parse_config_on_arbitrary_data_gives_a_config_or_a_config_error(
    tally: HostileTally, data: dict[str, Any], with_base: bool
) -> None:
    outcome(tally, lambda: parse_config(data, base=BASE if with_base else None))


@examples(100)
@given(json_values)
def test_parse_config_on_any_json_value_gives_a_config_or_a_config_error(
    tally: HostileTally, data: Any
) -> None:
    outcome(tally, lambda: parse_config(data, base=BASE))


# -- load_config on arbitrary file contents ------------------------------------------------

YAML_ALPHABET = string.ascii_letters[:8] + string.digits[:4] + " \n\t:-[]{},&*!|>'\"#%@`?.~\\"
yaml_texts = st.one_of(
    st.text(st.sampled_from(YAML_ALPHABET), max_size=200),
    st.lists(
        st.sampled_from(
            [
                "stack: mysite\n",
                "apps:\n",
                "  mysite:\n",
                "    branch: ",
                "templates: ",
                "paths: {root: ",
                "!!binary ",
                "!!set ",
                "&a ",
                "*a ",
                "<<: *a\n",
                "? ",
                "- ",
                "--- \n",
                "...\n",
                ": ",
                "[",
                "{",
            ]
        ),
        max_size=12,
    ).map("".join),
)


@examples(200)
@given(yaml_texts)
def test_load_config_on_arbitrary_yaml_text_gives_a_config_or_a_config_error(
    tally: HostileTally, tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.getbasetemp() / "hostile-config.yaml"
    path.write_text(text, encoding="utf-8")
    outcome(tally, lambda: load_config(path))


@pytest.mark.parametrize(
    "contents",
    [
        pytest.param(b"stack: \xff\xfe mysite\n", id="not-utf8"),
        pytest.param(b"[" * 3000, id="nested-3000"),
        pytest.param(b"stack: s\nshutdown_grace: " + b"9" * 5000 + b"\n", id="5000-digit-int"),
        pytest.param(b"stack: s\ntemplates: 5\n", id="templates-int"),
        pytest.param(b'stack: s\npaths: {root: "a\\0b"}\n', id="nul-in-path"),
        pytest.param(b"stack: s\nstack_config: &a {x: *a}\n", id="recursive-alias"),
        b"\x00\x01\x02",
        b"",
        b"~",
        b"- a\n- b\n",
        b"stack: !!python/object/apply:os.system ['touch PWNED']\n",
        b"stack: s\nstack: t\n",
        b"stack: !!binary bXlzaXRl\n",
        b'stack: "\\ud800"\n',
        b"stack: s\napps: {1: {repository: x}}\n",
        b"stack: s\nsecurity: {trusted_keys: 5}\n",
        b"stack: s\nbroker: {tls: [a]}\n",
        b"\xef\xbb\xbfstack: mysite\n",
        b"stack: " + b"a" * 1_000_000 + b"\n",
    ],
)
def test_load_config_on_crafted_files_gives_a_config_or_a_config_error(
    tally: HostileTally, tmp_path: Path, contents: bytes
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(contents)
    result = outcome(tally, lambda: load_config(path))
    if isinstance(result, AgentConfig):  # then it must be usable as it is
        assert result.stack
        canonical_json(result.stack_config)  # finite data, as the Custom JSON must be
        stack_settings(result.stack_config)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_a_large_config_file_is_refused_or_parsed_quickly(
    tally: HostileTally, tmp_path: Path
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("stack: s\nstack_config:\n" + "".join(f"  k{i}: {i}\n" for i in range(5000)))
    started = time.monotonic()
    outcome(tally, lambda: load_config(path))
    assert time.monotonic() - started < 30


# -- names and paths that would reach git, the file system or deploy.cfg ------------------


@pytest.mark.parametrize(
    "name",
    [
        *PATH_TRAVERSALS,
        *GIT_OPTIONS,
        "-c",
        "a b",
        "a\n",
        "",
        "a" * 129,
        "ä",
        "a:b",
        "a;b",
        "$(id)",
        "`id`",
        "[x]",
    ],
)
def test_unsafe_app_names_instance_ids_and_layers_are_refused(
    tally: HostileTally, tmp_path: Path, name: str
) -> None:
    data = config_data(tmp_path)
    for where, change in (
        ("apps", {"apps": {name: data["apps"]["mysite"]}}),
        ("instance.id", {"instance": {**data["instance"], "id": name}}),
        ("instance.layers", {"instance": {**data["instance"], "layers": [name]}}),
        ("app layers", {"apps": {"mysite": {**data["apps"]["mysite"], "layers": [name]}}}),
        ("stack", {"stack": name}),
    ):
        result = outcome(tally, lambda change=change: parse_config({**data, **change}))
        tally.refuse(isinstance(result, AgentConfig), f"{where} = {name!r}")


@pytest.mark.parametrize(
    "ref", [*GIT_OPTIONS, *GIT_REVISION_TRICKS[:7], "a b", "main\n", "x\x00", "", "a" * 201, "${x}"]
)
@pytest.mark.parametrize("key", ["branch", "revision"])
def test_branch_and_revision_that_git_could_misread_are_refused(
    tally: HostileTally, tmp_path: Path, key: str, ref: str
) -> None:
    data = config_data(tmp_path)
    data["apps"]["mysite"] = {**data["apps"]["mysite"], key: ref}
    result = outcome(tally, lambda: parse_config(data))
    if isinstance(result, AgentConfig):  # then the mirror refuses it before git runs
        with pytest.raises(RevisionNotFound, match="invalid revision"):
            check_revision(ref)


@pytest.mark.parametrize(
    "shared", ["../../etc", "/etc", "var/../../x", "..", "a\x00b", "", "var/log/../../../x", "/"]
)
def test_shared_dirs_outside_the_release_are_refused(
    tally: HostileTally, tmp_path: Path, shared: str
) -> None:
    data = config_data(tmp_path)
    data["apps"]["mysite"] = {**data["apps"]["mysite"], "shared_dirs": [shared]}
    result = outcome(tally, lambda: parse_config(data))
    tally.refuse(isinstance(result, AgentConfig), f"shared_dirs = [{shared!r}]")


@pytest.mark.parametrize("address", ["10.0.0.1 evil", "a\nb", "${x}", "[evil]", "a" * 300])
def test_an_instance_address_presence_cannot_carry_is_a_config_error(
    tally: HostileTally, tmp_path: Path, address: str
) -> None:
    data = config_data(tmp_path) | {"broker": {"host": "127.0.0.1", "port": 1}}
    data["instance"] = {**data["instance"], "address": address}

    def start() -> object:
        return Daemon(parse_config(data))

    result = outcome(tally, start)
    assert isinstance(result, ConfigError)
