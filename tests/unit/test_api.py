"""The public surface: exports, error codes, and sync/async API parity."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import novasandbox
import novasandbox.cli
from novasandbox import errors
from novasandbox.commands import AsyncCommandHandle, AsyncCommands, CommandResult
from novasandbox.errors import NovaSandboxError, from_agent
from novasandbox.files import AsyncFiles, AsyncWatchHandle
from novasandbox.guest.protocol import ErrorCode
from novasandbox.pool import AsyncPool
from novasandbox.sandbox import AsyncSandbox
from novasandbox.sync import CommandHandle, Commands, Files, Pool, Sandbox, WatchHandle

KEBAB = re.compile(r"^[a-z]+(-[a-z]+)*$")


def all_error_classes() -> list[type[NovaSandboxError]]:
    seen: list[type[NovaSandboxError]] = []
    todo: list[type[NovaSandboxError]] = [NovaSandboxError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def test_all_names_exist() -> None:
    assert len(novasandbox.__all__) == len(set(novasandbox.__all__))
    for name in novasandbox.__all__:
        assert hasattr(novasandbox, name), name


def test_dir_is_exactly_the_public_surface() -> None:
    """``dir(novasandbox)``: ``__all__`` and dunders; no submodule (``cli``, ``config``,
    ... are imported by now, this test's imports included) and no helper name."""
    assert "novasandbox.cli" in sys.modules
    dunders = {n for n in vars(novasandbox) if n.startswith("__") and n.endswith("__")}
    assert set(dir(novasandbox)) == set(novasandbox.__all__) | dunders
    for hidden in ("cli", "config", "errors", "network", "sandbox", "sync", "logging"):
        assert hidden not in dir(novasandbox), hidden
    # still importable, and still attributes for who names them
    assert novasandbox.cli is sys.modules["novasandbox.cli"]


def test_all_has_no_private_name() -> None:
    for name in novasandbox.__all__:
        assert not name.startswith("_") or (name.startswith("__") and name.endswith("__")), name


def test_config_classes_no_public_path_accepts_are_not_exported() -> None:
    from novasandbox.config import MachineConfig
    from novasandbox.network import NetworkConfig, NetworkMode

    for name in ("MachineConfig", "NetworkConfig"):
        assert name not in novasandbox.__all__ and not hasattr(novasandbox, name), name
    assert MachineConfig().network == NetworkConfig()
    assert novasandbox.NetworkMode is NetworkMode


@pytest.mark.parametrize("network", ["detached", "bridge", "NAT", None])
def test_create_refuses_an_unknown_or_internal_network_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network: Any
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("NOVASANDBOX_STATE_DIR", str(state))
    monkeypatch.setenv("NOVASANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(novasandbox.ConfigError, match="none, nat, tap") as info:
        Sandbox.create(network=network)
    assert info.value.code == "invalid-config"
    with pytest.raises(novasandbox.ConfigError, match="none, nat, tap"):
        asyncio.run(AsyncSandbox.create(network=network))
    assert not state.exists() and not (tmp_path / "cache").exists()


def test_every_public_error_is_exported() -> None:
    for name in errors.__all__:
        assert name in novasandbox.__all__, name
        assert getattr(novasandbox, name) is getattr(errors, name)


def test_error_codes_are_unique_and_kebab_case() -> None:
    classes = [c for c in all_error_classes() if c.__module__ == errors.__name__]
    assert len(classes) >= 20
    codes: dict[str, type[NovaSandboxError]] = {}
    for cls in classes:
        code = cls.__dict__.get("code")
        assert code is not None, f"{cls.__name__} inherits its code instead of defining one"
        assert KEBAB.match(code), f"{cls.__name__}.code = {code!r}"
        assert code not in codes, f"{cls.__name__} and {codes[code].__name__} share {code!r}"
        codes[code] = cls


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("NovaSandboxError", "error"),
        ("ConfigError", "invalid-config"),
        ("TemplateNotFound", "template-not-found"),
        ("TemplateNotBuilt", "template-not-built"),
        ("HostToolMissing", "host-tool-missing"),
        ("VMStartError", "vm-start-failed"),
        ("SandboxNotRunning", "sandbox-not-running"),
        ("AgentProtocolError", "agent-protocol-error"),
        ("CommandNotFound", "command-not-found"),
        ("CommandTimeout", "command-timeout"),
        ("CommandFailed", "command-failed"),
        ("InvalidWorkingDirectory", "invalid-cwd"),
        ("SandboxFileNotFound", "file-not-found"),
        ("SandboxPermissionError", "permission-denied"),
        ("ReadOnlyFilesystem", "read-only-filesystem"),
        ("NoSpaceLeft", "no-space"),
    ],
)
def test_stable_codes(name: str, code: str) -> None:
    """Codes are API: callers branch on them and the CLI prints them."""
    assert getattr(novasandbox, name).code == code


