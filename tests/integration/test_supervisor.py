"""The supervisord client and the health-gated restart, against a real supervisord."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog
from support.ports import free_port
from support.supervisord import Supervisord, running_supervisord

from agent.adapters.health import (
    HealthCheckFailed,
    _self_connected,
    health_url_for,
    wait_healthy,
)
from agent.adapters.supervisor import ProcessInfo, SupervisorClient, match_programs
from agent.core.errors import ConfigError, RestartHalted, SupervisorError
from agent.node.rolling import RestartPlan, restart_programs

pytestmark = pytest.mark.slow

HEALTH = "http://127.0.0.1:{port}/"


@pytest.fixture
def sv(tmp_path: Path) -> Iterator[Supervisord]:
    with running_supervisord(tmp_path) as supervisord:
        yield supervisord


def with_clients(sv: Supervisord, *names: str, **kwargs: object) -> SupervisorClient:
    for name in names:
        sv.add_program(name, **kwargs)  # type: ignore[arg-type]
    sv.reload()
    return SupervisorClient(sv.url)


def plan(sv: Supervisord, **kwargs: object) -> RestartPlan:
    defaults: dict[str, object] = {
        "programs": ["client*"],
        "health_url": HEALTH,
        "health_timeout": 30.0,  # bounds a hang; healthy programs pass as soon as they answer
        "ports": sv.ports,
        "health_rise": 0,  # the balancer's rise has its own tests below
    }
    # A service (a ZEO server) is up once it listens at its address, as the agent checks it.
    services = kwargs.get("services", {})
    assert isinstance(services, dict)
    defaults["listen"] = {name: f"127.0.0.1:{sv.ports[name]}" for name in services}
    return RestartPlan(**{**defaults, **kwargs})  # type: ignore[arg-type]


def body(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode()


# --- matching, pure ------------------------------------------------------------------------


def proc(name: str, group: str | None = None) -> ProcessInfo:
    return ProcessInfo(name=name, group=group or name, statename="RUNNING", pid=1)


def test_match_sorts_naturally_and_matches_names_and_group_specs() -> None:
    procs = [proc("client10"), proc("client2"), proc("client1"), proc("celery"), proc("w", "zeo")]
    assert [p.name for p in match_programs(["client*"], procs)] == [
        "client1",
        "client2",
        "client10",
    ]
    assert [p.name for p in match_programs(["zeo:*", "celery"], procs)] == ["celery", "w"]


def test_pattern_matching_nothing_is_an_error_naming_the_pattern() -> None:
    with pytest.raises(SupervisorError, match=r"no program matches 'clinet\*'"):
        match_programs(["client*", "clinet*"], [proc("client1")])


def test_plan_rejects_a_bare_string_for_programs() -> None:
    with pytest.raises(ConfigError):
        RestartPlan(programs="client*")


# --- rolling restart -----------------------------------------------------------------------


async def test_rolling_restart_goes_in_natural_order_and_gives_each_program_a_new_pid(
    sv: Supervisord,
) -> None:
    client = with_clients(sv, "client10", "client2", "client1", "celery")
    before = sv.pids()
    with structlog.testing.capture_logs() as logs:
        report = await restart_programs(client, plan(sv))

    assert [r.name for r in report.restarted] == ["client1", "client2", "client10"]
    after = sv.pids()
    for r in report.restarted:
        assert r.action == "restarted"
        assert r.pid_before == before[r.name] != r.pid_after == after[r.name]
    assert after["celery"] == before["celery"], "unmatched programs are not touched"
    new_starts = [
        name for name, pid, _ in sv.starts() if pid in {r.pid_after for r in report.restarted}
    ]
    assert new_starts == ["client1", "client2", "client10"]
    events = [e for e in logs if e["event"] == "restart.program"]
    assert [(e["program"], e["pid_after"]) for e in events] == [
        (r.name, r.pid_after) for r in report.restarted
    ]
    assert all(e["seconds_to_healthy"] >= 0 for e in events)
    assert next(e for e in logs if e["event"] == "restart.done")["restarted"] == [
        "client1",
        "client2",
        "client10",
    ]


async def test_restart_delay_separates_consecutive_restarts(
    sv: Supervisord, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = with_clients(sv, "client1", "client2", "client3")
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(delay: float, *args: Any) -> Any:
        sleeps.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    report = await restart_programs(client, plan(sv, restart_delay=0.4))
    monkeypatch.undo()

    new_pids = {r.pid_after for r in report.restarted}
    times = [at for _, pid, at in sv.starts() if pid in new_pids]
    assert len(times) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 0.4 for gap in gaps), gaps
    assert sleeps.count(0.4) == 2, "a delay between programs, none after the last"


async def test_unhealthy_program_halts_the_roll_and_later_programs_keep_their_pid(
    sv: Supervisord,
) -> None:
    sv.add_program("client2", mode="bad")
    client = with_clients(sv, "client1", "client3")
    before = sv.pids()

    with pytest.raises(RestartHalted) as halted:
        await restart_programs(client, plan(sv, health_timeout=10.0))

    assert halted.value.program == "client2"
    assert halted.value.restarted == ["client1"]
    assert "client2" in str(halted.value) and "HTTP 503" in str(halted.value)
    assert isinstance(halted.value.__cause__, HealthCheckFailed)
    after = sv.pids()
    assert after["client1"] != before["client1"]
    assert after["client3"] == before["client3"], "the roll stopped before client3"


async def test_program_that_dies_on_start_halts_the_roll(sv: Supervisord) -> None:
    sv.add_program("client1", startsecs=1, startretries=0)
    client = with_clients(sv, "client2")
    before = sv.pids()
    sv.crash_on_start("client1")

    with pytest.raises(RestartHalted, match="client1") as halted:
        await restart_programs(client, plan(sv, health_timeout=10.0))

    assert halted.value.restarted == []
    assert sv.pids()["client2"] == before["client2"]


async def test_without_health_url_running_is_enough(sv: Supervisord) -> None:
    sv.add_program("client1", mode="bad")
    client = with_clients(sv)
    report = await restart_programs(client, plan(sv, health_url=None))
    assert [r.name for r in report.restarted] == ["client1"]


async def test_strategy_all_restarts_every_program(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "client2", "client3")
    before = sv.pids()
    report = await restart_programs(client, plan(sv, strategy="all"))

    assert [r.name for r in report.restarted] == ["client1", "client2", "client3"]
    assert all(r.pid_after == sv.pids()[r.name] != before[r.name] for r in report.restarted)


async def test_strategy_all_reports_the_unhealthy_program(sv: Supervisord) -> None:
    sv.add_program("client2", mode="bad")
    client = with_clients(sv, "client1")
    with pytest.raises(RestartHalted) as halted:
        await restart_programs(client, plan(sv, strategy="all", health_timeout=10.0))
    assert (halted.value.program, halted.value.restarted) == ("client2", ["client1"])


# --- configuration changes -----------------------------------------------------------------


async def test_new_program_in_config_is_added_after_existing_ones(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "client2")
    port = sv.add_program("client3")  # written, not yet known to supervisord

    report = await restart_programs(client, plan(sv))

    assert [(r.name, r.action) for r in report.restarted] == [
        ("client1", "restarted"),
        ("client2", "restarted"),
        ("client3", "added"),
    ]
    assert report.restarted[2].pid_before is None
    assert sv.pids()["client3"] == report.restarted[2].pid_after
    assert body(port).startswith("client3 v1")


async def test_program_removed_from_config_is_stopped_and_removed(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "client2", "client3")
    old_pid = sv.pids()["client3"]
    sv.remove_program("client3")

    report = await restart_programs(client, plan(sv))

    assert report.removed == ["client3"]
    assert [r.name for r in report.restarted] == ["client1", "client2"]
    assert "client3" not in sv.pids()
    assert not psutil.pid_exists(old_pid)


async def test_changed_command_is_readded_with_the_new_command(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "client2")
    before = sv.pids()
    sv.add_program("client2", tag="v2")  # same port, new command line

    report = await restart_programs(client, plan(sv))

    assert [(r.name, r.action) for r in report.restarted] == [
        ("client1", "restarted"),
        ("client2", "readded"),
    ]
    readded = report.restarted[1]
    assert readded.pid_before == before["client2"]
    assert "v2" in psutil.Process(readded.pid_after).cmdline()
    assert body(sv.ports["client2"]).startswith("client2 v2")


async def test_changed_command_pointing_nowhere_halts_the_roll(
    sv: Supervisord, tmp_path: Path
) -> None:
    client = with_clients(sv, "client1", "client2")
    before = sv.pids()
    sv.add_program("client1", command=f"{tmp_path}/releases/missing/bin/instance fg")

    with pytest.raises(RestartHalted, match=r"client1.*NO_FILE") as halted:
        await restart_programs(client, plan(sv))

    assert halted.value.restarted == []
    assert sv.pids()["client2"] == before["client2"]


async def test_changed_program_not_matched_is_left_alone(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "celery")
    before = sv.pids()
    sv.add_program("celery", tag="v2")

    await restart_programs(client, plan(sv))

    assert sv.pids()["celery"] == before["celery"]
    assert body(sv.ports["celery"]).startswith("celery v1")


async def test_unknown_pattern_raises_before_anything_restarts(sv: Supervisord) -> None:
    client = with_clients(sv, "client1")
    before = sv.pids()
    with pytest.raises(SupervisorError, match="no program matches 'web\\*'"):
        await restart_programs(client, plan(sv, programs=["client*", "web*"]))
    assert sv.pids() == before


async def test_a_program_without_a_port_is_healthy_once_running(sv: Supervisord) -> None:
    """A celery worker among the clients has no port: RUNNING is its health check."""
    client = with_clients(sv, "client1")
    before = sv.pids()
    report = await restart_programs(client, plan(sv, ports={}))
    assert [r.name for r in report.restarted] == ["client1"]
    assert sv.pids()["client1"] != before["client1"]


async def test_update_applies_every_change_at_once_like_supervisorctl(sv: Supervisord) -> None:
    client = with_clients(sv, "client1", "client2", "celery")
    before = sv.pids()
    sv.add_program("client3")
    sv.remove_program("client2")
    sv.add_program("celery", tag="v2")

    diff = await client.update()

    assert (diff.added, diff.changed, diff.removed) == (("client3",), ("celery",), ("client2",))
    sv.wait_serving()
    after = sv.pids()
    assert sorted(after) == ["celery", "client1", "client3"]
    assert after["client1"] == before["client1"]
    assert body(sv.ports["celery"]).startswith("celery v2")


# --- client errors -------------------------------------------------------------------------


async def test_unknown_program_is_a_supervisor_error_naming_it(sv: Supervisord) -> None:
    client = SupervisorClient(sv.url)
    with pytest.raises(SupervisorError, match=r"'nosuch'.*BAD_NAME"):
        await client.stop("nosuch")


async def test_missing_socket_means_supervisord_not_reachable(tmp_path: Path) -> None:
    url = f"unix://{tmp_path}/supervisor.sock"
    with pytest.raises(SupervisorError, match=f"supervisord not reachable at {re.escape(url)}"):
        await SupervisorClient(url).list_processes()


async def test_refused_http_port_means_supervisord_not_reachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SupervisorError, match=r"not reachable at http://127\.0\.0\.1"):
        await SupervisorClient(url, username="u", password="p").list_processes()


async def test_wrong_password_over_http_is_reported_without_the_password(
    tmp_path: Path,
) -> None:
    secret = "wrong-s3cret-passw0rd"
    with running_supervisord(tmp_path, http=True) as sv:
        good = SupervisorClient(sv.http_url, username=sv.username, password=sv.password)
        assert await good.state() == "RUNNING"
        bad = SupervisorClient(sv.http_url, username=sv.username, password=secret)
        with pytest.raises(SupervisorError, match="refused the credentials") as refused:
            await bad.list_processes()
        in_url = SupervisorClient(f"http://agent:{secret}@127.0.0.1:{sv.http_port}")
        with pytest.raises(SupervisorError) as refused_in_url:
            await in_url.state()

    for text in (str(refused.value), str(refused_in_url.value), repr(bad), repr(in_url)):
        assert secret not in text


# --- health checks -------------------------------------------------------------------------


async def test_health_check_waits_for_a_late_server() -> None:
    port = free_port()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"HTTP/1.0 302 Found\r\nLocation: /x\r\n\r\n")
        await writer.drain()
        writer.close()

    async def serve_later() -> asyncio.Server:
        await asyncio.sleep(0.3)
        return await asyncio.start_server(answer, "127.0.0.1", port)

    server_task = asyncio.create_task(serve_later())
    seconds = await wait_healthy(f"http://127.0.0.1:{port}/ok", timeout=5)
    server = await server_task
    server.close()
    await server.wait_closed()
    assert 0.25 <= seconds < 5


async def test_health_check_times_out_with_the_last_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(HealthCheckFailed, match=r"did not answer 2xx/3xx within 0\.3s") as failed:
        await wait_healthy(url, timeout=0.3)
    assert failed.value.url == url


async def test_a_socket_connected_to_itself_is_not_a_listener() -> None:
    """Dialling a port nobody listens on from that same port "connects" (a TCP self-connect),
    as a poll of a not-yet-started client on an ephemeral port can: not an answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect(sock.getsockname())
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        assert _self_connected(writer)
    finally:
        writer.close()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, other = await asyncio.open_connection("127.0.0.1", port)
    assert not _self_connected(other)
    other.close()
    server.close()
    await server.wait_closed()


