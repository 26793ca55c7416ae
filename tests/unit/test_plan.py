"""The decision of DESIGN.md step 3 and the cookbook's client sizing."""

from __future__ import annotations

import pytest

from agent.core.plan import Member, client_count, client_layout, decide, first_online
from agent.core.stackconfig import PloneInstances

CFG = b"[buildout]\n"


@pytest.mark.parametrize(
    ("target", "deployed", "new", "old", "always", "expected"),
    [
        ("b", "a", CFG, CFG, False, "new-revision"),
        ("b", None, CFG, None, False, "new-revision"),
        ("a", "a", CFG + b"x", CFG, False, "config-changed"),
        ("a", "a", CFG, None, False, "config-changed"),
        ("a", "a", CFG, CFG, True, "always-buildout"),
        ("a", "a", CFG, CFG, False, "unchanged"),
        ("b", "a", CFG, CFG, True, "new-revision"),
    ],
)
def test_decide_reports_why_a_release_is_built(target, deployed, new, old, always, expected):
    assert (
        decide(
            target_sha=target,
            deployed_sha=deployed,
            new_cfg=new,
            deployed_cfg=old,
            always_buildout=always,
        )
        == expected
    )


@pytest.mark.parametrize(
    ("cpus", "per_cpu", "expected"), [(1, 2, 2), (2, 2, 4), (3, 0.5, 2), (1, 0.1, 1), (4, 1, 4)]
)
def test_client_count_follows_cpu_count_times_per_cpu_rounded_up(cpus, per_cpu, expected):
    settings = PloneInstances(per_cpu=per_cpu)
    assert client_count(settings, cpu_count=cpus, memory_mb=64000) == expected


def test_instance_count_overrides_cpu_sizing():
    settings = PloneInstances(instance_count=3, per_cpu=8)
    assert client_count(settings, cpu_count=16, memory_mb=100) == 3


def test_client_memory_caps_the_count_but_never_below_one():
    settings = PloneInstances(per_cpu=2, client_memory_mb=1000)
    assert client_count(settings, cpu_count=8, memory_mb=3500) == 3
    assert client_count(settings, cpu_count=8, memory_mb=200) == 1


def test_layout_names_clients_and_ports_from_base_port():
    layout = client_layout(
        PloneInstances(instance_count=3, base_port=9000), cpu_count=1, memory_mb=1
    )
    assert layout.names == ["client1", "client2", "client3"]
    assert layout.ports == {"client1": 9001, "client2": 9002, "client3": 9003}


def test_first_online_picks_lowest_id_among_online_members_of_the_layer():
    members = (
        Member("zeo-b", "10.0.0.2", ("zeoserver",)),
        Member("zeo-a", "10.0.0.1", ("zeoserver",), online=False),
        Member("zeo-c", "10.0.0.3", ("zeoserver",)),
        Member("web-1", "10.0.0.9", ("plone_instances",)),
    )
    chosen = first_online(members, "zeoserver")
    assert chosen is not None and chosen.id == "zeo-b"
    assert first_online(members, "solr") is None


def test_an_instance_with_only_service_layers_runs_no_clients():
    settings = PloneInstances(per_cpu=2)

    def count(*layers: str) -> int:
        return client_layout(settings, cpu_count=1, memory_mb=1, layers=layers).count

    assert count("zeoserver") == 0 and count("zeoserver", "solr") == 0
    assert count("zeoserver", "plone_instances") == 2 and count() == 2
