"""Template definitions with roots, steps and defaults: parsing, strictness, the builder,
digests per layer (nothing is built here; tests/integration/test_template_layers.py
builds)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from novasandbox import TemplateBuilder, TemplateError
from novasandbox.layers import copy_archive
from novasandbox.templates import Step, TemplateManager
from novasandbox.templates.definition import dumps_toml

WEB = """
name = "web"
from = "python"
env = { GREETING = "hi" }
workdir = "/home/user"
pip = ["six", "requests>=2"]
run = ["echo built > /opt/built", "echo second"]
start_cmd = "python3 -m http.server 8000 --directory /tmp"
ready_cmd = "python3 -c 'import socket; socket.create_connection((\\"127.0.0.1\\", 8000))'"

[image]
packages = ["curl"]

[[files]]
src = "app/"
dest = "/srv/app"
mode = "0755"
owner = "user"
"""


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "defs"
    (d / "app").mkdir(parents=True)
    (d / "app" / "hello.txt").write_text("hello\n")
    (d / "web.toml").write_text(WEB)
    return d


@pytest.fixture
def manager(tmp_path: Path, user_dir: Path) -> TemplateManager:
    return TemplateManager(cache=tmp_path / "cache", template_dirs=[user_dir])


def test_a_template_from_another_has_its_steps_in_order_and_inherits(
    manager: TemplateManager, user_dir: Path
) -> None:
    tpl = manager.get("web")
    python = manager.get("python")
    assert tpl.parent == python and tpl.layered and tpl.root_kind == "template"
    assert [s.kind for s in tpl.steps] == ["apt", "pip", "copy", "run", "run"]
    assert tpl.steps[0].args == ("curl",)
    assert tpl.steps[1].args == ("six", "requests>=2")
    copy = tpl.steps[2]
    assert (copy.src, copy.dest, copy.mode, copy.owner) == (
        user_dir / "app",
        "/srv/app",
        0o755,
        "user",
    )
    assert tpl.env["GREETING"] == "hi" and tpl.env["PATH"] == python.env["PATH"]
    assert tpl.user == "user" and tpl.workdir == "/home/user"
    assert (tpl.vcpus, tpl.memory_mib, tpl.disk_size_mib) == (1, 256, python.disk_size_mib)
    assert tpl.kernel_digest == python.kernel_digest
    assert tpl.root_digest == python.image_digest
    assert len(tpl.layer_digests) == len(tpl.steps) + 1
    assert tpl.image_digest == tpl.layer_digests[-1]
    assert manager.image_file(tpl) == manager.layer_file(tpl.image_digest)
    chain = manager.disk_chain(tpl)
    assert chain[0] == manager.image_file(python) and chain[-1] == manager.image_file(tpl)


def test_a_plain_template_is_one_image_as_before(manager: TemplateManager) -> None:
    python = manager.get("python")
    assert not python.layered and python.layer_digests == ()
    assert manager.image_file(python) == manager.image_dir(python) / "rootfs.ext4"


def change(user_dir: Path, old: str, new: str) -> None:
    path = user_dir / "web.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_changing_a_late_step_keeps_the_digests_of_the_earlier_layers(
    manager: TemplateManager, user_dir: Path
) -> None:
    before = manager.get("web").layer_digests
    change(user_dir, '"echo second"', '"echo changed"')
    after = manager.get("web").layer_digests
    assert after[:4] == before[:4]
    assert after[4] != before[4] and after[5] != before[5]


def test_the_defaults_are_the_last_layer_only(manager: TemplateManager, user_dir: Path) -> None:
    before = manager.get("web").layer_digests
    change(user_dir, 'GREETING = "hi"', 'GREETING = "hello"')
    after = manager.get("web").layer_digests
    assert after[:-1] == before[:-1] and after[-1] != before[-1]


def test_a_copied_file_changes_its_layer_by_content_not_by_time(
    manager: TemplateManager, user_dir: Path
) -> None:
    before = manager.get("web").layer_digests
    hello = user_dir / "app" / "hello.txt"
    hello.write_text("hello\n")  # the same bytes again
    assert manager.get("web").layer_digests == before
    hello.write_text("changed\n")
    after = manager.get("web").layer_digests
    assert after[:2] == before[:2] and after[2] != before[2]
    hello.chmod(0o700)
    assert manager.get("web").layer_digests[2] != after[2]


def test_the_parent_changing_changes_every_layer(manager: TemplateManager, user_dir: Path) -> None:
    before = manager.get("web").layer_digests
    (user_dir / "python.toml").write_text(
        (Path(manager.template_dirs[0]) / "python.toml").read_text().replace('"git", ', "")
    )
    after = manager.get("web").layer_digests
    assert not set(before) & set(after)


def test_steps_in_any_order_with_a_steps_array(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "ordered.toml").write_text(
        'name = "ordered"\nfrom = "python"\n'
        '[[steps]]\nrun = "echo one"\n'
        '[[steps]]\npip = ["six"]\n'
        '[[steps]]\ncopy = "app"\ndest = "/srv/app"\n'
        '[[steps]]\napt = ["curl"]\n'
    )
    tpl = manager.get("ordered")
    assert [s.kind for s in tpl.steps] == ["run", "pip", "copy", "apt"]


def test_the_short_form_and_the_steps_array_give_the_same_digests(
    manager: TemplateManager, user_dir: Path
) -> None:
    (user_dir / "a.toml").write_text(
        'name = "a"\nfrom = "python"\npip = ["six"]\nrun = ["echo x"]\n'
        '[[files]]\nsrc = "app"\ndest = "/srv"\n'
    )
    (user_dir / "b.toml").write_text(
        'name = "b"\nfrom = "python"\n[[steps]]\npip = ["six"]\n'
        '[[steps]]\ncopy = "app"\ndest = "/srv"\n[[steps]]\nrun = "echo x"\n'
    )
    assert manager.get("a").layer_digests == manager.get("b").layer_digests


def test_the_builder_makes_the_same_definition_as_the_file(
    manager: TemplateManager, user_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(user_dir)
    file_tpl = manager.get("web")
    built = (
        TemplateBuilder("web", templates=manager)
        .from_template("python")
        .apt_install(["curl"])
        .pip_install(["six", "requests>=2"])
        .copy("app/", "/srv/app", mode=0o755, owner="user")
        .run_cmd(["echo built > /opt/built", "echo second"])
        .set_envs({"GREETING": "hi"})
        .set_workdir("/home/user")
        .set_start_cmd(file_tpl.start_cmd or "", file_tpl.ready_cmd)
    )
    tpl = built.definition
    assert tpl.steps == file_tpl.steps
    assert tpl.layer_digests == file_tpl.layer_digests
    assert tpl.digest == file_tpl.digest
    assert (tpl.start_cmd, tpl.ready_cmd) == (file_tpl.start_cmd, file_tpl.ready_cmd)
    # saved, it is found by name, the same again
    path = built.save()
    assert path.parent == manager.definitions_dir
    assert manager.get("web").digest == file_tpl.digest  # the user's own file still wins
    (user_dir / "web.toml").unlink()
    assert manager.get("web").digest == file_tpl.digest


def test_to_toml_reads_back_as_the_same_definition(
    manager: TemplateManager, user_dir: Path, tmp_path: Path
) -> None:
    tpl = manager.get("web")
    other = tmp_path / "other"
    other.mkdir()
    (other / "web.toml").write_text(tpl.to_toml())
    again = TemplateManager(cache=tmp_path / "cache", template_dirs=[other]).get("web")
    assert again.digest == tpl.digest
    assert again.steps == tpl.steps
    python = manager.get("python")
    assert python.to_toml().count("[image]") == 1
    (other / "python.toml").write_text(python.to_toml())
    assert TemplateManager(cache=tmp_path / "c2", template_dirs=[other]).get("python").digest == (
        python.digest
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('name = "bad"\nfrom = "python"\nflavour = "x"\n', "flavour"),
        ('name = "bad"\nfrom = "python"\npip = "six"\n', "pip"),
        ('name = "bad"\nfrom = "python"\npip = ["--index-url=http://x"]\n', "pip"),
        ('name = "bad"\nfrom = "python"\nrun = [3]\n', "run"),
        ('name = "bad"\nfrom = "python"\nworkdir = "relative"\n', "workdir"),
        ('name = "bad"\nstart_cmd = ""\n[image]\n', "start_cmd"),
        ('name = "bad"\nfrom = "python"\nready_cmd = "true"\n', "ready_cmd"),
        ('name = "bad"\nfrom = "python"\nready_timeout = 0\n', "ready_timeout"),
        ('name = "bad"\nfrom = "python"\n[image]\nsuite = "bookworm"\n', "suite"),
        ('name = "bad"\nfrom = "python"\n[image]\ncolour = 1\n', "[image] colour"),
        ('name = "bad"\nfrom = "python"\n[image]\ndisk_size_mib = 4096\n', "disk_size_mib"),
        ('name = "bad"\nfrom = "python"\n[machine]\nvcpus = "2"\n', "[machine] vcpus"),
        ('name = "bad"\nfrom = "python"\n[kernel]\nconfig = "x"\n', "[kernel]"),
        ('name = "bad"\nfrom = "python"\n[build]\nallow = ["not a host!"]\n', "[build] allow"),
        ('name = "bad"\nfrom = "python"\n[[files]]\nsrc = "app"\n', "files[0]"),
        ('name = "bad"\nfrom = "python"\n[[files]]\nsrc = "nope"\ndest = "/x"\n', "files[0].src"),
        ('name = "bad"\nfrom = "python"\n[[files]]\nsrc = "app"\ndest = "x"\n', "files[0].dest"),
        (
            'name = "bad"\nfrom = "python"\n[[files]]\nsrc = "app"\ndest = "/x"\nmode = "999"\n',
            "files[0].mode",
        ),
        (
            'name = "bad"\nfrom = "python"\n[[files]]\nsrc = "app"\ndest = "/x"\nowner = "a b"\n',
            "files[0].owner",
        ),
        ('name = "bad"\nfrom = "python"\n[[steps]]\nrun = "a"\npip = ["b"]\n', "steps[0]"),
        ('name = "bad"\nfrom = "python"\n[[steps]]\nrun = "a"\ndest = "/b"\n', "steps[0]"),
        ('name = "bad"\nfrom = "python"\npip = ["six"]\n[[steps]]\nrun = "a"\n', "steps"),
        ('name = "bad"\nfrom = "python"\nfrom_oci = "x.tar"\n', "from_oci"),
        ('name = "bad"\nfrom = "nope"\n', "from"),
        ('name = "bad"\nfrom = "bad"\n', "from"),
        ('name = "bad"\nfrom = 3\n', "from"),
    ],
)
def test_a_wrong_key_is_an_error_naming_the_file_and_the_key(
    manager: TemplateManager, user_dir: Path, body: str, key: str
) -> None:
    (user_dir / "bad.toml").write_text(body)
    with pytest.raises(TemplateError) as info:
        manager.get("bad")
    assert str(user_dir / "bad.toml") in info.value.message
    assert key in info.value.message


def test_a_loop_of_parents_is_refused(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "a.toml").write_text('name = "a"\nfrom = "b"\n')
    (user_dir / "b.toml").write_text('name = "b"\nfrom = "a"\n')
    with pytest.raises(TemplateError, match="loop"):
        manager.get("a")


def test_the_builder_reports_a_wrong_value_by_key(manager: TemplateManager) -> None:
    builder = TemplateBuilder("x", templates=manager).from_template("python").set_workdir("rel")
    with pytest.raises(TemplateError, match="workdir"):
        _ = builder.definition
    with pytest.raises(TemplateError, match="pip"):
        _ = (
            TemplateBuilder("x", templates=manager)
            .from_template("python")
            .pip_install(["-r", "x"])
            .definition
        )
    assert not manager.definitions_dir.exists()  # nothing was saved


def test_a_copy_archive_carries_the_owner_and_mode(tmp_path: Path) -> None:
    src = tmp_path / "app"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    (src / "link").symlink_to("a.txt")
    data, directory, entry = copy_archive(Step("copy", (), src, "/srv/app", 0o750, "user"), 7, 8)
    assert (directory, entry) == ("/srv/app", ".")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"a.txt", "sub", "sub/b.txt", "link"}
    assert all((m.uid, m.gid) == (7, 8) for m in members.values())
    assert members["a.txt"].mode == 0o750 and members["sub"].mode == 0o750
    assert members["link"].issym() and members["link"].linkname == "a.txt"
    one, directory, entry = copy_archive(Step("copy", (), src / "a.txt", "/etc/x.conf"), 0, 0)
    assert (directory, entry) == ("/etc", "x.conf")
    with tarfile.open(fileobj=io.BytesIO(one)) as tar:
        assert tar.getnames() == ["x.conf"]
    _, directory, entry = copy_archive(Step("copy", (), src / "a.txt", "/etc/"), 0, 0)
    assert (directory, entry) == ("/etc", "a.txt")


def test_dumps_toml_writes_what_tomllib_reads() -> None:
    import tomllib

    data = {
        "name": "x",
        "env": {"A B": 'q"uote', "C": "\\n"},
        "steps": [{"run": "echo 'hi' \"there\""}, {"pip": ["a>=1"]}],
        "machine": {"vcpus": 2},
        "ready_timeout": 2.5,
    }
    assert tomllib.loads(dumps_toml(data)) == data


def test_an_empty_start_cmd_drops_the_parents(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "quiet.toml").write_text('name = "quiet"\nfrom = "web"\nstart_cmd = ""\n')
    assert manager.get("web").start_cmd is not None
    quiet = manager.get("quiet")
    assert quiet.start_cmd is None and quiet.ready_cmd is None
    assert quiet.parent is not None and quiet.parent.name == "web"
    (user_dir / "inherits.toml").write_text('name = "inherits"\nfrom = "web"\n')
    inherits = manager.get("inherits")
    assert (inherits.start_cmd, inherits.ready_cmd) == (
        manager.get("web").start_cmd,
        manager.get("web").ready_cmd,
    )
    assert inherits.root_digest == manager.get("web").image_digest


def test_a_pinned_definition_reads_as_the_same_template_without_its_files(
    manager: TemplateManager, user_dir: Path, tmp_path: Path
) -> None:
    """``template export`` writes definitions with the digests of what they copy: the
    importing host has the layers, not the files."""
    tpl = manager.get("web")
    expected = (tpl.layer_digests, tpl.digest)
    pinned = tpl.to_toml(pinned=True)
    assert "digest = " in pinned
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "web.toml").write_text(pinned)
    (user_dir / "app" / "hello.txt").unlink()
    (user_dir / "app").rmdir()
    again = TemplateManager(cache=tmp_path / "cache", template_dirs=[elsewhere]).get("web")
    assert (again.layer_digests, again.digest) == expected
    # the files back, but other bytes: not what the definition pins
    (user_dir / "app").mkdir()
    (user_dir / "app" / "hello.txt").write_text("other\n")
    with pytest.raises(TemplateError, match="pins"):
        TemplateManager(cache=tmp_path / "cache", template_dirs=[elsewhere]).get("web")
    (elsewhere / "web.toml").write_text(pinned.replace('digest = "', 'digest = "x'))
    with pytest.raises(TemplateError, match="digest"):
        TemplateManager(cache=tmp_path / "cache", template_dirs=[elsewhere]).get("web")
