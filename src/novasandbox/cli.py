"""The ``novasandbox`` command: a thin layer over the sync API.

With a server (``--server`` or ``NOVASANDBOX_SERVER``), ``run``, ``ls``, ``kill``,
``exec`` and ``cp`` go through its HTTP API instead, from ``novasandbox_servercli`` (the
console script's module: the standard library only, so that they start fast); this
module has their help, and ``exec`` and ``cp`` refuse to run without a server.

Exit status of ``run`` is the command's own; errors of NovaSandbox itself exit 125,
a command not found in the guest 127, a timeout 124 (as ``timeout(1)`` does).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

import novasandbox_servercli
from novasandbox_servercli import DEFAULT_LIFETIME, REMOTE_COMMANDS, cli_terms

from . import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress, TaskID

    from .errors import NovaSandboxError
    from .sync import CommandHandle, Sandbox
    from .templates import TemplateManager

# What a command needs is imported in the command, when it runs: ``--help``, ``--version``
# and every command's help import click alone (rich, the library, asyncio, httpx and the
# QEMU client cost ~0.3 s, more than the help itself); the library's DEFAULT_LIFETIME is
# novasandbox_servercli's (a test keeps them equal).

SWEPT = {"egress_policies": "egress policy", "taps": "TAP"}
"""What ``gc`` says for each kind of host resource it removed."""
EXIT_ERROR = 125
EXIT_NOT_FOUND = 127
EXIT_TIMEOUT = 124

F = TypeVar("F", bound=Callable[..., Any])
_ERR_CONSOLE: list[Console] = []


def err_console() -> Console:
    """stderr (made on first use: rich is imported then); soft_wrap: a message is one line
    however narrow the terminal (or a pipe's 80 columns)."""
    if not _ERR_CONSOLE:
        from rich.console import Console

        _ERR_CONSOLE.append(Console(stderr=True, soft_wrap=True))
    return _ERR_CONSOLE[0]


def out_console() -> Console:
    """stdout: the terminal's width, or (a pipe, a file) wide enough that tables and lines
    are neither cut nor wrapped at 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=400, soft_wrap=True)


def _fail(exc: NovaSandboxError, status: int = EXIT_ERROR) -> NoReturn:
    from rich.text import Text

    message = cli_terms(exc.message)
    err_console().print(Text.assemble(("error", "bold red"), f" [{exc.code}]: {message}"))
    sys.exit(status)


def handle_errors(fn: F) -> F:
    """Print NovaSandbox errors as 'error [code]: message' and exit 125."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import NovaSandboxError

        try:
            return fn(*args, **kwargs)
        except NovaSandboxError as exc:
            _fail(exc)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log what happens (-vv: debug timings).")
@click.option(
    "--server",
    metavar="URL",
    default=None,
    help="A novasandbox server: run, ls, kill, exec and cp go through its HTTP API.  "
    "[default: NOVASANDBOX_SERVER]",
)
@click.option(
    "--api-key",
    metavar="KEY",
    default=None,
    help="The server's API key.  [default: NOVASANDBOX_API_KEY]",
)
@click.version_option(__version__, prog_name="novasandbox")
@click.pass_context
def cli_group(ctx: click.Context, verbose: int, server: str | None, api_key: str | None) -> None:
    """Secure microVM sandboxes for untrusted code."""
    through = (*REMOTE_COMMANDS, "shell")
    if (server or api_key) and ctx.invoked_subcommand not in through:
        raise click.UsageError(f"--server and --api-key apply to {', '.join(through)} only")
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    if verbose < 3:
        # NovaSandbox reports QMP failures itself, as typed errors.
        logging.getLogger("qemu").setLevel(logging.CRITICAL)


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    from .config import validate_env
    from .errors import ConfigError

    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    validate_env(env)
    return env


def _writer(stream: Any) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def _pump_stdin(handle: CommandHandle, fd: int) -> None:
    """Stream this process's stdin into the command as it arrives; close it at EOF. Ends
    quietly when the command (or the sandbox) is gone first."""
    from .errors import NovaSandboxError

    try:
        while chunk := os.read(fd, 256 * 1024):
            handle.send_stdin(chunk)
        handle.close_stdin()
    except (NovaSandboxError, OSError):
        pass


def _stdin_wanted(interactive: bool, no_stdin: bool) -> bool:
    """Whether ``run`` passes its stdin on: always when it is a pipe or a file (piping
    just works), from a terminal only with ``-i``, never with ``--no-stdin``."""
    if no_stdin:
        return False
    try:
        return interactive or not os.isatty(0)
    except OSError:
        return False


def _seconds_or_none(value: float | None) -> float | None:
    return None if value is None or value == 0 else value


@cli_group.command(context_settings={"allow_interspersed_args": False})
@click.option("-t", "--template", default="python", show_default=True)
@click.option(
    "-e",
    "--env",
    "env_pairs",
    multiple=True,
    metavar="K=V",
    help="Environment variable for the command (repeatable).",
)
@click.option(
    "--cwd",
    default=None,
    metavar="DIR",
    help="Working directory in the guest; relative: under the home.  [default: the user's home]",
)
@click.option(
    "-u",
    "--user",
    default=None,
    metavar="NAME",
    help="Guest account the command runs as.  [default: the template's: user in python]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Kill the command after S seconds.  [default: none: the sandbox's --lifetime bounds it]",
)
@click.option(
    "--lifetime",
    type=click.FloatRange(min=0),
    default=DEFAULT_LIFETIME,
    metavar="S",
    help="Seconds the sandbox lives, then it is killed (0: no limit).  "
    f"[default: {DEFAULT_LIFETIME:.0f}]",
)
@click.option("--vcpus", type=int, default=None, help="Guest vCPUs.  [default: the template's, 1]")
@click.option(
    "--memory",
    "memory_mib",
    type=int,
    default=None,
    metavar="MIB",
    help="Guest memory in MiB.  [default: the template's, 256]",
)
@click.option("--cold", is_flag=True, help="Boot the kernel instead of restoring a snapshot.")
@click.option(
    "--network",
    # checked by the library (error [invalid-config], exit 125), like every other value
    metavar="none|nat|tap",
    default="none",
    show_default=True,
    help="none: no network device; nat: a NIC behind user-mode NAT; tap: a NIC on a TAP "
    "of the host (root).",
)
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="DEST",
    help="With --network nat|tap: a destination the guest may reach (ADDRESS, CIDR or HOST, "
    "optionally :PORT); repeatable.  [default: the public internet]",
)
@click.option("--no-egress", is_flag=True, help="With --network nat|tap: no destination at all.")
@click.option(
    "-i",
    "--interactive",
    is_flag=True,
    help="Pass stdin on even from a terminal (a pipe or a file always is).",
)
@click.option("--no-stdin", is_flag=True, help="Do not pass stdin on (the command reads EOF).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def run(
    template: str,
    cold: bool,
    network: str,
    allow: tuple[str, ...],
    no_egress: bool,
    env_pairs: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    lifetime: float,
    vcpus: int | None,
    memory_mib: int | None,
    interactive: bool,
    no_stdin: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a new sandbox, stream its stdin, stdout and stderr, exit with its
    status. Options go before COMMAND; everything from COMMAND on is the command's own
    (``--`` may separate them).

    \b
    Examples:
      novasandbox run python3 -c 'print(6 * 7)'
      echo 'print(1)' | novasandbox run python3 -
      novasandbox run --network nat -- sh -c 'pip install requests'

    Exit status: the command's; 124 if it ran past --timeout or the sandbox past
    --lifetime; 127 if it was not found in the guest; 125 for NovaSandbox's own errors.

    With a server (novasandbox --server URL run ..., or NOVASANDBOX_SERVER) the sandbox
    is the server's (from its warm pool when the options allow); stdin is streamed to it
    the same way.
    """
    import threading

    from .errors import (
        CommandNotFound,
        CommandTimeout,
        ConfigError,
        SandboxExpired,
        TemplateNotFound,
    )
    from .sync import Sandbox
    from .templates import TemplateManager

    env = _parse_env(env_pairs)
    if no_egress and allow:
        raise ConfigError("--no-egress and --allow exclude each other")
    allowed = [] if no_egress else (list(allow) if allow else None)
    feed = _stdin_wanted(interactive, no_stdin)
    try:
        TemplateManager().get(template)
    except TemplateNotFound as exc:
        if template.startswith(("/", ".", "-")) or "/" in template:
            # ``run -t / ls``: a -t meant for the command, given before it
            exc.message += (
                "; to pass -t to the command, put it after the command (novasandbox run "
                "-- CMD -t ...)"
            )
        raise
    with Sandbox.create(
        template,
        vcpus=vcpus,
        memory_mib=memory_mib,
        cold=cold,
        network=network,
        allow=allowed if network != "none" or allow or no_egress else None,
        timeout=_seconds_or_none(lifetime),
    ) as sb:
        try:
            handle = sb.commands.start(
                list(command),
                env=env,
                cwd=cwd,
                user=user,
                timeout=_seconds_or_none(timeout),
                open_stdin=feed,
                on_stdout=_writer(sys.stdout),
                on_stderr=_writer(sys.stderr),
            )
            if feed:
                threading.Thread(target=_pump_stdin, args=(handle, 0), daemon=True).start()
            result = handle.wait()
        except CommandNotFound as exc:
            hint = command[0].startswith("-")
            if hint:
                exc.message += (
                    f" (options of run go before the command: {command[0]!r} came after it)"
                )
            _refusal_summary(sb)
            _fail(exc, EXIT_NOT_FOUND)
        except (CommandTimeout, SandboxExpired) as exc:
            _refusal_summary(sb)
            _fail(exc, EXIT_TIMEOUT)
        _refusal_summary(sb)
    sys.exit(result.exit_code)


def _refusal_summary(sb: Sandbox) -> None:
    """One line on stderr when the egress policy refused something: why a command that
    reached for the network failed."""
    if sb.config.network.mode == "none" or not sb.is_running():
        return
    refused = sb.network_log()
    if refused.refused:
        text = f"novasandbox: {refused.summary()}; see --allow"
        err_console().print(text, markup=False, highlight=False, soft_wrap=True)


@cli_group.group()
def template() -> None:
    """List, build, remove, export and import templates."""


@template.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def template_list(as_json: bool) -> None:
    """Templates: whether each is built, its size, digest, parent and build date."""
    from .templates import TemplateManager, disk_usage

    manager = TemplateManager()
    rows: list[dict[str, Any]] = []
    for tpl in manager.list():
        built = manager.built(tpl)
        size = None
        if built is not None:
            seen: set[tuple[int, int]] = set()
            size = sum(disk_usage(p, seen) for p in manager.disk_chain(tpl))
            size += disk_usage(manager.image_dir(tpl), seen)
        rows.append(
            {
                "name": tpl.name,
                "description": tpl.description,
                "built": built is not None,
                "digest": tpl.digest,
                "parent": tpl.parent.name if tpl.parent is not None else None,
                "root": tpl.root_kind if tpl.parent is None else "template",
                "oci": str(tpl.oci) if tpl.oci is not None else None,
                "steps": len(tpl.steps),
                "size_bytes": size,
                "built_at": built.manifest.get("built_at") if built else None,
                "source": str(tpl.source),
                "rootfs": str(built.rootfs) if built else None,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    table = Table("name", "built", "size", "digest", "from", "built at", "description")
    for row in rows:
        origin = row["parent"] or (f"oci:{Path(row['oci']).name}" if row["oci"] else "debian")
        when = row["built_at"]
        table.add_row(
            row["name"],
            "yes" if row["built"] else "no",
            f"{row['size_bytes'] / 1e6:.0f} MB" if row["size_bytes"] is not None else "-",
            row["digest"],
            origin,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else "-",
            row["description"],
        )
    out_console().print(table)


class RichReporter:
    """Draws template build progress: one line per step with a spinner and elapsed time,
    and each step's output above them."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def _task(self, name: str) -> TaskID:
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=None)
        return self._tasks[name]

    def step(self, name: str, description: str) -> None:
        self._progress.update(self._task(name), description=f"{name}: {description}")

    def advance(self, name: str, detail: str) -> None:
        self._progress.update(self._task(name), description=f"{name}: {detail}")

    def output(self, name: str, line: str) -> None:
        self._progress.console.print(f"{name} | {line}", style="dim", markup=False, highlight=False)

    def done(self, name: str, detail: str) -> None:
        self._progress.update(
            self._task(name), description=f"{name}: {detail}", total=1, completed=1
        )


