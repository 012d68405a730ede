"""``GET /metrics`` of a real ``novasandbox serve`` process (in-process provider, no VM):
scraped over real HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from novasandbox.procfs import pids_matching
from novasandbox.records import vmm_marker
from tests.server_support import Server, cli, error_of, iter_wait, make_key, stream_events

INPROCESS = {"NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}
STATES = {"starting", "running", "paused", "killed", "crashed", "broken", "error", "lost"}
SECRET_ENV = "metrics-secret-env-value-5f1c"

Sample = tuple[str, tuple[tuple[str, str], ...]]


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.values: dict[Sample, float] = {}
        for family in self.families.values():
            for s in family.samples:
                self.values[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def label_values(self) -> set[str]:
        return {v for (_, labels) in self.values for _, v in labels}


class Setup:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.files = root / "files"
        self.files.mkdir()
        self.key = make_key(self.state, "metrics")
        listed = cli("keys", "ls", "--json", "--state-dir", str(self.state))
        assert listed.returncode == 0, listed.stderr
        [self.key_id] = [k["id"] for k in json.loads(listed.stdout) if k["name"] == "metrics"]
        env = {**os.environ, **INPROCESS}
        env.pop("NOVASANDBOX_STATE_DIR", None)
        self.server = Server(self.state, env=env)
        self.client = self.server.client(self.key)

    def scrape(self) -> Scrape:
        r = self.client.get("/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        return Scrape(r.text)

    def close(self) -> None:
        self.server.close()
        self.client.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("metrics"))
    try:
        yield s
    finally:
        s.close()


def test_metrics_need_a_key(setup: Setup) -> None:
    url = f"{setup.server.url}/metrics"
    for headers in ({}, {"Authorization": "Bearer nsk_wrong"}, {"Authorization": setup.key}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401, r.text
        assert error_of(r)["code"] == "unauthorized"
        assert "novasandbox_" not in r.text
    after = setup.scrape()
    assert (
        after.get("novasandbox_http_requests_total", method="GET", route="/metrics", status="401")
        >= 3
    )
    assert after.get("novasandbox_errors_total", code="unauthorized") >= 3


def test_the_families_and_their_types(setup: Setup) -> None:
    scrape = setup.scrape()
    types = {name: f.type for name, f in scrape.families.items()}  # no "_created" series
    assert types == {
        "novasandbox_sandboxes": "gauge",
        "novasandbox_sandbox_creates": "counter",
        "novasandbox_sandbox_create_seconds": "histogram",
        "novasandbox_sandbox_creates_in_progress": "gauge",
        "novasandbox_commands": "counter",
        "novasandbox_command_errors": "counter",
        "novasandbox_errors": "counter",
        "novasandbox_http_requests": "counter",
        "novasandbox_pool_size": "gauge",
    }
    # every state, even at 0; no pools yet: the family has no samples
    states = {s.labels["state"] for s in scrape.families["novasandbox_sandboxes"].samples}
    assert states == STATES
    assert scrape.families["novasandbox_pool_size"].samples == []
    buckets = [
        s.labels["le"]
        for s in scrape.families["novasandbox_sandbox_create_seconds"].samples
        if s.name.endswith("_bucket")
    ]
    assert buckets[0] == "0.05" and buckets[-2] == "10.0" and buckets[-1] == "+Inf"


def test_creates_commands_errors_and_states_move_the_metrics(setup: Setup) -> None:
    c = setup.client
    before = setup.scrape()
    assert before.get("novasandbox_sandboxes", state="running") == 0

    sids = []
    for _ in range(2):
        r = c.post("/v1/sandboxes", json={"timeout": 120, "env": {"SECRET": SECRET_ENV}})
        assert r.status_code == 201, r.text
        sids.append(r.json()["id"])
    a, b = sids
    r = c.post("/v1/sandboxes", json={"template": "no-such-template"})
    assert r.status_code == 422 and error_of(r)["code"] == "template-not-found"
    r = c.post("/v1/sandboxes", json={"vcpus": 0})  # a create the library refuses
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"
    r = c.post("/v1/sandboxes", json={"foo": 1})  # refused before any create
    assert r.status_code == 422 and error_of(r)["code"] == "invalid-config"

    path = str(setup.files / "metrics-secret-path.txt")
    r = c.put(f"/v1/sandboxes/{a}/files", params={"path": path}, content=b"x")
    assert r.status_code == 200, r.text
    events = stream_events(c, a, cmd="echo $SECRET", cwd=str(setup.files))
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
    events = stream_events(c, a, cmd="exit 3")  # a failing command is no command error
    assert events[-1]["exit_code"] == 3

    # b crashes (its agent, the in-process provider's "VM", is killed): a command in it
    # is refused, and the state gauge sees it
    [agent] = pids_matching(vmm_marker(b))
    os.kill(agent, signal.SIGKILL)
    for _ in iter_wait("the crash to show"):
        if c.get(f"/v1/sandboxes/{b}").json()["state"] != "running":
            break
    r = c.post(f"/v1/sandboxes/{b}/commands", json={"cmd": "true"})
    assert r.status_code == 409 and error_of(r)["code"] == "sandbox-crashed"

    mid = setup.scrape()

    def moved(name: str, **labels: str) -> float:
        return mid.get(name, **labels) - before.get(name, **labels)

    assert mid.get("novasandbox_sandboxes", state="running") == 1
    assert mid.get("novasandbox_sandboxes", state="crashed") == 1
    assert sum(mid.get("novasandbox_sandboxes", state=s) for s in STATES) == 2
    assert mid.get("novasandbox_sandbox_creates_in_progress") == 0

    assert moved("novasandbox_sandbox_creates_total", outcome="ok") == 2
    assert moved("novasandbox_sandbox_creates_total", outcome="error") == 2
    assert moved("novasandbox_sandbox_create_seconds_count") == 2
    assert moved("novasandbox_sandbox_create_seconds_sum") > 0
    assert moved("novasandbox_sandbox_create_seconds_bucket", le="+Inf") == 2

    assert moved("novasandbox_commands_total") == 2
    assert moved("novasandbox_command_errors_total", code="sandbox-crashed") == 1
    assert (
        sum(
            v - before.values.get(k, 0.0)
            for k, v in mid.values.items()
            if k[0] == "novasandbox_command_errors_total"
        )
        == 1
    )

    assert moved("novasandbox_errors_total", code="template-not-found") == 1
    assert moved("novasandbox_errors_total", code="invalid-config") == 2
    assert moved("novasandbox_errors_total", code="sandbox-crashed") == 1

    requests = "novasandbox_http_requests_total"
    create = "/v1/sandboxes"
    assert moved(requests, method="POST", route=create, status="201") == 2
    assert moved(requests, method="POST", route=create, status="422") == 3
    commands = "/v1/sandboxes/{sandbox_id}/commands"
    assert moved(requests, method="POST", route=commands, status="200") == 2
    assert moved(requests, method="POST", route=commands, status="409") == 1
    files = "/v1/sandboxes/{sandbox_id}/files"
    assert moved(requests, method="PUT", route=files, status="200") == 1
    # the scrape before this one is counted too (once it had answered)
    assert moved(requests, method="GET", route="/metrics", status="200") == 1

    # labels: route templates, not paths; nothing of a key, sandbox, env or file
    spec = c.get("/openapi.json").json()
    routes = {s.labels["route"] for s in mid.families["novasandbox_http_requests"].samples}
    assert routes <= set(spec["paths"]) | {"/metrics", "/healthz", "unmatched"}
    for secret in (setup.key, setup.key_id, a, b, SECRET_ENV, path, str(setup.files)):
        assert secret not in mid.text, secret

    for sid in sids:
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    after = setup.scrape()
    assert sum(after.get("novasandbox_sandboxes", state=s) for s in STATES) == 0


def test_unknown_paths_and_methods_do_not_become_labels(setup: Setup) -> None:
    c = setup.client
    before = setup.scrape()
    assert c.get("/v1/nothing/sb-0123456789").status_code == 404
    assert c.request("BREW", "/v1/sandboxes").status_code == 405
    assert c.get("/v1/sandboxes/sb-0123456789").status_code == 404
    after = setup.scrape()
    requests = "novasandbox_http_requests_total"
    assert (
        after.get(requests, method="GET", route="unmatched", status="404")
        - before.get(requests, method="GET", route="unmatched", status="404")
        == 1
    )
    assert (
        after.get(requests, method="other", route="/v1/sandboxes", status="405")
        - before.get(requests, method="other", route="/v1/sandboxes", status="405")
        == 1
    )
    one = "/v1/sandboxes/{sandbox_id}"
    assert (
        after.get(requests, method="GET", route=one, status="404")
        - before.get(requests, method="GET", route=one, status="404")
        == 1
    )
    assert "sb-0123456789" not in after.text and "BREW" not in after.text
    assert "/v1/nothing" not in after.text


def test_a_command_ended_by_its_sandbox_dying_is_a_command_error(setup: Setup) -> None:
    c = setup.client
    r = c.post("/v1/sandboxes", json={"timeout": 120})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    before = setup.scrape()
    got: list[dict[str, Any]] = []

    def run() -> None:
        stream_events(c, sid, got, cmd="echo go; sleep 600", timeout=None)

    t = threading.Thread(target=run)
    t.start()
    for _ in iter_wait("the command to start"):
        if len(got) >= 2:
            break
    assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    t.join(60)
    assert not t.is_alive()
    assert got[-1]["type"] == "error"
    code = got[-1]["error"]["code"]
    after = setup.scrape()
    name = "novasandbox_command_errors_total"
    assert after.get(name, code=code) - before.get(name, code=code) == 1
    assert after.get("novasandbox_commands_total") - before.get("novasandbox_commands_total") == 1
    # an error event in a stream is no error response
    name = "novasandbox_errors_total"
    assert after.get(name, code=code) == before.get(name, code=code)
