"""Template warm-up: build what ``Sandbox.create`` restores by default.

``build`` makes whatever of a template is missing from the cache: its kernel, base and
image (``templates/build.py``), then its snapshots (one without and one with a network
device, booted once each with the template's default machine shape, warmed up and
saved). It boots sandboxes, so it sits above ``sandbox.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import shutil
from typing import Any

from .layers import build_layers
from .network import DETACHED
from .sandbox import AsyncSandbox
from .snapshots import (
    DISK,
    MANIFEST,
    Snapshot,
    saved,
    stale_template_snapshots,
    template_snapshot,
    template_snapshot_dir,
)
from .templates import BuiltTemplate, Template, TemplateManager, name_backing_relative
from .templates.build import BuildReporter, LogReporter, build_artifacts, build_root
from .vm import get_provider

log = logging.getLogger("novasandbox.warmup")

WARMUP_COMMANDS = (["/bin/true"], "echo warm | cat", ["python3", "-c", "import json, os, sys"])
"""Run in the template VM before it is saved: what a sandbox's first commands use (the
agent's spawn path, the shell, the Python interpreter) is then in the snapshot's page
cache instead of being read through the disk chain after every restore."""

DROP_CACHES = "sync && echo 3 > /proc/sys/vm/drop_caches"
"""Run once the warm-up is done: the page cache and the reclaimable kernel caches of the
boot go (the agent's modules, read once at import), then ``WARMUP_COMMANDS`` run again
and read back what a sandbox's first commands use, and nothing else."""

ZERO_FREE_MEMORY = r"""
import mmap
def meminfo(field):
    for line in open("/proc/meminfo"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
high = 0
for line in open("/proc/zoneinfo"):
    words = line.split()
    if len(words) == 2 and words[0] == "high":
        high += int(words[1]) * mmap.PAGESIZE
size = meminfo("MemFree") - high - (2 << 20)
if size > 0:
    mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_POPULATE).close()
"""
"""Run last, before the template VM is saved: takes (and thereby zeroes: the kernel hands
a process only cleared pages) nearly all free guest memory, and gives it back on exit.
Freed memory keeps what was in it (the boot's freed init code, exited processes' heaps,
the dropped caches); zeroed, those pages are skipped by QEMU's save (a zero page is a
9-byte record in the memory image) and cost nothing after a restore. Stays above the
kernel's high watermarks (``/proc/zoneinfo``), so that nothing of the page cache is
reclaimed to make room."""


def up_to_date(manager: TemplateManager, name: str, provider: str | None = None) -> bool:
    """Built, and snapshotted for this host's provider (accelerator, VMM version)."""
    tpl = manager.get(name)
    built = manager.built(tpl)
    engine = get_provider(provider).engine()
    return built is not None and all(
        template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, engine, nic=nic) is not None
        for nic in (False, True)
    )


def build(
    manager: TemplateManager,
    name: str,
    *,
    reporter: Any = None,
    force: bool = False,
    provider: str | None = None,
) -> BuiltTemplate:
    """Build whatever of the template is missing from the cache (kernel, root file
    system, image, snapshots); a no-op when all is there."""
    tpl = manager.get(name)
    rep = reporter or LogReporter()
    built = build_image_chain(manager, tpl, rep, force=force, provider=provider)
    engine = get_provider(provider).engine()
    rebuilt = False
    for nic in (False, True):
        if not force and template_snapshot(
            manager, built, tpl.vcpus, tpl.memory_mib, engine, nic=nic
        ):
            continue
        step = "snapshot (network)" if nic else "snapshot"
        rep.step(step, "booting the template once to save its snapshot")
        snap = build_snapshot(manager, built, nic=nic, provider=provider)
        rep.done(step, f"{snap.size_bytes / 1e6:.0f} MB, guest stopped {snap.save_seconds:.2f} s")
        rebuilt = True
    if rebuilt:
        # the template's snapshots were made again (new VMM, accelerator, --force): the
        # other shapes' go with them (a rebuilt image already took them along), and
        # those of an older snapshot recipe or default shape
        manager.remove_shape_snapshots(tpl)
        for stale in stale_template_snapshots(manager, tpl, engine):
            shutil.rmtree(stale, ignore_errors=True)
    return built