@template.command("build")
@click.argument("name")
@click.option(
    "--no-cache",
    "--force",
    "no_cache",
    is_flag=True,
    help="Rebuild the template's own artifacts and steps, ignoring the cache (not its parent's).",
)
@handle_errors
def template_build(name: str, no_cache: bool) -> None:
    """Build NAME: its kernel, root file system, steps (each a cached layer) and
    snapshots. Cached step by step: a no-op when nothing changed."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from . import warmup
    from .templates import TemplateManager

    manager = TemplateManager()
    tpl = manager.get(name)
    if not no_cache and warmup.up_to_date(manager, name):
        click.echo(f"{name}: up to date ({tpl.digest}) {manager.require_built(name).rootfs}")
        return
    t0 = time.monotonic()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console(),
        transient=False,
    ) as progress:
        built = warmup.build(manager, name, reporter=RichReporter(progress), force=no_cache)
    click.echo(f"{name}: built in {time.monotonic() - t0:.0f} s ({tpl.digest}) {built.rootfs}")


@template.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also when built templates start from it.")
@handle_errors
def template_rm(name: str, force: bool) -> None:
    """Remove NAME's built images, snapshots and the layers nothing else uses."""
    from .templates import TemplateManager

    removed = TemplateManager().remove(name, force=force)
    click.echo(f"{name}: {'removed' if removed else 'nothing to remove'}")


