"""put_many() and get_many(): pipeq's batch calls.

multiprocessing has no batch calls, so these tests run against pipeq only;
the names and arguments are faster-fifo's (``max_messages_to_get`` is
accepted too), and each call behaves as the same sequence of put() or get()
calls would, only faster.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import pytest
import workers
from workers import CHILD_TIMEOUT, TIMEOUT, FailsToPickle, FailsToUnpickle, make_payload, pipe_bytes

import pipeq
from pipeq import _core

if TYPE_CHECKING:
    from conftest import Children

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]

SHORT = 0.2


@pytest.fixture
def q() -> Iterator[pipeq.Queue[Any]]:
    queue_: pipeq.Queue[Any] = pipeq.Queue()
    yield queue_
    queue_.close()


def take(q: Any, n: int, batch: int | None = None) -> list[Any]:
    """n items by get_many() calls of at most `batch`."""
    got: list[Any] = []
    while len(got) < n:
        got += q.get_many(batch, timeout=TIMEOUT)
    assert len(got) == n
    return got


# -- the items, their order and their kinds


MIXED: list[Any] = [
    0,
    "text",
    b"raw bytes",
    b"",
    None,
    {"a": [1, 2, 3]},
    make_payload("bytes", 5000),  # larger than PIPE_BUF: a frame of its own
    make_payload("bytes", 100),
    make_payload("bytearray", 200_000),  # out of band
    (1, 2.5),
    workers.Point(1, 2.0, "p"),
]


def test_round_trip_in_order(q: pipeq.Queue[Any]) -> None:
    items = list(range(1000)) + MIXED + [str(i) for i in range(1000)]
    q.put_many(items)
    assert q.qsize() == len(items)
    assert take(q, len(items)) == items
    assert q.qsize() == 0 and pipe_bytes(q) == 0


@pytest.mark.parametrize("kind", ["ndarray", "ndarray_fortran", "ndarray_strided"])
def test_arrays(q: pipeq.Queue[Any], kind: str) -> None:
    np = pytest.importorskip("numpy")
    arrays = [make_payload(kind, size) for size in (1024, 64 * 1024, 256 * 1024)]
    q.put_many([*arrays, "end"])
    got = take(q, len(arrays) + 1)
    assert got[-1] == "end"
    for a, b in zip(arrays, got, strict=False):
        np.testing.assert_array_equal(a, b)


def test_any_iterable(q: pipeq.Queue[Any]) -> None:
    q.put_many(i * i for i in range(10))
    q.put_many(range(3))
    q.put_many(())
    assert take(q, 13) == [i * i for i in range(10)] + [0, 1, 2]


def test_put_many_of_nothing_puts_nothing(q: pipeq.Queue[Any]) -> None:
    q.put_many([])
    q.put_many_nowait([])
    assert q.qsize() == 0 and q.empty()


def test_max_messages(q: pipeq.Queue[Any]) -> None:
    q.put_many(range(10))
    assert q.get_many(3, timeout=TIMEOUT) == [0, 1, 2]
    assert q.get_many(max_messages=1, timeout=TIMEOUT) == [3]
    assert q.get_many(max_messages_to_get=2, timeout=TIMEOUT) == [4, 5]  # faster-fifo's name
    assert q.get_many_nowait(100) == [6, 7, 8, 9]


def test_get_many_takes_what_is_there_and_does_not_wait_for_more(
    q: pipeq.Queue[Any],
) -> None:
    q.put("only")
    t0 = time.monotonic()
    assert q.get_many(100, timeout=TIMEOUT) == ["only"]
    assert time.monotonic() - t0 < TIMEOUT / 2


def test_get_many_waits_for_the_first(q: pipeq.Queue[Any]) -> None:
    timer = threading.Timer(SHORT, q.put_many, args=(["late", "later"],))
    timer.start()
    try:
        got = q.get_many(timeout=TIMEOUT)
        got += [] if len(got) == 2 else q.get_many(timeout=TIMEOUT)
        assert got == ["late", "later"]
    finally:
        timer.join(TIMEOUT)


def test_get_many_empty(q: pipeq.Queue[Any]) -> None:
    with pytest.raises(queue.Empty):
        q.get_many_nowait()
    with pytest.raises(queue.Empty):
        q.get_many(block=False)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get_many(timeout=SHORT)
    assert time.monotonic() - t0 >= SHORT * 0.9


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((0,), {}, ValueError),
        ((-1,), {}, ValueError),
        ((True,), {}, TypeError),  # get_many(block) by mistake: faster-fifo's order
        (("3",), {}, TypeError),
        ((2.5,), {}, TypeError),
        ((2,), {"max_messages_to_get": 2}, TypeError),
    ],
)
def test_bad_max_messages(q: pipeq.Queue[Any], args: Any, kwargs: Any, error: type) -> None:
    q.put("kept")
    with pytest.raises(error):
        q.get_many(*args, **kwargs)
    assert q.get(timeout=TIMEOUT) == "kept"  # the queue goes on, nothing taken


def test_plain_get_reads_what_put_many_sent(q: pipeq.Queue[Any]) -> None:
    """get() takes one message of a batch at a time, as from put()s."""
    q.put_many(range(500))
    assert [q.get(timeout=TIMEOUT) for _ in range(5)] == list(range(5))
    assert take(q, 495) == list(range(5, 500))


def test_get_many_reads_what_put_sent(q: pipeq.Queue[Any]) -> None:
    for i in range(50):
        q.put(i)
    assert take(q, 50, 7) == list(range(50))


def test_interleaved_with_single_calls(q: pipeq.Queue[Any]) -> None:
    expect: list[Any] = []
    for i in range(20):
        q.put(("one", i))
        q.put_many([("many", i, k) for k in range(i)])
        expect += [("one", i)] + [("many", i, k) for k in range(i)]
    got: list[Any] = []
    while len(got) < len(expect):
        got += q.get_many(3, timeout=TIMEOUT) if len(got) % 2 else [q.get(timeout=TIMEOUT)]
    assert got == expect


# -- bad input: a clear error where it was caused, and nothing half done


def test_put_many_pickles_all_before_putting_any(q: pipeq.Queue[Any]) -> None:
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        q.put_many(["a", "b", FailsToPickle(), "c"])
    assert q.qsize() == 0 and pipe_bytes(q) == 0
    with pytest.raises(Exception) as single:  # what put() raises (it varies by version)
        q.put(lambda: 2)
    with pytest.raises(type(single.value)):
        q.put_many([1, lambda: 2])
    assert q.qsize() == 0
    q.put_many(["after"])
    assert q.get(timeout=TIMEOUT) == "after"


def test_put_many_of_a_non_iterable(q: pipeq.Queue[Any]) -> None:
    with pytest.raises(TypeError):
        q.put_many(42)  # type: ignore[arg-type]
    assert q.qsize() == 0


def test_get_many_unpickling_error_keeps_the_others(q: pipeq.Queue[Any]) -> None:
    """The error is raised, as get() raises it; the messages read with the
    bad one are not lost: they come with the exception."""
    q.put_many(["a", FailsToUnpickle("broken in transit"), "b", "c"])
    with pytest.raises(ValueError, match="broken in transit") as info:
        q.get_many(timeout=TIMEOUT)
    got = info.value.messages  # type: ignore[attr-defined]
    got += [] if len(got) == 3 else take(q, 3 - len(got))
    assert got == ["a", "b", "c"]
    q.put_many(["after"])
    assert q.get_many(timeout=TIMEOUT) == ["after"]


def test_closed(q: pipeq.Queue[Any]) -> None:
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.put_many([1])
    with pytest.raises(ValueError, match="closed"):
        q.get_many()


# -- bounded queues


def test_bounded_put_many_fills_and_waits() -> None:
    q: pipeq.Queue[int] = pipeq.Queue(5)
    try:
        items = list(range(23))
        t = threading.Thread(target=q.put_many, args=(items,), kwargs={"timeout": TIMEOUT})
        t.start()
        got: list[int] = []
        while len(got) < len(items):
            assert q.qsize() <= 5
            got += q.get_many(2, timeout=TIMEOUT)
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert got == items
    finally:
        q.close()


@pytest.mark.parametrize("nowait", [False, True])
def test_bounded_put_many_says_how_many_went_in(nowait: bool) -> None:
    q: pipeq.Queue[int] = pipeq.Queue(4)
    try:
        q.put(-1)
        with pytest.raises(queue.Full) as info:
            if nowait:
                q.put_many_nowait(range(10))
            else:
                q.put_many(range(10), timeout=SHORT)
        exc = info.value
        assert isinstance(exc, pipeq.BatchFull)
        assert (exc.done, exc.total) == (3, 10)
        assert "3 of 10" in str(exc)
        assert take(q, 4) == [-1, 0, 1, 2]
        with pytest.raises(pipeq.BatchFull) as info2:
            q.put_many_nowait(range(100, 110))
        assert info2.value.done == 4
    finally:
        q.close()


def test_joinable_counts_every_item() -> None:
    q: pipeq.JoinableQueue[int] = pipeq.JoinableQueue()
    try:
        q.put_many(range(50))
        got = take(q, 50)
        for _ in got[:-1]:
            q.task_done()
        joined = threading.Event()

        def join() -> None:
            q.join()
            joined.set()

        t = threading.Thread(target=join, daemon=True)
        t.start()
        assert not joined.wait(SHORT)
        q.task_done()
        assert joined.wait(TIMEOUT)
        with pytest.raises(ValueError):
            q.task_done()
    finally:
        q.close()


# -- across processes


def put_many_batches(q: Any, producer_id: int, n: int, batch: int) -> None:
    for i in range(0, n, batch):
        q.put_many([(producer_id, k) for k in range(i, min(i + batch, n))], timeout=CHILD_TIMEOUT)


def get_many_until_stop(q: Any, results: Any) -> None:
    got: list[Any] = []
    while True:
        batch = q.get_many(37, timeout=CHILD_TIMEOUT)
        stop = "stop" in batch
        got += [x for x in batch if x != "stop"]
        if stop:
            # A stop meant for another consumer goes back.
            for _ in range(batch.count("stop") - 1):
                q.put("stop", timeout=CHILD_TIMEOUT)
            break
    results.put(got, timeout=CHILD_TIMEOUT)


@pytest.mark.parametrize("batch", [1, 2, 100])
def test_many_producers_many_consumers(ctx: BaseContext, children: Children, batch: int) -> None:
    """Every item arrives exactly once, each producer's in the order it put them."""
    n_prod, n_cons, n = 3, 3, 2000
    q: pipeq.Queue[Any] = pipeq.Queue(maxsize=500)
    results: pipeq.Queue[Any] = pipeq.Queue()
    try:
        prods = [children.start(ctx, put_many_batches, q, p, n, batch) for p in range(n_prod)]
        cons = [children.start(ctx, get_many_until_stop, q, results) for _ in range(n_cons)]
        for p in prods:
            children.join_ok(p)
        q.put_many(["stop"] * n_cons, timeout=TIMEOUT)
        got = [results.get(timeout=TIMEOUT) for _ in cons]
        for c in cons:
            children.join_ok(c)
        everything = [x for part in got for x in part]
        assert sorted(everything) == [(p, k) for p in range(n_prod) for k in range(n)]
        for part in got:
            for p in range(n_prod):
                mine = [k for pid, k in part if pid == p]
                assert mine == sorted(mine)
        assert q.qsize() == 0
    finally:
        q.close()
        results.close()


