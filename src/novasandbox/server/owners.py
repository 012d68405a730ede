"""What a server remembers across restarts: whose each sandbox and snapshot is.

One small JSON file per sandbox (``<state dir>/server/sandboxes/<id>.json``: the owning
key's public id, the labels, when it was made; or, for a warm pool's sandbox not handed
over yet, ``pooled``) and per snapshot
(``<state dir>/server/snapshots/<id>.json``: the owner, when, from which sandbox), each
mode 0600 in 0700 directories, written beside its place and renamed into it (a crash
leaves the old file or the new one, never half of one). The sandboxes themselves are
the library's (``records.py``, created ``adoptable``); these files only say which of
them this server owns and for whom, so a restarted server adopts exactly its own and
nothing of another state directory or another program.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""What a sandbox or snapshot id looks like (a file name; anything else is skipped)."""


@dataclass(frozen=True, slots=True)
class SandboxRecord:
    id: str
    owner: str
    labels: dict[str, str]
    created_at: float
    pooled: bool = False
    """Made by a warm pool and not handed over yet (no key's: ``owner`` is empty). A
    start after a crash reaps it; the hand-over rewrites the record with its owner."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "labels": self.labels,
            "created_at": self.created_at,
            "pooled": self.pooled,
        }


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    id: str
    owner: str
    created_at: float
    source_sandbox: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "created_at": self.created_at,
            "source_sandbox": self.source_sandbox,
        }


def write_private(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON in ``path`` (mode 0600), replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class OwnerStore:
    """The ownership files of the state directory ``state``."""

    def __init__(self, state: Path) -> None:
        self.root = state / "server"
        self.sandboxes_dir = self.root / "sandboxes"
        self.snapshots_dir = self.root / "snapshots"

    # --- sandboxes

    def save_sandbox(self, record: SandboxRecord) -> None:
        write_private(self.sandboxes_dir / f"{record.id}.json", record.to_json())

    def forget_sandbox(self, sandbox_id: str) -> None:
        if ID_RE.fullmatch(sandbox_id):
            with contextlib.suppress(FileNotFoundError):
                (self.sandboxes_dir / f"{sandbox_id}.json").unlink()

    def sandboxes(self) -> tuple[list[SandboxRecord], list[str]]:
        """The sandboxes this server owned when it stopped, and the names of the files
        that could not be read (damaged: removed)."""
        found: list[SandboxRecord] = []
        damaged: list[str] = []
        if not self.sandboxes_dir.is_dir():
            return found, damaged
        for path in sorted(self.sandboxes_dir.glob("*.json")):
            data = _read_json(path)
            try:
                if data is None:
                    raise ValueError("not a JSON object")
                labels = data.get("labels") or {}
                if not isinstance(labels, dict):
                    raise ValueError("labels are not an object")
                record = SandboxRecord(
                    id=str(data["id"]),
                    owner=str(data["owner"]),
                    labels={str(k): str(v) for k, v in labels.items()},
                    created_at=float(data["created_at"]),
                    pooled=data.get("pooled", False) is True,
                )
                if not ID_RE.fullmatch(record.id) or path.stem != record.id:
                    raise ValueError("not the file of its id")
            except (KeyError, TypeError, ValueError):
                damaged.append(path.name)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            found.append(record)
        return found, damaged

    # --- snapshots

    def save_snapshot(self, record: SnapshotRecord) -> None:
        write_private(self.snapshots_dir / f"{record.id}.json", record.to_json())

    def forget_snapshot(self, snapshot_id: str) -> None:
        if ID_RE.fullmatch(snapshot_id):
            with contextlib.suppress(FileNotFoundError):
                (self.snapshots_dir / f"{snapshot_id}.json").unlink()

    def snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        if not ID_RE.fullmatch(snapshot_id):
            return None
        data = _read_json(self.snapshots_dir / f"{snapshot_id}.json")
        if data is None:
            return None
        try:
            source = data.get("source_sandbox")
            return SnapshotRecord(
                id=snapshot_id,
                owner=str(data["owner"]),
                created_at=float(data["created_at"]),
                source_sandbox=None if source is None else str(source),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def snapshots(self) -> list[SnapshotRecord]:
        if not self.snapshots_dir.is_dir():
            return []
        found = [self.snapshot(p.stem) for p in self.snapshots_dir.glob("*.json")]
        return sorted((r for r in found if r is not None), key=lambda r: r.created_at)


__all__ = ["OwnerStore", "SandboxRecord", "SnapshotRecord", "write_private"]
