"""Every error NovaSandbox raises, in one tree. Each class has a stable kebab-case ``code``
that the CLI prints and that survives JSON, so callers can branch on it.

::

    NovaSandboxError                    error
    ├── ConfigError                     invalid-config
    │   ├── ServerRequired              server-required
    │   └── UnknownUser                 unknown-user
    ├── TemplateError                   template-error
    │   ├── TemplateNotFound            template-not-found
    │   ├── TemplateNotBuilt            template-not-built
    │   ├── TemplateBuildError          template-build-failed
    │   └── TemplateArchiveError        template-archive-invalid
    │       ├── TemplateArchiveConflict template-archive-conflict
    │       └── TemplateArchiveIncompatible template-archive-incompatible
    ├── HostToolMissing                 host-tool-missing
    ├── AuthenticationError             unauthorized
    │   ├── SignatureInvalid            signature-invalid
    │   └── SignedUrlExpired            signed-url-expired
    ├── ServerBusy                      server-busy
    ├── NoCapacity                      no-capacity
    ├── RemoteError                     remote-error
    │   ├── ServerUnreachable           server-unreachable
    │   └── RemoteUnsupported           remote-unsupported
    ├── ProviderError                   provider-error
    │   ├── HostMemoryExhausted         host-memory-exhausted
    │   ├── NetworkError                network-error
    │   └── VMStartError                vm-start-failed
    ├── SandboxError                    sandbox-error
    │   ├── SandboxNotFound             sandbox-not-found
    │   ├── AmbiguousSandboxId          ambiguous-id
    │   ├── SandboxNotRunning           sandbox-not-running
    │   │   ├── SandboxCrashed          sandbox-crashed
    │   │   ├── SandboxExpired          sandbox-expired
    │   │   └── SandboxLost             sandbox-lost
    │   ├── SandboxOwned                sandbox-owned
    │   └── PoolClosed                  pool-closed
    ├── AgentError                      agent-error
    │   ├── AgentProtocolError          agent-protocol-error
    │   └── AgentTimeout                agent-timeout
    ├── CommandError                    command-error
    │   ├── CommandNotFound             command-not-found
    │   ├── CommandTimeout              command-timeout
    │   ├── CommandFailed               command-failed
    │   ├── ProcessNotFound             process-not-found
    │   ├── StdinClosed                 stdin-closed
    │   └── InvalidWorkingDirectory     invalid-cwd
    ├── SnapshotError                   snapshot-error
    │   ├── SnapshotNotFound            snapshot-not-found
    │   └── SnapshotIncompatible        snapshot-incompatible
    ├── CodeError                       code-error
    │   ├── CodeContextNotFound         code-context-not-found
    │   ├── CodeTimeout                 code-timeout
    │   └── CodeInterpreterError        code-interpreter-error
    └── SandboxFileError                file-error
        ├── SandboxFileNotFound         file-not-found
        ├── SandboxPermissionError      permission-denied
        ├── ReadOnlyFilesystem          read-only-filesystem
        ├── NoSpaceLeft                 no-space
        ├── FileTooLarge                file-too-large
        ├── NotARegularFile             not-a-regular-file
        ├── SandboxFileExists           file-exists
        ├── NotADirectory               not-a-directory
        └── TooManyEntries              too-many-entries

Lower-layer exceptions (OSError, the QMP client's errors, the wire codec's
``ProtocolError``) are mapped to the most specific class here and chained with
``raise ... from``. An error the guest agent reported keeps the agent's code (the wire's
table, ``guest.protocol.ErrorCode``) as ``agent_code``; ``from_agent`` maps each code to
one class here.
"""

from __future__ import annotations

from typing import ClassVar

from .guest.protocol import ErrorCode
from .results import CommandResult, Execution


