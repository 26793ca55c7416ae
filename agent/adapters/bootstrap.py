"""A release's bootstrap (its venv with zc.buildout), built once and shared while its
inputs stay the same.

The old way ran the app's ``buildout.bootstrap`` commands (say ``python3 -m venv .`` and
``bin/pip install -r requirements.txt``) in every release: 11-14 s and a 23 MB venv per
release on the Plone example, for an identical result whenever neither the commands nor
the requirements changed, as in every configuration-only release.

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

**Shared venv.** ``<cache>/<key>/`` (the pipeline gives ``<root>/<app>/shared/bootstrap``)
is built by running the bootstrap commands there, with the named release files copied in at
the same relative paths, so ``python3 -m venv .`` and ``bin/pip install -r
requirements.txt`` work unchanged. It is complete only once ``.bootstrap-complete.json``
is written, last and atomically; a directory without it (a build killed half-way) is
removed and built again. ``<cache>/.lock`` (``flock``) is held while a venv is checked,
built, linked into a release or pruned, so two processes never build or remove the same
one. It is built where it stays: a venv cannot move (its scripts name its own Python), and
buildout gives the scripts it generates (``bin/client1``, ``bin/zeoserver``) the shebang
of the Python that ran it, so the releases' scripts run ``<cache>/<key>/bin/python``.

**In the release** ``bin/`` is a real directory. Each regular file of the shared venv's
``bin/`` (``buildout``, ``pip``, ``activate``...) is *copied* in: their shebangs already
name the shared venv's Python, and a copy means nothing that rewrites a script of the
release (buildout upgrading itself writes ``bin/buildout``) can write through a link into
the venv every release shares. The interpreter links (``python``, ``python3``) become
two-line ``exec`` wrappers: a symlink would start the base interpreter without the venv,
since Python finds ``pyvenv.cfg`` next to the path it was started by. ``bin/buildout -c
deploy.cfg`` takes the directory of ``deploy.cfg``, the release, as
``buildout:directory``, so parts, develop eggs and generated scripts land in the release;
``lib/``, ``include/`` and ``pyvenv.cfg`` are not needed there. The release records the
venv it uses in ``.deploy-bootstrap.json``.

**Prune.** After a release is linked, every shared venv that no release directory on disk
names in its ``.deploy-bootstrap.json`` is removed, under the lock. Releases are removed
by ``ReleaseManager.prune`` (which keeps ``current`` and the one before it), so a venv
goes one deploy after the last release using it; never while a release on disk uses it.

Caveat: a shared venv is shared. ``bin/pip install`` run by hand in one release installs
into the venv of every release with the same key; ``reuse_bootstrap: false`` restores one
venv per release.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from agent.adapters.files import atomic_write
from agent.core.errors import BuildoutFailed

log = structlog.get_logger(__name__)

COMPLETE = ".bootstrap-complete.json"
REFERENCE = ".deploy-bootstrap.json"
LOCK = ".lock"
KEY_VERSION = 1
LOCK_POLL = 0.1
PROBE_TIMEOUT = 30.0
#: 128 bits of the sha256: the venv's path goes into every generated script's shebang,
#: and kernels before 5.1 cut a shebang line at 127 bytes.
DIGEST_CHARS = 32
_KEY_RE = re.compile(rf"[0-9a-f]{{{DIGEST_CHARS}}}")
_PYTHON_RE = re.compile(r"python[0-9.]*")
_REQUIREMENT_OPTIONS = ("-r", "--requirement", "-c", "--constraint")
_PROBE = (
    "import os, sys; e = os.path.realpath(sys.executable); s = os.stat(e); "
    "print(sys.version.replace(chr(10), ' ')); print(e); print(s.st_size, s.st_mtime_ns)"
)

#: Runs one bootstrap command: (argv, cwd, step name, timeout) -> seconds it took.
StepRunner = Callable[[Sequence[str], Path, str, float], Awaitable[float]]


class NotReusable(Exception):
    """The bootstrap builds something of this release: it cannot be shared."""


@dataclass(frozen=True)
class BootstrapKey:
    """What a shared venv is built from, and its digest (the directory name)."""

    digest: str
    files: tuple[str, ...]  # release-relative files to copy into the shared directory
    inputs: dict[str, Any]


@dataclass(frozen=True)
class Prepared:
    """The outcome of ``prepare``: where the release's venv lives and what it cost."""

    digest: str
    path: Path
    reused: bool
    seconds: float
    pruned: tuple[str, ...]


# -- the key ----------------------------------------------------------------------------


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


# -- the lock ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _locked(cache: Path, deadline: float) -> AsyncIterator[None]:
    """``<cache>/.lock``, waited for without blocking the event loop, until ``deadline``."""
    handle = await asyncio.to_thread(open, cache / LOCK, "a+")
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildoutFailed(
                        f"bootstrap: {cache} stayed locked by another build until the timeout",
                        step="bootstrap",
                        returncode=None,
                        output_tail=[],
                        timed_out=True,
                    ) from None
                await asyncio.sleep(LOCK_POLL)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


