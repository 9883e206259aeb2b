"""Print the side-by-side table from a pytest-benchmark JSON file.

    pytest benchmarks --benchmark-json=bench.json && python benchmarks/compare.py bench.json

Every benchmark stores its same-run baseline and the ratio in extra_info; this
turns them into one table (the README's figures come from here).
"""
import json
import sys


def fmt(v):
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    return str(v)


def main(path):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        ratio = info.pop("ratio", None)
        target = info.pop("target", "")
        baseline = info.pop("baseline", "")
        figures = ", ".join(f"{k}={fmt(v)}" for k, v in info.items())
        rows.append((b["name"], fmt(ratio) if ratio is not None else "-", target, baseline, figures))
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"{'benchmark':<{width}}  {'ratio':>7}  {'target':<16}  baseline / figures")
    for name, ratio, target, baseline, figures in rows:
        print(f"{name:<{width}}  {ratio:>7}  {target:<16}  {baseline}; {figures}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