def build_image_chain(
    manager: TemplateManager,
    tpl: Template,
    rep: BuildReporter,
    *,
    force: bool = False,
    provider: str | None = None,
) -> BuiltTemplate:
    """The template's image: one image (a suite template without steps), or its root
    (its parent's image, built first, or its own) and its layers. ``force`` rebuilds
    this template's own artifacts and layers, not its parent's."""
    if force:
        # its image is made again, in place: what was built over it would be layered on
        # other bytes now, so it is no longer built (rebuilt on its next build)
        for dependent in manager.dependents(tpl.name):
            manager.remove(dependent, force=True, definition=False)
            rep.done(dependent, f"no longer built: it starts from {tpl.name}, rebuilt now")
    if not tpl.layered:
        return build_artifacts(manager, tpl.name, reporter=rep, force=force)
    if tpl.parent is not None:
        if manager.built(tpl.parent) is None:
            rep.step(tpl.parent.name, f"building the parent template {tpl.parent.name}")
            build_image_chain(manager, tpl.parent, rep, provider=provider)
    else:
        build_root(manager, tpl, reporter=rep, force=force)
    if not force and (built := manager.built(tpl)) is not None:
        return built
    return build_layers(manager, tpl, reporter=rep, no_cache=force, provider=provider)


def build_snapshot(
    manager: TemplateManager,
    built: BuiltTemplate,
    *,
    nic: bool = False,
    provider: str | None = None,
) -> Snapshot:
    """Boot the template cold with its default machine shape, warm it up, save it, kill
    it. With ``nic`` the VM has a network device (and no egress): what networked
    sandboxes restore.

    Blocking; runs its own event loop on a worker thread, so it may be called from
    anywhere (also from inside a running loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = _build_snapshot(manager, built, nic, provider)
        return pool.submit(asyncio.run, job).result()


async def _build_snapshot(
    manager: TemplateManager, built: BuiltTemplate, nic: bool, provider: str | None
) -> Snapshot:
    tpl = built.template
    engine = get_provider(provider).engine()
    dest = template_snapshot_dir(manager, tpl, tpl.vcpus, tpl.memory_mib, engine, nic=nic)
    partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sb = await AsyncSandbox._create_local(
        tpl.name,
        cold=True,
        timeout=None,
        templates=manager,
        network=DETACHED if nic else "none",
        provider=provider,
    )
    try:
        await sb._start_template_command(tpl)
        for warm in WARMUP_COMMANDS:
            await sb.commands.run(warm, timeout=60)
        await trim_guest_memory(sb)
        took, frozen = await sb._capture(partial, resume=False, drop_caches=False)
        snap = saved(
            snapshot_id=f"template-{tpl.name}-{dest.name}",
            kind="template",
            template=tpl.name,
            directory=dest,
            files=partial,
            kernel=built.kernel,
            backing=built.rootfs,
            config=sb.config,
            engine=engine,
            took=took,
            network=DETACHED if nic else "none",
            frozen=frozen,
        )
    finally:
        await sb.kill()
    try:
        # its disk names the image under it relative to where it will live: the cache moves
        name_backing_relative(partial / DISK, built.rootfs, dest)
        (partial / MANIFEST).write_text(snap.manifest_text())
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("template %s snapshot saved: %s (%d bytes)", tpl.name, dest, snap.size_bytes)
    return snap


async def trim_guest_memory(sb: AsyncSandbox) -> None:
    """Leave in the guest's memory only what a restored sandbox uses: drop the caches
    (as root), warm up again (as the template's user, as sandboxes' first commands run),
    zero the free memory (``DROP_CACHES``, ``ZERO_FREE_MEMORY``)."""
    steps = [(DROP_CACHES, "root"), *((c, None) for c in WARMUP_COMMANDS)]
    steps.append((["python3", "-S", "-c", ZERO_FREE_MEMORY], "root"))
    for command, user in steps:
        result = await sb.commands.run(command, timeout=120, user=user)
        if result.exit_code != 0:
            log.warning(
                "template warm-up step %r exited %d: %s",
                command[:2] if isinstance(command, list) else command,
                result.exit_code,
                result.stderr[-500:],
            )
