"""Faults: signals, bad objects, lost readers and stalled writers. Nothing lost, nothing wedged."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import pytest
import workers
from workers import TIMEOUT, call_with_timeout, pipe_bytes, process_state, wait_until

import pipeq

if TYPE_CHECKING:
    from conftest import Children, CtxQueues, QueueFactory

pytestmark = [
    # Python 3.12+ warns when a multi-threaded process forks (pytest's
    # faulthandler watchdog is a thread); forking is what these tests do.
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]

LINUX_PROC = pytest.mark.skipif(
    not os.path.exists("/proc/self/stat"), reason="reads process states from /proc"
)


def _close_all(*queues: Any) -> None:
    for q in queues:
        if hasattr(q, "cancel_join_thread"):
            q.cancel_join_thread()
        q.close()


def _fill(q: pipeq.Queue[Any], item: Any = b"f" * 100) -> int:
    """put_nowait until the pipe is full; how many went in."""
    n = 0
    while True:
        try:
            q.put_nowait(item)
        except pipeq.Full:
            return n
        n += 1


def _blocked_writing(q: pipeq.Queue[Any], pid: int) -> bool:
    """Whether the pipe is full (give or take pages a stopped reader left
    part-read) and process pid sleeps: nothing moves for 50 ms."""
    before = pipe_bytes(q)
    if before < q.pipe_capacity // 2 or process_state(pid) != "S":
        return False
    time.sleep(0.05)
    return pipe_bytes(q) == before and process_state(pid) == "S"


# -- SIGINT


@LINUX_PROC
def test_sigint_interrupts_a_blocking_get(
    queues: CtxQueues, ctx: BaseContext, children: Children
) -> None:
    q, results = queues(), queues()
    p = children.start(ctx, workers.get_until_interrupted, q, results)
    assert results.get(timeout=TIMEOUT) == "waiting"
    wait_until(lambda: process_state(p.pid) == "S", "the child sleeps in get()")
    sent = time.monotonic()
    os.kill(p.pid, signal.SIGINT)
    assert results.get(timeout=TIMEOUT) == "interrupted"
    assert time.monotonic() - sent < 5.0, "KeyboardInterrupt was not prompt"
    # The interrupted process goes on using the queue.
    assert results.get(timeout=TIMEOUT) == "after"
    children.join_ok(p)


@pytest.mark.pipe_only
@LINUX_PROC
@pytest.mark.parametrize("reader", ["reads-after", "stopped-mid-transfer"])
def test_sigint_in_a_put_larger_than_the_pipe(
    ctx: BaseContext, children: Children, reader: str
) -> None:
    # pipeq only: the stdlib's put() never blocks on the pipe (its feeder
    # thread does).  A frame larger than the pipe is streamed; SIGINT cuts
    # it short.  Readers must get none of it, and the next messages whole.
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=None)
    results: pipeq.Queue[Any] = pipeq.Queue()
    out: pipeq.Queue[Any] = pipeq.Queue()
    # Large enough that the transfer lasts long past the moment this process
    # sees it begin and stops the reader (about 0.1 s for 128 MiB).
    size = (128 if reader == "stopped-mid-transfer" else 4) * q.pipe_capacity
    try:
        consumer = None
        if reader == "stopped-mid-transfer":
            consumer = children.start(ctx, workers.collect_until, q, out, "after-2")
        producer = children.start(ctx, workers.put_big_until_interrupted, q, results, size)
        assert results.get(timeout=TIMEOUT) == "putting"
        wait_until(lambda: pipe_bytes(q) > 0, "the frame's first bytes are in the pipe")
        if consumer is not None:
            # Stop the reader wherever it is in the frame, so the pipe fills.
            os.kill(consumer.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: _blocked_writing(q, producer.pid),
                "the producer waits for room in the middle of its frame",
            )
        except AssertionError as e:
            states = [process_state(p.pid) for p in (producer, consumer) if p is not None]
            raise AssertionError(f"{e}: pipe holds {pipe_bytes(q)}; states {states}") from None
        os.kill(producer.pid, signal.SIGINT)
        assert results.get(timeout=TIMEOUT) == "interrupted"
        if consumer is not None:
            os.kill(consumer.pid, signal.SIGCONT)
        else:
            consumer = children.start(ctx, workers.collect_until, q, out, "after-2")
        assert out.get(timeout=TIMEOUT) == ["after-1", "after-2"]
        children.join_ok(producer)
        children.join_ok(consumer)
        assert q.empty()
        q.put("later")
        assert q.get(timeout=TIMEOUT) == "later"
    finally:
        _close_all(q, results, out)


def test_sigint_handler_runs_during_a_blocking_put() -> None:
    # pipeq only (the stdlib's put() does not block on the pipe).  A handler
    # that raises cuts a put() waiting for room short; nothing was written.
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=None)
    try:
        n = _fill(q)
        before = pipe_bytes(q)
        main = threading.get_ident()
        timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                q.put("no room", timeout=TIMEOUT)
        finally:
            timer.join(TIMEOUT)
        assert pipe_bytes(q) == before
        assert q.qsize() == n
        for _ in range(n):
            assert q.get(timeout=TIMEOUT) == b"f" * 100
        q.put("room now")
        assert q.get(timeout=TIMEOUT) == "room now"
    finally:
        q.close()


# -- objects that fail to pickle or to unpickle


def test_unpickling_error_raises_from_get(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put("before")
    q.put(workers.FailsToUnpickle("cannot rebuild this"))
    q.put("after")
    assert q.get(timeout=TIMEOUT) == "before"
    with pytest.raises(ValueError, match="cannot rebuild this"):
        q.get(timeout=TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "after"


def test_unpickling_error_across_processes(
    queues: CtxQueues, ctx: BaseContext, children: Children
) -> None:
    q = queues()
    # The child makes the items: one that cannot be unpickled cannot be a
    # spawned child's argument either.
    p = children.start(ctx, workers.put_one_that_fails_to_unpickle, q)
    assert q.get(timeout=TIMEOUT) == "a"
    with pytest.raises(ValueError, match="broken in transit"):
        q.get(timeout=TIMEOUT)
    assert q.get(timeout=TIMEOUT) == b"b" * 100_000
    assert q.get(timeout=TIMEOUT) == "c"
    children.join_ok(p)


def _late_failures(capacity: int) -> dict[str, Any]:
    import numpy as np

    big = 3 * capacity  # more than the pipe holds: it would have been streamed
    return {
        "bytes-then-lambda": [b"x" * big, lambda: None],
        "bytearray-then-lock": [bytearray(big), threading.Lock()],
        "ndarray-then-refusal": [np.ones(big // 8), workers.FailsToPickle()],
        "many-buffers-then-refusal": [bytearray(64 * 1024) for _ in range(40)]
        + [workers.FailsToPickle()],
    }


@pytest.mark.parametrize(
    "case",
    [
        "bytes-then-lambda",
        "bytearray-then-lock",
        "ndarray-then-refusal",
        "many-buffers-then-refusal",
    ],
)
def test_pickling_failure_midway_writes_nothing(case: str) -> None:
    # deliberate difference: the stdlib's put() returns and its feeder thread
    # drops the item.  pipeq pickles the whole object before any byte moves.
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        q.put("first")
        before = pipe_bytes(q)
        obj = _late_failures(q.pipe_capacity)[case]
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError, RuntimeError)):
            q.put(obj, timeout=TIMEOUT)
        assert pipe_bytes(q) == before
        assert q.qsize() == 1
        q.put("after")
        assert q.get(timeout=TIMEOUT) == "first"
        assert q.get(timeout=TIMEOUT) == "after"
        assert q.empty()
    finally:
        q.close()


# -- no reader left


def test_no_reader_left_raises_broken_pipe(ctx: BaseContext, children: Children) -> None:
    # Every process that holds a pipeq queue holds both ends of its pipe, so
    # this takes closing the read end behind the queue's back.  put() must
    # raise BrokenPipeError saying so, not kill the process with SIGPIPE.
    p = children.start(ctx, workers.put_with_no_reader_left)
    p.join(TIMEOUT)
    assert p.exitcode == 0, {
        -signal.SIGPIPE: "killed by SIGPIPE",
        2: "put() raised something other than BrokenPipeError",
        3: "put() returned",
    }.get(p.exitcode, p.exitcode)


# -- the stalled put() warning


@pytest.mark.pipe_only
@pytest.mark.parametrize("kind", ["small", "over-pipe-buf", "larger-than-the-pipe"])
def test_stalled_put_warns_once_and_names_the_capacity(kind: str) -> None:
    # pipeq only: the stdlib's put() never waits for the pipe.
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=0.2)
    try:
        if kind == "larger-than-the-pipe":
            item: Any = b"L" * (2 * q.pipe_capacity)  # stalls in mid-frame
        else:
            _fill(q)
            item = b"s" * (100 if kind == "small" else 64 * 1024)
        with pytest.warns(pipeq.PipeFullWarning) as caught, pytest.raises(pipeq.Full):
            q.put(item, timeout=1.0)
        assert len(caught) == 1
        w = caught[0]
        assert f"full ({q.pipe_capacity} bytes)" in str(w.message)
        assert "no consumer has made room" in str(w.message)
        assert w.filename == __file__, "the warning points at the caller's put()"
    finally:
        q.close()


def test_stalled_put_completes_once_a_consumer_reads() -> None:
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=0.2)
    try:
        n = _fill(q)
        got: list[Any] = []

        def consume_later() -> None:
            time.sleep(0.6)  # past the stall time: the warning comes first
            for _ in range(n + 1):
                got.append(q.get(timeout=TIMEOUT))

        t = threading.Thread(target=consume_later, daemon=True)
        t.start()
        with pytest.warns(pipeq.PipeFullWarning) as caught:
            q.put("last", timeout=TIMEOUT)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert len(caught) == 1
        assert len(got) == n + 1 and got[-1] == "last"
    finally:
        q.close()


def test_stall_warning_off_and_bad_values() -> None:
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=None)
    try:
        _fill(q)
        with warnings.catch_warnings():
            warnings.simplefilter("error", pipeq.PipeFullWarning)
            with pytest.raises(pipeq.Full):
                q.put("x", timeout=0.5)
    finally:
        q.close()
    assert pipeq.Queue().pipe_capacity > 0
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="stall_warning"):
            pipeq.Queue(stall_warning=bad)


def test_stall_warning_default_and_children(ctx: BaseContext, children: Children) -> None:
    default: pipeq.Queue[Any] = pipeq.Queue()
    q: pipeq.Queue[Any] = pipeq.Queue(stall_warning=2.5)
    results: pipeq.Queue[Any] = pipeq.Queue()
    try:
        assert default._channel.stall_warning == 10.0
        p = children.start(ctx, workers.report_stall_warning, q, results)
        assert results.get(timeout=TIMEOUT) == 2.5
        children.join_ok(p)
    finally:
        _close_all(default, q, results)


# -- a corrupt stream (see also test_core.py's garbage tests)


def test_corrupt_stream_error_is_clear_and_bounded() -> None:
    from pipeq import _shm

    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        # A length no frame can have: no huge allocation, a clear error.
        hdr = _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, _shm.FLAG_RAW, 0, 2**62)
        os.write(q._channel.writer_fileno(), hdr)
        with pytest.raises(pipeq.StreamError, match="pipeq") as info:
            call_with_timeout(lambda: q.get(timeout=TIMEOUT))
        assert isinstance(info.value, ValueError)
        # The bad header went with the error; the queue goes on.
        q.put({"still": "works"})
        assert q.get(timeout=TIMEOUT) == {"still": "works"}
    finally:
        q.close()


# -- fds and subprocess


def _fd_files() -> dict[int, str]:
    """This process's open fds and what /proc/self/fd says each one is."""
    files = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            files[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd that listed the folder, gone by now
            pass
    return files


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
@pytest.mark.parametrize("kind", ["Queue", "bounded", "JoinableQueue"])
def test_subprocess_child_has_none_of_the_queues_fds(kind: str) -> None:
    # The child lists its own /proc/self/fd: none of its fds may be one of
    # the queue's files (its pipes and its shared page), whatever the numbers.
    before = _fd_files()
    q: Any = {
        "Queue": lambda: pipeq.Queue(),
        "bounded": lambda: pipeq.Queue(3),
        "JoinableQueue": lambda: pipeq.JoinableQueue(),
    }[kind]()
    try:
        q.put("in the pipe")
        ours = {f for fd, f in _fd_files().items() if before.get(fd) != f}
        assert len(ours) >= 2, ours
        code = (
            "import os\n"
            "for fd in os.listdir('/proc/self/fd'):\n"
            "    try:\n"
            "        print(os.readlink('/proc/self/fd/' + fd))\n"
            "    except OSError:\n"
            "        pass\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            close_fds=False,  # only close-on-exec keeps them out
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        )
        inherited = ours & set(out.stdout.splitlines())
        assert not inherited, f"the subprocess inherited {inherited}"
        assert q.get(timeout=TIMEOUT) == "in the pipe"
    finally:
        q.close()
