"""Configured templates: rendered in a sandbox, written only on change, reloaded only then."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.templates import (
    TemplateReloadFailed,
    apply_templates,
    build_context,
    render_template,
)
from agent.core.config import TemplateConfig
from agent.core.errors import RenderError
from agent.core.plan import Member
from agent.protocol import ClientInfo

BACKENDS = (
    "{% for m in layers.plone_instances %}"
    "{% for c in m.clients %}{{ m.id }}-{{ c.name }} {{ m.address }}:{{ c.port }}\n"
    "{% endfor %}{% endfor %}"
)


def reload_argv(marker: Path, *, exit_code: int = 0) -> list[str]:
    """A real reload command: appends to ``marker`` so the test can count its runs."""
    code = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit({exit_code})"
    return [sys.executable, "-c", code]


def make_context(*, online: int = 2, layers: tuple[str, ...] = ("plone_instances",)) -> Any:
    members = [
        Member(f"web-{n}", f"10.0.0.{n}", ("plone_instances",)) for n in range(1, online + 1)
    ]
    clients = {m.id: [ClientInfo(name="client1", port=8081)] for m in members}
    own = Member("web-1", "10.0.0.1", layers)
    return build_context(
        stack="mysite",
        instance=own,
        members=members,
        clients=clients,
        stack_config={"haproxy": {"bind": "*:80"}},
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "backends.tmpl"
    path.write_text(BACKENDS)
    return path


def template(source: Path, tmp_path: Path, **fields: Any) -> TemplateConfig:
    return TemplateConfig(source=source, destination=tmp_path / "out" / "backends", **fields)


async def test_renders_online_members_and_writes_the_destination(
    source: Path, tmp_path: Path
) -> None:
    config = template(source, tmp_path)
    [result] = await apply_templates([config], make_context())
    assert result.changed is True
    assert result.destination.read_text() == (
        "web-1-client1 10.0.0.1:8081\nweb-2-client1 10.0.0.2:8081\n"
    )


async def test_identical_render_does_not_touch_the_destination(
    source: Path, tmp_path: Path
) -> None:
    config = template(source, tmp_path)
    await apply_templates([config], make_context())
    before = config.destination.stat()
    [result] = await apply_templates([config], make_context())
    after = config.destination.stat()
    assert result.changed is False
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_reload_runs_only_when_the_destination_changed(source: Path, tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    config = template(source, tmp_path, reload=reload_argv(marker))
    await apply_templates([config], make_context(online=1))
    await apply_templates([config], make_context(online=1))
    assert marker.read_text() == "x"
    await apply_templates([config], make_context(online=2))
    assert marker.read_text() == "xx"


async def test_templates_sharing_a_reload_command_reload_once(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    configs = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.tmpl").write_text(f"{name} {{{{ stack }}}}\n")
        configs.append(
            TemplateConfig(
                source=tmp_path / f"{name}.tmpl",
                destination=tmp_path / name,
                reload=reload_argv(marker),
            )
        )
    results = await apply_templates(configs, make_context())
    assert [r.changed for r in results] == [True, True]
    assert marker.read_text() == "x"


async def test_undefined_variable_is_a_clear_error_and_destination_untouched(
    tmp_path: Path,
) -> None:
    source = tmp_path / "broken.tmpl"
    source.write_text("ok\n{{ stack }}\nbackend {{ stack_config.haproxy.no_such_key }}\n")
    config = template(source, tmp_path)
    config.destination.parent.mkdir()
    config.destination.write_text("previous\n")
    with pytest.raises(RenderError) as caught:
        await apply_templates([config], make_context())
    assert str(source) in str(caught.value)
    assert "line 3" in str(caught.value)
    assert "no_such_key" in str(caught.value)
    assert config.destination.read_text() == "previous\n"


async def test_one_broken_template_leaves_every_destination_untouched(
    source: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.tmpl"
    broken.write_text("{% for %}\n")
    good = template(source, tmp_path)
    bad = TemplateConfig(source=broken, destination=tmp_path / "other")
    with pytest.raises(RenderError, match="line 1"):
        await apply_templates([good, bad], make_context())
    assert not good.destination.exists()
    assert not bad.destination.exists()


def test_missing_template_source_is_a_clear_error(tmp_path: Path) -> None:
    config = TemplateConfig(source=tmp_path / "nope.tmpl", destination=tmp_path / "out")
    with pytest.raises(RenderError, match=r"nope\.tmpl.*not found"):
        render_template(config, make_context())


def test_sandbox_refuses_reaching_python_internals(tmp_path: Path) -> None:
    source = tmp_path / "evil.tmpl"
    source.write_text("{{ stack.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RenderError, match=r"evil\.tmpl.*SecurityError.*unsafe"):
        render_template(TemplateConfig(source=source, destination=tmp_path / "out"), make_context())


def test_trailing_newline_is_kept_and_nothing_is_escaped(tmp_path: Path) -> None:
    source = tmp_path / "plain.tmpl"
    source.write_text("{{ value }}\n")
    config = TemplateConfig(source=source, destination=tmp_path / "out")
    assert render_template(config, {"value": "<a & b>"}) == b"<a & b>\n"


async def test_template_renders_only_on_instances_carrying_its_layers(
    source: Path, tmp_path: Path
) -> None:
    config = template(source, tmp_path, layers=["frontend"])
    assert await apply_templates([config], make_context(layers=("plone_instances",))) == []
    assert not config.destination.exists()
    [result] = await apply_templates([config], make_context(layers=("frontend",)))
    assert result.changed is True


async def test_failing_reload_is_an_error_and_restores_the_previous_file(
    source: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "reloaded"
    good = template(source, tmp_path, reload=reload_argv(marker))
    await apply_templates([good], make_context(online=1))
    first = good.destination.read_bytes()
    failing = template(source, tmp_path, reload=reload_argv(marker, exit_code=3))
    with pytest.raises(TemplateReloadFailed) as caught:
        await apply_templates([failing], make_context(online=2))
    assert caught.value.returncode == 3
    assert str(source) in str(caught.value)
    assert good.destination.read_bytes() == first
    # Restored, so the next configure sees a change and tries the reload again.
    [result] = await apply_templates([good], make_context(online=2))
    assert result.changed is True


async def test_failing_reload_of_a_new_file_removes_it(source: Path, tmp_path: Path) -> None:
    config = template(source, tmp_path, reload=reload_argv(tmp_path / "m", exit_code=1))
    with pytest.raises(TemplateReloadFailed):
        await apply_templates([config], make_context())
    assert not config.destination.exists()


async def test_reload_that_cannot_start_is_a_clear_error(source: Path, tmp_path: Path) -> None:
    config = template(source, tmp_path, reload=[str(tmp_path / "no-such-command")])
    with pytest.raises(TemplateReloadFailed, match="could not start"):
        await apply_templates([config], make_context())


async def test_reload_that_hangs_is_killed_after_the_timeout(source: Path, tmp_path: Path) -> None:
    config = template(
        source, tmp_path, reload=[sys.executable, "-c", "import time; time.sleep(30)"]
    )
    with pytest.raises(TemplateReloadFailed) as caught:
        await apply_templates([config], make_context(), reload_timeout=0.5)
    assert caught.value.timed_out is True
    assert not config.destination.exists()


async def test_existing_file_mode_is_kept(source: Path, tmp_path: Path) -> None:
    config = template(source, tmp_path)
    config.destination.parent.mkdir()
    config.destination.write_text("old\n")
    config.destination.chmod(0o640)
    await apply_templates([config], make_context())
    assert config.destination.stat().st_mode & 0o777 == 0o640
