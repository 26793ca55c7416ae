"""Git option injection and path traversal, proven with real git: every git command the
pipeline runs is traced (GIT_TRACE), a sentinel file shows whether anything ran, and a
snapshot of the file system shows nothing was created outside the app root.

Entry points: ``deploy --local --revision`` (no protocol validation in front of the
pipeline), config ``branch``/``revision``/``repository``/``shared_dirs``, app names, and
``rollback --to``. Command fields reach the pipeline only through the intake, which
``test_hostile_intake.py`` covers.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import (
    GIT_OPTIONS,
    GIT_REVISION_TRICKS,
    INI_INJECTIONS,
    PATH_TRAVERSALS,
    config_data,
    examples,
)
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from support.tally import HostileTally

from agent.adapters.gitmirror import check_revision as check_git_revision
from agent.adapters.releases import ReleaseManager
from agent.core.config import AppConfig, parse_config
from agent.core.errors import ConfigError
from agent.core.outcome import Outcome
from agent.node.pipeline import Pipeline
from agent.protocol import Command

pytestmark = pytest.mark.slow
ODD_BUT_VALID = ["HEAD", "FETCH_HEAD", "refs/heads/main", "a" * 200, "no/such/branch", "main"]
HOSTILE_REVISIONS = [
    *GIT_OPTIONS,
    *GIT_REVISION_TRICKS,
    *PATH_TRAVERSALS,
    *INI_INJECTIONS,
    *ODD_BUT_VALID,
]


def git(*args: str, cwd: Path) -> str:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.org"]
    return subprocess.run(
        ["git", *ident, *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare repository with one commit on main; read-only for the tests."""
    base = tmp_path_factory.mktemp("upstream")
    work, bare = base / "work", base / "upstream.git"
    git("init", "-q", "-b", "main", str(work), cwd=base)
    (work / "buildout.cfg").write_text("[buildout]\n")
    (work / "var").mkdir()
    (work / "var" / ".keep").write_text("")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    git("clone", "-q", "--bare", str(work), str(bare), cwd=base)
    return bare


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cwd inside the sandbox and every git command traced to ``git-trace.log``."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("GIT_TRACE", str(tmp_path / "git-trace.log"))
    yield tmp_path


def pipeline(sandbox: Path, upstream: Path, **app: Any) -> Pipeline:
    data = config_data(sandbox)
    data["apps"] = {
        "mysite": {
            "repository": str(upstream),
            "layers": ["plone_instances"],
            "buildout": {"command": ["false"], "timeout": 30},
            **app,
        }
    }
    return Pipeline(parse_config(data))


def snapshot(root: Path) -> set[str]:
    """Every path under root, except what the agent owns (the app root, its parent, the
    state dir) and the trace log."""
    owned = (root / "srv" / "mysite", root / "state", root / "git-trace.log")
    return {
        str(p)
        for p in root.rglob("*")
        if p != root / "srv" and not any(p == o or o in p.parents for o in owned)
    }


def traced_git_argvs(sandbox: Path) -> list[list[str]]:
    trace = sandbox / "git-trace.log"
    argvs = []
    for line in trace.read_text(errors="replace").splitlines() if trace.exists() else []:
        for marker in ("trace: built-in: git ", "trace: exec: git ", "trace: run_command: git "):
            if marker in line:
                try:
                    argvs.append(shlex.split(line.split(marker, 1)[1]))
                except ValueError:
                    argvs.append(line.split(marker, 1)[1].split())
    return argvs


def assert_never_an_option(sandbox: Path, hostile: list[str]) -> int:
    """No hostile string reached git as an option: an argument equal to one, or starting
    with its first word, appears only after ``--`` or ``--end-of-options``."""
    tokens = {v.split()[0] for v in hostile if v.strip() and v.startswith("-") and v != "--"}
    argvs = traced_git_argvs(sandbox)
    for argv in argvs:
        for i, arg in enumerate(argv):
            injected = any(arg == t or (len(t) > 2 and arg.startswith(t)) for t in tokens)
            behind_separator = "--" in argv[:i] or "--end-of-options" in argv[:i]
            assert not injected or behind_separator, (arg, argv)
    return len(argvs)


def assert_confined(sandbox: Path, before: set[str]) -> None:
    created = snapshot(sandbox) - before
    assert not created, f"created outside the app root: {sorted(created)}"
    assert not any(p.name == "PWNED" for p in sandbox.rglob("PWNED"))
    assert not Path("/tmp/PWNED").exists() and not Path("PWNED").exists()


async def run(tally: HostileTally, action: Any) -> Outcome:
    with tally.attempt():
        outcome = await action
    assert isinstance(outcome, Outcome)
    return outcome


async def test_hostile_local_revisions_never_reach_git_as_options_or_escape_the_app_root(
    tally: HostileTally, sandbox: Path, upstream: Path
) -> None:
    pipe = pipeline(sandbox, upstream)
    assert (await pipe.deploy("mysite", revision="main")).status == "failed"  # buildout: false
    before = snapshot(sandbox)
    for revision in HOSTILE_REVISIONS:
        outcome = await run(tally, pipe.deploy("mysite", revision=revision))
        tally.refuse(outcome.status != "failed", f"revision {revision!r}: {outcome.message}")
        if revision not in ODD_BUT_VALID:  # refused by validation, or simply not a ref
            assert outcome.error == "revision-not-found", (revision, outcome.message)
    assert assert_never_an_option(sandbox, HOSTILE_REVISIONS) > 0  # git did run
    assert_confined(sandbox, before)
    resolved = [
        line for line in (sandbox / "git-trace.log").read_text().splitlines() if "rev-parse" in line
    ]
    assert all("--end-of-options" in line for line in resolved)