# -- interrupted with messages in hand


def put_small_then_big(q: Any, size: int) -> None:
    q.put_many(["first", "second"], timeout=CHILD_TIMEOUT)
    q.put(b"b" * size, timeout=CHILD_TIMEOUT)  # larger than the pipe: streamed
    q.put("after", timeout=CHILD_TIMEOUT)


@pytest.mark.pipe_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_get_many_interrupted_hands_over_what_it_read(
    q: pipeq.Queue[Any], children: Children
) -> None:
    """A signal handler that raises while get_many() waits inside a message
    (its producer stopped mid-write) raises from get_many(), with the
    messages it had already read as .messages; the one it was inside is
    dropped, and the queue goes on."""
    size = 3 * q.pipe_capacity
    producer = children.start(multiprocessing.get_context("fork"), put_small_then_big, q, size)
    try:
        workers.wait_until(
            lambda: pipe_bytes(q) >= q.pipe_capacity - 4096, "the producer filled the pipe"
        )
        os.kill(producer.pid, signal.SIGSTOP)
        main = threading.get_ident()
        timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt) as info:
                q.get_many(10, timeout=TIMEOUT)
        finally:
            timer.join(TIMEOUT)
        assert info.value.messages == ["first", "second"]  # type: ignore[attr-defined]
    finally:
        os.kill(producer.pid, signal.SIGCONT)
    assert q.get(timeout=TIMEOUT) == "after"
    children.join_ok(producer)
    assert q.qsize() == 0 and pipe_bytes(q) == 0


