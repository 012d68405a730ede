"""The pure parts of the QEMU provider: the command line and the accelerator choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from novasandbox.config import Drive, MachineConfig
from novasandbox.errors import ConfigError
from novasandbox.guest.protocol import AGENT_PORT_NAME
from novasandbox.host.plan import (
    VMM_ID_BASE,
    VMM_ID_COUNT,
    Confinement,
    confinement,
    make_plan,
)
from novasandbox.network import NetworkConfig
from novasandbox.vm.base import VMPaths, VMSpec, drive_serial
from novasandbox.vm.qemu import choose_accel, tsc_khz_from_cpuinfo
from novasandbox.vm.qemu_argv import (
    GUEST_INIT,
    ROOT_SERIAL,
    DiskFds,
    build_argv,
    kernel_cmdline,
    overlay_argv,
)


def make_spec(
    tmp_path: Path,
    *,
    accel: str = "tcg",
    vcpus: int = 2,
    memory_mib: int = 512,
    drives: tuple[Drive, ...] = (),
    rootfs_format: str = "raw",
    confine: Confinement | None = None,
) -> VMSpec:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    return VMSpec(
        vm_id="sb-test",
        machine=MachineConfig(vcpus=vcpus, memory_mib=memory_mib, drives=drives),
        kernel=tmp_path / "vmlinux",
        rootfs=tmp_path / "rootfs.ext4",
        paths=VMPaths(state),
        accel=accel,
        host=make_plan("sb-test", NetworkConfig(), vcpus, memory_mib, confine=confine),
        rootfs_format=rootfs_format,
    )


def fds_for(spec: VMSpec) -> DiskFds:
    """Made-up descriptor numbers: the base gets 10, the overlay 11 and 12, drive i
    20+2i (and 21+2i when writable)."""
    drives = tuple(
        (20 + 2 * i,) if d.read_only else (20 + 2 * i, 21 + 2 * i)
        for i, d in enumerate(spec.machine.drives)
    )
    return DiskFds(base=(10,), overlay=(11, 12), drives=drives)


def build(spec: VMSpec, **kwargs: object) -> list[str]:
    return build_argv(spec, fds_for(spec), **kwargs)  # type: ignore[arg-type]


def make_drive(tmp_path: Path, name: str, mount: str, **kwargs: object) -> Drive:
    path = tmp_path / name
    path.write_bytes(b"\0" * 512)
    return Drive(path, mount, **kwargs)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> str:
    """The value after the single occurrence of ``flag``."""
    indexes = [i for i, a in enumerate(argv) if a == flag]
    assert len(indexes) == 1, f"{flag} appears {len(indexes)} times in {argv}"
    return argv[indexes[0] + 1]


def options(argv: list[str], flag: str) -> list[str]:
    """The values after every occurrence of ``flag``, in order."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def props(value: str) -> dict[str, str]:
    """``a=1,b=2`` -> {"a": "1", "b": "2"} (a bare first word maps to "")."""
    out = {}
    for part in value.split(","):
        key, _, val = part.partition("=")
        out[key] = val
    return out


# ---------------------------------------------------------------------------- argv


def test_microvm_machine_and_basics(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, vcpus=3, memory_mib=768)
    argv = build(spec, qemu="/opt/qemu/bin/qemu-system-x86_64")
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    machine = props(option(argv, "-M"))
    assert "microvm" in machine
    assert machine["acpi"] == "off"
    assert option(argv, "-smp") == "3"
    assert option(argv, "-m") == "768M"
    assert option(argv, "-kernel") == str(tmp_path / "vmlinux")
    assert option(argv, "-append") == kernel_cmdline(spec)
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert option(argv, "-display") == "none"
    assert "sb-test" in option(argv, "-name")


