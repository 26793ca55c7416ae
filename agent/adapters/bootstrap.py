"""A release's bootstrap (its venv with zc.buildout), built once and shared while its
inputs stay the same.

The old way ran the app's ``buildout.bootstrap`` commands (say ``python3 -m venv .`` and
``bin/pip install -r requirements.txt``) in every release: 11-14 s and a 23 MB venv per
release on the Plone example, for an identical result whenever neither the commands nor
the requirements changed, as in every configuration-only release.

The key (what a venv is built from, and when a bootstrap cannot be shared) is computed in
``agent/adapters/bootstrapkey.py``; this module builds, links and prunes the venvs.

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
import json
import os
import shlex
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.adapters.bootstrapkey import KEY_RE, BootstrapKey

# Re-exported: the buildout runner asks this module for the key and the probe's timeout.
from agent.adapters.bootstrapkey import PROBE_TIMEOUT as PROBE_TIMEOUT
from agent.adapters.bootstrapkey import NotReusable as NotReusable
from agent.adapters.bootstrapkey import bootstrap_key as bootstrap_key
from agent.adapters.files import atomic_write
from agent.core.errors import BuildoutFailed

log = structlog.get_logger(__name__)

COMPLETE = ".bootstrap-complete.json"
REFERENCE = ".deploy-bootstrap.json"
LOCK = ".lock"
LOCK_POLL = 0.1

#: Runs one bootstrap command: (argv, cwd, step name, timeout) -> seconds it took.
StepRunner = Callable[[Sequence[str], Path, str, float], Awaitable[float]]


@dataclass(frozen=True)
class Prepared:
    """The outcome of ``prepare``: where the release's venv lives and what it cost."""

    digest: str
    path: Path
    reused: bool
    seconds: float
    pruned: tuple[str, ...]


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
        if isinstance(digest, str) and KEY_RE.fullmatch(digest):
            found.add(digest)
    return found


def _prune(cache: Path, releases_dir: Path, keep: Iterable[str]) -> list[str]:
    """Remove shared venvs no release on disk uses (the caller holds the lock)."""
    used = referenced(releases_dir) | set(keep)
    removed = []
    for entry in sorted(os.scandir(cache), key=lambda e: e.name):
        if KEY_RE.fullmatch(entry.name) and entry.name not in used:
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
