"""The operator's pure logic (targets, batches, results, exit codes, rendering) and its
configuration sources. Fast: no broker here; tests/test_operator_cli.py has the real one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from agent.adapters.keys import generate_keypair
from agent.core.errors import ConfigError
from agent.core.exits import EXIT_FAILED, EXIT_NO_INSTANCE, EXIT_OK, EXIT_TIMEOUT
from agent.operator.commands import parse_log
from agent.operator.config import (
    load_operator_config,
    load_stack_config,
    parse_broker_url,
    signed_stack_config,
)
from agent.operator.display import (
    LogFilter,
    age,
    clean,
    render_log,
    render_status,
    render_summary,
    short_revision,
)
from agent.operator.rollouts import (
    Batch,
    InstanceResult,
    RunReport,
    Tracker,
    exit_code,
    plan_batches,
    select_targets,
    stop_reason,
)
from agent.protocol import AppPresence, AppStatus, Event, Presence, StatusRecord

NOW = datetime(2025, 1, 2, 12, 0, tzinfo=UTC)
SHA = "3f2a9c0d1e2b3c4d5e6f708192a3b4c5d6e7f809"


def presence(instance: str, *layers: str, state: str = "online") -> Presence:
    return Presence(
        instance=instance,
        state=state,
        layers=list(layers),
        agent_version="0.1",
        since=NOW - timedelta(minutes=5),
        apps={"mysite": AppPresence(release="20250101T000000Z", revision=SHA)},
    )


FLEET = {
    p.instance: p
    for p in (
        presence("web-1", "plone_instances"),
        presence("web-2", "plone_instances"),
        presence("web-3", "plone_instances", state="offline"),
        presence("db-1", "zeoserver"),
    )
}


def event(command_id: UUID, instance: str, phase: str, status: str, **details: object) -> Event:
    return Event(
        instance=instance,
        command_id=command_id,
        kind="deploy",
        app="mysite",
        phase=phase,
        status=status,
        details=details,
        at=NOW,
    )


def result(instance: str, outcome: str) -> InstanceResult:
    return InstanceResult(instance=instance, outcome=outcome, command_id="c", batch=1)


# --- targets and batches ----------------------------------------------------------------


def test_no_targets_selects_every_online_instance_of_the_stack() -> None:
    selection = select_targets(FLEET, None)
    assert selection.online == ("db-1", "web-1", "web-2")
    assert selection.offline == ("web-3",)


def test_targets_match_instance_ids_and_layers_alike() -> None:
    selection = select_targets(FLEET, ["zeoserver", "web-2", "web-3", "nowhere"])
    assert selection.online == ("db-1", "web-2")
    assert selection.offline == ("web-3",)
    assert selection.unmatched == ("nowhere",)


def test_batches_are_consecutive_sorted_slices() -> None:
    assert plan_batches(["c", "a", "e", "b", "d"], 2) == [("a", "b"), ("c", "d"), ("e",)]
    assert plan_batches(["b", "a"], None) == [("a", "b")]
    assert plan_batches([], 3) == []
    with pytest.raises(ValueError):
        plan_batches(["a"], 0)


# --- following a command ----------------------------------------------------------------


def test_tracker_is_done_when_every_expected_instance_sent_a_final_event() -> None:
    command = uuid4()
    tracker = Tracker(command, ["web-1", "web-2"], batch=1, now=0.0)
    tracker.feed(event(command, "web-1", "received", "started"), 0.1)
    progress = tracker.feed(event(command, "web-1", "buildout", "progress"), 0.2)
    assert progress is not None and progress.phase == "buildout" and not tracker.done
    tracker.feed(
        event(
            command,
            "web-1",
            "result",
            "succeeded",
            revision=SHA,
            release="r1",
            seconds=12.34,
            decision="new-revision",
        ),
        12.5,
    )
    tracker.feed(event(command, "web-2", "result", "unchanged"), 3.0)
    assert tracker.done
    first, second = tracker.results()
    assert (first.outcome, first.revision, first.release, first.seconds) == (
        "succeeded",
        SHA,
        "r1",
        12.3,
    )
    assert second.outcome == "unchanged" and second.seconds == 3.0


def test_tracker_ignores_other_commands_and_a_second_final_event() -> None:
    command = uuid4()
    tracker = Tracker(command, ["web-1"], batch=1, now=0.0)
    assert tracker.feed(event(uuid4(), "web-1", "result", "failed"), 1.0) is None
    tracker.feed(event(command, "web-1", "result", "succeeded"), 1.0)
    tracker.feed(event(command, "web-1", "result", "failed"), 2.0)
    assert [r.outcome for r in tracker.results()] == ["succeeded"]


def test_a_rejection_is_final_in_any_phase_and_keeps_its_reason() -> None:
    command = uuid4()
    tracker = Tracker(command, ["web-1"], batch=1, now=0.0)
    rejected = Event(
        instance="web-1",
        command_id=command,
        phase="received",
        status="rejected",
        message="signature does not match any trusted key",
        at=NOW,
    )
    tracker.feed(rejected, 0.1)
    assert tracker.done
    assert tracker.results()[0].message == "signature does not match any trusted key"


def test_an_answer_from_an_unexpected_instance_is_reported_but_not_awaited() -> None:
    command = uuid4()
    tracker = Tracker(command, ["web-1"], batch=1, now=0.0)
    tracker.feed(event(command, "web-7", "result", "succeeded"), 0.5)
    assert not tracker.done
    tracker.feed(event(command, "web-1", "result", "succeeded"), 0.6)
    assert tracker.done and [r.instance for r in tracker.results()] == ["web-1", "web-7"]


def test_expire_marks_silent_instances_timed_out() -> None:
    command = uuid4()
    tracker = Tracker(command, ["web-1", "web-2"], batch=2, now=0.0)
    tracker.feed(event(command, "web-1", "buildout", "progress"), 1.0)
    tracker.expire(30.0)
    outcomes = {r.instance: (r.outcome, r.message, r.batch) for r in tracker.results()}
    assert outcomes == {
        "web-1": ("timed-out", "no result (last phase: buildout)", 2),
        "web-2": ("timed-out", "no answer at all", 2),
    }


# --- exit codes and reports -------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        (["succeeded", "unchanged"], EXIT_OK),
        (["succeeded", "failed"], EXIT_FAILED),
        (["rejected"], EXIT_FAILED),
        (["interrupted", "timed-out"], EXIT_FAILED),
        (["succeeded", "timed-out"], EXIT_TIMEOUT),
    ],
)
def test_exit_code_follows_the_worst_outcome(outcomes: list[str], code: int) -> None:
    assert exit_code([result(f"i{n}", o) for n, o in enumerate(outcomes)], targeted=True) == code


def test_nothing_targeted_is_exit_4() -> None:
    assert exit_code([], targeted=False) == EXIT_NO_INSTANCE
    assert RunReport(kind="deploy", app="mysite").exit_code == EXIT_NO_INSTANCE


def test_a_published_command_without_wait_is_exit_0() -> None:
    report = RunReport(
        kind="deploy",
        app="mysite",
        waited=False,
        batches=[Batch(index=1, instances=("web-1",), command_id="c1", state="ran")],
    )
    assert report.exit_code == EXIT_OK
    assert "sent deploy mysite: command c1" in render_summary(report, color=False)


def test_rolling_stops_only_when_failures_exceed_the_allowance() -> None:
    report = RunReport(
        kind="deploy", app="mysite", results=[result("a", "succeeded"), result("b", "failed")]
    )
    assert stop_reason(report, 1) is None
    assert "more than --max-failures 0" in (stop_reason(report, 0) or "")


def test_json_report_lists_batches_commands_and_results() -> None:
    report = RunReport(
        kind="deploy",
        app="mysite",
        batches=[
            Batch(index=1, instances=("a",), command_id="c1", state="ran"),
            Batch(index=2, instances=("b",), state="skipped"),
        ],
        results=[result("a", "failed")],
    )
    document = report.to_json()
    assert document["command_ids"] == ["c1"]
    assert [b["state"] for b in document["batches"]] == ["ran", "skipped"]
    assert document["results"][0]["outcome"] == "failed" and document["exit_code"] == 1


# --- rendering --------------------------------------------------------------------------


def test_summary_is_a_table_with_a_verdict() -> None:
    report = RunReport(
        kind="deploy",
        app="mysite",
        batches=[Batch(index=1, instances=("a",))],
        results=[
            InstanceResult(
                instance="web-1",
                outcome="succeeded",
                command_id="c",
                batch=1,
                revision=SHA,
                release="r1",
                seconds=4.2,
            )
        ],
    )
    lines = render_summary(report, color=False).splitlines()
    assert lines[0].split() == ["INSTANCE", "OUTCOME", "REVISION", "RELEASE", "SECONDS", "MESSAGE"]
    assert lines[1].split() == ["web-1", "succeeded", SHA[:10], "r1", "4.2"]
    assert lines[-1] == "deploy mysite: 1 succeeded"


def test_status_shows_state_age_layers_revision_and_last_result() -> None:
    statuses = {
        "web-1": StatusRecord(
            instance="web-1",
            updated_at=NOW,
            apps={"mysite": AppStatus(status="failed", at=NOW - timedelta(hours=3))},
        )
    }
    text = render_status(FLEET, statuses, now=NOW, color=False)
    web1 = next(line for line in text.splitlines() if line.startswith("web-1")).split()
    assert web1 == [
        "web-1",
        "online",
        "5m",
        "plone_instances",
        "mysite",
        SHA[:10],
        "20250101T000000Z",
        "failed",
        "3h",
    ]
    assert "offline" in next(line for line in text.splitlines() if line.startswith("web-3"))
    assert render_status({}, {}, now=NOW, color=False) == "no instances"


def test_text_from_the_broker_cannot_reach_the_terminal_raw() -> None:
    assert clean("ok\x1b[2J\nnext") == "ok?[2J?next"
    line = render_log(
        "web-1",
        {
            "event": "x\x1b]0;pwned\x07",
            "level": "info",
            "line": "a\rb",
            "timestamp": "2025-01-02T12:00:01Z",
        },
        color=False,
    )
    assert "\x1b" not in line and "\r" not in line and "\x07" not in line
    assert line.startswith("12:00:01 web-1 info")


def test_log_filter_by_instance_app_and_minimum_level() -> None:
    wanted = LogFilter(instance="web-1", app="mysite", level="warning")
    assert wanted.accepts("web-1", {"app": "mysite", "level": "error"})
    assert not wanted.accepts("web-1", {"app": "mysite", "level": "info"})
    assert not wanted.accepts("web-2", {"app": "mysite", "level": "error"})
    assert not wanted.accepts("web-1", {"app": "other", "level": "error"})


def test_hostile_log_payloads_are_dropped_not_raised() -> None:
    assert parse_log(b"[" * 100_000) is None
    assert parse_log(b"not json") is None and parse_log(b"[1]") is None
    assert parse_log(b'{"event": "ok"}') == {"event": "ok"}


def test_ages_and_revisions_are_short() -> None:
    assert [age(NOW - timedelta(seconds=s), NOW) for s in (5, 300, 7200, 172800)] == [
        "5s",
        "5m",
        "2h",
        "2d",
    ]
    assert short_revision(SHA) == SHA[:10] and short_revision("v1.2") == "v1.2"


# --- configuration sources --------------------------------------------------------------


def test_broker_url_carries_credentials_tls_and_default_ports() -> None:
    broker, password = parse_broker_url(
        "mqtts://ci%40x:s3cr%2Ft@mq.example.org", topic_prefix="acme"
    )
    assert (broker.host, broker.port, broker.username, password) == (
        "mq.example.org",
        8883,
        "ci@x",
        "s3cr/t",
    )
    assert broker.tls is not None and broker.topic_prefix == "acme"
    plain, none = parse_broker_url("mqtt://10.0.0.5")
    assert (plain.port, plain.tls, none) == (1883, None, None)
    with pytest.raises(ConfigError, match="mqtt://"):
        parse_broker_url("http://10.0.0.5")


def test_operator_file_relative_key_and_environment_fill_in(tmp_path: Path) -> None:
    path = tmp_path / "operator.yaml"
    path.write_text("stack: mysite\nbroker: {host: mq, port: 1884}\nkey: keys/op\n")
    config = load_operator_config(path, explicit=True, environ={"DEPLOY_AGENT_STACK": "other"})
    assert (config.stack, config.address, config.key_path) == (
        "mysite",
        "mq:1884",
        tmp_path / "keys" / "op",
    )
    assert config.topics.commands == "deploy-agent/mysite/commands"


def test_an_agent_configuration_serves_with_a_key_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "stack: mysite\ninstance: {id: web-1, address: 10.0.0.1}\n"
        "broker: {host: 10.0.0.9, topic_prefix: acme}\napps: {}\n"
    )
    config = load_operator_config(path, explicit=True, environ={"DEPLOY_AGENT_KEY": "/k/op"})
    assert (config.topics.base, config.key_path) == ("acme/mysite", Path("/k/op"))


def test_environment_alone_configures_a_ci_job(tmp_path: Path) -> None:
    environ = {
        "DEPLOY_AGENT_BROKER": "mqtt://deployer:pw@mq:1883",
        "DEPLOY_AGENT_STACK": "mysite",
        "DEPLOY_AGENT_KEY": "/run/secrets/deploy",
    }
    config = load_operator_config(tmp_path / "absent.yaml", explicit=False, environ=environ)
    assert (config.broker.username, config.password, config.source) == (
        "deployer",
        "pw",
        "environment",
    )
    assert "pw" not in repr(config)


def test_missing_broker_or_unknown_keys_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DEPLOY_AGENT_BROKER"):
        load_operator_config(tmp_path / "absent.yaml", explicit=False, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_operator_config(tmp_path / "absent.yaml", explicit=True, environ={})
    path = tmp_path / "agent.yaml"
    path.write_text("stack: mysite\nbrokr: {host: mq}\n")
    with pytest.raises(ConfigError) as error:
        load_operator_config(path, explicit=True, environ={})
    assert "brokr" in str(error.value)


def test_config_push_takes_an_agent_config_or_a_bare_stack_config(tmp_path: Path) -> None:
    agent = tmp_path / "agent.yaml"
    agent.write_text("stack: mysite\nstack_config: {plone_instances: {per_cpu: 1}}\n")
    assert load_stack_config(agent, "mysite") == {"plone_instances": {"per_cpu": 1}}
    with pytest.raises(ConfigError, match="is for stack 'mysite'"):
        load_stack_config(agent, "other")
    bare = tmp_path / "stack.yaml"
    bare.write_text("plone_instances: {restart_delay: 5}\nother_cookbook: {x: 1}\n")
    assert load_stack_config(bare, "mysite")["other_cookbook"] == {"x": 1}


def test_pushed_config_is_signed_and_must_be_json(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "op")
    config = load_operator_config(
        None,
        explicit=False,
        environ={
            "DEPLOY_AGENT_BROKER": "mqtt://mq",
            "DEPLOY_AGENT_STACK": "mysite",
            "DEPLOY_AGENT_KEY": str(key.private_path),
        },
    )
    signed = signed_stack_config(config, {"plone_instances": {"per_cpu": 1}})
    assert signed.key_id == key.key_id and signed.stack == "mysite"
    with pytest.raises(ConfigError, match="cannot be published"):
        signed_stack_config(config, {"when": datetime(2025, 1, 1).date()})