def test_errors_are_also_the_matching_builtin_exceptions() -> None:
    assert issubclass(novasandbox.ConfigError, ValueError)
    assert issubclass(novasandbox.CommandTimeout, TimeoutError)
    assert issubclass(novasandbox.AgentTimeout, TimeoutError)
    assert issubclass(novasandbox.SandboxFileNotFound, FileNotFoundError)
    assert issubclass(novasandbox.SandboxPermissionError, PermissionError)
    assert issubclass(novasandbox.TemplateNotFound, LookupError)


AGENT_CODES = {
    "protocol-error": "agent-protocol-error",
    "unknown-op": "agent-protocol-error",
    "bad-request": "agent-protocol-error",
    "version-mismatch": "agent-protocol-error",
    "agent-error": "agent-error",
    "network-error": "network-error",
    "mount-failed": "agent-error",
    "command-not-found": "command-not-found",
    "invalid-cwd": "invalid-cwd",
    "unknown-user": "unknown-user",
    "no-such-process": "process-not-found",
    "stdin-closed": "stdin-closed",
    "not-a-terminal": "command-error",
    "too-many-connections": "command-error",
    "file-not-found": "file-not-found",
    "not-a-directory": "not-a-directory",
    "is-a-directory": "file-error",
    "file-exists": "file-exists",
    "directory-not-empty": "file-error",
    "permission-denied": "permission-denied",
    "read-only-filesystem": "read-only-filesystem",
    "no-space": "no-space",
    "file-too-large": "file-too-large",
    "not-a-regular-file": "not-a-regular-file",
    "os-error": "file-error",
}
"""Each code the agent sends (the wire's table) -> the ``.code`` of its public class: API."""


def test_the_wire_table_is_the_one_the_host_maps() -> None:
    assert set(AGENT_CODES) == {c.value for c in ErrorCode}
    assert set(errors._AGENT_CODES) == set(ErrorCode)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_agent_codes_map_to_public_classes_with_stable_codes(code: ErrorCode) -> None:
    err = from_agent(code, "boom", "/some/path")
    assert err.code == AGENT_CODES[code]
    assert getattr(novasandbox, type(err).__name__) is type(err)  # public
    assert err.agent_code is code and err.agent_code == code.value
    assert "boom" in str(err)  # the agent's message reaches the user
    if isinstance(err, novasandbox.SandboxFileError):
        assert err.path == "/some/path"


def test_errors_raised_on_the_host_have_no_agent_code() -> None:
    assert novasandbox.AgentProtocolError("bad frame").agent_code is None
    assert novasandbox.SandboxFileNotFound("gone", "/x").agent_code is None


def test_the_error_tree_in_the_docstring_is_the_class_tree() -> None:
    """The tree at the top of errors.py names every class, with its code, under its parent."""
    doc = errors.__doc__
    assert doc is not None
    rows: list[tuple[int, str, str]] = []
    for line in doc.splitlines():
        found = re.fullmatch(r"\s*(?:[│ ]*[├└]── )?(\w+)\s+([a-z-]+)", line)
        if found and found.group(1)[0].isupper():
            rows.append((line.index(found.group(1)), found.group(1), found.group(2)))
    classes = {c.__name__: c for c in all_error_classes() if c.__module__ == errors.__name__}
    assert sorted(name for _, name, _ in rows) == sorted(classes)
    for k, (depth, name, code) in enumerate(rows):
        cls = classes[name]
        assert cls.code == code, name
        if name == "NovaSandboxError":
            continue
        parent = next(r[1] for r in reversed(rows[:k]) if r[0] < depth)
        direct = [b for b in cls.__bases__ if issubclass(b, NovaSandboxError)]
        assert direct == [classes[parent]], f"{name} is drawn under {parent}"


def test_errors_imports_nothing_above_it() -> None:
    """errors is the bottom of the package: it imports the wire's code table and the plain
    result values only, which import nothing from the package."""
    src = Path(errors.__file__).parent
    allowed = {"errors": {"guest.protocol", "results"}, "results": set(), "guest/protocol": set()}
    for name, may in allowed.items():
        tree = ast.parse((src / f"{name}.py").read_text())
        imported = {
            "." * (node.level - 1) + (node.module or "")
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level > 0
        }
        absolute = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module or ""
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert imported == may, name
        assert not any(m.startswith("novasandbox") for m in absolute), name


def test_command_result_is_one_class_everywhere() -> None:
    assert novasandbox.CommandResult is CommandResult is errors.CommandResult


# ---------------------------------------------------------------------------- sync/async parity

PAIRS = [
    (Sandbox, AsyncSandbox),
    (Commands, AsyncCommands),
    (Files, AsyncFiles),
    (CommandHandle, AsyncCommandHandle),
    (Pool, AsyncPool),
    (WatchHandle, AsyncWatchHandle),
]


