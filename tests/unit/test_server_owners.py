"""What a server keeps across restarts (``server/owners.py``) and its URL signer
(``server/signed.py``), on their own; and a real server (in-process provider) whose
sandboxes cannot be adopted."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from novasandbox.errors import ConfigError, SignatureInvalid, SignedUrlExpired
from novasandbox.records import sandboxes_dir
from novasandbox.server.owners import OwnerStore, SandboxRecord, SnapshotRecord
from novasandbox.server.signed import UrlSigner, load_secret, secret_path
from tests.server_support import Server, error_of, make_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_records_are_private_and_survive_a_new_store(tmp_path: Path) -> None:
    store = OwnerStore(tmp_path)
    store.save_sandbox(SandboxRecord("sb-0123456789", "key_1", {"a": "b"}, 12.5))
    store.save_sandbox(SandboxRecord("sb-abcdefabcd", "key_2", {}, 13.0))
    store.save_snapshot(SnapshotRecord("snap-0123456789", "key_1", 14.0, "sb-0123456789"))
    assert mode(tmp_path / "server" / "sandboxes") == 0o700
    for path in (tmp_path / "server").rglob("*.json"):
        assert mode(path) == 0o600, path
    again = OwnerStore(tmp_path)
    records, damaged = again.sandboxes()
    assert damaged == []
    assert records == [
        SandboxRecord("sb-0123456789", "key_1", {"a": "b"}, 12.5),
        SandboxRecord("sb-abcdefabcd", "key_2", {}, 13.0),
    ]
    assert again.snapshot("snap-0123456789") == SnapshotRecord(
        "snap-0123456789", "key_1", 14.0, "sb-0123456789"
    )
    assert again.snapshot("../keys") is None and again.snapshot("snap-none") is None
    again.forget_sandbox("sb-0123456789")
    again.forget_sandbox("sb-0123456789")  # twice: nothing to do
    again.forget_snapshot("snap-0123456789")
    assert [r.id for r in again.sandboxes()[0]] == ["sb-abcdefabcd"]
    assert again.snapshots() == []
    assert [p.name for p in (tmp_path / "server" / "sandboxes").iterdir()] == [
        "sb-abcdefabcd.json"
    ]  # no temporary file left beside


def test_a_damaged_record_is_reported_and_removed(tmp_path: Path) -> None:
    store = OwnerStore(tmp_path)
    store.save_sandbox(SandboxRecord("sb-0123456789", "key_1", {}, 1.0))
    base = tmp_path / "server" / "sandboxes"
    (base / "sb-bad0000000.json").write_text("{not json")
    (base / "sb-other00000.json").write_text('{"id": "sb-0123456789", "owner": "k", ')
    (base / "sb-renamed000.json").write_text(
        '{"id": "sb-0123456789", "owner": "k", "labels": {}, "created_at": 1}'
    )
    records, damaged = store.sandboxes()
    assert [r.id for r in records] == ["sb-0123456789"]
    assert sorted(damaged) == ["sb-bad0000000.json", "sb-other00000.json", "sb-renamed000.json"]
    assert [p.name for p in base.iterdir()] == ["sb-0123456789.json"]


def test_the_signing_secret_is_made_once_and_private(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    assert len(first) == 32 and mode(secret_path(tmp_path)) == 0o600
    assert load_secret(tmp_path) == first
    secret_path(tmp_path).write_text("abcd\n")
    with pytest.raises(ConfigError, match="too short"):
        load_secret(tmp_path)


def test_a_signature_covers_every_part(tmp_path: Path) -> None:
    signer = UrlSigner(b"s" * 32)
    parts = ("PUT", "sb-0123456789", "/root/a", "key_1", 2000)
    sig = signer.signature(*parts)
    signer.check(*parts, sig, now=1999.0)
    with pytest.raises(SignedUrlExpired):
        signer.check(*parts, sig, now=2000.0)
    for i, other in enumerate(("GET", "sb-0123456788", "/root/b", "key_2", 2001)):
        changed = list(parts)
        changed[i] = other
        with pytest.raises(SignatureInvalid):
            signer.check(*changed, sig, now=0.0)  # type: ignore[arg-type]
    with pytest.raises(SignatureInvalid):
        UrlSigner(b"t" * 32).check(*parts, sig, now=0.0)
    with pytest.raises(SignatureInvalid):
        signer.check(*parts, sig.upper() + "é", now=0.0)


# --------------------------------------------------------------------------- a real server


def inprocess_env() -> dict[str, str]:
    env = {**os.environ, "NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}
    env.pop("NOVASANDBOX_STATE_DIR", None)
    return env


def test_sandboxes_that_cannot_be_adopted_are_killed_or_reaped(tmp_path: Path) -> None:
    """The in-process provider's sandboxes live in the server's process: ``--on-stop
    keep`` cannot keep them (they are killed), and after a SIGKILL the next start reaps
    what the records name."""
    state = tmp_path / "state"
    key = make_key(state, "alice")
    owned = state / "server" / "sandboxes"
    server = Server(state, "--on-stop", "keep", env=inprocess_env())
    try:
        with server.client(key) as c:
            sid = c.post("/v1/sandboxes", json={"timeout": 60}).json()["id"]
            assert [p.name for p in owned.iterdir()] == [f"{sid}.json"]
        assert server.stop(signal.SIGTERM) == 0
    finally:
        server.close()
    assert list(owned.iterdir()) == [] and list(sandboxes_dir(state).iterdir()) == []

    server = Server(state, env=inprocess_env())
    try:
        with server.client(key) as c:
            sid = c.post("/v1/sandboxes", json={"timeout": 60}).json()["id"]
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        server.close()
    assert [p.name for p in owned.iterdir()] == [f"{sid}.json"]

    server = Server(state, env=inprocess_env())
    try:
        with server.client(key) as c:
            r = c.get(f"/v1/sandboxes/{sid}")
            assert r.status_code == 404 and error_of(r)["code"] == "sandbox-not-found"
        reaped = [e for e in server.events() if e.get("message", "").startswith("sandbox reaped")]
        assert [e["sandbox"] for e in reaped] == [sid]
        assert list(owned.iterdir()) == [] and list(sandboxes_dir(state).iterdir()) == []
    finally:
        server.close()
