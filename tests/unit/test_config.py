"""Loading and validating the agent configuration file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.adapters.configfile import load_config
from agent.core.config import parse_config
from agent.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_example_configuration_is_valid():
    config = load_config(REPO / "config" / "agent.example.yaml")
    assert config.stack == "mysite"
    app = config.apps["mysite"]
    assert app.shared_dirs == ["var/filestorage", "var/blobstorage", "var/log"]
    assert app.restart.programs == ["client*"]


def test_defaults_fill_what_is_left_out():
    config = parse_config({"stack": "s", "apps": {"a": {"repository": "/r.git"}}})
    app = config.apps["a"]
    assert app.branch == "main" and app.keep_releases == 5
    assert app.buildout.command == ["bin/buildout", "-c", "deploy.cfg"]
    assert app.restart.on_failure == "halt"
    assert config.broker is None and config.supervisor is None


def test_every_problem_is_reported_with_its_key_path():
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "stack": "bad stack/name",
                "apps": {
                    "a": {
                        "repository": "/r",
                        "keep_releases": 0,
                        "shared_dirs": ["../etc"],
                        "restart": {"strategy": "sometimes"},
                        "colour": "blue",
                    }
                },
                "broker": {"port": 99999},
            }
        )
    problems = "\n".join(info.value.problems)
    for path in (
        "stack",
        "apps.a.keep_releases",
        "apps.a.shared_dirs",
        "apps.a.colour",
        "apps.a.restart.strategy",
        "broker.port",
    ):
        assert path in problems
    assert "unknown key" in problems


@pytest.mark.parametrize("ref", ["--upload-pack=touch /tmp/x", "-b", "a b", "x\ny"])
def test_branch_or_revision_that_could_be_a_git_option_is_refused(ref):
    with pytest.raises(ConfigError, match="not a valid git"):
        parse_config({"stack": "s", "apps": {"a": {"repository": "/r", "revision": ref}}})


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "agent.yaml").write_text(
        "stack: s\npaths: {root: srv, state: state}\nsecurity: {trusted_keys: [keys/alice.pub]}\n"
    )
    config = load_config(tmp_path / "agent.yaml")
    assert config.paths.root == tmp_path / "srv"
    assert config.security.trusted_keys == [tmp_path / "keys" / "alice.pub"]


def test_broken_yaml_is_a_config_error_not_a_traceback(tmp_path):
    (tmp_path / "agent.yaml").write_text("stack: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "agent.yaml")


def test_unknown_app_names_the_configured_ones():
    config = parse_config({"stack": "s", "apps": {"a": {"repository": "/r"}}})
    with pytest.raises(ConfigError, match=r"unknown app 'b' .*configured apps: a"):
        config.app("b")


def test_two_apps_generating_programs_on_one_instance_are_refused():
    """Both would write [program:client1]: supervisord keeps one, silently."""
    two = {
        "stack": "s",
        "instance": {"layers": ["plone_instances"]},
        "apps": {"a": {"repository": "/r"}, "b": {"repository": "/r"}},
    }
    with pytest.raises(ConfigError, match="apps a, b all generate supervisord programs"):
        parse_config(two)
    two["apps"]["b"]["programs"] = {"generate": False}
    assert set(parse_config(two).apps) == {"a", "b"}
    # An app of a layer this instance does not carry writes nothing here.
    two["apps"]["b"] = {"repository": "/r", "layers": ["frontend"]}
    assert set(parse_config(two).apps) == {"a", "b"}
