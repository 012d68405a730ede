"""NovaSandbox: secure microVM sandboxes for running untrusted code, from Python.

    from novasandbox import Sandbox

    with Sandbox.create("python") as sb:
        print(sb.commands.run("uname -r").stdout)

``dir(novasandbox)`` is the public surface (``__all__``); the submodules stay importable
(``novasandbox.network``, ``novasandbox.config``, ...) for what is not exported.

The architecture, in the order a sandbox comes to life: config (``MachineConfig``,
``Drive``) -> host plan (``host.plan``: what it holds on the host, decided once) ->
template or snapshot (``TemplateManager``, ``snapshots``) -> provider (``vm``: QEMU by
default) -> sandbox (``Sandbox``/``AsyncSandbox``) -> guest agent (``guest.agent``,
spoken to over ``guest.protocol``). Above the sandbox: ``gc``, ``warmup`` (template
snapshots), ``pool``, ``sync``, ``cli``. A sandbox that a ``novasandbox serve`` owns is
used through ``remote`` (``Sandbox.create(..., server=URL, api_key=KEY)``, or
``NOVASANDBOX_SERVER``): the same API, over HTTP.
"""

import importlib
import logging

TYPE_CHECKING = False  # typing's import costs milliseconds; mypy knows this name
if TYPE_CHECKING:  # the names below, for type checkers; at run time: __getattr__
    from .builder import TemplateBuilder
    from .commands import AsyncCommandHandle
    from .config import Drive
    from .errors import (
        AgentError,
        AgentProtocolError,
        AgentTimeout,
        AmbiguousSandboxId,
        AuthenticationError,
        CodeContextNotFound,
        CodeError,
        CodeInterpreterError,
        CodeTimeout,
        CommandError,
        CommandFailed,
        CommandNotFound,
        CommandTimeout,
        ConfigError,
        FileTooLarge,
        HostMemoryExhausted,
        HostToolMissing,
        InvalidWorkingDirectory,
        NetworkError,
        NoCapacity,
        NoSpaceLeft,
        NotADirectory,
        NotARegularFile,
        NovaSandboxError,
        PoolClosed,
        ProcessNotFound,
        ProviderError,
        ReadOnlyFilesystem,
        RemoteError,
        RemoteUnsupported,
        SandboxCrashed,
        SandboxError,
        SandboxExpired,
        SandboxFileError,
        SandboxFileExists,
        SandboxFileNotFound,
        SandboxLost,
        SandboxNotFound,
        SandboxNotRunning,
        SandboxOwned,
        SandboxPermissionError,
        ServerBusy,
        ServerRequired,
        ServerUnreachable,
        SignatureInvalid,
        SignedUrlExpired,
        SnapshotError,
        SnapshotIncompatible,
        SnapshotNotFound,
        StdinClosed,
        TemplateArchiveConflict,
        TemplateArchiveError,
        TemplateArchiveIncompatible,
        TemplateBuildError,
        TemplateError,
        TemplateNotBuilt,
        TemplateNotFound,
        TooManyEntries,
        UnknownUser,
        VMStartError,
    )
    from .files import AsyncWatchHandle, EntryInfo, FilesystemEvent, WriteEntry
    from .network import NetworkLog, NetworkMode, RefusedConnection
    from .pool import AsyncPool
    from .records import SandboxInfo
    from .remote import RemoteCommandHandle, RemoteSandbox, RemoteSandboxInfo, RemoteSnapshot
    from .results import (
        CodeContext,
        CommandResult,
        Execution,
        ExecutionError,
        Logs,
        ProcessInfo,
        Result,
        SandboxMetrics,
        SandboxState,
    )
    from .sandbox import AsyncSandbox
    from .snapshots import Snapshot, delete_snapshot, get_snapshot, list_snapshots
    from .sync import CommandHandle, Pool, Sandbox, TerminalHandle, WatchHandle
    from .templates import BuiltTemplate, Template, TemplateManager
    from .terminal import AsyncTerminalHandle

__version__ = "0.1.0"