def test_tcg_accel_and_cpu(tmp_path: Path) -> None:
    argv = build(make_spec(tmp_path, accel="tcg"))
    assert option(argv, "-accel").split(",")[0] == "tcg"
    # qemu64 with x86-64-v2's additions: wheels built for v2 (numpy >= 2.4) run
    cpu = option(argv, "-cpu").split(",")
    assert cpu[0] == "qemu64"
    assert {"+ssse3", "+sse4.1", "+sse4.2", "+popcnt", "+cx16"} <= set(cpu[1:])


def test_kvm_accel_and_cpu(tmp_path: Path) -> None:
    argv = build(make_spec(tmp_path, accel="kvm"))
    assert option(argv, "-accel") == "kvm"
    assert option(argv, "-cpu") == "host"


def test_tsc_reliable_only_under_tcg(tmp_path: Path) -> None:
    assert "tsc=reliable" in kernel_cmdline(make_spec(tmp_path, accel="tcg")).split()
    assert "tsc=reliable" not in kernel_cmdline(make_spec(tmp_path, accel="kvm")).split()
    assert "no_timer_check" in kernel_cmdline(make_spec(tmp_path, accel="tcg")).split()


def test_kernel_cmdline_boots_the_agent(tmp_path: Path) -> None:
    words = kernel_cmdline(make_spec(tmp_path)).split()
    assert f"init={GUEST_INIT}" in words
    assert "root=/dev/vda" in words
    assert "reboot=t" in words


def blockdevs(argv: list[str]) -> dict[str, dict[str, str]]:
    return {(d := props(v))["node-name"]: d for v in options(argv, "-blockdev")}


def fdsets(argv: list[str]) -> dict[int, list[int]]:
    sets: dict[int, list[int]] = {}
    for value in options(argv, "-add-fd"):
        p = props(value)
        sets.setdefault(int(p["set"]), []).append(int(p["fd"]))
    return sets


def test_root_disk_is_an_overlay_on_the_read_only_base_both_given_as_fds(
    tmp_path: Path,
) -> None:
    spec = make_spec(tmp_path)
    argv = build(spec)
    assert "-drive" not in argv
    assert fdsets(argv) == {1: [10], 2: [11, 12]}
    nodes = blockdevs(argv)
    assert set(nodes) == {"base-file", "base", "root-file", "root"}
    assert nodes["base-file"]["filename"] == "/dev/fdset/1"
    assert nodes["base-file"]["read-only"] == "on"
    assert nodes["base"]["driver"] == "raw"
    assert nodes["base"]["read-only"] == "on"
    assert nodes["root-file"]["filename"] == "/dev/fdset/2"
    assert "read-only" not in nodes["root-file"]
    assert nodes["root"]["driver"] == "qcow2"
    assert nodes["root"]["backing"] == "base"
    devices = options(argv, "-device")
    assert f"virtio-blk-device,drive=root,serial={ROOT_SERIAL}" in devices
    assert ROOT_SERIAL == "nsroot"


def test_no_disk_path_reaches_qemu(tmp_path: Path) -> None:
    """QEMU gets its disks as descriptors only: a confined QEMU could not open a path."""
    rw = make_drive(tmp_path, "a,readonly=on.img", "/data")
    spec = make_spec(tmp_path, drives=(rw,))
    line = " ".join(build(spec))
    for path in (spec.rootfs, spec.paths.overlay, rw.path):
        assert str(path) not in line


def test_snapshot_disk_base_is_qcow2(tmp_path: Path) -> None:
    nodes = blockdevs(build(make_spec(tmp_path, rootfs_format="qcow2")))
    assert nodes["base"]["driver"] == "qcow2"


