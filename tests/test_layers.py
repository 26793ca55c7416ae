"""Imports point one way: pure core at the bottom, adapters above it, orchestration on
top (STYLE.md, "Shape of our package"). A module may import its own layer or lower ones;
an import upwards is a design error, whatever line it sits on."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

LAYERS: list[set[str]] = [
    {"errors", "log", "sdnotify", "__init__"},
    {"config", "stackconfig", "plan", "keys", "wire", "protocol", "render", "state", "intake"},
    {
        "gitmirror",
        "releases",
        "buildout",
        "health",
        "supervisor",
        "rolling",
        "mqtt",
        "templates",
        "fleet",
    },
    {"pipeline", "restart", "announce", "recovery"},
    {"daemon", "operator", "operator_config", "operator_cli"},
    {"cli"},
]


def layer_of(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"agent/{module}.py is in no layer: add it to LAYERS")


def agent_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "agent":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("agent."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("agent."))
    return found - {"__version__"}


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    upward = []
    for path in sorted(AGENT.glob("*.py")):
        module = path.stem
        for imported in agent_imports(path):
            if layer_of(imported) > layer_of(module):
                upward.append(
                    f"agent.{module} (layer {layer_of(module)}) imports "
                    f"agent.{imported} (layer {layer_of(imported)})"
                )
    assert upward == []


def test_the_pure_core_does_no_io_of_its_own():
    """The bottom layers never start processes or open sockets: adapters do that."""
    forbidden = {"subprocess", "socket", "aiomqtt", "git", "xmlrpc", "supervisor"}
    for module in LAYERS[1] - {"config", "keys"}:  # config reads its file, keys their files
        tree = ast.parse((AGENT / f"{module}.py").read_text())
        names = {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        names |= {
            n.module.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module
        }
        assert not names & forbidden, (module, names & forbidden)
