"""The tests' leftover checks judge the tests' own sandboxes, by id: another process of
the host that runs sandboxes at the same time (with a state directory of its own) does
not make them fail, and a resource that one of the tests' own sandboxes leaks still
does."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from novasandbox.host import cgroups, egress
from novasandbox.records import new_sandbox_id

from .conftest import SandboxFactory, assert_no_leftovers, ids_of_this_test
from .leftovers import check_no_leftovers, leftovers_of

CLI = [sys.executable, "-m", "novasandbox.cli"]

OTHER = """
import time
from novasandbox import Sandbox
sb = Sandbox.create(network="nat", allow=["127.0.0.1:1"])
print(sb.id, flush=True)
time.sleep(600)
"""


def test_checks_ignore_another_process_and_catch_a_leak_of_our_own(state_root: Path) -> None:
    layout = cgroups.detect()
    if layout is None:
        pytest.skip("this host gives VMMs no control groups (root and cgroup v1 or v2 needed)")
    limits = cgroups.limits_for(1, 256)
    other_root = Path(tempfile.mkdtemp(prefix="ns-other-", dir="/tmp"))
    other_env = {**os.environ, "NOVASANDBOX_STATE_DIR": str(other_root)}
    other = subprocess.Popen(
        [sys.executable, "-c", OTHER], env=other_env, stdout=subprocess.PIPE, text=True
    )
    # another create of that process, caught between making its VMM's group and the VMM
    # joining it: an empty group (what failed the old checks, which looked at every group)
    foreign = cgroups.VMMGroup.create(layout, new_sandbox_id(), limits)
    factory = SandboxFactory(state_root)
    closed = False
    other_id = ""
    try:
        assert other.stdout is not None
        other_id = other.stdout.readline().strip()
        assert other_id.startswith("sb-"), "the other process made no sandbox"
        assert cgroups.groups_of([other_id]) != []
        if os.geteuid() == 0:
            assert egress.chain_name(other_id) in egress.installed()
        assert any(d.endswith("/" + foreign.name) for d in cgroups.empty_groups())

        # this test's own sandboxes: one from the CLI (another process), one from here
        done = subprocess.run([*CLI, "run", "--", "true"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        own = factory.create(network="nat", allow=[])
        made = ids_of_this_test()
        assert len(made) == 2 and made[1] == own.id and other_id not in made
        own.kill()
        assert_no_leftovers(state_root)  # beside the other's live sandbox and empty group
        check_no_leftovers(state_root, made)

        # one of our own sandboxes leaks its control group: every check says so
        leaked = cgroups.VMMGroup.create(layout, own.id, limits)
        try:
            with pytest.raises(AssertionError, match=f"control group .*{own.id}"):
                assert_no_leftovers(state_root)
            with pytest.raises(AssertionError, match=own.id):
                check_no_leftovers(state_root, [own.id])
            closed = True
            with pytest.raises(AssertionError, match=own.id):
                factory.close()  # a factory's teardown judges the ids it made
        finally:
            leaked.remove()
        assert_no_leftovers(state_root)
        assert cgroups.groups_of([other_id]) != []  # the other's sandbox was left alone
    finally:
        if not closed:
            with contextlib.suppress(AssertionError):
                factory.close()
        foreign.remove()
        other.kill()
        other.wait()
        # its owner is gone: gc with its state directory reaps the other's sandbox
        subprocess.run([*CLI, "gc"], env=other_env, capture_output=True)
        others_left = leftovers_of(other_root, [other_id] if other_id.startswith("sb-") else [])
        shutil.rmtree(other_root, ignore_errors=True)
    assert others_left == []
