"""The JSON the server takes and gives (pydantic models, which are also its OpenAPI
description).

Requests are strict: unknown fields and values of the wrong type are refused (HTTP 422,
code ``invalid-config``) before anything happens. The values themselves (vcpus, memory,
network, environment, paths, timeouts...) are checked once, by the library, as the
Python API checks them; the server does not repeat those rules. Labels are the server's
own and are checked here.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..commands import DEFAULT_COMMAND_TIMEOUT
from ..errors import ConfigError
from ..sandbox import DEFAULT_LIFETIME

MAX_LABELS = 32
LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})")
MAX_LABEL_VALUE = 256


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CreateSandbox(_Request):
    """``Sandbox.create``'s arguments."""

    template: str = "python"
    vcpus: int | None = Field(None, description="Default: the template's.")
    memory_mib: int | None = Field(None, description="Default: the template's.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Default environment of its commands."
    )
    timeout: float | None = Field(
        DEFAULT_LIFETIME,
        description="The sandbox's lifetime in seconds, then it is killed (null: no limit).",
    )
    network: str = Field("none", description="none, nat or tap.")
    allow: list[str] | None = Field(
        None,
        description="With a network: the destinations the guest may reach (null: the public "
        "internet; []: none).",
    )
    ports: list[int] = Field(
        default_factory=list, description="Guest TCP ports reachable from the server's host."
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description=f"Metadata kept by the server (at most {MAX_LABELS}); lists filter on it.",
    )
    cold: bool = Field(False, description="Boot the kernel instead of restoring a snapshot.")
    snapshot: str | None = Field(
        None,
        description="Restore this snapshot of the caller's (POST /v1/sandboxes/ID/snapshot): "
        "files and running processes included; it brings its own template, vcpus and memory.",
    )


class SetTimeout(_Request):
    timeout: float | None = Field(
        description="The remaining lifetime in seconds, from now (null: no limit)."
    )


class TerminalSize(_Request):
    cols: int = Field(ge=1, le=1000)
    rows: int = Field(ge=1, le=1000)


class RunCommand(_Request):
    """``commands.run``'s arguments; the output is streamed (see the route)."""

    cmd: str | list[str] = Field(
        description="A shell string (run by bash as a login shell: bash -l -c) or an argv list."
    )
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = Field(
        None, description="Default: the user's home; relative: under the user's home."
    )
    user: str | None = Field(
        None, description="The guest account it runs as (default: the template's user)."
    )
    tag: str | None = Field(
        None, max_length=256, description="A label of yours, shown by GET .../commands."
    )
    pty: TerminalSize | None = Field(
        None,
        description="Run it in a terminal of this size: what it shows comes as `pty` "
        "events (base64 bytes), input goes in by .../stdin, .../resize changes the size.",
    )
    timeout: float | None = Field(
        DEFAULT_COMMAND_TIMEOUT,
        description="Seconds before the command's process group is killed (null: no limit).",
    )
    stdin: str | None = Field(None, description="Sent to the command's stdin, then closed.")
    open_stdin: bool = Field(
        False,
        description="Keep stdin open after `stdin` for POST .../commands/PID/stdin "
        "(ended by .../close-stdin).",
    )
    background: bool = Field(
        False,
        description="Keep the command running if this stream's client disconnects "
        "(otherwise it is killed then).",
    )


class ProcessOut(BaseModel):
    pid: int
    cmd: list[str]
    cwd: str
    user: str
    tag: str | None
    stdin: bool = Field(description="Whether its stdin is open for .../stdin.")
    started_at: float = Field(description="Seconds since the epoch (the guest's clock).")


class ProcessList(BaseModel):
    processes: list[ProcessOut]


class SendSignal(_Request):
    signal: int = Field(ge=1, le=64, description="A signal number, e.g. 15 (SIGTERM).")


class ForkSandbox(_Request):
    """``sandbox.fork(n)``'s arguments."""

    n: int = Field(1, description="How many forks (1 to 64).")
    labels: dict[str, str] | None = Field(
        None, description="The forks' labels (null: the parent's)."
    )


class SnapshotOut(BaseModel):
    id: str
    template: str
    created_at: float = Field(description="Unix time.")
    source_sandbox: str | None
    vcpus: int
    memory_mib: int
    network: str = Field(description="The network mode it restores into.")
    size_bytes: int


class SnapshotList(BaseModel):
    snapshots: list[SnapshotOut]