@template.command("export")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@handle_errors
def template_export(name: str, file: str) -> None:
    """Write the built template NAME into FILE, for `template import` on another host
    (same QEMU and accelerator): its definition, kernel, images and snapshots. FILE's
    name picks the compression: .tar.zst (recommended), .tar.gz, or .tar (none)."""
    from .templates import TemplateManager
    from .templates.archive import export_archive

    t0 = time.monotonic()
    done = export_archive(TemplateManager(), name, file)
    click.echo(
        f"{name}: exported {done.files} files ({done.bytes_in / 1e6:.0f} MB, "
        f"{done.snapshots} snapshots) to {done.path} ({done.size_bytes / 1e6:.0f} MB) "
        f"in {time.monotonic() - t0:.1f} s"
    )


@template.command("import")
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.option("--force", is_flag=True, help="Replace a differing definition or built file.")
@click.option(
    "--no-snapshots", is_flag=True, help="Leave its snapshots out (another QEMU or accelerator)."
)
@handle_errors
def template_import(file: str, force: bool, no_snapshots: bool) -> None:
    """Put the template in FILE (made by `template export`) into the template cache,
    every file checked before anything is written."""
    from .templates import TemplateManager
    from .templates.archive import import_archive
    from .vm import get_provider

    t0 = time.monotonic()
    done = import_archive(
        TemplateManager(),
        file,
        engine=get_provider().engine(),
        force=force,
        snapshots=not no_snapshots,
    )
    click.echo(
        f"{done.template}: imported {len(done.written)} files, {done.snapshots} snapshots"
        + (f", definitions of {', '.join(done.definitions)}" if done.definitions else "")
        + (f"; removed {len(done.removed)} made over replaced files" if done.removed else "")
        + f" in {time.monotonic() - t0:.1f} s"
    )
    if no_snapshots:
        click.echo(f"run `novasandbox template build {done.template}` to make its snapshots here")


@cli_group.group()
def snapshot() -> None:
    """List and delete snapshots made with sandbox.snapshot()."""


@snapshot.command("ls")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def snapshot_ls(as_json: bool) -> None:
    """Snapshots on this host."""
    from .snapshots import list_snapshots

    snaps = list_snapshots()
    if as_json:
        click.echo(json.dumps([s.to_json() for s in snaps], indent=2))
        return
    from rich.table import Table

    table = Table("id", "template", "from sandbox", "size", "created")
    for s in snaps:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created_at))
        table.add_row(
            s.id, s.template, s.source_sandbox or "", f"{s.size_bytes / 1e6:.0f} MB", created
        )
    out_console().print(table)


@snapshot.command("rm")
@click.argument("ids", nargs=-1, required=True)
@handle_errors
def snapshot_rm(ids: tuple[str, ...]) -> None:
    """Delete snapshots by id."""
    from .snapshots import delete_snapshot

    for snapshot_id in ids:
        delete_snapshot(snapshot_id)
        click.echo(f"deleted {snapshot_id}")


@cli_group.group("tap")
def tap_group() -> None:
    """The pool of TAP devices that network="tap" sandboxes lease (root)."""


@tap_group.command("up")
@click.argument("size", type=int)
@handle_errors
def tap_up(size: int) -> None:
    """Make sure SIZE TAP devices exist (kept until 'novasandbox tap down')."""
    from .host import tap

    for t in tap.prepare(size):
        click.echo(f"{t.name} {t.host_address} -> guest {t.guest_address}")


@tap_group.command("down")
@handle_errors
def tap_down() -> None:
    """Remove the TAP devices no sandbox uses, and the NAT table once none is left."""
    from .host import tap

    for name in tap.release():
        click.echo(f"removed {name}")


