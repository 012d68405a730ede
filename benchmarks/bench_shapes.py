"""Machine shapes other than the template's own: the first create of a shape (cold boot
plus saving its snapshot) against later ones (restored), and a plain cold boot.

    .venv/bin/python benchmarks/bench_shapes.py [--runs 5] [--memory 512] [--vcpus 1] [--out FILE]

Works in a private copy of the template cache (the shared one keeps its shapes). Each
run, interleaved so that all see the same host load: ``cold=True`` (no save), the first
create of the shape (its snapshot removed before), the second create (restores it); each
timed from ``create`` to its return and to the end of ``echo hi``. ``save`` is what the
first create spent saving (``timings["shape_saved"] - timings["ready"]``).

Prints a JSON report (p50/p95) and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# bench.py lives beside this script; running a script puts its directory on sys.path.
from bench import BenchError, check_echo, host_info, ms, setup_logging, summarize, write_report

from novasandbox import Sandbox, TemplateManager

log = logging.getLogger("bench")


def private_cache(root: Path) -> TemplateManager:
    """A copy of the built "python" template (image and kernel; no snapshots)."""
    shared = TemplateManager()
    built = shared.require_built("python")
    mgr = TemplateManager(cache=root)
    image_dir = mgr.image_dir(built.template)
    image_dir.mkdir(parents=True)
    kernel = root / built.kernel.relative_to(shared.cache)
    kernel.parent.mkdir(parents=True)
    os.link(built.kernel, kernel)
    shutil.copy(shared.image_dir(built.template) / "manifest.json", image_dir)
    subprocess.run(
        ["cp", "--sparse=always", str(built.rootfs), str(image_dir / "rootfs.ext4")], check=True
    )
    return mgr


def one(
    mgr: TemplateManager, vcpus: int, memory: int, *, cold: bool, restored: bool
) -> tuple[float, float, float | None]:
    """(ms to ready, ms to the end of ``echo hi``, ms spent saving the shape or None)."""
    t0 = time.perf_counter()
    sb = Sandbox.create(vcpus=vcpus, memory_mib=memory, cold=cold, templates=mgr)
    try:
        t_ready = time.perf_counter()
        check_echo(sb.commands.run("echo hi"))
        t_done = time.perf_counter()
        if sb.restored != restored:
            raise BenchError(f"expected restored={restored}, got {sb.restored} ({sb.cold_reason})")
        saved = sb.timings.get("shape_saved")
        save = None if saved is None else saved - sb.timings["ready"]
    finally:
        sb.kill()
    return ms(t_ready - t0), ms(t_done - t0), save


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--memory", type=int, default=512, help="MiB (512)")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    report: dict[str, Any] = {"benchmark": "shapes", "host": host_info()}
    report["shape"] = {"vcpus": args.vcpus, "memory_mib": args.memory}
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        mgr = private_cache(Path(tmp))
        tpl = mgr.get("python")
        for i in range(args.runs + 1):  # the first round warms the page cache and imports
            mgr.remove_shape_snapshots(tpl)
            cold = one(mgr, args.vcpus, args.memory, cold=True, restored=False)
            first = one(mgr, args.vcpus, args.memory, cold=False, restored=False)
            second = one(mgr, args.vcpus, args.memory, cold=False, restored=True)
            if first[2] is None:
                raise BenchError("the first create did not save the shape")
            log.info(
                "round %d: cold %.0f, first %.0f (save %.0f), second %.0f ms",
                i,
                cold[0],
                first[0],
                first[2],
                second[0],
            )
            if i == 0:
                continue
            for name, (ready, echo, _) in (("cold", cold), ("first", first), ("second", second)):
                samples.setdefault(f"{name}_create_ms", []).append(ready)
                samples.setdefault(f"{name}_create_to_echo_ms", []).append(echo)
            samples.setdefault("first_save_ms", []).append(first[2])
    report["metrics"] = {name: summarize(values, "ms") for name, values in samples.items()}
    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(report, args.out, "shapes")


if __name__ == "__main__":
    main()