class NovaSandboxError(Exception):
    """Root of every error NovaSandbox raises."""

    code: ClassVar[str] = "error"
    agent_code: ErrorCode | None = None
    """The code of the guest agent's error reply this error stands for (None: it did not
    come from the agent). Set by ``from_agent``."""
    remote_code: str | None = None
    """The code a NovaSandbox server sent for this error (None: not from a server): the
    same as ``code`` unless this client has no class of its own for it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(NovaSandboxError, ValueError):
    """A configuration value is invalid (raised when the config is constructed)."""

    code = "invalid-config"


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an int from ``lo`` to ``hi`` (inclusive; None: no upper bound),
    else ``ConfigError`` ("NAME must be an integer from LO to HI, got VALUE"). A bool is
    not an int here, nor is a float. The one such check of the host side (the guest
    agent, which ships alone, keeps its own); it lives here, below every module that
    takes arguments, next to the error it raises."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        span = f"of at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ConfigError(f"{name} must be an integer {span}, got {value!r}")
    return value


class TemplateError(NovaSandboxError):
    code = "template-error"


class TemplateNotFound(TemplateError, LookupError):
    code = "template-not-found"


class TemplateNotBuilt(TemplateError):
    """The template exists but its image has not been built yet."""

    code = "template-not-built"


class TemplateBuildError(TemplateError):
    """A template build failed; a failing step names itself, its exit code and the last
    lines of its output (``step``, ``exit_code``, ``output``)."""

    code = "template-build-failed"

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        exit_code: int | None = None,
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.step = step
        self.exit_code = exit_code
        self.output = output


class TemplateArchiveError(TemplateError):
    """A template archive (``template export``/``import``) that cannot be read or
    imported: not an archive, damaged (a file does not match its digest), a path or a
    size it may not have. Nothing was written."""

    code = "template-archive-invalid"


class TemplateArchiveConflict(TemplateArchiveError):
    """Importing would replace what this host has: a definition of the same name that
    differs, or a built file with other bytes (``--force`` replaces them)."""

    code = "template-archive-conflict"


class TemplateArchiveIncompatible(TemplateArchiveError):
    """The archive's snapshots were made by another QEMU or accelerator than this host's
    (``--no-snapshots`` imports the template without them), or this host's NovaSandbox
    computes other digests for its definitions (another version of the guest agent)."""

    code = "template-archive-incompatible"


class HostToolMissing(NovaSandboxError):
    """A program NovaSandbox needs on the host is not installed."""

    code = "host-tool-missing"

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"{tool} is not installed on this host; install the Debian package: "
            f"apt-get install {package}"
        )
        self.tool = tool
        self.package = package


class AuthenticationError(NovaSandboxError):
    """A request to the server without a valid API key (HTTP 401)."""

    code = "unauthorized"


class SignatureInvalid(AuthenticationError):
    """A signed URL of the server whose signature does not match it: changed, or used
    with another method (HTTP 403)."""

    code = "signature-invalid"


class SignedUrlExpired(AuthenticationError):
    """A signed URL of the server used after its expiry (HTTP 403)."""

    code = "signed-url-expired"


class ServerBusy(NovaSandboxError):
    """The server refused a request it cannot take now (too many sandboxes, creates or
    requests at once): HTTP 503 with ``Retry-After``; nothing was changed."""

    code = "server-busy"


class RemoteError(NovaSandboxError):
    """Talking to a NovaSandbox server failed, or it answered with an error this client
    has no class for (``remote_code`` keeps the server's code)."""

    code = "remote-error"


class ServerUnreachable(RemoteError, ConnectionError):
    """The server could not be reached, or the connection to it broke mid-request."""

    code = "server-unreachable"


class RemoteUnsupported(RemoteError):
    """What a sandbox on a server does not offer to its clients (its host paths, its
    console, its network log...)."""

    code = "remote-unsupported"


class ServerRequired(ConfigError):
    """What only a sandbox on a server offers: a signed URL (``upload_url``,
    ``download_url``) needs a server to serve it; a local sandbox has none."""

    code = "server-required"


class ProviderError(NovaSandboxError):
    code = "provider-error"


class HostMemoryExhausted(ProviderError):
    """Starting the sandbox would leave the host short of memory (admission check)."""

    code = "host-memory-exhausted"


class NetworkError(ProviderError):
    """The sandbox's network could not be set up (a host name in the allow list that does
    not resolve, an egress policy this host cannot enforce, no free port)."""

    code = "network-error"


class VMStartError(ProviderError):
    """The VMM could not start the VM, or the guest agent never answered."""

    code = "vm-start-failed"

    def __init__(self, message: str, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- console (last lines) ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class SandboxError(NovaSandboxError):
    code = "sandbox-error"


class SandboxNotFound(SandboxError, LookupError):
    code = "sandbox-not-found"


class SandboxNotRunning(SandboxError):
    code = "sandbox-not-running"


class SandboxCrashed(SandboxNotRunning):
    """The VM ended on its own: kernel panic, the VMM killed, the guest shut down."""

    code = "sandbox-crashed"

    def __init__(self, message: str, reason: str = "", console_tail: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.console_tail = console_tail


class SandboxExpired(SandboxNotRunning):
    """The sandbox's lifetime (``create(timeout=...)``, ``set_timeout``) ended and it was
    killed: every later call says so."""

    code = "sandbox-expired"


class SandboxLost(SandboxNotRunning):
    """The cluster node the sandbox ran on was lost (its node agent stopped answering,
    its Ray node died, it was removed): the sandbox cannot be reached any more and never
    will be; ``node`` names that node."""

    code = "sandbox-lost"

    def __init__(self, message: str, node: str = "") -> None:
        super().__init__(message)
        self.node = node


class NoCapacity(NovaSandboxError):
    """No cluster node can take the sandbox now: none has the template ready, free
    slots, vCPUs and memory for it (or none is alive and not draining). Nothing was
    made; HTTP 503 with ``Retry-After``."""

    code = "no-capacity"


class AmbiguousSandboxId(SandboxError, LookupError):
    """A sandbox id prefix that matches more than one sandbox."""

    code = "ambiguous-id"


class SandboxOwned(SandboxError):
    """A sandbox that another live process owns (``adopt`` takes only those whose owner
    is gone), or one that cannot be adopted."""

    code = "sandbox-owned"


class PoolClosed(SandboxError):
    code = "pool-closed"


class AgentError(NovaSandboxError):
    """The guest agent reported an error, or talking to it failed."""

    code = "agent-error"


class AgentProtocolError(AgentError):
    """The agent sent bytes that break the protocol (or speaks another version)."""

    code = "agent-protocol-error"


class AgentTimeout(AgentError, TimeoutError):
    code = "agent-timeout"


class CommandError(NovaSandboxError):
    code = "command-error"


class CommandNotFound(CommandError):
    code = "command-not-found"


class InvalidWorkingDirectory(CommandError):
    code = "invalid-cwd"


class CommandTimeout(CommandError, TimeoutError):
    """The command ran past its timeout; its whole process group was killed."""

    code = "command-timeout"

    def __init__(self, message: str, result: CommandResult) -> None:
        super().__init__(message)
        self.result = result


class CommandFailed(CommandError):
    """``check=True`` and the command exited non-zero."""

    code = "command-failed"

    def __init__(self, result: CommandResult) -> None:
        tail = result.stderr[-2000:].rstrip()
        msg = f"command {result.argv!r} exited with status {result.exit_code}"
        super().__init__(f"{msg}\n{tail}" if tail else msg)
        self.result = result

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


class UnknownUser(ConfigError, LookupError):
    """The call names an account (``user=``) the sandbox does not have."""

    code = "unknown-user"


class ProcessNotFound(CommandError, LookupError):
    """No running command has that pid in the sandbox (it ended, or never was)."""

    code = "process-not-found"


class StdinClosed(CommandError):
    """Input for a command whose stdin is closed, or was never opened (start it with
    ``open_stdin=True`` to send it input later)."""

    code = "stdin-closed"


class SnapshotError(NovaSandboxError):
    code = "snapshot-error"


class SnapshotNotFound(SnapshotError, LookupError):
    code = "snapshot-not-found"


class SnapshotIncompatible(SnapshotError):
    """The snapshot cannot be restored here (other machine shape, QEMU or accelerator)."""

    code = "snapshot-incompatible"


class CodeError(NovaSandboxError):
    """The code interpreter (``run_code`` and code contexts) failed."""

    code = "code-error"


class CodeContextNotFound(CodeError, LookupError):
    """No code context with that id runs in the sandbox (removed, or never was)."""

    code = "code-context-not-found"


class CodeTimeout(CodeError, TimeoutError):
    """The code ran past its timeout: it was interrupted (``KeyboardInterrupt`` in Python,
    SIGINT in bash) and its context kept its state. ``execution`` is what it produced."""

    code = "code-timeout"

    def __init__(self, message: str, execution: Execution | None = None) -> None:
        super().__init__(message)
        self.execution = Execution() if execution is None else execution


class CodeInterpreterError(CodeError):
    """The context's interpreter process ended, or wrote what is not its protocol."""

    code = "code-interpreter-error"


class SandboxFileError(NovaSandboxError, OSError):
    """A file operation inside the sandbox failed."""

    code = "file-error"

    def __init__(self, message: str, path: str = "") -> None:
        NovaSandboxError.__init__(self, message)
        self.path = path

    def __str__(self) -> str:
        return self.message


class SandboxFileNotFound(SandboxFileError, FileNotFoundError):
    code = "file-not-found"


class SandboxPermissionError(SandboxFileError, PermissionError):
    code = "permission-denied"


class ReadOnlyFilesystem(SandboxFileError):
    code = "read-only-filesystem"


class NoSpaceLeft(SandboxFileError):
    code = "no-space"


class FileTooLarge(SandboxFileError):
    """The file is larger than the read's ``max_size`` (or grew past it while read)."""

    code = "file-too-large"


class NotARegularFile(SandboxFileError):
    """Only regular files are read: not devices, FIFOs or sockets."""

    code = "not-a-regular-file"


class SandboxFileExists(SandboxFileError, FileExistsError):
    """Something is already there: a rename's destination, a directory made with
    ``exist_ok=False``."""

    code = "file-exists"


class NotADirectory(SandboxFileError, NotADirectoryError):
    """A directory was needed: a file is in the way of ``make_dir``, or a path goes
    through a file."""

    code = "not-a-directory"


class TooManyEntries(SandboxFileError):
    """A listing found more entries than its ``max_entries`` (nothing is returned)."""

    code = "too-many-entries"


_AGENT_CODES: dict[ErrorCode, type[NovaSandboxError]] = {
    ErrorCode.PROTOCOL_ERROR: AgentProtocolError,
    ErrorCode.UNKNOWN_OP: AgentProtocolError,
    ErrorCode.BAD_REQUEST: AgentProtocolError,
    ErrorCode.VERSION_MISMATCH: AgentProtocolError,
    ErrorCode.AGENT_ERROR: AgentError,
    ErrorCode.NETWORK_ERROR: NetworkError,
    ErrorCode.MOUNT_FAILED: AgentError,
    ErrorCode.COMMAND_NOT_FOUND: CommandNotFound,
    ErrorCode.INVALID_CWD: InvalidWorkingDirectory,
    ErrorCode.UNKNOWN_USER: UnknownUser,
    ErrorCode.NO_SUCH_PROCESS: ProcessNotFound,
    ErrorCode.STDIN_CLOSED: StdinClosed,
    ErrorCode.NOT_A_TERMINAL: CommandError,
    ErrorCode.TOO_MANY_CONNECTIONS: CommandError,
    ErrorCode.FILE_NOT_FOUND: SandboxFileNotFound,
    ErrorCode.NOT_A_DIRECTORY: NotADirectory,
    ErrorCode.IS_A_DIRECTORY: SandboxFileError,
    ErrorCode.FILE_EXISTS: SandboxFileExists,
    ErrorCode.DIRECTORY_NOT_EMPTY: SandboxFileError,
    ErrorCode.PERMISSION_DENIED: SandboxPermissionError,
    ErrorCode.READ_ONLY_FILESYSTEM: ReadOnlyFilesystem,
    ErrorCode.NO_SPACE: NoSpaceLeft,
    ErrorCode.FILE_TOO_LARGE: FileTooLarge,
    ErrorCode.NOT_A_REGULAR_FILE: NotARegularFile,
    ErrorCode.OS_ERROR: SandboxFileError,
}
"""The public class of each code the agent sends (all of them: a unit test checks)."""


def from_agent(code: ErrorCode, message: str, path: str = "") -> NovaSandboxError:
    """The public error for an error reply of the guest agent: its class by the code, which
    it keeps as ``agent_code`` (and in the message where the class's own code is wider);
    file errors keep ``path``, the file the request was about."""
    cls = _AGENT_CODES[code]
    if cls.code != code:
        message = f"{message} [{code}]"
    error = cls(message, path) if issubclass(cls, SandboxFileError) else cls(message)
    error.agent_code = code
    return error


__all__ = [
    name
    for name, obj in globals().items()
    if isinstance(obj, type) and issubclass(obj, NovaSandboxError)
]
