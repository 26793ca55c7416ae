"""Reading a site's base configuration as buildout would: extends, +=, -=, continuation
lines; what cannot be followed is skipped, never fatal."""

from __future__ import annotations

from agent.adapters.buildoutcfg import environment, option_value

FILES = {
    "cfg/base.cfg": """\
[buildout]
extends = versions.cfg ../common.cfg http://example.org/remote.cfg
parts = zeoserver

[client1]
recipe = plone.recipe.zope2instance
# a comment
environment-vars +=
    TZ UTC
    zope_i18n_compile_mo_files true
""",
    "cfg/versions.cfg": "[versions]\nPlone = 6.2.2\n",
    "common.cfg": """\
[client1]
environment-vars =
    HOME ${buildout:directory}
    OLD 1
""",
    "cfg/minus.cfg": """\
[buildout]
extends = base.cfg

[client1]
environment-vars -=
    OLD 1
""",
}


def read(path: str) -> str | None:
    return FILES.get(path)


def test_the_extends_chain_and_plus_equals_make_the_value_buildout_would_see() -> None:
    assert environment(read, "cfg/base.cfg") == {
        "HOME": "${buildout:directory}",
        "OLD": "1",
        "TZ": "UTC",
        "zope_i18n_compile_mo_files": "true",
    }


def test_minus_equals_removes_inherited_lines() -> None:
    assert "OLD" not in environment(read, "cfg/minus.cfg")


def test_a_missing_file_or_option_is_nothing_not_an_error() -> None:
    assert environment(read, "cfg/absent.cfg") == {}
    assert option_value(read, "cfg/versions.cfg", "client1", "environment-vars") is None


def test_an_extends_cycle_ends() -> None:
    cyclic = {"a.cfg": "[buildout]\nextends = b.cfg\n", "b.cfg": "[buildout]\nextends = a.cfg\n"}
    assert environment(cyclic.get, "a.cfg") == {}