def test_extra_drives_get_serials_fdsets_and_read_only(tmp_path: Path) -> None:
    rw = make_drive(tmp_path, "rw.img", "/data")
    ro = make_drive(tmp_path, "ro.qcow2", "/ref", read_only=True, format="qcow2")
    argv = build(make_spec(tmp_path, drives=(rw, ro)))
    assert fdsets(argv) == {1: [10], 2: [11, 12], 3: [20, 21], 4: [22]}
    nodes = blockdevs(argv)
    assert nodes["drive1-file"]["filename"] == "/dev/fdset/3"
    assert nodes["drive1"]["driver"] == "raw"
    assert "read-only" not in nodes["drive1"]
    assert nodes["drive2-file"]["filename"] == "/dev/fdset/4"
    assert nodes["drive2"]["driver"] == "qcow2"
    assert nodes["drive2"]["read-only"] == "on"
    assert nodes["drive2-file"]["read-only"] == "on"
    blk = [props(d) for d in options(argv, "-device") if d.startswith("virtio-blk-device")]
    assert [(d["drive"], d["serial"]) for d in blk] == [
        ("root", "nsroot"),
        ("drive1", "nsdrive1"),
        ("drive2", "nsdrive2"),
    ]
    assert drive_serial(1) == "nsdrive1"


def test_a_drive_without_descriptors_is_refused(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, drives=(make_drive(tmp_path, "rw.img", "/data"),))
    with pytest.raises(ValueError):
        build_argv(spec, DiskFds(base=(10,), overlay=(11,)))
    with pytest.raises(ValueError):
        build_argv(spec, DiskFds(base=(10,), overlay=(11,), drives=((),)))


