"""Fleet membership from presence messages, and the debounce of reconfigures."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.core.errors import ConfigError
from agent.core.plan import Member
from agent.core.stackconfig import stack_settings
from agent.node.fleet import Debouncer, Fleet
from agent.node.membership import load_pins
from agent.node.stopping import host_shutting_down
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


@pytest.mark.parametrize("state", ["stopped", "unreachable", "offline"])
def test_a_resting_agent_keeps_its_endpoints_and_is_no_change(fleet: Fleet, state: str) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", presence("web-2", state=state, address="10.0.0.2")) is False
    expected = "unreachable" if state == "offline" else state
    assert fleet.members()[1] == Member(
        "web-2", "10.0.0.2", ("plone_instances",), True, state=expected
    )
    assert fleet.is_online("web-2")


def test_leaving_takes_the_endpoints_out_and_the_member_stays_listed(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", presence("web-2", state="leaving", address="10.0.0.2")) is True
    assert fleet.members()[1] == Member(
        "web-2", "10.0.0.2", ("plone_instances",), False, state="leaving"
    )
    assert not fleet.is_online("web-2")


def test_a_resting_presence_changes_the_state_never_the_endpoints(fleet: Fleet) -> None:
    """A Last Will is built when its agent connected: its clients may be out of date."""
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    before = fleet.signature()
    will = presence("web-2", state="unreachable", address="10.0.0.9", clients=[])
    assert fleet.apply("web-2", will) is False
    assert fleet.signature() == before
    assert fleet.members()[1].address == "10.0.0.2"


def test_cleared_retained_message_is_unknown_and_keeps_the_member(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.apply("web-2", None) is False
    assert [m.id for m in fleet.members()] == ["web-1", "web-2"]
    assert fleet.is_online("web-2")


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
    # web-3's agent is unreachable: its clients still serve, so it stays a backend.
    assert [m["id"] for m in context["layers"]["plone_instances"]] == ["web-1", "web-2", "web-3"]
    assert [m["id"] for m in context["layers"]["zeoserver"]] == ["zeo-1"]
    assert [(m["id"], m["online"]) for m in context["members"]] == [
        ("web-1", True),
        ("web-2", True),
        ("web-3", True),
        ("zeo-1", True),
    ]
    assert context["members"][1]["clients"] == [{"name": "client1", "port": 8081}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_resting_member_expires_after_member_timeout() -> None:
    clock = Clock()
    fleet = Fleet(presence("web-1"), member_timeout=60, clock=clock)
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    assert fleet.next_expiry() is None
    fleet.apply("web-2", presence("web-2", state="unreachable", address="10.0.0.2"))
    assert fleet.next_expiry() == 60
    clock.now += 30
    # Flipping between resting states does not restart the count.
    assert fleet.apply("web-2", presence("web-2", state="stopped", address="10.0.0.2")) is False
    assert fleet.next_expiry() == 30
    assert fleet.expire() is False
    clock.now += 30
    assert fleet.expire() is True
    assert not fleet.is_online("web-2")
    assert fleet.next_expiry() is None
    assert fleet.expire() is False
    # Back online: it counts again, and the count starts over next time.
    assert fleet.apply("web-2", presence("web-2", address="10.0.0.2")) is True
    fleet.apply("web-2", presence("web-2", state="stopped", address="10.0.0.2"))
    assert fleet.next_expiry() == 60


def test_nothing_is_compared_until_the_replay_is_over(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2"))
    fleet.begin_sync()
    assert fleet.apply("web-3", presence("web-3", address="10.0.0.3")) is False
    assert fleet.apply("web-3", presence("web-3", state="leaving", address="10.0.0.3")) is False
    assert fleet.end_sync() is False  # web-3 came and went within the replay
    fleet.begin_sync()
    fleet.apply("web-4", presence("web-4", address="10.0.0.4"))
    assert fleet.end_sync() is True
    fleet.begin_sync()  # a broker that lost its store replays nothing at all
    assert fleet.end_sync() is False
    assert [m.id for m in fleet.members() if m.online] == ["web-1", "web-2", "web-4"]


def zeo(name: str, address: str, state: str = "online") -> Presence:
    return presence(name, state=state, address=address, layers=["zeoserver"], clients=[])


def test_the_zeo_member_stays_pinned_until_it_leaves_and_another_counts(fleet: Fleet) -> None:
    fleet.apply("db-2", zeo("db-2", "10.0.0.22"))
    assert fleet.pins() == {"zeoserver": "db-2"}
    # db-1 sorts first, but db-2 serves: it stays.
    assert fleet.apply("db-1", zeo("db-1", "10.0.0.21")) is True
    assert fleet.pins() == {"zeoserver": "db-2"}
    # Its agent stops or is unreachable: nothing changes.
    assert fleet.apply("db-2", zeo("db-2", "10.0.0.22", "unreachable")) is False
    assert fleet.apply("db-2", zeo("db-2", "10.0.0.22", "stopped")) is False
    assert fleet.pins() == {"zeoserver": "db-2"}
    # It leaves, and db-1 is there: db-1 takes over.
    assert fleet.apply("db-2", zeo("db-2", "10.0.0.22", "leaving")) is True
    assert fleet.pins() == {"zeoserver": "db-1"}


def test_a_pin_without_a_successor_is_kept(fleet: Fleet) -> None:
    fleet.apply("db-1", zeo("db-1", "10.0.0.21"))
    fleet.apply("db-1", zeo("db-1", "10.0.0.21", "leaving"))
    assert fleet.pins() == {"zeoserver": "db-1"}


def test_pins_survive_from_a_previous_run_and_follow_the_stack_layers() -> None:
    fleet = Fleet(presence("web-1"), pins={"zeoserver": "db-2"})
    fleet.begin_sync()  # as the daemon does: the replay comes in any order
    fleet.apply("db-1", zeo("db-1", "10.0.0.21"))
    fleet.apply("db-2", zeo("db-2", "10.0.0.22"))
    assert fleet.end_sync() is True
    assert fleet.pins() == {"zeoserver": "db-2"}
    settings = stack_settings({"plone_instances": {"solr_layer": "search"}})
    fleet.configure(settings)
    fleet.apply("s-1", presence("s-1", address="10.0.0.31", layers=["search"], clients=[]))
    assert fleet.pins() == {"zeoserver": "db-2", "search": "s-1"}


ROSTER = {
    "roster": {
        "zeoserver": ["db-1"],
        "plone_instances": ["10.0.0.0/24", "web-*"],
        "frontend": ["lb-1"],
    }
}


def test_roster_refuses_a_claim_it_does_not_give_and_keeps_the_previous_presence(
    fleet: Fleet,
) -> None:
    fleet.configure(stack_settings(ROSTER))
    fleet.apply("db-1", zeo("db-1", "10.0.1.1"))
    fleet.apply("app-7", presence("app-7", address="10.0.0.7"))  # by its address range
    before = fleet.signature()
    with capture_logs() as logs:
        # web-2 is allowed plone_instances, not zeoserver: nothing of it counts.
        assert fleet.apply("web-2", presence("web-2", layers=["zeoserver"])) is False
        # app-7 moves outside its range: refused whole, its old presence stays.
        assert fleet.apply("app-7", presence("app-7", address="127.66.66.66")) is False
    assert fleet.signature() == before
    assert fleet.pins() == {"zeoserver": "db-1"}
    assert [e["member"] for e in logs if e["event"] == "fleet.claim_refused"] == [
        "web-2",
        "app-7",
    ]
    assert fleet.members()[0].address == "10.0.0.7"


def test_roster_tightened_later_drops_the_claims_it_no_longer_gives(fleet: Fleet) -> None:
    fleet.apply("web-2", presence("web-2", address="10.0.0.2", layers=["plone_instances"]))
    assert fleet.configure(stack_settings({"roster": {"plone_instances": ["web-1"]}})) is True
    assert fleet.members()[1].layers == ()
    # The instance itself is not checked: its layers are its own configuration.
    assert fleet.own_member().layers == ("plone_instances",)


def test_no_roster_is_warned_about_once(fleet: Fleet) -> None:
    with capture_logs() as logs:
        fleet.configure(stack_settings({}))
        fleet.configure(stack_settings({}))
    assert [e["event"] for e in logs].count("fleet.no_roster") == 1


def test_a_roster_entry_that_is_not_a_range_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        stack_settings({"roster": {"plone_instances": ["10.0.0.0/99"]}})
    assert "roster" in str(info.value.problems)


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


# --- the daemon's membership helpers ------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([sys.executable, "-c", "print('stopping')"], True),
        ([sys.executable, "-c", "print('running')"], False),
        ([sys.executable, "-c", "print('degraded'); raise SystemExit(1)"], False),
        (["/nonexistent/systemctl", "is-system-running"], False),
    ],
)
async def test_the_host_shuts_down_only_when_systemd_says_stopping(
    argv: list[str], expected: bool
) -> None:
    assert await host_shutting_down(argv) is expected


def test_pins_load_from_what_the_daemon_saved_and_tolerate_damage(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    assert load_pins(path) == {}
    path.write_text('{"pins": {"zeoserver": "db-1"}}')
    assert load_pins(path) == {"zeoserver": "db-1"}
    for damaged in ("{not json", "[]", '{"pins": 3}'):
        path.write_text(damaged)
        assert load_pins(path) == {}
