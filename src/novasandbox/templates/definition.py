"""A template's definition: what its TOML file (or ``TemplateBuilder``) says, checked.

A template starts from one of three roots and adds build steps, each a layer:

* a Debian suite (``[image] suite/variant/packages/customize``): ``mmdebstrap`` makes
  the root file system, as for the shipped ``python`` template;
* another template (``from = "python"``): its built image, with its defaults;
* a container image (``from_oci = "image.tar"``): its layers, environment, working
  directory, user and command (``oci.py``).

Steps run in that order, each as root in a build VM booted from the layer before it:
``apt`` (Debian packages: ``[image] packages`` of a template that starts from another
one or from a container image), ``pip`` (Python packages, downloaded by the host's pip
for the guest's Python and installed offline), ``copy`` (files and directories from the
host, ``[[files]]``) and ``run`` (shell commands, with a network during the build
only). A ``[[steps]]`` array gives them in any order instead.

Then the defaults of everything run in its sandboxes (``env``, ``workdir``, ``user``),
a ``start_cmd`` that every sandbox starts with already running (started before the
template's snapshot is saved, once ``ready_cmd`` succeeds) and the machine's defaults.

Every key is checked: an unknown key or a wrong type is a ``TemplateError`` naming the
file and the key. The definition is a frozen value; ``to_toml`` writes it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..config import MachineConfig, validate_env, validate_user
from ..errors import ConfigError, NovaSandboxError, TemplateError
from ..network import parse_allow
from .oci import OciImage, load_image

BUILTIN_DIR = Path(__file__).resolve().parent
GUEST_DIR = BUILTIN_DIR.parent / "guest"
GUEST_FILES = ("init", "agent.py", "protocol.py", "interp.py")
IMAGE_RECIPE = "3"
"""Bump when the image build steps change."""
KERNEL_RECIPE = "1"
"""Bump when the kernel build steps change in a way that changes the result."""
LAYER_RECIPE = "2"
"""Bump when how a step's layer is made changes."""

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_OWNER = re.compile(
    r"^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})(:([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10}))?$"
)
MAX_PARENTS = 8
"""How deep ``from`` may chain."""
MAX_STEPS = 64
MAX_COMMAND = 64 * 1024
"""Characters of one ``run``/``start_cmd``/``ready_cmd`` command."""

StepKind = Literal["apt", "pip", "copy", "run"]