class SignedUrl(BaseModel):
    url: str = Field(description="Absolute; used without the Authorization header.")
    method: Literal["PUT", "GET"] = Field(description="PUT: upload the raw body; GET: download.")
    path: str = Field(description="The guest path it is for (normalized).")
    expires_at: int = Field(description="Unix time after which it is refused.")


class MetricsOut(BaseModel):
    """``SandboxMetrics``: the guest's figures (bytes) and the VMM's host memory."""

    cpu_used_pct: float = Field(
        description="Share of all vCPUs' time spent busy (0-100), over the time since the "
        "previous metrics request when that was 0.1 to 10 s ago, else over 0.1 s."
    )
    cpu_count: int
    mem_used: int = Field(description="MemTotal - MemAvailable of the guest.")
    mem_total: int
    disk_used: int = Field(description="Used space of the guest's root file system.")
    disk_total: int
    vmm_rss: int | None = Field(
        description="The VMM's resident memory on the server's host (null: unknown)."
    )


class SandboxOut(BaseModel):
    id: str
    template: str
    state: str = Field(
        description="starting, running, paused, broken, killed, crashed, error, or (through "
        "a cluster) lost."
    )
    expired: bool = Field(description="Killed because its lifetime ended.")
    crash_reason: str | None
    labels: dict[str, str]
    created_at: float = Field(description="Unix time.")
    expires_at: float | None = Field(description="Unix time its lifetime ends (null: never).")
    vcpus: int
    memory_mib: int
    network: str
    ports: dict[str, str] = Field(
        description="Guest port -> ADDRESS:PORT where the server's host reaches it."
    )
    restored: bool
    provider: str
    pooled: bool = Field(
        False, description="Handed over from the server's warm pool (serve --pool)."
    )
    node: str | None = Field(
        None, description="Through a cluster (serve --ray): the Ray node id it runs on."
    )
    metrics: MetricsOut | None = Field(
        None,
        description="Only in lists asked with ?metrics=true: its resource use (null: not "
        "running, or it did not answer in time).",
    )


class SandboxList(BaseModel):
    sandboxes: list[SandboxOut]


class EntryOut(BaseModel):
    name: str = Field(description="The base name.")
    path: str = Field(description="The absolute path.")
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int = Field(description="The permission bits (0o755 is 493).")
    mtime: float = Field(description="Modified, in seconds since the epoch.")
    permissions: str = Field("", description="The permission bits as text: rwxr-xr-x.")
    owner: str = Field("", description="The owner's name (its uid where it has none).")
    group: str = Field("", description="The group's name (its gid where it has none).")
    modified_time: datetime | None = Field(None, description="mtime, in UTC.")
    symlink_target: str | None = Field(None, description="What a symlink points to.")


class EntryList(BaseModel):
    entries: list[EntryOut]


class Exists(BaseModel):
    exists: bool


class Written(BaseModel):
    path: str
    size: int
    entry: EntryOut | None = Field(None, description="The written file.")


class PathOut(BaseModel):
    path: str


class MadeDir(BaseModel):
    path: str
    created: bool = Field(description="False if the directory was there already.")


class ErrorBody(BaseModel):
    code: str = Field(description="The stable code of the NovaSandbox error.")
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Labels as the server keeps them; ``ConfigError`` for too many, a bad key or a long
    value."""
    if len(labels) > MAX_LABELS:
        raise ConfigError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise ConfigError(
                f"a label key is 1 to 63 letters, digits, '.', '_', '/' or '-', got {key!r}"
            )
        if len(value) > MAX_LABEL_VALUE or "\0" in value:
            raise ConfigError(
                f"label {key!r}: a value is at most {MAX_LABEL_VALUE} characters, without NUL"
            )
    return dict(labels)


def parse_label_filter(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` query values (``?label=team=ml``) as a dict."""
    wanted: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label filters are KEY=VALUE, got {item!r}")
        wanted[key] = value
    return wanted


__all__ = [
    "CreateSandbox",
    "EntryList",
    "EntryOut",
    "ErrorOut",
    "Exists",
    "ForkSandbox",
    "MadeDir",
    "MetricsOut",
    "PathOut",
    "ProcessList",
    "ProcessOut",
    "RunCommand",
    "SandboxList",
    "SandboxOut",
    "SendSignal",
    "SetTimeout",
    "SignedUrl",
    "SnapshotList",
    "SnapshotOut",
    "TerminalSize",
    "Written",
    "check_labels",
    "parse_label_filter",
]
