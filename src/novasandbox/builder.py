"""``TemplateBuilder``: a template defined in Python, the same definition a TOML file
gives (it is written as one), built like any other::

    from novasandbox import TemplateBuilder

    (
        TemplateBuilder("web")
        .from_template("python")
        .apt_install(["curl"])
        .pip_install(["six", "requests>=2"])
        .copy("app/", "/srv/app", mode=0o755, owner="user")
        .run_cmd("echo built > /opt/built")
        .set_envs({"GREETING": "hi"})
        .set_workdir("/home/user")
        .set_start_cmd("python3 -m http.server 8000", ready="curl -sf localhost:8000")
        .build()
    )

Each call adds to a TOML table (steps as ``[[steps]]``, in the order of the calls);
``definition`` parses it with the same code as a TOML file, so every check is the same
and the digests match a file that says the same. ``build`` saves the definition in the
cache's ``definitions`` folder (``Sandbox.create("web")`` finds it there) and builds it.
Relative host paths are taken relative to the current directory when ``copy`` is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import warmup
from .templates import BuiltTemplate, Template, TemplateManager
from .templates.build import BuildReporter


class TemplateBuilder:
    """Builds a template definition call by call (each method returns the builder)."""

    def __init__(
        self, name: str, *, description: str = "", templates: TemplateManager | None = None
    ) -> None:
        self._manager = templates or TemplateManager()
        self._data: dict[str, Any] = {"name": name}
        if description:
            self._data["description"] = description
        self._steps: list[dict[str, Any]] = []

    # --- where it starts

    def from_template(self, name: str) -> TemplateBuilder:
        """Start from another template's image (and its defaults)."""
        self._root({"from": name})
        return self

    def from_debian(
        self,
        suite: str = "bookworm",
        *,
        variant: str = "minbase",
        packages: Sequence[str] = (),
        customize: Sequence[str] = (),
        disk_size_mib: int = 1024,
    ) -> TemplateBuilder:
        """Start from a Debian suite (``mmdebstrap``), as the ``python`` template does."""
        self._root({})
        self._data["image"] = {
            "suite": suite,
            "variant": variant,
            "packages": list(packages),
            "customize": list(customize),
            "disk_size_mib": disk_size_mib,
        }
        return self

    def from_oci(self, image: str | Path) -> TemplateBuilder:
        """Start from a container image: a ``docker save`` archive or an OCI layout."""
        self._root({"from_oci": str(Path(image).expanduser().resolve())})
        return self

    def _root(self, root: Mapping[str, Any]) -> None:
        for key in ("from", "from_oci", "image"):
            self._data.pop(key, None)
        self._data.update(root)

    # --- steps, in the order they are called

    def apt_install(self, packages: Sequence[str]) -> TemplateBuilder:
        self._steps.append({"apt": list(packages)})
        return self

    def pip_install(self, requirements: Sequence[str]) -> TemplateBuilder:
        self._steps.append({"pip": list(requirements)})
        return self

    def copy(
        self,
        src: str | Path,
        dest: str,
        *,
        mode: int | None = None,
        owner: str = "root",
    ) -> TemplateBuilder:
        step: dict[str, Any] = {"copy": str(Path(src).expanduser().resolve()), "dest": dest}
        if mode is not None:
            step["mode"] = mode
        if owner != "root":
            step["owner"] = owner
        self._steps.append(step)
        return self

    def run_cmd(self, command: str | Sequence[str]) -> TemplateBuilder:
        """One shell command, or several (a step each)."""
        for cmd in [command] if isinstance(command, str) else command:
            self._steps.append({"run": cmd})
        return self

    # --- defaults of its sandboxes

    def set_envs(self, env: Mapping[str, str]) -> TemplateBuilder:
        self._data["env"] = {**self._data.get("env", {}), **env}
        return self

    def set_workdir(self, path: str) -> TemplateBuilder:
        self._data["workdir"] = path
        return self

    def set_user(self, user: str) -> TemplateBuilder:
        self._data["user"] = user
        return self

    def set_start_cmd(
        self, start: str, ready: str | None = None, *, timeout: float | None = None
    ) -> TemplateBuilder:
        """A command every sandbox starts with already running (started before the
        template's snapshot is saved, once ``ready`` exits 0, within ``timeout`` s)."""
        self._data["start_cmd"] = start
        if ready is not None:
            self._data["ready_cmd"] = ready
        if timeout is not None:
            self._data["ready_timeout"] = timeout
        return self

    def set_machine(
        self, *, vcpus: int | None = None, memory_mib: int | None = None
    ) -> TemplateBuilder:
        machine = self._data.setdefault("machine", {})
        if vcpus is not None:
            machine["vcpus"] = vcpus
        if memory_mib is not None:
            machine["memory_mib"] = memory_mib
        return self

    def set_build_network(self, allow: Sequence[str] | None) -> TemplateBuilder:
        """Where build steps may connect (None: the public internet)."""
        build = self._data.setdefault("build", {})
        if allow is None:
            build.pop("allow", None)
        else:
            build["allow"] = list(allow)
        return self

    # --- the result

    def to_dict(self) -> dict[str, Any]:
        data = dict(self._data)
        if self._steps:
            data["steps"] = [dict(s) for s in self._steps]
        return data

    @property
    def definition(self) -> Template:
        """The definition, checked (``TemplateError`` naming the key that is wrong)."""
        return self._manager.from_dict(self.to_dict(), self._source)

    @property
    def _source(self) -> Path:
        return self._manager.definitions_dir / f"{self._data['name']}.toml"

    def to_toml(self) -> str:
        return self.definition.to_toml()

    def save(self) -> Path:
        """Save the definition among the cache's templates; returns its file."""
        return self._manager.save_definition(self.definition)

    def build(
        self,
        *,
        no_cache: bool = False,
        reporter: BuildReporter | None = None,
        provider: str | None = None,
    ) -> BuiltTemplate:
        """Save the definition and build it (cached step by step; ``no_cache`` rebuilds
        its own steps). Blocking."""
        self.save()
        return warmup.build(
            self._manager,
            str(self._data["name"]),
            reporter=reporter,
            force=no_cache,
            provider=provider,
        )
