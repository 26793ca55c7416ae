"""One app's code on disk: the git mirror, the release directories, the atomic switch.

Layout (docs/architecture.md, "On disk"):
``<root>/<app>/{repo.git, releases/<ts>, current, shared}``.
Synchronous on purpose: git and the file system block anyway, so the pipeline calls these
methods through ``asyncio.to_thread``. Calls for one app must be serialized by the caller
(``prune`` treats a release without a marker as debris, not as a build in progress).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from agent.adapters.files import atomic_write, fsync_dir
from agent.adapters.gitmirror import GitMirror
from agent.core.config import AgentConfig
from agent.core.errors import ConfigError, GitError, ReleaseError
from agent.core.names import SHA_RE

log = structlog.get_logger(__name__)

MARKER = ".deploy-release.json"
PROGRAMS_FILE = ".programs.json"
DEFAULT_SHARED_DIRS = ("var/filestorage", "var/blobstorage", "var/log")
_APP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RELEASE_RE = re.compile(r"(\d{14})(?:_(\d{1,6}))?")
_TMP_LINK = ".current.tmp-"


@dataclass(frozen=True)
class ReleaseInfo:
    """A complete release, as its marker file describes it."""

    name: str
    path: Path
    sha: str
    cfg_digest: str
    built_at: str  # ISO 8601, UTC
    decision: str = ""
    #: Why the release is marked bad (its health gate or a post-switch hook failed); None
    #: for a good one. A bad release is still complete: ``rollback --force`` may use it.
    bad: str | None = None


def release_sort_key(name: str) -> tuple[str, int]:
    """Chronological order of release names: ``..._10`` comes after ``..._9``."""
    match = _RELEASE_RE.fullmatch(name)
    if match is None:
        raise ReleaseError(f"invalid release name {name!r}")
    return match[1], int(match[2] or 0)


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


@contextlib.contextmanager
def _fs(what: str) -> Iterator[None]:
    """Translate a file-system failure into the error the pipeline reports."""
    try:
        yield
    except OSError as exc:
        raise ReleaseError(f"cannot {what}: {exc}") from exc


def _safe_relative_path(rel: str) -> str:
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\x00" in rel:
        raise ConfigError(f"{rel!r} must be a relative path inside the release, without '..'")
    return str(pure)


def _walk(start: Path) -> Iterator[Path]:
    """``start`` itself (a file, a symlink, or missing), or the files below it; never
    through a symlink, never byte-code caches."""
    if start.is_symlink() or not start.is_dir():
        yield start
        return
    for directory, dirs, files in os.walk(start, followlinks=False):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        base = Path(directory)
        for name in files:
            if not name.endswith((".pyc", ".pyo")):
                yield base / name
        for name in dirs:
            if (base / name).is_symlink():
                yield base / name


def _symlinked_parent(release: Path, rel: str) -> PurePosixPath | None:
    """A repo could ship ``var -> /``: nothing may be created or removed through it."""
    for parent in reversed(PurePosixPath(rel).parents[:-1]):
        if (release / parent).is_symlink():
            return parent
    return None


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
        with _fs("create the releases directory"):
            self.releases_dir.mkdir(parents=True, exist_ok=True)
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%d%H%M%S")
        taken = [release_sort_key(n)[1] for n, _ in self._scan() if n.startswith(stamp)]
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
        with _fs(f"write {info}/exclude"):
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
            with _fs(f"link {rel} into release {release.name}"):
                self._link_one(release / rel, self.shared_dir / rel)
        with _fs("create shared/eggs and shared/downloads"):
            self.eggs_dir.mkdir(parents=True, exist_ok=True)
            self.downloads_dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _link_one(link: Path, target: Path) -> None:
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

    def mark_complete(
        self, release: Path, *, sha: str, cfg_digest: str, decision: str | None = None
    ) -> None:
        """Record a successful build; only a complete release can become ``current``."""
        release = self._own(release)
        if not SHA_RE.fullmatch(sha):
            raise ReleaseError(f"a release records a full sha, not {sha!r}")
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        marker = {"status": "complete", "sha": sha, "cfg_digest": cfg_digest, "built_at": built_at}
        if decision:
            marker["decision"] = decision
        with _fs(f"mark release {release.name}"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())

    def mark_failed(self, release: Path, reason: str) -> None:
        """Record a failed build, kept for inspection until the next prune."""
        release = self._own(release)
        if release.name == self._current_name():
            raise ReleaseError(f"release {release.name} is current; not marking it failed")
        if not release.is_dir():
            log.warning("releases.mark_failed_missing", app=self.app, release=release.name)
            return
        marker = {
            "status": "failed",
            "reason": reason,
            "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with _fs(f"mark release {release.name}"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())

    def mark_bad(self, release: Path, reason: str) -> None:
        """Remember that a complete release failed after its switch (health gate, hook):
        ``rollback`` skips it and ``rollback --to`` it needs ``force``."""
        release = self._own(release)
        marker = self._marker(release)
        if marker is None or marker.get("status") != "complete":
            log.warning("releases.mark_bad_not_complete", app=self.app, release=release.name)
            return
        marker["bad"] = True
        marker["bad_reason"] = reason[:2000]
        marker["bad_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        with _fs(f"mark release {release.name} bad"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())
        log.warning("releases.marked_bad", app=self.app, release=release.name, reason=reason)

    # -- current, switch, rollback ---------------------------------------------------

    def switch(self, release: Path) -> None:
        """Point ``current`` at ``release`` with one rename: it always names a release."""
        release = self._own(release)
        if self._info(release.name) is None:
            raise ReleaseError(f"release {release.name} is not complete; refusing to switch")
        self._remove_tmp_links()
        tmp = self.app_dir / f"{_TMP_LINK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with _fs(f"switch {self.current_link}"):
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
        return None if name is None else self._info(name)

    def releases(self) -> list[ReleaseInfo]:
        """Complete releases, oldest first."""
        infos = (self._info(name) for name, _ in self._scan())
        return [info for info in infos if info is not None]

    def previous(self) -> ReleaseInfo | None:
        """The complete release just before ``current``: the default rollback target."""
        name = self._current_name()
        if name is None:
            return None
        older = [r for r in self.releases() if release_sort_key(r.name) < release_sort_key(name)]
        return older[-1] if older else None

    def rollback_target(self, to: str | None = None, *, force: bool = False) -> ReleaseInfo | None:
        """Where ``rollback`` goes: without ``to``, the newest good release older than
        ``current``; with it, that release (by name) or the newest good release of that
        revision (a sha prefix, tag or branch, resolved through the mirror). A bad release
        is only ever chosen by name or revision, and only with ``force``."""
        if to is None:
            name = self._current_name()
            if name is None:
                return None
            here = release_sort_key(name)
            older = [r for r in self.releases() if release_sort_key(r.name) < here]
            good = [r for r in older if r.bad is None]
            return good[-1] if good else None
        if _RELEASE_RE.fullmatch(to) and (self.releases_dir / to).is_dir():
            target = self.find(to)
        else:
            try:
                sha = self.git.resolve(to, None)
            except GitError as exc:
                raise ReleaseError(
                    f"{to!r} is neither a release of {self.app} nor a revision: {exc}"
                ) from exc
            of_sha = [r for r in self.releases() if r.sha == sha]
            if not of_sha:
                raise ReleaseError(f"no complete release of {self.app} has revision {sha[:12]}")
            good = [r for r in of_sha if r.bad is None]
            target = good[-1] if good else of_sha[-1]
        if target.bad is not None and not force:
            raise ReleaseError(
                f"release {target.name} of {self.app} is marked bad ({target.bad});"
                " use --force to roll back onto it anyway"
            )
        return target

    def listing(self) -> list[dict[str, Any]]:
        """Every release directory, oldest first, as ``deploy-agent releases`` shows it:
        name, revision, created, decision, status (complete, bad, failed, incomplete),
        reason, and whether it is current."""
        current = self._current_name()
        rows = []
        for name, path in self._scan():
            marker = self._marker(path) or {}
            status = str(marker.get("status") or "incomplete")
            reason = str(marker.get("reason") or "")
            if status == "complete" and marker.get("bad"):
                status, reason = "bad", str(marker.get("bad_reason") or "")
            rows.append(
                {
                    "name": name,
                    "revision": str(marker.get("sha") or ""),
                    "created": str(marker.get("built_at") or marker.get("failed_at") or ""),
                    "decision": str(marker.get("decision") or ""),
                    "status": status,
                    "reason": reason,
                    "current": name == current,
                }
            )
        return rows

    def find(self, name: str) -> ReleaseInfo:
        """A complete release by name (``rollback --to``)."""
        release_sort_key(name)  # validates: no path can be smuggled in
        info = self._info(name)
        if info is None:
            raise ReleaseError(f"release {name!r} of {self.app} not found or not complete")
        return info

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
        for name, path in self._scan():
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
        for name, path in self._scan():
            if name != current and self._marker(path) is None:
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
        with _fs("remove stale temporary links"):
            for stale in self.app_dir.glob(f"{_TMP_LINK}*"):
                if stale.is_symlink():
                    stale.unlink()

    # -- which release a program runs from -------------------------------------------

    @property
    def programs_file(self) -> Path:
        """``{"programs": {name: release}}``: the release each program was started from."""
        return self.app_dir / PROGRAMS_FILE

    def recorded_programs(self) -> dict[str, str]:
        try:
            data = json.loads(self.programs_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        programs = data.get("programs") if isinstance(data, dict) else None
        if not isinstance(programs, dict):
            return {}
        return {
            str(k): str(v)
            for k, v in programs.items()
            if isinstance(v, str) and _RELEASE_RE.fullmatch(v)
        }

    def record_programs(
        self, started: dict[str, str | None], *, removed: Sequence[str] = ()
    ) -> dict[str, str]:
        """Note the release each of ``started`` runs from (None: unknown, forgotten);
        ``removed`` programs are forgotten. Returns the whole record."""
        record = self.recorded_programs()
        for name, release in started.items():
            if release is None:
                record.pop(name, None)
            else:
                record[name] = release
        for name in removed:
            record.pop(name, None)
        with _fs(f"write {self.programs_file}"):
            data = json.dumps({"programs": dict(sorted(record.items()))}, sort_keys=True)
            atomic_write(self.programs_file, data.encode() + b"\n")
        return record

    def release_of_pid(self, pid: int) -> str | None:
        """The release a process runs in, from its working directory (supervisord starts
        programs in ``current``, which the kernel resolves to the release at start); None
        when it runs elsewhere, is gone, or is not ours to look at."""
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        return self._release_in(cwd)

    def _release_in(self, path: str) -> str | None:
        path = path.removesuffix(" (deleted)")
        try:
            relative = PurePosixPath(path).relative_to(self.releases_dir)
        except ValueError:
            try:
                relative = PurePosixPath(path).relative_to(os.path.realpath(self.releases_dir))
            except ValueError:
                return None
        name = relative.parts[0] if relative.parts else ""
        return name if _RELEASE_RE.fullmatch(name) else None

    def in_use(self) -> set[str]:
        """Releases a running program uses: those recorded for the app's programs, and
        those any process we can see works in (a program, or an operator's
        ``bin/client1 run``)."""
        found = set(self.recorded_programs().values())
        with contextlib.suppress(OSError):
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    release = self.release_of_pid(int(entry.name))
                    if release is not None:
                        found.add(release)
        return found

    def files_digest(self, release: str, paths: Sequence[str]) -> str | None:
        """A digest of what a program runs from ``release``: the files under ``paths``
        (relative), with the release's own directory written as ``<release>`` so that the
        same build in two releases digests the same. None when the release is gone."""
        release_sort_key(release)
        root = self.releases_dir / release
        if not root.is_dir() or root.is_symlink():
            return None
        spellings = sorted(
            {str(root).encode(), os.path.realpath(root).encode()}, key=len, reverse=True
        )
        digest = hashlib.sha256()
        for rel in paths:
            start = root / _safe_relative_path(rel)
            for path in sorted(_walk(start)):
                name = str(path.relative_to(root)).encode()
                if path.is_symlink():
                    body = b"-> " + os.readlink(path).encode()
                elif path.is_file():
                    try:
                        body = path.read_bytes()
                    except OSError:
                        body = b"<unreadable>"
                else:
                    body = b"<missing>"
                for spelling in spellings:
                    body = body.replace(spelling, b"<release>")
                body = _order_free(body)
                digest.update(len(name).to_bytes(4, "big") + name)
                digest.update(len(body).to_bytes(8, "big") + body)
        return digest.hexdigest()

    # -- reading the disk ------------------------------------------------------------

    def _own(self, release: Path) -> Path:
        """Check that ``release`` is a release dir of this app, not a path elsewhere."""
        path = Path(os.path.abspath(release))
        if path.parent != self.releases_dir or not _RELEASE_RE.fullmatch(path.name):
            raise ReleaseError(f"{release} is not a release of {self.app}")
        if path.is_symlink():
            raise ReleaseError(f"release {path.name} is a symlink")
        return path

    def _scan(self) -> Iterator[tuple[str, Path]]:
        """Release directories (real ones, valid names), oldest first."""
        if not self.releases_dir.is_dir():
            return iter(())
        found = [
            (entry.name, Path(entry.path))
            for entry in os.scandir(self.releases_dir)
            if _RELEASE_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
        return iter(sorted(found, key=lambda item: release_sort_key(item[0])))

    @staticmethod
    def _marker(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _info(self, name: str) -> ReleaseInfo | None:
        path = self.releases_dir / name
        if path.is_symlink() or not path.is_dir():
            return None
        marker = self._marker(path)
        if marker is None or marker.get("status") != "complete":
            return None
        return ReleaseInfo(
            name=name,
            path=path,
            sha=str(marker.get("sha", "")),
            cfg_digest=str(marker.get("cfg_digest", "")),
            built_at=str(marker.get("built_at", "")),
            decision=str(marker.get("decision") or ""),
            bad=str(marker.get("bad_reason") or "no reason recorded")
            if marker.get("bad")
            else None,
        )

    def _current_name(self) -> str | None:
        """The release name ``current`` points at, whatever its state; None if unset."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReleaseError(f"{self.current_link} is not a symlink") from exc
        path = Path(os.path.normpath(self.app_dir / target))
        if path.parent != self.releases_dir or not _RELEASE_RE.fullmatch(path.name):
            raise ReleaseError(f"{self.current_link} points outside releases/: {target}")
        return path.name


def _order_free(body: bytes) -> bytes:
    """A generated file with the order of its path lists taken out: recipes write the
    same eggs in a different order from one run to the next (plone.recipe.zeoserver's
    ``PYTHONPATH=`` and ``etc/.eggs`` follow a set), which is not a change of what runs."""
    lines = []
    for line in body.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key.strip().endswith(b"PATH") and b":" in value:
            quote = value[:1] if value[:1] in (b'"', b"'") else b""
            inner = value.strip(b"\"'")
            entries = sorted(e for e in inner.split(b":") if e)
            line = key + sep + quote + b":".join(entries) + quote
        lines.append(line)
    if all(line.startswith(b"/") for line in lines if line):  # a list of paths, one per line
        lines = sorted(lines)
    return b"\n".join(lines)