@tap_group.command("ls")
@handle_errors
def tap_ls() -> None:
    """TAP devices and which sandbox leases each."""
    from .host import tap

    for t, holder in tap.leases():
        click.echo(f"{t.name} {t.guest_address} {holder or 'free'}")


@cli_group.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.option("-a", "--all", "show_all", is_flag=True, help="Include records of dead VMs.")
def ls(as_json: bool, show_all: bool) -> None:
    """Sandboxes on this host. A sandbox whose owner process died shows as ``orphaned``
    until ``gc`` (or the next create) reaps it. ``vmm rss`` is the VMM's resident memory
    on the host (from /proc, for every running sandbox); the guest's own CPU, memory and
    disk use are known only to the process that owns a sandbox (``sb.get_metrics()``),
    not listed here. With a server (--server or NOVASANDBOX_SERVER): the key's sandboxes
    on the server (-a: also ended ones), with each running one's CPU, memory and disk use
    as its guest reports them and its VMM's memory ('-': it did not answer within 2 s)."""
    from .procfs import process_rss
    from .records import list_sandboxes

    infos = [i for i in list_sandboxes() if show_all or i.alive]
    rss = {i.id: process_rss(i.pid) if i.pid is not None and i.alive else None for i in infos}
    if as_json:
        click.echo(json.dumps([{**i.to_json(), "vmm_rss": rss[i.id]} for i in infos], indent=2))
        return
    from rich.table import Table

    table = Table(
        "id", "template", "state", "alive", "pid", "vcpus", "memory", "boot", "uptime", "vmm rss"
    )
    for i in infos:
        vmm_rss = rss[i.id]
        table.add_row(
            i.id,
            i.template,
            i.status,
            "yes" if i.alive else "no",
            str(i.pid),
            str(i.vcpus),
            f"{i.memory_mib} MiB",
            "restored" if i.restored else "cold",
            f"{i.uptime:.0f} s",
            "-" if vmm_rss is None else f"{vmm_rss / 2**20:.0f} MiB",
        )
    out_console().print(table)


@cli_group.command("network-log")
@click.argument("sandbox_id")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def network_log(sandbox_id: str, as_json: bool) -> None:
    """What the egress policy of a running sandbox refused (from any process). Any unique
    prefix of an id will do."""
    from .records import read_network_log, resolve_sandbox_id

    sandbox_id = resolve_sandbox_id(sandbox_id)
    refused = read_network_log(sandbox_id)
    if as_json:
        click.echo(json.dumps({"id": sandbox_id, **refused.to_json()}, indent=2))
        return
    for e in refused.entries:
        when = time.strftime("%H:%M:%S", time.localtime(e.time))
        click.echo(f"{when} refused {e.destination} ({e.rule})")
    unlisted = f", {refused.not_listed} not listed (rate limit)" if refused.not_listed else ""
    click.echo(f"{sandbox_id}: {refused.refused} refused{unlisted}")


@cli_group.command("kill")
@click.argument("ids", nargs=-1)
@click.option("--all", "kill_all", is_flag=True, help="Kill every sandbox on this host.")
@handle_errors
def kill(ids: tuple[str, ...], kill_all: bool) -> None:
    """Kill sandboxes by id (or --all) and remove their state. Any unique prefix of an
    id will do (``sb-6267`` or ``6267``). With a server (--server or
    NOVASANDBOX_SERVER): the key's sandboxes on the server."""
    from .gc import kill_sandbox
    from .records import list_sandboxes, resolve_sandbox_id

    if kill_all == bool(ids):
        raise click.UsageError("give sandbox ids or --all (not both)")
    targets = [i.id for i in list_sandboxes()] if kill_all else [resolve_sandbox_id(i) for i in ids]
    for sandbox_id in targets:
        kill_sandbox(sandbox_id)
        click.echo(f"killed {sandbox_id}")


def _needs_server(command: str) -> NoReturn:
    from .errors import ConfigError

    raise ConfigError(
        f"{command} works through a server: give --server URL (before {command}) or set "
        "NOVASANDBOX_SERVER, with the key in --api-key or NOVASANDBOX_API_KEY"
    )


@cli_group.command("shell")
@click.option("-t", "--template", default="python", show_default=True)
@click.option(
    "-u",
    "--user",
    default=None,
    metavar="NAME",
    help="Guest account the shell runs as.  [default: the template's: user in python]",
)
@click.option(
    "--lifetime",
    type=click.FloatRange(min=0),
    default=DEFAULT_LIFETIME,
    metavar="S",
    help="Seconds the sandbox lives, then it is killed (0: no limit).  "
    f"[default: {DEFAULT_LIFETIME:.0f}]",
)
@click.argument("sandbox_id", required=False)
@click.pass_context
@handle_errors
def shell(
    ctx: click.Context, template: str, user: str | None, lifetime: float, sandbox_id: str | None
) -> None:
    """Open an interactive terminal (a login shell) in a new sandbox of TEMPLATE, killed
    when the shell exits, or with SANDBOX_ID in a server's existing sandbox (which runs
    on); exit with the shell's status. The terminal is yours: raw mode, window size
    changes passed on, Ctrl-C goes to the guest's foreground program.

    \b
    Examples:
      novasandbox shell
      novasandbox shell -u root --lifetime 3600
      novasandbox --server http://127.0.0.1:8000 shell sb-1a2b3c4d5e

    With a server (--server or NOVASANDBOX_SERVER) the new sandbox is the server's.
    """
    from .errors import ConfigError

    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise ConfigError("shell needs a terminal on stdin and stdout (use run for pipes)")
    parent = ctx.parent.params if ctx.parent is not None else {}
    sys.exit(
        _shell(
            template,
            user,
            _seconds_or_none(lifetime),
            sandbox_id,
            parent.get("server"),
            parent.get("api_key"),
        )
    )


