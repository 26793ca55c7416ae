"""A dependency-free PEP 517/660 build backend for this one package.

Why not setuptools: zc.buildout 6 develops eggs with ``pip install -e``, and pip builds
in an isolated environment, so a ``setuptools`` build requirement is downloaded from the
index on every fresh release directory. Offline that fails (or silently depends on a
local wheel cache). With ``requires = []`` pip installs nothing and never touches the
network, and the editable "wheel" is a dist-info plus one ``.pth`` line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tarfile
import tomllib
import zipfile
from typing import Any

TAG = "py3-none-any"


def _project() -> dict[str, Any]:
    with open("pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]


def _metadata_files(project: dict[str, Any]) -> dict[str, str]:
    """dist-info contents (minus RECORD) as relative path → text."""
    name, version = project["name"], project["version"]
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n"
        f"Summary: {project.get('description', '')}\n"
        f"Requires-Python: {project.get('requires-python', '>=3')}\n"
    )
    wheel = f"Wheel-Version: 1.0\nGenerator: _zeosite_build\nRoot-Is-Purelib: true\nTag: {TAG}\n"
    groups = project.get("entry-points", {})
    entry_points = "".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in sorted(eps.items())) + "\n"
        for group, eps in sorted(groups.items())
    )
    info = f"{name}-{version}.dist-info"
    return {
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": wheel,
        f"{info}/entry_points.txt": entry_points,
    }


def _write_wheel(directory: str, files: dict[str, bytes]) -> str:
    """Zip ``files`` into a wheel with a RECORD; return the wheel's file name."""
    project = _project()
    name, version = project["name"], project["version"]
    record_path = f"{name}-{version}.dist-info/RECORD"
    lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{path},sha256={digest},{len(data)}\n")
    lines.append(f"{record_path},,\n")
    filename = f"{name}-{version}-{TAG}.whl"
    with zipfile.ZipFile(os.path.join(directory, filename), "w", zipfile.ZIP_DEFLATED) as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(record_path, "".join(lines))
    return filename


def _meta_bytes() -> dict[str, bytes]:
    return {path: text.encode() for path, text in _metadata_files(_project()).items()}


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    return []


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    return []


def get_requires_for_build_sdist(config_settings: Any = None) -> list[str]:
    return []


def build_editable(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    """An editable wheel: metadata plus a .pth putting this source tree on sys.path."""
    project = _project()
    pth = f"__editable__.{project['name']}-{project['version']}.pth"
    files = {pth: (os.getcwd() + "\n").encode(), **_meta_bytes()}
    return _write_wheel(wheel_directory, files)


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    """A regular wheel of the package directory named like the project."""
    files = _meta_bytes()
    package = _project()["name"]
    for folder, _dirs, names in os.walk(package):
        for filename in names:
            if filename.endswith(".py"):
                path = os.path.join(folder, filename)
                with open(path, "rb") as file:
                    files[path.replace(os.sep, "/")] = file.read()
    return _write_wheel(wheel_directory, files)


def build_sdist(sdist_directory: str, config_settings: Any = None) -> str:
    """The source tree as it is, minus build leftovers."""
    project = _project()
    base = f"{project['name']}-{project['version']}"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "__pycache__" in info.name or ".egg-info" in info.name else info

    filename = f"{base}.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as tar:
        tar.add(".", arcname=base, filter=keep)
    return filename