def test_health_url_template_gets_name_and_port() -> None:
    assert health_url_for("http://h:{port}/{name}", name="c1", port=81) == "http://h:81/c1"
    with pytest.raises(ConfigError, match="needs a port"):
        health_url_for("http://h:{port}/", name="c1", port=None)
    with pytest.raises(ConfigError, match="only use"):
        health_url_for("http://h:{host}/", name="c1", port=1)


# --- configured order, services, the balancer's rise -----------------------------------------


async def test_programs_restart_in_the_configured_order_natural_within_each_entry(
    sv: Supervisord,
) -> None:
    client = with_clients(sv, "client10", "client2", "client1", "db")
    report = await restart_programs(client, plan(sv, programs=["db", "client2", "client*"]))
    assert [r.name for r in report.restarted] == ["db", "client2", "client1", "client10"]


async def test_an_unchanged_service_keeps_running_and_a_changed_one_goes_first(
    sv: Supervisord,
) -> None:
    client = with_clients(sv, "client1", "client2", "zeoserver")
    before = sv.pids()
    kept = await restart_programs(
        client, plan(sv, programs=["client*", "zeoserver"], services={"zeoserver": False})
    )
    assert [r.name for r in kept.restarted] == ["client1", "client2"]
    assert sv.pids()["zeoserver"] == before["zeoserver"]

    changed = await restart_programs(client, plan(sv, services={"zeoserver": True}))
    assert [r.name for r in changed.restarted] == ["zeoserver", "client1", "client2"]
    assert sv.pids()["zeoserver"] != before["zeoserver"]


