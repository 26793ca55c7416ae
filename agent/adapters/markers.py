"""What a release directory says about itself (docs/architecture.md, "On disk" and
"Release memory"): its marker ``.deploy-release.json`` (complete, failed, bad), the
listing of an app's releases, and which one ``rollback`` goes to.

Split from ``agent/adapters/releases.py``, whose ``ReleaseManager`` composes it: the
manager owns the directories, the mirror and ``current``; this module owns the markers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from agent.adapters.files import atomic_write
from agent.core.errors import GitError, ReleaseError
from agent.core.names import SHA_RE

log = structlog.get_logger(__name__)

MARKER = ".deploy-release.json"
RELEASE_RE = re.compile(r"(\d{14})(?:_(\d{1,6}))?")


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
    match = RELEASE_RE.fullmatch(name)
    if match is None:
        raise ReleaseError(f"invalid release name {name!r}")
    return match[1], int(match[2] or 0)


@contextlib.contextmanager
def fs_errors(what: str) -> Iterator[None]:
    """Translate a file-system failure into the error the pipeline reports."""
    try:
        yield
    except OSError as exc:
        raise ReleaseError(f"cannot {what}: {exc}") from exc


class ReleaseMarkers:
    """The markers under one app's ``releases/``; ``current_name`` names the live release
    (None when there is none). Releases passed in are checked by the caller as its own."""

    def __init__(
        self, app: str, releases_dir: Path, current_name: Callable[[], str | None]
    ) -> None:
        self.app = app
        self.releases_dir = releases_dir
        self.current_name = current_name

    # -- reading ----------------------------------------------------------------------

    def scan(self) -> Iterator[tuple[str, Path]]:
        """Release directories (real ones, valid names), oldest first."""
        if not self.releases_dir.is_dir():
            return iter(())
        found = [
            (entry.name, Path(entry.path))
            for entry in os.scandir(self.releases_dir)
            if RELEASE_RE.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
        return iter(sorted(found, key=lambda item: release_sort_key(item[0])))

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((path / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def info(self, name: str) -> ReleaseInfo | None:
        path = self.releases_dir / name
        if path.is_symlink() or not path.is_dir():
            return None
        marker = self.read(path)
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

    def releases(self) -> list[ReleaseInfo]:
        """Complete releases, oldest first."""
        infos = (self.info(name) for name, _ in self.scan())
        return [info for info in infos if info is not None]

    def previous(self) -> ReleaseInfo | None:
        """The complete release just before ``current`` (good or bad)."""
        name = self.current_name()
        if name is None:
            return None
        older = [r for r in self.releases() if release_sort_key(r.name) < release_sort_key(name)]
        return older[-1] if older else None

    def find(self, name: str) -> ReleaseInfo:
        """A complete release by name (``rollback --to``)."""
        release_sort_key(name)  # validates: no path can be smuggled in
        info = self.info(name)
        if info is None:
            raise ReleaseError(f"release {name!r} of {self.app} not found or not complete")
        return info

    def listing(self) -> list[dict[str, Any]]:
        """Every release directory, oldest first, as ``deploy-agent releases`` shows it:
        name, revision, created, decision, status (complete, bad, failed, incomplete),
        reason, and whether it is current."""
        current = self.current_name()
        rows = []
        for name, path in self.scan():
            marker = self.read(path) or {}
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

    def rollback_target(
        self, to: str | None, *, force: bool, resolve: Callable[[str], str]
    ) -> ReleaseInfo | None:
        """Where ``rollback`` goes: without ``to``, the newest good release older than
        ``current``; with it, that release (by name) or the newest good release of that
        revision (``resolve`` gives its sha). A bad release is only ever chosen by name or
        revision, and only with ``force``."""
        if to is None:
            name = self.current_name()
            if name is None:
                return None
            here = release_sort_key(name)
            older = [r for r in self.releases() if release_sort_key(r.name) < here]
            good = [r for r in older if r.bad is None]
            return good[-1] if good else None
        if RELEASE_RE.fullmatch(to) and (self.releases_dir / to).is_dir():
            target = self.find(to)
        else:
            try:
                sha = resolve(to)
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

    # -- writing ----------------------------------------------------------------------

    def mark_complete(
        self, release: Path, *, sha: str, cfg_digest: str, decision: str | None = None
    ) -> None:
        """Record a successful build; only a complete release can become ``current``."""
        if not SHA_RE.fullmatch(sha):
            raise ReleaseError(f"a release records a full sha, not {sha!r}")
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        marker = {"status": "complete", "sha": sha, "cfg_digest": cfg_digest, "built_at": built_at}
        if decision:
            marker["decision"] = decision
        with fs_errors(f"mark release {release.name}"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())

    def mark_failed(self, release: Path, reason: str) -> None:
        """Record a failed build, kept for inspection until the next prune."""
        if release.name == self.current_name():
            raise ReleaseError(f"release {release.name} is current; not marking it failed")
        if not release.is_dir():
            log.warning("releases.mark_failed_missing", app=self.app, release=release.name)
            return
        marker = {
            "status": "failed",
            "reason": reason,
            "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with fs_errors(f"mark release {release.name}"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())

    def mark_bad(self, release: Path, reason: str) -> None:
        """Remember that a complete release failed after its switch (health gate, hook):
        ``rollback`` skips it and ``rollback --to`` it needs ``force``."""
        marker = self.read(release)
        if marker is None or marker.get("status") != "complete":
            log.warning("releases.mark_bad_not_complete", app=self.app, release=release.name)
            return
        marker["bad"] = True
        marker["bad_reason"] = reason[:2000]
        marker["bad_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        with fs_errors(f"mark release {release.name} bad"):
            atomic_write(release / MARKER, json.dumps(marker, sort_keys=True).encode())
        log.warning("releases.marked_bad", app=self.app, release=release.name, reason=reason)