def _shell(
    template: str,
    user: str | None,
    lifetime: float | None,
    sandbox_id: str | None,
    server: str | None,
    api_key: str | None,
) -> int:
    """The terminal session of ``shell``: its exit status."""
    import contextlib
    import select
    import signal as signals
    import termios
    import tty

    from .errors import NovaSandboxError
    from .sync import Sandbox

    out = sys.stdout.fileno()

    def show(chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view) :]

    with contextlib.ExitStack() as stack:
        if sandbox_id is None:
            sb = stack.enter_context(
                Sandbox.create(template, timeout=lifetime, server=server, api_key=api_key)
            )
        else:
            sb = Sandbox.connect(sandbox_id, server=server, api_key=api_key)
        cols, rows = os.get_terminal_size(out)
        term = sb.pty.create(cols, rows, on_data=show, user=user)
        resized = [False]
        previous = signals.signal(signals.SIGWINCH, lambda *_: resized.__setitem__(0, True))
        saved = termios.tcgetattr(0)
        try:
            tty.setraw(0)
            while not term.done():
                if resized[0]:
                    resized[0] = False
                    cols, rows = os.get_terminal_size(out)
                    term.resize(cols, rows)
                ready, _, _ = select.select([0], [], [], 0.1)
                if ready:
                    data = os.read(0, 4096)
                    if not data:
                        break
                    try:
                        term.send_stdin(data)
                    except NovaSandboxError:
                        if term.done():  # it ended meanwhile: its status says how
                            break
                        raise
        finally:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
            signals.signal(signals.SIGWINCH, previous)
        result = term.wait()
    return result.exit_code


@cli_group.command("exec", context_settings={"allow_interspersed_args": False})
@click.option(
    "-e",
    "--env",
    "env_pairs",
    multiple=True,
    metavar="K=V",
    help="Environment variable (repeatable).",
)
@click.option(
    "--cwd",
    default=None,
    metavar="DIR",
    help="Working directory in the guest.  [default: the user's home]",
)
@click.option(
    "-u",
    "--user",
    default=None,
    metavar="NAME",
    help="Guest account the command runs as.  [default: the template's]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="Kill the command after S seconds.",
)
@click.option("-i", "--interactive", is_flag=True, help="Pass stdin on even from a terminal.")
@click.option("--no-stdin", is_flag=True, help="Do not pass stdin on (the command reads EOF).")
@click.argument("sandbox_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def exec_(
    env_pairs: tuple[str, ...],
    cwd: str | None,
    user: str | None,
    timeout: float | None,
    interactive: bool,
    no_stdin: bool,
    sandbox_id: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in the existing sandbox SANDBOX_ID of a server (any unique prefix of
    its id), stream its stdout and stderr, exit with its status (as run). Through a
    server only (--server or NOVASANDBOX_SERVER).

    \b
    Examples:
      novasandbox exec sb-1a2b3c4d5e -- python3 -c 'print(6 * 7)'
      echo 'print(1)' | novasandbox exec 1a2b -- python3 -

    stdin (a pipe or a file; a terminal with -i) is streamed to the command as it
    arrives and closed at its end. Ctrl-C kills the command (exit 130).
    """
    _needs_server("exec")


@cli_group.command("create")
@click.argument("template", default="python")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="S",
    help="The sandbox's lifetime in seconds (0: no limit).  [default: the server's, 300]",
)
@click.option("-l", "--label", "labels", multiple=True, metavar="K=V", help="A label (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the sandbox as JSON.")
@handle_errors
def create(template: str, timeout: float | None, labels: tuple[str, ...], as_json: bool) -> None:
    """Create a sandbox of TEMPLATE on a server and print its id, for exec, cp and kill
    (it lives until killed or its lifetime ends). Through a server only (--server or
    NOVASANDBOX_SERVER).

    \b
    Examples:
      SB=$(novasandbox create --timeout 600 --label job=etl)
      novasandbox exec $SB -- python3 -c 'print(6 * 7)'
    """
    _needs_server("create")


@cli_group.command("cp")
@click.argument("src")
@click.argument("dst")
@handle_errors
def cp(src: str, dst: str) -> None:
    """Copy a file into a server's sandbox (cp FILE ID:PATH) or out of it (cp ID:PATH
    FILE); '-' is stdin or stdout. ID is any unique prefix of the sandbox's id; PATH is
    absolute or under the user's home. A PATH ending in '/' (a FILE that is a directory) takes the
    other side's file name. Uploads keep the file's permission bits. Through a server
    only (--server or NOVASANDBOX_SERVER).

    \b
    Examples:
      novasandbox cp data.csv sb-1a2b3c4d5e:/home/user/data.csv
      novasandbox cp sb-1a2b3c4d5e:out.png .
      tar c src | novasandbox cp - 1a2b:/tmp/src.tar
    """
    _needs_server("cp")


@cli_group.command()
def gc() -> None:
    """Reap sandboxes past their lifetime or whose owner process is gone, and host
    resources (egress policies) that no VMM uses any more."""
    from .gc import reap, sweep_host_resources

    for sandbox_id in reap():
        click.echo(f"reaped {sandbox_id}")
    for kind, names in sweep_host_resources().items():
        for name in names:
            click.echo(f"removed {SWEPT[kind]} {name}")


@cli_group.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Check this host: QEMU, accelerator, templates, missing packages."""
    from .errors import ConfigError, NovaSandboxError
    from .host import cgroups
    from .paths import cache_dir, state_dir
    from .records import list_sandboxes
    from .templates import TemplateManager
    from .templates.build import IMAGE_TOOLS, KERNEL_TOOLS, missing_tools
    from .vm import PROVIDERS, get_provider, provider_name
    from .vm.qemu import choose_accel, qemu_version
    from .vm.qemu_argv import QEMU_BINARY, QEMU_IMG

    report: dict[str, Any] = {}
    try:
        name = provider_name()
        vmm = get_provider(name)
        report["provider"] = {
            "name": name,
            "isolated": vmm.capabilities.isolated,
            "snapshots": vmm.capabilities.snapshots,
            "available": sorted(PROVIDERS),
        }
    except NovaSandboxError as exc:
        report["provider"] = {
            "name": "invalid",
            "reason": exc.message,
            "available": sorted(PROVIDERS),
        }
    try:
        report["qemu"] = qemu_version()
    except (NovaSandboxError, OSError) as exc:
        report["qemu"] = f"missing: {exc}"
    try:
        accel = choose_accel()
        report["accelerator"] = {"name": accel.name, "reason": accel.reason}
    except ConfigError as exc:
        report["accelerator"] = {"name": "invalid", "reason": exc.message}
    report["vmm_confinement"] = (
        "drops root: a uid of its own per sandbox, chrooted into an empty directory"
        if os.geteuid() == 0
        else "runs as this user (QEMU drops privileges only when started as root)"
    )
    try:
        layout = cgroups.detect()
        report["vmm_cgroups"] = layout.describe() if layout else "none (rlimits only)"
    except ConfigError as exc:
        report["vmm_cgroups"] = f"invalid: {exc.message}"
    runtime = missing_tools(
        [(QEMU_BINARY, "qemu-system-x86"), (QEMU_IMG, "qemu-utils"), ("nft", "nftables")]
    )
    build = missing_tools(
        KERNEL_TOOLS + IMAGE_TOOLS + [("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1")]
    )
    report["missing_packages"] = {
        "runtime": sorted({p for _, p in runtime}),
        "template_build": sorted({p for _, p in build}),
    }
    manager = TemplateManager()
    report["cache_dir"] = str(manager.cache)
    report["cache_bytes"] = manager.cache_usage()
    report["state_dir"] = str(state_dir())
    templates = []
    for tpl in manager.list():
        built = manager.built(tpl)
        templates.append({"name": tpl.name, "built": built is not None, "digest": tpl.digest})
    report["templates"] = templates
    report["sandboxes_alive"] = sum(1 for i in list_sandboxes() if i.alive)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        c = out_console()
        prov = report["provider"]
        detail = prov.get("reason") or (
            "isolated" if prov["isolated"] else "NOT ISOLATED: guest code runs on this host"
        )
        c.print(
            f"provider:     {prov['name']} ({detail}; available: {', '.join(prov['available'])})"
        )
        c.print(f"QEMU:         {report['qemu']}")
        c.print(
            f"accelerator:  {report['accelerator']['name']} ({report['accelerator']['reason']})"
        )
        c.print(f"VMM user:     {report['vmm_confinement']}")
        c.print(f"VMM limits:   {report['vmm_cgroups']}")
        c.print(f"cache:        {cache_dir()}")
        size = report["cache_bytes"]
        kinds = ", ".join(f"{k} {_mb(v)}" for k, v in size.items() if k != "total")
        c.print(f"cache size:   {_mb(size['total'])} ({kinds})")
        c.print(f"state:        {report['state_dir']}")
        for t in templates:
            c.print(
                f"template:     {t['name']} {'built' if t['built'] else 'NOT BUILT'} "
                f"({t['digest']})"
            )
        for what, pkgs in report["missing_packages"].items():
            c.print(f"missing ({what}): {' '.join(pkgs) if pkgs else 'none'}")
        c.print(f"sandboxes:    {report['sandboxes_alive']} alive")
    # healthy: nothing missing to run sandboxes, and the default template (python) built
    ok = not report["missing_packages"]["runtime"] and any(
        t["built"] for t in templates if t["name"] == "python"
    )
    sys.exit(0 if ok else 1)


