"""A shared bootstrap: built once per digest of its inputs, linked into each release,
rebuilt when half-built, pruned when no release uses it (agent/adapters/bootstrap.py).

The deploys are of the example ZEO site, offline: the bootstrap makes a venv without pip
and gives it the agent's own site-packages (zc.buildout, ZODB, waitress) through a .pth
file plus a ``bin/buildout`` script, which is what ``pip install zc.buildout`` would give.
Nothing here depends on the machine's speed: builds are counted by their log events.
"""

from __future__ import annotations

import asyncio
import json
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from support.site import SiteRepo, write_config

from agent.adapters import bootstrap as bs
from agent.adapters.buildout import run_buildout, subprocess_env
from agent.adapters.host import HostFacts
from agent.core.config import AgentConfig
from agent.node.pipeline import Pipeline

APP = "zeo-site"
FACTS = HostFacts(cpu_count=2, memory_mb=4096)
PY = sys.executable
AGENT_SITE = sysconfig.get_paths()["purelib"]
MAKE_BUILDOUT = (
    "import pathlib, sys, sysconfig\n"
    "site = pathlib.Path(sysconfig.get_paths()['purelib'])\n"
    f"site.joinpath('agent.pth').write_text({AGENT_SITE!r} + '\\n')\n"
    "script = pathlib.Path('bin/buildout')\n"
    "script.write_text('#!' + sys.executable + '\\nimport sys\\n'\n"
    "    'from zc.buildout.buildout import main\\nsys.exit(main())\\n')\n"
    "script.chmod(0o755)\n"
    "print('requirements:', open(sys.argv[1]).read().strip())\n"
)
BOOTSTRAP = [
    [PY, "-m", "venv", "--without-pip", "."],
    ["bin/python", "-c", MAKE_BUILDOUT, "requirements.txt"],
]


def configured(tmp_path: Path, repo: SiteRepo, **overrides: Any) -> AgentConfig:
    repo.commit({"requirements.txt": "zc.buildout\n"}, "requirements")
    return write_config(
        tmp_path,
        repo,
        **{
            "apps.zeo-site.buildout.bootstrap": BOOTSTRAP,
            "apps.zeo-site.buildout.command": ["bin/buildout", "-c", "deploy.cfg"],
            **overrides,
        },
    )


def with_cache_size(config: AgentConfig, size: int) -> AgentConfig:
    plone = {**config.stack_config["plone_instances"], "zodb_cache_size": size}
    return config.model_copy(
        update={"stack_config": {**config.stack_config, "plone_instances": plone}}
    )


async def deploy(config: AgentConfig) -> tuple[Path, list[dict[str, Any]]]:
    with capture_logs() as logs:
        outcome = await Pipeline(config, facts=FACTS).deploy(APP)
    assert outcome.status == "succeeded", outcome.message
    assert outcome.release is not None
    return config.paths.root / APP / "releases" / outcome.release, logs


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def bootstrap_steps(logs: list[dict[str, Any]]) -> list[str]:
    started = events(logs, "buildout.step.started")
    return [e["step"] for e in started if e["step"].startswith("bootstrap")]


def venvs(config: AgentConfig) -> list[str]:
    cache = config.paths.root / APP / "shared" / "bootstrap"
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def shebang(script: Path) -> str:
    return script.read_text().splitlines()[0]


async def test_a_config_only_release_reuses_the_venv_of_the_previous_one(tmp_path, site_repo):
    config = configured(tmp_path, site_repo)
    first, logs = await deploy(config)
    assert bootstrap_steps(logs) == ["bootstrap[0]", "bootstrap[1]"]
    (digest,) = venvs(config)
    venv = config.paths.root / APP / "shared" / "bootstrap" / digest
    assert (venv / bs.COMPLETE).is_file() and (venv / "requirements.txt").is_file()
    # the release has a real bin/ with copies and wrappers, and no venv of its own
    bin_dir = first / "bin"
    assert bin_dir.is_dir() and not bin_dir.is_symlink()
    assert (bin_dir / "buildout").is_file() and not (bin_dir / "buildout").is_symlink()
    assert shebang(bin_dir / "buildout") == f"#!{venv}/bin/python"
    assert not any((first / name).exists() for name in ("pyvenv.cfg", "lib", "include"))
    # buildout ran from the shared venv, with the release as its directory
    assert shebang(bin_dir / "client1") == f"#!{venv}/bin/python"
    assert (first / "parts").is_dir() and not (venv / "parts").exists()
    assert json.loads((first / bs.REFERENCE).read_text())["digest"] == digest

    second, logs = await deploy(with_cache_size(config, 9))
    assert second != first
    assert bootstrap_steps(logs) == []
    assert [e["digest"] for e in events(logs, "bootstrap.reused")] == [digest]
    assert venvs(config) == [digest]
    assert shebang(second / "bin" / "client1") == f"#!{venv}/bin/python"
    assert "zodb-cache-size = 9" in (second / "deploy.cfg").read_text()
    # bin/python of a release is the shared venv's interpreter, not the bare base Python
    with capture_logs() as logs:
        await run_buildout(
            second,
            bootstrap=[],
            command=["bin/python", "-c", "import sys; print(sys.prefix)"],
            timeout=30,
        )
    assert [e["line"] for e in events(logs, "buildout.line")] == [str(venv)]


