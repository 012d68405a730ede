"""Template definitions, their digests and the artifact cache (nothing is built here)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from novasandbox import templates, warmup
from novasandbox.errors import (
    HostToolMissing,
    TemplateError,
    TemplateNotBuilt,
    TemplateNotFound,
)
from novasandbox.snapshots import Engine, Snapshot, template_snapshot, template_snapshot_dir
from novasandbox.templates import BuiltTemplate, Template, TemplateManager
from novasandbox.templates.build import (
    install_guest,
    missing_tools,
    mmdebstrap_argv,
    profile_script,
    quicken_profile,
    require_tools,
)
from novasandbox.vm import get_provider

CUSTOM_TOML = """\
name = "custom"
description = "a test template"

[image]
suite = "bookworm"
variant = "minbase"
packages = ["python3", "curl"]
disk_size_mib = 512

[machine]
vcpus = 2
memory_mib = 384

[kernel]
source_package = "linux-source-6.1"
config = "custom.config"
"""

CUSTOM_CONFIG = "CONFIG_64BIT=y\nCONFIG_SMP=y\n"


@pytest.fixture(autouse=True)
def _no_env_template_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOVASANDBOX_TEMPLATE_PATH", raising=False)


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "user-templates"
    d.mkdir()
    (d / "custom.toml").write_text(CUSTOM_TOML)
    (d / "custom.config").write_text(CUSTOM_CONFIG)
    return d


@pytest.fixture
def manager(tmp_path: Path, user_dir: Path) -> TemplateManager:
    return TemplateManager(cache=tmp_path / "cache", template_dirs=[user_dir])


def fake_build(manager: TemplateManager, tpl: Template) -> tuple[Path, Path]:
    """Lay out the cache as a real build would; returns (kernel, rootfs)."""
    kernel = manager.cache / "kernels" / tpl.kernel_digest / "vmlinux"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"kernel")
    image_dir = manager.cache / "templates" / tpl.name / tpl.image_digest
    image_dir.mkdir(parents=True)
    rootfs = image_dir / "rootfs.ext4"
    rootfs.write_bytes(b"rootfs")
    rootfs.chmod(0o444)  # as build_image leaves it
    (image_dir / "manifest.json").write_text(json.dumps({"template": tpl.name, "n": 1}))
    return kernel, rootfs


# ---------------------------------------------------------------------------- definitions


def test_list_has_builtin_and_user_templates(manager: TemplateManager) -> None:
    by_name = {t.name: t for t in manager.list()}
    assert {"python", "custom"} <= set(by_name)
    assert [t.name for t in manager.list()] == sorted(by_name)


def test_get_parses_the_user_template(manager: TemplateManager, user_dir: Path) -> None:
    tpl = manager.get("custom")
    assert tpl.name == "custom"
    assert tpl.description == "a test template"
    assert tpl.packages == ("python3", "curl")
    assert (tpl.vcpus, tpl.memory_mib, tpl.disk_size_mib) == (2, 384, 512)
    assert tpl.kernel_config == CUSTOM_CONFIG
    assert tpl.source == user_dir / "custom.toml"


def test_builtin_python_template_loads(manager: TemplateManager) -> None:
    tpl = manager.get("python")
    assert "python3" in tpl.packages
    assert "CONFIG_" in tpl.kernel_config
    assert tpl.source.parent == templates.BUILTIN_DIR


def test_user_template_replaces_builtin_of_the_same_name(tmp_path: Path, user_dir: Path) -> None:
    (user_dir / "python.toml").write_text(
        CUSTOM_TOML.replace('"custom"', '"python"', 1).replace("a test template", "mine")
    )
    tpl = TemplateManager(cache=tmp_path, template_dirs=[user_dir]).get("python")
    assert tpl.description == "mine"


def test_env_template_path_is_searched(
    tmp_path: Path, user_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVASANDBOX_TEMPLATE_PATH", f"/nonexistent:{user_dir}")
    assert TemplateManager(cache=tmp_path).get("custom").name == "custom"


@pytest.mark.parametrize("name", ["nope", "Custom", "../custom", "", "a" * 64])
def test_unknown_template(manager: TemplateManager, name: str) -> None:
    with pytest.raises(TemplateNotFound) as info:
        manager.get(name)
    assert info.value.code == "template-not-found"
    assert isinstance(info.value, TemplateError)


def test_invalid_toml(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "broken.toml").write_text('name = "broken"\n[image\n')
    with pytest.raises(TemplateError, match="cannot read"):
        manager.get("broken")


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("bad", 'name = "Bad Name"\n[image]\n'),
        ("bad", "name = 3\n[image]\n"),
        ("bad", 'name = "bad"\n'),  # no [image]
        ("bad", 'name = "bad"\n[image]\npackages = ["ok", "no way"]\n'),
        ("bad", 'name = "bad"\n[image]\nsuite = "bookworm; rm -rf /"\n'),
        ("bad", 'name = "bad"\n[image]\ndisk_size_mib = 10\n'),
        ("bad", 'name = "bad"\n[image]\ndisk_size_mib = "big"\n'),
        ("bad", 'name = "bad"\n[image]\ncustomize = "echo hi"\n'),
        ("bad", 'name = "bad"\n[image]\ncustomize = ["echo hi", 3]\n'),
        ("bad", 'name = "bad"\n[image]\ncustomize = ["  "]\n'),
        ("bad", 'name = "bad"\n[image]\ncustomize = ["echo \\u0000"]\n'),
        ("bad", 'name = "bad"\nenv = "PATH=/bin"\n[image]\n'),
        ("bad", 'name = "bad"\nenv = ["PATH"]\n[image]\n'),
        ("bad", 'name = "bad"\n[env]\nPATH = 3\n[image]\n'),
        ("bad", 'name = "bad"\n[env]\nPATH = ["/bin"]\n[image]\n'),
        ("bad", 'name = "bad"\n[env]\n"NO-DASH" = "x"\n[image]\n'),
        ("bad", 'name = "bad"\n[env]\n"A=B" = "x"\n[image]\n'),
        ("bad", 'name = "bad"\n[env]\nA = "x\\u0000y"\n[image]\n'),
        ("bad", 'name = "bad"\n[env.SUB]\nA = "x"\n[image]\n'),
    ],
)
def test_invalid_definitions(
    manager: TemplateManager, user_dir: Path, name: str, body: str
) -> None:
    (user_dir / f"{name}.toml").write_text(body)
    with pytest.raises(TemplateError) as info:
        manager.get(name)
    assert not isinstance(info.value, TemplateNotFound)


def test_file_name_must_match_declared_name(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "other.toml").write_text(CUSTOM_TOML)  # declares name = "custom"
    with pytest.raises(TemplateError, match="declares name"):
        manager.get("other")


def test_customize_and_env_are_parsed(manager: TemplateManager, user_dir: Path) -> None:
    plain = manager.get("custom")
    assert plain.customize == ()
    assert dict(plain.env) == {}
    (user_dir / "custom.toml").write_text(
        'name = "custom"\n[env]\nPATH = "/opt/x/bin:/usr/bin:/bin"\nEMPTY = ""\n'
        '[image]\ncustomize = ["echo one > /one", "touch \'/two words\'"]\n'
    )
    tpl = manager.get("custom")
    assert tpl.customize == ("echo one > /one", "touch '/two words'")
    assert dict(tpl.env) == {"PATH": "/opt/x/bin:/usr/bin:/bin", "EMPTY": ""}
    assert json.loads(tpl.guest_defaults()) == {"env": dict(tpl.env), "user": "root"}


def test_the_default_user_is_parsed_and_checked(manager: TemplateManager, user_dir: Path) -> None:
    assert manager.get("custom").user == "root"  # a template that names none
    (user_dir / "custom.toml").write_text(
        CUSTOM_TOML.replace("[image]", 'user = "dev"\n[image]', 1)
    )
    tpl = manager.get("custom")
    assert tpl.user == "dev"
    assert json.loads(tpl.guest_defaults())["user"] == "dev"
    for bad in ('"Dev"', '"a b"', '"../x"', '""', "1", '"' + "a" * 33 + '"'):
        (user_dir / "custom.toml").write_text(
            CUSTOM_TOML.replace("[image]", f"user = {bad}\n[image]", 1)
        )
        with pytest.raises(TemplateError, match="user"):
            manager.get("custom")


def test_builtin_python_template_has_pip_in_a_venv_first_on_path(
    manager: TemplateManager,
) -> None:
    tpl = manager.get("python")
    assert {"python3", "python3-venv", "ca-certificates", "curl", "git"} <= set(tpl.packages)
    assert any("-m venv" in c and "/opt/venv" in c for c in tpl.customize)
    assert tpl.env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert "/usr/bin" in tpl.env["PATH"].split(":")
    assert tpl.env["VIRTUAL_ENV"] == "/opt/venv"
    # an unprivileged account with passwordless sudo, the default of every call
    assert tpl.user == "user" and "sudo" in tpl.packages
    assert any(c.startswith("useradd") and "--uid 1000" in c for c in tpl.customize)
    assert any("/etc/sudoers.d/user" in c for c in tpl.customize)


# ---------------------------------------------------------------------------- digests


def test_digests_are_stable(manager: TemplateManager, tmp_path: Path, user_dir: Path) -> None:
    a, b = manager.get("custom"), manager.get("custom")
    assert a is not b
    for attr in ("kernel_digest", "base_digest", "image_digest", "digest"):
        value = getattr(a, attr)
        assert value == getattr(b, attr)
        assert len(value) == 16
        int(value, 16)
    # a copy in another directory is the same template
    copy = tmp_path / "copy"
    shutil.copytree(user_dir, copy)
    assert TemplateManager(cache=tmp_path, template_dirs=[copy]).get("custom").digest == a.digest


def test_kernel_config_text_changes_the_kernel_digest(
    manager: TemplateManager, user_dir: Path
) -> None:
    before = manager.get("custom")
    (user_dir / "custom.config").write_text(CUSTOM_CONFIG + "CONFIG_PRINTK=y\n")
    after = manager.get("custom")
    assert after.kernel_digest != before.kernel_digest
    assert after.digest != before.digest
    # the root file system does not depend on the kernel
    assert after.base_digest == before.base_digest
    assert after.image_digest == before.image_digest


def test_package_list_changes_base_and_image_digests(
    manager: TemplateManager, user_dir: Path
) -> None:
    before = manager.get("custom")
    (user_dir / "custom.toml").write_text(CUSTOM_TOML.replace('"curl"', '"curl", "git"'))
    after = manager.get("custom")
    assert after.base_digest != before.base_digest
    assert after.image_digest != before.image_digest
    assert after.digest != before.digest
    assert after.kernel_digest == before.kernel_digest


def test_package_order_does_not_matter(manager: TemplateManager, user_dir: Path) -> None:
    before = manager.get("custom")
    (user_dir / "custom.toml").write_text(
        CUSTOM_TOML.replace('["python3", "curl"]', '["curl", "python3"]')
    )
    assert manager.get("custom").base_digest == before.base_digest


def digests(tpl: Template) -> dict[str, str]:
    return {a: getattr(tpl, a) for a in ("kernel_digest", "base_digest", "image_digest", "digest")}


def test_customize_changes_base_and_image_digests(manager: TemplateManager, user_dir: Path) -> None:
    before = digests(manager.get("custom"))
    # an empty list is no customization: the base (and its cached tarball) stays the same
    (user_dir / "custom.toml").write_text(
        CUSTOM_TOML.replace("disk_size_mib", "customize = []\ndisk_size_mib")
    )
    assert digests(manager.get("custom")) == before
    seen = {before["base_digest"]}
    for commands in ('["echo a"]', '["echo b"]', '["echo a", "echo b"]', '["echo b", "echo a"]'):
        (user_dir / "custom.toml").write_text(
            CUSTOM_TOML.replace("disk_size_mib", f"customize = {commands}\ndisk_size_mib")
        )
        after = digests(manager.get("custom"))
        assert after["base_digest"] not in seen  # order matters: commands run in order
        seen.add(after["base_digest"])
        assert after["image_digest"] != before["image_digest"]
        assert after["digest"] != before["digest"]
        assert after["kernel_digest"] == before["kernel_digest"]


def test_env_changes_the_image_digest_only(manager: TemplateManager, user_dir: Path) -> None:
    before = digests(manager.get("custom"))
    seen = {before["image_digest"]}
    for table in ('A = "1"', 'A = "2"', 'B = "1"', 'A = "1"\nB = "1"'):
        (user_dir / "custom.toml").write_text(
            CUSTOM_TOML.replace("[image]", f"[env]\n{table}\n[image]")
        )
        after = digests(manager.get("custom"))
        assert after["image_digest"] not in seen
        seen.add(after["image_digest"])
        assert after["digest"] != before["digest"]
        # no package or kernel to rebuild for another environment
        assert after["base_digest"] == before["base_digest"]
        assert after["kernel_digest"] == before["kernel_digest"]
    # the order of the table's keys does not matter
    (user_dir / "custom.toml").write_text(
        CUSTOM_TOML.replace("[image]", '[env]\nB = "1"\nA = "1"\n[image]')
    )
    assert manager.get("custom").image_digest in seen


def test_agent_source_changes_the_image_digest(
    manager: TemplateManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest = tmp_path / "guest"
    shutil.copytree(templates.GUEST_DIR, guest)
    monkeypatch.setattr(templates.definition, "GUEST_DIR", guest)
    tpl = manager.get("custom")
    before = (tpl.image_digest, tpl.base_digest, tpl.kernel_digest, tpl.digest)
    with (guest / "agent.py").open("a") as f:
        f.write("\n# changed\n")
    after = (tpl.image_digest, tpl.base_digest, tpl.kernel_digest, tpl.digest)
    assert after[0] != before[0]
    assert after[1:3] == before[1:3]
    assert after[3] != before[3]
    # protocol.py is part of the image too
    with (guest / "protocol.py").open("a") as f:
        f.write("\n# changed\n")
    assert tpl.image_digest != after[0]


# ---------------------------------------------------------------------------- cache


def test_empty_cache_is_not_built(manager: TemplateManager) -> None:
    assert manager.built("custom") is None
    with pytest.raises(TemplateNotBuilt) as info:
        manager.require_built("custom")
    assert info.value.code == "template-not-built"
    assert "novasandbox template build custom" in str(info.value)


def test_unknown_template_is_not_found_not_unbuilt(manager: TemplateManager) -> None:
    with pytest.raises(TemplateNotFound):
        manager.require_built("nope")


def test_manual_cache_layout_is_found(manager: TemplateManager) -> None:
    tpl = manager.get("custom")
    kernel, rootfs = fake_build(manager, tpl)
    assert manager.kernel_path(tpl) == kernel
    assert manager.image_dir(tpl) == rootfs.parent
    built = manager.built("custom")
    assert isinstance(built, BuiltTemplate)
    assert built.name == "custom"
    assert built.kernel == kernel
    assert built.rootfs == rootfs
    assert built.manifest == {"template": "custom", "n": 1}
    assert manager.require_built("custom") == built
    assert manager.built(tpl) == built
    # another template is not affected
    assert manager.built("python") is None


def fake_snapshot(manager: TemplateManager, name: str, nic: bool = False) -> Path:
    built = manager.require_built(name)
    tpl = built.template
    engine = get_provider().engine()
    directory = template_snapshot_dir(manager, tpl, tpl.vcpus, tpl.memory_mib, engine, nic=nic)
    directory.mkdir(parents=True)
    (directory / "memory.bin").write_bytes(b"memory")
    (directory / "disk.qcow2").write_bytes(b"disk")
    snap = Snapshot(
        id="t",
        kind="template",
        template=name,
        directory=directory,
        kernel=built.kernel,
        vcpus=tpl.vcpus,
        memory_mib=tpl.memory_mib,
        accel=engine.accel,
        qemu_version=engine.version,
        created_at=0.0,
        network="detached" if nic else "none",
    )
    snap.write_manifest()
    return directory


def test_build_is_a_no_op_when_cached(manager: TemplateManager) -> None:
    fake_build(manager, manager.get("custom"))
    fake_snapshot(manager, "custom")
    assert not warmup.up_to_date(manager, "custom")  # the variant with a NIC is missing
    fake_snapshot(manager, "custom", nic=True)
    assert warmup.up_to_date(manager, "custom")
    # would need root, mmdebstrap, a kernel tree and a VM if it tried to build anything
    assert warmup.build(manager, "custom").rootfs.read_bytes() == b"rootfs"


def test_snapshot_is_keyed_by_machine_shape(manager: TemplateManager) -> None:
    fake_build(manager, manager.get("custom"))
    assert not warmup.up_to_date(manager, "custom")
    directory = fake_snapshot(manager, "custom")
    built = manager.require_built("custom")
    tpl = built.template
    engine = get_provider().engine()
    found = template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, engine)
    assert found is not None and found.directory == directory
    assert template_snapshot(manager, built, tpl.vcpus + 1, tpl.memory_mib, engine) is None
    assert template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib * 2, engine) is None
    other = Engine("kvm" if engine.accel == "tcg" else "tcg", engine.version)
    assert template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, other) is None
    newer = Engine(engine.accel, engine.version + " (another)")
    assert template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, newer) is None


@pytest.mark.parametrize("missing", ["kernel", "rootfs", "manifest", "bad-manifest"])
def test_incomplete_cache_is_not_built(manager: TemplateManager, missing: str) -> None:
    tpl = manager.get("custom")
    kernel, rootfs = fake_build(manager, tpl)
    manifest = rootfs.parent / "manifest.json"
    if missing == "kernel":
        kernel.unlink()
    elif missing == "rootfs":
        rootfs.unlink()
    elif missing == "manifest":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    assert manager.built("custom") is None


def test_changed_definition_invalidates_the_cache(manager: TemplateManager, user_dir: Path) -> None:
    fake_build(manager, manager.get("custom"))
    assert manager.built("custom") is not None
    (user_dir / "custom.toml").write_text(CUSTOM_TOML.replace("512", "640"))
    assert manager.built("custom") is None


def test_remove(manager: TemplateManager) -> None:
    tpl = manager.get("custom")
    kernel, rootfs = fake_build(manager, tpl)
    assert manager.remove("custom") is True
    assert not rootfs.exists()
    assert not (manager.cache / "templates" / "custom").exists()
    assert kernel.exists()  # kernels are shared between templates and kept
    assert manager.built("custom") is None
    assert manager.remove("custom") is False


def test_remove_unknown_template(manager: TemplateManager) -> None:
    with pytest.raises(TemplateNotFound):
        manager.remove("nope")


# ---------------------------------------------------------------------------- build steps


def test_mmdebstrap_runs_each_customize_command_in_a_chroot(
    manager: TemplateManager, user_dir: Path, tmp_path: Path
) -> None:
    commands = ["python3 -m venv /opt/venv", "echo 'it''s' \"$HOME\" > /x; chown 1000 /x"]
    (user_dir / "custom.toml").write_text(
        CUSTOM_TOML.replace("disk_size_mib", f"customize = {json.dumps(commands)}\ndisk_size_mib")
    )
    argv = mmdebstrap_argv(manager.get("custom"), tmp_path / "base.tar")
    assert argv[-2:] == ["bookworm", str(tmp_path / "base.tar")]
    assert "--include=python3,curl" in argv
    hooks = [a.removeprefix("--customize-hook=") for a in argv if a.startswith("--customize-hook=")]
    # mmdebstrap hands each hook to the shell with the new root as $1
    assert [shlex.split(h) for h in hooks] == [
        ["chroot", "$1", "/bin/sh", "-c", c] for c in commands
    ]
    # without commands: no hook
    (user_dir / "custom.toml").write_text(CUSTOM_TOML)
    plain = mmdebstrap_argv(manager.get("custom"), tmp_path / "base.tar")
    assert [a for a in argv if not a.startswith("--customize-hook=")] == plain


def test_profile_script_exports_the_env_as_given(tmp_path: Path) -> None:
    env = {"PATH": "/opt/v/bin:/bin:/usr/bin", "ODD": 'it\'s $HOME `id` "q" \\ ;', "EMPTY": ""}
    script = tmp_path / "profile.sh"
    script.write_text(profile_script(env))
    probe = r'. "$1"; printf "%s\n" "$PATH" "$ODD" "$EMPTY"'
    out = subprocess.run(
        ["/bin/sh", "-c", probe, "sh", str(script)], capture_output=True, text=True, env={}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [env["PATH"], env["ODD"], ""]


def test_profile_script_puts_back_the_path_the_agent_gave_and_keeps_given_values(
    tmp_path: Path,
) -> None:
    """A login shell started by the agent: /etc/profile set PATH anew before the script,
    which restores the agent's (NOVASANDBOX_PATH, then unset); values the environment
    already has (a sandbox's or a call's) win over the template's."""
    env = {"PATH": "/opt/v/bin:/bin:/usr/bin", "A": "template", "B": "template"}
    script = tmp_path / "profile.sh"
    script.write_text(profile_script(env))
    probe = r'PATH=/reset; . "$1"; printf "%s\n" "$PATH" "$A" "$B" "${NOVASANDBOX_PATH-unset}"'
    given = {"NOVASANDBOX_PATH": "/call/bin:/bin:/usr/bin", "A": "call"}
    for shell in ("/bin/sh", "/bin/bash"):
        out = subprocess.run(
            [shell, "-c", probe, "sh", str(script)], capture_output=True, text=True, env=given
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["/call/bin:/bin:/usr/bin", "call", "template", "unset"]
        # no agent (su -, sudo -i): the template's PATH
        out = subprocess.run(
            [shell, "-c", probe, "sh", str(script)], capture_output=True, text=True, env={}
        )
        assert out.stdout.splitlines() == [env["PATH"], "template", "template", "unset"]


def test_the_login_profile_asks_bash_its_uid_instead_of_starting_id(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    debian = (
        'if [ "$(id -u)" -eq 0 ]; then\n  PATH=/root/path\nelse\n  PATH=/user/path\nfi\n'
        'echo "$PATH"\n'
    )
    profile.write_text(debian)
    quicken_profile(profile)
    assert "${EUID:-$(id -u)}" in profile.read_text()
    quick = profile.read_text()
    uids = [os.geteuid()] + ([65534] if os.geteuid() == 0 else [])  # root: also as nobody
    for shell in ("/bin/sh", "/bin/bash"):  # the same answers either way
        for uid in uids:
            out = subprocess.run(
                [shell, "-s"], input=quick, capture_output=True, text=True, env={}, user=uid
            )
            assert out.stdout == ("/root/path\n" if uid == 0 else "/user/path\n"), out.stderr
    quicken_profile(tmp_path / "absent")  # nothing to do


def test_install_guest_writes_the_template_defaults(
    manager: TemplateManager, user_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    install_guest(root, manager.get("custom"))  # no env
    defaults = root / "opt" / "novasandbox" / templates.TEMPLATE_DEFAULTS
    assert json.loads(defaults.read_text()) == {"env": {}, "user": "root"}
    # always there: it gives a login shell back the PATH the agent chose
    assert (root / "etc" / "profile.d" / "novasandbox.sh").read_text() == profile_script({})
    (user_dir / "custom.toml").write_text(CUSTOM_TOML.replace("[image]", '[env]\nA = "1"\n[image]'))
    tpl = manager.get("custom")
    install_guest(root, tpl)
    assert defaults.read_text() == tpl.guest_defaults()
    assert json.loads(defaults.read_text()) == {"env": {"A": "1"}, "user": "root"}
    assert (root / "etc" / "profile.d" / "novasandbox.sh").read_text() == profile_script(tpl.env)
    for name in templates.GUEST_FILES:
        assert (root / "opt" / "novasandbox" / name).is_file()


# ---------------------------------------------------------------------------- host tools


def test_missing_tools(tmp_path: Path) -> None:
    present_file = tmp_path / "header.h"
    present_file.write_text("")
    tools = [
        ("sh", "dash"),
        ("novasandbox-no-such-tool-xyz", "fake-package"),
        (str(present_file), "libfoo-dev"),
        (str(tmp_path / "absent.h"), "libbar-dev"),
    ]
    assert missing_tools(tools) == [
        ("novasandbox-no-such-tool-xyz", "fake-package"),
        (str(tmp_path / "absent.h"), "libbar-dev"),
    ]
    assert missing_tools([("sh", "dash")]) == []


def test_require_tools_names_the_debian_package() -> None:
    require_tools([("sh", "dash")])  # present: no error
    with pytest.raises(HostToolMissing) as info:
        require_tools([("novasandbox-no-such-tool-xyz", "fake-package")])
    err = info.value
    assert err.code == "host-tool-missing"
    assert (err.tool, err.package) == ("novasandbox-no-such-tool-xyz", "fake-package")
    assert "apt-get install fake-package" in str(err)
    assert "novasandbox-no-such-tool-xyz" in str(err)


def test_require_tools_reports_every_missing_tool() -> None:
    with pytest.raises(HostToolMissing) as info:
        require_tools(
            [("sh", "dash"), ("ns-missing-one", "pkg-one"), ("ns-missing-two", "pkg-two")]
        )
    message = str(info.value)
    for word in ("ns-missing-one", "ns-missing-two", "pkg-one", "pkg-two"):
        assert word in message
    assert "dash" not in message


# ---------------------------------------------------------------------------- regressions
# Each of these once failed against a real bug (found by these tests, since fixed).


def test_missing_kernel_config_is_a_template_error(
    manager: TemplateManager, user_dir: Path
) -> None:
    (user_dir / "custom.config").unlink()
    (user_dir / "custom.toml").write_text(CUSTOM_TOML.replace("custom.config", "nope.config"))
    with pytest.raises(TemplateError):
        manager.get("custom")


def test_non_table_section_is_a_template_error(manager: TemplateManager, user_dir: Path) -> None:
    (user_dir / "flat.toml").write_text('name = "flat"\nimage = "bookworm"\n')
    with pytest.raises(TemplateError):
        manager.get("flat")
