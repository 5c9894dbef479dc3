"""Peak memory of moving one large numpy array between two processes.

For each queue, a producer process makes an array of --mib MiB and puts it;
a consumer process gets it.  Each side resets its peak RSS (Linux's VmHWM,
via /proc/self/clear_refs) just before the call and reads it after, so the
figure is what the transfer itself added:

  producer: peak RSS during put() minus RSS before it (the array already made)
  consumer: peak RSS during get() minus RSS before it, minus the array's own
            size (the received array has to exist; anything above it is
            overhead: copies, pickle buffers)

Both are reported in MiB and as a fraction of the array's size.  Linux only.

    python bench/memory.py            # 1 GiB
    python bench/memory.py --mib 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from typing import Any

MIB = 1 << 20


def _status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def producer(q: Any, nbytes: int, results: Any) -> None:
    import numpy as np

    arr = np.ones(nbytes // 8, dtype=np.float64)  # touched: resident
    before = _status("VmRSS")
    _reset_peak()
    q.put(arr)
    if hasattr(q, "join_thread"):  # the stdlib's feeder pickles and writes later
        q.close()
        q.join_thread()
    results.put(("producer", _status("VmHWM") - before))


def consumer(q: Any, nbytes: int, results: Any) -> None:
    import numpy  # noqa: F401  (imported by unpickling otherwise: not transfer cost)

    before = _status("VmRSS")
    _reset_peak()
    arr = q.get(timeout=600)
    peak = _status("VmHWM")
    assert arr.nbytes == nbytes and float(arr[-1]) == 1.0
    results.put(("consumer", peak - before - nbytes))


def measure(kind: str, nbytes: int, ctx: Any) -> dict[str, int]:
    if kind == "pipeq":
        import pipeq

        q: Any = pipeq.Queue()
    else:
        q = ctx.Queue()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=consumer, args=(q, nbytes, results)),
        ctx.Process(target=producer, args=(q, nbytes, results)),
    ]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    out = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"{kind}: {p.name} exited with {p.exitcode}")
    out["seconds"] = time.monotonic() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=1024, help="array size in MiB (default 1024)")
    ap.add_argument("--start-method", default="spawn", choices=("fork", "spawn", "forkserver"))
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        print("bench/memory.py reads /proc: Linux only")
        return 1
    nbytes = args.mib * MIB
    ctx = multiprocessing.get_context(args.start_method)
    print(f"moving one {args.mib} MiB float64 numpy array, {args.start_method}")
    print(
        f"{'queue':<10} {'producer +MiB':>14} {'x size':>7} "
        f"{'consumer +MiB':>14} {'x size':>7} {'s':>6}"
    )
    for kind in ("pipeq", "mp.Queue"):
        r = measure(kind, nbytes, ctx)
        p, c = r["producer"], r["consumer"]
        print(
            f"{kind:<10} {p / MIB:>14.1f} {p / nbytes:>7.3f} {c / MIB:>14.1f} "
            f"{c / nbytes:>7.3f} {r['seconds']:>6.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
