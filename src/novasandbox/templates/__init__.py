"""Templates: what a sandbox boots from (a guest kernel, a root file system with our agent).

A template is a TOML file. The ones shipped in this package sit beside this module;
users add their own from directories named in ``NOVASANDBOX_TEMPLATE_PATH`` (separated
by ``:``) or passed to ``TemplateManager(template_dirs=...)``; a user template with a
shipped template's name replaces it.

Built artifacts are cached under the cache directory, keyed by a digest of their inputs:

    kernels/<kernel digest>/vmlinux            (shared by every template with that config)
    bases/<base digest>.tar                    (mmdebstrap output)
    templates/<name>/<image digest>/rootfs.ext4 + manifest.json

so building again when nothing changed does nothing.

Besides the package list, a template may carry ``[image] customize``: shell commands run
as root in a chroot of the new root file system once its packages are installed (part
of the base), and a top-level ``[env]`` table: the default environment of every command
run in its sandboxes (written into the image for the guest agent, so it holds for cold
boots and restored snapshots alike; a sandbox's ``env`` and a call's ``env`` override
it, name by name).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..snapshots import Snapshot

from ..config import MachineConfig, validate_env
from ..errors import ConfigError, TemplateError, TemplateNotBuilt, TemplateNotFound
from ..paths import cache_dir

BUILTIN_DIR = Path(__file__).resolve().parent
GUEST_DIR = BUILTIN_DIR.parent / "guest"
GUEST_FILES = ("init", "agent.py", "protocol.py")
TEMPLATE_DEFAULTS = "template.json"
"""Written beside the agent in the image: ``Template.guest_defaults()``."""
KERNEL_RECIPE = "1"
"""Bump when the kernel build steps change in a way that changes the result."""
IMAGE_RECIPE = "2"
"""Bump when the image build steps change."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _sha256(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Template:
    """A template definition (from its TOML file)."""

    name: str
    description: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    disk_size_mib: int
    vcpus: int
    memory_mib: int
    kernel_source_package: str
    kernel_config: str = field(repr=False)
    source: Path
    customize: tuple[str, ...] = ()
    """Shell commands run in a chroot of the root file system after its packages."""
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    """The default environment of commands in this template's sandboxes."""

    @classmethod
    def from_file(cls, path: Path) -> Template:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise TemplateError(f"cannot read template {path}: {exc}") from exc
        try:
            return cls._from_dict(data, path)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise TemplateError(f"invalid template {path}: {exc!r}") from exc

    @classmethod
    def _from_dict(cls, data: dict[str, Any], path: Path) -> Template:
        name = data["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"invalid template name {name!r}")
        image, machine, kernel = data["image"], data.get("machine", {}), data.get("kernel", {})
        for section, value in (("image", image), ("machine", machine), ("kernel", kernel)):
            if not isinstance(value, dict):
                raise ValueError(f"[{section}] must be a table")
        packages = image.get("packages", [])
        if not isinstance(packages, list) or not all(
            isinstance(p, str) and re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p) for p in packages
        ):
            raise ValueError(f"invalid package list {packages!r}")
        customize = image.get("customize", [])
        if not isinstance(customize, list) or not all(
            isinstance(c, str) and c.strip() and "\0" not in c for c in customize
        ):
            raise ValueError(f"[image] customize must be a list of shell commands: {customize!r}")
        raw_env = data.get("env", {})
        if not isinstance(raw_env, dict):
            raise ValueError("env must be a table of strings")
        try:
            env = validate_env(raw_env)
        except ConfigError as exc:
            raise ValueError(f"env: {exc.message}") from None
        config_name = kernel.get("config", "kernel.config")
        config_path = path.parent / config_name
        if not config_path.is_file():
            config_path = BUILTIN_DIR / config_name
        tpl = cls(
            name=name,
            description=str(data.get("description", "")),
            suite=str(image.get("suite", "bookworm")),
            variant=str(image.get("variant", "minbase")),
            packages=tuple(packages),
            disk_size_mib=int(image.get("disk_size_mib", 1024)),
            vcpus=int(machine.get("vcpus", 1)),
            memory_mib=int(machine.get("memory_mib", 256)),
            kernel_source_package=str(kernel.get("source_package", "linux-source-6.1")),
            kernel_config=config_path.read_text(),
            source=path,
            customize=tuple(customize),
            env=env,
        )
        if not re.fullmatch(r"[a-z]+", tpl.suite) or not re.fullmatch(r"[a-z]+", tpl.variant):
            raise ValueError("suite and variant must be plain words")
        if not 256 <= tpl.disk_size_mib <= 1 << 20:
            raise ValueError(f"disk_size_mib out of range: {tpl.disk_size_mib}")
        try:
            MachineConfig(vcpus=tpl.vcpus, memory_mib=tpl.memory_mib)
        except ConfigError as exc:
            raise ValueError(f"[machine]: {exc.message}") from None
        return tpl

    # Digests: each artifact is keyed by exactly the inputs that shape it.

    @property
    def kernel_digest(self) -> str:
        return _sha256("kernel", KERNEL_RECIPE, self.kernel_source_package, self.kernel_config)[:16]

    @property
    def base_digest(self) -> str:
        parts = ["base", self.suite, self.variant, *sorted(self.packages)]
        if self.customize:  # "#" cannot start a package name
            parts += ["#customize", *self.customize]
        return _sha256(*parts)[:16]

    @property
    def image_digest(self) -> str:
        guest = [(GUEST_DIR / f).read_bytes() for f in GUEST_FILES]
        return _sha256(
            "image",
            IMAGE_RECIPE,
            self.base_digest,
            str(self.disk_size_mib),
            self.guest_defaults(),
            *guest,
        )[:16]

    def guest_defaults(self) -> str:
        """What the image tells its guest agent about the template (``template.json``
        beside the agent): the default environment of its commands."""
        return json.dumps({"env": dict(self.env)}, sort_keys=True)

    @property
    def digest(self) -> str:
        """The template's identity: the image and the kernel it boots."""
        return _sha256(self.image_digest, self.kernel_digest)[:16]