class ArmsTimerOnUnpickle:
    """Unpickles by arming a 1 us SIGALRM timer, from C (the result is the
    timer's old setting): the signal arrives while get() or get_many() is
    still at work, unpickling what follows (a long list)."""

    def __reduce__(self) -> tuple[Any, tuple[int, float]]:
        return signal.setitimer, (signal.ITIMER_REAL, 1e-6)


class Interrupt(Exception):
    pass


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise Interrupt


@pytest.mark.parametrize("call", ["get", "get_many"])
def test_signal_due_during_the_call_keeps_its_messages(q: pipeq.Queue[Any], call: str) -> None:
    """A signal handler that raises for a signal that arrived while get() or
    get_many() was at work raises before the call returns, with what it had
    read as .messages, rather than just after, where it would be lost.  (The
    pure core's get() cannot: Python runs the handler as the call returns.)"""
    if call == "get" and not _core.USING_EXTENSION:
        pytest.skip("the pure core's get() runs handlers after its last bytecode")
    long = list(range(200_000))
    old = signal.signal(signal.SIGALRM, _raise_interrupt)
    try:
        if call == "get_many":
            q.put_many(["a", ArmsTimerOnUnpickle(), "b", long])
        else:
            q.put((ArmsTimerOnUnpickle(), long))
        with pytest.raises(Interrupt) as info:
            q.get_many(timeout=TIMEOUT) if call == "get_many" else q.get(timeout=TIMEOUT)
        got = info.value.messages  # type: ignore[attr-defined]
        if call == "get_many":
            # The timer's item is there too where the signal came due in C.
            assert [m for m in got if not isinstance(m, tuple)] == ["a", "b", long]
        else:
            assert len(got) == 1 and got[0][1] == long
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert q.qsize() == 0


