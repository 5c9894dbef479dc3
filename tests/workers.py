"""Child-process targets and shared helpers, at module level so spawn/forkserver can pickle them."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import multiprocessing
import os
import random
import sys
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

# Generous bounds for every blocking call, in the parent and inside a child.
TIMEOUT = 60.0
CHILD_TIMEOUT = 60.0

START_METHODS = [
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
]


@dataclasses.dataclass(frozen=True)
class Point:
    """A user-defined, importable class, to check that instances round-trip."""

    x: int
    y: float
    label: str = ""


def kinds(reason: str, strict: bool) -> list[Any]:
    """Parameters "pipeq" and "stdlib" for a test of a deliberate difference:
    the stdlib variant is an xfail that gives the reason."""
    import pytest  # here, not at the top: children import this module

    mark = pytest.mark.xfail(strict=strict, reason=f"deliberate difference: {reason}")
    return ["pipeq", pytest.param("stdlib", marks=mark)]


def call_with_timeout(fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """fn() in a daemon thread: its result or exception, or a failure if it hangs."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", fn()))
        except BaseException as e:  # re-raised in the caller
            outcome.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"call did not return within {timeout} s")
    kind, value = outcome[0]
    if kind == "err":
        raise value
    return value


def pipe_bytes(q: Any) -> int:
    """Bytes waiting in q's pipe."""
    buf = fcntl.ioctl(q._channel.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def wait_until(pred: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll pred (no event can tell these things) until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.002)


# -- payloads: built the same way in parent and child, so either side can check


def make_payload(kind: str, size: int) -> Any:
    """A deterministic object of about `size` bytes (content depends on kind and size)."""
    data = random.Random(f"{kind}:{size}").randbytes(size)
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "ndarray":
        import numpy as np

        return np.frombuffer(data, dtype=np.uint8).view(np.int32).reshape(-1, 256).copy()
    if kind == "ndarray_fortran":
        import numpy as np

        return np.asfortranarray(
            np.frombuffer(data, dtype=np.uint8).view(np.int64).reshape(-1, 128)
        )
    if kind == "ndarray_strided":
        import numpy as np

        # Not contiguous: pickled in band rather than out of band.
        return np.frombuffer(data, dtype=np.uint8).view(np.int16)[::3]
    if kind == "many_bytearrays":
        # More out-of-band buffers than one writev() takes (IOV_MAX is 1024).
        chunk = 16 * 1024
        return [bytearray(data[i : i + chunk]) for i in range(0, size, chunk)]
    raise ValueError(kind)


def payload_digest(obj: Any) -> tuple[str, str]:
    """(type description, sha256) of a payload, comparable across processes."""
    if isinstance(obj, (bytes, bytearray)):
        return type(obj).__name__, hashlib.sha256(obj).hexdigest()
    if isinstance(obj, list):
        h = hashlib.sha256()
        for part in obj:
            assert isinstance(part, bytearray), type(part)
            h.update(part)
        return f"list[bytearray]x{len(obj)}", h.hexdigest()
    import numpy as np

    assert isinstance(obj, np.ndarray), type(obj)
    desc = f"ndarray {obj.dtype} {obj.shape}"
    return desc, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()


def put_payloads(q: Any, specs: list[tuple[str, int]]) -> None:
    """Put each payload described by specs, in order."""
    for kind, size in specs:
        q.put(make_payload(kind, size), timeout=CHILD_TIMEOUT)


def check_payloads(q: Any, specs: list[tuple[str, int]], results: Any) -> None:
    """Get one payload per spec and report the mismatches (an empty list if none)."""
    bad = []
    for kind, size in specs:
        got = q.get(timeout=CHILD_TIMEOUT)
        if payload_digest(got) != payload_digest(make_payload(kind, size)):
            bad.append((kind, size, payload_digest(got)[0]))
    results.put(bad, timeout=CHILD_TIMEOUT)


# -- simple round trips


def echo(q_in: Any, q_out: Any, tag: str) -> None:
    """Get one item, send back (tag, item, pid)."""
    item = q_in.get(timeout=CHILD_TIMEOUT)
    q_out.put((tag, item, os.getpid()), timeout=CHILD_TIMEOUT)


def put_one(q: Any, item: Any) -> None:
    q.put(item, timeout=CHILD_TIMEOUT)


def report_fds(q: Any, results: Any) -> None:
    """Report whether the fds this child received for q are inheritable."""
    ch = q._channel
    fds = [ch.fileno(), ch.writer_fileno()]
    results.put([os.get_inheritable(fd) for fd in fds], timeout=CHILD_TIMEOUT)


def simple_echo(q_in: Any, q_out: Any, n: int) -> None:
    """Answer n ("ping", i) items from a SimpleQueue with ("pong", i)."""
    for _ in range(n):
        _, i = q_in.get()  # SimpleQueue.get has no timeout: the parent bounds the test
        q_out.put(("pong", i))


# -- producers and consumers


def producer(q: Any, producer_id: int, n: int, timeout: float = CHILD_TIMEOUT) -> None:
    for seq in range(n):
        q.put((producer_id, seq), timeout=timeout)


def put_small_nowait(q: Any, n: int, size: int) -> None:
    """Put n distinct bytes objects of `size` bytes with put_nowait."""
    for i in range(n):
        q.put_nowait(i.to_bytes(4, "little") * (size // 4))


def consumer(q: Any, results: Any, consumer_id: int, timeout: float = CHILD_TIMEOUT) -> None:
    """Get (producer_id, seq) items until a None sentinel; report them per producer."""
    seen: dict[int, list[int]] = {}
    while True:
        item = q.get(timeout=timeout)
        if item is None:
            break
        pid, seq = item
        seen.setdefault(pid, []).append(seq)
    results.put((consumer_id, seen), timeout=CHILD_TIMEOUT)


def get_and_task_done(q: Any) -> None:
    """A JoinableQueue worker: get items until a None sentinel, task_done() each."""
    while True:
        item = q.get(timeout=CHILD_TIMEOUT)
        q.task_done()
        if item is None:
            return


# -- ProcessPoolExecutor

_pool_queue: Any = None


def pool_init(q: Any) -> None:
    global _pool_queue
    _pool_queue = q


def pool_task(task_id: int, n: int) -> int:
    assert _pool_queue is not None, "initializer did not run"
    for j in range(n):
        _pool_queue.put((task_id, j), timeout=CHILD_TIMEOUT)
    return os.getpid()


# -- processes that die at a bad moment


def get_loop_then_block(q: Any, acks: Any) -> None:
    """Answer one ping, then block in get() until killed."""
    q.get(timeout=CHILD_TIMEOUT)
    acks.put("pong", timeout=CHILD_TIMEOUT)
    q.get(timeout=CHILD_TIMEOUT)
    sys.exit(3)  # only reached if the parent never killed us


def put_oversized(q: Any, size: int) -> None:
    """Put a frame larger than the pipe with nobody reading: blocks mid-frame."""
    q.put(b"\x01" * size, timeout=CHILD_TIMEOUT)
    sys.exit(3)  # only reached if the parent never killed us


def put_oversized_killed_after_first_write(q: Any, size: int) -> None:
    """Like put_oversized, but SIGKILL this process as soon as the frame's
    first bytes are in the pipe: right after writev() returned, while the
    writing thread waits to take the GIL back."""
    import fcntl
    import signal
    import termios
    import threading

    fd = q._channel.fileno()

    def kill_when_written() -> None:
        buf = b"\0\0\0\0"
        while not int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, buf), sys.byteorder):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_when_written, daemon=True).start()
    q.put(b"\x01" * size, timeout=CHILD_TIMEOUT)
    sys.exit(3)  # only reached if the kill never came