# --- the server: API keys and serve


def _as_path(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Path | None:
    """A path option's value as a Path (pathlib imported when one is given: not for the
    help)."""
    from pathlib import Path

    return None if value is None else Path(value)


def _state_option(fn: F) -> F:
    return click.option(
        "--state-dir",
        "state_path",
        type=click.Path(file_okay=False),
        callback=_as_path,
        default=None,
        help="The state directory.  [default: NOVASANDBOX_STATE_DIR, else the usual one]",
    )(fn)


@cli_group.group("keys")
def keys_group() -> None:
    """API keys of the server (novasandbox serve); only their hashes are stored."""


@keys_group.command("create")
@click.argument("name")
@_state_option
@handle_errors
def keys_create(name: str, state_path: Path | None) -> None:
    """Make a key named NAME and print it (once: it is not stored, only its hash)."""
    from .paths import state_dir
    from .server.keys import KeyStore

    key, secret = KeyStore(state_path or state_dir()).create(name)
    click.echo(secret)
    err_console().print(
        f"API key {key.name!r} ({key.id}) created; store it now, it is not shown again",
        markup=False,
        highlight=False,
    )


@keys_group.command("ls")
@click.option("--json", "as_json", is_flag=True)
@_state_option
@handle_errors
def keys_ls(as_json: bool, state_path: Path | None) -> None:
    """The keys: name, public id, when made (never the key or its hash)."""
    from .paths import state_dir
    from .server.keys import KeyStore

    keys = KeyStore(state_path or state_dir()).all()
    if as_json:
        click.echo(json.dumps([k.public() for k in keys], indent=2))
        return
    from rich.table import Table

    table = Table("name", "id", "created")
    for k in keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.created_at))
        table.add_row(k.name, k.id, created)
    out_console().print(table)


@keys_group.command("rm")
@click.argument("name")
@_state_option
@handle_errors
def keys_rm(name: str, state_path: Path | None) -> None:
    """Remove the key NAME: a running server refuses it from its next request on."""
    from .paths import state_dir
    from .server.keys import KeyStore

    key = KeyStore(state_path or state_dir()).remove(name)
    click.echo(f"removed {key.name} ({key.id})")


