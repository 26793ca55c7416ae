"""The bare mirror of an app's repository (Capistrano's repo cache), through GitPython.

Created once, then only fetched; revisions are validated before git sees them, so a
message can never smuggle an option, a range or a path into a git command line.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import git
import structlog

from agent.core import names
from agent.core.errors import ConfigError, GitError, RevisionNotFound
from agent.core.names import SHA_RE
from agent.core.redact import strip_url_password

log = structlog.get_logger(__name__)

# No terminal prompt (a remote asking for credentials fails instead of hanging) and
# only plain transports: "ext::" and "fd::" URLs would run commands.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh"}


def redact_url(url: str) -> str:
    """The repository URL without its password, fit for logs and error messages."""
    return strip_url_password(url)


def check_revision(value: str) -> None:
    """Refuse anything git could read as an option, a range or a path before it runs."""
    try:
        names.check_revision(value)
    except ValueError:
        raise RevisionNotFound(
            f"invalid revision {value[:200]!r}: not a branch, tag or sha"
        ) from None


class GitMirror:
    """The bare mirror of one repository (Capistrano's repo cache), through GitPython."""

    def __init__(self, path: Path, repository: str, *, fetch_timeout: float = 300.0) -> None:
        if not repository or repository.startswith("-") or not repository.isprintable():
            raise ConfigError(f"invalid repository {redact_url(repository)!r}")
        self.path = path
        self.repository = repository
        self.fetch_timeout = fetch_timeout
        try:
            self._password = urlsplit(repository).password if "://" in repository else None
        except ValueError:
            self._password = None

    @property
    def _dir(self) -> str:
        return f"--git-dir={self.path}"

    def _git(
        self, args: list[str], *, cwd: Path | None = None, timeout: float | None = None
    ) -> tuple[int, str, str]:
        """Run git; return (status, stdout, stderr) with the password out of stderr."""
        runner = git.Git(str(cwd) if cwd else None)
        try:
            status, out, err = runner.execute(
                ["git", *args],
                with_extended_output=True,
                with_exceptions=False,
                env=_GIT_ENV,
                kill_after_timeout=timeout,
            )
        except git.CommandError as exc:
            raise GitError(f"git could not be run: {exc}") from exc
        return status, out, err.replace(self._password, "***") if self._password else err

    def _git_ok(self, what: str, args: list[str], **kwargs: Any) -> str:
        status, out, err = self._git(args, **kwargs)
        if status != 0:
            lines = err.strip().splitlines()
            # git's own "fatal:"/"error:" lines say what went wrong; keep them.
            causes = [line for line in lines if line.startswith(("fatal:", "error:"))]
            tail = " | ".join(dict.fromkeys([*causes[:2], *lines[-3:]])) or f"exit status {status}"
            raise GitError(f"{what} failed for {redact_url(self.repository)}: {tail}")
        return out

    def fetch(self) -> None:
        """Bring the mirror up to date: created once, then only fetched, never re-cloned."""
        started = time.monotonic()
        if self.path.is_dir():
            self._remove_stale_locks()
            # --git-dir everywhere: a damaged mirror must not let git find a repo above it.
            self._git_ok(
                "git config", [self._dir, "config", "--", "remote.origin.url", self.repository]
            )
        else:
            self._create_mirror()
        self._git_ok(
            "git fetch",
            [self._dir, "fetch", "--prune", "--quiet", "origin"],
            timeout=self.fetch_timeout,
        )
        log.info(
            "releases.fetched",
            repository=redact_url(self.repository),
            seconds=round(time.monotonic() - started, 3),
        )

    def _remove_stale_locks(self) -> None:
        """A git killed mid-fetch leaves ``*.lock`` files that fail every later fetch. The
        caller holds the app's exclusive lock, so no git of ours is running: they are stale."""
        candidates = [
            self.path / name
            for name in (
                "config.lock",
                "HEAD.lock",
                "packed-refs.lock",
                "shallow.lock",
                "index.lock",
                "FETCH_HEAD.lock",
            )
        ]
        refs = self.path / "refs"
        if refs.is_dir():
            candidates += refs.rglob("*.lock")
        for lock in candidates:
            if lock.is_file() and not lock.is_symlink():
                lock.unlink()
                log.warning("releases.stale_git_lock_removed", lock=str(lock))

    def _create_mirror(self) -> None:
        """Clone under a temporary name and rename, so a crash never leaves half a mirror."""
        for stale in self.path.parent.glob(f"{self.path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._git_ok(
                "git clone",
                ["clone", "--bare", "--quiet", "--", self.repository, str(tmp)],
                timeout=self.fetch_timeout,
            )
            for flag, spec in (("--replace-all", "heads"), ("--add", "tags")):
                refspec = f"+refs/{spec}/*:refs/{spec}/*"
                args = [f"--git-dir={tmp}", "config", flag, "remote.origin.fetch", refspec]
                self._git_ok("git config", args)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise GitError(f"cannot create the mirror {self.path}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("releases.mirror_created", path=str(self.path))

    def resolve(self, revision: str | None, branch: str | None) -> str:
        """The full sha of a revision (sha, short sha, tag, branch) or else of the branch."""
        wanted = revision if revision is not None else branch
        if wanted is None:
            candidates = ["HEAD"]
        else:
            check_revision(wanted)
            if revision is None:
                candidates = [f"refs/heads/{wanted}"]
            elif SHA_RE.fullmatch(wanted):
                candidates = [wanted]
            else:
                candidates = [f"refs/tags/{wanted}", f"refs/heads/{wanted}", wanted]
        if not self.path.is_dir():
            raise GitError(f"no mirror of {redact_url(self.repository)} yet: fetch first")
        hint = ""
        for ref in candidates:
            args = ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"]
            status, out, err = self._git([self._dir, *args])
            if status == 0 and SHA_RE.fullmatch(out.strip()):
                return out.strip()
            hint = err.strip().splitlines()[-1] if err.strip() else hint
        where = redact_url(self.repository)
        detail = f" ({hint})" if hint else ""
        raise RevisionNotFound(f"revision {wanted or 'HEAD'!r} not found in {where}{detail}")

    def read_file(self, sha: str, path: str) -> str | None:
        """The text of ``path`` at ``sha`` in the mirror, or None when it has no such file.

        ``path`` is a plain relative path inside the repository (no ``..``): it is read
        with ``git cat-file``, never from a work tree."""
        if not SHA_RE.fullmatch(sha) or path.startswith(("/", "-")) or ".." in path.split("/"):
            return None
        status, out, _ = self._git([self._dir, "cat-file", "blob", f"{sha}:{path}"])
        return out if status == 0 else None

    def clone_into(self, dest: Path, sha: str) -> None:
        """Check ``sha`` out into the empty dir ``dest``; objects are hard links, .git stays."""
        if not SHA_RE.fullmatch(sha):
            raise GitError(f"checkout needs a full sha, not {sha!r}")
        self._git_ok(
            "git clone (release)",
            # A path clones locally anyway (hard links where it can); an explicit --local
            # would refuse to copy across filesystems instead of falling back.
            ["clone", "--no-checkout", "--quiet", "--", str(self.path), str(dest)],
        )
        # Explicit dirs: an inherited GIT_DIR must not redirect the checkout.
        dirs = [f"--git-dir={dest / '.git'}", f"--work-tree={dest}"]
        options = ["-c", "advice.detachedHead=false"]
        self._git_ok("git checkout", [*dirs, *options, "checkout", "-q", "--detach", sha], cwd=dest)