async def test_a_service_whose_section_changed_is_readded_before_the_clients(
    sv: Supervisord,
) -> None:
    client = with_clients(sv, "client1", "zeoserver")
    sv.add_program("zeoserver", tag="v2")
    report = await restart_programs(client, plan(sv, services={"zeoserver": False}))
    assert [(r.name, r.action) for r in report.restarted] == [
        ("zeoserver", "readded"),
        ("client1", "restarted"),
    ]
    assert body(sv.ports["zeoserver"]).startswith("zeoserver v2")


async def test_a_new_service_is_started_before_new_clients_on_a_first_deploy(
    sv: Supervisord,
) -> None:
    """supervisord started with no programs: everything is new; the ZEO server first,
    then one client at a time (two clients creating an empty database's root conflict)."""
    client = SupervisorClient(sv.url)
    for name in ("client2", "client1", "zeoserver"):
        sv.add_program(name, autostart=True)
    report = await restart_programs(
        client, plan(sv, programs=["zeoserver", "client*"], services={"zeoserver": True})
    )
    assert report.supporting == ["zeoserver"]
    assert [(r.name, r.action) for r in report.restarted] == [
        ("client1", "added"),
        ("client2", "added"),
    ]
    order = [name for name, _, _ in sv.starts()]
    assert order == ["zeoserver", "client1", "client2"], order


