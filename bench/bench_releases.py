"""Making a release from the local mirror versus cloning the repository afresh.

A synthetic repository of a realistic size (2,000 files, 200 commits) is built once with
``git fast-import``; then each repetition times ``new_release_dir`` + ``checkout`` (a local
clone with hard-linked objects, then ``checkout --detach``) against a plain
``git clone file://...`` of the same repository, and a no-op ``fetch`` of the mirror.

Run: ``.venv/bin/python bench/bench_releases.py``; a runner can import ``main()``.
"""

from __future__ import annotations

import logging
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.adapters.releases import ReleaseManager

FILES = 2_000
COMMITS = 200
CHANGED_PER_COMMIT = 10


def _content(index: int, version: int) -> bytes:
    """About 3 KB per file, half of it incompressible, so packs weigh what real ones do."""
    noise = random.Random(index * 100_003 + version).randbytes(768).hex()
    lines = [f"# module {index}, revision {version}\n"]
    lines += [f"def function_{n}(value):\n    return value * {n} + {index}\n\n" for n in range(30)]
    lines += [f"DATA_{n} = '{noise[n * 64 : n * 64 + 64]}'\n" for n in range(24)]
    return "".join(lines).encode()


def _fast_import_stream(files: int, commits: int) -> bytes:
    """All commits as one fast-import stream: much faster than 200 `git commit` calls."""
    chunks: list[bytes] = []
    for number in range(commits):
        changed = range(files) if number == 0 else _changed(number, files)
        message = f"commit {number}".encode()
        chunks.append(b"commit refs/heads/main\n")
        chunks.append(
            f"committer Bench <bench@example.org> {1_700_000_000 + number} +0000\n".encode()
        )
        chunks.append(b"data %d\n%s\n" % (len(message), message))
        for index in changed:
            data = _content(index, number)
            path = f"src/pkg{index % 40}/module_{index}.py".encode()
            chunks.append(b"M 644 inline %s\ndata %d\n%s\n" % (path, len(data), data))
    return b"".join(chunks)


def _changed(number: int, files: int) -> range:
    start = (number * CHANGED_PER_COMMIT) % files
    return range(start, min(start + CHANGED_PER_COMMIT, files))


def build_repository(base: Path, files: int = FILES, commits: int = COMMITS) -> Path:
    """A bare repository with ``commits`` commits over ``files`` files on ``main``."""
    bare = base / "upstream.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    stream = _fast_import_stream(files, commits)
    subprocess.run(
        ["git", "--git-dir", str(bare), "fast-import", "--quiet"], input=stream, check=True
    )
    subprocess.run(["git", "--git-dir", str(bare), "repack", "-adq"], check=True)
    return bare


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _clone_timer(base: Path) -> Callable[[str, list[str]], float]:
    """Time one `git clone` into a fresh directory, then remove it."""
    counter = iter(range(1_000_000))

    def clone(source: str, options: list[str]) -> float:
        dest = base / f"clone-{next(counter)}"
        argv = ["git", "clone", "-q", *options, source, str(dest)]
        seconds = _timed(lambda: subprocess.run(argv, check=True))
        shutil.rmtree(dest)
        return seconds

    return clone


def _figures(samples: dict[str, list[float]]) -> dict[str, float]:
    medians = {key: statistics.median(values) for key, values in samples.items()}
    figures = {f"{key}_median_s": round(value, 3) for key, value in medians.items()}
    figures["speedup_release_vs_fresh_clone"] = round(
        medians["fresh_file_clone"] / medians["release_from_mirror"], 2
    )
    figures["speedup_objects_only"] = round(
        medians["objects_file_clone"] / medians["objects_local_clone"], 2
    )
    return figures


def main(repetitions: int = 5) -> dict[str, float | int]:
    """Build the repository, time both ways of making a release, return the figures.

    ``release_from_mirror`` and ``fresh_file_clone`` include writing the 2,000 files,
    which both must do; the ``objects_*`` pair (``--no-checkout``) isolates what the
    mirror saves: packing and transferring objects versus hard-linking them.
    """
    with tempfile.TemporaryDirectory(prefix="bench-releases-") as tmp:
        base = Path(tmp)
        build_s = _timed(lambda: build_repository(base))
        bare = base / "upstream.git"
        manager = ReleaseManager(root=base / "srv", app="bench", repository=f"file://{bare}")
        mirror_s = _timed(manager.fetch)
        sha = manager.resolve(None, "main")
        clone, url = _clone_timer(base), f"file://{bare}"
        samples: dict[str, list[float]] = {
            "fetch_noop": [],
            "release_from_mirror": [],
            "fresh_file_clone": [],
            "objects_local_clone": [],
            "objects_file_clone": [],
        }
        for _ in range(repetitions):  # interleaved, so load changes hit every series alike
            samples["fetch_noop"].append(_timed(manager.fetch))
            path = manager.new_release_dir()
            samples["release_from_mirror"].append(_timed(lambda p=path: manager.checkout(p, sha)))
            shutil.rmtree(path)  # as the clones are: files never written back cost less
            samples["fresh_file_clone"].append(clone(url, []))
            local = ["--local", "--no-checkout"]
            samples["objects_local_clone"].append(clone(str(manager.mirror), local))
            samples["objects_file_clone"].append(clone(url, ["--no-checkout"]))
        pack_bytes = sum(p.stat().st_size for p in (bare / "objects" / "pack").glob("*.pack"))
        return {
            "files": FILES,
            "commits": COMMITS,
            "repetitions": repetitions,
            "pack_mb": round(pack_bytes / 1e6, 1),
            "build_repository_s": round(build_s, 3),
            "mirror_create_s": round(mirror_s, 3),
            **_figures(samples),
        }


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for key, value in main().items():
        print(f"{key:34} {value}")