@cli_group.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=7070, show_default=True)
@_state_option
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, callback=_as_path)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, callback=_as_path)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow plain HTTP on an address other than loopback (keys cross the network in "
    "clear text).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--max-file-mib",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Largest file upload or download.",
)
@click.option(
    "--on-stop",
    type=click.Choice(["kill", "keep"]),
    default="kill",
    show_default=True,
    help="What SIGTERM/SIGINT does with the sandboxes: kill them, or keep them running "
    "for the next start (which adopts them).",
)
@click.option(
    "--max-sandboxes",
    type=click.IntRange(1),
    default=None,
    help="Sandboxes alive at once; more creates get 503 server-busy.  [default: one per "
    "256 MiB of host memory]",
)
@click.option(
    "--max-starting",
    type=click.IntRange(1),
    default=None,
    help="Creates running at once (more wait in a short queue, then 503 server-busy).  "
    "[default: the CPU count]",
)
@click.option(
    "--max-requests",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="HTTP requests in progress at once (streams included); more get 503 server-busy.",
)
@click.option(
    "--pool",
    "pool_specs",
    multiple=True,
    metavar="TEMPLATE=N",
    help="Keep N warm sandboxes of TEMPLATE ready for creates that ask for its default "
    "shape without env, network or --cold (repeatable).",
)
@click.option(
    "--prestart",
    "prestart_specs",
    multiple=True,
    metavar="TEMPLATE=N",
    help="Keep N VMMs of TEMPLATE started ahead, waiting for its snapshot: creates of its "
    "default shape without network or --cold skip the VMM's start (repeatable).",
)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="ADDRESS",
    help="Serve a Ray cluster's nodes instead of this host: ADDRESS of its head "
    "(HOST:PORT) or 'auto'. Needs the ray extra; see the README's 'Cluster'.",
)
@click.option(
    "--ray-node-ip",
    default=None,
    metavar="IP",
    help="With --ray: this host's address in the cluster (default: Ray's choice).",
)
@click.option(
    "--node-state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="With --ray: where each node agent keeps its state (a folder node-ADDRESS in "
    "it).  [default: the node's own state directory]",
)
@click.option(
    "--node-timeout",
    type=click.FloatRange(0.2),
    default=1.5,
    show_default=True,
    help="With --ray: seconds without an answer from a node before it (and its sandboxes) is lost.",
)
@click.option(
    "--template",
    "cluster_templates",
    multiple=True,
    metavar="NAME",
    help="With --ray: a template every node builds when it joins (repeatable; the "
    "definition is this host's).",
)
@click.option(
    "--vcpu-overcommit",
    type=click.FloatRange(0.1),
    default=4.0,
    show_default=True,
    help="With --ray: vCPUs a node offers per host CPU.",
)
@click.option(
    "--memory-overcommit",
    type=click.FloatRange(0.1),
    default=1.0,
    show_default=True,
    help="With --ray: guest memory a node offers per MiB of host memory (less 1 GiB kept "
    "for the host).",
)
@click.option(
    "--placement-k",
    type=click.IntRange(1),
    default=2,
    show_default=True,
    help="With --ray: random candidate nodes compared per sandbox (the one with the most "
    "free memory wins).",
)
@handle_errors
def serve(
    host: str,
    port: int,
    state_path: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    insecure: bool,
    log_level: str,
    max_file_mib: int,
    on_stop: str,
    max_sandboxes: int | None,
    max_starting: int | None,
    max_requests: int,
    pool_specs: tuple[str, ...],
    prestart_specs: tuple[str, ...],
    ray_address: str | None,
    ray_node_ip: str | None,
    node_state_dir: str | None,
    node_timeout: float,
    cluster_templates: tuple[str, ...],
    vcpu_overcommit: float,
    memory_overcommit: float,
    placement_k: int,
) -> None:
    """Serve the HTTP API: sandboxes owned by this process, per API key (make one with
    'novasandbox keys create NAME'). Logs one JSON object per line on stderr; SIGTERM or
    SIGINT kills its sandboxes (or, with --on-stop keep, leaves them running) and exits
    0. A start adopts the sandboxes the last run left running and reaps the rest. With
    --state-dir, the keys and the sandboxes' state live there."""
    from .paths import state_dir
    from .server.admission import Limits, default_max_sandboxes, default_max_starting
    from .server.app import Settings
    from .server.pools import parse_pool_specs
    from .server.serve import serve as run_server

    pools = parse_pool_specs(pool_specs)
    prestart = parse_pool_specs(prestart_specs, "--prestart")
    if state_path is not None:
        state_path = state_path.absolute()
        os.environ["NOVASANDBOX_STATE_DIR"] = str(state_path)
    if ray_address is not None:
        from pathlib import Path

        from .cluster.node import NodeConfig, template_chain
        from .cluster.serve import serve_cluster

        passed = ("NOVASANDBOX_ALLOW_INPROCESS", "NOVASANDBOX_ACCEL")
        serve_cluster(
            ray_address=ray_address,
            state=state_path or state_dir(),
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            insecure=insecure,
            log_level=log_level,
            settings=Settings(
                max_file_bytes=max_file_mib << 20,
                limits=Limits(
                    max_sandboxes=max_sandboxes or 1_000_000,
                    max_starting=max_starting or 64,
                    max_requests=max_requests,
                ),
            ),
            node_config=NodeConfig(
                provider=os.environ.get("NOVASANDBOX_PROVIDER") or None,
                pools=pools,
                prestart=prestart,
                max_file_bytes=max_file_mib << 20,
                state_dir=str(Path(node_state_dir).absolute()) if node_state_dir else None,
                env={k: os.environ[k] for k in passed if k in os.environ},
                templates=template_chain(list(cluster_templates)),
            ),
            ray_node_ip=ray_node_ip,
            k=placement_k,
            node_timeout=node_timeout,
            vcpu_overcommit=vcpu_overcommit,
            memory_overcommit=memory_overcommit,
        )
        return
    run_server(
        state=state_path or state_dir(),
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure=insecure,
        log_level=log_level,
        settings=Settings(
            max_file_bytes=max_file_mib << 20,
            limits=Limits(
                max_sandboxes=max_sandboxes or default_max_sandboxes(),
                max_starting=max_starting or default_max_starting(),
                max_requests=max_requests,
            ),
        ),
        on_stop=on_stop,
        pools=pools,
        prestart=prestart,
    )


@cli_group.group("cluster")
def cluster_group() -> None:
    """A cluster server's nodes (serve --ray): 'status' through the server (--server or
    NOVASANDBOX_SERVER, with an API key); 'drain' and 'undrain' through Ray itself
    (operators: whoever can reach the Ray cluster)."""


@cluster_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def cluster_status(as_json: bool) -> None:
    """The nodes: state, sandboxes/slots, vCPUs, memory, templates ready."""
    from .errors import ServerRequired

    raise ServerRequired(
        "cluster status asks a cluster server: give --server URL (or set NOVASANDBOX_SERVER)"
    )


_ray_options = [
    click.option(
        "--ray",
        "ray_address",
        default="auto",
        show_default=True,
        metavar="ADDRESS",
        help="The Ray cluster's head (HOST:PORT), or 'auto'.",
    ),
    click.option(
        "--ray-node-ip", default=None, metavar="IP", help="This host's address in the cluster."
    ),
]


def _with_ray_options(f: Any) -> Any:
    for option in reversed(_ray_options):
        f = option(f)
    return f


def _set_draining(node: str, draining: bool, ray_address: str, ray_node_ip: str | None) -> str:
    import ray

    from .cluster.node import NAMESPACE
    from .cluster.serve import connect_ray
    from .errors import ConfigError

    connect_ray(ray_address, ray_node_ip)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and str(a.get("name", "")).startswith(f"node-{node}")
    ]
    if len(names) != 1:
        found = "no" if not names else "more than one"
        raise ConfigError(f"{found} node agent matches {node!r} (see 'novasandbox cluster status')")
    actor = ray.get_actor(names[0], namespace=NAMESPACE)
    ray.get(actor.set_draining.remote(draining), timeout=30)
    return str(names[0]).removeprefix("node-")