# -- signals, unpicklable objects, lost readers


def get_until_interrupted(q: Any, results: Any) -> None:
    """Block in get() until SIGINT; report how it ended, then use the queue again."""
    results.put("waiting", timeout=CHILD_TIMEOUT)
    try:
        q.get(timeout=CHILD_TIMEOUT)
        results.put("got an item", timeout=CHILD_TIMEOUT)
        return
    except KeyboardInterrupt:
        results.put("interrupted", timeout=CHILD_TIMEOUT)
    q.put("after", timeout=CHILD_TIMEOUT)
    results.put(q.get(timeout=CHILD_TIMEOUT), timeout=CHILD_TIMEOUT)


def big_item(size: int) -> bytes:
    """A large bytes object whose every part differs, so a torn copy shows."""
    return random.Random(size).randbytes(size)


def put_big_until_interrupted(q: Any, results: Any, size: int) -> None:
    """Put big_item(size) until SIGINT cuts it short, then put two small items."""
    item = big_item(size)
    results.put("putting", timeout=CHILD_TIMEOUT)
    try:
        q.put(item, timeout=CHILD_TIMEOUT)
        results.put("completed", timeout=CHILD_TIMEOUT)
    except KeyboardInterrupt:
        results.put("interrupted", timeout=CHILD_TIMEOUT)
    q.put("after-1", timeout=CHILD_TIMEOUT)
    q.put("after-2", timeout=CHILD_TIMEOUT)


def collect_until(q: Any, results: Any, last: Any) -> None:
    """Get items until `last`; report each as a str item or ("bytes", len, sha256)."""
    got: list[Any] = []
    while True:
        item = q.get(timeout=CHILD_TIMEOUT)
        if isinstance(item, bytes):
            got.append(("bytes", len(item), hashlib.sha256(item).hexdigest()))
        else:
            got.append(item)
        if item == last:
            break
    results.put(got, timeout=CHILD_TIMEOUT)


def raise_on_unpickle(message: str) -> Any:
    raise ValueError(message)


class FailsToUnpickle:
    """Pickles fine; unpickling it raises ValueError(message)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return raise_on_unpickle, (self.message,)


class FailsToPickle:
    """Raises RuntimeError when pickled."""

    def __reduce__(self) -> Any:
        raise RuntimeError("this object refuses to be pickled")


def put_one_that_fails_to_unpickle(q: Any) -> None:
    for item in ("a", FailsToUnpickle("broken in transit"), b"b" * 100_000, "c"):
        q.put(item, timeout=CHILD_TIMEOUT)


def put_with_no_reader_left() -> None:
    """Close every read end of a fresh queue behind its back, then put().

    Exits 0 when put() raised BrokenPipeError that says so; 2 if it raised
    something else; 3 if it returned.  Dying of SIGPIPE shows as -13.
    """
    import pipeq

    q: Any = pipeq.Queue()
    os.close(q._channel.fileno())  # no process can read this pipe any more
    code = 3
    try:
        q.put("nobody will read this", timeout=CHILD_TIMEOUT)
    except BrokenPipeError as e:
        code = 0 if "read end" in str(e) else 2
    except BaseException:  # reported through the exit code
        code = 2
    sys.stdout.flush()
    os._exit(code)  # not q.close(): its read fd number is no longer ours


def report_stall_warning(q: Any, results: Any) -> None:
    results.put(q._channel.stall_warning, timeout=CHILD_TIMEOUT)


def put_arrays(q: Any, n: int, size: int) -> None:
    """Put n numpy arrays of size int64 items, the i-th full of i."""
    import numpy as np

    for i in range(n):
        q.put(np.full(size, i, dtype=np.int64), timeout=CHILD_TIMEOUT)
