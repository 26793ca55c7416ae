"""Which release each program of an app runs from (docs/architecture.md, "Restarts"):
the record ``<root>/<app>/.programs.json``, the release a process works in, and a digest
of what a program runs, so a restart can tell whether a program's files changed.

Split from ``agent/adapters/releases.py``, whose ``ReleaseManager`` composes it (and
keeps the releases it names from being pruned); nothing here creates or removes a release.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from agent.adapters.files import atomic_write
from agent.adapters.markers import RELEASE_RE, fs_errors, release_sort_key
from agent.core.errors import ConfigError

PROGRAMS_FILE = ".programs.json"


class ProgramRecords:
    """The programs of one app and the releases they run from."""

    def __init__(self, app_dir: Path, releases_dir: Path) -> None:
        self.releases_dir = releases_dir
        #: ``{"programs": {name: release}}``: the release each program was started from.
        self.programs_file = app_dir / PROGRAMS_FILE

    def recorded(self) -> dict[str, str]:
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
            if isinstance(v, str) and RELEASE_RE.fullmatch(v)
        }

    def record(
        self, started: dict[str, str | None], *, removed: Sequence[str] = ()
    ) -> dict[str, str]:
        """Note the release each of ``started`` runs from (None: unknown, forgotten);
        ``removed`` programs are forgotten. Returns the whole record."""
        record = self.recorded()
        for name, release in started.items():
            if release is None:
                record.pop(name, None)
            else:
                record[name] = release
        for name in removed:
            record.pop(name, None)
        with fs_errors(f"write {self.programs_file}"):
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
        return name if RELEASE_RE.fullmatch(name) else None

    def in_use(self) -> set[str]:
        """Releases a running program uses: those recorded for the app's programs, and
        those any process we can see works in (a program, or an operator's
        ``bin/client1 run``)."""
        found = set(self.recorded().values())
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
