"""Short-lived signed URLs: one file of one sandbox, up or down, without the API key.

``POST /v1/sandboxes/ID/files/upload-url?path=P&expires=S`` (or ``download-url``) gives
``/v1/signed/sandboxes/ID/files?path=P&owner=KEY_ID&expires=UNIX&signature=SIG``, where
SIG is HMAC-SHA256, under a secret of the server, of (method, sandbox id, normalized
path, the owning key's public id, expiry). The URL works without ``Authorization`` for
that one method (PUT: upload, GET: download), sandbox and path, until it expires; the
key it was made with must still exist and own the sandbox. Anything changed in it fails
the signature (403, ``signature-invalid``), an expired one is 403 ``signed-url-expired``.
Any web page may use one (``Access-Control-Allow-Origin: *`` and an answer to a
browser's preflight, from ``app.Guard``): the URL is its own credential, no cookie.

The secret is 32 random bytes in ``<state dir>/server/url-secret`` (mode 0600), made at
the first start and kept, so URLs survive a restart of the server; removing the file
(and restarting) revokes every URL handed out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

from ..errors import ConfigError, SignatureInvalid, SignedUrlExpired

MAX_EXPIRES = 3600
"""The longest a signed URL may live (seconds)."""
DEFAULT_EXPIRES = 300
SECRET_BYTES = 32
SIGNED_PREFIX = "/v1/signed/sandboxes/"


def secret_path(state: Path) -> Path:
    return state / "server" / "url-secret"


def load_secret(state: Path) -> bytes:
    """The server's signing secret, made (mode 0600) at the first call."""
    path = secret_path(state)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(SECRET_BYTES) + "\n")
            out.flush()
            os.fsync(out.fileno())
    try:
        text = path.read_text().strip()
        secret = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the URL signing secret {path} is unreadable: {exc}") from exc
    if len(secret) < 16:
        raise ConfigError(f"the URL signing secret {path} is too short; remove it to renew it")
    return secret


class UrlSigner:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def signature(self, method: str, sandbox_id: str, path: str, owner: str, expires: int) -> str:
        message = json.dumps([method.upper(), sandbox_id, path, owner, expires]).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def url(
        self, base: str, method: str, sandbox_id: str, path: str, owner: str, expires: int
    ) -> str:
        """The signed URL (at the server ``base``) of one file of one sandbox."""
        query = {
            "path": path,
            "owner": owner,
            "expires": expires,
            "signature": self.signature(method, sandbox_id, path, owner, expires),
        }
        return f"{base.rstrip('/')}{SIGNED_PREFIX}{sandbox_id}/files?{urlencode(query)}"

    def check(
        self,
        method: str,
        sandbox_id: str,
        path: str,
        owner: str,
        expires: int,
        signature: str,
        now: float | None = None,
    ) -> None:
        """``SignatureInvalid`` unless ``signature`` signs exactly these values,
        ``SignedUrlExpired`` once ``expires`` has passed."""
        want = self.signature(method, sandbox_id, path, owner, expires)
        if not hmac.compare_digest(want.encode(), signature.encode("utf-8", "replace")):
            raise SignatureInvalid(
                "the URL's signature does not match it (changed, or signed for another "
                "method, sandbox or path)"
            )
        if (time.time() if now is None else now) >= expires:
            raise SignedUrlExpired("the signed URL has expired; ask for a new one")


def check_expires(seconds: int) -> int:
    if not 1 <= seconds <= MAX_EXPIRES:
        raise ConfigError(f"expires must be 1 to {MAX_EXPIRES} seconds, got {seconds}")
    return seconds


__all__ = [
    "DEFAULT_EXPIRES",
    "MAX_EXPIRES",
    "SIGNED_PREFIX",
    "UrlSigner",
    "check_expires",
    "load_secret",
    "secret_path",
]
