"""Configured templates (an HAProxy backend list, ...): render, write when changed, reload.

Templates are jinja2 in a sandbox with ``StrictUndefined``, so a typo in a variable name is
an error naming the template and its line, never an empty string in a live load-balancer
configuration. Everything is rendered before anything is written, a destination is
replaced atomically and only when its bytes differ, and only changed destinations are
reloaded. When a reload fails, the previous bytes are put back: the file on disk stays
what the service last accepted, and the next configure tries again instead of finding
"nothing changed".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from jinja2 import FileSystemLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from agent.adapters.files import atomic_write
from agent.core.config import TemplateConfig
from agent.core.errors import RenderError, TemplateReloadFailed
from agent.core.plan import Member
from agent.protocol import ClientInfo

log = structlog.get_logger(__name__)

RELOAD_TIMEOUT = 60.0
OUTPUT_TAIL_LINES = 20
DEFAULT_MODE = 0o644


@dataclass(frozen=True)
class TemplateResult:
    """One rendered template: where it went and whether its bytes changed."""

    destination: Path
    changed: bool


# --- context ----------------------------------------------------------------------------


def _member_dict(member: Member, clients: Sequence[ClientInfo]) -> dict[str, Any]:
    return {
        "id": member.id,
        "address": member.address,
        "layers": list(member.layers),
        "online": member.online,
        # online, stopped, unreachable: what its agent last said (an agent restarting does
        # not re-render templates; its endpoints stay until it leaves)
        "state": member.state,
        "clients": [{"name": c.name, "port": c.port} for c in clients],
    }


def build_context(
    *,
    stack: str,
    instance: Member,
    members: Iterable[Member],
    clients: Mapping[str, Sequence[ClientInfo]],
    stack_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The variables every template sees; sorted, so equal fleets render equal bytes."""
    member_dicts = [
        _member_dict(m, clients.get(m.id, ())) for m in sorted(members, key=lambda m: m.id)
    ]
    layers: dict[str, list[dict[str, Any]]] = {}
    for member in member_dicts:
        if member["online"]:
            for layer in member["layers"]:
                layers.setdefault(layer, []).append(member)
    return {
        "stack": stack,
        "instance": {
            "id": instance.id,
            "address": instance.address,
            "layers": list(instance.layers),
        },
        "members": member_dicts,
        "layers": dict(sorted(layers.items())),
        "stack_config": copy.deepcopy(dict(stack_config)),
    }


def applies_to(config: TemplateConfig, layers: Iterable[str]) -> bool:
    """A template with ``layers`` renders only on instances carrying one of them."""
    return config.layers is None or bool(set(config.layers) & set(layers))


# --- rendering --------------------------------------------------------------------------


def _environment(directory: Path) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(str(directory)),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def _template_line(exc: BaseException, filename: str) -> int | None:
    """The template line an error came from (jinja maps its frames to template lines)."""
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render_template(config: TemplateConfig, context: Mapping[str, Any]) -> bytes:
    """Render one template to bytes; any failure is a RenderError naming it (and its line)."""
    source = Path(os.path.abspath(config.source))
    try:
        template = _environment(source.parent).get_template(source.name)
        text = template.render(dict(context))
        return text.encode("utf-8")
    except TemplateNotFound as exc:
        raise RenderError(f"template {source}: not found ({exc})") from exc
    except Exception as exc:  # a user template can raise anything (1/0, a bad filter, ...)
        line = _template_line(exc, str(source))
        where = f"template {source}" + (f", line {line}" if line else "")
        problem = f"{type(exc).__name__}: {exc}"
        raise RenderError(f"{where}: {problem}") from exc


# --- writing and reloading --------------------------------------------------------------


@dataclass(frozen=True)
class _Written:
    config: TemplateConfig
    previous: bytes | None
    mode: int


def _read(path: Path, source: Path) -> tuple[bytes | None, int]:
    try:
        return path.read_bytes(), path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None, DEFAULT_MODE
    except OSError as exc:
        raise RenderError(f"template {source}: cannot read {path}: {exc.strerror}") from exc


