"""SPIKE (issue 13): print bench_agents.py results side by side (python | go | go/python)."""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        m = json.load(f)["metrics"]
    print(f"== {path}")
    rows = {}
    for k, v in m.items():
        if not isinstance(v, dict) or "p50" not in v:
            continue
        for agent in ("python", "go"):
            for sep in ("_in_", "_"):
                suffix = f"{sep}{agent}"
                if k.endswith(suffix):
                    base = k[: -len(suffix)]
                    break
            else:
                continue
            rows.setdefault(base, {})[agent] = v
            break
        else:
            for agent in ("python", "go"):
                if k.startswith(f"roundtrip_{agent}_"):
                    rows.setdefault("roundtrip_" + k.split("_", 2)[2], {})[agent] = v
    for base, d in rows.items():
        cells = []
        for agent in ("python", "go"):
            v = d.get(agent)
            cells.append(
                f"{v['p50']:8.1f} p95 {v['p95']:7.1f} [{v['min']:.1f}-{v['max']:.1f}]"
                if v
                else " " * 30
            )
        ratio = (
            f"{d['go']['p50'] / d['python']['p50']:.2f}"
            if "go" in d and "python" in d and d["python"]["p50"]
            else ""
        )
        print(f"{base:44s} {cells[0]:34s} {cells[1]:34s} {ratio}")
    for k, v in m.items():
        if not (isinstance(v, dict) and "p50" in v):
            print(k, v)