_signalled: list[bool] = []


def _rebuild_after_a_signal(value: int) -> tuple[str, int]:
    """Rebuilds a message; the first time (in this process), raises SIGALRM
    first, so that its handler runs here, inside the message's unpickling."""
    if not _signalled:
        _signalled.append(True)
        signal.raise_signal(signal.SIGALRM)
    return ("rebuilt", value)


class InterruptsItsUnpickling:
    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _rebuild_after_a_signal, (self.value,)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "kind",
    workers.kinds(
        "the stdlib's get() loses a message whose unpickling a signal handler interrupts",
        strict=True,
    ),
)
def test_handler_raising_inside_unpickling_keeps_the_message(kind: str) -> None:
    """A KeyboardInterrupt from a handler that runs inside a message's own
    unpickling code (its reduce function, in Python) is not the message's
    fault: get() unpickles it once more and raises with it as .messages."""
    q: Any = pipeq.Queue() if kind == "pipeq" else multiprocessing.get_context().Queue()
    _signalled.clear()
    old = signal.signal(signal.SIGALRM, _raise_keyboard_interrupt)
    try:
        q.put(InterruptsItsUnpickling(1))
        q.put("after")
        with pytest.raises(KeyboardInterrupt) as info:
            q.get(timeout=TIMEOUT)
        assert _signalled
        assert info.value.messages == [("rebuilt", 1)]  # type: ignore[attr-defined]
        assert q.get(timeout=TIMEOUT) == "after"
    finally:
        signal.signal(signal.SIGALRM, old)
        q.close()
        if kind == "stdlib":
            q.join_thread()


def test_get_many_handler_raising_inside_unpickling_keeps_the_batch(
    q: pipeq.Queue[Any],
) -> None:
    """The same inside a get_many() batch: the interrupted message is
    unpickled once more, and the KeyboardInterrupt, not a lesser error of
    another message, is what the batch raises, with every message it could
    unpickle (all but the broken one)."""
    _signalled.clear()
    old = signal.signal(signal.SIGALRM, _raise_keyboard_interrupt)
    try:
        q.put_many(["a", FailsToUnpickle("broken"), InterruptsItsUnpickling(2), "b"])
        with pytest.raises(KeyboardInterrupt) as info:
            q.get_many(timeout=TIMEOUT)
        assert info.value.messages == ["a", ("rebuilt", 2), "b"]  # type: ignore[attr-defined]
    finally:
        signal.signal(signal.SIGALRM, old)
    q.put_many(["after"])
    assert q.get_many(timeout=TIMEOUT) == ["after"]