async def test_new_requirements_build_a_new_venv_and_the_old_one_goes_with_its_releases(
    tmp_path, site_repo
):
    config = configured(tmp_path, site_repo, **{"apps.zeo-site.keep_releases": 2})
    first, _ = await deploy(config)
    (old,) = venvs(config)
    site_repo.commit({"requirements.txt": "zc.buildout\nwheel\n"}, "more requirements")
    second, logs = await deploy(config)
    assert bootstrap_steps(logs) == ["bootstrap[0]", "bootstrap[1]"]
    new = json.loads((second / bs.REFERENCE).read_text())["digest"]
    assert new != old and venvs(config) == sorted([old, new])
    third, logs = await deploy(with_cache_size(config, 9))
    assert bootstrap_steps(logs) == []
    # the first release was still on disk when the third was linked: its venv stayed
    assert not first.exists() and venvs(config) == sorted([old, new])
    _, logs = await deploy(with_cache_size(config, 10))
    assert [e["removed"] for e in events(logs, "bootstrap.pruned")] == [[old]]
    assert venvs(config) == [new] and third.exists()


async def test_a_half_built_venv_is_removed_and_built_again(tmp_path, site_repo):
    config = configured(tmp_path, site_repo)
    await deploy(config)
    (digest,) = venvs(config)
    venv = config.paths.root / APP / "shared" / "bootstrap" / digest
    (venv / bs.COMPLETE).unlink()  # as a build killed before its marker leaves it
    (venv / "debris").write_text("half")
    release, logs = await deploy(with_cache_size(config, 9))
    assert events(logs, "bootstrap.discarded") and not (venv / "debris").exists()
    assert bootstrap_steps(logs) == ["bootstrap[0]", "bootstrap[1]"]
    assert (venv / bs.COMPLETE).is_file() and (release / "bin" / "client1").is_file()


async def test_reuse_off_builds_the_venv_in_the_release_as_before(tmp_path, site_repo):
    config = configured(tmp_path, site_repo, **{"apps.zeo-site.buildout.reuse_bootstrap": False})
    release, logs = await deploy(config)
    assert bootstrap_steps(logs) == ["bootstrap[0]", "bootstrap[1]"]
    assert (release / "pyvenv.cfg").is_file()
    assert shebang(release / "bin" / "client1") == f"#!{release}/bin/python"
    assert not (config.paths.root / APP / "shared" / "bootstrap").exists()


async def test_pip_offline_in_a_shared_venv_runs_once(tmp_path):
    """The usual bootstrap shape, a venv with pip and an install of nothing, offline."""
    releases = tmp_path / "releases"
    cache = tmp_path / "shared" / "bootstrap"
    bootstrap = [[PY, "-m", "venv", "."], ["bin/pip", "install", "--no-index", "-r", "req.txt"]]
    prefixes = []
    for name in ("20260101000000", "20260101000001"):
        release = releases / name
        release.mkdir(parents=True)
        (release / "req.txt").write_text("# nothing to install\n")
        with capture_logs() as logs:
            await run_buildout(
                release,
                bootstrap=bootstrap,
                command=["bin/python", "-c", "import sys; print(sys.prefix)"],
                timeout=120,
                bootstrap_cache=cache,
            )
        prefixes.append(events(logs, "buildout.line")[-1]["line"])
        assert [e["reused"] for e in events(logs, "bootstrap.ready")] == [name.endswith("1")]
    (digest,) = [p.name for p in cache.iterdir() if p.is_dir()]
    assert prefixes == [str(cache / digest)] * 2
    assert (releases / "20260101000001" / "bin" / "pip").is_file()


