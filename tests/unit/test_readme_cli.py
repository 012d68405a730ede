"""The README's CLI synopsis says what ``novasandbox run --help`` says: every option of
``run`` (and of ``exec``) is in it, and each ``[default]`` shown next to an option is the
one click renders in the help. No VM, no subprocess: the click commands are inspected."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from novasandbox.cli import cli_group

README = Path(__file__).resolve().parents[2] / "README.md"

# an option (the long name of "-t/--template"), an optional metavar, then "[default]"
README_DEFAULT = re.compile(r"(--[a-z][\w-]*)(?:[ \t]+[^\s\[(-][^\s\[]*)?[ \t]+\[([^\]]+)\]")
HELP_DEFAULT = re.compile(r"\[default: ([^\]]+)\]")


def _norm(text: str) -> str:
    return " ".join(text.split())


def run_synopsis(readme: str) -> str:
    """The lines of the synopsis of ``run``: from ``novasandbox run [OPTIONS]`` to the next
    command's line."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("novasandbox run [OPTIONS]"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith((" ", "\t")))
    return "\n".join(lines[start:end])


def readme_defaults(synopsis: str) -> dict[str, str]:
    return {m[1]: _norm(m[2]) for m in README_DEFAULT.finditer(synopsis)}


def help_defaults(command: click.Command) -> dict[str, str]:
    """Each option's ``[default: ...]`` as ``--help`` renders it (long name -> text)."""
    ctx = click.Context(command, info_name=command.name)
    out = {}
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        record = param.get_help_record(ctx)
        m = HELP_DEFAULT.search(record[1]) if record else None
        if m:
            out[_long_name(param)] = _norm(m[1])
    return out


def _long_name(param: click.Option) -> str:
    return next(o for o in param.opts if o.startswith("--"))


def mismatches(readme: dict[str, str], helps: dict[str, str]) -> list[str]:
    problems = []
    for name, default in helps.items():
        if name not in readme:
            problems.append(f"{name}: [{default}] in --help, no [default] in the README")
        elif readme[name] != default:
            problems.append(f"{name}: README says [{readme[name]}], --help says [{default}]")
    problems += [
        f"{name}: README says [{d}], --help shows no default"
        for name, d in readme.items()
        if name not in helps
    ]
    return problems


@pytest.fixture(scope="module")
def synopsis() -> str:
    return run_synopsis(README.read_text(encoding="utf-8"))


def test_run_defaults_match_help(synopsis: str) -> None:
    helps = help_defaults(cli_group.commands["run"])
    assert {"--template", "--lifetime", "--cwd", "--network"} <= helps.keys()  # sanity
    assert mismatches(readme_defaults(synopsis), helps) == []


def test_every_run_option_is_in_the_synopsis(synopsis: str) -> None:
    command = cli_group.commands["run"]
    names = [_long_name(p) for p in command.params if isinstance(p, click.Option)]
    missing = [n for n in names if not re.search(rf"{re.escape(n)}(?![\w-])", synopsis)]
    assert missing == []


def test_every_exec_option_is_in_its_synopsis() -> None:
    readme = README.read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("novasandbox exec ["))
    command = cli_group.commands["exec"]
    missing = [
        p.opts
        for p in command.params
        if isinstance(p, click.Option)
        and not any(re.search(rf"\[{re.escape(o)}\b", line) for o in p.opts)
    ]
    assert missing == []


def test_a_wrong_default_is_caught(synopsis: str) -> None:
    helps = help_defaults(cli_group.commands["run"])
    wrong = synopsis.replace("[the user's home]", "[/root]")
    assert wrong != synopsis
    assert mismatches(readme_defaults(wrong), helps) == [
        "--cwd: README says [/root], --help says [the user's home]"
    ]