async def test_the_next_client_waits_until_the_restarted_one_kept_answering(
    sv: Supervisord,
) -> None:
    """health_rise more healthy answers health_interval apart: the gap between one client
    serving and the next one starting is at least rise x interval, however fast the
    machine (a slow one only makes it longer)."""
    client = with_clients(sv, "client1", "client2")
    report = await restart_programs(client, plan(sv, health_rise=2, health_interval=0.3))
    new = {r.pid_after for r in report.restarted}
    times = [at for _, pid, at in sv.starts() if pid in new]
    assert len(times) == 2
    assert times[1] - times[0] >= 2 * 0.3


FLAKY = """
import http.server, os, sys, time
port, startlog = int(sys.argv[1]), sys.argv[2]
seen = []
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        seen.append(1)
        self.send_response(200 if len(seen) == 1 else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Handler)
with open(startlog, "a") as log:
    log.write(f"client1 {os.getpid()} {time.time():.6f}\\n")
server.serve_forever()
"""


async def test_a_client_that_answers_once_then_fails_halts_the_roll(
    sv: Supervisord, tmp_path: Path
) -> None:
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY)
    port = free_port()
    sv.add_program("client1", command=f"{sys.executable} {script} {port} {sv.start_log}")
    sv.ports["client1"] = port
    client = with_clients(sv, "client2")
    before = sv.pids()
    with pytest.raises(RestartHalted) as halted:
        await restart_programs(
            client, plan(sv, health_rise=2, health_interval=0.1, health_timeout=10.0)
        )
    message = str(halted.value)
    assert halted.value.program == "client1"
    assert re.search(
        r"client1 did not come back healthy: not steadily healthy \(HTTP 503\) "
        r"after \d+\.\d s \(health_timeout 10 s\)",
        message,
    ), message
    assert sv.pids()["client2"] == before["client2"]


