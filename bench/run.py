"""Throughput and latency of pipeq beside multiprocessing's queues, faster-fifo and the raw pipe.

One command compares, in one run on one machine:

  mp.Queue, mp.SimpleQueue    the standard library's queues
  faster-fifo get / get_many  faster-fifo 1.5 (skipped with a note when not installed)
  pipeq get                   pipeq.Queue; batch variants (put_many, get_many) are
                              added automatically once pipeq.Queue has those methods
  floor (C) / floor (Python)  the same framed bytes through one pipe, with no
                              pickling and no locks: a tiny C program (bench/floor.c,
                              compiled with $CC or cc -O2 into a temp dir), or, when
                              that fails, os.write/os.read in Python (CC=false forces
                              it). One producer and one consumer only: a pipe without
                              locks cannot share frames between readers or writers.
  floor (C, 256 KiB writes)   the same C floor writing each frame by writes of at most
                              256 KiB, as pipeq streams a frame larger than the pipe;
                              run only for such frames (for the others it is the floor)

Suites
  sweep    payloads int, 100 B, a small dict, 4 KiB, 64 KiB and 1 MiB bytes, 1 MiB and
           8 MiB numpy arrays; producers x consumers 1x1, 4x1, 1x4, 4x4. The same total
           number of items for every implementation (fewer for larger payloads).
  fifo     faster-fifo's published configurations (1x1, 1x10, 10x1, 3x20, 20x3, 20x20)
           with its 5-int-tuple message, at 1/10 of its volume (1/200 with --quick).
  latency  ping-pong over two queues, a child echoes; p50 and p99 of the round trip.

What is timed
  Every process is started and waits at a barrier before the clock starts; process
  start-up and shutdown are never timed. Each child reads the clock as it leaves the
  barrier; the start is the earliest of these. The end is the moment the last
  consumer received its last item (consumers read the clock after every get). Hence
  msg/s = total items / (end - start). MB/s = msg/s x the payload's pickled size
  (pickle.HIGHEST_PROTOCOL, in-band), in 10^6 bytes, whatever each queue really
  writes. Consumers use blocking gets with a timeout and stop at a sentinel (one
  per consumer, put by a separate process once every producer has flushed its
  items); nothing polls. With get_many, a consumer that takes several sentinels
  puts the extra ones back. Latency: N round trips after a warm-up, each timed in
  the pinging process with perf_counter_ns.

Equal capacity
  Every queue holds about the same bytes in flight: B, the pipe size pipeq gets
  (the largest the OS allows: F_SETPIPE_SZ up to /proc/sys/fs/pipe-max-size on
  Linux; printed with the results), plus R, what pipeq's ring holds of the
  payload beside its pipe (0 for items that do not use the ring; for bytes
  and numpy items of 16 KiB to 8 MiB, as many whole items as fit in 4 MiB, or
  in 32 MiB for items over 4 MiB). In items that is
  K = max(1, B // frame + R // pickled), with frame the payload's size on
  pipeq's wire; K is the "bound" column.
  - pipeq, mp.SimpleQueue, the floor: bounded by their pipe, resized to B (the
    stdlib's pipes included, which helps them with large payloads), and pipeq
    by its ring.
  - mp.Queue: maxsize=K, and its pipe resized to B. Without an item bound its
    feeder thread would run ahead without limit; it takes its semaphore on
    every put and get whatever maxsize is, so the bound costs it nothing.
  - faster-fifo: maxsize=K, and a ring of B + R + one message (8-byte header +
    pickle), since its ring must hold a message whole where a pipe streams it;
    the ring then never binds before the K items do.

Fair rules
  Fork by default (--start-method to change); 3 repetitions (--repeat), the median
  reported with the range (max - min) / median; ratios are to mp.Queue in the same
  run. The repetitions run in rounds, each round every case once, so a spell of
  load on a shared machine falls on one repetition of many cases rather than on
  every repetition of one. Every blocking call has a timeout (mp.SimpleQueue has
  none: its children are killed at the trial's deadline), every child is joined
  with a timeout, and an implementation that fails or hangs is reported as an
  error row while the run carries on. faster-fifo's blocking get can raise
  queue.Empty early when several consumers share it (it grows its receive buffer,
  then retries without blocking); the harness retries until the timeout, as its
  users must. pipeq sends a bytes payload as it is (no pickle), which is what its
  users get. numpy's BLAS is held to one thread (its idle pool spins, taking CPU
  from the queue being measured). The machine, pipe size, start method and library
  versions are printed with the results. Absolute numbers on a busy machine are
  noisy; compare ratios.

Output: an aligned table on stdout (progress on stderr), --json FILE, and PNG plots
(throughput against payload size, faster-fifo configurations, latency) in --plot DIR.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import pickle
import platform
import queue
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
BATCH = 100  # get_many / put_many batch, as in faster-fifo's own comparison
JOIN_TIMEOUT = 10.0
MB = 1e6
MIB = 1 << 20
DEFAULT_PIPE = 65536


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# numpy's OpenBLAS starts a pool of worker threads at import, and they spin
# while idle: on a 2-core machine that takes CPU from whatever queue is being
# measured (perf showed its blas_thread_server in 7% of the samples of an
# 8 MiB numpy run).  Nothing here does linear algebra, so every process gets
# one BLAS thread, unless the caller's environment says otherwise.  Set before
# numpy is first imported; children inherit it.
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _var in BLAS_THREADS:
    os.environ.setdefault(_var, "1")
np = _optional("numpy")
faster_fifo = _optional("faster_fifo")
pipeq = _optional("pipeq")


# -- payloads -----------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    name: str
    make: Callable[[], object]
    numpy: bool = False

    @property
    def available(self) -> bool:
        return np is not None or not self.numpy


def _numpy_array(nbytes: int) -> Callable[[], object]:
    return lambda: np.arange(nbytes // 8, dtype=np.float64)  # type: ignore[union-attr]


PAYLOADS: dict[str, Payload] = {
    p.name: p
    for p in (
        Payload("int", lambda: 123456789),
        Payload("bytes 100 B", lambda: b"x" * 100),
        Payload(
            "dict",
            lambda: {
                "id": 12345,
                "name": "sensor-7",
                "value": 3.25,
                "ok": True,
                "tags": ["a", "b"],
            },
        ),
        Payload("bytes 4 KiB", lambda: b"x" * 4096),
        Payload("bytes 64 KiB", lambda: b"x" * 65536),
        Payload("bytes 1 MiB", lambda: b"x" * MIB),
        Payload("numpy 1 MiB", _numpy_array(MIB), numpy=True),
        Payload("numpy 8 MiB", _numpy_array(8 * MIB), numpy=True),
        Payload("5-int tuple", lambda: (12345,) * 5),
    )
}


def pickled_size(payload: str) -> int:
    return len(pickle.dumps(PAYLOADS[payload].make(), protocol=pickle.HIGHEST_PROTOCOL))


def ring_bytes(payload: str) -> int:
    """How many bytes of such items pipeq's ring holds beside its pipe when
    no consumer takes any (pipeq's rule, src/pipeq/_shm.py): none for items
    that do not use the ring, else whole items up to RING_LAP bytes (up to
    the ring's size for items larger than RING_LAP)."""
    if pipeq is None:
        return 0
    shm = importlib.import_module("pipeq._shm")
    obj = PAYLOADS[payload].make()
    if type(obj) is bytes:
        large = len(obj)
    elif np is not None and isinstance(obj, np.ndarray):
        large = obj.nbytes
    else:
        return 0
    size = shm.ring_size()
    if not shm.RING_MIN <= large <= size // shm.RING_SHARE:
        return 0
    span = shm.RING_LAP if large <= shm.RING_LAP else size
    return span // large * large


# pipeq's wire format (src/pipeq/_shm.py): a 16-byte header, then the body with
# one marker byte after every chunk of up to 1 MiB.  The floor sends frames of
# that size so that it moves the same bytes as pipeq.
FRAME_HEADER = struct.Struct("<2sBBIQ")


def frame_body(pickled: int) -> int:
    return pickled + max(1, -(-pickled // MIB))


def frame_size(pickled: int) -> int:
    return FRAME_HEADER.size + frame_body(pickled)


# -- pipes --------------------------------------------------------------------


def set_pipe_size(fd: int, size: int) -> None:
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is not None and size > DEFAULT_PIPE:
        fcntl.fcntl(fd, setsz, size)


def pipe_size(fd: int) -> int:
    getsz = getattr(fcntl, "F_GETPIPE_SZ", None)
    return fcntl.fcntl(fd, getsz) if getsz is not None else DEFAULT_PIPE


def probe_pipe_size() -> int:
    """The pipe size pipeq gets: ask pipeq, else grow a pipe the way pipeq does."""
    if pipeq is not None:
        q = pipeq.Queue()
        try:
            return int(q.pipe_capacity)
        finally:
            q.close()
    r, w = os.pipe()
    try:
        try:
            size = int(Path("/proc/sys/fs/pipe-max-size").read_text())
        except (OSError, ValueError):
            size = 0
        while size > DEFAULT_PIPE:
            try:
                set_pipe_size(w, size)
                break
            except OSError:
                size //= 2
        return pipe_size(w)
    finally:
        os.close(r)
        os.close(w)


class RawPipe:
    """Framed bytes through a blocking pipe, no pickling, no locks: the pure-Python floor.

    put() writes a whole prebuilt frame (None: the empty frame that stands for
    the sentinel); get() returns the whole frame read, None for an empty one.
    """

    def __init__(self, size: int) -> None:
        r, w = os.pipe()
        set_pipe_size(w, size)
        # Connections only to own the fds: they travel to spawn/forkserver children.
        self._r, self._w = Connection(r, writable=False), Connection(w, readable=False)

    @staticmethod
    def frame(body: int) -> bytes:
        return FRAME_HEADER.pack(b"pq", 1, 0, 0, body) + bytes(body)

    def put(
        self,
        frame: bytes | bytearray | None,
        block: bool = True,
        timeout: float | None = None,
    ) -> None:
        view = memoryview(frame if frame is not None else self.frame(0))
        fd = self._w.fileno()
        while view:
            view = view[os.write(fd, view) :]

    def get(self, block: bool = True, timeout: float | None = None) -> bytearray | None:
        header = bytearray(FRAME_HEADER.size)
        self._read_into(memoryview(header))
        body = FRAME_HEADER.unpack(header)[4]
        if body == 0:
            return None
        frame = bytearray(FRAME_HEADER.size + body)
        frame[: FRAME_HEADER.size] = header
        self._read_into(memoryview(frame)[FRAME_HEADER.size :])
        return frame

    def _read_into(self, view: memoryview) -> None:
        fd = self._r.fileno()
        while view:
            k = os.readv(fd, [view])
            if k == 0:
                raise EOFError("raw pipe closed mid-frame")
            view = view[k:]

    def close(self) -> None:
        self._r.close()
        self._w.close()


# -- implementations ----------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """The common bound: `pipe` bytes and `ring` bytes (what pipeq's ring holds
    of such items), `items` messages of `pickled` bytes."""

    pipe: int
    pickled: int
    ring: int = 0

    @property
    def items(self) -> int:
        return max(1, self.pipe // frame_size(self.pickled) + self.ring // max(1, self.pickled))


def _put(q: Any, item: object, timeout: float) -> None:
    q.put(item, True, timeout)


def _get(q: Any, timeout: float) -> Any:
    return q.get(True, timeout)


def _put_untimed(q: Any, item: object, timeout: float) -> None:
    q.put(item)


def _get_untimed(q: Any, timeout: float) -> Any:
    return q.get()


def _no_flush(q: Any) -> None:
    pass


def _flush_feeder(q: Any) -> None:
    """Wait until mp.Queue's feeder thread has written everything into the pipe."""
    q.close()
    q.join_thread()


def _put_many(q: Any, items: list[object], timeout: float) -> None:
    q.put_many(items, block=True, timeout=timeout)


def _get_many(q: Any, timeout: float) -> list[Any]:
    return list(q.get_many(block=True, timeout=timeout, max_messages_to_get=BATCH))


def _ff_get_up_to(q: Any, timeout: float, n: int) -> list[Any]:
    """faster-fifo's get_many, retried after an early Empty until `timeout` passes.

    When its receive buffer is too small for the next message, a blocking
    get_many grows the buffer and retries without blocking; with several
    consumers another one may have taken the message meanwhile, and Empty is
    raised long before the timeout (faster_fifo.pyx 1.5.2).  Users must retry.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = max(0.001, deadline - time.monotonic())
        try:
            return list(q.get_many(block=True, timeout=left, max_messages_to_get=n))
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise


def _ff_get(q: Any, timeout: float) -> Any:
    return _ff_get_up_to(q, timeout, 1)[0]


def _ff_get_many(q: Any, timeout: float) -> list[Any]:
    return _ff_get_up_to(q, timeout, BATCH)


def _make_mp_queue(ctx: BaseContext, cap: Capacity) -> Any:
    q = ctx.Queue(cap.items)
    set_pipe_size(q._writer.fileno(), cap.pipe)  # type: ignore[attr-defined]
    return q


def _make_mp_simple(ctx: BaseContext, cap: Capacity) -> Any:
    q = ctx.SimpleQueue()
    set_pipe_size(q._writer.fileno(), cap.pipe)  # type: ignore[attr-defined]
    return q


def _make_faster_fifo(ctx: BaseContext, cap: Capacity) -> Any:
    assert faster_fifo is not None
    return faster_fifo.Queue(
        max_size_bytes=cap.pipe + cap.ring + 8 + cap.pickled, maxsize=cap.items
    )


def _make_pipeq(ctx: BaseContext, cap: Capacity) -> Any:
    assert pipeq is not None
    return pipeq.Queue()


def _make_raw(ctx: BaseContext, cap: Capacity) -> Any:
    return RawPipe(cap.pipe)


@dataclass(frozen=True)
class Impl:
    """One way of moving items: how to build the queue and how to put and get."""

    name: str
    make: Callable[[BaseContext, Capacity], Any]
    put: Callable[[Any, object, float], None] = _put
    get: Callable[[Any, float], Any] = _get
    put_many: Callable[[Any, list[object], float], None] | None = None
    get_many: Callable[[Any, float], list[Any]] | None = None
    flush: Callable[[Any], None] = _no_flush  # producers call it before the sentinels
    floor: bool = False  # raw frames, one producer and one consumer only

    @property
    def batched(self) -> bool:
        return self.put_many is not None or self.get_many is not None


MP_QUEUE = "mp.Queue"
C_FLOOR = "floor (C)"
PY_FLOOR = "floor (Python)"
# pipeq streams a frame larger than the pipe by writes of at most this many
# bytes (src/pipeq/_shm.py, WRITE_SLICE); this floor writes the same way.
SLICED_WRITE = 256 * 1024
C_FLOOR_SLICED = "floor (C, 256 KiB writes)"


def _registry() -> tuple[dict[str, Impl], list[str]]:
    """Every implementation this interpreter can run, and notes on the missing ones."""
    impls = [
        Impl(MP_QUEUE, _make_mp_queue, flush=_flush_feeder),
        Impl("mp.SimpleQueue", _make_mp_simple, put=_put_untimed, get=_get_untimed),
    ]
    notes = []
    if faster_fifo is not None:
        impls += [
            Impl("faster-fifo get", _make_faster_fifo, get=_ff_get),
            Impl(
                "faster-fifo get_many",
                _make_faster_fifo,
                get=_ff_get,
                get_many=_ff_get_many,
            ),
            Impl(
                "faster-fifo put_many+get_many",
                _make_faster_fifo,
                get=_ff_get,
                put_many=_put_many,
                get_many=_ff_get_many,
            ),
        ]
    else:
        notes.append("faster-fifo is not installed: its rows are skipped (pip install faster-fifo)")
    if pipeq is not None:
        impls.append(Impl("pipeq get", _make_pipeq))
        # pipeq's batch calls (faster-fifo's names and arguments).
        if hasattr(pipeq.Queue, "get_many"):
            impls.append(Impl("pipeq get_many", _make_pipeq, get_many=_get_many))
        if hasattr(pipeq.Queue, "put_many") and hasattr(pipeq.Queue, "get_many"):
            impls.append(
                Impl(
                    "pipeq put_many+get_many",
                    _make_pipeq,
                    put_many=_put_many,
                    get_many=_get_many,
                )
            )
    else:
        notes.append("pipeq is not importable: its rows are skipped (pip install .)")
    # The C floor is measured by bench/floor.c, not by the workers below.
    impls += [
        Impl(C_FLOOR, _make_raw, floor=True),
        Impl(C_FLOOR_SLICED, _make_raw, floor=True),
        Impl(PY_FLOOR, _make_raw, floor=True),
    ]
    return {i.name: i for i in impls}, notes


IMPLS, MISSING = _registry()


# -- child processes ----------------------------------------------------------


@dataclass
class Reporter:
    """Children report (role, ok, value) to the supervising parent through one pipe."""

    lock: Any
    conn: Connection

    def send(self, message: tuple[str, bool, object]) -> None:
        with self.lock:
            self.conn.send(message)


def _item(impl: Impl, payload: str) -> object:
    obj = PAYLOADS[payload].make()
    if impl.floor:
        return RawPipe.frame(frame_body(len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))))
    return obj


def child(
    reporter: Reporter, role: str, target: Callable[..., object], args: tuple[Any, ...]
) -> None:
    try:
        reporter.send((role, True, target(*args)))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the report
        reporter.send((role, False, f"{type(exc).__name__} {exc}".strip()))


def producer(
    impl_name: str,
    q: Any,
    start: Any,
    done: Any,
    payload: str,
    n: int,
    batch: int,
    timeout: float,
) -> float:
    impl = IMPLS[impl_name]
    item = _item(impl, payload)
    start.wait(timeout)
    t0 = time.perf_counter()
    if impl.put_many is not None:
        for i in range(0, n, batch):
            impl.put_many(q, [item] * min(batch, n - i), timeout)
    else:
        for _ in range(n):
            impl.put(q, item, timeout)
    impl.flush(q)
    done.wait(timeout)
    return t0


def consumer(impl_name: str, q: Any, start: Any, timeout: float) -> tuple[float, float, int]:
    impl = IMPLS[impl_name]
    start.wait(timeout)
    t0 = last = time.perf_counter()
    count = 0
    if impl.get_many is None:
        while impl.get(q, timeout) is not None:
            last = time.perf_counter()
            count += 1
    else:
        while True:
            batch = impl.get_many(q, timeout)
            stops = sum(1 for x in batch if x is None)
            if len(batch) > stops:
                last = time.perf_counter()
                count += len(batch) - stops
            if stops:
                for _ in range(stops - 1):
                    impl.put(q, None, timeout)
                break
    return t0, last, count


def closer(impl_name: str, q: Any, done: Any, consumers: int, timeout: float) -> None:
    """Once every producer has flushed, put one sentinel per consumer (outside the clock)."""
    impl = IMPLS[impl_name]
    done.wait(timeout)
    for _ in range(consumers):
        impl.put(q, None, timeout)
    impl.flush(q)


def echo(impl_name: str, ping: Any, pong: Any, timeout: float) -> int:
    impl = IMPLS[impl_name]
    n = 0
    while (item := impl.get(ping, timeout)) is not None:
        impl.put(pong, item, timeout)
        n += 1
    impl.flush(pong)
    return n


def pinger(
    impl_name: str,
    ping: Any,
    pong: Any,
    payload: str,
    n: int,
    warmup: int,
    timeout: float,
) -> list[int]:
    impl = IMPLS[impl_name]
    item = _item(impl, payload)
    samples = []
    for _ in range(warmup + n):
        t = time.perf_counter_ns()
        impl.put(ping, item, timeout)
        impl.get(pong, timeout)
        samples.append(time.perf_counter_ns() - t)
    impl.put(ping, None, timeout)
    impl.flush(ping)
    return samples[warmup:]


# -- trials -------------------------------------------------------------------


class TrialError(Exception):
    pass


Role = tuple[str, Callable[..., object], tuple[Any, ...]]


def supervise(ctx: BaseContext, roles: Sequence[Role], timeout: float) -> dict[str, Any]:
    """Run each role in its own process; return their results or raise TrialError.

    Never hangs: reports are awaited until a deadline, a child that dies without
    reporting is an error, and every child is joined with a timeout and killed
    if it is still there.
    """
    reader, writer = ctx.Pipe(duplex=False)
    reporter = Reporter(ctx.Lock(), writer)
    procs = {
        role: ctx.Process(  # type: ignore[attr-defined]
            target=child, args=(reporter, role, fn, args), name=role, daemon=True
        )
        for role, fn, args in roles
    }
    results: dict[str, Any] = {}
    ok = False
    # Set before any child starts, so that it passes before the children's own
    # timeouts (which start later) and a hang reads as one.
    deadline = time.monotonic() + timeout
    try:
        for p in procs.values():
            p.start()
        writer.close()
        while len(results) < len(procs):
            left = deadline - time.monotonic()
            silent = [p for role, p in procs.items() if role not in results]
            if left <= 0:
                more = f" and {len(silent) - 1} more" if len(silent) > 1 else ""
                raise TrialError(
                    f"timed out after {timeout:g} s waiting for {silent[0].name}{more}"
                )
            if not reader.poll(min(left, 0.5)):
                dead = [p for p in silent if p.exitcode is not None]
                if dead and not reader.poll(0):  # its report is not in flight
                    raise TrialError(f"{dead[0].name} exited with code {dead[0].exitcode}")
                continue
            try:
                role, fine, value = reader.recv()
            except EOFError:  # every child has exited
                silent[0].join(JOIN_TIMEOUT)
                raise TrialError(
                    f"{silent[0].name} exited with code {silent[0].exitcode}"
                ) from None
            if not fine:
                raise TrialError(f"{role}: {value}")
            results[role] = value
        ok = True
        return results
    finally:
        reader.close()
        for p in procs.values():
            p.join(JOIN_TIMEOUT if ok else 0.1)
        stuck = [p for p in procs.values() if p.is_alive()]
        for p in stuck:
            p.kill()
            p.join(JOIN_TIMEOUT)
        if ok and stuck:
            raise TrialError(f"{stuck[0].name} did not exit after reporting")


def dispose(q: Any, clean: bool) -> None:
    """Close a queue the parent made; never wait for a feeder thread after a failure."""
    if not clean and hasattr(q, "cancel_join_thread"):
        q.cancel_join_thread()
    if hasattr(q, "close"):
        q.close()
    if clean and hasattr(q, "join_thread"):
        q.join_thread()


@dataclass(frozen=True)
class Workload:
    suite: str
    payload: str
    pickled: int  # bytes
    producers: int
    consumers: int
    items: int  # in all, a multiple of producers

    @property
    def per_producer(self) -> int:
        return self.items // self.producers

    @property
    def shape(self) -> str:
        return f"{self.producers}x{self.consumers}"


@dataclass(frozen=True)
class Settings:
    ctx: BaseContext
    pipe: int
    timeout: float
    floor_exe: str | None

    def capacity(self, payload: str, pickled: int) -> Capacity:
        return Capacity(self.pipe, pickled, ring_bytes(payload))


def run_floor_exe(s: Settings, mode: str, body: int, count: int, *extra: str) -> str:
    assert s.floor_exe is not None
    try:
        done = subprocess.run(
            [s.floor_exe, mode, str(body), str(count), str(s.pipe), *extra],
            capture_output=True,
            text=True,
            timeout=s.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TrialError(f"floor timed out after {s.timeout:g} s") from None
    if done.returncode != 0:
        raise TrialError(done.stderr.strip() or f"floor exited with code {done.returncode}")
    return done.stdout


def throughput_trial(impl: Impl, wl: Workload, s: Settings) -> float:
    """Seconds from the barrier release to the last consumer's last item."""
    if impl.name == C_FLOOR:
        return float(run_floor_exe(s, "throughput", frame_body(wl.pickled), wl.items))
    if impl.name == C_FLOOR_SLICED:
        out = run_floor_exe(s, "throughput", frame_body(wl.pickled), wl.items, str(SLICED_WRITE))
        return float(out)
    q = impl.make(s.ctx, s.capacity(wl.payload, wl.pickled))
    start = s.ctx.Barrier(wl.producers + wl.consumers)
    done = s.ctx.Barrier(wl.producers + 1)
    batch = max(1, min(BATCH, s.pipe // max(1, wl.pickled)))
    roles: list[Role] = [
        (f"consumer {i}", consumer, (impl.name, q, start, s.timeout)) for i in range(wl.consumers)
    ]
    roles += [
        (
            f"producer {i}",
            producer,
            (impl.name, q, start, done, wl.payload, wl.per_producer, batch, s.timeout),
        )
        for i in range(wl.producers)
    ]
    roles.append(("closer", closer, (impl.name, q, done, wl.consumers, s.timeout)))
    clean = False
    try:
        results = supervise(s.ctx, roles, s.timeout)
        clean = True
    finally:
        dispose(q, clean)
    got = [v for r, v in results.items() if r.startswith("consumer")]
    received = sum(count for _, _, count in got)
    if received != wl.items:
        raise TrialError(f"consumers received {received} of {wl.items} items")
    starts = [v for r, v in results.items() if r.startswith("producer")] + [t0 for t0, _, _ in got]
    return max(last for _, last, _ in got) - min(starts)


def latency_trial(
    impl: Impl, payload: str, pickled: int, n: int, warmup: int, s: Settings
) -> list[float]:
    """Round-trip times in microseconds."""
    if impl.name == C_FLOOR:
        out = run_floor_exe(s, "pingpong", frame_body(pickled), warmup + n)
        return [int(line) / 1e3 for line in out.split()[warmup:]]
    cap = s.capacity(payload, pickled)
    ping, pong = impl.make(s.ctx, cap), impl.make(s.ctx, cap)
    clean = False
    try:
        results = supervise(
            s.ctx,
            [
                ("echo", echo, (impl.name, ping, pong, s.timeout)),
                (
                    "pinger",
                    pinger,
                    (impl.name, ping, pong, payload, n, warmup, s.timeout),
                ),
            ],
            s.timeout,
        )
        clean = True
    finally:
        dispose(ping, clean)
        dispose(pong, clean)
    return [ns / 1e3 for ns in results["pinger"]]


# -- plans and statistics -----------------------------------------------------

FIFO_PUBLISHED = (
    (1, 1, 200_000),
    (1, 10, 200_000),
    (10, 1, 100_000),
    (3, 20, 100_000),
    (20, 3, 50_000),
    (20, 20, 50_000),
)


@dataclass(frozen=True)
class Mode:
    name: str
    payloads: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    byte_budget: int  # per sweep trial, in pickled bytes...
    max_items: int  # ...capped to this many items...
    min_items: int  # ...and never fewer than this
    fifo_divisor: int  # faster-fifo's published volumes, divided by this
    fifo_shapes: tuple[tuple[int, int], ...]
    latency_payloads: tuple[str, ...]
    round_trips: int
    warmup: int


FULL = Mode(
    name="full",
    payloads=tuple(p for p in PAYLOADS if p != "5-int tuple"),
    shapes=((1, 1), (4, 1), (1, 4), (4, 4)),
    byte_budget=256 * MIB,
    max_items=40_000,
    min_items=32,
    fifo_divisor=10,
    fifo_shapes=tuple((p, c) for p, c, _ in FIFO_PUBLISHED),
    latency_payloads=("int", "bytes 4 KiB", "bytes 64 KiB"),
    round_trips=20_000,
    warmup=500,
)
QUICK = Mode(
    name="quick",
    payloads=("int", "bytes 4 KiB", "bytes 1 MiB", "numpy 8 MiB"),
    shapes=((1, 1), (4, 4)),
    byte_budget=16 * MIB,
    max_items=5_000,
    min_items=4,
    fifo_divisor=200,
    fifo_shapes=((1, 1), (10, 1), (20, 20)),
    latency_payloads=("int",),
    round_trips=2_000,
    warmup=200,
)


def plan_sweep(mode: Mode, scale: float, sizes: dict[str, int]) -> list[Workload]:
    """Each payload's item count, the same total for every shape and implementation."""
    step = math.lcm(*(p for p, _ in mode.shapes))
    out = []
    for payload in mode.payloads:
        if payload not in sizes:
            continue
        items = min(mode.max_items, max(mode.min_items, mode.byte_budget // sizes[payload]))
        items = max(step, round(items * scale) // step * step)
        for p, c in mode.shapes:
            out.append(Workload("sweep", payload, sizes[payload], p, c, items))
    return out


def plan_fifo(mode: Mode, scale: float, sizes: dict[str, int]) -> list[Workload]:
    return [
        Workload(
            "fifo",
            "5-int tuple",
            sizes["5-int tuple"],
            p,
            c,
            p * max(1, round(n / mode.fifo_divisor * scale)),
        )
        for p, c, n in FIFO_PUBLISHED
        if (p, c) in mode.fifo_shapes
    ]


@dataclass
class Spread:
    """The median of the repetitions, their extremes, and how many there were."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def range(self) -> str:
        """(max - min) / median, or "-" for a single run."""
        if self.runs < 2 or not self.median:
            return "-"
        return f"{100 * (self.high - self.low) / self.median:.0f}%"


@dataclass
class ThroughputResult:
    workload: Workload
    impl: str
    bound: int  # the capacity in items, see "Equal capacity"
    seconds: list[float] = field(default_factory=list)
    msg_per_s: Spread | None = None
    mb_per_s: float | None = None
    vs_mp_queue: float | None = None
    error: str | None = None


@dataclass
class LatencyResult:
    payload: str
    pickled_bytes: int
    impl: str
    round_trips: int
    p50_us: Spread | None = None
    p99_us: Spread | None = None
    vs_mp_queue_p50: float | None = None
    error: str | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _measures(impl: Impl, wl: Workload, s: Settings) -> bool:
    """Whether impl runs workload wl: a floor runs 1x1 only, the sliced one only
    for frames larger than the pipe (it writes the others as the floor does)."""
    if impl.name == C_FLOOR_SLICED:
        return wl.shape == "1x1" and frame_size(wl.pickled) > s.pipe
    return not impl.floor or wl.shape == "1x1"


def run_throughput(
    workloads: list[Workload], impls: list[Impl], repeat: int, s: Settings
) -> list[ThroughputResult]:
    cases = [(wl, impl) for wl in workloads for impl in impls if _measures(impl, wl, s)]
    results = [
        ThroughputResult(wl, impl.name, s.capacity(wl.payload, wl.pickled).items)
        for wl, impl in cases
    ]
    for rnd in range(1, repeat + 1):
        for k, ((wl, impl), res) in enumerate(zip(cases, results, strict=True), 1):
            if res.error is not None:
                continue  # failed in an earlier round: reported as an error row
            t0 = time.monotonic()
            try:
                res.seconds.append(throughput_trial(impl, wl, s))
                outcome = f"{wl.items / res.seconds[-1]:12,.0f} msg/s"
            except TrialError as exc:
                res.error = str(exc)
                outcome = f"ERROR {res.error}"
            progress(
                f"[round {rnd}/{repeat}, {k}/{len(cases)}] {wl.suite} {wl.payload} {wl.shape}"
                f" {impl.name}: {outcome} ({time.monotonic() - t0:.1f} s)"
            )
    for res in results:
        if res.seconds and res.error is None:
            res.msg_per_s = Spread.of([res.workload.items / t for t in res.seconds])
            res.mb_per_s = res.msg_per_s.median * res.workload.pickled / MB
    base = {r.workload: r.msg_per_s for r in results if r.impl == MP_QUEUE}
    for r in results:
        if r.msg_per_s and base.get(r.workload):
            r.vs_mp_queue = r.msg_per_s.median / base[r.workload].median  # type: ignore[union-attr]
    return results


def run_latency(
    payloads: Iterable[tuple[str, int]],
    impls: list[Impl],
    mode: Mode,
    scale: float,
    repeat: int,
    s: Settings,
) -> list[LatencyResult]:
    n = max(10, round(mode.round_trips * scale))
    cases = [(payload, pickled, impl) for payload, pickled in payloads for impl in impls]
    cases = [c for c in cases if not c[2].batched and c[2].name != C_FLOOR_SLICED]
    results = [LatencyResult(payload, pickled, impl.name, n) for payload, pickled, impl in cases]
    p50s: list[list[float]] = [[] for _ in cases]
    p99s: list[list[float]] = [[] for _ in cases]
    for rnd in range(1, repeat + 1):  # in rounds, as run_throughput
        for k, ((payload, pickled, impl), res) in enumerate(zip(cases, results, strict=True)):
            if res.error is not None:
                continue
            try:
                samples = sorted(latency_trial(impl, payload, pickled, n, mode.warmup, s))
                p50s[k].append(percentile(samples, 50))
                p99s[k].append(percentile(samples, 99))
                outcome = f"p50 {p50s[k][-1]:,.1f} us, p99 {p99s[k][-1]:,.1f} us"
            except TrialError as exc:
                res.error = str(exc)
                outcome = f"ERROR {res.error}"
            progress(f"[round {rnd}/{repeat}] latency {payload} {impl.name}: {outcome}")
    for k, res in enumerate(results):
        if res.error is None and p50s[k]:
            res.p50_us, res.p99_us = Spread.of(p50s[k]), Spread.of(p99s[k])
    base = {r.payload: r.p50_us for r in results if r.impl == MP_QUEUE}
    for r in results:
        if r.p50_us and base.get(r.payload):
            r.vs_mp_queue_p50 = r.p50_us.median / base[r.payload].median  # type: ignore[union-attr]
    return results


# -- the machine --------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(s: Settings, floor: str, start_method: str) -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "start method": start_method,
        "pipe size": (
            f"{s.pipe} bytes, pipeq's (pipe-max-size {_read_text('/proc/sys/fs/pipe-max-size')})"
        ),
        "capacity": "every pipe resized to the pipe size B; mp.Queue and faster-fifo"
        " maxsize = the items that B and pipeq's ring R hold (the bound column);"
        " faster-fifo ring = B + R + one message",
        "floor": floor,
        "blas threads": ", ".join(f"{v}={os.environ.get(v)}" for v in BLAS_THREADS),
    }
    for dist in ("pipeq", "faster-fifo", "numpy", "matplotlib"):
        info[dist] = version_of(dist)
    if pipeq is not None:
        core = importlib.import_module("pipeq._core")
        info["pipeq core"] = (
            "compiled" if getattr(core, "USING_EXTENSION", False) else "pure Python"
        )
    if Path("/dev/shm").is_dir():
        st = os.statvfs("/dev/shm")
        info["/dev/shm"] = f"{st.f_blocks * st.f_frsize / 2**30:.1f} GiB"
    return info


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "n/a"


def build_floor(where: str) -> tuple[str | None, str]:
    """Compile bench/floor.c; returns (executable or None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None, "no C compiler found"
    exe = os.path.join(where, "floor")
    done = subprocess.run(
        [cc, "-O2", "-o", exe, str(HERE / "floor.c")],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None, f"{cc} failed: {done.stderr.strip()[:200]}"
    return exe, ""


# -- output -------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Aligned columns; cells past the headers (error messages) trail unaligned."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        aligned = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join([*aligned, *cells[len(widths) :]]).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def human_bytes(n: int) -> str:
    for unit, size in (("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def throughput_table(results: list[ThroughputResult]) -> str:
    rows = []
    previous = None
    for r in results:
        wl = r.workload
        head = [
            wl.payload,
            human_bytes(wl.pickled),
            f"{r.bound:,}",
            wl.shape,
            f"{wl.items:,}",
        ]
        head = head if wl != previous else [""] * 5
        previous = wl
        if r.msg_per_s is None:
            rows.append([*head, r.impl, "error", "", "", "", str(r.error)])
            continue
        ratio = f"{r.vs_mp_queue:.2f}" if r.vs_mp_queue is not None else "-"
        rows.append(
            [
                *head,
                r.impl,
                f"{r.msg_per_s.median:,.0f}",
                f"{r.mb_per_s:,.1f}",
                ratio,
                r.msg_per_s.range(),
            ]
        )
    headers = [
        "payload",
        "pickled",
        "bound",
        "PxC",
        "items",
        "implementation",
        "msg/s",
        "MB/s",
        "x mp.Queue",
        "range",
    ]
    return table(headers, rows, right={1, 2, 4, 6, 7, 8, 9})


def latency_table(results: list[LatencyResult]) -> str:
    rows = []
    previous = None
    for r in results:
        head = [r.payload, f"{r.round_trips:,}"] if r.payload != previous else ["", ""]
        previous = r.payload
        if r.p50_us is None or r.p99_us is None:
            rows.append([*head, r.impl, "error", "", "", "", str(r.error)])
            continue
        ratio = f"{r.vs_mp_queue_p50:.2f}" if r.vs_mp_queue_p50 is not None else "-"
        rows.append(
            [
                *head,
                r.impl,
                f"{r.p50_us.median:,.1f}",
                f"{r.p99_us.median:,.1f}",
                ratio,
                r.p50_us.range(),
            ]
        )
    headers = [
        "payload",
        "round trips",
        "implementation",
        "p50 us",
        "p99 us",
        "p50 x mp.Queue",
        "range p50",
    ]
    return table(headers, rows, right={1, 3, 4, 5, 6})


def plot(
    out: Path,
    impl_names: list[str],
    tput: list[ThroughputResult],
    lat: list[LatencyResult],
) -> list[str]:
    """Write the PNGs and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impl_names)}
    charts: list[tuple[str, Callable[..., Any], list[Any]]] = [
        (
            "throughput.png",
            _plot_sweep,
            [r for r in tput if r.workload.suite == "sweep" and r.mb_per_s],
        ),
        (
            "fifo-configs.png",
            _plot_fifo,
            [r for r in tput if r.workload.suite == "fifo" and r.msg_per_s],
        ),
        ("latency.png", _plot_latency, [r for r in lat if r.p50_us and r.p99_us]),
    ]
    written = []
    for filename, draw, rows in charts:
        if rows:
            fig = draw(plt, colours, rows)
            fig.savefig(out / filename, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(str(out / filename))
    return written


def _plot_sweep(plt: Any, colours: dict[str, Any], rows: list[ThroughputResult]) -> Any:
    """MB/s against pickled size, one panel per producers x consumers."""
    from matplotlib.lines import Line2D

    shapes = list(dict.fromkeys(r.workload.shape for r in rows))
    ncols = min(2, len(shapes))
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.5 * ncols, 3.6 * nrows + 1),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for name, colour in colours.items():
            mine = sorted(
                (
                    (r.workload, r.mb_per_s)
                    for r in rows
                    if r.impl == name and r.workload.shape == shape
                ),
                key=lambda pair: pair[0].pickled,
            )
            for is_numpy, style in ((False, "o-"), (True, "s:")):
                pts = [(w.pickled, y) for w, y in mine if w.payload.startswith("numpy") == is_numpy]
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=colour)
        ax.set(xscale="log", yscale="log", title=shape)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("pickled payload size (bytes)")
    fig.supylabel("MB/s (of pickled bytes)")
    present = [n for n in colours if any(r.impl == n for r in rows)]
    handles = [Line2D([], [], color=colours[n], marker="o", label=n) for n in present]
    handles.append(Line2D([], [], color="grey", marker="s", ls=":", label="numpy arrays"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)))
    fig.suptitle("Throughput against payload size (producers x consumers)")
    return fig


def _grouped_bars(
    plt: Any,
    colours: dict[str, Any],
    groups: list[str],
    bars: Mapping[str, Mapping[str, Sequence[float]]],
) -> tuple[Any, Any]:
    """One group of bars per entry of `groups`, one bar per implementation.

    bars[impl][group] holds one value, or (solid, pale): a bar drawn over a
    paler, taller one.
    """
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(bars))
    for j, (name, values) in enumerate(bars.items()):
        here = [g for g in groups if g in values]
        xs = [groups.index(g) + j * width for g in here]
        if any(len(values[g]) > 1 for g in here):
            ax.bar(xs, [values[g][1] for g in here], width, color=colours[name], alpha=0.35)
        ax.bar(xs, [values[g][0] for g in here], width, color=colours[name], label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax


def _plot_fifo(plt: Any, colours: dict[str, Any], rows: list[ThroughputResult]) -> Any:
    groups = list(dict.fromkeys(r.workload.shape for r in rows))
    bars = {
        name: {
            r.workload.shape: (r.msg_per_s.median,) for r in rows if r.impl == name and r.msg_per_s
        }
        for name in colours
        if any(r.impl == name for r in rows)
    }
    fig, ax = _grouped_bars(plt, colours, groups, bars)
    ax.set(ylabel="msg/s", xlabel="producers x consumers")
    ax.set_title("faster-fifo's configurations (5-int tuple)")
    return fig


def _plot_latency(plt: Any, colours: dict[str, Any], rows: list[LatencyResult]) -> Any:
    groups = list(dict.fromkeys(r.payload for r in rows))
    bars = {
        name: {
            r.payload: (r.p50_us.median, r.p99_us.median)
            for r in rows
            if r.impl == name and r.p50_us and r.p99_us
        }
        for name in colours
        if any(r.impl == name for r in rows)
    }
    fig, ax = _grouped_bars(plt, colours, groups, bars)
    ax.set(ylabel="round trip (us): solid p50, pale p99", xlabel="payload")
    ax.set_title("Ping-pong latency")
    return fig


# -- main ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer workloads and smaller volumes, under a minute",
    )
    ap.add_argument(
        "--json",
        metavar="FILE",
        type=Path,
        help="also write every result and the machine as JSON",
    )
    ap.add_argument(
        "--plot",
        metavar="DIR",
        type=Path,
        default=HERE / "out",
        help="where the PNGs go (default bench/out)",
    )
    ap.add_argument("--no-plot", action="store_true", help="skip the plots")
    ap.add_argument("--start-method", choices=("fork", "spawn", "forkserver"), default="fork")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions per case (default 3)")
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every volume by this (e.g. 0.2)",
    )
    ap.add_argument(
        "--suite",
        nargs="+",
        choices=("sweep", "fifo", "latency"),
        default=["sweep", "fifo", "latency"],
    )
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="implementations whose name contains one of these",
    )
    ap.add_argument(
        "--payload",
        nargs="+",
        metavar="NAME",
        help="sweep payloads whose name contains one of these (e.g. numpy 64)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds before a trial is abandoned and reported as an error",
    )
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.payload:
        names = tuple(p for p in PAYLOADS if any(w in p for w in args.payload))
        mode = replace(mode, payloads=names)
    repeat = args.repeat
    t_begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pipeq-bench-") as tmp:
        floor_exe, why = build_floor(tmp)
        if floor_exe is not None:
            floor_name = C_FLOOR
            floor_desc = "C helper bench/floor.c (-O2): framed bytes, no pickling, no locks"
        else:
            floor_name = PY_FLOOR
            floor_desc = (
                "pure Python os.write/os.readv: framed bytes, no pickling, no locks "
                f"(no C floor: {why})"
            )
        floors = [floor_name] + ([C_FLOOR_SLICED] if floor_name == C_FLOOR else [])
        impls = [i for i in IMPLS.values() if not i.floor or i.name in floors]
        if args.only:
            impls = [i for i in impls if any(o in i.name for o in args.only)]
        s = Settings(
            ctx=multiprocessing.get_context(args.start_method),
            pipe=probe_pipe_size(),
            timeout=args.timeout,
            floor_exe=floor_exe,
        )
        notes = list(MISSING)
        if not any(i.name == MP_QUEUE for i in impls):
            notes.append("mp.Queue is not selected: no ratios")
        notes += [
            f"payload {p.name!r} skipped: numpy is not installed"
            for p in PAYLOADS.values()
            if not p.available
        ]
        if not args.no_plot and _optional("matplotlib") is None:
            notes.append("matplotlib is not installed: no plots (pip install matplotlib)")
        sizes = {p.name: pickled_size(p.name) for p in PAYLOADS.values() if p.available}
        machine = machine_info(s, floor_desc, args.start_method)
        reps = f"{repeat}" + (
            " (a single run: no spread)" if repeat == 1 else "; median and range (max-min)/median"
        )
        header = [f"{k:>14}: {v}" for k, v in machine.items()] + [f"{'repetitions':>14}: {reps}"]
        header += [f"{'note':>14}: {n}" for n in notes]
        print("\n".join(header), flush=True)

        workloads = []
        if "sweep" in args.suite:
            workloads += plan_sweep(mode, args.scale, sizes)
        if "fifo" in args.suite:
            workloads += plan_fifo(mode, args.scale, sizes)
        tput = run_throughput(workloads, impls, repeat, s)
        lat: list[LatencyResult] = []
        if "latency" in args.suite:
            lat_payloads = [(p, sizes[p]) for p in mode.latency_payloads if p in sizes]
            lat = run_latency(lat_payloads, impls, mode, args.scale, repeat, s)

    for suite, title in (
        ("sweep", "payload sweep"),
        ("fifo", f"faster-fifo's configurations, 1/{mode.fifo_divisor} volume"),
    ):
        rows = [r for r in tput if r.workload.suite == suite]
        if rows:
            print(f"\nThroughput, {title} (MB/s from the pickled size; range = (max-min)/median)")
            print(throughput_table(rows))
    if lat:
        print("\nPing-pong latency (round trip, microseconds)")
        print(latency_table(lat))

    elapsed = time.monotonic() - t_begin
    can_plot = not args.no_plot and _optional("matplotlib") is not None
    written = plot(args.plot, [i.name for i in impls], tput, lat) if can_plot else []
    for w in written:
        print(f"plot: {w}")
    print(f"total time: {elapsed:.0f} s ({mode.name} mode)")
    if args.json:
        report = {
            "machine": machine,
            "settings": {
                "mode": mode.name,
                "repeat": repeat,
                "scale": args.scale,
                "batch": BATCH,
                "implementations": [i.name for i in impls],
            },
            "notes": notes,
            "throughput": [asdict(r) for r in tput],
            "latency": [asdict(r) for r in lat],
            "plots": written,
            "seconds": round(elapsed, 1),
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
