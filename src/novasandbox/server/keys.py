"""API keys of the server: ``<state dir>/server/keys.json``.

A key is ``nsk_`` + 32 random bytes (URL-safe base64), shown once when it is made; the
file keeps only its SHA-256, with the key's name, a short public id (what logs and
listings name it by) and when it was made. The file is mode 0600 in a 0700 directory
and is replaced atomically (written beside it, then renamed) under a lock, so the CLI may
add and remove keys while a server runs: the server reads the file again when it
changes, and a removed key stops working at its next request.

Checking a key hashes it and compares the hash with every stored one in constant time
(``hmac.compare_digest``, all of them, whatever matches).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

KEY_PREFIX = "nsk_"
KEY_BYTES = 32
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A key's name: letters, digits, ``.``, ``_``, ``-``; 1 to 64 characters."""
MAX_KEY_LENGTH = 256
"""Longer ``Authorization`` values are refused without hashing them."""
FILE_VERSION = 1


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What the server knows of a key: never the key itself."""

    name: str
    id: str
    """Short and public: logs and listings name the key by it."""
    sha256: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "sha256": self.sha256,
            "created_at": self.created_at,
        }

    def public(self) -> dict[str, Any]:
        """What ``keys ls`` shows: no hash."""
        return {"name": self.name, "id": self.id, "created_at": self.created_at}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_path(state: Path) -> Path:
    return state / "server" / "keys.json"


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"a key name is 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {name!r}"
        )
    return name


class KeyStore:
    """The keys of the state directory ``state``."""

    def __init__(self, state: Path) -> None:
        self.path = keys_path(state)
        self._cache: tuple[tuple[int, int, int], list[ApiKey]] | None = None
        self._cache_lock = threading.Lock()

    # --- the file

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serializes writers (other ``keys`` commands) across processes."""
        self._prepare_dir()
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> list[ApiKey]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys in {self.path}: {exc}") from exc
        return self._parse(text)

    def _parse(self, text: str) -> list[ApiKey]:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f"not a version {FILE_VERSION} key file")
            keys = []
            for entry in data["keys"]:
                key = ApiKey(
                    name=validate_name(entry["name"]),
                    id=str(entry["id"]),
                    sha256=str(entry["sha256"]),
                    created_at=float(entry["created_at"]),
                )
                if not re.fullmatch(r"[0-9a-f]{64}", key.sha256):
                    raise ValueError(f"key {key.name!r} has no valid hash")
                keys.append(key)
            return keys
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"the API key file {self.path} is damaged: {exc}") from exc

    def _write(self, keys: list[ApiKey]) -> None:
        self._prepare_dir()
        data = {"version": FILE_VERSION, "keys": [k.to_json() for k in keys]}
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # --- what the CLI does

    def create(self, name: str) -> tuple[ApiKey, str]:
        """A new key named ``name``: its record and the key itself (shown once, never
        stored). ``ConfigError`` for a bad or taken name."""
        validate_name(name)
        with self._locked():
            keys = self._read()
            if any(k.name == name for k in keys):
                raise ConfigError(f"an API key named {name!r} exists; remove it first")
            secret = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
            taken = {k.id for k in keys}
            key_id = "key_" + secrets.token_hex(4)
            while key_id in taken:
                key_id = "key_" + secrets.token_hex(4)
            key = ApiKey(name, key_id, hash_key(secret), time.time())
            self._write([*keys, key])
        return key, secret

    def all(self) -> list[ApiKey]:
        return self._read()

    def remove(self, name: str) -> ApiKey:
        """Remove the key named ``name``; ``ConfigError`` if there is none."""
        validate_name(name)
        with self._locked():
            keys = self._read()
            found = [k for k in keys if k.name == name]
            if not found:
                raise ConfigError(f"no API key named {name!r}")
            self._write([k for k in keys if k.name != name])
        return found[0]

    # --- what the server does

    def current(self) -> list[ApiKey]:
        """The keys as the file holds them now (read again only when it changed)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the API keys in {self.path}: {exc}") from exc
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1]
        keys = self._read()
        with self._cache_lock:
            self._cache = (stamp, keys)
        return keys

    def verify(self, secret: str) -> ApiKey | None:
        """The key ``secret`` is, or None. Compares its hash with every stored hash in
        constant time."""
        if not secret or len(secret) > MAX_KEY_LENGTH:
            return None
        digest = hash_key(secret).encode()
        found: ApiKey | None = None
        for key in self.current():
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found


__all__ = ["KEY_PREFIX", "ApiKey", "KeyStore", "hash_key", "keys_path", "validate_name"]
