"""The multiprocessing.Queue API, checked in one process against pipeq and the stdlib alike."""

from __future__ import annotations

import datetime
import decimal
import pickle
import sys
import threading
import time
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import workers
from workers import TIMEOUT

import pipeq

if TYPE_CHECKING:
    from conftest import QueueFactory

SHORT = 0.2  # a timeout that is meant to expire


def eventually(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll pred until true or timeout; only for the stdlib's asynchronous feeder."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def skip_qsize_if_unsupported(make_queue: QueueFactory) -> None:
    if make_queue.kind == "stdlib" and sys.platform == "darwin":
        pytest.skip("multiprocessing.Queue.qsize() raises NotImplementedError on macOS")


# -- order and content


def test_fifo_order(make_queue: QueueFactory) -> None:
    q = make_queue()
    for i in range(1000):
        q.put(i)
    assert [q.get(timeout=TIMEOUT) for _ in range(1000)] == list(range(1000))


def test_fifo_order_interleaved(make_queue: QueueFactory) -> None:
    q = make_queue()
    out = []
    for i in range(200):
        q.put(2 * i)
        q.put(2 * i + 1)
        out.append(q.get(timeout=TIMEOUT))
    out += [q.get(timeout=TIMEOUT) for _ in range(200)]
    assert out == list(range(400))


def _recursive_list() -> list[Any]:
    lst: list[Any] = [1]
    lst.append(lst)
    return lst


VALUES = [
    None,
    True,
    0,
    -(2**200),
    1.5,
    float("inf"),
    complex(1, -2),
    "",
    "héllo ✓ 𝄞",
    "x" * 50_000,
    b"",
    b"\x00\xff" * 10,
    b"y" * 50_000,
    bytearray(b"abc"),
    bytearray(50_000),
    (),
    (1, "a", None),
    [1, [2, [3, []]]],
    {"a": 1, 2: [b"b"], (3, 4): {"c": None}},
    {1, 2, 3},
    frozenset({"x"}),
    range(3, 30, 3),
    decimal.Decimal("3.14159"),
    datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc),
    workers.Point(1, 2.5, "p"),
    [workers.Point(i, i / 2) for i in range(100)],
    ValueError("boom", 42),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_types(make_queue: QueueFactory, value: Any) -> None:
    q = make_queue()
    q.put(value)
    got = q.get(timeout=TIMEOUT)
    assert type(got) is type(value)
    if isinstance(value, BaseException):
        assert got.args == value.args
    else:
        assert got == value


def test_round_trip_recursive(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put(_recursive_list())
    got = q.get(timeout=TIMEOUT)
    assert got[0] == 1 and got[1] is got


def test_shared_references_preserved(make_queue: QueueFactory) -> None:
    q = make_queue()
    shared = [1, 2]
    q.put({"a": shared, "b": shared})
    got = q.get(timeout=TIMEOUT)
    assert got["a"] is got["b"]


def test_put_pickles_immediately() -> None:
    # deliberate difference: pipeq pickles inside put(), so mutating the object
    # afterwards cannot change what is received; the stdlib pickles later, in
    # its feeder thread, and may send the mutated object.
    q: pipeq.Queue[list[Any]] = pipeq.Queue()
    try:
        for i in range(50):
            obj: list[Any] = [bytearray(b"abc"), {"n": i}]
            q.put(obj)
            obj[0][0] = ord("z")
            obj[1]["n"] = -1
            assert q.get(timeout=TIMEOUT) == [bytearray(b"abc"), {"n": i}]
    finally:
        q.close()


def test_numpy_round_trip_writable(make_queue: QueueFactory) -> None:
    np = pytest.importorskip("numpy")
    q = make_queue()
    arrays = [
        np.arange(10, dtype=np.float64),
        np.arange(64 * 1024, dtype=np.int32).reshape(256, 256),  # out of band
        np.asfortranarray(np.arange(40_000, dtype=np.int64).reshape(200, 200)),
        np.arange(100_000, dtype=np.int16)[::7],  # not contiguous
    ]
    for a in arrays:
        q.put(a)
        got = q.get(timeout=TIMEOUT)
        assert got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a)
        assert got.flags.writeable  # as with the stdlib, the receiver owns it
        got[(0,) * got.ndim] = 7


def test_many_out_of_band_buffers(make_queue: QueueFactory) -> None:
    # More buffers than one writev()/readv() takes; larger than the pipe, so
    # a reader must run concurrently.
    q = make_queue()
    payload = workers.make_payload("many_bytearrays", 1100 * 16 * 1024)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            q.put(payload, timeout=TIMEOUT)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = q.get(timeout=TIMEOUT)
    t.join(TIMEOUT)
    assert not t.is_alive() and not errors
    assert workers.payload_digest(got) == workers.payload_digest(payload)


# -- Empty and timeouts


@pytest.mark.parametrize("call", ["get_nowait", "block_false", "timeout_zero"])
def test_get_from_empty_raises_empty(make_queue: QueueFactory, call: str) -> None:
    q = make_queue()
    t0 = time.monotonic()
    with pytest.raises(pipeq.Empty):
        if call == "get_nowait":
            q.get_nowait()
        elif call == "block_false":
            q.get(block=False)
        else:
            q.get(timeout=0)
    assert time.monotonic() - t0 < 5


def test_block_false_ignores_timeout(make_queue: QueueFactory) -> None:
    q = make_queue()
    t0 = time.monotonic()
    with pytest.raises(pipeq.Empty):
        q.get(False, 30)
    assert time.monotonic() - t0 < 5


def test_get_timeout_honoured(make_queue: QueueFactory) -> None:
    q = make_queue()
    t0 = time.monotonic()
    with pytest.raises(pipeq.Empty):
        q.get(timeout=SHORT)
    elapsed = time.monotonic() - t0
    assert SHORT * 0.75 <= elapsed < SHORT + 5


@pytest.mark.parametrize("timeout", [-1, -0.001])
def test_negative_timeout_is_zero(make_queue: QueueFactory, timeout: float) -> None:
    # The stdlib's multiprocessing.Queue treats a negative timeout as 0 (unlike
    # queue.Queue, which raises ValueError).
    q = make_queue(1)
    t0 = time.monotonic()
    with pytest.raises(pipeq.Empty):
        q.get(timeout=timeout)
    q.put("x")
    with pytest.raises(pipeq.Full):
        q.put("y", timeout=timeout)
    assert time.monotonic() - t0 < 5
    assert q.get(timeout=TIMEOUT) == "x"


def test_get_wakes_when_another_thread_puts(make_queue: QueueFactory) -> None:
    q = make_queue()
    started = threading.Event()
    result: list[Any] = []

    def consume() -> None:
        started.set()
        result.append(q.get(timeout=TIMEOUT))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert started.wait(TIMEOUT)
    q.put("wake")
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert result == ["wake"]


# -- Full and maxsize


@pytest.mark.parametrize("call", ["put_nowait", "block_false", "timeout_zero"])
def test_put_into_full_raises_full(make_queue: QueueFactory, call: str) -> None:
    q = make_queue(2)
    q.put(1)
    q.put(2)
    t0 = time.monotonic()
    with pytest.raises(pipeq.Full):
        if call == "put_nowait":
            q.put_nowait(3)
        elif call == "block_false":
            q.put(3, block=False)
        else:
            q.put(3, timeout=0)
    assert time.monotonic() - t0 < 5
    assert [q.get(timeout=TIMEOUT) for _ in range(2)] == [1, 2]


def test_put_timeout_honoured(make_queue: QueueFactory) -> None:
    q = make_queue(1)
    q.put(1)
    t0 = time.monotonic()
    with pytest.raises(pipeq.Full):
        q.put(2, timeout=SHORT)
    elapsed = time.monotonic() - t0
    assert SHORT * 0.75 <= elapsed < SHORT + 5
    assert q.get(timeout=TIMEOUT) == 1
    with pytest.raises(pipeq.Empty):
        q.get(timeout=SHORT)  # the item that timed out was not put


@pytest.mark.parametrize("maxsize", [1, 3, 50])
def test_maxsize_counts_items(make_queue: QueueFactory, maxsize: int) -> None:
    q = make_queue(maxsize)
    for i in range(maxsize):
        q.put_nowait(b"%d" % i * (i + 1))  # sizes differ: items, not bytes, count
    with pytest.raises(pipeq.Full):
        q.put_nowait(b"extra")
    assert q.get(timeout=TIMEOUT) == b"0"
    q.put_nowait(b"extra")  # one slot freed
    with pytest.raises(pipeq.Full):
        q.put_nowait(b"more")
    got = [q.get(timeout=TIMEOUT) for _ in range(maxsize)]
    assert got == [b"%d" % i * (i + 1) for i in range(1, maxsize)] + [b"extra"]


@pytest.mark.parametrize("maxsize", [0, -1, -5])
def test_nonpositive_maxsize_is_unbounded(make_queue: QueueFactory, maxsize: int) -> None:
    q = make_queue(maxsize)
    for i in range(1000):
        q.put_nowait(i)
    assert not q.full()
    assert [q.get(timeout=TIMEOUT) for _ in range(1000)] == list(range(1000))


@pytest.mark.parametrize("maxsize", [float("nan"), 1.5, "3", None])
def test_maxsize_must_be_an_integer(make_queue: QueueFactory, maxsize: Any) -> None:
    with pytest.raises(TypeError):
        make_queue(maxsize)


def test_blocked_put_proceeds_when_another_thread_gets(make_queue: QueueFactory) -> None:
    q = make_queue(1)
    q.put("first")
    started = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        started.set()
        try:
            q.put("second", timeout=TIMEOUT)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    assert started.wait(TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "first"
    t.join(TIMEOUT)
    assert not t.is_alive() and not errors
    assert q.get(timeout=TIMEOUT) == "second"


# -- qsize, empty, full


def test_qsize_empty_full(make_queue: QueueFactory) -> None:
    skip_qsize_if_unsupported(make_queue)
    q = make_queue(3)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)
    q.put("a")
    q.put("b")
    assert q.qsize() == 2
    assert not q.full()
    if make_queue.kind == "stdlib":
        # The stdlib's empty() polls the pipe, which its feeder thread fills
        # a little after put() returned.
        assert eventually(lambda: not q.empty())
    else:
        assert not q.empty()
    q.put("c")
    assert (q.qsize(), q.full()) == (3, True)
    q.get(timeout=TIMEOUT)
    assert (q.qsize(), q.full()) == (2, False)
    q.get(timeout=TIMEOUT)
    q.get(timeout=TIMEOUT)
    assert (q.qsize(), q.empty(), q.full()) == (0, True, False)


def test_qsize_unbounded_beyond_semaphore_cap(make_queue: QueueFactory) -> None:
    skip_qsize_if_unsupported(make_queue)
    q = make_queue()
    n = 40_000  # past 32,767, macOS's SEM_VALUE_MAX
    # One-byte bytes objects: the smallest pipeq frame (17 + 1 bytes).
    if make_queue.kind == "pipeq" and q.pipe_capacity < n * 18:
        pytest.skip(f"the pipe holds only {q.pipe_capacity} bytes")
    for i in range(n):
        q.put_nowait(bytes([i % 251]))
    assert q.qsize() == n
    assert not q.full()
    got = [q.get(timeout=TIMEOUT) for _ in range(n)]
    assert got == [bytes([i % 251]) for i in range(n)]
    assert q.qsize() == 0


def test_put_then_get_nowait_is_immediate() -> None:
    # deliberate difference: put() returns once the item is in the pipe, so
    # it can be got without blocking; the stdlib's put() returns before its
    # feeder thread wrote anything, and an immediate get_nowait() may raise Empty.
    q: pipeq.Queue[int] = pipeq.Queue()
    try:
        for i in range(100):
            q.put(i)
            assert not q.empty()
            assert q.get_nowait() == i
    finally:
        q.close()


# -- close, join_thread, cancel_join_thread


@pytest.mark.parametrize("op", ["put", "put_nowait", "get", "get_nowait"])
def test_put_get_after_close_raise(make_queue: QueueFactory, op: str) -> None:
    q = make_queue(5)
    q.put("x")
    q.close()
    call: Callable[[], Any] = {
        "put": lambda: q.put("y", timeout=SHORT),
        "put_nowait": lambda: q.put_nowait("y"),
        "get": lambda: q.get(timeout=SHORT),
        "get_nowait": q.get_nowait,
    }[op]
    with pytest.raises(ValueError, match="closed"):
        call()


def test_qsize_empty_full_after_close(make_queue: QueueFactory) -> None:
    # As the stdlib's, these keep answering after close() (from shared
    # counters; the stdlib's from its semaphore and pipe).
    skip_qsize_if_unsupported(make_queue)
    q = make_queue(2)
    q.put("x")
    if make_queue.kind == "stdlib":
        assert eventually(lambda: not q.empty())  # the feeder thread wrote it
    q.close()
    assert q.qsize() == 1
    assert q.full() is False
    if make_queue.kind == "stdlib" and sys.version_info[:2] == (3, 12):
        # CPython 3.12's empty() raises OSError("handle is closed") after
        # close(); 3.10, 3.11 and 3.13 answer.  deliberate difference: pipeq
        # always answers.
        try:
            assert q.empty() is False
        except OSError:
            pass
    else:
        assert q.empty() is False


def test_close_is_idempotent(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put(1)
    assert q.get(timeout=TIMEOUT) == 1
    q.close()
    q.close()
    q.join_thread()
    q.join_thread()


def test_join_thread_before_close_asserts(make_queue: QueueFactory) -> None:
    q = make_queue()
    q.put(1)
    with pytest.raises(AssertionError):
        q.join_thread()
    assert q.get(timeout=TIMEOUT) == 1


@pytest.mark.parametrize("used", [False, True])
def test_cancel_join_thread_then_close_and_join(make_queue: QueueFactory, used: bool) -> None:
    q = make_queue()
    if used:
        q.put("x")
        assert q.get(timeout=TIMEOUT) == "x"
    q.cancel_join_thread()
    q.put("still works")
    assert q.get(timeout=TIMEOUT) == "still works"
    q.close()
    q.join_thread()


# -- pickling


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickling_outside_process_start_raises(make_queue: QueueFactory, protocol: int) -> None:
    q = make_queue()
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(q, protocol)
    q.put("still fine")
    assert q.get(timeout=TIMEOUT) == "still fine"


def test_queue_in_put_object_raises() -> None:
    # deliberate difference: raised by put() itself; the stdlib's feeder thread
    # hits the same RuntimeError in the background (see test_unpicklable_put).
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        with pytest.raises(RuntimeError, match="inheritance"):
            q.put(q)
        q.put("ok")
        assert q.get(timeout=TIMEOUT) == "ok"
    finally:
        q.close()


class _Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("refuses to be pickled")


UNPICKLABLE = [
    pytest.param(lambda: 1, id="lambda"),
    pytest.param(threading.Lock(), id="lock"),
    pytest.param([1, 2, _Unpicklable()], id="nested"),
]


@pytest.mark.parametrize("bad", UNPICKLABLE)
@pytest.mark.parametrize("maxsize", [0, 1])
def test_unpicklable_put(
    make_queue: QueueFactory, bad: Any, maxsize: int, capsys: pytest.CaptureFixture[str]
) -> None:
    q = make_queue(maxsize)
    if make_queue.kind == "pipeq":
        with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
            q.put(bad)
    else:
        # deliberate difference: the stdlib's put() returns normally; its feeder
        # thread prints the traceback and drops the item.
        q.put(bad)
    skip_qsize_if_unsupported(make_queue)
    # The queue is unchanged and still works (a bounded one has its slot back).
    q.put("after", timeout=TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "after"
    with pytest.raises(pipeq.Empty):
        q.get(timeout=SHORT)
    assert q.qsize() == 0
    err = capsys.readouterr().err
    if make_queue.kind == "stdlib":
        assert "Traceback" in err and ("pickle" in err or "Pickl" in err)
    else:
        assert err == ""


# -- threads


def test_many_threads(make_queue: QueueFactory) -> None:
    q = make_queue()
    n_producers, n_consumers, per_producer = 8, 4, 2000
    results: list[list[tuple[int, int]]] = [[] for _ in range(n_consumers)]
    errors: list[BaseException] = []

    def produce(pid: int) -> None:
        try:
            for seq in range(per_producer):
                q.put((pid, seq), timeout=TIMEOUT)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def consume(cid: int) -> None:
        try:
            while (item := q.get(timeout=TIMEOUT)) is not None:
                results[cid].append(item)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    consumers = [
        threading.Thread(target=consume, args=(i,), daemon=True) for i in range(n_consumers)
    ]
    producers = [
        threading.Thread(target=produce, args=(i,), daemon=True) for i in range(n_producers)
    ]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(TIMEOUT)
        assert not t.is_alive()
    for _ in consumers:
        q.put(None)
    for t in consumers:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert not errors
    everything = [item for r in results for item in r]
    assert len(everything) == n_producers * per_producer
    assert set(everything) == {(p, s) for p in range(n_producers) for s in range(per_producer)}
    for r in results:  # each consumer sees each producer's items in order
        for p in range(n_producers):
            seqs = [s for pid, s in r if pid == p]
            assert seqs == sorted(seqs)


def _bounded_round(q: Any, n_producers: int, per_producer: int, wait: float) -> None:
    got: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def produce(pid: int) -> None:
        try:
            for seq in range(per_producer):
                q.put((pid, seq), timeout=wait)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    producers = [
        threading.Thread(target=produce, args=(i,), daemon=True) for i in range(n_producers)
    ]
    for t in producers:
        t.start()
    try:
        for _ in range(n_producers * per_producer):
            got.append(q.get(timeout=wait))
    except pipeq.Empty:
        pytest.fail(
            f"got {len(got)} of {n_producers * per_producer} items, then nothing for "
            f"{wait} s; qsize()={q.qsize()}, full()={q.full()}: producers waiting "
            "for room were not woken"
        )
    for t in producers:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert not errors
    assert sorted(got) == [(p, s) for p in range(n_producers) for s in range(per_producer)]


def test_bounded_many_threads(make_queue: QueueFactory) -> None:
    # Several producers blocked on a full bounded queue must all be woken as
    # room appears.  Shorter timeouts than elsewhere: a lost wake-up shows as
    # an Empty, and should not cost a minute.  Whether one happens depends on
    # timing: a few rounds make it near certain to show.
    for _ in range(4):
        _bounded_round(make_queue(2), n_producers=8, per_producer=300, wait=10.0)


# -- typing


def test_generic_subscription() -> None:
    # pipeq only: multiprocessing.queues.Queue is subscriptable only from 3.12.
    alias = pipeq.Queue[int]
    assert typing.get_origin(alias) is pipeq.Queue
    assert typing.get_args(alias) == (int,)
    q = alias(2)
    try:
        assert isinstance(q, pipeq.Queue)
        q.put(5)
        assert q.get(timeout=TIMEOUT) == 5
    finally:
        q.close()


def test_public_names() -> None:
    import queue

    assert pipeq.Empty is queue.Empty
    assert pipeq.Full is queue.Full
    assert issubclass(pipeq.StreamError, ValueError)
    assert isinstance(pipeq.__version__, str)


def test_ctx_accepted() -> None:
    import multiprocessing

    for method in multiprocessing.get_all_start_methods():
        q: pipeq.Queue[str] = pipeq.Queue(3, ctx=multiprocessing.get_context(method))
        try:
            q.put(method)
            assert q.get(timeout=TIMEOUT) == method
        finally:
            q.close()


class _LateReduced:
    """Pickled by default until a reducer is registered for it."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.via = "default"


def _rebuild_late(value: int) -> _LateReduced:
    obj = _LateReduced(value)
    obj.via = "registered"
    return obj


def _reduce_late(obj: _LateReduced) -> tuple[Any, tuple[int]]:
    return _rebuild_late, (obj.value,)


def test_reducer_registered_after_first_put_applies(make_queue: QueueFactory) -> None:
    # Both queues pickle with ForkingPickler's registry as it is at put() time.
    from multiprocessing.reduction import ForkingPickler

    q = make_queue()
    q.put(_LateReduced(1))
    assert q.get(timeout=TIMEOUT).via == "default"
    ForkingPickler.register(_LateReduced, _reduce_late)
    try:
        q.put(_LateReduced(2))
        got = q.get(timeout=TIMEOUT)
        assert (got.value, got.via) == (2, "registered")
    finally:
        del ForkingPickler._extra_reducers[_LateReduced]
    q.put(_LateReduced(3))
    assert q.get(timeout=TIMEOUT).via == "default"


class _SlowToPickle:
    """Waits in __reduce__ until told to go on (another thread pickles meanwhile)."""

    def __init__(self, entered: threading.Event, go: threading.Event) -> None:
        self.entered, self.go = entered, go

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        self.entered.set()
        assert self.go.wait(TIMEOUT)
        return str, ("slow",)


def test_put_while_another_thread_is_inside_a_pickle() -> None:
    # deliberate difference: the stdlib's one feeder thread pickles every
    # item in turn, so an item put after a slow one waits behind it.  In
    # pipeq each put() pickles in its own thread.
    q: pipeq.Queue[Any] = pipeq.Queue()
    entered, go = threading.Event(), threading.Event()
    t = threading.Thread(target=q.put, args=(_SlowToPickle(entered, go),), daemon=True)
    t.start()
    try:
        assert entered.wait(TIMEOUT)
        q.put({"fast": [1, 2, 3]})  # pickled while the other thread is mid-pickle
        assert q.get(timeout=TIMEOUT) == {"fast": [1, 2, 3]}
    finally:
        go.set()
        t.join(TIMEOUT)
    assert not t.is_alive()
    assert q.get(timeout=TIMEOUT) == "slow"
    q.close()
