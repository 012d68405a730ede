"""Templates people make, built for real: from another template, every kind of step
(apt, pip, copy, run) in build VMs, defaults, a start command running in the snapshot,
the step cache, a failing step, a container image with a whiteout, the builder."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import secrets
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import TemplateBuilder, TemplateBuildError, TemplateManager, warmup
from novasandbox.templates.build import LogReporter

from .conftest import SandboxFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="template builds need root")

READY = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'"


def ready_toml(port: int) -> str:
    """``ready_cmd = ...`` for a server on ``port`` (a TOML basic string is JSON's)."""
    return f"ready_cmd = {json.dumps(READY.format(port=port))}"


class Recorder(LogReporter):
    """Keeps what a build reported, to tell cached steps from built ones."""

    def __init__(self) -> None:
        self.done_lines: list[str] = []
        self.lines: list[str] = []

    def done(self, name: str, detail: str) -> None:
        self.done_lines.append(f"{name}: {detail}")

    def output(self, name: str, line: str) -> None:
        self.lines.append(line)


@pytest.fixture(scope="module")
def defs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder of this module's template definitions, on NOVASANDBOX_TEMPLATE_PATH;
    the templates built from it are removed (with their layers) at the end."""
    folder = tmp_path_factory.mktemp("defs")
    (folder / "app").mkdir()
    (folder / "app" / "hello.txt").write_text("hello from app\n")
    (folder / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOVASANDBOX_TEMPLATE_PATH", str(folder))
        yield folder
        manager = TemplateManager()
        for path in sorted(folder.glob("*.toml")):
            try:
                manager.remove(path.stem, force=True)
            except Exception as exc:  # keep removing the others
                print(f"could not remove template {path.stem}: {exc}")


def web_toml(marker: str) -> str:
    return f"""
name = "itest-web"
from = "python"
env = {{ GREETING = "hi" }}
workdir = "/srv/app"
pip = ["six"]
run = ["echo {marker} > /opt/marker"]
start_cmd = "python3 -m http.server 8123 --directory /srv/app"
{ready_toml(8123)}

[image]
packages = ["tree"]

[[files]]
src = "app/"
dest = "/srv/app"
owner = "user"

[[files]]
src = "tool.sh"
dest = "/usr/local/bin/tool"
mode = "0755"
"""


@pytest.fixture(scope="module")
def web(defs: Path) -> dict[str, Any]:
    """``itest-web`` built once for the module (every kind of step)."""
    marker = secrets.token_hex(4)
    (defs / "itest-web.toml").write_text(web_toml(marker))
    manager = TemplateManager()
    rep = Recorder()
    t0 = time.monotonic()
    built = warmup.build(manager, "itest-web", reporter=rep)
    return {
        "marker": marker,
        "built": built,
        "seconds": time.monotonic() - t0,
        "reporter": rep,
    }


def test_every_kind_of_step_is_in_the_sandbox(web: dict[str, Any], factory: SandboxFactory) -> None:
    sb = factory.create("itest-web")
    assert sb.restored
    r = sb.commands.run(
        "pwd; id -un; echo $GREETING; cat /opt/marker; tree --version | head -c 9; echo;"
        " python3 -c 'import six; print(six.__name__)'; tool;"
        " stat -c '%U %a' /srv/app/hello.txt /usr/local/bin/tool; cat /srv/app/hello.txt",
        timeout=60,
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        "/srv/app",  # the template's workdir
        "user",  # the parent's user
        "hi",
        web["marker"],
        "tree v2.1",  # apt
        "six",  # pip
        "tool",  # a copied file with its mode
        "user 644",  # a copied directory's file, with its owner
        "root 755",
        "hello from app",
    ]


def test_the_start_command_is_running_when_create_returns(
    web: dict[str, Any], factory: SandboxFactory
) -> None:
    sb = factory.create("itest-web")
    # at once, no waiting: the server was captured running in the template's snapshot
    r = sb.commands.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8123/"],
        timeout=30,
    )
    assert r.stdout == "200"
    tags = {p.tag for p in sb.commands.list()}
    assert "start_cmd" in tags


def test_a_cold_boot_starts_the_start_command_too(
    web: dict[str, Any], factory: SandboxFactory
) -> None:
    sb = factory.create("itest-web", cold=True)
    assert not sb.restored
    r = sb.commands.run(["curl", "-sf", "http://127.0.0.1:8123/hello.txt"], timeout=30)
    assert r.stdout == "hello from app\n"


def test_building_again_is_a_no_op_and_a_changed_last_step_keeps_the_others(
    web: dict[str, Any], defs: Path, factory: SandboxFactory
) -> None:
    manager = TemplateManager()
    tpl = manager.get("itest-web")
    assert warmup.up_to_date(manager, "itest-web")
    layers = [manager.layer_file(d) for d in tpl.layer_digests]
    before = [p.stat().st_ino for p in layers]
    t0 = time.monotonic()
    warmup.build(manager, "itest-web")
    print(f"cached build: {time.monotonic() - t0:.2f} s (first: {web['seconds']:.0f} s)")
    assert [p.stat().st_ino for p in layers] == before
    # the run step changes: the apt, pip and copy layers are kept, the rest is rebuilt
    marker = secrets.token_hex(4)
    (defs / "itest-web.toml").write_text(web_toml(marker))
    changed = manager.get("itest-web")
    assert changed.layer_digests[:4] == tpl.layer_digests[:4]
    rep = Recorder()
    warmup.build(manager, "itest-web", reporter=rep)
    cached = [line for line in rep.done_lines if "(cached" in line]
    assert [line.split(":")[0] for line in cached] == [f"step {i}/6" for i in range(1, 5)]
    assert [p.stat().st_ino for p in layers[:4]] == before[:4]
    sb = factory.create("itest-web")
    assert sb.commands.run("cat /opt/marker").stdout.strip() == marker


def test_a_failing_step_names_itself_and_leaves_nothing_built(
    defs: Path, factory: SandboxFactory
) -> None:
    (defs / "itest-broken.toml").write_text(
        'name = "itest-broken"\nfrom = "python"\n'
        f'run = ["echo fine {secrets.token_hex(4)}", "echo to-out; echo to-err >&2; exit 7"]\n'
    )
    manager = TemplateManager()
    with pytest.raises(TemplateBuildError) as info:
        warmup.build(manager, "itest-broken")
    err = info.value
    assert err.code == "template-build-failed"
    assert err.step == "run: echo to-out; echo to-err >&2; exit 7"
    assert err.exit_code == 7
    assert "to-out" in err.output and "to-err" in err.output
    assert "exit 7" in err.message and "to-err" in err.message
    tpl = manager.get("itest-broken")
    assert manager.built(tpl) is None
    assert manager.layer_file(tpl.layer_digests[0]).is_file()  # the step that worked
    assert not manager.layer_file(tpl.layer_digests[1]).exists()
    assert not [p for p in manager.layers_dir.iterdir() if p.name.startswith(".")]
    assert not list((manager.cache / "templates").glob("itest-broken/*"))


def test_a_start_command_that_never_gets_ready_fails_the_build(defs: Path) -> None:
    (defs / "itest-notready.toml").write_text(
        'name = "itest-notready"\nfrom = "python"\n'
        f'run = ["echo {secrets.token_hex(4)}"]\n'
        'start_cmd = "sleep 600"\nready_cmd = "echo not yet; false"\nready_timeout = 3\n'
    )
    with pytest.raises(TemplateBuildError) as info:
        warmup.build(TemplateManager(), "itest-notready")
    assert info.value.step == "ready_cmd"
    assert "not yet" in info.value.message
    assert TemplateManager().built("itest-notready") is not None  # the image is fine
    assert not warmup.up_to_date(TemplateManager(), "itest-notready")  # no snapshot


def test_the_builder_builds_and_rm_takes_its_layers(factory: SandboxFactory) -> None:
    manager = TemplateManager()
    name = "itest-builder"
    marker = secrets.token_hex(4)
    built = (
        TemplateBuilder(name)
        .from_template("python")
        .run_cmd(f"echo {marker} > /opt/from-builder")
        .set_envs({"BUILT_BY": "builder"})
        .build()
    )
    tpl = manager.get(name)
    assert tpl.source == manager.definitions_dir / f"{name}.toml"
    assert built.rootfs == manager.image_file(tpl)
    sb = factory.create(name)
    r = sb.commands.run("cat /opt/from-builder; echo $BUILT_BY")
    assert r.stdout.split() == [marker, "builder"]
    layers = [manager.layer_file(d).parent for d in tpl.layer_digests]
    assert all(p.is_dir() for p in layers)
    sb.kill()
    assert manager.remove(name)
    assert not any(p.exists() for p in layers)
    assert not (manager.definitions_dir / f"{name}.toml").exists()
    assert manager.built("python") is not None  # the parent stays


# ----------------------------------------------------------------------- container images


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def docker_save(dest: Path, base: Path, extra: bytes, config: dict[str, Any]) -> None:
    """A ``docker save`` archive: ``base`` (a root file system's tar) as the first layer,
    ``extra`` (a tar) gzip-compressed as the second, and the image config."""
    layers = []
    diff_ids = []
    for blob, raw in ((base.read_bytes(), None), (gzip.compress(extra, 1), extra)):
        diff = hashlib.sha256(raw if raw is not None else blob).hexdigest()
        diff_ids.append(f"sha256:{diff}")
        layers.append((f"{hashlib.sha256(blob).hexdigest()}/layer.tar", blob))
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg_bytes = json.dumps(cfg).encode()
    cfg_name = f"{hashlib.sha256(cfg_bytes).hexdigest()}.json"
    manifest = [{"Config": cfg_name, "RepoTags": ["itest/oci:1"], "Layers": [n for n, _ in layers]}]
    entries = [_file(cfg_name, cfg_bytes), _file("manifest.json", json.dumps(manifest).encode())]
    entries += [_file(name, blob) for name, blob in layers]
    dest.write_bytes(_tar_bytes(entries))


def test_a_template_from_a_container_image(defs: Path, factory: SandboxFactory) -> None:
    manager = TemplateManager()
    base = manager.base_path(manager.get("python"))  # a Debian root with python3
    assert base.is_file()
    marker = secrets.token_hex(4)
    whiteout = tarfile.TarInfo("usr/bin/.wh.curl")  # deletes curl from the first layer
    extra = _tar_bytes(
        [
            _file("srv/oci/index.html", f"from the image {marker}\n".encode()),
            (whiteout, b""),
        ]
    )
    archive = defs / "image.tar"
    docker_save(
        archive,
        base,
        extra,
        {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "FROM_IMAGE=yes"],
            "WorkingDir": "/srv/oci",
            "User": "user",
            "Cmd": ["python3", "-m", "http.server", "8124"],
        },
    )
    (defs / "itest-oci.toml").write_text(
        f'name = "itest-oci"\nfrom_oci = "image.tar"\n{ready_toml(8124)}\n'
    )
    tpl = manager.get("itest-oci")
    assert tpl.start_cmd == "python3 -m http.server 8124"
    assert (tpl.user, tpl.workdir, tpl.env["FROM_IMAGE"]) == ("user", "/srv/oci", "yes")
    warmup.build(manager, "itest-oci")
    sb = factory.create("itest-oci")
    r = sb.commands.run(
        "pwd; id -un; echo $FROM_IMAGE; test -e /usr/bin/curl && echo curl || echo no-curl;"
        " python3 -c 'import urllib.request as u;"
        ' print(u.urlopen("http://127.0.0.1:8124/index.html").read().decode(), end="")\'',
        timeout=60,
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [
        "/srv/oci",
        "user",
        "yes",
        "no-curl",
        f"from the image {marker}",
    ]


def test_the_cli_streams_a_build_and_lists_it(web: dict[str, Any], defs: Path) -> None:
    import subprocess
    import sys

    cli = [sys.executable, "-m", "novasandbox.cli"]
    marker = secrets.token_hex(4)
    (defs / "itest-cli.toml").write_text(
        'name = "itest-cli"\nfrom = "python"\n'
        f'run = ["echo streamed-{marker}; echo to-stderr-{marker} >&2"]\n'
    )
    done = subprocess.run(
        [*cli, "template", "build", "itest-cli"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert f"streamed-{marker}" in done.stderr and f"to-stderr-{marker}" in done.stderr
    assert "step 1/2" in done.stderr and "itest-cli: built in" in done.stdout
    again = subprocess.run(
        [*cli, "template", "build", "itest-cli"], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "up to date" in again.stdout
    listed = subprocess.run(
        [*cli, "template", "list", "--json"], capture_output=True, text=True, timeout=60
    )
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    row = rows["itest-web"]
    assert row["built"] and row["parent"] == "python" and row["steps"] == 5
    assert row["size_bytes"] > 1_000_000 and row["built_at"] > 0
    assert rows["python"]["parent"] is None and rows["python"]["size_bytes"] > 100_000_000
    # the parent of built templates is not removed by accident
    refused = subprocess.run(
        [*cli, "template", "rm", "python"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "itest-web" in refused.stderr
    assert TemplateManager().built("python") is not None
    removed = subprocess.run(
        [*cli, "template", "rm", "itest-cli"], capture_output=True, text=True, timeout=60
    )
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert TemplateManager().built("itest-cli") is None


def test_rebuilding_a_parent_without_the_cache_unbuilds_its_children(
    defs: Path, factory: SandboxFactory
) -> None:
    """``--no-cache`` makes a template's image again in place: a template built over it
    would be layered on other bytes, so it must be built again, not used."""
    marker = secrets.token_hex(4)
    (defs / "itest-base.toml").write_text(
        f'name = "itest-base"\nfrom = "python"\nrun = ["echo {marker} > /opt/base"]\n'
    )
    (defs / "itest-child.toml").write_text(
        'name = "itest-child"\nfrom = "itest-base"\nrun = ["cat /opt/base > /opt/child"]\n'
    )
    manager = TemplateManager()
    warmup.build(manager, "itest-child")  # builds its parent first
    assert manager.built("itest-base") is not None
    assert manager.dependents("itest-base") == ["itest-child"]
    rep = Recorder()
    warmup.build(manager, "itest-base", force=True, reporter=rep)
    assert any(line.startswith("itest-child: no longer built") for line in rep.done_lines)
    assert manager.built("itest-child") is None
    assert (defs / "itest-child.toml").is_file()  # its definition stays
    warmup.build(manager, "itest-child")
    sb = factory.create("itest-child")
    assert sb.commands.run("cat /opt/child").stdout.strip() == marker
