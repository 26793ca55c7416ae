"""The folders are the layers (docs/architecture.md, "Layers"): ``core`` at the bottom,
``protocol`` above it, ``adapters``, then ``node`` and ``operator`` side by side, and
``cli`` on top. A module may import its own folder or lower ones; ``operator`` never
imports ``node``; ``core`` and ``protocol`` do no I/O of their own."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

#: What each folder may import from the agent, besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "protocol": {"core"},
    "adapters": {"core", "protocol"},
    "node": {"core", "protocol", "adapters"},
    "operator": {"core", "protocol", "adapters"},
    "cli": {"core", "protocol", "adapters", "node", "operator"},
    "__init__": set(),
}
#: Modules that would mean I/O in a pure layer.
IO_MODULES = {
    "subprocess",
    "socket",
    "ssl",
    "aiomqtt",
    "paho",
    "git",
    "xmlrpc",
    "supervisor",
    "psutil",
    "fcntl",
    "urllib",
    "http",
    "tempfile",
    "shutil",
    "jinja2",
}


def folder_of(path: Path) -> str:
    relative = path.relative_to(AGENT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imports(path: Path) -> set[str]:
    """Every module this file imports (top-level name, or ``agent.<folder>``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agent":
                found.update(f"agent.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def agent_folders(path: Path) -> set[str]:
    return {
        name.split(".")[1]
        for name in imports(path)
        if name.startswith("agent.") and name != "agent.__version__"
    } - {"__version__"}


def modules() -> list[Path]:
    return sorted(p for p in AGENT.rglob("*.py"))


def test_every_module_is_in_a_known_folder() -> None:
    unknown = [str(p.relative_to(AGENT)) for p in modules() if folder_of(p) not in ALLOWED]
    assert unknown == []


def test_imports_point_down_only() -> None:
    upward = []
    for path in modules():
        folder = folder_of(path)
        for imported in agent_folders(path) - {folder}:
            if imported not in ALLOWED[folder]:
                upward.append(f"agent/{path.relative_to(AGENT)} imports agent.{imported}")
    assert upward == []


def test_the_operator_side_never_imports_the_node() -> None:
    offenders = [
        str(p.relative_to(AGENT))
        for p in AGENT.joinpath("operator").rglob("*.py")
        if "node" in agent_folders(p)
    ]
    assert offenders == []


def test_core_and_protocol_do_no_io_of_their_own() -> None:
    """Parsing a configuration on the operator's laptop must not probe the laptop."""
    offenders = {}
    for folder in ("core", "protocol"):
        for path in AGENT.joinpath(folder).rglob("*.py"):
            used = {name.split(".")[0] for name in imports(path)} & IO_MODULES
            if used:
                offenders[str(path.relative_to(AGENT))] = sorted(used)
    assert offenders == {}


def test_no_module_cites_files_the_repository_does_not_have() -> None:
    cited = [
        str(p.relative_to(AGENT))
        for p in modules()
        if "DESIGN.md" in p.read_text() or "STYLE.md" in p.read_text()
    ]
    assert cited == []
