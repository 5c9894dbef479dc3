"""Pool several runs of bench/run.py: one table of medians over all their repetitions.

On a small shared machine one run's three repetitions can all fall in a noisy
spell.  Pooling the repetitions of several runs (each run's JSON keeps the time
of every repetition) gives medians that move less between sessions:

    python bench/run.py --json run1.json      # and run2.json, run3.json, ...
    python bench/combine.py run1.json run2.json run3.json

Throughput: the median over every repetition of every run, in msg/s, with its
ratio to mp.Queue's pooled median and, for 1x1, to the floor's.  Latency: the
median of the runs' p50s, and of their p99s.  Only runs of the same mode and machine make sense
together; the script says which runs it read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MP_QUEUE = "mp.Queue"
FLOOR = "floor (C)"


def _key(w: dict[str, Any]) -> tuple[str, str, str]:
    return (w["suite"], w["payload"], f"{w['producers']}x{w['consumers']}")


def _ratios(value: float, impls: dict[str, list[float]], name: str) -> str:
    """value against mp.Queue's median and, but for the floor's own row, the floor's."""
    base = statistics.median(impls[MP_QUEUE]) if MP_QUEUE in impls else None
    floor = statistics.median(impls[FLOOR]) if FLOOR in impls else None
    vs_mp = f"{value / base:10.2f}" if base else f"{'-':>10}"
    vs_floor = f"{value / floor:8.2f}" if floor and name != FLOOR else f"{'':>8}"
    return f"{vs_mp} {vs_floor}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench/run.py --json")
    args = ap.parse_args(argv)
    rates: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    p50s: dict[str, dict[str, list[float]]] = {}
    p99s: dict[str, dict[str, list[float]]] = {}
    for path in args.runs:
        run = json.loads(path.read_text())
        m = run["machine"]
        print(f"{path}: {m.get('cpu')}, {m.get('usable cores')} cores, pipeq {m.get('pipeq')}")
        for r in run["throughput"]:
            if r.get("error") is None and r["seconds"]:
                items = r["workload"]["items"]
                cell = rates.setdefault(_key(r["workload"]), {}).setdefault(r["impl"], [])
                cell.extend(items / t for t in r["seconds"])
        for r in run["latency"]:
            if r.get("error") is None and r["p50_us"]:
                p50s.setdefault(r["payload"], {}).setdefault(r["impl"], []).append(
                    r["p50_us"]["median"]
                )
                p99s.setdefault(r["payload"], {}).setdefault(r["impl"], []).append(
                    r["p99_us"]["median"]
                )
    print()
    print(
        f"{'payload':<13} {'PxC':<6} {'implementation':<30} {'n':>3} {'msg/s':>11}"
        f" {'x mp.Queue':>10} {'x floor':>8}"
    )
    for (_, payload, shape), impls in rates.items():
        for name, values in impls.items():
            med = statistics.median(values)
            print(
                f"{payload:<13} {shape:<6} {name:<30} {len(values):>3} {med:>11,.0f}"
                f" {_ratios(med, impls, name)}"
            )
    print()
    print(
        f"{'ping-pong':<13} {'implementation':<30} {'runs':>4} {'p50 us':>8}"
        f" {'x mp.Queue':>10} {'x floor':>8} {'p99 us':>8}"
    )
    for payload, impls in p50s.items():
        for name, values in impls.items():
            med = statistics.median(values)
            p99 = statistics.median(p99s[payload][name])
            print(
                f"{payload:<13} {name:<30} {len(values):>4} {med:>8.1f}"
                f" {_ratios(med, impls, name)} {p99:>8.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
