"""``novasandbox serve``: the API on uvicorn, with structured logs and a clean stop.

- Binding: loopback by default; any other address needs TLS (``tls_cert``/``tls_key``)
  or an explicit ``insecure`` (API keys would cross the network in clear text):
  ``ConfigError`` otherwise, before anything listens. The socket is bound here, so a
  port in use is a typed error too, and port 0 takes a free port (logged).
- Logs: one JSON object per line on stderr (``JsonFormatter``): ``time``, ``level``,
  ``logger``, ``message`` and the event's own fields (``sandbox``, ``key`` as the key's
  public id, ``status``...). Never a key, a body or file data (at ``debug`` the
  library's own lines name the commands it starts).
- Metrics: ``/metrics`` without prometheus_client's ``_created`` series (switched off for
  the process here, not in ``create_app``: the switch is process-wide).
- Stopping: SIGTERM or SIGINT kills the server's sandboxes first (their command streams
  end with an ``error`` event), then uvicorn closes the connections; the process exits 0.
  With ``on_stop="keep"`` the sandboxes are left running instead, for the next start.
- Restarts: the state directory keeps whose each sandbox is (``owners.py``); a start
  adopts the ones still running and reaps the rest (``Registry.adopt_all``), whether the
  last run stopped with ``keep`` or was killed. The signing secret of signed URLs is
  kept there too (``signed.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import prometheus_client
import uvicorn
from fastapi import FastAPI

from ..errors import ConfigError
from .app import Settings, create_app
from .keys import KeyStore
from .owners import OwnerStore
from .pools import WarmPools
from .registry import Registry
from .signed import UrlSigner, load_secret

log = logging.getLogger("novasandbox.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7070
GRACEFUL_SECONDS = 10
"""Seconds connections get to end after the sandboxes were killed at a stop."""
_RECORD_FIELDS = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("qemu").setLevel(logging.CRITICAL)  # reported as typed errors
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to a node


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tls_cert: Path | None, tls_key: Path | None, insecure: bool) -> None:
    """``ConfigError`` unless serving ``host`` this way is allowed."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    if not is_loopback(host) and tls_cert is None and not insecure:
        raise ConfigError(
            f"--host {host} is not a loopback address: serving it needs TLS (--tls-cert "
            "and --tls-key) or --insecure (API keys would cross the network in clear text)"
        )


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def listening_url(sock: socket.socket, tls: bool) -> str:
    """The URL a bound socket serves (what the "listening" log line says)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


class CleanStop(uvicorn.Server):
    """uvicorn's server where a stop by signal is a clean exit (uvicorn would re-raise
    the signal once it is done)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Server(CleanStop):
    """The single-host server: its sandboxes go first at a stop (or are left running,
    ``on_stop="keep"``)."""

    def __init__(self, config: uvicorn.Config, registry: Registry) -> None:
        super().__init__(config)
        self.registry = registry

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.registry.on_stop == "keep":
            log.info("stopping: leaving the server's sandboxes running", extra={"fields": {}})
        else:
            log.info("stopping: killing the server's sandboxes", extra={"fields": {}})
        await self.registry.close()
        await super().shutdown(sockets)


def build_app(
    state: Path,
    keys: KeyStore,
    *,
    settings: Settings | None = None,
    on_stop: str = "kill",
    pools: dict[str, int] | None = None,
    prestart: dict[str, int] | None = None,
    provider: str | None = None,
) -> tuple[FastAPI, Registry]:
    """The single-host server's app over a registry of its own (``serve``'s, and a
    cluster node agent's): whose each sandbox is and the URL signing secret kept in
    ``state``."""
    if on_stop not in ("kill", "keep"):
        raise ConfigError(f"on_stop must be kill or keep, got {on_stop!r}")
    signer = UrlSigner(load_secret(state))
    registry = Registry(provider, store=OwnerStore(state))
    registry.on_stop = on_stop
    # pooled sandboxes are adoptable like the others: one handed over must outlive us too
    registry.pools = WarmPools(
        pools or {},
        provider,
        adoptable=registry._adoptable(),
        store=registry.store,
        prestart=prestart,
    )
    return create_app(keys, registry, settings, signer=signer), registry


def uvicorn_config(
    app: FastAPI, tls_cert: Path | None = None, tls_key: Path | None = None
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        server_header=False,
    )


def serve(
    *,
    state: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure: bool = False,
    log_level: str = "info",
    settings: Settings | None = None,
    on_stop: str = "kill",
    pools: dict[str, int] | None = None,
    prestart: dict[str, int] | None = None,
) -> None:
    """Serve the API until SIGTERM/SIGINT. The sandboxes live in the process's state
    directory (``NOVASANDBOX_STATE_DIR``); the keys, whose each sandbox is and the URL
    signing secret in ``state``. ``on_stop``: what a stop does with the sandboxes,
    "kill" or "keep" (left running, adopted by the next start). ``pools``: {template:
    N} warm sandboxes kept ready (``pools.py``; a template not built fails here);
    ``prestart``: {template: N} VMMs started ahead for its other plain creates."""
    check_bind(host, tls_cert, tls_key, insecure)
    keys = KeyStore(state)
    known = keys.current()  # a damaged key file fails here, not at the first request
    app, registry = build_app(
        state, keys, settings=settings, on_stop=on_stop, pools=pools, prestart=prestart
    )
    sock = bind(host, port)
    configure_logging(log_level)
    # no "_created" series beside each counter and histogram (they double what a scrape
    # stores); a switch of the whole process, which is this server's own
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    config = uvicorn_config(app, tls_cert, tls_key)
    log.info(
        "listening",
        extra={
            "fields": {
                "url": listening_url(sock, tls_cert is not None),
                "keys": len(known),
                "state_dir": str(state),
                "on_stop": on_stop,
            }
        },
    )
    if not known:
        log.warning(
            "no API keys yet: every request is refused; make one with "
            "'novasandbox keys create NAME'",
            extra={"fields": {"keys_file": str(keys.path)}},
        )
    try:
        _Server(config, registry).run(sockets=[sock])
    finally:
        sock.close()
    log.info("stopped", extra={"fields": {}})


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "JsonFormatter",
    "bind",
    "build_app",
    "check_bind",
    "configure_logging",
    "is_loopback",
    "serve",
    "uvicorn_config",
]
