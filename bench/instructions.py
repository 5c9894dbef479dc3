"""Instructions per message, counted by callgrind: repeatable where timings are not.

Each case moves N items through one queue in one process, in rounds of
BATCH (put BATCH, then get BATCH), under ``valgrind --tool=callgrind``; the
same case with N // 10 items is subtracted, so interpreter start-up, imports
and queue set-up drop out and what is left is the cost of N - N // 10
messages, put and got, in every thread of the process (mp.Queue's feeder
thread included).

    python bench/instructions.py            # every case, N = 20,000
    python bench/instructions.py --n 5000 --only pipeq

Needs valgrind.  Prints a table; --json FILE keeps it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BATCH = 100

# (name, payload, how): how is "single" (put/get) or "batch" (put_many/get_many).
CASES = [
    ("mp.Queue", "int", "single"),
    ("mp.Queue", "bytes100", "single"),
    ("mp.Queue", "dict", "single"),
    ("faster-fifo", "int", "single"),
    ("faster-fifo", "int", "batch"),
    ("faster-fifo", "bytes100", "batch"),
    ("faster-fifo", "dict", "batch"),
    ("pipeq", "int", "single"),
    ("pipeq", "bytes100", "single"),
    ("pipeq", "int", "batch"),
    ("pipeq", "bytes100", "batch"),
    ("pipeq", "dict", "single"),
    ("pipeq", "dict", "batch"),
]

# Run in the measured interpreter: argv = queue payload how n batch.
CHILD = r"""
import sys
name, payload, how, n, B = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if name == "pipeq":
    import pipeq
    q = pipeq.Queue()
elif name == "faster-fifo":
    import faster_fifo
    q = faster_fifo.Queue(max_size_bytes=1 << 20)
else:
    import multiprocessing
    q = multiprocessing.get_context("fork").Queue()
if payload == "int":
    item = 12345
elif payload == "bytes100":
    item = b"x" * 100
else:  # bench/run.py's "dict"
    item = {"id": 12345, "name": "sensor-7", "value": 3.25, "ok": True, "tags": ["a", "b"]}
items = [item] * B
for _ in range(n // B):
    if how == "batch":
        q.put_many(items)
        got = 0
        while got < B:
            got += len(q.get_many(block=True, timeout=10, max_messages_to_get=B - got))
    else:
        for _ in range(B):
            q.put(item)
        for _ in range(B):
            q.get(timeout=10)
q.close()
"""

COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count(python: str, case: tuple[str, str, str], n: int) -> int:
    """Instructions callgrind counts for one run of the child with n items."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        python,
        "-c",
        CHILD,
        *case,
        str(n),
        str(BATCH),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=1800)
    found = COLLECTED.findall(out.stderr)
    if not found:
        raise RuntimeError(f"no callgrind total in: {out.stderr[-2000:]}")
    return int(found[-1])


def available(name: str) -> bool:
    module = {"pipeq": "pipeq", "faster-fifo": "faster_fifo"}.get(name)
    if module is None:
        return True
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="items per case (default 20,000)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="cases whose queue contains one")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    n, n0 = args.n, args.n // 10
    rows = []
    print(f"instructions per message (put + get), {n - n0:,} messages, batch {BATCH}")
    print(f"{'queue':<12} {'payload':<9} {'calls':<22} {'instr/msg':>10}")
    for case in CASES:
        name, payload, how = case
        if args.only and not any(o in name for o in args.only):
            continue
        if not available(name):
            print(f"{name:<12} {payload:<9} {'(not installed)':<22}")
            continue
        per = (count(sys.executable, case, n) - count(sys.executable, case, n0)) / (n - n0)
        calls = "put_many + get_many" if how == "batch" else "put + get"
        print(f"{name:<12} {payload:<9} {calls:<22} {per:>10,.0f}")
        rows.append({"queue": name, "payload": payload, "calls": calls, "instr_per_msg": per})
    if args.json:
        args.json.write_text(json.dumps({"n": n, "batch": BATCH, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