def sync_name(annotation: Any) -> Any:
    """``"AsyncSandbox"`` -> ``"Sandbox"`` in a (string) annotation (and the remote
    sandbox that ``create`` and ``connect`` may give: the sync twin wraps either, and so
    returns what either returns)."""
    if not isinstance(annotation, str):
        return annotation
    name = re.sub(r"\bAsync(?=[A-Z])", "", annotation)
    name = re.sub(r"\bRemoteSandbox\b", "Sandbox", name)
    if name == "Snapshot":  # a remote sandbox's snapshot stays on its server
        return "Snapshot | RemoteSnapshot"
    return "Sandbox" if name == "Sandbox | Sandbox" else name


def public_methods(cls: type) -> dict[str, Any]:
    """Public callables of a class (static and class methods included, properties not)."""
    out = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property):
            continue
        value = getattr(cls, name)
        if callable(value):
            out[name] = value
    return out


def public_properties(cls: type) -> set[str]:
    return {
        name
        for name in dir(cls)
        if not name.startswith("_") and isinstance(inspect.getattr_static(cls, name), property)
    }


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_public_methods(sync_cls: type, async_cls: type) -> None:
    assert sorted(public_methods(sync_cls)) == sorted(public_methods(async_cls))


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_signatures(sync_cls: type, async_cls: type) -> None:
    sync_methods, async_methods = public_methods(sync_cls), public_methods(async_cls)
    for name, async_fn in async_methods.items():
        sync_fn = sync_methods[name]
        sync_sig, async_sig = inspect.signature(sync_fn), inspect.signature(async_fn)
        assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values()), name
        # the sync twin returns what the coroutine returns (its own class for ``create``)
        assert sync_sig.return_annotation == sync_name(async_sig.return_annotation), name
        assert isinstance(
            inspect.getattr_static(sync_cls, name), classmethod | staticmethod
        ) == isinstance(inspect.getattr_static(async_cls, name), classmethod | staticmethod), name


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_async_methods_are_coroutines_and_sync_ones_are_not(
    sync_cls: type, async_cls: type
) -> None:
    coroutines = 0
    for name, fn in public_methods(sync_cls).items():
        assert not inspect.iscoroutinefunction(fn), f"{sync_cls.__name__}.{name}"
    for fn in public_methods(async_cls).values():
        coroutines += inspect.iscoroutinefunction(fn)
    assert coroutines >= 1


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (AsyncSandbox, "create"),
        (AsyncSandbox, "kill"),
        (AsyncSandbox, "list"),
        (AsyncCommands, "run"),
        (AsyncCommands, "start"),
        *(
            (AsyncFiles, n)
            for n in (
                "write",
                "write_files",
                "read",
                "list",
                "get_info",
                "stat",
                "exists",
                "rename",
                "make_dir",
                "remove",
                "watch_dir",
            )
        ),
    ],
)
def test_io_methods_are_async(cls: type, name: str) -> None:
    assert inspect.iscoroutinefunction(getattr(cls, name))


def test_sandbox_properties_match() -> None:
    async_props = public_properties(AsyncSandbox)
    sync_props = public_properties(Sandbox)
    assert async_props <= sync_props
    # what AsyncSandbox sets as plain attributes in __init__, Sandbox exposes as properties
    for attr in ("id", "template", "config", "paths", "accel"):
        assert attr in sync_props


def test_context_managers() -> None:
    assert hasattr(Sandbox, "__enter__") and hasattr(Sandbox, "__exit__")
    assert inspect.iscoroutinefunction(AsyncSandbox.__aenter__)
    assert inspect.iscoroutinefunction(AsyncSandbox.__aexit__)


class _Recorder:
    """Stands in for the async object behind a sync twin and records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        async def method(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return method


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"), [(Commands, AsyncCommands), (Files, AsyncFiles)]
)
def test_sync_twins_forward_every_argument(sync_cls: type, async_cls: type) -> None:
    """Each parameter given to the sync method reaches the async one unchanged."""
    for name, async_fn in public_methods(async_cls).items():
        params = list(inspect.signature(async_fn).parameters.values())[1:]
        args, kwargs = [], {}
        for i, p in enumerate(params):
            value = f"sentinel-{i}"
            if "Literal[" in str(p.annotation):  # a closed set: take a non-default member
                value = re.findall(r"[\"']([^\"']+)[\"']", str(p.annotation))[-1]
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                kwargs[p.name] = value
            else:
                args.append(value)
        recorder = _Recorder()
        twin = sync_cls(recorder)
        try:
            getattr(twin, name)(*args, **kwargs)
        except TypeError:  # the sync side wraps a result it got as None; the call was made
            pass
        assert len(recorder.calls) == 1, name
        called, got_args, got_kwargs = recorder.calls[0]
        assert called == name
        bound = inspect.signature(async_fn).bind(None, *got_args, **got_kwargs)
        expected = inspect.signature(async_fn).bind(None, *args, **kwargs)
        assert bound.arguments == expected.arguments, name
