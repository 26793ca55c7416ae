"""Fleet membership from presence messages, and the debounce of reconfigures."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.core.plan import Member
from agent.node.fleet import Debouncer, Fleet
from agent.protocol import AppPresence, ClientInfo, Presence, encode, parse_message

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def presence(instance: str, state: str = "online", **fields: Any) -> Presence:
    values: dict[str, Any] = {
        "instance": instance,
        "state": state,
        "address": "10.0.0.1",
        "layers": ["plone_instances"],
        "clients": [ClientInfo(name="client1", port=8081)],
        "agent_version": "0.1.0",
        "since": NOW,
    }
    values.update(fields)
    return Presence(**values)


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(presence("web-1", address="10.0.0.1"))


# --- Fleet ------------------------------------------------------------------------------


def test_instance_sees_itself_before_the_broker_echoes_it(fleet: Fleet) -> None:
    assert fleet.members() == (Member("web-1", "10.0.0.1", ("plone_instances",), True),)
    assert fleet.own_member().id == "web-1"


def test_join_is_a_membership_change(fleet: Fleet) -> None:
    assert fleet.apply("web-2", presence("web-2", address="10.0.0.2")) is True
    assert [m.id for m in fleet.members()] == ["web-1", "web-2"]
    assert fleet.is_online("web-2")


def test_same_presence_again_is_not_a_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", presence("web-2", address="10.0.0.2")) is False


def test_offline_will_is_a_leave_and_the_member_stays_listed_offline(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", presence("web-2", state="offline", address="10.0.0.2")) is True
    assert fleet.members()[1] == Member("web-2", "10.0.0.2", ("plone_instances",), False)
    assert not fleet.is_online("web-2")


def test_cleared_retained_message_removes_the_member(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", None) is True
    assert [m.id for m in fleet.members()] == ["web-1"]
    assert "web-2" not in fleet.presences()


def test_clearing_an_offline_member_is_not_a_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", state="offline"))
    assert fleet.apply("web-2", None) is False


def test_clearing_an_unknown_member_is_not_a_change(fleet: Fleet) -> None:
    assert fleet.apply("ghost", None) is False


def test_address_change_is_a_membership_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", presence("web-2", address="10.0.0.22")) is True
    assert fleet.members()[1].address == "10.0.0.22"


def test_layer_change_is_a_membership_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2"))
    assert fleet.apply("web-2", presence("web-2", layers=["plone_instances", "zeoserver"]))
    assert fleet.members()[1].layers == ("plone_instances", "zeoserver")


def test_layer_order_is_not_a_membership_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", layers=["a", "b"]))
    assert fleet.apply("web-2", presence("web-2", layers=["b", "a"])) is False


def test_client_port_change_is_a_membership_change(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2"))
    two_clients = [ClientInfo(name="client1", port=8081), ClientInfo(name="client2", port=8082)]
    assert fleet.apply("web-2", presence("web-2", clients=two_clients)) is True
    assert [c.port for c in fleet.clients()["web-2"]] == [8081, 8082]


def test_release_and_timestamp_changes_are_not_membership_changes(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2"))
    deployed = AppPresence(release="20240501T120000Z", revision="abc123", deployed_at=NOW)
    later = presence(
        "web-2", apps={"mysite": deployed}, since=NOW + timedelta(hours=1), agent_version="0.2"
    )
    assert fleet.apply("web-2", later) is False
    assert fleet.presences()["web-2"].apps["mysite"].release == "20240501T120000Z"


def test_presence_claiming_another_instance_is_ignored(fleet: Fleet) -> None:
    with capture_logs() as logs:
        assert fleet.apply("web-2", presence("web-3")) is False
    assert [m.id for m in fleet.members()] == ["web-1"]
    assert logs[0]["event"] == "fleet.presence_mismatch"
    assert logs[0]["topic_instance"] == "web-2"


def test_own_stale_will_or_clearing_does_not_take_this_instance_offline(fleet: Fleet) -> None:
    assert fleet.apply("web-1", presence("web-1", state="offline")) is False
    assert fleet.apply("web-1", None) is False
    assert fleet.is_online("web-1")


def test_own_echo_with_new_clients_is_a_change(fleet: Fleet) -> None:
    more = [ClientInfo(name="client1", port=8081), ClientInfo(name="client2", port=8082)]
    assert fleet.apply("web-1", presence("web-1", clients=more)) is True


def test_online_member_without_address_counts_as_offline(fleet: Fleet) -> None:
    assert fleet.apply("web-2", presence("web-2", address=None)) is False
    assert fleet.members()[1].online is False


def test_members_are_sorted_by_id_and_signature_is_hashable(fleet: Fleet) -> None:
    for name in ("web-9", "db-1", "web-10"):
        fleet.apply(name, presence(name))
    assert [m.id for m in fleet.members()] == ["db-1", "web-1", "web-10", "web-9"]
    assert hash(fleet.signature()) == hash(fleet.signature())


def test_presence_parsed_from_the_wire_applies(fleet: Fleet) -> None:
    wire = parse_message(Presence, encode(presence("web-2", address="10.0.0.2")))
    assert fleet.apply("web-2", wire) is True


def test_template_context_lists_online_members_per_layer(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    fleet.apply("web-3", presence("web-3", state="offline", address="10.0.0.3"))
    fleet.apply("zeo-1", presence("zeo-1", address="10.0.0.5", layers=["zeoserver"], clients=[]))
    context = fleet.template_context(stack="mysite", stack_config={"haproxy": {"bind": ":80"}})
    assert context["instance"] == {
        "id": "web-1",
        "address": "10.0.0.1",
        "layers": ["plone_instances"],
    }
    assert [m["id"] for m in context["layers"]["plone_instances"]] == ["web-1", "web-2"]
    assert [m["id"] for m in context["layers"]["zeoserver"]] == ["zeo-1"]
    assert [(m["id"], m["online"]) for m in context["members"]] == [
        ("web-1", True),
        ("web-2", True),
        ("web-3", False),
        ("zeo-1", True),
    ]
    assert context["members"][1]["clients"] == [{"name": "client1", "port": 8081}]


# --- Debouncer --------------------------------------------------------------------------


class Recorder:
    """An action that counts its runs and can be told to fail or to take its time."""

    def __init__(self, *, duration: float = 0.0, fail: bool = False) -> None:
        self.runs = 0
        self.duration = duration
        self.fail = fail
        self.started = asyncio.Event()

    async def __call__(self) -> None:
        self.runs += 1
        self.started.set()
        await asyncio.sleep(self.duration)
        if self.fail:
            raise RuntimeError("boom")


async def test_burst_of_triggers_within_the_delay_runs_once() -> None:
    action = Recorder()
    async with Debouncer(1.0, action) as debouncer:
        for _ in range(10):
            debouncer.trigger()
            await asyncio.sleep(0)  # the loop runs between triggers, but no time passes
        await debouncer.wait_idle()
    assert action.runs == 1


async def test_run_waits_for_the_delay_after_the_last_trigger() -> None:
    loop = asyncio.get_running_loop()
    triggers: list[float] = []
    runs: list[float] = []

    async def action() -> None:
        runs.append(loop.time())

    async with Debouncer(0.2, action) as debouncer:
        for pause in (0.1, 0.1, 0.0):
            triggers.append(loop.time())
            debouncer.trigger()
            await asyncio.sleep(pause)
        await debouncer.wait_idle()
    # However slowly this loop ran, every run started at least the delay after the last
    # trigger before it, and the last trigger was followed by a run.
    assert runs and runs[-1] > triggers[-1]
    for started in runs:
        last = max(t for t in triggers if t < started)
        assert started - last >= 0.2 - 0.005


async def test_triggers_during_a_run_cause_exactly_one_more_run() -> None:
    action = Recorder(duration=0.1)
    async with Debouncer(0.01, action) as debouncer:
        debouncer.trigger()
        await action.started.wait()
        for _ in range(5):
            debouncer.trigger()
        await debouncer.wait_idle()
    assert action.runs == 2


async def test_separate_bursts_run_separately() -> None:
    action = Recorder()
    async with Debouncer(0.01, action) as debouncer:
        debouncer.trigger()
        await debouncer.wait_idle()
        debouncer.trigger()
        await debouncer.wait_idle()
    assert action.runs == 2


async def test_failing_action_is_logged_and_does_not_kill_the_debouncer() -> None:
    action = Recorder(fail=True)
    async with Debouncer(0.01, action, name="reconfigure") as debouncer:
        with capture_logs() as logs:
            debouncer.trigger()
            await debouncer.wait_idle()
            debouncer.trigger()
            await debouncer.wait_idle()
    assert action.runs == 2
    failures = [e for e in logs if e["event"] == "debounce.action_failed"]
    assert len(failures) == 2
    assert failures[0]["debouncer"] == "reconfigure"


async def test_close_cancels_a_scheduled_run() -> None:
    action = Recorder()
    debouncer = Debouncer(0.05, action)
    debouncer.trigger()
    await debouncer.close()
    await asyncio.sleep(0.08)
    assert action.runs == 0
    assert not debouncer.pending


async def test_close_cancels_a_running_action_and_later_triggers_are_ignored() -> None:
    action = Recorder(duration=10)
    debouncer = Debouncer(0, action)
    debouncer.trigger()
    await action.started.wait()
    await asyncio.wait_for(debouncer.close(), timeout=1)
    debouncer.trigger()
    assert not debouncer.pending
    assert action.runs == 1


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Debouncer(-1, Recorder())
