"""Providers: the VMMs a sandbox can run on, by name.

Each provider is one module with a class that implements ``base.Provider``; this table
registers it. Adding one (Firecracker, Apple Virtualization.framework) is that module
and one line here, and nothing in ``sandbox.py``. Modules are imported when first asked
for: a provider's own dependencies (pyobjc on macOS, say) are needed only where it runs.

- ``qemu``: QEMU microVMs, hardware KVM where the host has it, TCG emulation otherwise.
  The default.
- ``inprocess``: no VM at all. The real guest agent runs on the host as a child process
  of this one, as this user, reached over a socket pair: for fast tests of NovaSandbox's
  own logic and for development. It isolates NOTHING (guest code runs on the host with
  your permissions), so it is refused unless ``NOVASANDBOX_ALLOW_INPROCESS=1``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from ..errors import ConfigError
from .base import Provider

PROVIDERS: Mapping[str, str] = {
    "qemu": "novasandbox.vm.qemu:QemuProvider",
    "inprocess": "novasandbox.vm.inprocess:InProcessProvider",
}
"""Provider name -> ``module:class`` that implements it."""
DEFAULT_PROVIDER = "qemu"
UNSAFE = frozenset({"inprocess"})
"""Providers without isolation: only with ``NOVASANDBOX_ALLOW_INPROCESS=1``."""

_made: dict[str, Provider] = {}


def provider_name(name: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The provider to use: ``name``, else ``NOVASANDBOX_PROVIDER``, else the default;
    checked (``ConfigError`` for an unknown one, or one that is not enabled)."""
    env = os.environ if env is None else env
    source = "provider"
    if name is None:
        name = env.get("NOVASANDBOX_PROVIDER", "").strip() or DEFAULT_PROVIDER
        source = "NOVASANDBOX_PROVIDER"
    if not isinstance(name, str) or name not in PROVIDERS:
        raise ConfigError(f"{source} must be one of {', '.join(PROVIDERS)}, got {name!r}")
    if name in UNSAFE and env.get("NOVASANDBOX_ALLOW_INPROCESS", "") != "1":
        raise ConfigError(
            f"the {name!r} provider runs guest code on this host without any isolation; "
            "it is for NovaSandbox's own tests and is refused unless "
            "NOVASANDBOX_ALLOW_INPROCESS=1"
        )
    return name


def get_provider(name: str | None = None) -> Provider:
    """The provider called ``name`` (see ``provider_name``), made once per process."""
    name = provider_name(name)
    made = _made.get(name)
    if made is None:
        module, _, attr = PROVIDERS[name].partition(":")
        made = _made[name] = getattr(importlib.import_module(module), attr)()
    return made
