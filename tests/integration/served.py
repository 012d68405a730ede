"""A ``novasandbox serve`` subprocess for the tests that run through the remote client:
one per test module (the ``remote_server`` fixture), with a private short state
directory, two keys made by the real CLI, and the sandboxes made through it killed at
teardown; then nothing of them may be left (no QEMU process, no state, no host resource,
judged by the ids of every sandbox made under its state directory)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from novasandbox import Sandbox
from novasandbox.gc import kill_sandbox, vmm_pids_under
from novasandbox.records import list_sandboxes, sandboxes_dir
from tests.server_support import Server, make_key

from .leftovers import SandboxIds, check_no_leftovers


class RemoteServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        self.sandboxes: list[Sandbox] = []
        try:
            self.key = make_key(self.root, "tests")
            self.other_key = make_key(self.root, "other")
            self.server = Server(self.root, log=Path(f"{self.root}.log"))
        except BaseException:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.url = self.server.url

    def create(self, template: str = "python", **kwargs: Any) -> Sandbox:
        """A sandbox on this server through ``Sandbox.create(server=..., api_key=...)``,
        killed at teardown."""
        sb = Sandbox.create(template, server=self.url, api_key=self.key, **kwargs)
        self.sandboxes.append(sb)
        return sb

    def close(self) -> None:
        try:
            errors = []
            for sb in self.sandboxes:
                try:
                    sb.kill()
                except Exception as exc:  # keep killing the others
                    errors.append(exc)
            self.server.close()
            left = vmm_pids_under(self.root)
            for info in list_sandboxes(self.root):  # what a failed stop left: clean, then fail
                kill_sandbox(info.id, self.root)
            assert not errors, errors
            assert left == [], f"QEMU processes outlived the server: {left}"
            base = sandboxes_dir(self.root)
            assert not base.is_dir() or list(base.iterdir()) == []
            check_no_leftovers(self.root, self.ids.all())
        finally:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            Path(f"{self.root}.log").unlink(missing_ok=True)
