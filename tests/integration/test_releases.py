"""The release manager against real git repositories made in a temporary directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.adapters.markers import MARKER
from agent.adapters.releases import ReleaseManager
from agent.core.errors import ConfigError, GitError, ReleaseError, RevisionNotFound

GIT_ID = ["-c", "user.name=Test", "-c", "user.email=test@example.org", "-c", "tag.gpgSign=false"]


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", *GIT_ID, *args], cwd=cwd, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@dataclass
class Upstream:
    """A bare "remote" repository and the working copy that pushes to it."""

    bare: Path
    work: Path

    def commit(self, files: dict[str, str], message: str, branch: str = "main") -> str:
        if git("symbolic-ref", "--short", "HEAD", cwd=self.work) != branch:
            git("checkout", "-q", branch, cwd=self.work)
        for name, content in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        git("push", "-q", "origin", branch, cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)


@pytest.fixture(scope="module")
def upstream_template(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    """main: two commits (the first tagged v1.0, annotated); feature: one more commit."""
    base = tmp_path_factory.mktemp("template")
    bare, work = base / "upstream.git", base / "work"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=base)
    git("init", "-q", "-b", "main", str(work), cwd=base)
    git("remote", "add", "origin", str(bare), cwd=work)
    repo = Upstream(bare=bare, work=work)
    files = {"buildout.cfg": "[buildout]\n", "var/filestorage/.gitkeep": "", "README": "v1\n"}
    repo.commit(files, "first")
    git("tag", "-a", "-m", "release 1.0", "v1.0", cwd=work)
    git("push", "-q", "origin", "v1.0", cwd=work)
    git("branch", "feature", cwd=work)
    repo.commit({"README": "v2\n"}, "second")
    repo.commit({"feature.txt": "f\n"}, "feature work", branch="feature")
    git("checkout", "-q", "main", cwd=work)
    return repo


@pytest.fixture
def upstream(upstream_template: Upstream, tmp_path: Path) -> Upstream:
    """A private copy of the template, free to change (copying beats rebuilding)."""
    repo = Upstream(bare=tmp_path / "upstream.git", work=tmp_path / "work")
    shutil.copytree(upstream_template.bare, repo.bare, symlinks=True)
    shutil.copytree(upstream_template.work, repo.work, symlinks=True)
    git("remote", "set-url", "origin", str(repo.bare), cwd=repo.work)
    return repo


def sha_of(upstream: Upstream, ref: str) -> str:
    return git("rev-parse", f"{ref}^{{commit}}", cwd=upstream.bare)


class Clock:
    """A clock that only moves when told, to name releases deterministically."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, seconds: int = 1) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(tmp_path: Path, upstream: Upstream, clock: Clock) -> ReleaseManager:
    rm = ReleaseManager(
        root=tmp_path / "srv",
        app="mysite",
        repository=str(upstream.bare),
        keep_releases=2,
        clock=clock,
    )
    rm.fetch()
    return rm


def build(manager: ReleaseManager, sha: str, clock: Clock | None = None) -> Path:
    """One successful release of ``sha``, as the pipeline makes it."""
    if clock is not None:
        clock.tick()
    release = manager.new_release_dir()
    manager.checkout(release, sha)
    manager.mark_complete(release, sha=sha, cfg_digest="digest-" + sha[:7])
    return release


# -- the mirror ----------------------------------------------------------------------


