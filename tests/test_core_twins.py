"""The compiled and the pure core: the same Channel, either one serving a queue the other made."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pickle
import queue
import select
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
from core_workers import (
    CORES,
    Handoff,
    consume_payloads,
    load,
    payloads,
    produce_payloads,
    same,
    twin,
)
from workers import CHILD_TIMEOUT, TIMEOUT, make_payload

from pipeq import _core_c, _core_py, _shm
from pipeq._errors import StreamError

if TYPE_CHECKING:
    from conftest import Children, Forked

pytestmark = [
    # Python 3.12+ warns when a multi-threaded process forks (pytest's
    # faulthandler watchdog is a thread); forking is what these tests do.
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]

PAIRS = [("c", "c"), ("c", "py"), ("py", "c"), ("py", "py")]
CHUNK = _shm.CHUNK
SHORT = 0.2  # a timeout that is meant to expire
BYTES_SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]


# -- helpers


class BytesSub(bytes):
    """Not exactly bytes: pickled rather than sent raw."""


def pipe_bytes(ch: Any) -> int:
    buf = fcntl.ioctl(ch.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, sys.byteorder)


def wait_until(pred: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll pred (no event can tell these things) until true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.005)


def roundtrip(writer: Any, reader: Any, objs: list[Any]) -> list[Any]:
    """Put objs with writer from a thread while reader gets them here, so
    that frames larger than the pipe can pass."""
    errors: list[Exception] = []

    def produce() -> None:
        try:
            for obj in objs:
                writer.put(obj, timeout=TIMEOUT)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    got = [reader.get(timeout=TIMEOUT) for _ in objs]
    t.join(TIMEOUT)
    assert not t.is_alive(), "producer thread still running"
    assert not errors, errors
    return got


@pytest.fixture(params=list(CORES))
def core(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """Channels to close at teardown: append what a test creates."""
    channels: list[Any] = []
    yield channels
    for ch in channels:
        ch.close()


@pytest.fixture
def new(core: ModuleType, opened: list[Any]) -> Callable[..., Any]:
    def make(maxsize: int = 0) -> Any:
        ch = core.Channel(maxsize)
        opened.append(ch)
        return ch

    return make


# -- one core at a time


def test_same_public_interface() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}

    assert public(_core_py.Channel) == public(_core_c.Channel) == {
        "acquire_read_lock", "capacity", "close", "closed", "empty", "fileno",
        "full", "get", "get_many", "join", "joinable", "maxsize", "put", "put_many", "qsize",
        "release_read_lock", "stall_warning", "task_done", "unfinished", "writer_fileno",
    }  # fmt: skip
    assert callable(_core_py._rebuild) and callable(_core_c._rebuild)


@pytest.mark.parametrize(
    "obj", [0, -(2**100), 1.5, "", "héllo ✓ 𝄞", None, (1, "a"), {"k": [1, 2]}, bytearray(b"ab")]
)
def test_roundtrip_small(new: Callable[..., Any], obj: Any) -> None:
    ch = new()
    ch.put(obj, timeout=TIMEOUT)
    assert ch.qsize() == 1
    got = ch.get(timeout=TIMEOUT)
    assert same(got, obj)
    assert ch.qsize() == 0


@pytest.mark.parametrize("size", BYTES_SIZES)
def test_roundtrip_bytes(new: Callable[..., Any], size: int) -> None:
    ch = new()
    data = make_payload("bytes", size)
    (got,) = roundtrip(ch, ch, [data])
    assert type(got) is bytes and got == data
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0


@pytest.mark.parametrize("size", [0, 1, _shm.OOB_MIN - 1, _shm.OOB_MIN, CHUNK + 1])
def test_roundtrip_bytearray_and_bytes_subclass(new: Callable[..., Any], size: int) -> None:
    ch = new()
    objs = [bytearray(make_payload("bytes", size)), BytesSub(make_payload("bytes", size))]
    got = roundtrip(ch, ch, objs)
    assert type(got[0]) is bytearray and got[0] == objs[0]
    assert type(got[1]) is BytesSub and got[1] == objs[1]  # pickled, not sent raw
    if size > CHUNK:
        return  # put_many() of these would wait for a consumer
    ch.put_many(objs)
    got = ch.get_many(2, timeout=TIMEOUT)
    got += [] if len(got) == 2 else [ch.get(timeout=TIMEOUT)]
    assert type(got[0]) is bytearray and got[0] == objs[0]
    assert type(got[1]) is BytesSub and got[1] == objs[1]


@pytest.mark.pipe_only
@pytest.mark.parametrize("how", ["put", "put_many"])
@pytest.mark.parametrize("size", [_shm.OOB_MIN - 1, _shm.OOB_MIN, 100_000])
def test_large_bytearray_travels_out_of_band(new: Callable[..., Any], size: int, how: str) -> None:
    """Protocol 5 pickles a bytearray in band, and the reader would copy it
    once more out of the pickle.  From OOB_MIN bytes on, a bytearray message
    goes as one out-of-band buffer instead (which the reader reads straight
    into the bytearray it returns; the round trips above check what comes
    out).  Here: the frame on the wire, read past the channel."""
    ch = new()
    sent = bytearray(make_payload("bytes", size))
    ch.put(sent) if how == "put" else ch.put_many([sent])
    wire = os.read(ch.fileno(), 1 << 20)  # the whole frame: it fits in the pipe
    _, _, flags, nbuf, length = _shm.HEADER.unpack_from(wire)
    if size >= _shm.OOB_MIN:
        assert flags & _shm.FLAG_OOB and nbuf == 1
        assert bytes(sent) in wire  # once, from the bytearray's own memory
        assert length < size + 64  # and not in the pickle as well
    else:
        assert not flags & _shm.FLAG_OOB and nbuf == 0


def test_roundtrip_numpy_out_of_band(new: Callable[..., Any]) -> None:
    np = pytest.importorskip("numpy")
    ch = new()
    objs = [
        np.arange(10),  # too small for out of band
        make_payload("ndarray", 256 * 1024),
        make_payload("ndarray_fortran", 3 * CHUNK + 1024),
        make_payload("ndarray_strided", 100_000),  # not contiguous: in band
        [
            make_payload("ndarray", 32 * 1024 * (i + 1)) for i in range(5)
        ],  # five buffers in one frame
        make_payload("many_bytearrays", 1100 * 16 * 1024),  # more buffers than one writev takes
    ]
    got = roundtrip(ch, ch, objs)
    for g, o in zip(got, objs, strict=True):
        assert same(g, o)
    # Out-of-band buffers arrive in fresh, writable memory.
    assert got[1].flags.writeable and got[2].flags.f_contiguous


@pytest.mark.parametrize("shift", [-1, 0, 1])
def test_streamed_frame_cut_into_write_slices(new: Callable[..., Any], shift: int) -> None:
    """A frame larger than the pipe goes in by writes of at most WRITE_SLICE
    bytes, which end inside the header, the pickle, a buffer or a marker as
    the parts fall; the frame arrives whole, and so do those after it."""
    np = pytest.importorskip("numpy")
    ch = new()
    step = _shm.WRITE_SLICE
    n = 2 * ch.capacity // step + 3  # more than the pipe holds
    arrays = tuple(np.full(step + shift * (k + 1), k, dtype=np.uint8) for k in range(n))
    objs = [arrays, b"\x05" * (ch.capacity + step + shift), "after"]
    got = roundtrip(ch, ch, objs)
    assert len(got[0]) == n and all(same(g, a) for g, a in zip(got[0], arrays, strict=True))
    assert got[1:] == objs[1:]
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0


@pytest.mark.pipe_only
def test_pure_writer_streams_by_write_slices(opened: list[Any]) -> None:
    """What the compiled core does too (its writev cannot be watched from
    here): every write of a frame larger than the pipe asks for at most
    WRITE_SLICE bytes, and together they write the frame."""
    ch = _core_py.Channel()
    opened.append(ch)
    big = b"\x07" * (3 * ch.capacity + 11)
    writes: list[tuple[int, int]] = []
    real = os.writev

    def writev(fd: int, buffers: Any) -> int:
        n = real(fd, buffers)
        if fd == ch._wfd:
            writes.append((sum(len(b) for b in buffers), n))
        return n

    os.writev = writev
    try:
        assert roundtrip(ch, ch, [big]) == [big]
    finally:
        os.writev = real
    assert max(asked for asked, _ in writes) == _shm.WRITE_SLICE
    assert sum(n for _, n in writes) == _shm.wire_size(len(big))


def test_get_empty_timeout(new: Callable[..., Any]) -> None:
    ch = new()
    for timeout in (0, -1, SHORT):
        t0 = time.monotonic()
        with pytest.raises(queue.Empty):
            ch.get(timeout=timeout)
        assert time.monotonic() - t0 >= max(timeout, 0) - 0.01
    assert ch.empty() and not ch.full() and ch.qsize() == 0


def test_maxsize_full_timeout(new: Callable[..., Any]) -> None:
    ch = new(2)
    assert ch.maxsize == 2
    ch.put("a", timeout=TIMEOUT)
    ch.put("b", timeout=TIMEOUT)
    assert ch.full() and ch.qsize() == 2 and not ch.empty()
    for timeout in (0, -1, SHORT):
        t0 = time.monotonic()
        with pytest.raises(queue.Full):
            ch.put("c", timeout=timeout)
        assert time.monotonic() - t0 >= max(timeout, 0) - 0.01
    assert ch.get(timeout=TIMEOUT) == "a"
    assert not ch.full()
    ch.put("c", timeout=0)
    assert [ch.get(timeout=TIMEOUT) for _ in range(2)] == ["b", "c"]


def test_maxsize_wakes_blocked_producer(new: Callable[..., Any]) -> None:
    ch = new(1)
    ch.put(0, timeout=TIMEOUT)
    done = threading.Event()

    def produce() -> None:
        for i in range(1, 50):
            ch.put(i, timeout=TIMEOUT)
        done.set()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    assert [ch.get(timeout=TIMEOUT) for _ in range(50)] == list(range(50))
    t.join(TIMEOUT)
    assert done.is_set()


@pytest.mark.parametrize("maxsize", [0, -5])
def test_unbounded(new: Callable[..., Any], maxsize: int) -> None:
    ch = new(maxsize)
    assert ch.maxsize == 0 and not ch.full()
    assert ch.capacity >= _shm.DEFAULT_PIPE_SIZE


@pytest.mark.pipe_only
def test_pipe_full_raises_full_and_keeps_frames_whole(new: Callable[..., Any]) -> None:
    ch = new()
    item = make_payload("bytes", ch.capacity // 5)
    n = 0
    with pytest.raises(queue.Full):
        while n < 100:
            ch.put(item, timeout=SHORT)
            n += 1
    assert 1 <= n < 100 and ch.qsize() == n
    assert all(ch.get(timeout=TIMEOUT) == item for _ in range(n))
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0


def test_frames_on_a_full_pipe(new: Callable[..., Any]) -> None:
    """Small frames are written whole or taken back; larger ones that find
    the pipe full may be begun (Linux fills a pipe's last page before it
    counts as full) and are then dropped whole.  The stream stays intact."""
    ch = new()
    item = make_payload("bytes", 3000)  # <= PIPE_BUF: written whole or not at all
    n = 0
    with pytest.raises(queue.Full):
        while n < 10_000:
            ch.put(item, timeout=0)
            n += 1
    assert ch.qsize() == n
    tries = [make_payload("bytes", 5000), make_payload("bytes", ch.capacity + 1)]
    sent = []
    for obj in tries:
        try:
            ch.put(obj, timeout=0)
            sent.append(obj)
        except queue.Full:
            pass
    assert all(ch.get(timeout=TIMEOUT) == item for _ in range(n))
    got = []
    with pytest.raises(queue.Empty):
        while True:
            got.append(ch.get(timeout=SHORT))
    assert got == sent
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0
    assert roundtrip(ch, ch, tries) == tries


def test_close(new: Callable[..., Any]) -> None:
    ch = new()
    ch.put(1, timeout=TIMEOUT)
    assert not ch.closed and ch.fileno() >= 0 and ch.writer_fileno() >= 0
    ch.close()
    ch.close()
    assert ch.closed
    for call in (ch.fileno, ch.writer_fileno, ch.get, lambda: ch.put(2)):
        with pytest.raises(ValueError):
            call()
    assert ch.qsize() == 1 and not ch.empty()  # the shared page stays readable


def test_pickling_error_leaves_queue_untouched(new: Callable[..., Any]) -> None:
    ch = new()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ch.put(lambda: None, timeout=TIMEOUT)
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0
    ch.put("ok", timeout=TIMEOUT)
    assert ch.get(timeout=TIMEOUT) == "ok"


def test_argument_types(core: ModuleType, new: Callable[..., Any]) -> None:
    with pytest.raises(TypeError):
        core.Channel(1.5)
    ch = new()
    with pytest.raises(TypeError):
        ch.put(1, timeout="1")
    ch.put(1, timeout=2**80)  # as good as forever
    assert ch.get(timeout=TIMEOUT) == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"not a pipeq frame",
        _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, 0x80, 0, 1) + b"x\xc3",  # unknown flag
        _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, 0, 0, 2) + b"xx\x00",  # bad end marker
        _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, _shm.FLAG_OOB, 1, 8) + b"\xff" * 8 + b"\xc3",
    ],
    ids=["text", "flag", "marker", "table"],
)
def test_garbage_raises_stream_error(new: Callable[..., Any], garbage: bytes) -> None:
    ch = new()
    os.write(ch.writer_fileno(), garbage)
    with pytest.raises(StreamError):
        ch.get(timeout=TIMEOUT)


def test_fds_are_close_on_exec(new: Callable[..., Any]) -> None:
    ch = new(3)
    for fd in (ch.fileno(), ch.writer_fileno()):
        assert not os.get_inheritable(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


# -- both cores on one queue, in one process


@pytest.mark.parametrize("creator,user", PAIRS)
def test_roundtrip_across_cores(creator: str, user: str, opened: list[Any]) -> None:
    ch = load(creator).Channel()
    other = twin(ch, user)
    opened += (ch, other)
    objs = payloads()
    for got, want in zip(roundtrip(ch, other, objs), objs, strict=True):
        assert same(got, want)
    for got, want in zip(roundtrip(other, ch, objs), objs, strict=True):
        assert same(got, want)
    assert ch.qsize() == other.qsize() == 0


@pytest.mark.parametrize("creator,user", PAIRS)
def test_maxsize_across_cores(creator: str, user: str, opened: list[Any]) -> None:
    ch = load(creator).Channel(2)
    other = twin(ch, user)
    opened += (ch, other)
    assert other.maxsize == 2
    ch.put(1, timeout=TIMEOUT)
    other.put(2, timeout=TIMEOUT)
    assert ch.full() and other.full() and other.qsize() == 2
    with pytest.raises(queue.Full):
        other.put(3, timeout=SHORT)

    def produce() -> None:
        other.put(3, timeout=TIMEOUT)  # woken by a get() of the other core

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    assert [ch.get(timeout=TIMEOUT) for _ in range(3)] == [1, 2, 3]
    t.join(TIMEOUT)
    assert not t.is_alive()


def test_many_writers_and_readers_of_both_cores(opened: list[Any]) -> None:
    """Frames of every size class from threads of both cores at once: the
    locks keep each frame whole and each producer's frames in order."""
    ch = _core_c.Channel(50)
    views = [ch, twin(ch, "py"), twin(ch, "c"), twin(ch, "py")]
    opened += views
    sizes = [10, 5000, 70_000, 10, ch.capacity + 10]
    per_producer = 40
    # seen[reader][producer]: the sequence numbers that reader got, in order
    seen: dict[int, list[list[int]]] = {rid: [[] for _ in views] for rid in range(2)}
    errors: list[Exception] = []

    def produce(pid: int, view: Any) -> None:
        try:
            for seq in range(per_producer):
                view.put((pid, seq, b"%d" % pid * sizes[seq % len(sizes)]), timeout=TIMEOUT)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    def consume(rid: int, view: Any, n: int) -> None:
        try:
            for _ in range(n):
                pid, seq, data = view.get(timeout=TIMEOUT)
                assert data == b"%d" % pid * sizes[seq % len(sizes)]
                seen[rid][pid].append(seq)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    total = len(views) * per_producer
    threads = [threading.Thread(target=produce, args=(i, v)) for i, v in enumerate(views)]
    threads += [
        threading.Thread(target=consume, args=(0, views[0], total // 2)),
        threading.Thread(target=consume, args=(1, views[1], total // 2)),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert not errors, errors
    for pid in range(len(views)):
        assert sorted(seen[0][pid] + seen[1][pid]) == list(range(per_producer))
        assert all(s == sorted(s) for s in (seen[0][pid], seen[1][pid]))
    assert ch.qsize() == 0


def _abandon(writer: Any) -> None:
    """A put of a frame larger than the pipe, with nobody reading: it times
    out midway and leaves the frame unfinished."""
    with pytest.raises(queue.Full):
        writer.put(make_payload("bytes", writer.capacity + CHUNK + 5), timeout=SHORT)
    assert pipe_bytes(writer) > 0, "the frame was not begun"


@pytest.mark.pipe_only
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_abandoned_frame_dropped_by_reader(
    writer_core: str, reader_core: str, opened: list[Any]
) -> None:
    """The reader finds the frame's writer gone and drops what it sent."""
    writer = load(writer_core).Channel()
    reader = twin(writer, reader_core)
    opened += (writer, reader)
    _abandon(writer)
    with pytest.raises(queue.Empty):
        reader.get(timeout=SHORT)
    assert reader.qsize() == 0 and pipe_bytes(reader) == 0
    later = ["after", make_payload("bytes", 100), make_payload("bytes", CHUNK + 1)]
    assert roundtrip(writer, reader, later) == later


@pytest.mark.pipe_only
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_abandoned_frame_partly_paid_by_next_writer(
    writer_core: str, reader_core: str, opened: list[Any]
) -> None:
    """The next writer (of the other core) pays what fits of the debt and
    times out; the reader drops the frame, filler included."""
    writer = load(writer_core).Channel()
    other = twin(writer, reader_core)
    opened += (writer, other)
    writer.put("first", timeout=TIMEOUT)
    _abandon(writer)
    assert other.get(timeout=TIMEOUT) == "first"
    try:
        other.put("x", timeout=SHORT)  # the pipe has room for part of the filler
        expect = ["x"]  # only if the pipe is much larger than a chunk
    except queue.Full:
        expect = []
    got = []
    with pytest.raises(queue.Empty):
        while True:
            got.append(other.get(timeout=SHORT))
    assert got == expect
    assert other.qsize() == 0 and pipe_bytes(other) == 0
    later = ["after", make_payload("bytes", CHUNK + 1)]
    assert roundtrip(other, writer, later) == later


def wlock_held(ch: Any) -> bool:
    """Whether some thread holds the write lock of pure-core channel ch."""
    rc = _core_py._trylock(ch._wlock)
    if rc in (0, _core_py.OWNER_DIED):
        _core_py._unlock(ch._wlock)
        return False
    return True


@pytest.mark.pipe_only
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_abandoned_frame_paid_by_next_writer(
    writer_core: str, reader_core: str, opened: list[Any]
) -> None:
    """The next writer (of the other core) holds the write lock while it pays
    the debt, so the reader cannot forgive it: the frame ends with TORN."""
    writer = load(writer_core).Channel()
    other = twin(writer, reader_core)
    probe = twin(writer, "py")
    opened += (writer, other, probe)
    _abandon(writer)
    later = ["after", make_payload("bytes", 2 * CHUNK)]
    errors: list[Exception] = []

    def pay_and_put() -> None:
        try:
            for obj in later:
                other.put(obj, timeout=TIMEOUT)
        except Exception as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=pay_and_put, daemon=True)
    t.start()
    wait_until(lambda: wlock_held(probe), "the next writer holds the write lock")
    assert [other.get(timeout=TIMEOUT) for _ in later] == later
    t.join(TIMEOUT)
    assert not t.is_alive() and not errors, errors
    assert other.qsize() == 0 and pipe_bytes(other) == 0


@pytest.mark.pipe_only
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_abandoned_frame_with_writer_and_reader_racing(
    writer_core: str, reader_core: str, opened: list[Any]
) -> None:
    """Whether the next writer ends the frame with TORN or the reader finds
    its writer gone first, the frame is dropped whole."""
    writer = load(writer_core).Channel()
    reader = twin(writer, reader_core)
    opened += (writer, reader)
    _abandon(writer)
    later = ["after", make_payload("bytes", CHUNK // 2), make_payload("bytes", 2 * CHUNK)]
    assert roundtrip(writer, reader, later) == later
    assert reader.qsize() == 0


# -- both cores on one queue, across processes


def _other(core: str) -> str:
    return "py" if core == "c" else "c"


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("creator", list(CORES))
def test_child_of_other_core_produces(method: str, creator: str, children: Children) -> None:
    ch = load(creator).Channel()
    try:
        user = _other(creator)
        ctx = multiprocessing.get_context(method)
        p = children.start(ctx, produce_payloads, Handoff(ch, user), user)
        for i, want in enumerate(payloads()):
            got = ch.get(timeout=TIMEOUT)
            assert same(got, want), f"payload {i}: got {type(got)}"
        children.join_ok(p)
        assert ch.qsize() == 0
    finally:
        ch.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("creator", list(CORES))
def test_child_of_other_core_consumes(method: str, creator: str, children: Children) -> None:
    ch = load(creator).Channel()
    try:
        user = _other(creator)
        ctx = multiprocessing.get_context(method)
        p = children.start(ctx, consume_payloads, Handoff(ch, user), user)
        for obj in payloads():
            ch.put(obj, timeout=TIMEOUT)
        children.join_ok(p)
        assert ch.qsize() == 0
    finally:
        ch.close()


@pytest.mark.pipe_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("reader_core", list(CORES))
@pytest.mark.parametrize("writer_core", list(CORES))
def test_frame_begun_by_killed_reader_is_skipped(
    writer_core: str, reader_core: str, forked: Forked, opened: list[Any]
) -> None:
    """A reader killed mid-frame leaves the read lock to a successor, which
    drops the rest of that frame and reads on."""
    ch = load(writer_core).Channel()
    reader = twin(ch, reader_core)
    probe = twin(ch, "py")  # reads the shared page's counters
    opened += (ch, reader, probe)
    size = ch.capacity + 70_000
    writer = forked.fork(lambda: ch.put(b"\x01" * size, timeout=CHILD_TIMEOUT))
    wait_until(lambda: pipe_bytes(ch) > 0, "the writer began its frame")
    os.kill(writer, signal.SIGSTOP)  # holding the write lock, mid-frame
    try:
        os.waitpid(writer, os.WUNTRACED)
        written = pipe_bytes(ch)
        victim = forked.fork(lambda: reader.get(timeout=CHILD_TIMEOUT))
        # Killed only once it has counted every byte it read: a kill between
        # a read and its count would leave the successor misplaced.
        wait_until(
            lambda: probe._rd_pos.value == written, "the reader counted every byte in the pipe"
        )
        os.kill(victim, signal.SIGKILL)  # holding the read lock, mid-frame
        os.waitpid(victim, 0)
        forked.pids.discard(victim)
    finally:
        os.kill(writer, signal.SIGCONT)
    forked.wait_ok(writer)
    ch.put("after", timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == "after"
    assert reader.qsize() == 0 and pipe_bytes(ch) == 0


# -- a reader SIGKILLed between a read and counting it


def _read_until_killed(r: Any, kill_at: int, done: Any) -> None:
    """In a forked child, through r (a pure-core Channel): get() until the
    kill_at-th read from the pipe has returned, then SIGKILL this process
    before the core counts what it read, as a SIGKILL that arrives during
    the read does in either core.  done[0] counts the frames it got."""
    real, reads = os.readv, [0]

    def readv(fd: int, buffers: Any) -> int:
        n = real(fd, buffers)
        if fd == r.fileno():
            reads[0] += 1
            if reads[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return n

    os.readv = readv  # in this child only
    while True:
        r.get(timeout=CHILD_TIMEOUT)
        done[0] += 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 6, 9])
@pytest.mark.parametrize("successor_core", list(CORES))
def test_reader_killed_inside_a_read(
    successor_core: str, kill_at: int, forked: Forked, opened: list[Any]
) -> None:
    """Where such a reader stopped is known only to lie in [RD_POS, RD_TRY].
    The next reader settles it from the byte counts (every byte written and
    not read is in the pipe), drops the rest of that frame and reads on: the
    frame it was in is lost, nothing after it is, and nothing wedges."""
    ch = _core_py.Channel()
    successor = twin(ch, successor_core)
    opened += (ch, successor)
    cap = ch.capacity
    sizes = [10, 300_000, 2 * cap + 17, 100, cap + 5, 7]
    items = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    done = multiprocessing.Array("q", 1, lock=False)  # shared with forked children

    def put_all() -> None:
        for item in items:
            ch.put(item, timeout=CHILD_TIMEOUT)

    writer = forked.fork(put_all)
    victim = forked.fork(lambda: _read_until_killed(ch, kill_at, done))
    _, status = os.waitpid(victim, 0)
    forked.pids.discard(victim)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    got: list[Any] = []
    while not got or got[-1] != items[-1]:
        got.append(successor.get(timeout=TIMEOUT))
    forked.wait_ok(writer)
    assert got == items[len(items) - len(got) :]
    assert len(got) >= len(items) - done[0] - 1
    ch.put("after", timeout=TIMEOUT)
    assert successor.get(timeout=TIMEOUT) == "after"
    assert successor.qsize() == 0 and pipe_bytes(ch) == 0


def _die_inside_group_read(r: Any, stage: str) -> None:
    """In a forked child, through r (a pure-core Channel): do what the
    compiled get_many() does with a group's lead at the head of the pipe
    (read its header, then the rest of the group by one read), and die at
    `stage`, holding the read lock: inside that read (the bytes gone, RD_POS
    not moved), after it (RD_POS moved, nothing counted), or while counting
    (RD_BASE moved, GETS not yet)."""
    assert r._lock(r._rlock, -1) == 0
    r._rd_try.value = _shm.HDR
    assert os.readv(r.fileno(), [r._rd_hdr]) == _shm.HDR
    r._rd_pos.value = r._rd_try.value = _shm.HDR
    flags, nbuf, length = _shm.HEADER.unpack_from(bytes(r._rd_hdr))[2:]
    frames, size = _shm.group_rest(flags, nbuf)
    end = _shm.wire_size(length) + size
    r._rd_try.value = end
    assert len(os.read(r.fileno(), end - _shm.HDR)) == end - _shm.HDR
    if stage == "after-read":
        r._rd_pos.value = end
    elif stage == "counting":
        r._rd_pos.value = end
        r._rd_cnt.value = frames + 1
        r._rd_base.value = _core_py._next_base(r._rd_base.value, end)
        r._rd_try.value = r._rd_pos.value = 0
    os._exit(0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("stage", ["inside-read", "after-read", "counting"])
@pytest.mark.parametrize("successor_core", list(CORES))
def test_reader_killed_inside_a_group_read(
    successor_core: str, stage: str, forked: Forked, opened: list[Any]
) -> None:
    """A get_many() reader killed as it takes a whole put_many() group by one
    read: the group's frames are gone with it, counted as taken, and the
    frames behind the group are delivered to the next reader, of either
    core."""
    ch = _core_c.Channel()
    successor = twin(ch, successor_core)
    probe = twin(ch, "py")
    opened += (ch, successor, probe)
    group = [1, "two", b"three", 4.0, None]
    ch.put_many(group)
    ch.put("behind")
    forked.wait_ok(forked.fork(lambda: _die_inside_group_read(probe, stage)))
    assert successor.get(timeout=TIMEOUT) == "behind"
    assert successor.qsize() == 0 and pipe_bytes(ch) == 0
    ch.put_many(["a", "b", "c"])
    assert successor.get_many(10, timeout=TIMEOUT) == ["a", "b", "c"]
    # Counted as lost (for JoinableQueue's count) unless the dead reader had
    # begun to count them as its own, as for a single frame.
    assert probe._lost.value == (0 if stage == "counting" else len(group))


# -- a pure-core call cut short by an exception just after its syscall


def _interrupted_after_syscall(name: str, nth: int) -> Callable[[], None]:
    """Patch os.<name> so that its nth call on a pipe raises KeyboardInterrupt
    after the real call returned: where a signal handler runs in the pure
    core, its bytes moved and not yet counted.  Returns the undo."""
    real = getattr(os, name)
    calls = [0]

    def patched(fd: int, buffers: Any) -> int:
        n = real(fd, buffers)
        calls[0] += 1
        if calls[0] == nth:
            raise KeyboardInterrupt
        return n

    setattr(os, name, patched)
    return lambda: setattr(os, name, real)


@pytest.mark.pipe_only
@pytest.mark.parametrize("nth", [1, 2, 3])
@pytest.mark.parametrize("reader_core", list(CORES))
def test_pure_writer_interrupted_just_after_a_write(
    reader_core: str, nth: int, forked: Forked, opened: list[Any]
) -> None:
    """The interrupted put() raises, its frame is dropped whole, and the
    same writer's next put() and every reader carry on (the next lock holder
    settles where the write stopped, as for a writer killed there)."""
    ch = _core_py.Channel()
    reader = twin(ch, reader_core)
    opened += (ch, reader)
    big = b"\x02" * (3 * ch.capacity + 7)

    def write() -> None:
        undo = _interrupted_after_syscall("writev", nth)
        try:
            ch.put(big, timeout=CHILD_TIMEOUT)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("put() was not interrupted")
        finally:
            undo()
        ch.put("after", timeout=CHILD_TIMEOUT)

    writer = forked.fork(write)
    assert reader.get(timeout=TIMEOUT) == "after"
    forked.wait_ok(writer)
    assert reader.qsize() == 0 and pipe_bytes(ch) == 0


@pytest.mark.parametrize("nth", [1, 2], ids=["after-header", "after-body"])
def test_pure_reader_interrupted_just_after_a_read(nth: int, opened: list[Any]) -> None:
    """The interrupted get() raises; the frame it was in is dropped and the
    next get() of the same reader reads on, nothing torn."""
    ch = _core_py.Channel()
    opened.append(ch)
    items = [b"\x03" * (ch.capacity // 2), "next", b"\x04" * 100]
    for item in items:
        ch.put(item, timeout=TIMEOUT)
    undo = _interrupted_after_syscall("readv", nth)
    try:
        with pytest.raises(KeyboardInterrupt):
            ch.get(timeout=TIMEOUT)
    finally:
        undo()
    got = []
    while len(got) < 3 and ch.qsize():
        got.append(ch.get(timeout=TIMEOUT))
    assert got == items[len(items) - len(got) :] and len(got) >= 2
    assert pipe_bytes(ch) == 0


# -- a writer SIGKILLed between a write and recording how far it got


def _die_inside_write(w: Any, wire: bytes, n: int, frames: int = 1) -> None:
    """In a forked child, through w (a pure-core Channel, whose page fields
    Python can reach): leave the page as a writer does that is killed after
    its writev() put n bytes of `wire` (one frame, or a put_many group of
    `frames` frames) in the pipe, before it stored its new WR_POS.  Exits
    holding the write lock, as such a writer does."""
    assert w._lock(w._wlock, -1) == 0
    if _core_py._parity(w._wr_base.value, w._puts.value):  # the last frame is over
        w._wr_base.value = _core_py._next_base(w._wr_base.value, w._wr_pos.value)
    w._page[_shm.O_WR_HDR : _shm.O_WR_HDR + _shm.HDR] = wire[: _shm.HDR]
    w._wr_pos.value = 0
    w._wr_try.value = 0
    w._wr_cnt.value = frames
    w._wr_end.value = len(wire)
    w._puts.value += frames
    w._wr_try.value = len(wire)  # the writev asked for the whole frame
    if n:
        os.write(w.writer_fileno(), wire[:n])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("writer_first", [False, True], ids=["reader-first", "writer-first"])
@pytest.mark.parametrize("cut", ["none", "in-header", "in-body", "whole"])
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_writer_killed_inside_a_write(
    writer_core: str,
    reader_core: str,
    cut: str,
    writer_first: bool,
    forked: Forked,
    opened: list[Any],
) -> None:
    """Where such a writer stopped is known only to lie in [WR_POS, WR_TRY].
    Readers settle it once they have read every byte; writers wait for that
    rather than guess.  A frame that went out whole is delivered; one cut
    short is dropped whole; the queue goes on."""
    writer = load(writer_core).Channel()
    reader = twin(writer, reader_core)
    probe = twin(writer, "py")
    source = _core_py.Channel()
    opened += (writer, reader, probe, source)
    obj = make_payload("bytes", 300)
    source.put(obj)
    wire = os.read(source.fileno(), 1 << 16)
    assert len(wire) == _shm.wire_size(len(obj))
    n = {"none": 0, "in-header": 5, "in-body": _shm.HDR + 100, "whole": len(wire)}[cut]
    forked.wait_ok(forked.fork(lambda: _die_inside_write(probe, wire, n)))
    want = [obj, "after"] if cut == "whole" else ["after"]
    got: list[Any] = []
    if writer_first:
        t = threading.Thread(target=writer.put, args=("after", TIMEOUT), daemon=True)
        t.start()
        got += [reader.get(timeout=TIMEOUT) for _ in want]
        t.join(TIMEOUT)
        assert not t.is_alive()
    else:
        if cut == "whole":
            got.append(reader.get(timeout=TIMEOUT))
        else:
            with pytest.raises(queue.Empty):
                reader.get(timeout=SHORT)
        writer.put("after", timeout=TIMEOUT)
        got.append(reader.get(timeout=TIMEOUT))
    assert got == want
    assert reader.qsize() == 0 and pipe_bytes(reader) == 0
    later = ["again", make_payload("bytes", CHUNK + 1)]
    assert roundtrip(writer, reader, later) == later


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("writer_first", [False, True], ids=["reader-first", "writer-first"])
@pytest.mark.parametrize("cut", ["none", "whole"])
@pytest.mark.parametrize("batch", ["get", "get_many"])
@pytest.mark.parametrize("writer_core,reader_core", PAIRS)
def test_writer_killed_inside_a_group_write(
    writer_core: str,
    reader_core: str,
    batch: str,
    cut: str,
    writer_first: bool,
    forked: Forked,
    opened: list[Any],
) -> None:
    """The same for a put_many() writer killed inside the one write of a
    group of small frames, which the pipe takes whole or not at all: its
    frames are all delivered, or none is and the count of items drops back;
    the queue goes on, in both cores."""
    writer = load(writer_core).Channel()
    reader = twin(writer, reader_core)
    probe = twin(writer, "py")
    source = _core_c.Channel()  # the compiled core writes groups
    opened += (writer, reader, probe, source)
    items = [1, "two", b"three"]
    source.put_many(items)
    wire = os.read(source.fileno(), 1 << 16)
    assert wire[3] & _shm.FLAG_GROUP and len(wire) < select.PIPE_BUF
    n = {"none": 0, "whole": len(wire)}[cut]
    forked.wait_ok(forked.fork(lambda: _die_inside_write(probe, wire, n, len(items))))
    assert reader.qsize() == len(items)
    want = [*items, "after"] if cut == "whole" else ["after"]

    def take(k: int) -> list[Any]:
        if batch == "get":
            return [reader.get(timeout=TIMEOUT) for _ in range(k)]
        got: list[Any] = []
        while len(got) < k:
            got += reader.get_many(k - len(got), timeout=TIMEOUT)
        return got

    got: list[Any] = []
    if writer_first:
        t = threading.Thread(target=writer.put, args=("after", TIMEOUT), daemon=True)
        t.start()
        got += take(len(want))
        t.join(TIMEOUT)
        assert not t.is_alive()
    else:
        if cut == "whole":
            got += take(len(items))
        else:
            with pytest.raises(queue.Empty):
                reader.get(timeout=SHORT)
        writer.put("after", timeout=TIMEOUT)
        got += take(1)
    assert got == want
    assert reader.qsize() == 0 and pipe_bytes(reader) == 0
    later = ["again", make_payload("bytes", CHUNK + 1)]
    assert roundtrip(writer, reader, later) == later


def _flood(ch: Any, stop: Any) -> None:
    """In a forked child: put small frames as fast as ch takes them until stop[0]."""
    while not stop[0]:
        try:
            ch.put_many([b"x" * 2000] * 50, timeout=0.5)
        except queue.Full:
            pass


def _drain(ch: Any, stop: Any) -> None:
    """In a forked child: get slowly, so that the flood keeps the pipe nearly full."""
    while not stop[0]:
        try:
            ch.get_many(200, timeout=0.1)
        except queue.Empty:
            pass
        time.sleep(0.0005)


@pytest.mark.parametrize("share", [4, 2, 1.02], ids=["quarter", "half", "nearly-all"])
def test_frame_that_fits_is_not_starved_by_smaller_ones(
    new: Callable[..., Any], share: float, forked: Forked
) -> None:
    """A frame that fits in the pipe is begun only once it fits whole.  With
    other writers keeping the pipe nearly full it would wait for ever, the
    room it waited for taken each time by smaller frames; once that has
    happened it waits for the room holding the write lock, and goes in."""
    ch = new()
    stop = multiprocessing.Array("q", 1, lock=False)  # shared with forked children
    pids = [forked.fork(lambda: _flood(ch, stop)), forked.fork(lambda: _drain(ch, stop))]
    try:
        wait_until(lambda: pipe_bytes(ch) > ch.capacity // 2, "the flood filled the pipe")
        big = b"y" * (int(ch.capacity / share) - 64)  # its frame fits in the pipe
        for _ in range(3):
            ch.put(big, timeout=TIMEOUT)
    finally:
        stop[0] = 1
    for pid in pids:
        forked.wait_ok(pid)


@pytest.mark.pipe_only
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
@pytest.mark.parametrize("end", ["drained", "killed"])
def test_writer_waiting_for_room_holds_the_lock(
    new: Callable[..., Any], end: str, forked: Forked
) -> None:
    """A writer whose frame fits in the pipe waits for its room holding the
    write lock.  put(timeout=0) of a small frame, which has room, does not
    wait for such a holder (it would for one writing); and a holder killed
    in that wait leaves the queue working, nothing of its frame sent."""
    ch = new()
    probe = twin(ch, "py")  # reads the shared page's counters
    item = make_payload("bytes", 4000)
    while pipe_bytes(ch) < ch.capacity - 100_000:
        ch.put(item, timeout=TIMEOUT)
    n = ch.qsize()
    big = make_payload("bytes", 200_000)
    writer = forked.fork(lambda: ch.put(big, timeout=CHILD_TIMEOUT))
    try:
        wait_until(lambda: probe._wr_hold.value != 0, "the writer waits for room")
        start = time.monotonic()
        with pytest.raises(queue.Full):
            ch.put("small", 0)
        assert time.monotonic() - start < 1.5  # the lock's grace is 5 s
        if end == "killed":
            os.kill(writer, signal.SIGKILL)
            os.waitpid(writer, 0)
            forked.pids.discard(writer)
    finally:
        probe.close()
    got = [ch.get(timeout=TIMEOUT) for _ in range(n)]
    assert got == [item] * n
    if end == "drained":
        assert ch.get(timeout=TIMEOUT) == big
        forked.wait_ok(writer)
    ch.put("after", timeout=TIMEOUT)
    assert ch.get(timeout=TIMEOUT) == "after"
    assert ch.qsize() == 0 and pipe_bytes(ch) == 0


def _hold_write_lock(ch: Any, held: threading.Event, seconds: float) -> threading.Thread:
    """A thread that holds ch's write lock (through a pure-core twin) for a while."""
    probe = twin(ch, "py")

    def hold() -> None:
        assert probe._lock(probe._wlock, -1) == 0
        held.set()
        time.sleep(seconds)
        _core_py._unlock(probe._wlock)
        probe.close()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(TIMEOUT)
    return t


def test_nonblocking_put_waits_for_a_busy_write_lock(new: Callable[..., Any]) -> None:
    """Another writer holding the lock is not a full queue: put(timeout=0),
    which put_nowait() becomes, waits for it as the stdlib's does for its own
    lock (logging's QueueHandler relies on put_nowait)."""
    ch = new()
    t = _hold_write_lock(ch, threading.Event(), 0.3)
    ch.put("x", 0)
    t.join(TIMEOUT)
    assert ch.get(timeout=TIMEOUT) == "x"


def test_nonblocking_put_on_a_full_pipe_fails_fast(new: Callable[..., Any]) -> None:
    """With no room for the frame, a busy lock does not make put(timeout=0) wait."""
    ch = new()
    # Frames of exactly one page fill a Linux pipe to the byte.
    item = make_payload("bytes", select.PIPE_BUF - _shm.wire_size(0))
    while True:
        try:
            ch.put(item, 0)
        except queue.Full:
            break
    t = _hold_write_lock(ch, threading.Event(), 2.0)
    start = time.monotonic()
    with pytest.raises(queue.Full):
        ch.put(item, 0)
    assert time.monotonic() - start < 1.5
    t.join(TIMEOUT)
