"""API keys: the store (hashes only, file and directory modes, atomic replacement, names,
a damaged file) and the ``keys`` commands of the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from novasandbox import ConfigError
from novasandbox.server.keys import KEY_PREFIX, KeyStore, keys_path
from tests.server_support import cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_key_is_stored_as_its_hash_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key, secret = store.create("alice")
    assert secret.startswith(KEY_PREFIX) and len(secret) > 40
    text = keys_path(tmp_path).read_text()
    assert secret not in text
    assert secret[len(KEY_PREFIX) :] not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert key.name == "alice" and key.id.startswith("key_") and key.id not in secret
    assert [k.name for k in store.all()] == ["alice"]


def test_the_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.create("a")
    store.create("b")
    path = keys_path(tmp_path)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    # written beside and renamed: nothing else is left in the directory
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys.json", "keys.lock"]
    data = json.loads(path.read_text())
    assert [k["name"] for k in data["keys"]] == ["a", "b"]


def test_a_wider_directory_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir(mode=0o755)
    os.chmod(tmp_path / "server", 0o755)
    KeyStore(tmp_path).create("a")
    assert mode(tmp_path / "server") == 0o700


def test_verify_takes_the_key_and_nothing_else(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    alice, alice_secret = store.create("alice")
    bob, bob_secret = store.create("bob")
    assert store.verify(alice_secret) == alice
    assert store.verify(bob_secret) == bob
    flipped = alice_secret[:-1] + ("A" if alice_secret[-1] != "A" else "B")
    for wrong in ("", flipped, alice_secret + "x", alice_secret[:-1], "x" * 10_000, alice.sha256):
        assert store.verify(wrong) is None, wrong


def test_keys_are_read_again_when_the_file_changes(tmp_path: Path) -> None:
    server_side = KeyStore(tmp_path)
    assert server_side.current() == []
    key, secret = KeyStore(tmp_path).create("late")  # another process (the CLI)
    assert server_side.verify(secret) == key
    KeyStore(tmp_path).remove("late")
    assert server_side.verify(secret) is None


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "é", "x" * 65, ".hidden", None, 3])
def test_bad_names_are_refused_and_change_nothing(tmp_path: Path, name: object) -> None:
    store = KeyStore(tmp_path)
    with pytest.raises(ConfigError) as info:
        store.create(name)  # type: ignore[arg-type]
    assert info.value.code == "invalid-config"
    assert store.all() == []


def test_a_taken_name_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.create("alice")
    before = keys_path(tmp_path).read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        store.create("alice")
    assert keys_path(tmp_path).read_bytes() == before


def test_removing_an_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no API key named 'ghost'"):
        KeyStore(tmp_path).remove("ghost")


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"version": 9, "keys": []}', '{"version": 1, "keys": [{}]}']
)
def test_a_damaged_file_is_a_typed_error(tmp_path: Path, text: str) -> None:
    path = keys_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    store = KeyStore(tmp_path)
    with pytest.raises(ConfigError, match="damaged"):
        store.current()
    with pytest.raises(ConfigError, match="damaged"):
        store.create("x")
    assert path.read_text() == text


def test_the_cli_prints_a_key_once_and_lists_no_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = cli("keys", "create", "ci-bot", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith(KEY_PREFIX) and "\n" not in secret  # stdout: the key alone
    assert "not shown again" in made.stderr
    listed = cli("keys", "ls", "--state-dir", str(state))
    as_json = cli("keys", "ls", "--json", "--state-dir", str(state))
    assert listed.returncode == 0 and as_json.returncode == 0
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for out in (listed.stdout, as_json.stdout):
        assert "ci-bot" in out
        assert secret not in out and digest not in out
    [entry] = json.loads(as_json.stdout)
    assert set(entry) == {"name", "id", "created_at"}
    assert KeyStore(state).verify(secret) is not None

    again = cli("keys", "create", "ci-bot", "--state-dir", str(state))
    assert again.returncode == 125
    assert "[invalid-config]" in again.stderr and again.stdout == ""
    bad = cli("keys", "create", "no spaces", "--state-dir", str(state))
    assert bad.returncode == 125 and "[invalid-config]" in bad.stderr

    removed = cli("keys", "rm", "ci-bot", "--state-dir", str(state))
    assert removed.returncode == 0 and "removed ci-bot" in removed.stdout
    assert KeyStore(state).verify(secret) is None
    gone = cli("keys", "rm", "ci-bot", "--state-dir", str(state))
    assert gone.returncode == 125 and "no API key named" in gone.stderr


def test_the_cli_uses_the_state_directory_by_default(tmp_path: Path) -> None:
    env = {**os.environ, "NOVASANDBOX_STATE_DIR": str(tmp_path / "default")}
    made = cli("keys", "create", "x", env=env)
    assert made.returncode == 0, made.stderr
    assert keys_path(tmp_path / "default").is_file()
