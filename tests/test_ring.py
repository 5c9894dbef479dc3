"""The ring: a frame's large part (its out-of-band buffers, or raw bytes) in
shared memory beside the pipe, with the pipe carrying the rest of the frame.

Both cores, and each reading what the other wrote.  These tests look at the
shared page through a pure-core twin of the channel under test.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import workers
from core_workers import load, twin
from workers import TIMEOUT, make_payload

import pipeq
from pipeq import _core_py, _shm
from pipeq._errors import StreamError

np = pytest.importorskip("numpy")

PAIRS = [("c", "c"), ("c", "py"), ("py", "c"), ("py", "py")]
KIB = 1024
SMALL_RING = 256 * KIB  # frames of up to 64 KiB use it


@pytest.fixture
def channels() -> Iterator[Callable[..., Any]]:
    """make(writer_core, reader_core[, ring]) -> (writer, reader, page): a
    channel of writer_core with `ring` bytes of ring (the default size, also
    when the suite runs with PIPEQ_RING_SIZE=0), a twin of it in reader_core,
    and a pure twin for reading the page."""
    made: list[Any] = []

    def make(wcore: str, rcore: str, ring: int = _shm.RING_SIZE) -> tuple[Any, Any, Any]:
        mp = pytest.MonkeyPatch()
        try:
            mp.setenv("PIPEQ_RING_SIZE", str(ring))
            writer = load(wcore).Channel(0)
        finally:
            mp.undo()
        reader = twin(writer, rcore)
        page = twin(writer, "py")
        made.extend((writer, reader, page))
        return writer, reader, page

    yield make
    for ch in made:
        ch.close()


def head(page: Any) -> int:
    return int(page._ring_head.value)


def tail(page: Any) -> int:
    return int(page._ring_tail.value)


def pipe_bytes(ch: Any) -> int:
    return _core_py._fionread(ch.fileno())


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def large_items() -> list[Any]:
    """Items whose large part goes through the ring, of every kind."""
    return [
        make_payload("bytes", 16 * KIB),  # the least that uses the ring
        make_payload("bytes", 1 << 20),
        bytearray(make_payload("bytes", 100 * KIB)),
        np.arange(200_000, dtype=np.float64),
        np.arange(30_000, dtype=np.int32).reshape(100, 300),
        {"a": np.ones(5000), "b": np.zeros(20_000, dtype=np.int8), "c": "text"},
        [np.zeros(4096, dtype=np.uint8), np.full(20_000, 7, dtype=np.int16)],
    ]


# -- what goes where


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_large_items_go_through_the_ring(channels: Any, wcore: str, rcore: str) -> None:
    writer, reader, page = channels(wcore, rcore)
    for item in large_items():
        writer.put(item, timeout=TIMEOUT)
        # The ring was empty, so this frame's data start at 0.
        assert head(page) >= _shm.RING_MIN, "nothing went into the ring"
        # Only the frame's small part is in the pipe.
        assert pipe_bytes(writer) < 8 * KIB  # the pickle, with small arrays in band
        got = reader.get(timeout=TIMEOUT)
        assert same(got, item)
        assert tail(page) == head(page)


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_small_items_and_in_band_pickles_stay_in_the_pipe(
    channels: Any, wcore: str, rcore: str
) -> None:
    writer, reader, page = channels(wcore, rcore)
    items = [
        make_payload("bytes", 16 * KIB - 1),
        np.arange(100),
        "x" * 100_000,  # a str pickles in band
        list(range(20_000)),
    ]
    for item in items:
        writer.put(item, timeout=TIMEOUT)
        assert head(page) == 0
        assert same(reader.get(timeout=TIMEOUT), item)


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_larger_than_a_quarter_of_the_ring_goes_through_the_pipe(
    channels: Any, wcore: str, rcore: str
) -> None:
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    fits = make_payload("bytes", SMALL_RING // _shm.RING_SHARE)
    over = make_payload("bytes", SMALL_RING // _shm.RING_SHARE + 1)
    writer.put(fits, timeout=TIMEOUT)
    assert head(page) == len(fits)
    writer.put(over, timeout=TIMEOUT)
    assert head(page) == len(fits)
    assert pipe_bytes(writer) > len(over)
    assert reader.get(timeout=TIMEOUT) == fits
    assert reader.get(timeout=TIMEOUT) == over


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_a_full_ring_sends_through_the_pipe_in_order(channels: Any, wcore: str, rcore: str) -> None:
    """No room in the ring is no reason to wait: the frame goes through the
    pipe, and the order of frames is the order of puts."""
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    items = [make_payload("bytes", 60 * KIB + i) for i in range(8)]
    for item in items:
        writer.put(item, timeout=TIMEOUT)
    # Four fit in the ring; the rest went whole into the pipe.
    assert head(page) == sum(len(x) for x in items[:4])
    assert pipe_bytes(writer) > sum(len(x) for x in items[4:])
    assert [reader.get(timeout=TIMEOUT) for _ in items] == items
    assert tail(page) == head(page)


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_ring_wraps_and_starts_again_when_empty(channels: Any, wcore: str, rcore: str) -> None:
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    size = 50 * KIB
    # A reader one behind: the ring is never empty, so positions go on
    # round it, and a frame that would cross its end starts at 0 instead.
    items = [make_payload("bytes", size + i) for i in range(40)]
    writer.put(items[0], timeout=TIMEOUT)
    positions = []
    for i, item in enumerate(items[1:], 1):
        writer.put(item, timeout=TIMEOUT)
        positions.append(head(page) - len(item))
        assert reader.get(timeout=TIMEOUT) == items[i - 1]
    assert reader.get(timeout=TIMEOUT) == items[-1]
    assert max(positions) > 2 * SMALL_RING, "the ring was not gone round"
    assert all(p % SMALL_RING + size < SMALL_RING for p in positions)
    # Empty now: the next frame goes at 0.
    assert tail(page) == head(page)
    writer.put(items[0], timeout=TIMEOUT)
    assert head(page) == len(items[0])
    assert reader.get(timeout=TIMEOUT) == items[0]


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_items_up_to_a_lap_stay_in_the_first_lap(channels: Any, wcore: str, rcore: str) -> None:
    """A producer ahead of its consumer goes round the first RING_LAP bytes
    of the ring, not the whole ring; an item larger than RING_LAP takes the
    ring as it comes."""
    writer, reader, page = channels(wcore, rcore)
    lap = _shm.RING_LAP
    items = [make_payload("bytes", 700 * KIB + i) for i in range(30)]
    behind = 3
    offsets = []
    for i, item in enumerate(items):
        writer.put(item, timeout=TIMEOUT)
        offsets.append((head(page) - len(item)) % page._ring_size)
        if i >= behind:
            assert reader.get(timeout=TIMEOUT) == items[i - behind]
    for item in items[-behind:]:
        assert reader.get(timeout=TIMEOUT) == item
    assert all(o + 700 * KIB + 30 <= lap for o in offsets), offsets
    assert len(set(offsets)) > 5
    big = [make_payload("bytes", lap + KIB + i) for i in range(3)]
    for item in big:
        writer.put(item, timeout=TIMEOUT)
    assert head(page) == sum(len(x) for x in big)  # one after another from 0
    assert [reader.get(timeout=TIMEOUT) for _ in big] == big


@pytest.mark.parametrize("core", ["c", "py"])
def test_consumers_that_keep_up_use_few_ring_pages(channels: Any, core: str) -> None:
    """The ring starts again at 0 whenever it is empty, so moving many large
    items one at a time touches (and costs the memory of) only a few pages."""
    writer, reader, page = channels(core, core)
    item = np.arange(1 << 17, dtype=np.int64)  # 1 MiB
    for _ in range(100):
        writer.put(item, timeout=TIMEOUT)
        assert np.array_equal(reader.get(timeout=TIMEOUT), item)
    shm_fd = writer.__reduce__()[1][2].detach()
    try:
        used = os.fstat(shm_fd).st_blocks * 512
    finally:
        os.close(shm_fd)
    assert used <= _shm.SHM_SIZE + item.nbytes + 64 * KIB


# -- queue behaviour on top


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_put_many_and_get_many_mix_ring_and_pipe_frames(
    channels: Any, wcore: str, rcore: str
) -> None:
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    items: list[Any] = []
    for i in range(15):  # about 660 KiB: what the pipe and ring hold
        items += [i, make_payload("bytes", 20 * KIB + i), np.full(3000 + i, i), "s" * i]
    writer.put_many(items, timeout=TIMEOUT)
    got: list[Any] = []
    while len(got) < len(items):
        got += reader.get_many(1000, timeout=TIMEOUT)
    assert len(got) == len(items)
    assert all(same(a, b) for a, b in zip(got, items, strict=True))
    assert tail(page) == head(page)


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_get_many_stops_after_a_batch_of_ring_bytes(channels: Any, wcore: str, rcore: str) -> None:
    """get_many() holds no more than about BATCH_BYTES of fresh buffers at
    once, counting what it copied out of the ring."""
    writer, reader, _ = channels(wcore, rcore)
    items = [make_payload("bytes", 40 * KIB) for _ in range(6)]
    for item in items:
        writer.put(item, timeout=TIMEOUT)
    first = reader.get_many(100, timeout=TIMEOUT)
    assert 1 <= len(first) <= 2
    rest: list[Any] = []
    while len(first) + len(rest) < len(items):
        rest += reader.get_many(100, timeout=TIMEOUT)
    assert first + rest == items


def test_queue_of_processes_moves_arrays_through_the_ring(ctx: Any, children: Any) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        p = children.start(ctx, workers.put_arrays, q, 50, 1 << 16)
        for i in range(50):
            a = q.get(timeout=TIMEOUT)
            assert a.shape == (1 << 16,) and a[0] == i and a[-1] == i
        children.join_ok(p)
    finally:
        q.close()


# -- faults


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_put_that_times_out_takes_its_ring_data_back(channels: Any, wcore: str, rcore: str) -> None:
    writer, reader, page = channels(wcore, rcore)
    filler = b"f" * 1000
    while True:
        try:
            writer.put(filler, timeout=0)
        except queue.Full:
            break
    h = head(page)
    with pytest.raises(queue.Full):
        writer.put(make_payload("bytes", 64 * KIB), timeout=0.05)
    assert head(page) == h
    # The queue goes on: drain, then a ring frame passes.
    while pipe_bytes(reader):
        assert reader.get(timeout=TIMEOUT) == filler
    item = make_payload("bytes", 64 * KIB)
    writer.put(item, timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == item


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_gap_left_by_a_killed_writer_is_freed(channels: Any, wcore: str, rcore: str) -> None:
    """A writer killed after moving RING_HEAD and before its frame went into
    the pipe leaves a gap in the ring that no frame refers to; the next ring
    frame read frees it, and the ring starts again at 0."""
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    page._ring_head.value = 40 * KIB  # what such a writer leaves
    item = make_payload("bytes", 30 * KIB)
    writer.put(item, timeout=TIMEOUT)
    assert head(page) == 70 * KIB
    assert reader.get(timeout=TIMEOUT) == item
    assert tail(page) == head(page)
    writer.put(item, timeout=TIMEOUT)
    assert head(page) == len(item)
    assert reader.get(timeout=TIMEOUT) == item


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_tail_left_by_a_killed_reader_is_caught_up(channels: Any, wcore: str, rcore: str) -> None:
    """A reader killed while it copied a frame out of the ring never moved
    RING_TAIL past it: the ring holds that region until the next ring frame
    is read, and nothing is overwritten meanwhile."""
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    a, b = make_payload("bytes", 60 * KIB), make_payload("bytes", 50 * KIB)
    writer.put(a, timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == a
    page._ring_tail.value = 0  # as if that reader had died in the copy
    writer.put(b, timeout=TIMEOUT)
    assert head(page) == len(a) + len(b)  # after a, not over it
    assert reader.get(timeout=TIMEOUT) == b
    assert tail(page) == head(page)


@pytest.mark.parametrize("core", ["c", "py"])
@pytest.mark.parametrize(
    "pos,length",
    [(0, 0), (1 << 40, 100), (SMALL_RING - 10, 100), (0, SMALL_RING + 1)],
    ids=["empty", "beyond-head", "across-the-end", "longer-than-the-ring"],
)
def test_bad_ring_reference_is_a_stream_error(
    channels: Any, core: str, pos: int, length: int
) -> None:
    writer, reader, page = channels(core, core, ring=SMALL_RING)
    page._ring_head.value = SMALL_RING  # every sane reference is below it
    body = _shm.RING_REF.pack(pos, length)
    hdr = _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, _shm.FLAG_RAW | _shm.FLAG_RING, 0, len(body))
    os.write(writer.writer_fileno(), hdr + body + bytes([_shm.MARK_COMMIT]))
    with pytest.raises(StreamError, match="refers to"):
        reader.get(timeout=TIMEOUT)
    writer.put("after", timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == "after"


def _ring_frame(flags: int, nbuf: int, body: bytes, marker: int) -> bytes:
    hdr = _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, flags | _shm.FLAG_RING, nbuf, len(body))
    return hdr + body + bytes([marker])


@pytest.mark.parametrize("wcore,rcore", PAIRS)
@pytest.mark.parametrize("kind", ["raw", "oob"])
def test_torn_ring_frame_is_dropped_whatever_its_reference(
    channels: Any, wcore: str, rcore: str, kind: str
) -> None:
    """A writer killed after recording a ring frame and before its first
    byte leaves the next writer to pay the frame as a torn one: its header,
    zeros for the body, the TORN marker.  Readers drop it, although its ring
    reference (all zeros) refers to nothing."""
    writer, reader, page = channels(wcore, rcore)
    if kind == "raw":
        torn = _ring_frame(_shm.FLAG_RAW, 0, bytes(_shm.RING_REF.size), _shm.MARK_TORN)
    else:
        torn = _ring_frame(_shm.FLAG_OOB, 1, bytes(_shm.RING_REF.size + 8 + 60), _shm.MARK_TORN)
    os.write(writer.writer_fileno(), torn)
    item = make_payload("bytes", 20 * KIB)
    writer.put(item, timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == item  # the torn frame dropped, silently
    assert tail(page) == head(page)


@pytest.mark.parametrize("wcore,rcore", PAIRS)
def test_ring_frame_whose_table_disagrees_is_a_stream_error(
    channels: Any, wcore: str, rcore: str
) -> None:
    writer, reader, page = channels(wcore, rcore, ring=SMALL_RING)
    page._ring_head.value = SMALL_RING
    body = _shm.RING_REF.pack(0, 100) + (50).to_bytes(8, "little") + b"\x80\x05N."
    os.write(writer.writer_fileno(), _ring_frame(_shm.FLAG_OOB, 1, body, _shm.MARK_COMMIT))
    with pytest.raises(StreamError, match="buffer table to 50"):
        reader.get(timeout=TIMEOUT)
    # A reference and table far larger than the ring: no allocation for them.
    huge = 1 << 50
    body = _shm.RING_REF.pack(0, huge) + huge.to_bytes(8, "little") + b"\x80\x05N."
    os.write(writer.writer_fileno(), _ring_frame(_shm.FLAG_OOB, 1, body, _shm.MARK_COMMIT))
    with pytest.raises(StreamError, match="refers to"):
        reader.get(timeout=TIMEOUT)
    writer.put("after", timeout=TIMEOUT)
    assert reader.get(timeout=TIMEOUT) == "after"


def test_header_check_knows_ring_frames() -> None:
    ok = _shm.header_ok
    ref = _shm.RING_REF.size
    raw, oob, ring = _shm.FLAG_RAW, _shm.FLAG_OOB, _shm.FLAG_RING
    assert ok(_shm.MAGIC, _shm.VERSION, raw | ring, 0, ref)
    assert not ok(_shm.MAGIC, _shm.VERSION, raw | ring, 0, ref + 1)
    assert ok(_shm.MAGIC, _shm.VERSION, oob | ring, 2, ref + 16 + 5)
    assert not ok(_shm.MAGIC, _shm.VERSION, oob | ring, 0, ref + 16 + 5)
    assert not ok(_shm.MAGIC, _shm.VERSION, ring, 0, ref)
    assert not ok(_shm.MAGIC, _shm.VERSION, ring | _shm.FLAG_GROUP | raw, 0, ref)


# -- the size


def test_ring_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEQ_RING_SIZE", str(SMALL_RING + 5))
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        page = twin(q._channel, "py")
        assert page._ring_size == SMALL_RING
        page.close()
    finally:
        q.close()
    monkeypatch.setenv("PIPEQ_RING_SIZE", "0")
    q = pipeq.Queue()
    try:
        page = twin(q._channel, "py")
        assert page._ring_size == 0
        page.close()
        item = make_payload("bytes", 100 * KIB)
        q.put(item, timeout=TIMEOUT)
        assert q.get(timeout=TIMEOUT) == item
    finally:
        q.close()


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_bad_ring_size_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PIPEQ_RING_SIZE", value)
    with pytest.raises(ValueError, match="PIPEQ_RING_SIZE"):
        pipeq.Queue()


def test_threads_share_the_ring(channels: Any) -> None:
    """Four producer and four consumer threads, in one process, every frame
    through the ring or (when it is full) the pipe: each item once, intact."""
    writer, reader, page = channels("c", "c", ring=SMALL_RING)
    n = 200
    got: list[bytes] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(k: int) -> None:
        try:
            for i in range(n):
                body = struct.pack("<II", k, i) * (2 * KIB + (i * 7) % 3000)
                writer.put(body, timeout=TIMEOUT)
        except BaseException as e:
            errors.append(e)

    def consume() -> None:
        try:
            for _ in range(n):
                item = reader.get(timeout=TIMEOUT)
                with lock:
                    got.append(item)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    seen = set()
    for item in got:
        k, i = struct.unpack_from("<II", item)
        assert item == struct.pack("<II", k, i) * (len(item) // 8)
        seen.add((k, i))
    assert len(seen) == len(got) == 4 * n
    assert tail(page) == head(page)
