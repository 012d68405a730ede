"""The cluster server at scale, simulated: N sandboxes over K Ray nodes in network
namespaces on this machine, with the in-process provider (the real agent, no VM), through
the real HTTP API (``tests/cluster_scale.py``). Reports creates per second, placement
decisions per second, the server's memory per sandbox, and checks that no node went over
its slots and no sandbox was lost or listed twice. Needs root and the ray extra.

    .venv/bin/python benchmarks/bench_cluster.py [--sandboxes 1000] [--slots 200,250,300,300]
        [--parallel 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster_scale import run_scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sandboxes", type=int, default=1000)
    parser.add_argument("--slots", default="200,250,300,300", help="each node's slots")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    slots = [int(x) for x in args.slots.split(",")]
    result = run_scale(args.sandboxes, slots, args.parallel)
    report = {
        "benchmark": "cluster_scale",
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "provider": "inprocess",
        "parallel": args.parallel,
        **result.figures(),
        "over_slots": {
            n: c for n, c in result.per_node.items() if c > result.slots_by_node.get(n, 0)
        },
    }
    out = args.out or Path("benchmarks/results") / (
        "bench-cluster-" + datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if not report["errors"] and not report["over_slots"] else 1


if __name__ == "__main__":
    sys.exit(main())
