"""The release pipeline on one host, with real git repositories and real buildout runs of
the example site (no supervisor here: restarts are covered by test_restart_e2e.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.cli import cli_argv, run_cli
from support.site import REPO, SiteRepo, write_config

from agent.adapters.configfile import load_config
from agent.adapters.host import HostFacts
from agent.adapters.releases import ReleaseManager
from agent.core.config import AgentConfig
from agent.node.pipeline import NO_PROGRESS, Pipeline, _Run

APP = "zeo-site"
FACTS = HostFacts(cpu_count=2, memory_mb=4096)


def pipeline(config: AgentConfig) -> Pipeline:
    return Pipeline(config, facts=FACTS)


def current(config: AgentConfig) -> Path:
    return (config.paths.root / APP / "current").resolve()


def releases(config: AgentConfig) -> list[str]:
    return sorted(p.name for p in (config.paths.root / APP / "releases").iterdir())


@pytest.fixture
def config(tmp_path: Path, site_repo: SiteRepo) -> AgentConfig:
    return write_config(tmp_path, site_repo)


async def test_first_deploy_builds_a_release_and_switches_current(config, site_repo):
    outcome = await pipeline(config).deploy(APP)
    assert outcome.status == "succeeded", outcome.message
    assert outcome.decision == "new-revision"
    assert outcome.revision == site_repo.head()
    live = current(config)
    assert live.parent.name == "releases" and live.name == outcome.release
    assert (live / "bin" / "client1").exists() and (live / "bin" / "client2").exists()
    assert f"revision = {site_repo.head()}" in (live / "deploy.cfg").read_text()
    state = json.loads((config.paths.state / "state.json").read_text())
    assert state["apps"][APP]["sha"] == site_repo.head()
    assert state["apps"][APP]["release"] == outcome.release


async def test_second_deploy_with_nothing_changed_is_a_no_op(config):
    first = await pipeline(config).deploy(APP)
    again = await pipeline(config).deploy(APP)
    assert again.status == "unchanged" and again.decision == "unchanged"
    assert again.release == first.release
    assert releases(config) == [first.release]


async def test_config_change_builds_a_new_release_of_the_same_revision(tmp_path, config):
    first = await pipeline(config).deploy(APP)
    changed = config.model_copy(
        update={
            "stack_config": {
                **config.stack_config,
                "plone_instances": {**config.stack_config["plone_instances"], "zodb_cache_size": 9},
            }
        }
    )
    second = await pipeline(changed).deploy(APP)
    assert second.status == "succeeded" and second.decision == "config-changed"
    assert second.revision == first.revision and second.release != first.release
    assert "zodb-cache-size = 9" in (current(config) / "deploy.cfg").read_text()


async def test_new_commit_builds_a_new_release(config, site_repo):
    first = await pipeline(config).deploy(APP)
    sha = site_repo.commit({"VERSION": "2\n"})
    second = await pipeline(config).deploy(APP)
    assert second.decision == "new-revision" and second.revision == sha
    assert (current(config) / "VERSION").read_text() == "2\n"
    assert first.release in releases(config)


async def test_always_buildout_rebuilds_even_when_nothing_changed(config):
    first = await pipeline(config).deploy(APP)
    again = await pipeline(config).deploy(APP, always_buildout=True)
    assert again.status == "succeeded" and again.decision == "always-buildout"
    assert again.release != first.release


async def test_failed_buildout_leaves_current_untouched(config, site_repo):
    first = await pipeline(config).deploy(APP)
    site_repo.commit(
        {
            "cfg/base.cfg": (site_repo.work / "cfg/base.cfg").read_text()
            + "\n[client1]\nrecipe = no.such.recipe\n"
        }
    )
    failed = await pipeline(config).deploy(APP)
    assert failed.status == "failed" and failed.error == "buildout-failed"
    assert "exit status" in failed.message and "no.such.recipe" in failed.message
    assert current(config).name == first.release
    assert (
        json.loads((config.paths.state / "state.json").read_text())["apps"][APP]["release"]
        == first.release
    )


async def test_revision_that_does_not_exist_is_a_clear_error(config):
    outcome = await pipeline(config).deploy(APP, revision="no-such-branch")
    assert outcome.status == "failed" and outcome.error == "revision-not-found"
    assert "no-such-branch" in outcome.message
    assert not (config.paths.root / APP / "current").exists()


async def test_revision_can_be_a_tag_or_sha(config, site_repo):
    old = site_repo.head()
    site_repo.commit({"VERSION": "2\n"})
    outcome = await pipeline(config).deploy(APP, revision=old[:10])
    assert outcome.revision == old and (current(config) / "VERSION").read_text() == "1\n"


async def test_rollback_switches_back_to_the_previous_release(config, site_repo):
    first = await pipeline(config).deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    await pipeline(config).deploy(APP)
    back = await pipeline(config).rollback(APP)
    assert back.status == "succeeded" and back.release == first.release
    assert (current(config) / "VERSION").read_text() == "1\n"
    state = json.loads((config.paths.state / "state.json").read_text())
    assert state["apps"][APP]["sha"] == first.revision


async def test_rollback_to_a_named_release_and_to_an_unknown_one(config, site_repo):
    first = await pipeline(config).deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    await pipeline(config).deploy(APP)
    site_repo.commit({"VERSION": "3\n"})
    await pipeline(config).deploy(APP)
    named = await pipeline(config).rollback(APP, to_release=first.release)
    assert named.release == first.release
    unknown = await pipeline(config).rollback(APP, to_release="../../etc")
    assert unknown.status == "failed"
    assert current(config).name == first.release


async def test_rollback_with_a_single_release_fails_clearly(config):
    await pipeline(config).deploy(APP)
    outcome = await pipeline(config).rollback(APP)
    assert outcome.status == "failed" and "no release to roll back to" in outcome.message


async def test_old_releases_are_pruned_beyond_keep_releases(config, site_repo):
    names = []
    for n in range(5):
        site_repo.commit({"VERSION": f"{n + 2}\n"})
        names.append((await pipeline(config).deploy(APP)).release)
    assert releases(config) == names[-3:]


async def test_site_data_under_var_survives_deploys_rollbacks_and_pruning(config, site_repo):
    await pipeline(config).deploy(APP)
    data = current(config) / "var" / "filestorage" / "Data.fs"
    data.write_bytes(b"precious")
    blob = current(config) / "var" / "blobstorage" / "blob.bin"
    blob.write_bytes(b"blob")
    for n in range(4):
        site_repo.commit({"VERSION": f"{n + 2}\n"})
        await pipeline(config).deploy(APP)
    await pipeline(config).rollback(APP)
    shared = config.paths.root / APP / "shared" / "var"
    assert (shared / "filestorage" / "Data.fs").read_bytes() == b"precious"
    assert (shared / "blobstorage" / "blob.bin").read_bytes() == b"blob"
    assert (current(config) / "var" / "filestorage" / "Data.fs").read_bytes() == b"precious"
    assert (current(config) / "var" / "filestorage").is_symlink()


async def test_crash_after_build_before_switch_leaves_a_valid_current(config, site_repo):
    first = await pipeline(config).deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    pipe = pipeline(config)
    mgr = ReleaseManager(
        root=config.paths.root, app=APP, repository=str(site_repo.bare), keep_releases=3
    )
    mgr.fetch()
    sha = mgr.resolve(None, "main")
    release = mgr.new_release_dir()
    run = _Run(pipe, APP, NO_PROGRESS)
    await run.build(release, sha, pipe.render(APP, sha, pipe.settings()))
    # The process dies here: the release is built, `current` was never switched.
    assert current(config).name == first.release
    assert (current(config) / "VERSION").read_text() == "1\n"
    again = await pipeline(config).deploy(APP)
    assert again.status == "succeeded" and again.revision == sha
    assert (current(config) / "VERSION").read_text() == "2\n"


def test_sigkill_during_buildout_leaves_current_on_the_previous_release(tmp_path, site_repo):
    config = write_config(tmp_path, site_repo)
    cli = ("deploy", APP, "--local", "-c", str(tmp_path / "agent.yaml"))
    first = run_cli(*cli, timeout=300)
    assert first.returncode == 0, first.stderr
    before = current(config)
    marker = tmp_path / "buildout-running"
    data = yaml.safe_load((tmp_path / "agent.yaml").read_text())
    data["apps"][APP]["buildout"]["bootstrap"] = [
        [sys.executable, "-c", f"import time; open({str(marker)!r}, 'w'); time.sleep(60)"]
    ]
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
    site_repo.commit({"VERSION": "2\n"}, message="v2")
    proc = subprocess.Popen(
        cli_argv(*cli),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert current(config) == before
    assert (current(config) / "VERSION").read_text() == "1\n"
    data["apps"][APP]["buildout"]["bootstrap"] = []
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
    again = run_cli(*cli, timeout=300)
    assert again.returncode == 0, again.stderr
    assert (current(load_config(tmp_path / "agent.yaml")) / "VERSION").read_text() == "2\n"


def test_cli_exit_status_is_non_zero_when_buildout_fails(tmp_path, site_repo):
    write_config(tmp_path, site_repo)
    site_repo.commit(
        {
            "cfg/base.cfg": (site_repo.work / "cfg/base.cfg").read_text()
            + "\n[client1]\nrecipe = nope\n"
        }
    )
    result = run_cli(
        "deploy", APP, "--local", "--json", "-c", str(tmp_path / "agent.yaml"), timeout=300
    )
    assert result.returncode == 1
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "failed" and outcome["error"] == "buildout-failed"
    assert not (tmp_path / "srv" / APP / "current").exists()
