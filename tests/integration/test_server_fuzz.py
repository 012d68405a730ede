"""Property-based fuzzing of the HTTP API from its own OpenAPI description (schemathesis),
against a real ``novasandbox serve`` on real VMs, on loopback only.

Every operation of ``/openapi.json`` gets ``EXAMPLES`` generated requests, valid and
invalid ones (schemathesis's positive and negative modes), sent with a valid key to a
live sandbox: the path's ``sandbox_id`` is the one sandbox this module keeps running (made
again whenever a request killed it, let its lifetime run out or paused it). Each answer
must not be a 500 and must match the description: a declared status, its declared
content type and, for JSON, its declared schema (errors the one ``ErrorOut`` shape).

Bounds, so the fuzzing stays real and finite: the server admits ``MAX_SANDBOXES`` at once
(creates beyond are refused by admission, a declared 503), a sandbox a create made is
killed at once, a generated command runs at most ``COMMAND_SECONDS``, and every request
has a timeout (a hang fails the test).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from novasandbox.gc import kill_sandbox
from novasandbox.records import list_sandboxes
from tests.server_support import Server, make_key

from .conftest import qemu_processes_under
from .leftovers import SandboxIds, check_no_leftovers

pytestmark = pytest.mark.integration

EXAMPLES = 30
"""Generated requests per operation."""
MAX_SANDBOXES = 3
COMMAND_SECONDS = 10.0
REQUEST_TIMEOUT = 60.0


def no_internal_error(ctx: Any, response: Any, case: Any) -> bool:
    """No 500: the server's answer to anything is a typed error (a 502, 503, 504 or 507
    is one, e.g. ``agent-timeout`` for a transfer given 5e-324 seconds; the schema checks
    hold it to the error shape)."""
    assert response.status_code != 500, f"500: {response.text[:500]}"
    return True


CHECKS = [
    no_internal_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class Fuzzed:
    """The server under fuzzing, its key and its one kept sandbox."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsf-", dir="/tmp"))
        self.ids = SandboxIds(self.root)
        self.key = make_key(self.root, "fuzz")
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.server = Server(
            self.root, "--max-sandboxes", str(MAX_SANDBOXES), log=Path(f"{self.root}.log")
        )
        self.client = self.server.client(self.key, timeout=REQUEST_TIMEOUT)
        self.sandbox = ""
        self.statuses: Counter[tuple[str, int]] = Counter()
        """(operation, status) of every answer to a generated request."""

    def live_id(self) -> str:
        """The kept sandbox's id, running (resumed, or made again if it ended)."""
        if self.sandbox:
            r = self.client.get(f"/v1/sandboxes/{self.sandbox}")
            state = r.json()["state"] if r.status_code == 200 else "gone"
            if state == "running":
                return self.sandbox
            if state == "paused":
                r = self.client.post(f"/v1/sandboxes/{self.sandbox}/resume")
                if r.status_code == 200:
                    return self.sandbox
            self.client.delete(f"/v1/sandboxes/{self.sandbox}")
        for s in self.client.get("/v1/sandboxes").json()["sandboxes"]:
            self.client.delete(f"/v1/sandboxes/{s['id']}")  # room for the kept one
        r = self.client.post("/v1/sandboxes", json={"timeout": 600})
        assert r.status_code == 201, r.text
        self.sandbox = r.json()["id"]
        return self.sandbox

    def close(self) -> None:
        try:
            self.client.close()
            self.server.close()
            left = qemu_processes_under(self.root)
            for info in list_sandboxes(self.root):
                kill_sandbox(info.id, self.root)
            assert left == [], f"QEMU processes outlived the server: {left}"
            check_no_leftovers(self.root, self.ids.all())
        finally:
            self.ids.close()
            shutil.rmtree(self.root, ignore_errors=True)
            Path(f"{self.root}.log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Fuzzed]:
    f = Fuzzed()
    try:
        yield f
    finally:
        log = f.server.log()
        f.close()
    assert '"internal error"' not in log


def load_schema(fuzzed: Fuzzed) -> Any:
    return schemathesis.openapi.from_url(
        f"{fuzzed.server.url}/openapi.json",
        headers=fuzzed.headers,
        timeout=REQUEST_TIMEOUT,
    )


def bound(case: Any, fuzzed: Fuzzed) -> None:
    """The generated request, pointed at the kept sandbox and bounded in time."""
    if "sandbox_id" in (case.path_parameters or {}):
        case.path_parameters["sandbox_id"] = fuzzed.live_id()
    if case.path.endswith("/files/watch"):  # a stream until the client leaves: bounded
        case.query = {**(case.query or {}), "timeout": COMMAND_SECONDS}
    if case.path.endswith("/commands") and isinstance(case.body, dict):
        timeout = case.body.get("timeout", COMMAND_SECONDS)
        if timeout is None or (isinstance(timeout, int | float) and timeout > COMMAND_SECONDS):
            case.body["timeout"] = COMMAND_SECONDS


def exercise(case: Any, fuzzed: Fuzzed) -> None:
    """Send one generated request and check its answer against the description."""
    bound(case, fuzzed)
    response = case.call(headers=fuzzed.headers, timeout=REQUEST_TIMEOUT)
    fuzzed.statuses[(case.operation.label, response.status_code)] += 1
    try:
        case.validate_response(response, checks=CHECKS, headers=fuzzed.headers)
    finally:
        if response.status_code == 201:
            release(response.json(), fuzzed)


def release(made: Any, fuzzed: Fuzzed) -> None:
    """Kill what a generated request made: a sandbox (create, restore), forks, a
    snapshot."""
    if not isinstance(made, dict):
        return
    for sb in made.get("sandboxes", [made]):
        if str(sb.get("id", "")).startswith("sb-") and sb["id"] != fuzzed.sandbox:
            assert fuzzed.client.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
    if str(made.get("id", "")).startswith("snap-"):
        assert fuzzed.client.delete(f"/v1/snapshots/{made['id']}").status_code == 204


def fuzz_operation(operation: Any, fuzzed: Fuzzed) -> None:
    strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
    with contextlib.suppress(Exception):  # an operation with nothing to make invalid
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

    @given(case=st.one_of(*strategies))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        exercise(case, fuzzed)

    run()


def test_the_api_answers_every_generated_request_as_it_describes(fuzzed: Fuzzed) -> None:
    operations = [result.ok() for result in load_schema(fuzzed).get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures = []
    for operation in operations:
        try:
            fuzz_operation(operation, fuzzed)
        except Exception as exc:  # every operation is fuzzed; the failures come together
            failures.append(f"{operation.label}: {type(exc).__name__}: {exc}")
    for (label, status), n in sorted(fuzzed.statuses.items()):
        print(f"{label:50} {status} x{n}")
    assert failures == [], "\n\n".join(failures)
    # generated requests got through to the sandboxes, not only refused before
    answered = {label for (label, status), _ in fuzzed.statuses.items() if status < 300}
    assert answered >= {
        "POST /v1/sandboxes",
        "GET /v1/sandboxes",
        "POST /v1/sandboxes/{sandbox_id}/commands",
        "PUT /v1/sandboxes/{sandbox_id}/files",
        "POST /v1/sandboxes/{sandbox_id}/files/mkdir",
        "PUT /v1/sandboxes/{sandbox_id}/timeout",
    }, sorted(answered)


def test_nothing_was_left_but_the_kept_sandbox(fuzzed: Fuzzed) -> None:
    listed = [s["id"] for s in fuzzed.client.get("/v1/sandboxes").json()["sandboxes"]]
    assert set(listed) <= {fuzzed.sandbox}
    assert fuzzed.client.get("/v1/snapshots").json()["snapshots"] == []
    assert isinstance(httpx.get(f"{fuzzed.server.url}/healthz").json(), dict)
