"""Deploy hooks at their points of the pipeline, and releases that remember a failure.

Through the pipeline's seams (tests/integration/test_pipeline_seams.py): a real git mirror
and real releases, a trivial build instead of buildout, a fake restarter that records when
it ran. Each hook writes what it saw (its environment, where ``current`` pointed) to a file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.cli import run_cli
from support.seams import APP, FACTS, FakeRestarter, configured, current
from support.site import SiteRepo

from agent.adapters.releases import ReleaseManager
from agent.core.config import AgentConfig
from agent.core.errors import ReleaseError
from agent.node.pipeline import Pipeline
from agent.operator.display import RELEASE_COLUMNS

RECORDER = """\
import json, os, sys
hook, out = sys.argv[1], sys.argv[2]
env = {k: v for k, v in os.environ.items() if k.startswith("DEPLOY_")}
current = os.path.join(os.environ["DEPLOY_RELEASE_DIR"], "..", "..", "current")
seen = {"hook": hook, "cwd": os.getcwd(), "env": env,
        "current": os.path.basename(os.readlink(current)) if os.path.islink(current) else None}
with open(os.path.join(out, "seen.jsonl"), "a") as f:
    f.write(json.dumps(seen) + "\\n")
print(hook, "ran")
"""


def recording_restarter(out: Path) -> FakeRestarter:
    """A FakeRestarter that notes each restart in the hooks' record, to show the order."""

    def note(only: list[str] | None) -> None:
        with (out / "seen.jsonl").open("a") as f:
            f.write(json.dumps({"hook": "restart", "only": only}) + "\n")

    return FakeRestarter(on_restart=note)


