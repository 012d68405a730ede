"""What a start-up imports, in real processes: ``import novasandbox`` imports none of the
library (its public names load on first use), ``novasandbox --help`` and every command's
help import click alone, and the local library path leaves the HTTP client, rich and the
server out. No clock: the guard is the set of modules, which is what costs the time."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import novasandbox

INIT = Path(novasandbox.__file__)
HEAVY = ("asyncio", "httpx", "rich", "pygments", "qemu", "fastapi", "starlette", "uvicorn", "mcp")
"""Third-party packages (and asyncio) that ``import novasandbox`` and the help leave out."""
HELP_COMMANDS = [
    [],
    ["run"],
    ["ls"],
    ["kill"],
    ["exec"],
    ["cp"],
    ["create"],
    ["template"],
    ["template", "build"],
    ["snapshot", "ls"],
    ["tap", "up"],
    ["network-log"],
    ["gc"],
    ["doctor"],
    ["keys", "create"],
    ["serve"],
    ["mcp"],
    ["cache", "prune"],
]


def _modules_after(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; what it left in ``sys.modules`` (and printed)."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    *printed, last = done.stdout.rstrip("\n").split("\n")
    return {"modules": json.loads(last), "stdout": "\n".join(printed), "stderr": done.stderr}


def _heavy(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def _library(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return sorted(m for m in modules if m.startswith("novasandbox."))


def test_import_novasandbox_imports_none_of_the_library() -> None:
    got = _modules_after("import novasandbox")
    assert _library(got["modules"]) == []
    assert _heavy(got["modules"]) == []
    assert "click" not in got["modules"]


def _cli(args: list[str]) -> str:
    """The console script's ``main`` with ``args``, up to its exit."""
    return (
        "import novasandbox_entry\n"
        f"sys.argv[:] = {['novasandbox', *args]!r}\n"
        "try:\n"
        "    novasandbox_entry.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "novasandbox")
def test_help_imports_click_alone(command: list[str]) -> None:
    got = _modules_after(_cli([*command, "--help"]))
    assert "Usage: novasandbox" in str(got["stdout"]), got
    assert "click" in got["modules"]
    assert _heavy(got["modules"]) == []
    assert _library(got["modules"]) == ["novasandbox.cli"]


def test_version_imports_click_alone() -> None:
    got = _modules_after(_cli(["--version"]))
    assert f"novasandbox, version {novasandbox.__version__}" in str(got["stdout"])
    assert _heavy(got["modules"]) == []
    assert _library(got["modules"]) == ["novasandbox.cli"]


def test_the_guard_can_fail() -> None:
    """A command that runs (not its help) imports what it needs: the probe sees it."""
    got = _modules_after(_cli(["template", "list", "--json"]))
    assert "rich" not in _heavy(got["modules"])
    assert "novasandbox.templates" in _library(got["modules"])
    got = _modules_after(_cli(["template", "list"]))
    assert "rich" in _heavy(got["modules"])


def test_the_local_library_leaves_the_http_client_and_the_server_out() -> None:
    """``Sandbox`` for local sandboxes: asyncio yes (it is the implementation); httpx
    (~0.1 s: its own CLI pulls click, rich and pygments), rich, click and the server no.
    The CLI's ``run`` imports the same."""
    for code in ("from novasandbox import Sandbox, AsyncSandbox, Pool", "import novasandbox.cli"):
        got = _modules_after(
            f"{code}\nimport novasandbox.sync, novasandbox.templates, novasandbox.errors"
        )
        heavy = _heavy(got["modules"])
        assert "asyncio" in heavy
        for absent in ("httpx", "rich", "fastapi", "mcp"):
            assert absent not in heavy, (code, absent)
        assert not any(m.startswith("novasandbox.server") for m in _library(got["modules"]))


def _type_checking_imports() -> dict[str, str]:
    """``from .MODULE import NAME`` under ``if TYPE_CHECKING:`` in ``__init__``: NAME -> MODULE."""
    found: dict[str, str] = {}
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.unparse(imp)
                for alias in imp.names:
                    assert alias.asname is None
                    found[alias.name] = str(imp.module)
    return found


def test_the_lazy_names_are_the_typed_names_and_all() -> None:
    """One list three ways: ``__all__``, what type checkers see (the ``TYPE_CHECKING``
    imports) and what ``__getattr__`` loads; each name from the module type checkers
    name is the object the package gives."""
    typed = _type_checking_imports()
    lazy = {n: m for m, names in novasandbox._EXPORTS.items() for n in names}
    public = set(novasandbox.__all__) - {"__version__"}
    assert set(typed) == public == set(lazy)
    assert typed == lazy
    for name, module in typed.items():
        source = importlib.import_module(f"novasandbox.{module}")
        assert getattr(novasandbox, name) is getattr(source, name), name


def test_submodules_are_attributes_as_before() -> None:
    """``import novasandbox`` then ``novasandbox.config``, ``novasandbox.network``: each
    submodule is imported when named (they all were, with the package, before)."""
    got = _modules_after(
        "import novasandbox\n"
        "print(novasandbox.config.MachineConfig.__name__, novasandbox.network.__name__)\n"
        "print(hasattr(novasandbox, 'nothing_of_that_name'))"
    )
    assert str(got["stdout"]).split("\n") == ["MachineConfig novasandbox.network", "False"]
    assert "novasandbox.config" in _library(got["modules"])


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Sandboxx'"):
        _ = novasandbox.Sandboxx  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        from novasandbox import Nope  # type: ignore[attr-defined]  # noqa: F401
    assert not hasattr(novasandbox, "_private")
