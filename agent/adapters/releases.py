"""One app's code on disk: the git mirror, the release directories, the atomic switch.

Layout (docs/architecture.md, "On disk"):
``<root>/<app>/{repo.git, releases/<ts>, current, shared}``.
Synchronous on purpose: git and the file system block anyway, so the pipeline calls these
methods through ``asyncio.to_thread``. Calls for one app must be serialized by the caller
(``prune`` treats a release without a marker as debris, not as a build in progress).

``ReleaseManager`` composes what it does not own itself: the markers and the listing
(``agent/adapters/markers.py``) and the record of which release each program runs from
(``agent/adapters/programrecords.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from agent.adapters.files import fsync_dir
from agent.adapters.gitmirror import GitMirror
from agent.adapters.markers import (
    MARKER,
    RELEASE_RE,
    ReleaseInfo,
    ReleaseMarkers,
    fs_errors,
    release_sort_key,
)
from agent.adapters.programrecords import ProgramRecords
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError, ReleaseError

log = structlog.get_logger(__name__)

DEFAULT_SHARED_DIRS = ("var/filestorage", "var/blobstorage", "var/log")
_APP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TMP_LINK = ".current.tmp-"


def _check_shared_dirs(dirs: Sequence[str]) -> tuple[str, ...]:
    """Relative, normalized and disjoint: a nested pair would link data over data."""
    clean: list[str] = []
    for raw in dirs:
        pure = PurePosixPath(raw)
        if not raw or pure.is_absolute() or ".." in pure.parts or "\x00" in raw:
            raise ConfigError(f"shared dir {raw!r} must be a relative path without '..'")
        clean.append(str(pure))
    for a in clean:
        for b in clean:
            if a != b and PurePosixPath(b).is_relative_to(a):
                raise ConfigError(f"shared dirs {a!r} and {b!r} overlap")
    if len(set(clean)) != len(clean) or "." in clean:
        raise ConfigError(f"shared dirs {list(dirs)!r} repeat or name the release itself")
    return tuple(clean)


def _symlinked_parent(release: Path, rel: str) -> PurePosixPath | None:
    """A repo could ship ``var -> /``: nothing may be created or removed through it."""
    for parent in reversed(PurePosixPath(rel).parents[:-1]):
        if (release / parent).is_symlink():
            return parent
    return None


def _link_shared_dir(link: Path, target: Path) -> None:
    """``link`` becomes a symlink to ``target``; whatever the checkout had there goes."""
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if os.readlink(link) == str(target):
            return
        link.unlink()  # a symlink: unlinking never touches data
    elif link.is_dir():
        shutil.rmtree(link)  # the checkout's placeholder (e.g. a .gitkeep)
    elif link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


class ReleaseManager:
    """Owns ``<root>/<app>``: nothing it creates or removes lies outside that directory."""

    @classmethod
    def of(cls, config: AgentConfig, app: str) -> ReleaseManager:
        """The manager of one configured app of this agent."""
        cfg = config.app(app)
        return cls(
            root=config.paths.root,
            app=app,
            repository=cfg.repository,
            keep_releases=cfg.keep_releases,
            shared_dirs=cfg.shared_dirs,
        )

    def __init__(
        self,
        *,
        root: Path,
        app: str,
        repository: str,
        keep_releases: int = 5,
        shared_dirs: Sequence[str] = DEFAULT_SHARED_DIRS,
        fetch_timeout: float = 300.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not _APP_RE.fullmatch(app):
            raise ConfigError(f"invalid app name {app!r}")
        if keep_releases < 1:
            raise ConfigError(f"keep_releases must be at least 1, not {keep_releases}")
        self.app = app
        self.keep_releases = keep_releases
        self.shared_dirs = _check_shared_dirs(shared_dirs)
        self._clock = clock or (lambda: datetime.now(UTC))
        self.app_dir = Path(os.path.abspath(root)) / app
        self.mirror = self.app_dir / "repo.git"
        self.git = GitMirror(self.mirror, repository, fetch_timeout=fetch_timeout)
        self.releases_dir = self.app_dir / "releases"
        self.current_link = self.app_dir / "current"
        self.shared_dir = self.app_dir / "shared"
        self.eggs_dir = self.shared_dir / "eggs"
        self.downloads_dir = self.shared_dir / "downloads"
        self.markers = ReleaseMarkers(app, self.releases_dir, self._current_name)
        self.programs = ProgramRecords(self.app_dir, self.releases_dir)

    def fetch(self) -> None:
        """Bring the mirror up to date (created on first use, never re-cloned)."""
        self.app_dir.mkdir(parents=True, exist_ok=True)
        self.git.fetch()

    def resolve(self, revision: str | None, branch: str | None) -> str:
        """The full sha of ``revision`` (sha, short sha, tag, branch), else of ``branch``."""
        return self.git.resolve(revision, branch)

    def read_file(self, sha: str, path: str) -> str | None:
        """A file of the repository at ``sha`` (from the mirror), None when absent."""
        return self.git.read_file(sha, path)

    # -- building a release ----------------------------------------------------------

    def new_release_dir(self) -> Path:
        """Create ``releases/<UTC timestamp>``, suffixed ``_1``, ``_2``... within a second."""
        with fs_errors("create the releases directory"):
            self.releases_dir.mkdir(parents=True, exist_ok=True)
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%d%H%M%S")
        taken = [release_sort_key(n)[1] for n, _ in self.markers.scan() if n.startswith(stamp)]
        for suffix in range(max(taken, default=-1) + 1, 1_000_000):
            path = self.releases_dir / (f"{stamp}_{suffix}" if suffix else stamp)
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
        raise ReleaseError(f"no free release name for {stamp}")

    def checkout(self, release: Path, sha: str) -> None:
        """Check ``sha`` out into ``release`` from the mirror (hard-linked objects)."""
        release = self._own(release)
        self.git.clone_into(release, sha)
        info = release / ".git" / "info"
        with fs_errors(f"write {info}/exclude"):
            info.mkdir(parents=True, exist_ok=True)
            with (info / "exclude").open("a", encoding="utf-8") as exclude:
                exclude.writelines(f"/{p}\n" for p in (MARKER, *self.shared_dirs))
        self.link_shared(release)
        log.info("releases.checked_out", app=self.app, release=release.name, sha=sha)

    def link_shared(self, release: Path) -> None:
        """Make each shared dir of ``release`` a symlink to ``shared/<dir>``, keeping data."""
        release = self._own(release)
        for rel in self.shared_dirs:
            if symlinked := _symlinked_parent(release, rel):
                raise ReleaseError(f"{symlinked} is a symlink in release {release.name}")
            with fs_errors(f"link {rel} into release {release.name}"):
                _link_shared_dir(release / rel, self.shared_dir / rel)
        with fs_errors("create shared/eggs and shared/downloads"):
            self.eggs_dir.mkdir(parents=True, exist_ok=True)
            self.downloads_dir.mkdir(parents=True, exist_ok=True)

    def mark_complete(
        self, release: Path, *, sha: str, cfg_digest: str, decision: str | None = None
    ) -> None:
        """Record a successful build; only a complete release can become ``current``."""
        self.markers.mark_complete(
            self._own(release), sha=sha, cfg_digest=cfg_digest, decision=decision
        )

    def mark_failed(self, release: Path, reason: str) -> None:
        """Record a failed build, kept for inspection until the next prune."""
        self.markers.mark_failed(self._own(release), reason)

    def mark_bad(self, release: Path, reason: str) -> None:
        """Remember that a complete release failed after its switch (health gate, hook):
        ``rollback`` skips it and ``rollback --to`` it needs ``force``."""
        self.markers.mark_bad(self._own(release), reason)

    # -- current, switch, rollback ---------------------------------------------------

    def switch(self, release: Path) -> None:
        """Point ``current`` at ``release`` with one rename: it always names a release."""
        release = self._own(release)
        if self.markers.info(release.name) is None:
            raise ReleaseError(f"release {release.name} is not complete; refusing to switch")
        self._remove_tmp_links()
        tmp = self.app_dir / f"{_TMP_LINK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with fs_errors(f"switch {self.current_link}"):
            os.symlink(f"releases/{release.name}", tmp)
            try:
                os.replace(tmp, self.current_link)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(self.app_dir)
        log.info("releases.switched", app=self.app, release=release.name)

    def current(self) -> ReleaseInfo | None:
        """The release ``current`` points at, if there is one and it is complete."""
        name = self._current_name()
        return None if name is None else self.markers.info(name)

    def releases(self) -> list[ReleaseInfo]:
        """Complete releases, oldest first."""
        return self.markers.releases()

    def previous(self) -> ReleaseInfo | None:
        """The complete release just before ``current``: the default rollback target."""
        return self.markers.previous()

    def rollback_target(self, to: str | None = None, *, force: bool = False) -> ReleaseInfo | None:
        """Where ``rollback`` goes (see ``ReleaseMarkers.rollback_target``); a revision is
        resolved through the mirror."""
        return self.markers.rollback_target(
            to, force=force, resolve=lambda revision: self.git.resolve(revision, None)
        )

    def listing(self) -> list[dict[str, Any]]:
        """Every release directory, oldest first, as ``deploy-agent releases`` shows it."""
        return self.markers.listing()

    def find(self, name: str) -> ReleaseInfo:
        """A complete release by name (``rollback --to``)."""
        return self.markers.find(name)

    # -- cleaning up -----------------------------------------------------------------

    def prune(self) -> list[str]:
        """Remove old, failed and half-built releases; never ``current``, the one before
        it, or one that a running program still uses (``in_use``)."""
        current, previous = self._current_name(), self.previous()
        keep = {r.name for r in self.releases()[-self.keep_releases :]}
        keep |= {n for n in (current, previous.name if previous else None) if n is not None}
        in_use = self.in_use()
        if in_use - keep:
            log.info("releases.kept_in_use", app=self.app, releases=sorted(in_use - keep))
        keep |= in_use
        removed = []
        for name, path in self.markers.scan():
            if name not in keep:
                self._remove(path)
                removed.append(name)
        if removed:
            log.info("releases.pruned", app=self.app, removed=removed)
        return removed

    def clean_incomplete(self) -> list[str]:
        """Remove half-built releases and stray temporary links left by a crash."""
        self._remove_tmp_links()
        current = self._current_name()
        removed = []
        for name, path in self.markers.scan():
            if name != current and self.markers.read(path) is None:
                self._remove(path)
                removed.append(name)
        if removed:
            log.info("releases.cleaned", app=self.app, removed=removed)
        return removed

    def _remove(self, path: Path) -> None:
        """Delete a release; shared links go first so nothing can reach into shared/."""
        for rel in self.shared_dirs:
            link = path / rel
            if _symlinked_parent(path, rel) is None and link.is_symlink():
                link.unlink()
        try:
            shutil.rmtree(path)  # does not follow symlinks
        except OSError as exc:
            raise ReleaseError(f"cannot remove release {path.name}: {exc}") from exc

    def _remove_tmp_links(self) -> None:
        with fs_errors("remove stale temporary links"):
            for stale in self.app_dir.glob(f"{_TMP_LINK}*"):
                if stale.is_symlink():
                    stale.unlink()

    # -- which release a program runs from (agent/adapters/programrecords.py) ---------

    def recorded_programs(self) -> dict[str, str]:
        return self.programs.recorded()

    def record_programs(
        self, started: dict[str, str | None], *, removed: Sequence[str] = ()
    ) -> dict[str, str]:
        return self.programs.record(started, removed=removed)

    def release_of_pid(self, pid: int) -> str | None:
        return self.programs.release_of_pid(pid)

    def in_use(self) -> set[str]:
        return self.programs.in_use()

    def files_digest(self, release: str, paths: Sequence[str]) -> str | None:
        return self.programs.files_digest(release, paths)

    # -- reading the disk ------------------------------------------------------------

    def _own(self, release: Path) -> Path:
        """Check that ``release`` is a release dir of this app, not a path elsewhere."""
        path = Path(os.path.abspath(release))
        if path.parent != self.releases_dir or not RELEASE_RE.fullmatch(path.name):
            raise ReleaseError(f"{release} is not a release of {self.app}")
        if path.is_symlink():
            raise ReleaseError(f"release {path.name} is a symlink")
        return path

    def _current_name(self) -> str | None:
        """The release name ``current`` points at, whatever its state; None if unset."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReleaseError(f"{self.current_link} is not a symlink") from exc
        path = Path(os.path.normpath(self.app_dir / target))
        if path.parent != self.releases_dir or not RELEASE_RE.fullmatch(path.name):
            raise ReleaseError(f"{self.current_link} points outside releases/: {target}")
        return path.name
