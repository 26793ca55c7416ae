"""The pipeline's branches through its seams: a fake ``Restarter`` (the one fake: a client
that fails its health gate on demand), a trivial build command instead of buildout, a real
git mirror and real releases. Fast (no buildout, no supervisord): each branch costs a
checkout, not a Plone build.
"""

from __future__ import annotations

from pathlib import Path

from support.seams import APP, FACTS, FakeRestarter, configured, current
from support.site import SiteRepo

from agent.core.errors import SupervisorError
from agent.node.pipeline import Pipeline


async def test_first_deploy_with_no_previous_release_switches_and_restarts(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    restarter = FakeRestarter()
    config = configured(tmp_path, site_repo)
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "succeeded", outcome.message
    assert outcome.decision == "new-revision"
    assert current(config) == outcome.release
    assert restarter.calls == [None]
    assert (config.paths.root / APP / "current" / "built").read_text() == "ok"


async def test_halted_restart_with_on_failure_rollback_restores_the_previous_release(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo, **{f"apps.{APP}.restart.on_failure": "rollback"})
    first = await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    restarter = FakeRestarter(halt_at="client2")
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "restart-halted"
    assert "rolled back to" in outcome.message
    assert outcome.release == first.release == current(config)
    # What had been restarted onto the new code is restarted again, onto the old.
    assert restarter.calls == [None, ["client1", "client2"]]


async def test_halted_restart_with_halt_leaves_the_new_release_live_and_says_so(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    restarter = FakeRestarter(halt_at="client3")
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed"
    assert current(config) == outcome.release
    assert "is live but the restart halted" in outcome.message
    assert restarter.calls == [None]


async def test_a_restart_that_cannot_reach_supervisord_fails_and_the_switch_stands(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    restarter = FakeRestarter(error=SupervisorError("supervisord is not running"))
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "supervisor-error"
    assert current(config) == outcome.release
    assert "supervisord is not running" in outcome.message


async def test_a_second_deploy_of_the_same_inputs_is_unchanged_and_restarts_nothing(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    restarter = FakeRestarter()
    pipeline = Pipeline(config, facts=FACTS, restarter=restarter)
    await pipeline.deploy(APP)
    again = await pipeline.deploy(APP)
    assert again.status == "unchanged" and again.decision == "unchanged"
    assert restarter.calls == [None]


async def test_the_stack_configuration_is_read_at_each_command(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    stack = dict(config.stack_config)
    pipeline = Pipeline(config, facts=FACTS, restarter=FakeRestarter(), stack_config=lambda: stack)
    await pipeline.deploy(APP)
    stack["plone_instances"] = {**stack["plone_instances"], "zodb_cache_size": 777}
    changed = await pipeline.deploy(APP)
    assert changed.decision == "config-changed"
    cfg = (config.paths.root / APP / "current" / "deploy.cfg").read_text()
    assert "zodb-cache-size = 777" in cfg