def sha256_parts(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Step:
    """One build step: ``apt`` packages, ``pip`` requirements, a ``run`` command (one
    shell string in ``args``), or a ``copy`` of ``src`` (a host path) to ``dest``."""

    kind: StepKind
    args: tuple[str, ...] = ()
    src: Path | None = None
    dest: str = ""
    mode: int | None = None
    """copy: the mode of every file (and directory) copied; None keeps the host's."""
    owner: str = "root"
    """copy: ``USER[:GROUP]`` (names or numbers) that owns what is copied."""
    digest: str | None = None
    """copy: the content's digest (``tree_digest``) as a pinned definition says it (an
    exported template's, on a host without ``src``); None: read ``src`` for it."""

    def describe(self) -> str:
        if self.kind == "copy":
            mode = f" mode {self.mode:04o}" if self.mode is not None else ""
            return f"copy {self.src} -> {self.dest} ({self.owner}{mode})"
        if self.kind == "run":
            return f"run: {self.args[0]}"
        return f"{self.kind}: {' '.join(self.args)}"

    def key(self) -> tuple[str, ...]:
        """What the step's layer depends on: its kind and arguments; for a copy, the
        content of what it copies (names, modes, bytes), not where it is on the host."""
        if self.kind != "copy":
            return (self.kind, *self.args)
        assert self.src is not None
        return (
            "copy",
            self.content_digest(),
            self.dest,
            "" if self.mode is None else oct(self.mode),
            self.owner,
        )

    def content_digest(self) -> str:
        """A copy's content digest: the pinned one, or that of ``src`` as it is now."""
        assert self.src is not None
        return self.digest if self.digest is not None else tree_digest(self.src)

    def to_json(self, *, pinned: bool = False) -> dict[str, Any]:
        if self.kind == "copy":
            out: dict[str, Any] = {"copy": str(self.src), "dest": self.dest}
            if pinned:
                out["digest"] = self.content_digest()
            if self.mode is not None:
                out["mode"] = f"{self.mode:04o}"
            if self.owner != "root":
                out["owner"] = self.owner
            return out
        if self.kind == "run":
            return {"run": self.args[0]}
        return {self.kind: list(self.args)}


def tree_digest(src: Path, limit: int = 100_000) -> str:
    """A digest of a file or directory tree as copied: relative names, kinds, modes,
    symlink targets and contents (not times, not owners). ``TemplateError`` if it is
    gone, unreadable, or has more than ``limit`` entries."""
    h = hashlib.sha256()
    count = 0

    def add(path: Path, rel: str) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise TemplateError(f"{src} has more than {limit} files to copy")
        st = path.lstat()
        h.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(path).encode() + b"\0")
        elif stat.S_ISREG(st.st_mode):
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")
        elif stat.S_ISDIR(st.st_mode):
            for child in sorted(path.iterdir()):
                add(child, f"{rel}/{child.name}")
        else:
            raise TemplateError(f"{path}: only files, directories and symlinks can be copied")

    try:
        add(src, ".")
    except OSError as exc:
        raise TemplateError(f"cannot read {src} to copy it: {exc}") from exc
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Template:
    """A template definition (from its TOML file or a ``TemplateBuilder``), with what it
    inherits from its parent resolved: ``env`` is the parent's and its own, ``user``,
    ``workdir``, ``start_cmd``, the machine and the kernel are its own or the parent's."""

    name: str
    description: str = ""
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    """Debian packages of the root file system (a suite root only)."""
    disk_size_mib: int = 1024
    vcpus: int = 1
    memory_mib: int = 256
    kernel_source_package: str = "linux-source-6.1"
    kernel_config: str = field(default="", repr=False)
    source: Path | None = None
    """The TOML file it was read from (None: made in Python and not saved)."""
    customize: tuple[str, ...] = ()
    """Shell commands run in a chroot of the root file system after its packages."""
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    """The default environment of commands in this template's sandboxes."""
    user: str = "root"
    """The guest account calls act as when they name none (the template must have it)."""
    parent: Template | None = None
    """The template it starts from (``from``), resolved."""
    oci: Path | None = None
    """The container image it starts from (``from_oci``)."""
    oci_tag: str | None = None
    """Which image of an archive that holds several (``oci_tag``)."""
    oci_digest: str = ""
    """The container image's config digest (``sha256:...``): its identity."""
    steps: tuple[Step, ...] = ()
    workdir: str | None = None
    """The working directory of commands that name none (None: the user's home)."""
    start_cmd: str | None = None
    ready_cmd: str | None = None
    ready_timeout: float = 120.0
    """Seconds ``ready_cmd`` has to succeed once ``start_cmd`` started."""
    build_allow: tuple[str, ...] | None = None
    """Where build steps may connect (None: the public internet; ``apt`` steps may also
    reach Debian's mirrors)."""
    step_timeout: float = 1800.0

    # --- what it is made of

    @property
    def layered(self) -> bool:
        """Built as layers (a parent, a container image or steps), not one image."""
        return self.parent is not None or self.oci is not None or bool(self.steps)

    @property
    def root_kind(self) -> Literal["suite", "template", "oci"]:
        if self.parent is not None:
            return "template"
        return "oci" if self.oci is not None else "suite"

    def guest_defaults(self) -> str:
        """What the image tells its guest agent about the template (``template.json``
        beside the agent): the default environment of its commands, their account and
        working directory."""
        defaults: dict[str, Any] = {"env": dict(self.env), "user": self.user}
        if self.workdir is not None:
            defaults["workdir"] = self.workdir
        return json.dumps(defaults, sort_keys=True)

    # --- digests: each artifact is keyed by exactly the inputs that shape it

    @property
    def kernel_digest(self) -> str:
        if self.parent is not None:
            return self.parent.kernel_digest
        return sha256_parts(
            "kernel", KERNEL_RECIPE, self.kernel_source_package, self.kernel_config
        )[:16]

    @property
    def base_digest(self) -> str:
        """The suite root's mmdebstrap tarball (a parent's for a derived template)."""
        if self.parent is not None:
            return self.parent.base_digest
        parts = ["base", self.suite, self.variant, *sorted(self.packages)]
        if self.customize:  # "#" cannot start a package name
            parts += ["#customize", *self.customize]
        return sha256_parts(*parts)[:16]

    @property
    def root_digest(self) -> str:
        """The layer the steps start from: a suite's or a container image's root file
        system with the guest agent (and, for a template of one layer, its defaults),
        or the parent's whole image."""
        if self.parent is not None:
            return self.parent.image_digest
        guest = [(GUEST_DIR / f).read_bytes() for f in GUEST_FILES]
        defaults = "{}" if self.layered else self.guest_defaults()
        origin = ["oci", self.oci_digest] if self.oci is not None else [self.base_digest]
        return sha256_parts(
            "image", IMAGE_RECIPE, *origin, str(self.disk_size_mib), defaults, *guest
        )[:16]

    @property
    def layer_digests(self) -> tuple[str, ...]:
        """The digest of each step's layer, then of the defaults' layer (a layered
        template's last): each depends on everything before it."""
        if not self.layered:
            return ()
        out: list[str] = []
        previous = self.root_digest
        for step in self.steps:
            previous = sha256_parts("layer", LAYER_RECIPE, previous, *step.key())[:16]
            out.append(previous)
        out.append(sha256_parts("defaults", LAYER_RECIPE, previous, self.guest_defaults())[:16])
        return tuple(out)

    @property
    def image_digest(self) -> str:
        """The digest of the disk a sandbox boots: its last layer."""
        return self.layer_digests[-1] if self.layered else self.root_digest

    @property
    def digest(self) -> str:
        """The template's identity: the image and the kernel it boots."""
        return sha256_parts(self.image_digest, self.kernel_digest)[:16]

    # --- writing it back

    def to_dict(self, *, pinned: bool = False) -> dict[str, Any]:
        """The definition as its TOML file says it (steps as ``[[steps]]``); what it
        inherits from a parent is left to the parent. ``pinned``: with the digests of
        what it reads from this host (each copy's content, the container image), so that
        it reads as the same template where those files are not (``template export``)."""
        own_env = dict(self.env)
        base: Template | None = self.parent
        if base is not None:
            own_env = {k: v for k, v in own_env.items() if base.env.get(k) != v}
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.parent is not None:
            out["from"] = self.parent.name
        elif self.oci is not None:
            out["from_oci"] = str(self.oci)
            if pinned:
                out["oci_digest"] = self.oci_digest
            if self.oci_tag is not None:
                out["oci_tag"] = self.oci_tag
            if self.start_cmd is None:
                out["start_cmd"] = ""  # not the image's command
        for key, value, inherited in (
            ("user", self.user, base.user if base else "root"),
            ("workdir", self.workdir, base.workdir if base else None),
            ("start_cmd", self.start_cmd, base.start_cmd if base else None),
            ("ready_cmd", self.ready_cmd, base.ready_cmd if base else None),
            ("ready_timeout", self.ready_timeout, base.ready_timeout if base else 120.0),
        ):
            if value != inherited:
                out[key] = value
        if own_env:
            out["env"] = own_env
        if self.steps:
            out["steps"] = [s.to_json(pinned=pinned) for s in self.steps]
        if self.root_kind == "suite":
            image: dict[str, Any] = {"suite": self.suite, "variant": self.variant}
            if self.packages:
                image["packages"] = list(self.packages)
            if self.customize:
                image["customize"] = list(self.customize)
            image["disk_size_mib"] = self.disk_size_mib
            out["image"] = image
        elif self.oci is not None and self.disk_size_mib != 1024:
            out["image"] = {"disk_size_mib": self.disk_size_mib}
        machine = {
            k: v
            for k, v, inherited in (
                ("vcpus", self.vcpus, base.vcpus if base else None),
                ("memory_mib", self.memory_mib, base.memory_mib if base else None),
            )
            if v != inherited
        }
        if machine:
            out["machine"] = machine
        build: dict[str, Any] = {}
        if self.build_allow is not None:
            build["allow"] = list(self.build_allow)
        if self.step_timeout != 1800.0:
            build["step_timeout"] = self.step_timeout
        if build:
            out["build"] = build
        if self.root_kind != "template" and self.kernel_source_package != "linux-source-6.1":
            out["kernel"] = {"source_package": self.kernel_source_package}
        return out

    def to_toml(self, *, pinned: bool = False) -> str:
        return dumps_toml(self.to_dict(pinned=pinned))