# -- building, linking, pruning ---------------------------------------------------------


def is_complete(venv: Path) -> bool:
    return not venv.is_symlink() and (venv / COMPLETE).is_file()


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fresh(venv: Path) -> bool:
    """An empty directory at ``venv``; True when a half-built one had to go first."""
    discarded = os.path.lexists(venv)
    if discarded:
        _remove(venv)
    venv.mkdir()
    return discarded


def _copy_inputs(key: BootstrapKey, release: Path, venv: Path) -> None:
    for rel in key.files:
        dest = venv / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(release / rel, dest)


async def _build(
    key: BootstrapKey,
    release: Path,
    venv: Path,
    bootstrap: Sequence[Sequence[str]],
    run: StepRunner,
    deadline: float,
) -> None:
    if await asyncio.to_thread(_fresh, venv):
        log.warning("bootstrap.discarded", digest=key.digest, reason="not complete")
    try:
        await asyncio.to_thread(_copy_inputs, key, release, venv)
        for index, argv in enumerate(bootstrap):
            step = f"bootstrap[{index}]"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BuildoutFailed(
                    f"{step} not started: the timeout ran out",
                    step=step,
                    returncode=None,
                    output_tail=[],
                    timed_out=True,
                )
            await run(argv, venv, step, remaining)
        marker = json.dumps({"digest": key.digest, "inputs": key.inputs}, sort_keys=True, indent=1)
        await asyncio.to_thread(atomic_write, venv / COMPLETE, marker.encode())
    except BaseException:
        with contextlib.suppress(OSError):
            await asyncio.shield(asyncio.to_thread(_remove, venv))
        raise


def _wrapper(target: Path) -> bytes:
    return f'#!/bin/sh\nexec {shlex.quote(str(target))} "$@"\n'.encode()


def link_release(venv: Path, release: Path) -> list[str]:
    """Fill the release's real ``bin/`` from the shared venv's (see the module docstring)."""
    source, bin_dir = venv / "bin", release / "bin"
    if bin_dir.is_symlink():
        bin_dir.unlink()  # never write through a link the checkout brought
    bin_dir.mkdir(exist_ok=True)
    names = []
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        dest = bin_dir / entry.name
        if os.path.lexists(dest):
            _remove(dest)
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            dest.write_bytes(_wrapper(source / entry.name))
            dest.chmod(0o755)
        else:
            shutil.copyfile(entry.path, dest, follow_symlinks=False)
            dest.chmod(stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
        names.append(entry.name)
    return names


def referenced(releases_dir: Path) -> set[str]:
    """Digests named by the releases on disk."""
    found: set[str] = set()
    if not releases_dir.is_dir():
        return found
    for entry in os.scandir(releases_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            data = json.loads((Path(entry.path) / REFERENCE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        digest = data.get("digest") if isinstance(data, dict) else None
        if isinstance(digest, str) and _KEY_RE.fullmatch(digest):
            found.add(digest)
    return found


def _prune(cache: Path, releases_dir: Path, keep: Iterable[str]) -> list[str]:
    """Remove shared venvs no release on disk uses (the caller holds the lock)."""
    used = referenced(releases_dir) | set(keep)
    removed = []
    for entry in sorted(os.scandir(cache), key=lambda e: e.name):
        if _KEY_RE.fullmatch(entry.name) and entry.name not in used:
            _remove(Path(entry.path))
            removed.append(entry.name)
    if removed:
        log.info("bootstrap.pruned", removed=removed)
    return removed


async def prune_unused(cache: Path, releases_dir: Path, *, deadline: float) -> list[str]:
    """``_prune`` under the cache lock; nothing to do when there is no cache."""
    if not await asyncio.to_thread(cache.is_dir):
        return []
    async with _locked(cache, deadline):
        return await asyncio.to_thread(_prune, cache, releases_dir, ())


async def prepare(
    release: Path,
    key: BootstrapKey,
    *,
    cache: Path,
    bootstrap: Sequence[Sequence[str]],
    run: StepRunner,
    deadline: float,
) -> Prepared:
    """Build the shared venv if needed, link it into ``release``, prune the unused ones."""
    started = time.monotonic()
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    venv = cache / key.digest
    async with _locked(cache, deadline):
        reused = await asyncio.to_thread(is_complete, venv)
        if reused:
            log.info("bootstrap.reused", digest=key.digest, path=str(venv))
        else:
            log.info("bootstrap.building", digest=key.digest, path=str(venv))
            await _build(key, release, venv, bootstrap, run, deadline)
        names = await asyncio.to_thread(link_release, venv, release)
        reference = json.dumps({"digest": key.digest, "path": str(venv)}, sort_keys=True)
        await asyncio.to_thread(atomic_write, release / REFERENCE, reference.encode())
        pruned = await asyncio.to_thread(_prune, cache, release.parent, (key.digest,))
    seconds = time.monotonic() - started
    log.info(
        "bootstrap.ready",
        digest=key.digest,
        reused=reused,
        linked=len(names),
        seconds=round(seconds, 3),
    )
    return Prepared(key.digest, venv, reused, seconds, tuple(pruned))
