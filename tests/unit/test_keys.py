"""Operator key files: modes, no silent overwrite, loading, fingerprints, clear errors."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from agent.adapters.keys import (
    generate_keypair,
    load_private_key,
    load_public_key,
    load_trusted_keys,
    public_key_line,
)
from agent.core.errors import KeyFileError
from agent.protocol import fingerprint, sign_bytes, signed_by

# `ssh-keygen -lf` of this public key prints SHA256:lbmsoA0y... (checked by hand once).
VECTOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VECTOR_PUBLIC = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4 vector\n"
)
VECTOR_FINGERPRINT = "SHA256:lbmsoA0yIEcEiVDRnMWuzm+nV+3ZEEpVIURqFoeSspg"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_generated_keys_get_0600_private_and_0644_public_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    generated = generate_keypair(tmp_path / "alice", comment="alice@laptop")
    assert generated.public_path == tmp_path / "alice.pub"
    assert mode(generated.private_path) == 0o600
    assert mode(generated.public_path) == 0o644


def test_generated_files_are_pem_pkcs8_and_an_openssh_line(tmp_path: Path) -> None:
    generated = generate_keypair(tmp_path / "alice", comment="alice@laptop")
    assert generated.private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    public_text = generated.public_path.read_text()
    assert public_text.startswith("ssh-ed25519 ") and public_text.endswith(" alice@laptop\n")
    private = load_private_key(generated.private_path)
    assert fingerprint(private) == fingerprint(load_public_key(generated.public_path))
    assert generated.key_id == fingerprint(private)


def test_an_existing_private_key_is_never_overwritten(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path / "alice")
    before = first.private_path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists; use force"):
        generate_keypair(tmp_path / "alice")
    assert first.private_path.read_bytes() == before


def test_an_existing_public_key_alone_also_stops_generation(tmp_path: Path) -> None:
    (tmp_path / "alice.pub").write_text("keep me\n")
    with pytest.raises(KeyFileError, match=r"alice\.pub already exists"):
        generate_keypair(tmp_path / "alice")
    assert not (tmp_path / "alice").exists()
    assert (tmp_path / "alice.pub").read_text() == "keep me\n"


def test_a_symlink_at_the_private_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "alice").symlink_to(victim)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "alice")
    assert victim.read_text() == "precious\n"


def test_force_replaces_both_files_with_a_new_key_and_the_right_modes(tmp_path: Path) -> None:
    first = generate_keypair(tmp_path / "alice")
    os.chmod(first.private_path, 0o644)
    second = generate_keypair(tmp_path / "alice", force=True)
    assert second.key_id != first.key_id
    assert fingerprint(load_private_key(second.private_path)) == second.key_id
    assert mode(second.private_path) == 0o600
    assert mode(second.public_path) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice", "alice.pub"]


def test_a_passphrase_protected_key_needs_its_passphrase(tmp_path: Path) -> None:
    generated = generate_keypair(tmp_path / "alice", passphrase=b"correct horse")
    assert fingerprint(load_private_key(generated.private_path, passphrase=b"correct horse")) == (
        generated.key_id
    )
    with pytest.raises(KeyFileError, match=str(generated.private_path)):
        load_private_key(generated.private_path)
    with pytest.raises(KeyFileError, match="passphrase is wrong"):
        load_private_key(generated.private_path, passphrase=b"wrong")


def test_fingerprint_is_the_one_ssh_keygen_prints(tmp_path: Path) -> None:
    (tmp_path / "vector.pub").write_text(VECTOR_PUBLIC)
    assert fingerprint(VECTOR_KEY) == VECTOR_FINGERPRINT
    assert fingerprint(load_public_key(tmp_path / "vector.pub")) == VECTOR_FINGERPRINT
    assert public_key_line(VECTOR_KEY.public_key(), "vector") == VECTOR_PUBLIC


def test_public_keys_load_from_pem_as_well(tmp_path: Path) -> None:
    pem = VECTOR_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "vector.pem").write_bytes(pem)
    assert fingerprint(load_public_key(tmp_path / "vector.pem")) == VECTOR_FINGERPRINT


def test_openssh_private_keys_load_too(tmp_path: Path) -> None:
    openssh = VECTOR_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path = tmp_path / "id_ed25519"
    path.write_bytes(openssh)
    path.chmod(0o600)
    assert fingerprint(load_private_key(path)) == VECTOR_FINGERPRINT


def test_a_private_key_readable_by_others_is_loaded_with_a_warning(tmp_path: Path) -> None:
    generated = generate_keypair(tmp_path / "alice")
    generated.private_path.chmod(0o644)
    with capture_logs() as logs:
        load_private_key(generated.private_path)
    assert [entry["event"] for entry in logs] == ["keys.private_key_exposed"]


def test_load_trusted_keys_indexes_them_by_fingerprint(tmp_path: Path) -> None:
    alice = generate_keypair(tmp_path / "alice")
    bob = generate_keypair(tmp_path / "bob")
    trusted = load_trusted_keys([alice.public_path, bob.public_path])
    assert sorted(trusted) == sorted([alice.key_id, bob.key_id])


def test_sign_bytes_and_signed_by_round_trip() -> None:
    signature = sign_bytes(VECTOR_KEY, b"data")
    assert signed_by(signature, b"data", [VECTOR_KEY.public_key()], None)
    assert not signed_by(signature, b"other", [VECTOR_KEY.public_key()], None)
    assert not signed_by("!!!", b"data", [VECTOR_KEY.public_key()], None)


def test_a_missing_key_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"cannot read public key .*missing\.pub"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(KeyFileError, match="cannot read private key"):
        load_private_key(tmp_path / "missing")


def test_key_errors_never_echo_the_file_contents(tmp_path: Path) -> None:
    secret = VECTOR_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    swapped = tmp_path / "swapped.pub"
    swapped.write_bytes(secret)  # a private key where a public key was expected
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0IHNlY3JldA==\n")
    for load, path in ((load_public_key, swapped), (load_private_key, garbage)):
        with pytest.raises(KeyFileError) as info:
            load(path)
        assert str(path) in str(info.value)
        for line in path.read_text().splitlines()[1:]:
            assert line not in str(info.value)


def test_keys_of_another_type_are_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pub").write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    (tmp_path / "rsa").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_public_key(tmp_path / "rsa.pub")
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "rsa")


def test_a_huge_file_is_not_read_as_a_key(tmp_path: Path) -> None:
    (tmp_path / "huge.pub").write_bytes(b"ssh-ed25519 " + b"A" * 100_000)
    with pytest.raises(KeyFileError, match="too large"):
        load_public_key(tmp_path / "huge.pub")


def test_a_key_comment_cannot_break_the_public_key_line() -> None:
    with pytest.raises(ValueError, match="one line"):
        public_key_line(VECTOR_KEY.public_key(), "alice\nssh-ed25519 AAAA mallory")