async def test_the_halt_message_says_what_was_measured(sv: Supervisord) -> None:
    sv.add_program("client1", mode="bad")
    client = with_clients(sv)
    with pytest.raises(RestartHalted) as halted:
        await restart_programs(client, plan(sv, health_timeout=10.0))
    # What it saw last: a 503 once the program answers, or no answer if the machine was
    # too slow to start it within the timeout; either way the measured time is said.
    assert re.search(
        r"client1 did not come back healthy: (answered HTTP 503|no answer \([^)]*\)) after "
        r"\d+\.\d s \(health_timeout 10 s\)\. Restart halted; restarted before it: none",
        str(halted.value),
    ), str(halted.value)


class RecordingClient(SupervisorClient):
    """The real client, noting each stop and start in the order they were asked for."""

    calls: list[str]

    async def stop(self, namespec: str) -> None:  # type: ignore[override]
        self.calls.append(f"stop {namespec.split(':')[-1]}")
        await super().stop(namespec)

    async def start(self, namespec: str) -> None:  # type: ignore[override]
        self.calls.append(f"start {namespec.split(':')[-1]}")
        await super().start(namespec)


async def test_max_unavailable_restarts_clients_in_waves(sv: Supervisord) -> None:
    for name in ("client1", "client2", "client3", "client4"):
        sv.add_program(name)
    sv.reload()
    client = RecordingClient(sv.url)
    client.calls = []
    before = sv.pids()
    report = await restart_programs(client, plan(sv, max_unavailable=2))

    assert [r.name for r in report.restarted] == ["client1", "client2", "client3", "client4"]
    assert all(r.pid_before == before[r.name] != r.pid_after for r in report.restarted)
    # A wave stops together and starts together; the next one waits for it to be healthy.
    assert client.calls == [
        "stop client1",
        "stop client2",
        "start client1",
        "start client2",
        "stop client3",
        "stop client4",
        "start client3",
        "start client4",
    ]
    new_pids = {r.pid_after for r in report.restarted}
    started = [name for name, pid, _ in sv.starts() if pid in new_pids]
    assert set(started[:2]) == {"client1", "client2"}
    assert set(started[2:]) == {"client3", "client4"}


async def test_a_wave_with_an_unhealthy_client_halts_and_names_the_whole_wave(
    sv: Supervisord,
) -> None:
    client = with_clients(sv, "client1", "client2", "client3")
    before = sv.pids()
    sv.crash_on_start("client2")
    with pytest.raises(RestartHalted) as halted:
        await restart_programs(client, plan(sv, max_unavailable=2, health_timeout=15.0))
    assert halted.value.program == "client2"
    assert halted.value.restarted == ["client1"]
    assert sv.pids()["client3"] == before["client3"], "the next wave is not touched"
