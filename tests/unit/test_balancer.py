"""Reading HAProxy's stats CSV for the roll's balancer gate (pure parts)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agent.adapters.balancer import (
    admin_result,
    busy,
    csv_url,
    in_service,
    page_url,
    server_row,
    server_status,
)
from agent.core.config import (
    AppConfig,
    BalancerConfig,
    RestartConfig,
    SupervisorConfig,
)
from agent.core.errors import ConfigError
from agent.core.plan import ClientLayout
from agent.node.restart import SupervisorRestarter

# The shape HAProxy 2.6 writes (first columns of `show stat` / the stats page's ;csv).
CSV = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,"
    "wretr,wredis,status,weight\n"
    "zeo_clients,web-1-client1,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1\n"
    "zeo_clients,web-1-client2,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1\n"
    "zeo_clients,web-2-client1,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP 1/3,1\n"
    "zeo_clients,BACKEND,0,0,0,0,1,0,0,0,0,0,,0,0,0,0,UP,2\n"
    "other,web-1-client2,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,1\n"
)


def test_a_servers_status_is_read_from_its_own_backend() -> None:
    assert server_status(CSV, "zeo_clients", "web-1-client1") == "UP"
    assert server_status(CSV, "zeo_clients", "web-1-client2") == "DOWN"
    assert server_status(CSV, "other", "web-1-client2") == "UP"
    assert server_status(CSV, "zeo_clients", "web-3-client1") is None


def test_a_server_is_busy_while_it_answers_or_has_requests_queued() -> None:
    text = CSV.replace("web-1-client1,0,0,0,0", "web-1-client1,2,2,1,1")
    row = server_row(text, "zeo_clients", "web-1-client1")
    assert row is not None and busy(row) == 3
    idle = server_row(CSV, "zeo_clients", "web-1-client2")
    assert idle is not None and busy(idle) == 0
    assert busy({"scur": "", "qcur": ""}) == 0  # a BACKEND-like row with empty columns


def test_the_admin_forms_verdict_is_read_from_where_haproxy_redirects() -> None:
    assert admin_result("http://lb:8404/;st=DONE") == "DONE"
    assert admin_result("http://lb:8404/stats;st=DENY") == "DENY"
    assert admin_result("http://lb:8404/") == "NO ANSWER"
    assert page_url("http://lb:8404/stats;csv") == "http://lb:8404/stats"
    assert page_url("http://lb:8404/") == "http://lb:8404/"


def test_draining_is_on_by_default_with_a_bounded_wait() -> None:
    config = BalancerConfig(stats_url="http://lb:8404/")
    assert (config.drain, config.drain_timeout) == (True, 30)
    with pytest.raises(ValidationError):
        BalancerConfig(stats_url="http://lb:8404/", drain_timeout=-1)


def test_up_with_a_failed_check_and_unchecked_servers_are_in_service() -> None:
    assert [in_service(s) for s in ("UP", "UP 1/3", "no check")] == [True, True, True]
    assert [in_service(s) for s in ("DOWN", "DOWN 1/2", "MAINT", "NOLB", "DRAIN", "")] == [
        False
    ] * 6


def test_the_csv_export_is_the_stats_page_with_csv_appended() -> None:
    assert csv_url("http://10.0.0.5:8404/") == "http://10.0.0.5:8404/;csv"
    assert csv_url("http://10.0.0.5:8404/stats;csv") == "http://10.0.0.5:8404/stats;csv"
    with pytest.raises(ConfigError, match="stats_url"):
        csv_url("file:///etc/passwd")


def test_the_config_refuses_a_stats_url_that_is_not_http() -> None:
    assert BalancerConfig(stats_url="https://lb:8404/").backend == "zeo_clients"
    for bad in ("file:///x", "http://", "lb:8404", "http://lb:8404/ x"):
        with pytest.raises(ValidationError):
            BalancerConfig(stats_url=bad)


def test_haproxy_names_the_clients_of_this_instance_as_the_shipped_template_does() -> None:
    restarter = SupervisorRestarter(SupervisorConfig(url="http://127.0.0.1:9001"), instance="web-1")
    restart = RestartConfig(balancer=BalancerConfig(stats_url="http://lb:8404/"))
    app = AppConfig(repository="https://git.example.org/site.git", restart=restart)
    gate = restarter.balancer_gate(app, ClientLayout(count=2, base_port=8080))
    assert gate is not None
    assert gate.servers == {"client1": "web-1-client1", "client2": "web-1-client2"}
    assert (gate.drain, gate.drain_timeout) == (True, 30)
    bad = app.model_copy(
        update={
            "restart": restart.model_copy(
                update={
                    "balancer": BalancerConfig(stats_url="http://lb:8404/", server="{host}-{name}")
                }
            )
        }
    )
    with pytest.raises(ConfigError, match="only use"):
        restarter.balancer_gate(bad, ClientLayout(count=1, base_port=8080))
    assert (
        restarter.balancer_gate(
            app.model_copy(update={"restart": RestartConfig()}),
            ClientLayout(count=1, base_port=8080),
        )
        is None
    )
