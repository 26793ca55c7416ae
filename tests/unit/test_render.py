"""deploy.cfg rendering: the cookbook's sections, determinism, and no injection."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import RenderError
from agent.core.plan import Member, client_layout
from agent.core.render import RenderInput, render_deploy_cfg
from agent.core.stackconfig import stack_settings

ROOT = Path("/srv/deploy/mysite")


def make_input(
    stack_config: dict | None = None, members: tuple[Member, ...] | None = None, **overrides
) -> RenderInput:
    stack_config = (
        stack_config
        if stack_config is not None
        else {
            "plone_instances": {
                "instance_count": 2,
                "zodb_cache_size": 30000,
                "zserver_threads": 2,
            },
            "deploy": {"mysite": {"environment": {"TZ": "UTC"}}},
        }
    )
    settings = stack_settings(stack_config)
    values = dict(
        stack="mysite",
        app="mysite",
        instance_id="web-1",
        instance_address="10.0.0.12",
        layers=("plone_instances",),
        revision="3f2a" * 10,
        app_root=ROOT,
        layout=client_layout(settings.plone_instances, cpu_count=1, memory_mb=1024),
        settings=settings,
        stack_config=stack_config,
        members=members
        if members is not None
        else (
            Member("web-1", "10.0.0.12", ("plone_instances",)),
            Member("zeo-1", "10.0.0.5", ("zeoserver",)),
        ),
    )
    values.update(overrides)
    return RenderInput(**values)


def parse(cfg: bytes) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(cfg.decode())
    return parser


def test_deploy_cfg_has_the_sections_cookbook_buildouts_read():
    cfg = parse(render_deploy_cfg(make_input()))
    assert cfg["buildout"]["extends"] == "cfg/base.cfg"
    assert cfg["buildout"]["parts +"] == "client1 client2"
    assert cfg["buildout"]["eggs-directory"] == f"{ROOT}/shared/eggs"
    assert cfg["buildout"]["download-cache"] == f"{ROOT}/shared/downloads"
    assert cfg["zeo-host"]["address"] == "10.0.0.5:8001"
    assert cfg["zeoserver"]["address"] == "${zeo-host:address}"
    # plone.recipe.zeoserver listens on zeo-address; storages are the shared dirs
    # themselves (ZODB rmtree's its blob dir when it creates a Data.fs: not a symlink).
    assert cfg["zeoserver"]["zeo-address"] == "${zeo-host:address}"
    assert cfg["zeoserver"]["file-storage"] == f"{ROOT}/shared/var/filestorage/Data.fs"
    assert cfg["zeoserver"]["blob-storage"] == f"{ROOT}/shared/var/blobstorage"
    assert cfg["client1"]["blob-storage"] == f"{ROOT}/shared/var/blobstorage"
    assert cfg["client1"]["zodb-cache-size"] == "30000"
    assert cfg["client1"]["threads"] == "2"  # WSGI Zope (plone.recipe.zope2instance >= 6)
    assert cfg["client1"]["zserver-threads"] == "2"  # ZServer-era buildouts
    # Cache names carry the app (two sites on one host never share one), in shared/.
    assert cfg["client1"]["zeo-client-client"] == "mysite-client1"
    assert cfg["client1"]["zeo-var"] == f"{ROOT}/shared/cache/zeo"
    assert cfg["client1"]["http-fast-listen"] == "off"
    assert cfg["client1"]["http-address"] == "8081"
    assert cfg["client2"]["<"] == "client1"
    assert cfg["client2"]["http-address"] == "8082"
    assert cfg["client2"]["zeo-client-client"] == "mysite-client2"
    assert cfg["deploy"]["client_names"] == "client1 client2"
    assert cfg["deploy"]["client_ports"] == "8081 8082"
    assert cfg["deploy"]["current"] == f"{ROOT}/current"
    # Only what the app's buildout reads: who else is online is not in deploy.cfg.
    assert not cfg.has_section("instances")


@pytest.mark.parametrize(
    ("argv", "cache"),
    [
        (["bin/client2", "console"], "mysite-client2"),
        (["/srv/deploy/mysite/current/bin/client1", "fg"], "mysite-client1"),
        (["bin/client1", "start"], "mysite-client1"),
        (["bin/client1", "run", "scripts/upgrade.py", "console"], ""),
        (["bin/client1", "debug"], ""),
        (["bin/client1", "adduser", "admin", "secret"], ""),
        (["bin/client1"], ""),
    ],
)
def test_zope2instance_clients_name_their_cache_and_a_script_run_gets_none(tmp_path, argv, cache):
    """With plone.recipe.zope2instance, zope.conf takes the cache name from the environment
    (ZConfig's $(NAME)), which bin/client<n> sets first: a `run` next to the running client
    opens a temporary cache instead of the client's locked one."""
    cfg = parse(render_deploy_cfg(make_input(client_recipe="plone.recipe.zope2instance")))
    assert cfg["client1"]["zeo-client-client"] == "$(DEPLOY_ZEO_CLIENT)"
    assert not cfg.has_option("client2", "zeo-client-client")  # inherited: <= client1
    assert cfg["client1"]["zeo-var"] == f"{ROOT}/shared/cache/zeo"
    # Run the line as the first one of a script named like the client's (argv[0]).
    script = tmp_path / Path(argv[0]).name
    script.write_text(
        cfg["client1"]["initialization +"] + "\nprint(os.environ['DEPLOY_ZEO_CLIENT'])\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), *argv[1:]], capture_output=True, text=True, check=True
    )
    assert done.stdout == cache + "\n"


def test_other_recipes_get_literal_cache_names():
    cfg = parse(render_deploy_cfg(make_input(client_recipe="zeosite.recipe:client")))
    assert cfg["client1"]["zeo-client-client"] == "mysite-client1"
    assert cfg["client2"]["zeo-client-client"] == "mysite-client2"
    assert not cfg.has_option("client1", "initialization +")


def test_environment_vars_are_sorted_and_include_the_shared_caches():
    text = render_deploy_cfg(
        make_input(
            {"plone_instances": {}, "deploy": {"mysite": {"environment": {"ZZ": "1", "AA": "2"}}}}
        )
    ).decode()
    block = text.split("environment-vars =\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [
        "    AA 2",
        f"    CHAMELEON_CACHE {ROOT}/shared/cache/chameleon",
        f"    PYTHON_EGG_CACHE {ROOT}/shared/cache/python-eggs",
        "    ZZ 1",
    ]


def test_environment_is_merged_with_the_base_config_one_value_per_name_the_stack_wins():
    """Zope refuses a variable given twice ("too many values for 'TZ'"), and a plain
    ``=`` drops what the base set: deploy.cfg writes the union, the stack's value winning,
    and keeps the base's own buildout syntax as it is."""
    base = {"TZ": "UTC", "zope_i18n_compile_mo_files": "true", "HOME": "${buildout:directory}"}
    text = render_deploy_cfg(
        make_input(
            {"deploy": {"mysite": {"environment": {"TZ": "Europe/Paris"}}}},
            base_environment=base,
        )
    ).decode()
    block = text.split("environment-vars =\n", 1)[1].split("\n\n", 1)[0].splitlines()
    names = [line.split()[0] for line in block]
    assert names == sorted(set(names)), "one line per variable, sorted"
    assert "    TZ Europe/Paris" in block
    assert "    zope_i18n_compile_mo_files true" in block
    assert "    HOME ${buildout:directory}" in block


def test_rendering_is_deterministic_whatever_the_key_order():
    a = {"plone_instances": {"per_cpu": 1, "zodb_cache_size": 5}, "x": {"b": 1, "a": 2}}
    b = {"x": {"a": 2, "b": 1}, "plone_instances": {"zodb_cache_size": 5, "per_cpu": 1}}
    members = (Member("b", "10.0.0.2", ("zeoserver",)), Member("a", "10.0.0.1", ("zeoserver",)))
    one = render_deploy_cfg(make_input(a, members))
    two = render_deploy_cfg(make_input(b, tuple(reversed(members))))
    assert one == two
    assert b"zeo-host]\naddress = 10.0.0.1:8001" in one


def test_explicit_zeo_address_wins_over_the_zeoserver_layer():
    cfg = parse(render_deploy_cfg(make_input({"plone_instances": {"zeo": {"address": "z:9100"}}})))
    assert cfg["zeo-host"]["address"] == "z:9100"


def test_no_zeo_host_section_when_no_zeoserver_is_online():
    cfg = parse(render_deploy_cfg(make_input({}, members=())))
    assert not cfg.has_section("zeo-host")


def test_solr_and_celery_sections_from_layers_and_keys():
    members = (Member("s", "10.0.0.7", ("solr",)), Member("q", "10.0.0.8", ("celery_broker",)))
    cfg = parse(
        render_deploy_cfg(
            make_input(
                {
                    "plone_instances": {
                        "solr_enabled": True,
                        "enable_celery": True,
                        "broker": {"port": 6380},
                    }
                },
                members,
            )
        )
    )
    assert cfg["solr-host"]["host"] == "10.0.0.7"
    assert cfg["celery-broker"]["host"] == "10.0.0.8"
    assert cfg["celery-broker"]["port"] == "6380"
    assert cfg["celery"]["broker-host"] == "${celery-broker:host}"
    assert cfg["buildout"]["parts +"].split()[-1] == "celery"


def test_cookbook_extends_parts_and_additional_config_are_appended():
    cfg = render_deploy_cfg(
        make_input(
            {
                "deploy": {
                    "mysite": {
                        "buildout_extends": ["cfg/sources.cfg"],
                        "buildout_parts_to_include": ["zeoserver"],
                        "buildout_additional_config": "[client1]\nuser = admin:secret",
                    }
                }
            }
        )
    )
    parsed = parse(cfg)
    assert parsed["buildout"]["extends"] == "cfg/base.cfg cfg/sources.cfg"
    assert parsed["buildout"]["parts +"].endswith("zeoserver")
    assert parsed["client1"]["user"] == "admin:secret"
    assert b"buildout_additional_config" not in cfg


def test_always_build_on_deploy_is_the_cookbook_spelling_of_always_buildout():
    settings = stack_settings({"deploy": {"a": {"always_build_on_deploy": True}}})
    assert settings.app("a").always_buildout_on_deploy is True


def test_app_buildout_config_overrides_base_config():
    cfg = parse(render_deploy_cfg(make_input(base_config="cfg/production.cfg")))
    assert cfg["buildout"]["extends"] == "cfg/production.cfg"


@pytest.mark.parametrize("evil", ["x\n[buildout]\nparts = evil", "a\rb", "x\x00"])
def test_values_with_line_breaks_are_refused_not_injected(evil):
    with pytest.raises(RenderError, match="line break"):
        render_deploy_cfg(make_input({"plone_instances": {"zeo": {"address": evil}}}))


def test_dollar_signs_from_data_cannot_trigger_buildout_substitution():
    cfg = render_deploy_cfg(
        make_input(
            {
                "deploy": {"mysite": {"environment": {"X": "${buildout:directory}"}, "k": "$HOME"}},
            }
        )
    )
    assert b"X $${buildout:directory}" in cfg
    assert b"deploy.mysite.k = $$HOME" in cfg


def test_option_names_from_data_cannot_inject():
    with pytest.raises(RenderError, match="not a valid buildout option name"):
        render_deploy_cfg(make_input({"plone_instances": {"bad key = x\n[s]": 1}}))
    with pytest.raises(RenderError, match="not a variable name"):
        render_deploy_cfg(make_input({"deploy": {"mysite": {"environment": {"A B": "1"}}}}))


def test_multiline_stack_config_values_become_indented_continuation_lines():
    notes = {"text": "one\n[buildout]\nparts = evil"}
    cfg = render_deploy_cfg(make_input({"deploy": {"mysite": {"notes": notes}}}))
    parsed = parse(cfg)
    assert parsed.sections().count("buildout") == 1
    assert "evil" not in parsed["buildout"].get("parts", "")
    assert b"deploy.mysite.notes.text =\n    one\n    [buildout]\n    parts = evil" in cfg


@given(
    st.dictionaries(
        st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
        st.one_of(st.text(max_size=30), st.integers(), st.booleans()),
        max_size=6,
    )
)
def test_arbitrary_stack_values_never_add_sections_or_options(extra):
    try:
        cfg = render_deploy_cfg(make_input({"deploy": {"mysite": {"custom": extra}}}))
    except RenderError:
        return
    parsed = parse(cfg)
    assert set(parsed.sections()) == {
        "buildout",
        "zeo-host",
        "zeoserver",
        "client1",
        "client2",
        "deploy",
        "stack_config",
    }
    assert all(k.startswith("deploy.mysite.custom.") for k in parsed["stack_config"])


def test_keys_of_other_apps_and_layers_never_reach_this_apps_deploy_cfg():
    """A change to a key another app or the balancer uses rebuilds nothing here."""
    base = {"plone_instances": {"instance_count": 2}, "deploy": {"mysite": {}}}
    other = {
        **base,
        "haproxy": {"bind": "*:80"},
        "deploy": {"mysite": {}, "othersite": {"environment": {"A": "1"}}},
    }
    assert render_deploy_cfg(make_input(base)) == render_deploy_cfg(make_input(other))


def test_who_else_is_online_never_changes_deploy_cfg():
    zeo = Member("zeo-1", "10.0.0.5", ("zeoserver",))
    alone = (Member("web-1", "10.0.0.12", ("plone_instances",)), zeo)
    crowd = (*alone, Member("web-2", "10.0.0.13", ("plone_instances",)))
    assert render_deploy_cfg(make_input(members=alone)) == render_deploy_cfg(
        make_input(members=crowd)
    )


def test_a_pinned_zeo_member_stays_the_zeo_host_when_another_joins():
    old = Member("zeo-b", "10.0.0.6", ("zeoserver",))
    new = Member("zeo-a", "10.0.0.5", ("zeoserver",))
    cfg = parse(render_deploy_cfg(make_input(members=(new, old), pins={"zeoserver": "zeo-b"})))
    assert cfg["zeo-host"]["address"] == "10.0.0.6:8001"


def test_a_zeoserver_only_instance_gets_no_client_sections():
    settings = stack_settings({})
    cfg = parse(
        render_deploy_cfg(
            make_input(
                {},
                layers=("zeoserver",),
                layout=client_layout(
                    settings.plone_instances, cpu_count=4, memory_mb=1, layers=["zeoserver"]
                ),
            )
        )
    )
    assert not cfg.has_section("client1")
    assert "parts +" not in cfg["buildout"]
    assert cfg["deploy"]["client_count"] == "0"
