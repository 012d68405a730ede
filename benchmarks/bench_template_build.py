"""Template builds: a layered template cold, built again with nothing changed (cached),
and with its last step changed; the size of each layer and of its snapshots; create ->
first output of a sandbox of it against one of ``python``, interleaved.

    .venv/bin/python benchmarks/bench_template_build.py [--runs 5] [--apt] [--out FILE]

The template (in a temporary definitions folder, built into the cache the library uses;
removed with its layers at the end) starts from ``python`` and has a ``pip`` step (six),
a ``copy`` step, a ``run`` step with a fresh marker (so the first build is cold), an
``apt`` step with ``--apt`` (``tree``, which needs Debian's mirrors) and a ``start_cmd``
(``python3 -m http.server``) that every sandbox starts with. Needs root and ``python``
built.

Prints a JSON report (p50/p95) and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

# bench.py lives beside this script; running a script puts its directory on sys.path.
from bench import BenchError, host_info, setup_logging, summarize, write_report

from novasandbox import Sandbox, TemplateManager, warmup
from novasandbox.templates import disk_usage
from novasandbox.templates.build import LogReporter

NAME = "bench-layers"


class Steps(LogReporter):
    def __init__(self) -> None:
        self.done_lines: list[str] = []

    def done(self, name: str, detail: str) -> None:
        self.done_lines.append(f"{name}: {detail}")


def definition(folder: Path, marker: str, apt: bool) -> None:
    (folder / "app").mkdir(exist_ok=True)
    (folder / "app" / "index.html").write_text("<p>hello</p>\n")
    (folder / f"{NAME}.toml").write_text(
        f'name = "{NAME}"\nfrom = "python"\n'
        + 'pip = ["six"]\n'
        + f'run = ["echo {marker} > /opt/marker"]\n'
        + 'start_cmd = "python3 -m http.server 8000 --directory /srv/app"\n'
        + 'ready_cmd = "curl -sf http://127.0.0.1:8000/ -o /dev/null"\n'
        + ('[image]\npackages = ["tree"]\n' if apt else "")
        + '[[files]]\nsrc = "app"\ndest = "/srv/app"\n'
    )


def timed_build(manager: TemplateManager) -> tuple[float, Steps]:
    rep = Steps()
    t0 = time.perf_counter()
    warmup.build(manager, NAME, reporter=rep)
    return time.perf_counter() - t0, rep


def first_output(template: str) -> float:
    """ms from ``create`` to the end of ``true`` in it (the same for both templates)."""
    t0 = time.perf_counter()
    with Sandbox.create(template) as sb:
        r = sb.commands.run(["true"])
        if r.exit_code != 0:
            raise BenchError(f"{template}: {r.stderr}")
        return (time.perf_counter() - t0) * 1000


def first_response(template: str) -> float:
    """ms from ``create`` to the start command's first answer (already running)."""
    t0 = time.perf_counter()
    with Sandbox.create(template) as sb:
        r = sb.commands.run(["curl", "-sf", "http://127.0.0.1:8000/"])
        if r.exit_code != 0:
            raise BenchError(f"{template}: {r.stderr}")
        return (time.perf_counter() - t0) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--apt", action="store_true", help="add an apt step (needs mirrors)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    if os.geteuid() != 0:
        raise BenchError("template builds need root")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["NOVASANDBOX_TEMPLATE_PATH"] = str(folder)
        manager = TemplateManager()
        definition(folder, secrets.token_hex(4), args.apt)
        try:
            cold_s, cold_steps = timed_build(manager)
            cached = [timed_build(manager)[0] for _ in range(args.runs)]
            definition(folder, secrets.token_hex(4), args.apt)  # only the run step changes
            changed_s, changed_steps = timed_build(manager)
            tpl = manager.get(NAME)
            seen: set[tuple[int, int]] = set()
            layers = {
                step.describe(): disk_usage(manager.layer_file(d).parent, seen)
                for step, d in zip((*tpl.steps, None), tpl.layer_digests, strict=True)
                if step is not None
            }
            layers["defaults"] = disk_usage(manager.layer_file(tpl.layer_digests[-1]).parent, seen)
            snapshots = disk_usage(manager.image_dir(tpl), seen)
            firsts: dict[str, list[float]] = {NAME: [], "python": []}
            responses: list[float] = []
            for _ in range(args.runs):
                for template in firsts:
                    firsts[template].append(first_output(template))
                responses.append(first_response(NAME))
        finally:
            manager.remove(NAME, force=True)
    report: dict[str, Any] = {
        "host": host_info(),
        "params": {"runs": args.runs, "apt": args.apt},
        "metrics": {
            "build_cold_s": summarize([cold_s], "s"),
            "build_cached_s": summarize(cached, "s"),
            "build_last_step_changed_s": summarize([changed_s], "s"),
            f"first_output_{NAME}_ms": summarize(firsts[NAME], "ms"),
            "first_output_python_ms": summarize(firsts["python"], "ms"),
            "create_to_start_cmd_response_ms": summarize(responses, "ms"),
        },
        "ratio_first_output_layered_vs_python_p50": round(
            summarize(firsts[NAME], "ms")["p50"] / summarize(firsts["python"], "ms")["p50"], 3
        ),
        "layer_bytes": layers,
        "snapshots_bytes": snapshots,
        "cold_steps": cold_steps.done_lines,
        "changed_steps": changed_steps.done_lines,
    }
    write_report(report, args.out, "template-build")


if __name__ == "__main__":
    main()
