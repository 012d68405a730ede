"""Garbage collection: what ``novasandbox gc`` and ``novasandbox kill`` do, from any
process. It sits above ``sandbox.py``: it acts on the records sandboxes leave, and
releases each through the same path as ``kill`` (``records.release_record``, which
ends in ``host.resources.release``)."""

from __future__ import annotations

from pathlib import Path

from .errors import SandboxNotFound
from .host import egress, tap
from .procfs import pids_matching, process_alive, process_uid
from .records import (
    list_sandboxes,
    read_record,
    release_abandoned,
    release_record,
    remove_state,
    sandboxes_dir,
)
from .snapshots import drop_unused_fork_snapshots


def kill_sandbox(sandbox_id: str, root: Path | None = None, timeout: float = 5.0) -> None:
    """Kill a sandbox by id from any process: SIGKILL its VMM (after checking that the pid
    is still that VMM), release what it held, remove its state directory."""
    directory = sandboxes_dir(root) / sandbox_id
    if not sandbox_id or "/" in sandbox_id or not directory.is_dir():
        raise SandboxNotFound(f"no sandbox with id {sandbox_id!r}")
    info = read_record(directory)
    if info is None:
        remove_state(directory)
        return
    release_record(info, directory, timeout)
    drop_unused_fork_snapshots()


def reap(root: Path | None = None) -> list[str]:
    """Kill and remove what no one will clean up: sandboxes past their lifetime, and
    those whose owner process is gone, with everything they held; and the snapshots of
    forks whose sandboxes are gone. Returns the ids reaped. Safe to run from any process
    at any time; ``create`` does the same for sandboxes (``release_abandoned``)."""
    reaped, _ = release_abandoned(root)
    if reaped:
        drop_unused_fork_snapshots()
    return reaped


def running_vmm_uids() -> set[int]:
    """The uids that running VMM processes (of any state directory) have."""
    return {uid for pid in vmm_pids_under(None) if (uid := process_uid(pid)) is not None}


def sweep_host_resources(root: Path | None = None) -> dict[str, list[str]]:
    """What ``reap`` does not look for on every create: egress policies whose VMM is gone
    and TAP leases whose holder is gone. (Control groups are swept by ``reap``.) A policy
    is kept while a live owner's record names its uid: its VMM may be starting."""
    starting = {i.vmm_uid for i in list_sandboxes(root) if i.owner_alive and i.vmm_uid is not None}
    return {
        "egress_policies": egress.sweep(running_vmm_uids() | starting),
        "taps": tap.sweep(process_alive),
    }


def vmm_pids_under(root: Path | None) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions ``root`` (a state
    directory; None: any): how tests and the soak script check that nothing outlived
    them."""
    needles = [b"qemu-system"] + ([str(root).encode()] if root is not None else [])
    return pids_matching(*needles)