@dataclass(frozen=True, slots=True)
class BuiltTemplate:
    """A template whose artifacts are in the cache and ready to boot."""

    template: Template
    kernel: Path
    rootfs: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.template.name


class TemplateManager:
    """Finds template definitions and their built artifacts; builds and removes them."""

    def __init__(
        self, cache: Path | None = None, template_dirs: Sequence[str | os.PathLike[str]] = ()
    ) -> None:
        self.cache = Path(cache) if cache is not None else cache_dir()
        env_dirs = [d for d in os.environ.get("NOVASANDBOX_TEMPLATE_PATH", "").split(":") if d]
        self.template_dirs = [BUILTIN_DIR, *map(Path, env_dirs), *map(Path, template_dirs)]

    # --- definitions

    def _definitions(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for directory in self.template_dirs:
            if directory.is_dir():
                for path in sorted(directory.glob("*.toml")):
                    found[path.stem] = path
        return found

    def list(self) -> list[Template]:
        return [Template.from_file(p) for _, p in sorted(self._definitions().items())]

    def get(self, name: str) -> Template:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TemplateNotFound(f"invalid template name {name!r}")
        path = self._definitions().get(name)
        if path is None:
            known = ", ".join(sorted(self._definitions())) or "none"
            raise TemplateNotFound(f"unknown template {name!r} (known: {known})")
        tpl = Template.from_file(path)
        if tpl.name != name:
            raise TemplateError(f"{path} declares name {tpl.name!r}, expected {name!r}")
        return tpl

    # --- artifacts

    def kernel_path(self, tpl: Template) -> Path:
        return self.cache / "kernels" / tpl.kernel_digest / "vmlinux"

    def base_path(self, tpl: Template) -> Path:
        return self.cache / "bases" / f"{tpl.base_digest}.tar"

    def image_dir(self, tpl: Template) -> Path:
        return self.cache / "templates" / tpl.name / tpl.image_digest

    def built(self, name: str | Template) -> BuiltTemplate | None:
        """The built artifacts of the template as it is defined now, or None."""
        tpl = self.get(name) if isinstance(name, str) else name
        manifest_file = self.image_dir(tpl) / "manifest.json"
        kernel = self.kernel_path(tpl)
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            return None
        rootfs = self.image_dir(tpl) / "rootfs.ext4"
        if not (kernel.is_file() and rootfs.is_file()):
            return None
        return BuiltTemplate(tpl, kernel, rootfs, manifest)

    def snapshot_dir(
        self, tpl: Template, vcpus: int, memory_mib: int, accel: str, *, nic: bool = False
    ) -> Path:
        from ..providers.qemu import qemu_version
        from ..snapshots import template_snapshot_key

        key = template_snapshot_key(
            tpl.image_digest, tpl.kernel_digest, qemu_version(), accel, vcpus, memory_mib, nic
        )
        return self.image_dir(tpl) / "snapshots" / key

    def template_snapshot(
        self, built: BuiltTemplate, vcpus: int, memory_mib: int, accel: str, *, nic: bool = False
    ) -> Snapshot | None:
        """The template's snapshot for this machine shape (with or without a network
        device) and host, if it was made."""
        from ..errors import SnapshotNotFound
        from ..snapshots import Snapshot

        directory = self.snapshot_dir(built.template, vcpus, memory_mib, accel, nic=nic)
        if not directory.is_dir():
            return None
        try:
            return Snapshot.load(directory)
        except SnapshotNotFound:
            return None

    def build_snapshot(self, name: str, *, accel: str | None = None, nic: bool = False) -> Snapshot:
        """Boot the built template once with its default machine shape, wait for the
        agent, quiesce and save it: what ``Sandbox.create`` restores by default (``nic``:
        the variant with a network device, which networked sandboxes restore)."""
        from ..snapshots import build_template_snapshot

        return build_template_snapshot(self, self.require_built(name), accel=accel, nic=nic)

    def require_built(self, name: str) -> BuiltTemplate:
        built = self.built(name)
        if built is None:
            raise TemplateNotBuilt(
                f"template {name!r} is not built (or changed since it was); "
                f"run: novasandbox template build {name}"
            )
        return built

    def up_to_date(self, name: str) -> bool:
        """Built, and snapshotted for this host's accelerator and QEMU."""
        from ..providers.qemu import choose_accel

        tpl = self.get(name)
        built = self.built(tpl)
        accel = choose_accel().name
        return built is not None and all(
            self.template_snapshot(built, tpl.vcpus, tpl.memory_mib, accel, nic=nic) is not None
            for nic in (False, True)
        )

    def build(self, name: str, *, reporter: Any = None, force: bool = False) -> BuiltTemplate:
        """Build whatever of the template is missing from the cache (kernel, root file
        system, image, snapshot); a no-op when all is there."""
        from ..providers.qemu import choose_accel
        from .build import LogReporter, build_template

        tpl = self.get(name)
        rep = reporter or LogReporter()
        if force or self.built(tpl) is None:
            build_template(self, tpl, reporter=rep, force=force)
        built = self.require_built(name)
        accel = choose_accel().name
        for nic in (False, True):
            if not force and self.template_snapshot(
                built, tpl.vcpus, tpl.memory_mib, accel, nic=nic
            ):
                continue
            step = "snapshot (network)" if nic else "snapshot"
            rep.step(step, "booting the template once to save its snapshot")
            snap = self.build_snapshot(name, accel=accel, nic=nic)
            rep.done(
                step,
                f"{snap.size_bytes / 1e6:.0f} MB, guest stopped {snap.save_seconds:.2f} s",
            )
        return built

    def remove(self, name: str) -> bool:
        """Remove every built image of a template (kernels and bases are shared; kept)."""
        tpl = self.get(name)
        target = self.cache / "templates" / tpl.name
        if not target.exists():
            return False
        for image in target.glob("*/rootfs.ext4"):
            image.chmod(0o644)
        shutil.rmtree(target)
        return True


__all__ = ["BuiltTemplate", "Template", "TemplateManager"]
