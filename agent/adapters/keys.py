"""Ed25519 key files of operators: generate, load, and index trusted keys by key id.

The signatures themselves are ``agent.protocol.signing``. Errors never carry key material,
only paths.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.core.errors import KeyFileError
from agent.protocol.signing import fingerprint

log = structlog.get_logger(__name__)

MAX_KEY_FILE_BYTES = 16 * 1024
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True, kw_only=True)
class GeneratedKey:
    """Where a new key pair was written, and the key id commands signed with it will carry."""

    private_path: Path
    public_path: Path
    key_id: str


def public_key_line(key: Ed25519PublicKey, comment: str = "") -> str:
    """Return the OpenSSH one-line form of a public key, with an optional comment."""
    if not comment.isprintable():
        raise ValueError("a key comment must be printable text on one line")
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{line.decode('ascii')} {comment}".rstrip() + "\n"


def generate_keypair(
    private_path: Path,
    public_path: Path | None = None,
    *,
    comment: str = "",
    passphrase: bytes | None = None,
    force: bool = False,
) -> GeneratedKey:
    """Write a new Ed25519 key pair: private PEM PKCS8 (0600), public OpenSSH line (0644).

    Without force an existing file is never touched: the private key is created with
    O_EXCL. With force, each file is replaced atomically.
    """
    public_path = public_path or private_path.with_name(private_path.name + ".pub")
    if not force:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise KeyFileError(f"{path} already exists; use force to overwrite it")
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    public_text = public_key_line(key.public_key(), comment).encode("ascii")
    _write_key_file(private_path, private_pem, PRIVATE_MODE, force=force)
    try:
        _write_key_file(public_path, public_text, PUBLIC_MODE, force=force)
    except KeyFileError:
        if not force:
            private_path.unlink(missing_ok=True)  # ours: created a moment ago with O_EXCL
        raise
    key_id = fingerprint(key)
    log.info("keys.generated", private_path=str(private_path), key_id=key_id)
    return GeneratedKey(private_path=private_path, public_path=public_path, key_id=key_id)


def _write_key_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Create path with exactly mode; with force through a temporary file and a rename."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; use force to overwrite it") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(target, path)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc


def _read_key_file(path: Path, what: str) -> tuple[bytes, int]:
    """Return the bytes and permission bits of a key file."""
    try:
        with path.open("rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} {path} is too large to be a key file")
    return data, mode


def load_private_key(path: Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM PKCS8 or OpenSSH format."""
    data, mode = _read_key_file(path, "private key")
    if mode & 0o077:
        log.warning("keys.private_key_exposed", path=str(path), mode=oct(mode))
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key = serialization.load_ssh_private_key(data, passphrase)
        else:
            key = serialization.load_pem_private_key(data, passphrase)
    except TypeError as exc:  # passphrase given for a plain key or missing for an encrypted one
        raise KeyFileError(f"private key {path}: {exc}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(
            f"private key {path} is not a readable PEM PKCS8 or OpenSSH key "
            "(or the passphrase is wrong)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from an OpenSSH line or a PEM SubjectPublicKeyInfo."""
    data = _read_key_file(path, "public key")[0].strip()
    key: object
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"public key {path} is not an OpenSSH or PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"public key {path} is not an Ed25519 key")
    return key


def load_trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Load every trusted public key, indexed by key id (the fingerprint)."""
    return {fingerprint(key): key for key in map(load_public_key, paths)}
