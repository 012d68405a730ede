"""Fixtures for integration tests: real QEMU, real guest kernel, real agent.

Every sandbox goes through a ``SandboxFactory`` that kills it at teardown, even when the
test fails. When a test fails, the console log of each sandbox it could see is printed
(pytest shows it with the failure) and copied to ``$NOVASANDBOX_TEST_LOGS``
(default /tmp/novasandbox-test-logs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import Sandbox, TemplateManager
from novasandbox.gc import vmm_pids_under
from novasandbox.host import cgroups

pytestmark = pytest.mark.integration

LOG_DIR = Path(os.environ.get("NOVASANDBOX_TEST_LOGS", "/tmp/novasandbox-test-logs"))


def qemu_processes_under(root: Path) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions ``root``."""
    return vmm_pids_under(root)


def assert_no_leftovers(root: Path) -> None:
    """No VMM process, no state entry and no control group left behind."""
    assert qemu_processes_under(root) == []
    sandboxes = root / "sandboxes"
    leftover = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else []
    assert leftover == []
    assert cgroups.empty_groups() == []


@pytest.fixture(scope="session", autouse=True)
def state_root() -> Iterator[Path]:
    """A short, private state directory (unix socket paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))
    old = os.environ.get("NOVASANDBOX_STATE_DIR")
    os.environ["NOVASANDBOX_STATE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("NOVASANDBOX_STATE_DIR", None)
    else:
        os.environ["NOVASANDBOX_STATE_DIR"] = old
    leftovers = qemu_processes_under(root)
    shutil.rmtree(root, ignore_errors=True)
    assert leftovers == [], f"QEMU processes outlived the test session: {leftovers}"
    assert cgroups.empty_groups() == [], "control groups outlived their VMMs"


@pytest.fixture(scope="session", autouse=True)
def built_template() -> None:
    if TemplateManager().built("python") is None:
        pytest.fail("the 'python' template is not built: run ./scripts/setup.sh")


class SandboxFactory:
    """Creates sandboxes and kills every one of them at teardown."""

    live: list[SandboxFactory] = []

    def __init__(self) -> None:
        self.sandboxes: list[Any] = []
        SandboxFactory.live.append(self)

    def track(self, sb: Any) -> Any:
        self.sandboxes.append(sb)
        return sb

    def create(self, template: str = "python", **kwargs: Any) -> Sandbox:
        return self.track(Sandbox.create(template, **kwargs))

    def console_logs(self) -> dict[str, str]:
        return {sb.id: sb.console_tail(200) for sb in self.sandboxes}

    def close(self) -> None:
        SandboxFactory.live.remove(self)
        errors = []
        for sb in self.sandboxes:
            try:
                sb.kill()
            except Exception as exc:  # keep killing the others
                errors.append(exc)
        self.sandboxes.clear()
        assert not errors, errors


@pytest.fixture
def factory() -> Iterator[SandboxFactory]:
    f = SandboxFactory()
    yield f
    f.close()


@pytest.fixture(scope="module")
def module_factory() -> Iterator[SandboxFactory]:
    f = SandboxFactory()
    yield f
    f.close()


@pytest.fixture(scope="module", params=["restored", "cold"])
def sb(request: pytest.FixtureRequest, module_factory: SandboxFactory) -> Sandbox:
    """One sandbox shared by the tests of a module, once restored from the template's
    snapshot (the default) and once booted cold: both must behave the same."""
    sandbox = module_factory.create(env={"SANDBOX_LEVEL": "yes"}, cold=request.param == "cold")
    assert sandbox.restored is (request.param == "restored")
    return sandbox


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        dest = LOG_DIR / item.name
        for factory in SandboxFactory.live:
            for sandbox_id, text in factory.console_logs().items():
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{sandbox_id}.console.log").write_text(text)
                report.sections.append((f"console of {sandbox_id}", text or "(empty)"))