def _write(config: TemplateConfig, data: bytes) -> _Written | None:
    """Write the destination when its bytes differ; return what it held before."""
    previous, mode = _read(config.destination, config.source)
    if previous == data:
        log.debug("template.unchanged", destination=str(config.destination))
        return None
    try:
        atomic_write(config.destination, data, mode=mode)
    except OSError as exc:
        raise RenderError(
            f"template {config.source}: cannot write {config.destination}: {exc.strerror}"
        ) from exc
    log.info("template.written", source=str(config.source), destination=str(config.destination))
    return _Written(config, previous, mode)


def _restore(written: _Written) -> None:
    """Put back what the destination held before, so the next configure tries again."""
    path = written.config.destination
    try:
        if written.previous is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, written.previous, mode=written.mode)
    except OSError as exc:
        log.error("template.restore_failed", destination=str(path), error=exc.strerror)
        return
    log.warning("template.restored", destination=str(path))


def _tail(output: bytes) -> list[str]:
    return output.decode("utf-8", "replace").splitlines()[-OUTPUT_TAIL_LINES:]


async def run_reload(argv: list[str], sources: list[Path], *, timeout: float) -> None:
    """Run one reload command (no shell); raise TemplateReloadFailed unless it exits 0."""
    names = ", ".join(str(s) for s in sources)

    def failed(
        why: str, code: int | None, out: bytes = b"", timed_out: bool = False
    ) -> TemplateReloadFailed:
        return TemplateReloadFailed(
            f"reload {argv!r} of template {names} {why}",
            sources=sources,
            argv=argv,
            returncode=code,
            output_tail=_tail(out),
            timed_out=timed_out,
        )

    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise failed(f"could not start: {exc.strerror}", None) from exc
    try:
        async with asyncio.timeout(timeout):
            output, _ = await proc.communicate()
    except TimeoutError as exc:
        raise failed(f"timed out after {timeout:g} s", None, timed_out=True) from exc
    finally:
        if proc.returncode is None:  # timed out or cancelled: never leave it running
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise failed(f"exited with status {proc.returncode}", proc.returncode, output)
    log.info("template.reloaded", argv=argv, sources=[str(s) for s in sources])


def _reload_groups(written: list[_Written]) -> dict[tuple[str, ...], list[_Written]]:
    """Templates sharing a reload command are reloaded once, after all of them are written."""
    groups: dict[tuple[str, ...], list[_Written]] = {}
    for item in written:
        if item.config.reload:
            groups.setdefault(tuple(item.config.reload), []).append(item)
    return groups


async def _reload(written: list[_Written], timeout: float) -> None:
    """Run each reload once; restore the files of a failed or interrupted one."""
    failures: list[TemplateReloadFailed] = []
    pending = _reload_groups(written)
    try:
        while pending:
            argv, items = next(iter(pending.items()))
            try:
                await run_reload(list(argv), [i.config.source for i in items], timeout=timeout)
            except TemplateReloadFailed as exc:
                log.error(
                    "template.reload_failed",
                    argv=list(argv),
                    returncode=exc.returncode,
                    timed_out=exc.timed_out,
                    output_tail=exc.output_tail,
                )
                _restore_all(items)
                failures.append(exc)
            del pending[argv]
    except asyncio.CancelledError:
        for items in pending.values():
            _restore_all(items)
        raise
    if failures:
        if len(failures) > 1:
            failures[0].add_note(f"{len(failures) - 1} more reload command(s) failed as well")
        raise failures[0]


def _restore_all(items: list[_Written]) -> None:
    for item in items:
        _restore(item)


async def apply_templates(
    configs: Sequence[TemplateConfig],
    context: Mapping[str, Any],
    *,
    reload_timeout: float = RELOAD_TIMEOUT,
) -> list[TemplateResult]:
    """Render the templates this instance's layers select, write the changed ones, reload.

    Every template is rendered before any is written, so one broken template leaves every
    destination untouched. Raises RenderError or TemplateReloadFailed.
    """
    selected = [c for c in configs if applies_to(c, context["instance"]["layers"])]
    rendered = [(config, render_template(config, context)) for config in selected]
    written: list[_Written] = []
    results: list[TemplateResult] = []
    try:
        for config, data in rendered:
            item = _write(config, data)
            if item is not None:
                written.append(item)
            results.append(TemplateResult(config.destination, changed=item is not None))
    except RenderError:
        _restore_all(written)  # all or nothing: a later reload would not see them as changed
        raise
    await _reload(written, reload_timeout)
    return results
