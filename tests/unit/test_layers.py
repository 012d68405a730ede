"""The package's import graph, read from the source: no import circle, and no module
imports from a layer above its own. Every import counts: at the top of a module, inside a
function, under ``TYPE_CHECKING``, and the providers that ``novasandbox.vm`` imports by
name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "novasandbox"

LAYERS: list[list[str]] = [
    # bottom: what everything may use
    ["paths", "procfs", "results", "guest", "guest.protocol", "guest.agent", "guest.interp"],
    ["errors"],
    ["network"],
    ["config"],
    # what a sandbox holds on the host: pure plan, limits, resources and their release
    [
        "host",
        "host.limits",
        "host.cgroups",
        "host.netns",
        "host.nflog",
        "host.refusals",
        "host.egress",
        "host.tap",
        "host.netguard",
        "host.plan",
        "host.resources",
    ],
    ["records"],
    ["templates.definition", "templates.oci"],  # what a template is; container images
    ["templates", "templates.build"],
    ["snapshots"],
    ["templates.archive"],  # a built template in one file: export, import
    # the VM seam and its providers
    ["vm", "vm.base", "vm.qemu_argv", "vm.qemu", "vm.inprocess"],
    ["agent_client"],
    ["commands", "files"],
    ["terminal"],  # a command with a pseudo-terminal
    ["code"],  # the code interpreter: over the commands of either kind of sandbox
    ["remote"],  # the client of a server: below the sandbox, which dispatches to it
    ["sandbox"],
    # above the sandbox: what acts on sandboxes or their records
    ["layers"],  # a template's build steps, each run in a build VM
    ["gc", "warmup", "pool"],
    ["builder"],  # TemplateBuilder: a definition made in Python, built
    ["sync"],
    [""],  # the package itself (novasandbox/__init__.py)
    # the HTTP service: may use all of the library; nothing of it uses the service
    [
        "server",
        "server.keys",
        "server.models",
        "server.pools",
        "server.registry",
        "server.streams",
        "server.metrics",
        "server.owners",
        "server.signed",
        "server.admission",
    ],
    ["server.mcp"],
    ["server.app"],
    ["server.serve"],
    # one API over a Ray cluster: node agents run the single-host server
    ["cluster", "cluster.placement"],
    ["cluster.node"],
    ["cluster.registry"],
    ["cluster.app"],
    ["cluster.serve"],
    ["cli"],
]
UPWARD_ALLOWED: set[tuple[str, str]] = set()
"""Imports allowed to run from a lower layer to a higher one (the issue allows one; we
need none)."""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if current else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(target.split(".") if target else [])])


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(candidate: str) -> None:
        # "from . import x" names a submodule when there is one, else the package
        while candidate not in known and "." in candidate:
            candidate = candidate.rsplit(".", 1)[0]
        if candidate in known and candidate != name:
            found.add(candidate)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("novasandbox"):
                    target = node.module.removeprefix("novasandbox").lstrip(".")
                else:
                    continue
            else:
                target = resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("novasandbox."):
                    add(alias.name.removeprefix("novasandbox."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("novasandbox.")
            and ":" in node.value
        ):
            # providers registered by name: "novasandbox.vm.qemu:QemuProvider"
            add(node.value.split(":", 1)[0].removeprefix("novasandbox."))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def layer_of() -> dict[str, int]:
    return {m: i for i, layer in enumerate(LAYERS) for m in layer}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    placed = layer_of()
    assert sorted(set(modules()) - set(placed)) == []
    assert sorted(set(placed) - set(modules())) == []  # no stale names in LAYERS


def test_the_graph_reader_sees_each_kind_of_import() -> None:
    g = graph()
    assert "sandbox" in g["gc"] or "records" in g["gc"]
    assert {"vm.qemu", "vm.inprocess"} <= g["vm"]  # registered by name
    assert "guest.protocol" in g["errors"]  # "from .guest.protocol import ..."
    assert "host.cgroups" in g["host.resources"]  # "from . import cgroups"


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_circle_check_can_fail() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_runs_upward() -> None:
    layer = layer_of()
    upward = sorted(
        (a, b)
        for a, targets in graph().items()
        for b in targets
        if layer[b] > layer[a] and (a, b) not in UPWARD_ALLOWED
    )
    assert upward == []
    assert len(UPWARD_ALLOWED) <= 1


@pytest.mark.parametrize("module", ["sandbox", "commands", "files", "terminal", "pool", "sync"])
def test_sandbox_logic_names_no_vmm(module: str) -> None:
    """Only ``vm/`` (and the CLI's doctor, and the host's tools) know which VMM runs."""
    source = modules()[module].read_text().lower()
    for vmm in ("qemu", "firecracker", "qmp"):
        assert vmm not in source, f"{module} mentions {vmm}"


def test_every_registered_provider_implements_the_protocol() -> None:
    import importlib

    from novasandbox.vm import PROVIDERS
    from novasandbox.vm.base import Provider

    for name, where in PROVIDERS.items():
        module, _, attr = where.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert isinstance(cls(), Provider), name
        assert cls.name == name