def recorder(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    return script, out


def record_hooks(tmp_path: Path, *hooks: str) -> dict[str, Any]:
    script, out = recorder(tmp_path)
    return {hook: [[sys.executable, str(script), hook, str(out)]] for hook in hooks}


def seen(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "out" / "seen.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def hooked(tmp_path: Path, repo: SiteRepo, hooks: dict[str, Any], **more: Any) -> AgentConfig:
    return configured(tmp_path, repo, **{f"apps.{APP}.hooks": hooks}, **more)


def fail(code: int = 3) -> list[str]:
    return [sys.executable, "-c", f"print('about to fail'); raise SystemExit({code})"]


async def test_each_hook_runs_at_its_point_with_the_documented_environment(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    hooks = record_hooks(tmp_path, "before_switch", "before_restart", "after_restart")
    config = hooked(tmp_path, site_repo, hooks)
    # The repository's own deploy/before_restart runs after the configured one.
    script, out = recorder(tmp_path)
    site_repo.commit(
        {"deploy/before_restart": f"#!/bin/sh\nexec {sys.executable} {script} repo {out}\n"},
        executable=True,
    )
    restarter = recording_restarter(out)
    first = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert first.status == "succeeded", first.message
    order = [entry["hook"] for entry in seen(tmp_path)]
    assert order == ["before_switch", "before_restart", "repo", "restart", "after_restart"]
    records = seen(tmp_path)
    release_dir = config.paths.root / APP / "releases" / str(first.release)
    for entry in records:
        if entry["hook"] == "restart":
            continue
        assert Path(entry["cwd"]) == release_dir
        assert entry["env"] == {
            "DEPLOY_APP": APP,
            "DEPLOY_RELEASE": first.release,
            "DEPLOY_RELEASE_DIR": str(release_dir),
            "DEPLOY_PREVIOUS_RELEASE": "",
            "DEPLOY_REVISION": first.revision,
            "DEPLOY_PREVIOUS_REVISION": "",
            "DEPLOY_DECISION": "new-revision",
            "DEPLOY_LAYERS": "plone_instances zeoserver",
            "DEPLOY_KIND": "deploy",
        }
    # before_switch sees no current yet; the others see the new release live.
    assert records[0]["current"] is None
    assert all(e["current"] == first.release for e in records[1:] if e["hook"] != "restart")

    (out / "seen.jsonl").unlink()
    second_sha = site_repo.commit({"VERSION": "2\n"})
    second = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert second.status == "succeeded", second.message
    records = seen(tmp_path)
    assert records[0]["hook"] == "before_switch" and records[0]["current"] == first.release
    env = records[0]["env"]
    assert env["DEPLOY_PREVIOUS_RELEASE"] == first.release
    assert env["DEPLOY_PREVIOUS_REVISION"] == first.revision
    assert env["DEPLOY_REVISION"] == second_sha


async def test_a_failing_before_switch_leaves_current_and_the_clients_untouched(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = hooked(tmp_path, site_repo, {})
    restarter = FakeRestarter()
    first = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    config = hooked(tmp_path, site_repo, {"before_switch": [fail()]})
    site_repo.commit({"VERSION": "2\n"})
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "hook-failed"
    assert "before_switch" in outcome.message and "about to fail" in outcome.message
    assert current(config) == first.release
    assert restarter.calls == [None]  # only the first deploy restarted anything
    rows = ReleaseManager.of(config, APP).listing()
    assert [r["status"] for r in rows] == ["complete", "failed"]
    assert "before_switch" in rows[1]["reason"]


@pytest.mark.parametrize("where", ["config", "repository"])
async def test_a_failing_before_restart_fails_the_deploy_and_marks_the_release_bad(
    tmp_path: Path, site_repo: SiteRepo, where: str
) -> None:
    config = hooked(tmp_path, site_repo, {})
    restarter = FakeRestarter()
    await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    if where == "config":
        config = hooked(tmp_path, site_repo, {"before_restart": [fail()]})
        site_repo.commit({"VERSION": "2\n"})
    else:
        site_repo.commit({"deploy/before_restart": "#!/bin/sh\nexit 4\n"}, executable=True)
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "hook-failed"
    assert f"release {outcome.release} is live but hook before_restart" in outcome.message
    assert current(config) == outcome.release
    assert restarter.calls == [None]  # the clients were not restarted onto it
    rows = ReleaseManager.of(config, APP).listing()
    assert rows[-1]["status"] == "bad" and rows[-1]["current"]
    assert "before_restart" in rows[-1]["reason"]


async def test_a_failing_before_restart_with_on_failure_rollback_switches_back(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = hooked(tmp_path, site_repo, {}, **{f"apps.{APP}.restart.on_failure": "rollback"})
    restarter = FakeRestarter()
    first = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    config = hooked(
        tmp_path,
        site_repo,
        {"before_restart": [fail()]},
        **{f"apps.{APP}.restart.on_failure": "rollback"},
    )
    site_repo.commit({"VERSION": "2\n"})
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "hook-failed"
    assert f"rolled back to {first.release}" in outcome.message
    assert outcome.release == first.release == current(config)
    # Nothing had been restarted onto the new release, so nothing is restarted back.
    assert restarter.calls == [None]
    assert outcome.details["rollback_restart"] == {"skipped": True}


async def test_a_failing_after_restart_with_on_failure_rollback_restarts_the_old_code(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    rollback = {f"apps.{APP}.restart.on_failure": "rollback"}
    config = hooked(tmp_path, site_repo, {}, **rollback)
    restarter = FakeRestarter()
    first = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    config = hooked(tmp_path, site_repo, {"after_restart": [fail()]}, **rollback)
    site_repo.commit({"VERSION": "2\n"})
    outcome = await Pipeline(config, facts=FACTS, restarter=restarter).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "hook-failed"
    assert outcome.release == first.release == current(config)
    assert restarter.calls == [None, None, None]  # first, the new release, back again


async def test_on_failure_runs_once_per_failed_command_and_never_hides_the_first_error(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    rollback = {f"apps.{APP}.restart.on_failure": "rollback"}
    hooks = record_hooks(tmp_path, "on_failure")
    config = hooked(tmp_path, site_repo, hooks, **rollback)
    await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).deploy(APP)
    assert seen(tmp_path) == []  # a success runs no on_failure

    first = current(config)
    site_repo.commit({"VERSION": "2\n"})
    halting = FakeRestarter(halt_at="client2")
    outcome = await Pipeline(config, facts=FACTS, restarter=halting).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "restart-halted"
    records = seen(tmp_path)
    assert len(records) == 1
    # It runs in the live release (rolled back to), and is told what failed.
    assert records[0]["env"]["DEPLOY_RELEASE"] == first == records[0]["current"]
    assert records[0]["env"]["DEPLOY_ERROR"] == "restart-halted"

    # An on_failure that fails itself is added to the message, not put in its place.
    config = hooked(
        tmp_path,
        site_repo,
        {"before_switch": [fail()], "on_failure": [*hooks["on_failure"], fail(5)]},
    )
    site_repo.commit({"VERSION": "3\n"})
    outcome = await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).deploy(APP)
    assert outcome.error == "hook-failed"
    assert outcome.message.startswith("hook before_switch")
    assert "the on_failure hook failed too" in outcome.message
    assert len(seen(tmp_path)) == 2

    # A failed rollback and a failed restart run it once each as well.
    outcome = await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).rollback(
        APP, to_release="20000101000000"
    )
    assert outcome.status == "failed"
    assert len(seen(tmp_path)) == 3
    broken = FakeRestarter(halt_at="client1")
    outcome = await Pipeline(config, facts=FACTS, restarter=broken).restart(APP)
    assert outcome.status == "failed" and outcome.error == "restart-halted"
    assert len(seen(tmp_path)) == 4


async def test_a_hanging_hook_is_killed_at_its_timeout(tmp_path: Path, site_repo: SiteRepo) -> None:
    pidfile = tmp_path / "hook.pid"
    hang = ["/bin/sh", "-c", f"sleep 600 & echo $! > {pidfile}; wait"]
    config = hooked(tmp_path, site_repo, {"before_switch": [hang], "timeout": 1})
    outcome = await Pipeline(config, facts=FACTS, restarter=FakeRestarter()).deploy(APP)
    assert outcome.status == "failed" and outcome.error == "hook-failed"
    assert "timed out after 1 s and was killed" in outcome.message
    assert not (config.paths.root / APP / "current").exists()
    # The whole process group went, the backgrounded sleep with it.
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 30  # bounds a hang only: SIGKILL is immediate
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for its reaper."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- release memory ----------------------------------------------------------------------


async def test_rollback_skips_a_bad_release_and_needs_force_onto_one(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    pipeline = Pipeline(config, facts=FACTS, restarter=FakeRestarter())
    good = await pipeline.deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    bad = await Pipeline(config, facts=FACTS, restarter=FakeRestarter(halt_at="client2")).deploy(
        APP
    )
    assert bad.status == "failed" and current(config) == bad.release
    site_repo.commit({"VERSION": "3\n"})
    latest = await pipeline.deploy(APP)
    assert latest.status == "succeeded"

    rows = {r["name"]: r for r in ReleaseManager.of(config, APP).listing()}
    assert rows[str(bad.release)]["status"] == "bad"
    assert "client2 did not come back healthy" in rows[str(bad.release)]["reason"]
    assert rows[str(latest.release)]["current"]
    assert rows[str(good.release)]["decision"] == "new-revision"

    back = await pipeline.rollback(APP)
    assert back.status == "succeeded", back.message
    assert back.release == good.release == current(config)  # over the bad one

    refused = await pipeline.rollback(APP, to_release=bad.release)
    assert refused.status == "failed" and "marked bad" in refused.message
    assert "--force" in refused.message and current(config) == good.release
    forced = await pipeline.rollback(APP, to_release=bad.release, force=True)
    assert forced.status == "succeeded" and current(config) == bad.release


async def test_a_rollback_runs_the_restart_hooks_in_the_release_it_puts_back(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    hooks = record_hooks(tmp_path, "before_switch", "before_restart", "after_restart")
    config = hooked(tmp_path, site_repo, hooks)
    _, out = recorder(tmp_path)
    pipeline = Pipeline(config, facts=FACTS, restarter=recording_restarter(out))
    first = await pipeline.deploy(APP)
    site_repo.commit({"VERSION": "2\n"})
    second = await pipeline.deploy(APP)
    (out / "seen.jsonl").unlink()

    back = await pipeline.rollback(APP)
    assert back.status == "succeeded" and back.release == first.release, back.message
    records = seen(tmp_path)
    # Nothing is built, so no before_switch; the clients' hooks around their restart.
    assert [e["hook"] for e in records] == ["before_restart", "restart", "after_restart"]
    release_dir = config.paths.root / APP / "releases" / str(first.release)
    for entry in (records[0], records[2]):
        assert Path(entry["cwd"]) == release_dir and entry["current"] == first.release
        assert entry["env"]["DEPLOY_KIND"] == "rollback"
        assert entry["env"]["DEPLOY_PREVIOUS_RELEASE"] == second.release

    # A failing after_restart fails the rollback and marks the release it put back bad.
    failing = hooked(tmp_path, site_repo, {"after_restart": [fail()]})
    again = await Pipeline(failing, facts=FACTS, restarter=FakeRestarter()).rollback(
        APP, to_release=second.release
    )
    assert again.status == "failed" and "about to fail" in again.message, again.message
    rows = {r["name"]: r for r in ReleaseManager.of(config, APP).listing()}
    assert rows[str(second.release)]["status"] == "bad"


async def test_rollback_to_a_revision_lands_on_its_newest_good_release(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    pipeline = Pipeline(config, facts=FACTS, restarter=FakeRestarter())
    first = await pipeline.deploy(APP)
    again = await pipeline.deploy(APP, always_buildout=True)  # a second release of it
    site_repo.commit({"VERSION": "2\n"})
    await pipeline.deploy(APP)
    assert first.revision is not None
    back = await pipeline.rollback(APP, to_release=first.revision[:10])
    assert back.status == "succeeded", back.message
    assert back.release == again.release == current(config)
    missing = await pipeline.rollback(APP, to_release="no-such-branch")
    assert missing.status == "failed" and "neither a release" in missing.message


def test_mark_bad_keeps_the_release_complete_and_records_the_reason(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    mgr = ReleaseManager.of(config, APP)
    mgr.fetch()
    sha = mgr.resolve(None, "main")
    release = mgr.new_release_dir()
    mgr.checkout(release, sha)
    mgr.mark_complete(release, sha=sha, cfg_digest="d", decision="new-revision")
    mgr.switch(release)
    mgr.mark_bad(release, "client1 did not come back healthy")
    info = mgr.current()
    assert info is not None and info.bad == "client1 did not come back healthy"
    with pytest.raises(ReleaseError, match="marked bad"):
        mgr.rollback_target(release.name)
    assert mgr.rollback_target(release.name, force=True) == info
    assert mgr.rollback_target() is None
    assert os.path.exists(release / ".deploy-release.json")


def test_cli_releases_lists_status_and_reason_and_rollback_needs_force(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = configured(tmp_path, site_repo)
    cfg = str(tmp_path / "agent.yaml")
    assert run_cli("deploy", APP, "--local", "-c", cfg, timeout=120).returncode == 0
    site_repo.commit({"VERSION": "2\n"})
    assert run_cli("deploy", APP, "--local", "-c", cfg, timeout=120).returncode == 0
    mgr = ReleaseManager.of(config, APP)
    first, second = (r.name for r in mgr.releases())
    mgr.mark_bad(mgr.releases_dir / first, "client1 did not come back healthy")

    listed = run_cli("releases", APP, "--local", "--json", "-c", cfg)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["status"], r["current"]) for r in rows] == [
        (first, "bad", False),
        (second, "complete", True),
    ]
    assert rows[0]["reason"] == "client1 did not come back healthy"
    table = run_cli("releases", APP, "--local", "-c", cfg).stdout.splitlines()
    assert table[0].split() == ["name", *RELEASE_COLUMNS[1:]]
    assert table[1].split()[0] == first and "bad" in table[1] and "client1 did" in table[1]
    assert table[2].startswith(f"* {second}")

    plain = run_cli("rollback", APP, "--local", "-c", cfg)
    assert plain.returncode == 1 and "no good release" in plain.stdout
    refused = run_cli("rollback", APP, "--local", "--to", first, "-c", cfg)
    assert refused.returncode == 1 and "--force" in refused.stdout
    forced = run_cli("rollback", APP, "--local", "--to", first, "--force", "-c", cfg)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert current(config) == first


def test_cli_restart_local_restarts_the_live_release(tmp_path: Path, site_repo: SiteRepo) -> None:
    config = configured(tmp_path, site_repo)
    cfg = str(tmp_path / "agent.yaml")
    nothing = run_cli("restart", APP, "--local", "--json", "-c", cfg)
    assert nothing.returncode == 1 and "not deployed here yet" in nothing.stdout
    assert run_cli("deploy", APP, "--local", "-c", cfg, timeout=120).returncode == 0
    result = run_cli("restart", APP, "--local", "--json", "-c", cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["kind"] == "restart" and outcome["status"] == "succeeded"
    assert outcome["release"] == current(config)
    assert outcome["details"]["restart"] == {"skipped": True}  # no supervisor configured
