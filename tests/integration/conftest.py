"""Fixtures for integration tests: real QEMU, real guest kernel, real agent.

Every sandbox goes through a ``SandboxFactory`` that kills it at teardown, even when the
test fails, and then checks that those sandboxes left nothing on the host. When a test
fails, the console log of each sandbox it could see is printed (pytest shows it with the
failure) and copied to ``$NOVASANDBOX_TEST_LOGS`` (default /tmp/novasandbox-test-logs).

Leftover checks judge the tests' own sandboxes only, by id (see ``leftovers.py``): other
processes of the host may run sandboxes at the same time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import Sandbox, TemplateManager
from novasandbox.gc import vmm_pids_under
from novasandbox.host import tap

from .helpers import Namespaces
from .leftovers import SandboxIds, check_no_leftovers
from .served import RemoteServer

pytestmark = pytest.mark.integration

LOG_DIR = Path(os.environ.get("NOVASANDBOX_TEST_LOGS", "/tmp/novasandbox-test-logs"))


def qemu_processes_under(root: Path) -> list[int]:
    """PIDs of live QEMU processes whose command line mentions ``root``."""
    return vmm_pids_under(root)


class _Session:
    ids: SandboxIds | None = None
    """The ids of every sandbox made with the session's state directory."""
    test_mark = 0
    """Where the ids of the running test begin."""


def ids_of_this_test() -> list[str]:
    """The ids of the sandboxes made (by any process) with the session's state directory
    since the running test began."""
    assert _Session.ids is not None, "no test session state directory"
    return _Session.ids.since(_Session.test_mark)


def assert_no_leftovers(root: Path, ids: Iterable[str] | None = None) -> None:
    """Nothing of the sandboxes ``ids`` (default: every sandbox the running test made,
    in this process or another) left on the host, and no VMM process and no state entry
    left in the session's state directory ``root`` (private: all of it is the tests')."""
    assert qemu_processes_under(root) == []
    sandboxes = root / "sandboxes"
    leftover = sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else []
    assert leftover == []
    check_no_leftovers(root, ids_of_this_test() if ids is None else ids)


@pytest.fixture(scope="session", autouse=True)
def state_root() -> Iterator[Path]:
    """A short, private state directory (unix socket paths must stay under 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))
    old = os.environ.get("NOVASANDBOX_STATE_DIR")
    os.environ["NOVASANDBOX_STATE_DIR"] = str(root)
    _Session.ids = SandboxIds(root)
    yield root
    if old is None:
        os.environ.pop("NOVASANDBOX_STATE_DIR", None)
    else:
        os.environ["NOVASANDBOX_STATE_DIR"] = old
    leftovers = qemu_processes_under(root)
    made = _Session.ids.all()
    _Session.ids.close()
    _Session.ids = None
    try:
        assert leftovers == [], f"QEMU processes outlived the test session: {leftovers}"
        check_no_leftovers(root, made)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _this_tests_sandboxes(state_root: Path) -> None:
    """Marks where the running test's sandboxes begin (for ``assert_no_leftovers``)."""
    assert _Session.ids is not None
    _Session.test_mark = _Session.ids.mark()


@pytest.fixture(scope="session", autouse=True)
def built_template() -> None:
    if TemplateManager().built("python") is None:
        pytest.fail("the 'python' template is not built: run ./scripts/setup.sh")


class SandboxFactory:
    """Creates sandboxes and kills every one of them at teardown."""

    live: list[SandboxFactory] = []

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sandboxes: list[Any] = []
        self.ids: list[str] = []
        """Every sandbox it made or tracked, also once killed: what teardown judges."""
        SandboxFactory.live.append(self)

    def track(self, sb: Any) -> Any:
        self.sandboxes.append(sb)
        self.ids.append(sb.id)
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
        check_no_leftovers(self.root, self.ids)


@pytest.fixture
def factory(state_root: Path) -> Iterator[SandboxFactory]:
    f = SandboxFactory(state_root)
    yield f
    f.close()


@pytest.fixture(scope="module")
def module_factory(state_root: Path) -> Iterator[SandboxFactory]:
    f = SandboxFactory(state_root)
    yield f
    f.close()


@pytest.fixture(scope="module")
def namespaces() -> Iterator[Namespaces]:
    """Network namespaces made for the module's TAP tests (see ``Namespaces``), with a
    pool of two TAPs in ``inner`` that goes with them."""
    if os.geteuid() != 0:
        pytest.skip("TAP networking needs root")
    spaces = Namespaces()
    old = os.environ.get("NOVASANDBOX_NETNS")
    os.environ["NOVASANDBOX_NETNS"] = spaces.inner
    try:
        with tap.pool(2):
            yield spaces
        assert tap.existing() == []  # the pool went with the block
    finally:
        if old is None:
            os.environ.pop("NOVASANDBOX_NETNS", None)
        else:
            os.environ["NOVASANDBOX_NETNS"] = old
        spaces.close()


@pytest.fixture(scope="module", params=["restored", "cold"])
def sb(request: pytest.FixtureRequest, module_factory: SandboxFactory) -> Sandbox:
    """One sandbox shared by the tests of a module, once restored from the template's
    snapshot (the default) and once booted cold: both must behave the same."""
    sandbox = module_factory.create(env={"SANDBOX_LEVEL": "yes"}, cold=request.param == "cold")
    assert sandbox.restored is (request.param == "restored")
    return sandbox


@pytest.fixture(scope="module")
def remote_server() -> Iterator[RemoteServer]:
    """One ``novasandbox serve`` per test module that needs it (see ``served.py``)."""
    server = RemoteServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", params=["restored", "cold", "remote"])
def sandbox(request: pytest.FixtureRequest, module_factory: SandboxFactory) -> Sandbox:
    """``sb`` in both modes: local (restored, cold) and through a server's remote client
    (``Sandbox.create(server=..., api_key=...)``; the module's server starts only then).
    The behaviour tests of commands and files take it: one source, every mode."""
    if request.param == "remote":
        server: RemoteServer = request.getfixturevalue("remote_server")
        sandbox = server.create(env={"SANDBOX_LEVEL": "yes"})
        assert sandbox.server == server.url
        return sandbox
    sandbox = module_factory.create(env={"SANDBOX_LEVEL": "yes"}, cold=request.param == "cold")
    assert sandbox.restored is (request.param == "restored")
    assert sandbox.server is None
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