def test_first_fetch_creates_a_bare_mirror_with_branches_and_tags(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    assert git("rev-parse", "--is-bare-repository", cwd=manager.mirror) == "true"
    refs = git("for-each-ref", "--format=%(refname)", cwd=manager.mirror).splitlines()
    assert set(refs) == {"refs/heads/main", "refs/heads/feature", "refs/tags/v1.0"}
    assert not list(manager.app_dir.glob("repo.git.tmp-*"))


def test_second_fetch_reuses_the_mirror_and_brings_new_commits(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    objects_inode = (manager.mirror / "objects").stat().st_ino
    (manager.mirror / "kept-by-fetch").write_text("x")
    new = upstream.commit({"README": "v3\n"}, "third")
    manager.fetch()
    assert (manager.mirror / "objects").stat().st_ino == objects_inode
    assert (manager.mirror / "kept-by-fetch").exists()
    assert manager.resolve(None, "main") == new


def test_fetch_prunes_deleted_branches_and_follows_moved_tags(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    git("push", "-q", "origin", "--delete", "feature", cwd=upstream.work)
    git("tag", "-f", "-a", "-m", "moved", "v1.0", "main", cwd=upstream.work)
    git("push", "-q", "-f", "origin", "v1.0", cwd=upstream.work)
    manager.fetch()
    with pytest.raises(RevisionNotFound):
        manager.resolve(None, "feature")
    assert manager.resolve("v1.0", None) == sha_of(upstream, "main")


def test_unreachable_remote_raises_git_error_and_leaves_no_mirror(tmp_path: Path) -> None:
    rm = ReleaseManager(root=tmp_path, app="site", repository=str(tmp_path / "nowhere.git"))
    with pytest.raises(GitError, match=r"git clone failed for .*nowhere\.git"):
        rm.fetch()
    assert not rm.mirror.exists()
    assert not list(rm.app_dir.glob("repo.git.tmp-*"))


def test_git_errors_and_logs_never_show_the_repository_password(tmp_path: Path) -> None:
    url = "http://deployer:s3cret@127.0.0.1:9/site.git"  # discard port: refused at once
    rm = ReleaseManager(root=tmp_path, app="site", repository=url, fetch_timeout=20)
    with capture_logs() as logs, pytest.raises(GitError) as caught:
        rm.fetch()
    assert "s3cret" not in str(caught.value)
    assert "deployer:***@127.0.0.1:9" in str(caught.value)
    assert "s3cret" not in repr(logs)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung remote."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield listener.getsockname()[1]
    listener.close()


def test_a_hung_remote_times_out_with_git_error(tmp_path: Path, silent_server: int) -> None:
    url = f"git://127.0.0.1:{silent_server}/site.git"
    rm = ReleaseManager(root=tmp_path, app="site", repository=url, fetch_timeout=1)
    started = time.monotonic()
    with pytest.raises(GitError, match="Timeout"):
        rm.fetch()
    assert time.monotonic() - started < 10
    assert not rm.mirror.exists()


class AskForPassword(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def password_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), AskForPassword)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join()
    server.server_close()


def test_a_remote_asking_for_credentials_fails_instead_of_prompting(
    tmp_path: Path, password_server: int
) -> None:
    url = f"http://127.0.0.1:{password_server}/site.git"
    rm = ReleaseManager(root=tmp_path, app="site", repository=url, fetch_timeout=20)
    with pytest.raises(GitError, match="terminal prompts disabled"):
        rm.fetch()


def test_option_like_repository_is_refused_before_git_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ReleaseManager(root=tmp_path, app="site", repository="--upload-pack=touch PWNED")


def test_command_running_transports_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rm = ReleaseManager(root=tmp_path, app="site", repository="ext::sh -c touch% PWNED")
    with pytest.raises(GitError):
        rm.fetch()
    assert not (tmp_path / "PWNED").exists()


# -- resolving revisions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("revision", "branch", "ref"),
    [
        (None, "main", "main"),
        (None, "feature", "feature"),
        ("v1.0", None, "v1.0"),
        ("feature", None, "feature"),
        ("v1.0", "feature", "v1.0"),  # the revision wins over the branch
        (None, None, "main"),  # the remote's default branch
    ],
)
def test_resolve_finds_branches_tags_and_the_default_branch(
    manager: ReleaseManager,
    upstream: Upstream,
    revision: str | None,
    branch: str | None,
    ref: str,
) -> None:
    assert manager.resolve(revision, branch) == sha_of(upstream, ref)


def test_resolve_accepts_full_and_short_shas(manager: ReleaseManager, upstream: Upstream) -> None:
    sha = sha_of(upstream, "v1.0")
    assert manager.resolve(sha, "main") == sha
    assert manager.resolve(sha[:10], None) == sha


def test_missing_revision_raises_revision_not_found_with_a_clear_message(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    with pytest.raises(RevisionNotFound) as caught:
        manager.resolve("no-such-tag", None)
    assert str(caught.value).startswith(f"revision 'no-such-tag' not found in {upstream.bare}")
    with pytest.raises(RevisionNotFound, match=r"'0{40}' not found"):
        manager.resolve("0" * 40, None)


@pytest.mark.parametrize(
    "revision",
    [
        "--upload-pack=touch PWNED",
        "--output=PWNED",
        "-h",
        "-",
        "HEAD..main",
        "../x",
        "main@{1}",
        "@",
        "main:README",
        "main~1",
        "main^",
        "x y",
        "main\n",
        "ma\x00in",
        "ma\x1bin",
        "refs/heads/.hidden",
        "main.lock",
        "",
    ],
)
def test_hostile_revisions_are_rejected_before_reaching_git(
    manager: ReleaseManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revision: str
) -> None:
    trace = tmp_path / "git-trace.log"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_TRACE", str(trace))
    for args in ((revision, None), (None, revision), (revision, "main")):
        with pytest.raises(RevisionNotFound, match="invalid revision"):
            manager.resolve(*args)
    assert not trace.exists()  # git never ran
    assert not (tmp_path / "PWNED").exists()


# -- checking out a release ----------------------------------------------------------


def test_checkout_matches_the_sha_and_keeps_git_status_clean(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    sha = sha_of(upstream, "v1.0")
    release = build(manager, sha)
    assert git("rev-parse", "HEAD", cwd=release) == sha
    assert (release / "README").read_text() == "v1\n"
    assert not (release / "feature.txt").exists()
    status = git("status", "--porcelain", "--untracked-files=all", cwd=release).splitlines()
    assert not [line for line in status if line.startswith("??")]


def test_checkout_hardlinks_objects_from_the_mirror(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    git("gc", "-q", cwd=manager.mirror)  # one pack, as a long-lived mirror has
    release = build(manager, sha_of(upstream, "main"))
    packs = list((release / ".git" / "objects" / "pack").glob("*.pack"))
    assert packs and all(pack.stat().st_nlink > 1 for pack in packs)


def test_shared_dirs_are_absolute_symlinks_into_shared(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    release = build(manager, sha_of(upstream, "main"))
    for rel in ("var/filestorage", "var/blobstorage", "var/log"):
        link = release / rel
        assert link.is_symlink()
        assert os.readlink(link) == str(manager.shared_dir / rel)
        assert (manager.shared_dir / rel).is_dir()
    assert manager.eggs_dir.is_dir() and manager.downloads_dir.is_dir()


def test_link_shared_is_idempotent_and_keeps_data(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    release = build(manager, sha_of(upstream, "main"))
    (release / "var/filestorage/Data.fs").write_text("data")
    manager.link_shared(release)
    assert (manager.shared_dir / "var/filestorage/Data.fs").read_text() == "data"


def test_a_symlink_in_the_repository_cannot_redirect_shared_links(
    manager: ReleaseManager, upstream: Upstream, tmp_path: Path
) -> None:
    outside, elsewhere = tmp_path / "outside", tmp_path / "elsewhere"
    (outside / "log").mkdir(parents=True)
    (outside / "log" / "precious").write_text("keep")
    elsewhere.mkdir()
    (outside / "filestorage").symlink_to(elsewhere)
    git("rm", "-q", "-r", "var", cwd=upstream.work)
    (upstream.work / "var").symlink_to(outside)
    sha = upstream.commit({}, "var is a symlink")
    manager.fetch()
    release = manager.new_release_dir()
    with pytest.raises(ReleaseError, match="var is a symlink"):
        manager.checkout(release, sha)
    manager.mark_failed(release, "unsafe repository")
    assert manager.prune() == [release.name]
    assert (outside / "log" / "precious").read_text() == "keep"
    assert (outside / "filestorage").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["filestorage", "log"]


def test_an_inherited_git_dir_does_not_redirect_git(
    manager: ReleaseManager, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = upstream.commit({"README": "v3\n"}, "third")
    other = tmp_path / "other"
    git("init", "-q", str(other), cwd=tmp_path)
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    manager.fetch()
    assert manager.resolve(None, "main") == sha
    release = build(manager, sha)
    assert (release / "README").read_text() == "v3\n"
    monkeypatch.delenv("GIT_DIR")
    assert git("for-each-ref", cwd=other) == ""


def test_data_survives_new_releases_switches_rollback_and_pruning(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    first = build(manager, sha_of(upstream, "v1.0"), clock)
    manager.switch(first)
    (manager.current_link / "var/filestorage/Data.fs").write_text("zodb")
    (manager.current_link / "var/blobstorage/blob").write_text("blob")
    for _ in range(4):
        manager.switch(build(manager, sha_of(upstream, "main"), clock))
        assert (manager.current_link / "var/filestorage/Data.fs").read_text() == "zodb"
    manager.switch(manager.previous().path)  # rollback
    assert manager.prune()
    assert first.name not in [r.name for r in manager.releases()]
    assert (manager.current_link / "var/filestorage/Data.fs").read_text() == "zodb"
    assert (manager.shared_dir / "var/blobstorage/blob").read_text() == "blob"


# -- switching -----------------------------------------------------------------------


def test_switch_replaces_current_by_rename_with_a_relative_target(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    one = build(manager, sha_of(upstream, "v1.0"), clock)
    two = build(manager, sha_of(upstream, "main"), clock)
    manager.switch(one)
    assert os.readlink(manager.current_link) == f"releases/{one.name}"
    manager.switch(two)
    assert os.readlink(manager.current_link) == f"releases/{two.name}"
    assert manager.current().sha == sha_of(upstream, "main")
    assert sorted(p.name for p in manager.app_dir.iterdir()) == [
        "current",
        "releases",
        "repo.git",
        "shared",
    ]


def test_current_always_exists_while_switching(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    one = build(manager, sha_of(upstream, "v1.0"), clock)
    two = build(manager, sha_of(upstream, "main"), clock)
    manager.switch(one)
    missing: list[OSError] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                (manager.current_link / "README").stat()
            except OSError as exc:
                missing.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for i in range(200):
        manager.switch(two if i % 2 else one)
    done.set()
    watcher.join()
    assert missing == []


def test_a_temp_link_left_by_a_crash_is_cleaned_on_the_next_switch(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    release = build(manager, sha_of(upstream, "main"))
    stale = manager.app_dir / ".current.tmp-999-deadbeef"
    stale.symlink_to("releases/19990101000000")
    assert manager.current() is None
    manager.switch(release)
    assert not stale.is_symlink()
    assert manager.current().name == release.name


def test_switch_refuses_half_built_and_failed_releases(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    good = build(manager, sha_of(upstream, "main"))
    manager.switch(good)
    half = manager.new_release_dir()
    manager.checkout(half, sha_of(upstream, "main"))
    with pytest.raises(ReleaseError, match="not complete"):
        manager.switch(half)
    manager.mark_failed(half, "buildout exited 1")
    with pytest.raises(ReleaseError, match="not complete"):
        manager.switch(half)
    assert manager.current().name == good.name


def test_switch_refuses_paths_outside_the_releases_dir(
    manager: ReleaseManager, tmp_path: Path
) -> None:
    for path in (tmp_path, manager.releases_dir / ".." / "shared", Path("releases/20240101000000")):
        with pytest.raises(ReleaseError):
            manager.switch(path)
    assert not manager.current_link.exists()


def test_current_release_cannot_be_marked_failed(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    release = build(manager, sha_of(upstream, "main"))
    manager.switch(release)
    with pytest.raises(ReleaseError):
        manager.mark_failed(release, "late failure")
    assert manager.current().name == release.name


# -- listing, finding ----------------------------------------------------------------


def test_current_previous_and_find_describe_complete_releases(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    assert manager.current() is None and manager.previous() is None
    one = build(manager, sha_of(upstream, "v1.0"), clock)
    two = build(manager, sha_of(upstream, "main"), clock)
    manager.switch(two)
    assert manager.previous().name == one.name
    info = manager.find(one.name)
    assert info.sha == sha_of(upstream, "v1.0")
    assert info.cfg_digest == "digest-" + info.sha[:7]
    assert datetime.fromisoformat(info.built_at).tzinfo is not None
    assert [r.name for r in manager.releases()] == [one.name, two.name]


@pytest.mark.parametrize("name", ["../current", "..", "20240101000000/../x", "/etc", "latest"])
def test_find_rejects_names_that_are_not_release_names(manager: ReleaseManager, name: str) -> None:
    with pytest.raises(ReleaseError, match="invalid release name"):
        manager.find(name)


def test_find_rejects_unknown_and_incomplete_releases(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    half = manager.new_release_dir()
    with pytest.raises(ReleaseError, match="not found or not complete"):
        manager.find(half.name)
    with pytest.raises(ReleaseError, match="not found or not complete"):
        manager.find("20000101000000")


def test_releases_made_in_the_same_second_get_distinct_names_in_order(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    sha = sha_of(upstream, "main")
    made = [manager.new_release_dir() for _ in range(12)]
    for release in made:
        manager.mark_complete(release, sha=sha, cfg_digest="d")
    assert [r.name for r in manager.releases()] == [p.name for p in made]
    assert made[0].name == "20240501120000"
    assert made[11].name == "20240501120000_11"
    assert manager.releases()[-1].name == "20240501120000_11"  # not sorted as a string


def test_a_name_freed_by_pruning_is_not_reused_out_of_order(manager: ReleaseManager) -> None:
    first, second = manager.new_release_dir(), manager.new_release_dir()
    first.rmdir()
    assert manager.new_release_dir().name == "20240501120000_2"
    assert second.name == "20240501120000_1"


# -- pruning -------------------------------------------------------------------------


def test_prune_keeps_keep_releases_plus_current_and_previous(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    sha = sha_of(upstream, "main")
    made = [build(manager, sha, clock) for _ in range(6)]
    manager.switch(made[-1])
    removed = manager.prune()
    assert removed == [p.name for p in made[:4]]  # oldest first
    assert [r.name for r in manager.releases()] == [p.name for p in made[4:]]


def test_prune_after_a_rollback_never_removes_current_or_the_one_before(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    sha = sha_of(upstream, "main")
    made = [build(manager, sha, clock) for _ in range(6)]
    manager.switch(made[1])  # rolled far back
    manager.prune()
    kept = [r.name for r in manager.releases()]
    assert kept == [made[0].name, made[1].name, made[4].name, made[5].name]
    assert manager.current().name == made[1].name


def test_prune_removes_failed_and_half_built_releases_but_never_current(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    sha = sha_of(upstream, "main")
    good = build(manager, sha, clock)
    manager.switch(good)
    clock.tick()
    failed = manager.new_release_dir()
    manager.checkout(failed, sha)
    manager.mark_failed(failed, "buildout exited 1")
    clock.tick()
    half = manager.new_release_dir()
    (manager.shared_dir / "var/log/instance.log").parent.mkdir(parents=True, exist_ok=True)
    (manager.shared_dir / "var/log/instance.log").write_text("log")
    manager.link_shared(half)
    assert manager.prune() == [failed.name, half.name]
    assert [r.name for r in manager.releases()] == [good.name]
    assert (manager.shared_dir / "var/log/instance.log").read_text() == "log"


def test_clean_incomplete_removes_half_built_releases_only(
    manager: ReleaseManager, upstream: Upstream, clock: Clock
) -> None:
    sha = sha_of(upstream, "main")
    good = build(manager, sha, clock)
    clock.tick()
    failed = manager.new_release_dir()
    manager.mark_failed(failed, "boom")
    clock.tick()
    half = manager.new_release_dir()
    manager.checkout(half, sha)
    (manager.app_dir / ".current.tmp-1-abc").symlink_to("releases/x")
    assert manager.clean_incomplete() == [half.name]
    assert good.is_dir() and failed.is_dir()
    assert not (manager.app_dir / ".current.tmp-1-abc").is_symlink()
    assert (manager.shared_dir / "var/filestorage").is_dir()


def test_a_half_built_current_release_is_never_removed(
    manager: ReleaseManager, upstream: Upstream
) -> None:
    release = build(manager, sha_of(upstream, "main"))
    manager.switch(release)
    (release / MARKER).unlink()  # damaged by hand
    assert manager.clean_incomplete() == []
    assert manager.prune() == []
    assert release.is_dir()


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"app": "../etc"},
        {"app": ".hidden"},
        {"app": "a/b"},
        {"shared_dirs": ["/var/data"]},
        {"shared_dirs": ["../data"]},
        {"shared_dirs": ["var", "var/log"]},
        {"shared_dirs": ["."]},
        {"keep_releases": 0},
    ],
)
def test_unsafe_settings_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    settings: dict[str, object] = {"root": tmp_path, "app": "site", "repository": "/r.git"}
    with pytest.raises(ConfigError):
        ReleaseManager(**{**settings, **kwargs})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
