"""The scripts in examples/ run as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script: Path, state_root: Path) -> None:
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip()
    assert_no_leftovers(state_root)


def test_there_are_examples() -> None:
    assert {p.stem for p in EXAMPLES} >= {"basic", "async_many", "files_and_drives"}
