"""The key of a shared bootstrap venv: what its result depends on, digested.

Split from ``agent/adapters/bootstrap.py`` (which builds, links and prunes the venvs) so
that each module holds one job: this one only reads the release and probes the
interpreter, it never writes.

**Key.** ``bootstrap_key`` is the sha256 (its first 32 hex digits) of (canonical JSON):

- the bootstrap argv lists, as configured;
- the app's ``buildout.environment`` (``PIP_INDEX_URL`` and the like change what pip
  installs); the rest of the agent's environment is not part of the key;
- the bytes of every file an argv names: an argument (or the value of ``--opt=value`` or
  ``-rvalue``) that is an existing file, relative to the release or absolute; requirement
  files (after ``-r``/``-c``/``--requirement``/``--constraint``) are read for the files
  they include in turn;
- the interpreter: each command's program found on ``PATH`` (``python3``) by its real path,
  size and mtime, and a program that looks like Python is asked for ``sys.version`` and its
  real ``sys.executable`` (a pyenv shim or an apt upgrade changes the key).

**Not reusable** (the bootstrap then runs in the release, the old way, logged as
``bootstrap.not_reusable`` with the reason): an argument naming a directory of the release
other than ``.``, a named file outside the release through a symlink, or a requirement file
that installs code from the release (``-e``, ``.``/``/`` paths, ``file:`` URLs). Those build
something that belongs to one release, not to its inputs.

"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

KEY_VERSION = 1
PROBE_TIMEOUT = 30.0
#: 128 bits of the sha256: the venv's path goes into every generated script's shebang,
#: and kernels before 5.1 cut a shebang line at 127 bytes.
DIGEST_CHARS = 32
KEY_RE = re.compile(rf"[0-9a-f]{{{DIGEST_CHARS}}}")
_PYTHON_RE = re.compile(r"python[0-9.]*")
_REQUIREMENT_OPTIONS = ("-r", "--requirement", "-c", "--constraint")
_PROBE = (
    "import os, sys; e = os.path.realpath(sys.executable); s = os.stat(e); "
    "print(sys.version.replace(chr(10), ' ')); print(e); print(s.st_size, s.st_mtime_ns)"
)


class NotReusable(Exception):
    """The bootstrap builds something of this release: it cannot be shared."""


@dataclass(frozen=True)
class BootstrapKey:
    """What a shared venv is built from, and its digest (the directory name)."""

    digest: str
    files: tuple[str, ...]  # release-relative files to copy into the shared directory
    inputs: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _candidates(argv: Sequence[str]) -> Iterable[tuple[str, bool]]:
    """Each argument that may name a path, and whether it is a requirement file."""
    requirement_next = False
    for arg in argv[1:]:
        if requirement_next:
            yield arg, True
            requirement_next = False
            continue
        if arg in _REQUIREMENT_OPTIONS:
            requirement_next = True
            continue
        if arg.startswith("--") and "=" in arg:
            option, value = arg.split("=", 1)
            yield value, option in _REQUIREMENT_OPTIONS
        elif arg[:2] in ("-r", "-c") and len(arg) > 2:
            yield arg[2:], True
        elif not arg.startswith("-"):
            yield arg, False


class _Collector:
    """Walks the files the bootstrap names, inside the release and outside it."""

    def __init__(self, release: Path) -> None:
        self.release = Path(os.path.realpath(release))
        self.files: dict[str, str] = {}  # release-relative path -> sha256
        self.external: dict[str, str] = {}  # absolute path -> sha256

    def name(self, raw: str, *, requirement: bool) -> None:
        if not raw or "\x00" in raw:
            return
        pure = PurePosixPath(raw)
        if pure.is_absolute():
            path = Path(raw)
            if path.is_file():
                self._add_external(path, requirement)
            return
        self._relative(pure, requirement)

    def _relative(self, pure: PurePosixPath, requirement: bool) -> None:
        path = self.release / pure
        if not os.path.lexists(path):
            return  # made by an earlier command (bin/pip), or not a path at all
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.release):
            raise NotReusable(f"{pure} leads out of the release")
        if real.is_dir():
            if real == self.release:
                return  # ".": the venv's own directory
            raise NotReusable(f"the bootstrap names the directory {pure} of the release")
        if not real.is_file():
            return
        rel = real.relative_to(self.release).as_posix()
        if rel in self.files:
            return
        self.files[rel] = _sha256(real)
        if requirement:
            self._requirements(real, inside=True)

    def _add_external(self, path: Path, requirement: bool) -> None:
        key = str(path)
        if key in self.external:
            return
        self.external[key] = _sha256(path)
        if requirement:
            self._requirements(path, inside=False)

    def _requirements(self, path: Path, *, inside: bool) -> None:
        """Follow ``-r``/``-c`` includes; refuse lines that install local code."""
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            text = line.split(" #", 1)[0].strip()
            if not text or text.startswith("#"):
                continue
            words = text.split()
            head = words[0]
            if head in ("-e", "--editable") or head.startswith(("--editable=", ".", "/")):
                raise NotReusable(f"{path.name} installs local code: {text[:80]!r}")
            if "file:" in text:
                raise NotReusable(f"{path.name} installs from a file: URL: {text[:80]!r}")
            for value, nested in _candidates(["pip", *words]):
                if not nested:
                    continue
                base = path.parent
                target = PurePosixPath(value)
                if target.is_absolute():
                    self.name(value, requirement=True)
                elif inside:
                    rel = (base / target).relative_to(self.release)
                    self.name(PurePosixPath(rel).as_posix(), requirement=True)
                else:
                    self.name(str(base / target), requirement=True)


async def _probe(executable: str, env: Mapping[str, str], timeout: float) -> list[str]:
    """``sys.version`` and the real interpreter behind ``executable``."""
    try:
        process = await asyncio.create_subprocess_exec(
            executable,
            "-c",
            _PROBE,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        raise NotReusable(f"cannot run {executable}: {exc.strerror}") from exc
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        await process.wait()
        raise NotReusable(f"{executable} did not say its version in {timeout:.0f} s") from None
    if process.returncode != 0:
        raise NotReusable(f"{executable} -c (version probe) exited {process.returncode}")
    return out.decode("utf-8", errors="replace").splitlines()


def _program(
    argv0: str, env: Mapping[str, str], collect: _Collector
) -> tuple[dict[str, Any] | None, str | None]:
    """The identity of the program a command runs, unless the bootstrap makes it (bin/pip);
    and the executable to ask for its version when it looks like Python."""
    if "/" not in argv0:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath))
        if found is None:
            raise NotReusable(f"{argv0!r} is not on PATH")
        executable = found
    elif PurePosixPath(argv0).is_absolute():
        executable = argv0
    else:
        collect.name(argv0, requirement=False)  # a script of the release, or bin/pip
        return None, None
    real = os.path.realpath(executable)
    try:
        info = os.stat(real)
    except OSError as exc:
        raise NotReusable(f"cannot stat {executable}: {exc.strerror}") from exc
    identity: dict[str, Any] = {"real": real, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
    python = executable if _PYTHON_RE.fullmatch(PurePosixPath(argv0).name) else None
    return identity, python


def _collect(
    release: Path, bootstrap: Sequence[Sequence[str]], env: Mapping[str, str]
) -> tuple[_Collector, dict[str, Any], dict[str, str]]:
    collect = _Collector(release)
    programs: dict[str, Any] = {}
    pythons: dict[str, str] = {}
    for argv in bootstrap:
        if argv[0] not in programs:
            programs[argv[0]], python = _program(argv[0], env, collect)
            if python is not None:
                pythons[argv[0]] = python
        for raw, requirement in _candidates(argv):
            collect.name(raw, requirement=requirement)
    return collect, programs, pythons


async def bootstrap_key(
    release: Path,
    bootstrap: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str],
    environment: Mapping[str, str],
    timeout: float = PROBE_TIMEOUT,
) -> BootstrapKey:
    """The digest of everything the bootstrap's result depends on; raises NotReusable."""
    collect, programs, pythons = await asyncio.to_thread(_collect, release, bootstrap, env)
    for argv0, executable in pythons.items():
        programs[argv0]["python"] = await _probe(executable, env, timeout)
    inputs: dict[str, Any] = {
        "version": KEY_VERSION,
        "commands": [list(argv) for argv in bootstrap],
        "environment": dict(sorted(environment.items())),
        "programs": programs,
        "files": dict(sorted(collect.files.items())),
        "external": dict(sorted(collect.external.items())),
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()[:DIGEST_CHARS]
    return BootstrapKey(digest, tuple(sorted(collect.files)), inputs)