# -- the key ------------------------------------------------------------------------------


async def key(release: Path, bootstrap: Sequence[Sequence[str]], **environment: str) -> str:
    found = await bs.bootstrap_key(
        release, bootstrap, env=subprocess_env(), environment=environment
    )
    return found.digest


async def test_the_key_follows_the_commands_the_named_files_and_the_environment(tmp_path):
    release = tmp_path / "r"
    release.mkdir()
    (release / "requirements.txt").write_text("-r cfg/base.txt\nzc.buildout==6.0.1\n")
    (release / "cfg").mkdir()
    (release / "cfg" / "base.txt").write_text("setuptools==84.2.1\n")
    (release / "README").write_text("not named")
    boot = [[PY, "-m", "venv", "."], ["bin/pip", "install", "-r", "requirements.txt"]]
    first = await key(release, boot)
    assert await key(release, boot) == first
    (release / "README").write_text("changed, not named")
    assert await key(release, boot) == first
    (release / "cfg" / "base.txt").write_text("setuptools==84.2.2\n")  # included by -r
    second = await key(release, boot)
    assert second != first
    assert await key(release, boot, PIP_INDEX_URL="https://mirror.example") != second
    assert await key(release, [*boot, ["bin/pip", "list"]]) != second
    found = await bs.bootstrap_key(release, boot, env=subprocess_env(), environment={})
    assert found.files == ("cfg/base.txt", "requirements.txt")
    assert "python" in found.inputs["programs"][PY]


@pytest.mark.parametrize(
    ("files", "argv", "reason"),
    [
        ({"requirements.txt": "-e .\n"}, ["-r", "requirements.txt"], "local code"),
        ({"requirements.txt": "./src/x\n"}, ["-r", "requirements.txt"], "local code"),
        ({"src/x/setup.py": ""}, ["src/x"], "directory src/x"),
    ],
)
async def test_a_bootstrap_that_installs_the_release_itself_is_not_shared(
    tmp_path, files, argv, reason
):
    release = tmp_path / "r"
    for name, text in files.items():
        (release / name).parent.mkdir(parents=True, exist_ok=True)
        (release / name).write_text(text)
    with pytest.raises(bs.NotReusable, match=reason):
        await key(release, [[PY, "-m", "venv", "."], ["bin/pip", "install", *argv]])


async def test_a_named_file_that_leads_out_of_the_release_is_not_shared(tmp_path):
    release = tmp_path / "r"
    release.mkdir()
    (tmp_path / "outside.txt").write_text("x\n")
    (release / "requirements.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(bs.NotReusable, match="leads out of the release"):
        await key(release, [["bin/pip", "install", "-r", "requirements.txt"]])


# -- the lock -----------------------------------------------------------------------------


async def test_two_builds_of_one_venv_at_once_run_the_bootstrap_once(tmp_path):
    cache = tmp_path / "shared" / "bootstrap"
    releases = [tmp_path / "releases" / n for n in ("20260101000000", "20260101000001")]
    for release in releases:
        release.mkdir(parents=True)
    k = await bs.bootstrap_key(releases[0], [[PY, "-V"]], env=subprocess_env(), environment={})
    gate, started = asyncio.Event(), asyncio.Event()
    runs: list[Path] = []

    async def run(argv: Sequence[str], cwd: Path, step: str, timeout: float) -> float:
        runs.append(cwd)
        (cwd / "bin").mkdir()
        (cwd / "bin" / "tool").write_text("#!/bin/sh\n")
        started.set()
        await gate.wait()
        return 0.0

    first = asyncio.create_task(
        bs.prepare(
            releases[0],
            k,
            cache=cache,
            bootstrap=[[PY, "-V"]],
            run=run,
            deadline=time.monotonic() + 60,
        )
    )
    await started.wait()
    second = asyncio.create_task(
        bs.prepare(
            releases[1],
            k,
            cache=cache,
            bootstrap=[[PY, "-V"]],
            run=run,
            deadline=time.monotonic() + 60,
        )
    )
    await asyncio.sleep(0.3)  # the second is waiting for the lock, whatever the speed
    assert not second.done()
    gate.set()
    done = await asyncio.gather(first, second)
    assert [p.reused for p in done] == [False, True]
    assert runs == [cache / k.digest]
    assert all((r / "bin" / "tool").is_file() for r in releases)