logging.getLogger("novasandbox").addHandler(logging.NullHandler())

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AmbiguousSandboxId",
    "AsyncCommandHandle",
    "AsyncPool",
    "AsyncSandbox",
    "AsyncTerminalHandle",
    "AsyncWatchHandle",
    "AuthenticationError",
    "BuiltTemplate",
    "CodeContext",
    "CodeContextNotFound",
    "CodeError",
    "CodeInterpreterError",
    "CodeTimeout",
    "CommandError",
    "CommandFailed",
    "CommandHandle",
    "CommandNotFound",
    "CommandResult",
    "CommandTimeout",
    "ConfigError",
    "Drive",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileTooLarge",
    "FilesystemEvent",
    "HostMemoryExhausted",
    "HostToolMissing",
    "InvalidWorkingDirectory",
    "Logs",
    "NetworkError",
    "NetworkLog",
    "NetworkMode",
    "NoCapacity",
    "NoSpaceLeft",
    "NotADirectory",
    "NotARegularFile",
    "NovaSandboxError",
    "Pool",
    "PoolClosed",
    "ProcessInfo",
    "ProcessNotFound",
    "ProviderError",
    "ReadOnlyFilesystem",
    "RefusedConnection",
    "RemoteCommandHandle",
    "RemoteError",
    "RemoteSandbox",
    "RemoteSandboxInfo",
    "RemoteSnapshot",
    "RemoteUnsupported",
    "Result",
    "Sandbox",
    "SandboxCrashed",
    "SandboxError",
    "SandboxExpired",
    "SandboxFileError",
    "SandboxFileExists",
    "SandboxFileNotFound",
    "SandboxInfo",
    "SandboxLost",
    "SandboxMetrics",
    "SandboxNotFound",
    "SandboxNotRunning",
    "SandboxOwned",
    "SandboxPermissionError",
    "SandboxState",
    "ServerBusy",
    "ServerRequired",
    "ServerUnreachable",
    "SignatureInvalid",
    "SignedUrlExpired",
    "Snapshot",
    "SnapshotError",
    "SnapshotIncompatible",
    "SnapshotNotFound",
    "StdinClosed",
    "Template",
    "TemplateArchiveConflict",
    "TemplateArchiveError",
    "TemplateArchiveIncompatible",
    "TemplateBuildError",
    "TemplateBuilder",
    "TemplateError",
    "TemplateManager",
    "TemplateNotBuilt",
    "TemplateNotFound",
    "TerminalHandle",
    "TooManyEntries",
    "UnknownUser",
    "VMStartError",
    "WatchHandle",
    "WriteEntry",
    "__version__",
    "delete_snapshot",
    "get_snapshot",
    "list_snapshots",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "commands": ("AsyncCommandHandle",),
    "config": ("Drive",),
    "errors": (
        "AgentError",
        "AgentProtocolError",
        "AgentTimeout",
        "AmbiguousSandboxId",
        "AuthenticationError",
        "CodeContextNotFound",
        "CodeError",
        "CodeInterpreterError",
        "CodeTimeout",
        "CommandError",
        "CommandFailed",
        "CommandNotFound",
        "CommandTimeout",
        "ConfigError",
        "FileTooLarge",
        "HostMemoryExhausted",
        "HostToolMissing",
        "InvalidWorkingDirectory",
        "NetworkError",
        "NoCapacity",
        "NoSpaceLeft",
        "NotADirectory",
        "NotARegularFile",
        "NovaSandboxError",
        "PoolClosed",
        "ProcessNotFound",
        "ProviderError",
        "ReadOnlyFilesystem",
        "RemoteError",
        "RemoteUnsupported",
        "SandboxCrashed",
        "SandboxError",
        "SandboxExpired",
        "SandboxLost",
        "SandboxFileError",
        "SandboxFileExists",
        "SandboxFileNotFound",
        "SandboxNotFound",
        "SandboxNotRunning",
        "SandboxOwned",
        "SandboxPermissionError",
        "ServerBusy",
        "ServerRequired",
        "ServerUnreachable",
        "SignatureInvalid",
        "SignedUrlExpired",
        "SnapshotError",
        "SnapshotIncompatible",
        "SnapshotNotFound",
        "StdinClosed",
        "TemplateArchiveConflict",
        "TemplateArchiveError",
        "TemplateArchiveIncompatible",
        "TemplateBuildError",
        "TemplateError",
        "TemplateNotBuilt",
        "TemplateNotFound",
        "TooManyEntries",
        "UnknownUser",
        "VMStartError",
    ),
    "files": ("AsyncWatchHandle", "EntryInfo", "FilesystemEvent", "WriteEntry"),
    "network": ("NetworkLog", "NetworkMode", "RefusedConnection"),
    "pool": ("AsyncPool",),
    "records": ("SandboxInfo",),
    "remote": ("RemoteCommandHandle", "RemoteSandbox", "RemoteSandboxInfo", "RemoteSnapshot"),
    "results": (
        "CodeContext",
        "CommandResult",
        "Execution",
        "ExecutionError",
        "Logs",
        "ProcessInfo",
        "Result",
        "SandboxMetrics",
        "SandboxState",
    ),
    "sandbox": ("AsyncSandbox",),
    "snapshots": ("Snapshot", "delete_snapshot", "get_snapshot", "list_snapshots"),
    "sync": ("CommandHandle", "Pool", "Sandbox", "TerminalHandle", "WatchHandle"),
    "terminal": ("AsyncTerminalHandle",),
    "templates": ("BuiltTemplate", "Template", "TemplateManager"),
    "builder": ("TemplateBuilder",),
}
"""Each public name's module (the one that defines it), imported on the name's first use:
``import novasandbox`` imports none of them (asyncio, httpx, the QEMU client neither)."""
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


if not TYPE_CHECKING:  # hidden from mypy: an unknown name stays an error there

    def __getattr__(name: str) -> object:
        """A public name, from its module (imported now, once: the value is kept here); or
        a submodule named as an attribute (``novasandbox.config`` after ``import
        novasandbox``, as when this file imported them all)."""
        module = _MODULE_OF.get(name)
        if module is None:
            if not name.startswith("_"):
                try:
                    return importlib.import_module(f"{__name__}.{name}")
                except ModuleNotFoundError as exc:
                    if exc.name != f"{__name__}.{name}":
                        raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    """The public names and the module's dunders: not its submodules (``cli``,
    ``config``, ...) nor what it imports for itself."""
    dunders = (name for name in globals() if name.startswith("__") and name.endswith("__"))
    return sorted({*__all__, *dunders})