@pytest.mark.parametrize("key", ["branch", "revision"])
def test_config_refuses_the_refs_git_would_misread(
    tally: HostileTally, sandbox: Path, upstream: Path, key: str
) -> None:
    """One revision grammar: what used to slip past the configuration into git (a range,
    a forced refspec, a lock file, a hidden path) is refused with its key path."""
    for ref in ["HEAD..main", "a...b", "main.lock", "x/.hidden", "x//y", "+refs/heads/main"]:
        tally.tried += 1
        with pytest.raises(ConfigError) as refused:
            pipeline(sandbox, upstream, **{key: ref})
        assert f"apps.mysite.{key}" in str(refused.value)


@examples(300)
@given(text=st.text(alphabet=st.sampled_from("ab09._/+-@{}^~: \n"), min_size=1, max_size=12))
def test_whatever_the_config_accepts_the_wire_and_git_accept_too(text: str) -> None:
    """The property behind the single grammar: config ⊆ wire ⊆ git, for any string."""
    try:
        AppConfig(repository="/r", branch=text)
    except ValidationError:
        return
    Command.model_validate_json(
        json.dumps(
            {
                "id": str(uuid.uuid4()),
                "kind": "deploy",
                "app": "mysite",
                "revision": text,
                "stack": "s",
                "issued_at": "2026-01-01T00:00:00Z",
                "issued_by": "t",
            }
        )
    )
    check_git_revision(text)  # raises RevisionNotFound if git's adapter refused it
    checked = subprocess.run(
        ["git", "check-ref-format", "--allow-onelevel", text], capture_output=True
    )
    assert checked.returncode == 0, text


async def test_hostile_repositories_run_nothing_and_create_nothing_outside_the_app_root(
    tally: HostileTally, sandbox: Path, upstream: Path
) -> None:
    pwned = sandbox / "PWNED"
    repositories = [
        "--upload-pack=touch PWNED",
        "-c core.sshCommand=touch PWNED",
        f"ext::sh -c touch% {pwned}",
        f"ext::sh -c 'touch {pwned}'",
        "fd::17",
        "ssh://-oProxyCommand=touch%20PWNED/x",
        f"--config=core.sshCommand=touch {pwned}",
        f"{upstream}\nevil",
    ]
    before = snapshot(sandbox)
    for repository in repositories:
        outcome = await run(
            tally, pipeline(sandbox, upstream, repository=repository).deploy("mysite")
        )
        tally.refuse(outcome.status != "failed", f"repository {repository!r}")
        assert "password" not in outcome.message
    assert not pwned.exists()
    assert_never_an_option(sandbox, [r for r in repositories if r.startswith("-")])
    assert_confined(sandbox, before)


async def test_hostile_app_names_and_rollback_targets_touch_nothing(
    tally: HostileTally, sandbox: Path, upstream: Path
) -> None:
    pipe = pipeline(sandbox, upstream)
    before = snapshot(sandbox)
    for name in [*PATH_TRAVERSALS, *GIT_OPTIONS]:
        for action in (
            pipe.deploy(name),
            pipe.rollback(name),
            pipe.configure(name),
            pipe.restart(name),
            pipe.rollback("mysite", to_release=name),
        ):
            outcome = await run(tally, action)
            tally.refuse(outcome.status != "failed", f"{name!r}: {outcome.message}")
    assert not traced_git_argvs(sandbox)  # nothing got as far as git
    assert_confined(sandbox, before)
    assert not (sandbox / "srv").exists() or {p.name for p in (sandbox / "srv").iterdir()} <= {
        "mysite"
    }


def test_odd_shared_dirs_that_config_accepts_stay_inside_the_app_root(
    tally: HostileTally, sandbox: Path, upstream: Path
) -> None:
    odd = [
        "..%2f..%2fetc",
        "~root",
        "a\\..\\b",
        "\u2024\u2024/etc",
        "var/./log",
        "-rf",
        "--upload-pack=x",
        "${buildout:directory}",
        " ",
        "var/\u202etxt",
    ]
    config = pipeline(sandbox, upstream, shared_dirs=odd).config
    app = config.app("mysite")
    before = snapshot(sandbox)
    with tally.attempt():
        manager = ReleaseManager(
            root=config.paths.root,
            app="mysite",
            repository=app.repository,
            shared_dirs=app.shared_dirs,
        )
        manager.fetch()
        release = manager.new_release_dir()
        manager.checkout(release, manager.resolve(None, "main"))
    assert_confined(sandbox, before)
    app_root = os.path.realpath(sandbox / "srv" / "mysite")
    for rel in app.shared_dirs:
        link = release / rel
        assert link.is_symlink(), rel
        assert os.path.realpath(link).startswith(app_root + os.sep), (rel, os.readlink(link))
    assert_never_an_option(sandbox, ["-rf", "--upload-pack=x"])