@cluster_group.command("drain")
@click.argument("node")
@_with_ray_options
@handle_errors
def cluster_drain(node: str, ray_address: str, ray_node_ip: str | None) -> None:
    """Take no new sandboxes on NODE (any unique prefix of its id); the ones it runs go on
    until their lifetime ends. Then stop Ray there to remove it."""
    click.echo(f"draining {_set_draining(node, True, ray_address, ray_node_ip)}")


@cluster_group.command("undrain")
@click.argument("node")
@_with_ray_options
@handle_errors
def cluster_undrain(node: str, ray_address: str, ray_node_ip: str | None) -> None:
    """Let NODE take new sandboxes again."""
    click.echo(f"undrained {_set_draining(node, False, ray_address, ray_node_ip)}")


@cli_group.command("mcp")
@handle_errors
def mcp_command() -> None:
    """Serve MCP (Model Context Protocol) tools for AI agents over stdin and stdout:
    create_sandbox, run_command, write_file, read_file, list_files, kill_sandbox. The
    agent starts this command as its MCP server (command "novasandbox", args ["mcp"]).
    Without a sandbox_id the tools use one sandbox of this process, made on first use;
    every sandbox made here is killed when stdin closes (or on SIGTERM). The same tools
    are served by 'novasandbox serve' at /mcp (streamable HTTP, with an API key)."""
    import asyncio

    from .server.mcp import serve_stdio

    asyncio.run(serve_stdio())


# --- the template cache: what it holds (doctor) and pruning what nothing uses


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def cache_in_use(manager: TemplateManager) -> set[Path]:
    """Paths of the cache that must stay although no defined template uses them: what
    any process holds (every live VMM's disks and kernel, whatever its state directory;
    builds in progress), the disk chains of this state directory's sandboxes (alive or
    being created), and the disks and kernels of its user snapshots."""
    from pathlib import Path

    from .records import list_sandboxes
    from .snapshots import list_snapshots
    from .templates import backing_chain, paths_held_by_processes
    from .vm.base import VMPaths

    paths = paths_held_by_processes(manager.cache)
    for info in list_sandboxes():
        paths.update(backing_chain(VMPaths(Path(info.state_dir)).overlay))
    for snap in list_snapshots(include_ephemeral=True):
        paths.add(snap.kernel)
        paths.update(backing_chain(snap.disk))
        if snap.backing:
            paths.add(Path(snap.backing))
    return paths


@cli_group.group("cache")
def cache_group() -> None:
    """The template cache: kernels, root file systems (bases), images and snapshots."""


@cache_group.command("prune")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def cache_prune(dry_run: bool, as_json: bool) -> None:
    """Remove the kernels, bases and images that no defined template keeps (left by
    'template rm' or by a changed template), except what a sandbox, a snapshot or a
    running process uses."""
    from .templates import TemplateManager

    manager = TemplateManager()
    plan = manager.prune_plan(cache_in_use(manager))
    freed = 0 if dry_run else manager.prune(plan)
    if as_json:
        click.echo(json.dumps({**plan.to_json(), "dry_run": dry_run, "freed": freed}, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for entry in plan.remove:
        click.echo(f"{verb} {entry.kind} {entry.path} ({_mb(entry.size_bytes)}): {entry.reason}")
    for entry in plan.keep:
        click.echo(f"kept {entry.kind} {entry.path} ({_mb(entry.size_bytes)}): {entry.reason}")
    if dry_run:
        click.echo(f"would free {plan.size_bytes} bytes ({_mb(plan.size_bytes)})")
    else:
        click.echo(f"freed {freed} bytes ({_mb(freed)})")


def main() -> Any:
    """The CLI, through the server when one is set for the command (``novasandbox_servercli``
    decides), else ``cli_group``."""
    return novasandbox_servercli.dispatch(lambda: cli_group)


if __name__ == "__main__":
    sys.exit(main())