# ----------------------------------------------------------------------------- parsing

_TOP_KEYS = {
    "name": str,
    "description": str,
    "from": str,
    "from_oci": str,
    "oci_tag": str,
    "oci_digest": str,
    "user": str,
    "workdir": str,
    "env": dict,
    "pip": list,
    "run": list,
    "files": list,
    "steps": list,
    "start_cmd": str,
    "ready_cmd": str,
    "ready_timeout": (int, float),
    "image": dict,
    "machine": dict,
    "kernel": dict,
    "build": dict,
}
_TABLE_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "image": {
        "suite": str,
        "variant": str,
        "packages": list,
        "customize": list,
        "disk_size_mib": int,
    },
    "machine": {"vcpus": int, "memory_mib": int},
    "kernel": {"source_package": str, "config": str},
    "build": {"allow": list, "step_timeout": (int, float)},
}
_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "digest": str,
    "src": str,
    "dest": str,
    "mode": (str, int),
    "owner": str,
}
_STEP_KEYS: dict[str, type | tuple[type, ...]] = {
    "digest": str,
    "apt": list,
    "pip": list,
    "run": str,
    "copy": str,
    "dest": str,
    "mode": (str, int),
    "owner": str,
}


class _Bad(Exception):
    """A key of the file and what is wrong with it (turned into a ``TemplateError``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def _typed(table: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise _Bad(f"{where}{key}", f"unknown key (known: {known})")
        want = schema[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            kind = {"str": "a string", "int": "an integer", "float": "a number"}
            names = " or ".join(kind.get(n, "a " + n) for n in names.split(" or "))
            raise _Bad(f"{where}{key}", f"must be {names}, not {type(value).__name__}")


def _strings(value: list[Any], key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or "\0" in item:
            raise _Bad(key, f"must be a list of non-empty strings, got {item!r}")
        if len(item) > MAX_COMMAND:
            raise _Bad(key, f"an entry is longer than {MAX_COMMAND} characters")
        if pattern is not None and not pattern.fullmatch(item):
            raise _Bad(key, f"invalid entry {item!r}")
        out.append(item)
    return tuple(out)


def _command(value: str, key: str) -> str:
    if not value.strip() or "\0" in value or len(value) > MAX_COMMAND:
        raise _Bad(key, "must be a non-empty shell command without NUL bytes")
    return value


def _requirement(text: str) -> bool:
    """A pip requirement, not an option (``--index-url`` would change where pip looks)."""
    return not text.startswith("-") and "\n" not in text


def _mode(value: str | int, key: str) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError:
        raise _Bad(key, f'must be an octal mode such as "0755", got {value!r}') from None
    if not 0 <= mode <= 0o7777:
        raise _Bad(key, f'must be an octal mode such as "0755", got {value!r}')
    return mode


def guest_dest(value: str, key: str) -> str:
    if not value.startswith("/") or "\0" in value or ".." in PurePosixPath(value).parts:
        raise _Bad(key, f"must be an absolute guest path without '..', got {value!r}")
    return value


def _copy_step(entry: Mapping[str, Any], key: str, base_dir: Path, src_key: str) -> Step:
    if src_key not in entry or "dest" not in entry:
        raise _Bad(key, f"needs {src_key} and dest")
    src = Path(entry[src_key]).expanduser()
    if not src.is_absolute():
        src = base_dir / src
    pinned = entry.get("digest")
    if pinned is not None and not _HEX64.fullmatch(pinned):
        raise _Bad(f"{key}.digest", "must be the content's sha256 (64 hex digits)")
    there = src.exists() or src.is_symlink()
    if not there and pinned is None:
        raise _Bad(f"{key}.{src_key}", f"{src} does not exist")
    if there and pinned is not None and tree_digest(src) != pinned:
        raise _Bad(f"{key}.{src_key}", f"{src} is not what the definition pins (digest)")
    owner = entry.get("owner", "root")
    if not _OWNER.fullmatch(owner):
        raise _Bad(f"{key}.owner", f"must be USER or USER:GROUP (names or ids), got {owner!r}")
    mode = _mode(entry["mode"], f"{key}.mode") if "mode" in entry else None
    dest = guest_dest(entry["dest"], f"{key}.dest")
    return Step("copy", (), src, dest, mode, owner, pinned)


def parse_steps(data: Mapping[str, Any], base_dir: Path, apt: tuple[str, ...]) -> tuple[Step, ...]:
    """The steps of a definition: ``[[steps]]``, or in the fixed order apt (``apt``),
    ``pip``, ``[[files]]``, ``run`` (the two forms do not mix)."""
    steps: list[Step] = []
    short = [k for k in ("pip", "run", "files") if k in data]
    if "steps" in data:
        if short or apt:
            keys = ", ".join([*short, *(["[image] packages"] if apt else [])])
            raise _Bad("steps", f"give the steps either as [[steps]] or as {keys}, not both")
        for i, entry in enumerate(data["steps"]):
            key = f"steps[{i}]"
            if not isinstance(entry, dict):
                raise _Bad(key, "must be a table")
            _typed(entry, _STEP_KEYS, f"{key}.")
            kinds = [k for k in ("apt", "pip", "run", "copy") if k in entry]
            if len(kinds) != 1:
                raise _Bad(key, "must have exactly one of apt, pip, run, copy")
            kind = kinds[0]
            if kind != "copy" and set(entry) - {kind}:
                raise _Bad(key, f"a {kind} step takes no {', '.join(sorted(set(entry) - {kind}))}")
            if kind == "copy":
                steps.append(_copy_step(entry, key, base_dir, "copy"))
            elif kind == "run":
                steps.append(Step("run", (_command(entry["run"], f"{key}.run"),)))
            elif kind == "apt":
                steps.append(Step("apt", _strings(entry["apt"], f"{key}.apt", _PACKAGE)))
            else:
                reqs = _strings(entry["pip"], f"{key}.pip")
                if not all(map(_requirement, reqs)):
                    raise _Bad(f"{key}.pip", "must list requirements, not pip options")
                steps.append(Step("pip", reqs))
    else:
        if apt:
            steps.append(Step("apt", apt))
        if "pip" in data:
            reqs = _strings(data["pip"], "pip")
            if not all(map(_requirement, reqs)):
                raise _Bad("pip", "must list requirements, not pip options")
            if reqs:
                steps.append(Step("pip", reqs))
        for i, entry in enumerate(data.get("files", [])):
            key = f"files[{i}]"
            if not isinstance(entry, dict):
                raise _Bad(key, "must be a table")
            _typed(entry, _FILE_KEYS, f"{key}.")
            steps.append(_copy_step(entry, key, base_dir, "src"))
        for command in _strings(data.get("run", []), "run"):
            steps.append(Step("run", (command,)))
    for step in steps:
        if step.kind in ("apt", "pip") and not step.args:
            raise _Bad(step.kind, "lists nothing")
    if len(steps) > MAX_STEPS:
        raise _Bad("steps", f"at most {MAX_STEPS} steps")
    return tuple(steps)


def parse_definition(
    data: Mapping[str, Any], path: Path, parent: Template | None = None
) -> Template:
    """The template a TOML file's table describes (``parent``: its ``from``, resolved
    by the caller). ``TemplateError`` naming the file and the key when it is wrong."""
    try:
        return _parse(data, path, parent)
    except _Bad as exc:
        raise TemplateError(f"invalid template {path}: {exc}") from None


def _parse(data: Mapping[str, Any], path: Path, parent: Template | None) -> Template:
    _typed(data, _TOP_KEYS, "")
    for section in _TABLE_KEYS:
        if section in data:
            _typed(data[section], _TABLE_KEYS[section], f"[{section}] ")
    if "name" not in data:
        raise _Bad("name", "is missing")
    name = data["name"]
    if not NAME.fullmatch(name):
        raise _Bad("name", f"invalid template name {name!r} ([a-z0-9][a-z0-9_-]*)")
    image: Mapping[str, Any] = data.get("image", {})
    machine: Mapping[str, Any] = data.get("machine", {})
    kernel: Mapping[str, Any] = data.get("kernel", {})
    build: Mapping[str, Any] = data.get("build", {})
    roots = [k for k in ("from", "from_oci") if k in data]
    if len(roots) > 1:
        raise _Bad("from_oci", "a template starts from another template or an image, not both")
    if roots and ({"suite", "variant", "customize"} & set(image)):
        raise _Bad(
            "[image] suite",
            f"a template with {roots[0]} takes its root from there (suite, variant and "
            "customize belong to a template built from a Debian suite)",
        )
    if not roots and "image" not in data:
        raise _Bad("[image]", "is missing (or name a root with from = or from_oci =)")
    if "from" in data and (parent is None or parent.name != data["from"]):
        raise _Bad("from", f"template {data['from']!r} was not resolved")
    if parent is not None and "from" not in data:
        raise _Bad("from", "a parent was given for a template without from")
    if "from" in data and kernel:
        raise _Bad("[kernel]", "a template built from another boots its parent's kernel")
    packages = _strings(image.get("packages", []), "[image] packages", _PACKAGE)
    customize = _strings(image.get("customize", []), "[image] customize")
    base_dir = path.parent
    steps = parse_steps(data, base_dir, packages if roots else ())
    try:
        own_env = validate_env(data.get("env", {}))
    except ConfigError as exc:
        raise _Bad("env", exc.message) from None
    user = data.get("user", parent.user if parent else "root")
    try:
        validate_user(user)
    except ConfigError as exc:
        raise _Bad("user", exc.message) from None
    workdir = data.get("workdir", parent.workdir if parent else None)
    if workdir is not None:
        guest_dest(workdir, "workdir")
    oci: Path | None = None
    image_cfg: OciImage | None = None
    oci_tag = data.get("oci_tag")
    if oci_tag is not None and "from_oci" not in data:
        raise _Bad("oci_tag", "names an image of a from_oci archive, and there is none")
    pinned_oci = data.get("oci_digest")
    if pinned_oci is not None and "from_oci" not in data:
        raise _Bad("oci_digest", "pins the image of from_oci, and there is none")
    if "from_oci" in data:
        oci = Path(data["from_oci"]).expanduser()
        oci = oci if oci.is_absolute() else base_dir / oci
        if not oci.exists() and pinned_oci is None:
            raise _Bad("from_oci", f"{oci} does not exist")
    if oci is not None and not oci.exists():
        # a pinned definition (an exported template's): the image's defaults are in it
        if not (isinstance(pinned_oci, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", pinned_oci)):
            raise _Bad("oci_digest", "must be the image's config digest (sha256:...)")
    elif oci is not None:
        try:
            image_cfg = read_image(oci, oci_tag)
        except NovaSandboxError as exc:
            raise _Bad("from_oci", exc.message) from None
        if pinned_oci is not None and image_cfg.digest != pinned_oci:
            raise _Bad("from_oci", f"{oci} is not the image the definition pins (oci_digest)")
        if (image_cfg.os, image_cfg.architecture) not in (("linux", "amd64"), ("", "")):
            raise _Bad(
                "from_oci",
                f"the image is for {image_cfg.os}/{image_cfg.architecture}, not linux/amd64",
            )
        if "user" not in data:
            user = oci_user(image_cfg.user)
        if "workdir" not in data and image_cfg.workdir:
            workdir = guest_dest(image_cfg.workdir, "from_oci: the image's WorkingDir")
        try:
            validate_user(user)
        except ConfigError as exc:
            raise _Bad("from_oci: the image's User", exc.message) from None
    start_cmd = data.get("start_cmd", parent.start_cmd if parent else None)
    if image_cfg is not None and "start_cmd" not in data:
        command = (*image_cfg.entrypoint, *image_cfg.cmd)
        start_cmd = shlex.join(command) if command else None
    if start_cmd == "" and (image_cfg is not None or parent is not None):
        start_cmd = None  # "": none, where the image or the parent has one
    ready_cmd = data.get("ready_cmd", parent.ready_cmd if parent else None)
    if start_cmd is None and "ready_cmd" not in data:
        ready_cmd = None  # the parent's checked the parent's start command
    if start_cmd is not None:
        _command(start_cmd, "start_cmd")
    if ready_cmd is not None:
        _command(ready_cmd, "ready_cmd")
        if start_cmd is None:
            raise _Bad("ready_cmd", "checks a start_cmd, and there is none")
    ready_timeout = float(data.get("ready_timeout", parent.ready_timeout if parent else 120.0))
    if not 0 < ready_timeout <= 3600:
        raise _Bad("ready_timeout", "must be more than 0 and at most 3600 seconds")
    allow = build.get("allow")
    build_allow = None if allow is None else _strings(allow, "[build] allow")
    step_timeout = float(build.get("step_timeout", 1800.0))
    if not 0 < step_timeout <= 24 * 3600:
        raise _Bad("[build] step_timeout", "must be more than 0 and at most 86400 seconds")
    if parent is not None:
        kernel_config, kernel_package = parent.kernel_config, parent.kernel_source_package
        disk = parent.disk_size_mib
        if "disk_size_mib" in image and image["disk_size_mib"] != disk:
            raise _Bad(
                "[image] disk_size_mib",
                f"a template built from another has its disk size ({disk} MiB)",
            )
    else:
        config_name = kernel.get("config", "kernel.config")
        config_path = base_dir / config_name
        if not config_path.is_file():
            config_path = BUILTIN_DIR / config_name
        try:
            kernel_config = config_path.read_text()
        except OSError as exc:
            raise _Bad("[kernel] config", f"cannot read {config_path}: {exc}") from None
        kernel_package = kernel.get("source_package", "linux-source-6.1")
        disk = image.get("disk_size_mib", 1024)
    tpl = Template(
        name=name,
        description=data.get("description", ""),
        suite=image.get("suite", "bookworm") if not roots else "",
        variant=image.get("variant", "minbase") if not roots else "",
        packages=packages if not roots else (),
        disk_size_mib=disk,
        vcpus=machine.get("vcpus", parent.vcpus if parent else 1),
        memory_mib=machine.get("memory_mib", parent.memory_mib if parent else 256),
        kernel_source_package=kernel_package,
        kernel_config=kernel_config,
        source=path,
        customize=customize,
        env={
            **(parent.env if parent else {}),
            **(image_cfg.env if image_cfg else {}),
            **own_env,
        },
        user=user,
        parent=parent,
        oci=oci,
        oci_tag=oci_tag,
        oci_digest=image_cfg.digest if image_cfg else (pinned_oci or ""),
        steps=steps,
        workdir=workdir,
        start_cmd=start_cmd,
        ready_cmd=ready_cmd,
        ready_timeout=ready_timeout,
        build_allow=build_allow,
        step_timeout=step_timeout,
    )
    check_template(tpl)
    return tpl


def check_template(tpl: Template) -> None:
    """What every definition must satisfy, however it was made (``_Bad`` if not)."""
    if tpl.root_kind == "suite":
        if not re.fullmatch(r"[a-z]+", tpl.suite):
            raise _Bad("[image] suite", f"must be a plain word, got {tpl.suite!r}")
        if not re.fullmatch(r"[a-z]+", tpl.variant):
            raise _Bad("[image] variant", f"must be a plain word, got {tpl.variant!r}")
    if not re.fullmatch(r"linux-source-[0-9.]+", tpl.kernel_source_package):
        raise _Bad("[kernel] source_package", f"invalid: {tpl.kernel_source_package!r}")
    if not 256 <= tpl.disk_size_mib <= 1 << 20:
        raise _Bad("[image] disk_size_mib", f"out of range (256 to 1048576): {tpl.disk_size_mib}")
    try:
        MachineConfig(vcpus=tpl.vcpus, memory_mib=tpl.memory_mib)
    except ConfigError as exc:
        raise _Bad("[machine]", exc.message) from None
    if tpl.build_allow is not None:
        try:
            for entry in tpl.build_allow:
                parse_allow(entry)
        except ConfigError as exc:
            raise _Bad("[build] allow", exc.message) from None


_IMAGES: dict[tuple[str, str | None, int, int], OciImage] = {}


def read_image(path: Path, tag: str | None = None) -> OciImage:
    """A container image's config (``oci.load_image``), kept while the archive's size
    and time are the same: definitions are read often, archives can be large."""
    try:
        st = path.stat()
    except OSError as exc:
        raise TemplateError(f"cannot read the container image {path}: {exc}") from exc
    key = (str(path), tag, st.st_size, st.st_mtime_ns)
    image = _IMAGES.get(key)
    if image is None:
        image = load_image(path, tag)
        if len(_IMAGES) > 64:
            _IMAGES.clear()
        _IMAGES[key] = image
    return image


def oci_user(user: str | None) -> str:
    """The account an image's ``User`` names (``NAME``, ``NAME:GROUP``); root for none
    or uid 0. A numeric one has no name here: the template must say ``user =``."""
    name = (user or "").partition(":")[0]
    if name in ("", "0", "root"):
        return "root"
    if name.isdigit():
        raise _Bad(
            "user",
            f"the image runs as uid {name}; name its account with user = (as in the "
            "image's /etc/passwd)",
        )
    return name


# ------------------------------------------------------------------------ TOML writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dumps_toml(data: Mapping[str, Any]) -> str:
    """A TOML document of plain values, tables and arrays of tables (what ``to_dict``
    returns)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict) and key != "env":
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{key}]]"] + [
                f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()
            ]
    return "\n".join(lines) + "\n"
