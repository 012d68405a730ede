"""Where NovaSandbox keeps its files: the template cache and per-sandbox state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Template artifacts: ``$NOVASANDBOX_CACHE_DIR``, else ``$XDG_CACHE_HOME/novasandbox``,
    else ``~/.cache/novasandbox``."""
    if explicit := os.environ.get("NOVASANDBOX_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "novasandbox"


def state_dir() -> Path:
    """Per-sandbox state (records, sockets, console logs, overlays).

    ``$NOVASANDBOX_STATE_DIR``, else ``$XDG_STATE_HOME/novasandbox``, else
    ``/var/lib/novasandbox`` for root and ``~/.local/state/novasandbox`` for others.
    Unix socket paths must stay under 108 bytes, so keep this short.
    """
    if explicit := os.environ.get("NOVASANDBOX_STATE_DIR"):
        return Path(explicit)
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg) / "novasandbox"
    if os.geteuid() == 0:
        return Path("/var/lib/novasandbox")
    return Path.home() / ".local" / "state" / "novasandbox"