def test_agent_channel(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = build(spec)
    chardev = props(option(argv, "-chardev"))
    assert "socket" in chardev
    assert chardev["path"] == str(spec.paths.agent_socket)
    assert chardev["server"] == "on"
    assert chardev["wait"] == "off"
    ports = [props(d) for d in options(argv, "-device") if d.startswith("virtserialport")]
    assert ports == [{"virtserialport": "", "chardev": chardev["id"], "name": AGENT_PORT_NAME}]
    assert AGENT_PORT_NAME == "org.novasandbox.agent"
    assert any(d.startswith("virtio-serial-device") for d in options(argv, "-device"))


def test_console_log_and_qmp_socket(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    argv = build(spec)
    assert option(argv, "-serial") == f"file:{spec.paths.console_log}"
    assert spec.paths.console_log == tmp_path / "state" / "console.log"
    qmp = props(option(argv, "-qmp"))
    assert f"unix:{spec.paths.control_socket}" in qmp
    assert qmp["server"] == "on"
    assert qmp["wait"] == "off"


def test_build_argv_touches_no_file(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    build(spec)
    assert sorted(tmp_path.rglob("*")) == before


def test_overlay_argv(tmp_path: Path) -> None:
    base, overlay = tmp_path / "rootfs.ext4", tmp_path / "state" / "rootfs.qcow2"
    argv = overlay_argv(base, overlay, qemu_img="/usr/bin/qemu-img")
    assert argv[:2] == ["/usr/bin/qemu-img", "create"]
    assert option(argv, "-f") == "qcow2"
    assert option(argv, "-F") == "raw"
    assert option(argv, "-b") == str(base)
    assert argv[-1] == str(overlay)


# ---------------------------------------------------------------------------- accelerator


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    """A fake /sys/module directory and a fake /dev/kvm path (not created yet)."""
    sys_module = tmp_path / "sys" / "module"
    sys_module.mkdir(parents=True)
    return sys_module, tmp_path / "dev" / "kvm"


def make_kvm(dev_kvm: Path) -> None:
    dev_kvm.parent.mkdir(parents=True, exist_ok=True)
    dev_kvm.write_bytes(b"")
    dev_kvm.chmod(0o666)


@pytest.mark.parametrize("module", ["kvm_intel", "kvm_amd"])
def test_hardware_kvm_is_used(host: tuple[Path, Path], module: str) -> None:
    sys_module, dev_kvm = host
    (sys_module / module).mkdir()
    make_kvm(dev_kvm)
    choice = choose_accel({}, sys_module, dev_kvm)
    assert choice.name == "kvm"
    assert module in choice.reason


def test_hardware_module_without_dev_kvm_is_tcg(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    (sys_module / "kvm_intel").mkdir()
    assert choose_accel({}, sys_module, dev_kvm).name == "tcg"


def test_kvm_pvm_only_is_tcg(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    (sys_module / "kvm").mkdir()
    (sys_module / "kvm_pvm").mkdir()
    make_kvm(dev_kvm)
    choice = choose_accel({}, sys_module, dev_kvm)
    assert choice.name == "tcg"
    assert "kvm_pvm" in choice.reason


def test_dev_kvm_without_hardware_module_is_tcg(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    make_kvm(dev_kvm)
    assert choose_accel({}, sys_module, dev_kvm).name == "tcg"


def test_nothing_is_tcg(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    choice = choose_accel({}, sys_module, dev_kvm)
    assert choice.name == "tcg"
    assert "no /dev/kvm" in choice.reason


@pytest.mark.parametrize(("value", "expected"), [("kvm", "kvm"), ("TCG", "tcg"), (" tcg ", "tcg")])
def test_env_override(host: tuple[Path, Path], value: str, expected: str) -> None:
    sys_module, dev_kvm = host
    (sys_module / "kvm_intel").mkdir()
    make_kvm(dev_kvm)
    choice = choose_accel({"NOVASANDBOX_ACCEL": value}, sys_module, dev_kvm)
    assert choice.name == expected
    assert "NOVASANDBOX_ACCEL" in choice.reason


def test_empty_override_is_ignored(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    assert choose_accel({"NOVASANDBOX_ACCEL": ""}, sys_module, dev_kvm).name == "tcg"


@pytest.mark.parametrize("value", ["hvf", "kvm,tcg", "xen"])
def test_invalid_override(host: tuple[Path, Path], value: str) -> None:
    sys_module, dev_kvm = host
    with pytest.raises(ConfigError) as info:
        choose_accel({"NOVASANDBOX_ACCEL": value}, sys_module, dev_kvm)
    assert info.value.code == "invalid-config"


def test_override_comes_from_os_environ_by_default(
    host: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sys_module, dev_kvm = host
    monkeypatch.setenv("NOVASANDBOX_ACCEL", "kvm")
    assert choose_accel(sys_module=sys_module, dev_kvm=dev_kvm).name == "kvm"
    monkeypatch.setenv("NOVASANDBOX_ACCEL", "bogus")
    with pytest.raises(ConfigError):
        choose_accel(sys_module=sys_module, dev_kvm=dev_kvm)


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root can open any file")
def test_unusable_dev_kvm_is_tcg(host: tuple[Path, Path]) -> None:
    sys_module, dev_kvm = host
    (sys_module / "kvm_intel").mkdir()
    make_kvm(dev_kvm)
    dev_kvm.chmod(0o000)
    choice = choose_accel({}, sys_module, dev_kvm)
    assert choice.name == "tcg"
    assert "not accessible" in choice.reason


def test_admission_arithmetic() -> None:
    from novasandbox.errors import HostMemoryExhausted
    from novasandbox.host.limits import ADMISSION_OVERHEAD_MIB, admit, available_memory_mib

    assert available_memory_mib("MemTotal: 1 kB\nMemAvailable:   2097152 kB\n") == 2048
    admit(256, 256 + ADMISSION_OVERHEAD_MIB + 100, 100)  # exactly enough
    with pytest.raises(HostMemoryExhausted):
        admit(256, 256 + ADMISSION_OVERHEAD_MIB + 99, 100)


def test_reserve_setting() -> None:
    from novasandbox.errors import ConfigError
    from novasandbox.host.limits import DEFAULT_RESERVE_MIB, reserve_mib

    assert reserve_mib({}) == DEFAULT_RESERVE_MIB
    assert reserve_mib({"NOVASANDBOX_MEMORY_RESERVE_MIB": "64"}) == 64
    with pytest.raises(ConfigError):
        reserve_mib({"NOVASANDBOX_MEMORY_RESERVE_MIB": "lots"})


def test_qemu_runs_under_its_seccomp_sandbox(tmp_path: Path) -> None:
    argv = build(make_spec(tmp_path))
    sandbox = option(argv, "-sandbox").split(",")
    assert sandbox[0] == "on"
    for deny in ("obsolete", "elevateprivileges", "spawn", "resourcecontrol"):
        assert f"{deny}=deny" in sandbox
    assert "-runas" not in argv
    assert "-chroot" not in argv


def test_confined_qemu_drops_to_its_uid_in_an_empty_chroot(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, confine=Confinement(VMM_ID_BASE + 7, VMM_ID_BASE + 7))
    argv = build(spec)
    assert option(argv, "-runas") == f"{VMM_ID_BASE + 7}:{VMM_ID_BASE + 7}"
    assert option(argv, "-chroot") == str(spec.paths.jail)
    assert spec.paths.jail.parent == spec.paths.state_dir
    sandbox = option(argv, "-sandbox").split(",")
    # -runas calls setgid/setuid after the filter is installed; the rest stays denied
    assert "elevateprivileges=allow" in sandbox
    for deny in ("obsolete", "spawn", "resourcecontrol"):
        assert f"{deny}=deny" in sandbox


def test_confinement_only_for_root_and_never_a_taken_uid() -> None:
    assert confinement("sb-1", euid=1000) is None
    first = confinement("sb-1", euid=0)
    assert first is not None
    assert first.uid == first.gid
    assert VMM_ID_BASE <= first.uid < VMM_ID_BASE + VMM_ID_COUNT
    assert confinement("sb-1", euid=0) == first  # derived from the id
    moved = confinement("sb-1", {first.uid, first.uid + 1}, euid=0)
    assert moved is not None
    assert moved.uid not in (first.uid, first.uid + 1)
    ids = {c.uid for i in range(2000) if (c := confinement(f"sb-{i}", euid=0))}
    assert len(ids) > 1990  # spread over the range


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
cpu MHz\t\t: 2596.120
flags\t\t: fpu vme tsc constant_tsc nonstop_tsc tsc_known_freq
bogomips\t: 5192.24

processor\t: 1
flags\t\t: fpu
bogomips\t: 1.00
"""


def test_the_hosts_tsc_rate_comes_from_its_first_processor() -> None:
    assert tsc_khz_from_cpuinfo(CPUINFO) == 2_596_120


@pytest.mark.parametrize(
    "text",
    [
        CPUINFO.replace(" constant_tsc", ""),  # a TSC whose rate varies says nothing
        CPUINFO.replace("bogomips\t: 5192.24\n", ""),
        CPUINFO.replace("5192.24", "lots"),
        CPUINFO.replace("5192.24", "0.5"),  # implausible
        "",
    ],
)
def test_an_unknown_tsc_rate_is_none(text: str) -> None:
    assert tsc_khz_from_cpuinfo(text) is None


def test_tcg_guests_are_told_the_tsc_rate_and_kvm_guests_are_not(tmp_path: Path) -> None:
    tcg = kernel_cmdline(make_spec(tmp_path, accel="tcg"), 2_596_120).split()
    assert "tsc_early_khz=2596120" in tcg
    unknown = kernel_cmdline(make_spec(tmp_path, accel="tcg")).split()
    assert not any(a.startswith("tsc_early_khz") for a in unknown)
    kvm = kernel_cmdline(make_spec(tmp_path, accel="kvm"), 2_596_120).split()
    assert not any(a.startswith("tsc_early_khz") for a in kvm)
    argv = build(make_spec(tmp_path, accel="tcg"), tsc_khz=2_596_120)
    assert "tsc_early_khz=2596120" in option(argv, "-append").split()
