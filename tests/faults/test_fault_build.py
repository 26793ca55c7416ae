"""Faults before the switch: a full disk under releases/, an unreachable git remote, a
buildout that hangs past its timeout. Each must end in a failed Outcome (never an
exception), with ``current`` and the shared data untouched, and the next deploy working."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from support.components import unavailable
from support.site import SiteRepo, write_config
from support.tally import FaultTally, Precious

from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig
from agent.core.outcome import Outcome
from agent.node.pipeline import Pipeline

APP = "zeo-site"
FACTS = HostFacts(cpu_count=2, memory_mb=4096)
#: Free space left on the app's disk for successive deploys, until one fits: they run out
#: of room in the mirror, the clone, the checkout, then buildout.
FREE_KB = (0, 8, 32, 64, 128, 192, 224, 256, 288, 320, 384, 512, 1024)


def current_name(config: AgentConfig) -> str:
    return (config.paths.root / APP / "current").resolve().name


async def attempt(pipeline: Pipeline, tally: FaultTally) -> Outcome | None:
    """One deploy under a fault; an exception instead of an Outcome is a crash."""
    tally.tried += 1
    try:
        return await pipeline.deploy(APP)
    except Exception as exc:
        tally.flag(tally.crashes, f"deploy raised {type(exc).__name__}: {exc}")
        return None


# -- disk full ---------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, size: str = "2m") -> Iterator[str]:
    """A tmpfs of ``size`` on ``directory`` (root), else a read-only directory; yields
    which one was used."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
        ).returncode
        == 0
    )
    if not mounted and os.geteuid() == 0:
        unavailable("cannot mount a tmpfs, and root ignores a read-only directory")
    try:
        yield "tmpfs" if mounted else "read-only"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def fill(directory: Path, leave_kb: int) -> Path:
    """Write a filler file until only ``leave_kb`` KiB are free on ``directory``'s fs."""
    filler = directory / ".filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(directory)
    target = stat.f_bavail * stat.f_frsize - leave_kb * 1024
    with contextlib.suppress(OSError), open(filler, "wb") as handle:
        while target > 0:
            written = handle.write(b"\0" * min(target, 1 << 16))
            target -= written
    return filler


async def test_disk_full_fails_the_deploy_at_any_step_and_leaves_current_untouched(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    """The whole app directory (mirror, releases, shared) on one small disk, filled to
    leave less and less room, so the deploy runs out of space at a different step."""
    config = write_config(tmp_path, site_repo)
    pipeline = Pipeline(config, facts=FACTS)
    app = config.paths.root / APP
    tally = FaultTally("disk-full deploys")
    messages = []
    with small_disk(app) as how:
        first = await pipeline.deploy(APP)
        assert first.status == "succeeded", first.message
        precious = Precious.write(app)
        sha = site_repo.commit({"VERSION": "2\n"})
        releases = app / "releases"
        for free in FREE_KB if how == "tmpfs" else (0,):
            if how == "tmpfs":
                fill(app, free)
            else:
                releases.chmod(0o555)
            outcome = await attempt(pipeline, tally)
            tally.check(app, precious, None)
            if outcome is not None and outcome.status == "succeeded":
                messages.append(f"{free} KiB free: enough, deployed")
                break
            if outcome is not None:
                assert outcome.status == "failed", outcome.message
                text = outcome.message.replace(str(tmp_path), "<tmp>").splitlines()[0]
                messages.append(f"{free} KiB free: {outcome.error}: {text[:110]}")
            assert current_name(config) == first.release
        (app / ".filler").unlink(missing_ok=True)
        releases.chmod(0o755)
        sha = site_repo.commit({"VERSION": "3\n"})
        again = await pipeline.deploy(APP)
        assert again.status == "succeeded" and again.revision == sha, again.message
        tally.check(app, precious, None)
    print(f"\ndisk full simulated with a {how} under {app.name}/:")
    print("\n".join(f"  {m}" for m in messages))
    tally.report()


# -- git remote unreachable --------------------------------------------------------------


async def test_unreachable_git_remote_is_a_git_error_and_nothing_is_switched(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = write_config(tmp_path, site_repo)
    pipeline = Pipeline(config, facts=FACTS)
    tally = FaultTally("unreachable remotes")
    first = await pipeline.deploy(APP)
    assert first.status == "succeeded", first.message
    app = config.paths.root / APP
    precious = Precious.write(app)
    site_repo.commit({"VERSION": "2\n"})
    moved = site_repo.bare.with_name("moved-away.git")
    site_repo.bare.rename(moved)
    nowhere = config.model_copy(
        update={
            "apps": {
                APP: config.apps[APP].model_copy(
                    update={"repository": f"file://{tmp_path}/no-such-repo.git"}
                )
            }
        }
    )
    outcomes = []
    for pipe in (pipeline, Pipeline(nowhere, facts=FACTS)):
        outcome = await attempt(pipe, tally)
        if outcome is not None:
            outcomes.append(outcome)
            assert outcome.status == "failed" and outcome.error == "git-error", outcome.message
        assert current_name(config) == first.release
        assert sorted(p.name for p in (app / "releases").iterdir()) == [first.release]
        tally.check(app, precious, None)
    moved.rename(site_repo.bare)
    again = await pipeline.deploy(APP)
    assert again.status == "succeeded" and again.revision == site_repo.head(), again.message
    print(
        "\n"
        + "\n".join(
            "unreachable remote: " + o.message.replace(str(tmp_path), "<tmp>") for o in outcomes
        )
    )
    tally.report()


# -- buildout hanging --------------------------------------------------------------------

HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(f"{child.pid}")
time.sleep(120)
"""


async def test_buildout_hanging_past_its_timeout_is_killed_with_its_group_and_fails(
    tmp_path: Path, site_repo: SiteRepo
) -> None:
    config = write_config(tmp_path, site_repo)
    tally = FaultTally("hanging buildouts")
    first = await Pipeline(config, facts=FACTS).deploy(APP)
    assert first.status == "succeeded", first.message
    app = config.paths.root / APP
    precious = Precious.write(app)
    pids = tmp_path / "hang.pid"
    buildout = config.apps[APP].buildout.model_copy(
        update={"timeout": 3, "bootstrap": [[sys.executable, "-c", HANG, str(pids)]]}
    )
    hanging = config.model_copy(
        update={"apps": {APP: config.apps[APP].model_copy(update={"buildout": buildout})}}
    )
    site_repo.commit({"VERSION": "2\n"})
    started = time.monotonic()
    outcome = await attempt(Pipeline(hanging, facts=FACTS), tally)
    seconds = time.monotonic() - started
    assert outcome is not None and outcome.status == "failed"
    assert outcome.error == "buildout-failed" and "timed out" in outcome.message
    assert seconds < 3 + 5 + 5  # the timeout, plus the SIGTERM grace, plus some slack
    grandchild = int(pids.read_text())
    assert (
        not psutil.pid_exists(grandchild)
        or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    ), "the group survived"
    assert current_name(config) == first.release
    tally.check(app, precious, None)
    again = await Pipeline(config, facts=FACTS).deploy(APP)
    assert again.status == "succeeded", again.message
    print(f"\nhanging buildout: {outcome.message.splitlines()[0]} (after {seconds:.1f} s)")
    tally.report()
