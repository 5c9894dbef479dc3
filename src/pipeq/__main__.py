"""Demo: the seed's two fork scripts, run with multiprocessing.Queue and with pipeq.Queue."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any, NamedTuple

QUEUES = {"stdlib": "multiprocessing.Queue", "pipeq": "pipeq.Queue"}
SCRIPTS = {1: "script 1 (no put before fork)", 2: "script 2 (put before fork)"}
RUN_TIMEOUT = 20.0


class Outcome(NamedTuple):
    delivered: list[Any]
    missing: list[Any]
    ok: bool
    verdict: str


def expected(script: int) -> list[str]:
    return (["before fork"] if script == 2 else []) + ["child", "parent"]


def run_one(kind: str, script: int) -> Outcome:
    """Run one script with one queue in a fresh interpreter and judge the result."""
    want = expected(script)
    cmd = [sys.executable, "-m", "pipeq._demo", kind, str(script)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        result = json.loads(proc.stdout.splitlines()[-1])
    except subprocess.TimeoutExpired:
        return Outcome([], want, False, f"FAILED: no result within {RUN_TIMEOUT:g} s")
    except (IndexError, ValueError):
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return Outcome([], want, False, f"FAILED: {lines[-1]}")

    delivered: list[Any] = result["delivered"]
    missing = [m for m in want if m not in delivered]
    notes = [] if result["child"] == "ok" else [result["child"]]
    if not result["got_none"]:
        notes.append("receiver never got None")
    if proc.returncode != 0:
        notes.append(f"exit status {proc.returncode}")
    if delivered == want:
        verdict = "all delivered"
    elif missing:
        verdict = "LOST: " + ", ".join(missing)
    else:
        verdict = f"WRONG: expected {want}"
    if notes:
        verdict += f" ({'; '.join(notes)})"
    ok = delivered == want and not notes
    return Outcome(delivered, missing, ok, verdict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeq",
        description=(
            "Run the two scripts of the write-up that started pipeq (a receiver "
            "thread reads a queue; the process forks; the child puts 'child', the "
            "parent puts 'parent' and None; script 2 also puts 'before fork' before "
            "forking), each in a fresh interpreter, once with multiprocessing.Queue "
            "and once with pipeq.Queue, and show what each queue delivered. The "
            "stdlib loses the child's message in script 2: its feeder thread does "
            "not survive fork(). pipeq has no feeder thread."
        ),
        epilog="Exit status: 0 if pipeq.Queue delivered every message in both scripts, else 1.",
    )
    parser.parse_args(argv)

    width = max(len(name) for name in QUEUES.values()) + 1
    pipeq_ok = True
    stdlib_lost = 0
    for script, title in SCRIPTS.items():
        print(title)
        for kind, name in QUEUES.items():
            out = run_one(kind, script)
            print(f"  {name + ':':<{width}} {out.delivered!r:<36} -> {out.verdict}")
            if kind == "pipeq":
                pipeq_ok = pipeq_ok and out.ok
            else:
                stdlib_lost += len(out.missing)

    plural = "s" * (stdlib_lost != 1)
    stdlib = f"multiprocessing.Queue lost {stdlib_lost} message{plural}"
    pipeq = "delivered every message in both scripts" if pipeq_ok else "FAILED"
    print(f"summary: pipeq.Queue {pipeq}; {stdlib}.")
    return 0 if pipeq_ok else 1


if __name__ == "__main__":
    sys.exit(main())
