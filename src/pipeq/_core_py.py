"""Pure-Python core of pipeq: the compiled core's Channel, same frames, shared page and locks."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import operator
import os
import queue
import select
import struct
import sys
import termios
import time
from collections.abc import Callable, Iterable
from multiprocessing.reduction import DupFd, ForkingPickler
from pickle import PickleBuffer, loads
from typing import Any, Literal, NoReturn, Protocol

from pipeq import _shm
from pipeq._errors import (
    STALL_WARNING_S,
    BatchFull,
    StreamError,
    attach_messages,
    raise_errno,
    stall_ns,
    warn_stalled,
)

# The wire format and the shared page are _shm's; what follows is how this
# process drives them, and mirrors _core_c.pyx name for name.
HDR = _shm.HDR
CHUNK = _shm.CHUNK
PIPE_BUF = select.PIPE_BUF
IOV_CAP = 1024  # buffers per readv/writev call; IOV_MAX is 1024 on Linux and macOS
SCRATCH = 65536
# get_many() stops once it has read this many bytes: past it, a batch saves
# nothing worth having, and holding many large fresh buffers at once costs
# page faults.
BATCH_BYTES = 65536
_MASK = _shm.BASE_PARITY - 1
U64 = (1 << 64) - 1

# Lock waits are sliced so that signal handlers run while a lock is awaited.
LOCK_SLICE_NS = 50_000_000
# A reader in the middle of a frame looks this often for an abandoned writer.
MIDFRAME_SLICE_NS = 20_000_000
# A producer waiting for room re-checks at least this often.
ROOM_SLICE_NS = 100_000_000
# join() re-checks this often even without a wake-up: a frame dropped or
# taken back can end the last task without a task_done() to wake anyone.
JOIN_SLICE_NS = 100_000_000
_U64 = (1 << 64) - 1

# _lock results besides 0; negative so that they never clash with an errno.
OWNER_DIED = -1
TIMED_OUT = -2
# _write_iov results
WRITE_TIMEOUT, WRITE_DONE, WRITE_RETRY = 0, 1, 2
DEBT_TIMEOUT, DEBT_PAID, DEBT_UNSETTLED = 0, 1, 2
# How often a writer looks again at a frame whose writer was killed inside a
# write, until the readers have settled where it stopped.
SETTLE_NAP_NS = 2_000_000
# How long past its deadline a put waits for another writer's lock while the
# pipe has room for its frame.
LOCK_GRACE_NS = 5_000_000_000
# What _begin_frame asks of _put_frame.
PUT_DONE, PUT_AGAIN, PUT_PIPE_FULL, PUT_UNSETTLED, PUT_NO_RING = 1, 2, 3, 4, 5
RING_REF = _shm.RING_REF.size
# _read_span results
SPAN_TORN, SPAN_MORE, SPAN_END = 0, 1, 2

_CONT = memoryview(bytes([_shm.MARK_CONT]))
_COMMIT = memoryview(bytes([_shm.MARK_COMMIT]))
_TORN = memoryview(bytes([_shm.MARK_TORN]))
_ZEROS = memoryview(bytes(SCRATCH))  # filler for torn chunks
_NOTHING = memoryview(bytearray())  # the destination of a span that is only a marker


# -- process-shared pthread mutexes, through ctypes.  Foreign calls release
# -- the GIL, so blocking in them stalls no other thread.

LINUX = sys.platform.startswith("linux")
ROBUST = LINUX  # robust mutexes: a lock whose owner died is handed on
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_MUTEXATTR_SIZE = 64  # generous: sizeof(pthread_mutexattr_t) is 4 on Linux, 16 on macOS


def _pthread_library() -> ctypes.CDLL:
    # The interpreter's own symbols include libc; before glibc 2.34 the
    # mutex calls may live in a libpthread that it did not pull in.
    lib = ctypes.CDLL(None)
    if hasattr(lib, "pthread_mutex_trylock"):
        return lib
    return ctypes.CDLL(ctypes.util.find_library("pthread"))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _bind(lib: ctypes.CDLL, name: str, *argtypes: Any) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_lib = _pthread_library()
_vp = ctypes.c_void_p
_mutexattr_init = _bind(_lib, "pthread_mutexattr_init", _vp)
_mutexattr_setpshared = _bind(_lib, "pthread_mutexattr_setpshared", _vp, ctypes.c_int)
_mutexattr_destroy = _bind(_lib, "pthread_mutexattr_destroy", _vp)
_mutex_init = _bind(_lib, "pthread_mutex_init", _vp, _vp)
_mutex_trylock = _bind(_lib, "pthread_mutex_trylock", _vp)
_mutex_unlock = _bind(_lib, "pthread_mutex_unlock", _vp)
if ROBUST:
    _mutexattr_setrobust = _bind(_lib, "pthread_mutexattr_setrobust", _vp, ctypes.c_int)
    _mutex_consistent = _bind(_lib, "pthread_mutex_consistent", _vp)
if LINUX:
    _mutex_timedlock = _bind(_lib, "pthread_mutex_timedlock", _vp, ctypes.POINTER(_Timespec))


def _mutex_create(m: int) -> int:
    """Initialise a process-shared (and, on Linux, robust) mutex at address m: 0 or an errno."""
    attr = ctypes.create_string_buffer(_MUTEXATTR_SIZE)
    rc: int = _mutexattr_init(attr)
    if rc:
        return rc
    rc = _mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED)
    if not rc and ROBUST:
        rc = _mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST)
    if not rc:
        rc = _mutex_init(m, attr)
    _mutexattr_destroy(attr)
    return rc


def _settle(m: int, rc: int) -> int:
    """0: locked; OWNER_DIED: locked, and its last owner died holding it (the
    mutex is made consistent again; the caller repairs what it guarded);
    EBUSY / ETIMEDOUT: not locked; anything else: an errno value."""
    if ROBUST and rc == errno.EOWNERDEAD:
        _mutex_consistent(m)
        return OWNER_DIED
    return rc


def _trylock(m: int) -> int:
    return _settle(m, _mutex_trylock(m))


def _waitlock(m: int, ns: int) -> int:
    """Wait at most ns for the mutex; _settle's results."""
    if LINUX:
        sec, nsec = divmod(time.time_ns() + ns, 1_000_000_000)  # CLOCK_REALTIME
        return _settle(m, _mutex_timedlock(m, ctypes.byref(_Timespec(sec, nsec))))
    # No timed lock here (macOS): try, then sleep, backing off to 1 ms.
    end = time.monotonic_ns() + ns
    nap = 20_000
    while True:
        rc = _trylock(m)
        if rc != errno.EBUSY:
            return rc
        left = end - time.monotonic_ns()
        if left <= 0:
            return errno.ETIMEDOUT
        time.sleep(min(nap, left) / 1e9)
        nap = min(nap * 2, 1_000_000)


def _unlock(m: int) -> None:
    _mutex_unlock(m)


def _unlock_if_mine(m: int) -> None:
    """Release m if this thread holds it.  For a lock call cut short by a
    signal handler that raised just after the mutex was taken, before the
    caller could know: a robust mutex (Linux) refuses an unlock by any other
    thread (EPERM), so trying is safe.  Elsewhere nothing can tell."""
    if ROBUST:
        _mutex_unlock(m)


# -- small helpers


def _raise_errno(err: int) -> NoReturn:
    raise_errno(err)


def _deadline(timeout: float | None) -> int:
    """-1 for no deadline; otherwise monotonic ns (negative timeouts mean 0)."""
    if timeout is None:
        return -1
    if isinstance(timeout, (str, bytes, bytearray)):
        # float() would parse these; the compiled core takes numbers only.
        raise TypeError(f"must be real number, not {type(timeout).__name__}")
    t = float(timeout)
    if t <= 0:
        return time.monotonic_ns()
    if t > 1e9:  # beyond 30 years: as good as forever
        return -1
    return time.monotonic_ns() + int(t * 1e9)


def _signed(v: int) -> int:
    """A u64 difference read as an i64."""
    v &= U64
    return v - (1 << 64) if v >> 63 else v


def _next_mark(pos: int, length: int) -> int:
    """Wire offset of the first marker at or after wire offset pos >= HDR."""
    k = (pos - HDR) // (CHUNK + 1)
    return HDR + k * (CHUNK + 1) + min(length - k * CHUNK, CHUNK)


def _body_done(pos: int) -> int:
    """Body bytes before wire offset pos >= HDR (markers are not body)."""
    return (pos - HDR) - (pos - HDR) // (CHUNK + 1)


def _next_base(base: int, pos: int) -> int:
    """WR_BASE or RD_BASE moved past a frame of pos wire bytes, its parity flipped."""
    return ((base + pos) & (_shm.BASE_PARITY - 1)) | (~base & _shm.BASE_PARITY)


def _parity(base: int, count: int) -> bool:
    """Whether a BASE belongs to the frame that PUTS or GETS (count) counts."""
    return bool(base & _shm.BASE_PARITY) == bool(count & 1)


def _advance(iov: list[memoryview], i: int, n: int) -> int:
    """Consume n bytes from iov[i:], return the index of the first entry
    with bytes left."""
    while n > 0:
        if n >= len(iov[i]):
            n -= len(iov[i])
            i += 1
        else:
            iov[i] = iov[i][n:]
            n = 0
    while i < len(iov) and not len(iov[i]):
        i += 1
    return i


def _head(part: list[memoryview], limit: int) -> list[memoryview]:
    """The first `limit` bytes of part (all of it if it is shorter)."""
    total = 0
    for k, v in enumerate(part):
        total += len(v)
        if total > limit:
            return [*part[:k], v[: len(v) - (total - limit)]]
    return part


def _fionread(fd: int) -> int:
    """Bytes waiting in the pipe, or -1."""
    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return -1
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _nap(ns: int, deadline: int) -> bool:
    """Sleep ns, or until the deadline if sooner; False if it has passed."""
    if deadline >= 0:
        left = deadline - time.monotonic_ns()
        if left <= 0:
            return False
        ns = min(ns, left)
    time.sleep(ns / 1e9)
    return True


def _wait_fd(fd: int, events: int, deadline: int) -> bool:
    """True when fd is ready, False when the deadline passed first.  poll()
    runs the signal handlers on EINTR and retries (PEP 475)."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        ms: int | None = None
        if deadline >= 0:
            left = deadline - time.monotonic_ns()
            ms = 0 if left <= 0 else min((left + 999_999) // 1_000_000, 0x7FFFFFFF)
        if poller.poll(ms):
            return True
        if deadline >= 0 and time.monotonic_ns() >= deadline:
            return False


def _frame_iov(hdr: bytes, segs: list[memoryview]) -> list[memoryview]:
    """The header, the body segments cut at every CHUNK bytes by a CONT
    marker, and the COMMIT marker."""
    iov = [memoryview(hdr)]
    filled = 0
    for seg in segs:
        while len(seg):
            if filled == CHUNK:
                iov.append(_CONT)
                filled = 0
            take = min(CHUNK - filled, len(seg))
            iov.append(seg[:take])
            seg = seg[take:]
            filled += take
    iov.append(_COMMIT)
    return iov


# A frame as _encode makes it: header, buffers and wire size, and for a frame
# whose large part may go through the ring, that frame too (_RingFrame).
_Encoded = tuple[bytes, list[memoryview], int, "_RingFrame | None"]
# A ring frame: header, buffers and wire size; then what goes into the ring,
# its length, and the ring reference that _ring_put fills in, one of the
# frame's buffers.
_RingFrame = tuple[bytes, list[memoryview], int, list[memoryview], int, bytearray]


def _encode(obj: object, ring_max: int) -> _Encoded:
    """obj as a frame: (header, the frame's buffers, its wire size, and the
    ring frame to try first, if its large part is between RING_MIN and
    ring_max bytes)."""
    flags = nbuf = 0
    if type(obj) is bytes:
        flags = _shm.FLAG_RAW
        segs = [memoryview(obj)]
        large = segs
    else:
        obj = _shm.as_buffer(obj)
        # The pickler's file keeps what it writes.  (Not a BytesIO read back
        # by getbuffer(): on CPython 3.12.1, such a view in a reference cycle,
        # as a traceback makes, can crash the garbage collector.)
        sink = _ListSink()
        collector = _OOBCollector()
        # ForkingPickler(file, protocol, fix_imports, buffer_callback)
        ForkingPickler(sink, 5, True, collector).dump(obj)
        chunks = sink.chunks
        segs = [memoryview(chunks[0] if len(chunks) == 1 else b"".join(chunks))]
        large = []
        if collector.views:
            # Body: u64 length table, pickle, out-of-band buffers.
            flags = _shm.FLAG_OOB
            nbuf = len(collector.views)
            table = b"".join(v.nbytes.to_bytes(8, "little") for v in collector.views)
            large = collector.views
            segs = [memoryview(table), segs[0], *large]
    length = sum(len(s) for s in segs)
    hdr = _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, flags, nbuf, length)
    ring = None
    rlen = sum(v.nbytes for v in large)
    if _shm.RING_MIN <= rlen <= ring_max:
        ref = bytearray(RING_REF)
        rsegs = [memoryview(ref), *segs[: len(segs) - len(large)]]
        rlength = length - rlen + RING_REF
        rhdr = _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, flags | _shm.FLAG_RING, nbuf, rlength)
        ring = (rhdr, _frame_iov(rhdr, rsegs), _shm.wire_size(rlength), large, rlen, ref)
    return hdr, _frame_iov(hdr, segs), _shm.wire_size(length), ring


class _ListSink:
    """A file for the pickler: keeps the chunks it is given."""

    __slots__ = ("chunks", "write")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.write = self.chunks.append


class _OOBCollector:
    """pickle buffer_callback: large contiguous buffers go out of band."""

    def __init__(self) -> None:
        self.views: list[memoryview] = []

    def __call__(self, pb: PickleBuffer) -> bool:
        try:
            view = pb.raw()
        except BufferError:
            return True  # not contiguous: let pickle copy it in band
        if view.nbytes < _shm.OOB_MIN:
            return True
        self.views.append(view)
        return False


_Frame = tuple[bytes | bytearray, list[bytearray] | tuple[()] | None]


class Channel:
    """One pipe, two process-shared locks and a page of shared state.

    A writer holds the write lock for exactly one frame; a reader holds the
    read lock for exactly one frame and waits for data without it.  Both pipe
    ends are non-blocking: every wait is a poll(), so timeouts bound the wait
    and signal handlers run during it.

    Where the compiled core can be cut short only at chosen points, Python
    code can be by a signal handler that raises, between any two bytecodes.
    So every syscall is followed at once by the shared counter that accounts
    for it, and every lock taken at once by the try that releases it: what
    the compiled core keeps a few instructions wide is a few bytecodes here.
    """

    __slots__ = (
        "_rfd", "_wfd", "_shmfd", "_nrfd", "_nwfd", "_jrfd", "_jwfd", "_maxsize",
        "_capacity", "_closed", "_mm", "_page", "_wlock", "_rlock", "_tlock", "_puts",
        "_gets", "_wr_pos", "_wr_end", "_wr_try", "_waiters", "_rd_pos", "_rd_hdr",
        "_marker", "_lost", "_done", "_joiners", "_stall_ns", "_wr_base", "_rd_try", "_rd_base",
        "_wr_cnt", "_rd_cnt", "_wr_hold", "_ring", "_ring_size", "_ring_max", "_ring_head",
        "_ring_tail", "_ring_got",
    )  # fmt: skip

    def __init__(self, maxsize: int = 0, joinable: bool = False) -> None:
        maxsize = max(_ssize(maxsize), 0)
        self._attach(_shm.create(maxsize, bool(joinable)), maxsize, True)

    def _attach(self, fds: tuple[int, ...], maxsize: int, fresh: bool) -> None:
        (self._rfd, self._wfd, self._shmfd, self._nrfd, self._nwfd,
         self._jrfd, self._jwfd) = fds  # fmt: skip
        s = self._shmfd
        self._closed = False  # from here on the fds are ours to close
        self._maxsize = maxsize
        # A put waiting this long for pipe room warns; -1: never.
        self._stall_ns = stall_ns(STALL_WARNING_S)
        # The page stays mapped until the Channel is collected, so the
        # counters can be read after close(), as the stdlib's semaphore can.
        ring = _shm.attached_ring_size(s)
        self._mm = mmap.mmap(s, _shm.RING_OFFSET + ring)
        self._page = memoryview(self._mm)
        # The ring (see _shm.O_RING_HEAD), mapped with the page.
        self._ring = self._page[_shm.RING_OFFSET :]
        self._ring_size = ring
        self._ring_max = ring // _shm.RING_SHARE
        self._ring_got = 0  # ring bytes read; under the read lock
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))
        self._wlock = base + _shm.O_WLOCK
        self._rlock = base + _shm.O_RLOCK
        self._tlock = base + _shm.O_TLOCK
        # Aligned native u64s: one load or store each, as the compiled core's.
        self._puts = ctypes.c_uint64.from_buffer(self._mm, _shm.O_PUTS)
        self._gets = ctypes.c_uint64.from_buffer(self._mm, _shm.O_GETS)
        self._wr_pos = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_POS)
        self._wr_end = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_END)
        self._wr_try = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_TRY)
        self._waiters = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WAITERS)
        self._rd_pos = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RD_POS)
        self._wr_base = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_BASE)
        self._rd_try = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RD_TRY)
        self._rd_base = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RD_BASE)
        self._lost = ctypes.c_uint64.from_buffer(self._mm, _shm.O_LOST)
        self._done = ctypes.c_uint64.from_buffer(self._mm, _shm.O_DONE)
        self._joiners = ctypes.c_uint64.from_buffer(self._mm, _shm.O_JOINERS)
        self._wr_cnt = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_CNT)
        self._wr_hold = ctypes.c_uint64.from_buffer(self._mm, _shm.O_WR_HOLD)
        self._rd_cnt = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RD_CNT)
        self._ring_head = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RING_HEAD)
        self._ring_tail = ctypes.c_uint64.from_buffer(self._mm, _shm.O_RING_TAIL)
        self._rd_hdr = self._page[_shm.O_RD_HDR : _shm.O_RD_HDR + HDR]
        self._marker = bytearray(1)  # used only under the read lock
        if fresh:
            for m in (self._wlock, self._rlock, self._tlock):
                rc = _mutex_create(m)
                if rc:
                    _raise_errno(rc)
            _shm.init_header(s, maxsize)
        self._capacity = _shm.pipe_capacity(self._wfd)

    def __reduce__(self) -> tuple[Callable[..., Channel], tuple[Any, ...]]:
        # Only meaningful while a child process is being started: DupFd hands
        # each fd to the new process.  The queue wrapper enforces that.
        self._check()
        fds = [DupFd(fd) if fd >= 0 else None for fd in self._fds()]
        return _rebuild, (*fds, self._maxsize, self._stall_ns)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._close_fds()

    def _fds(self) -> tuple[int, ...]:
        return (self._rfd, self._wfd, self._shmfd, self._nrfd, self._nwfd,
                self._jrfd, self._jwfd)  # fmt: skip

    def _close_fds(self) -> None:
        for fd in self._fds():
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = self._shmfd = self._nrfd = self._nwfd = -1
        self._jrfd = self._jwfd = -1

    def close(self) -> None:
        """Close this process's fds; the shared page stays mapped until GC."""
        if not self._closed:
            self._closed = True
            self._close_fds()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def joinable(self) -> bool:
        return self._jrfd >= 0

    @property
    def stall_warning(self) -> float | None:
        """Seconds a put() waits for room in a full pipe before it warns
        (PipeFullWarning), or None for never."""
        return None if self._stall_ns < 0 else self._stall_ns / 1e9

    @stall_warning.setter
    def stall_warning(self, seconds: float | None) -> None:
        self._stall_ns = stall_ns(seconds)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def capacity(self) -> int:
        return self._capacity

    def fileno(self) -> int:
        """The read end of the pipe, for poll/select-style waiting."""
        self._check()
        return self._rfd

    def writer_fileno(self) -> int:
        self._check()
        return self._wfd

    def _check(self) -> None:
        if self._closed:
            raise ValueError("channel is closed")

    # -- counters ---------------------------------------------------------

    def _count(self) -> int:
        return _signed(self._puts.value - self._gets.value)

    def qsize(self) -> int:
        """Frames in the pipe, counting one being written."""
        return max(self._count(), 0)

    def full(self) -> bool:
        return self._maxsize > 0 and self._count() >= self._maxsize

    def empty(self) -> bool:
        return self._count() <= 0

    # -- waiting ----------------------------------------------------------

    def _lock(self, m: int, deadline: int) -> int:
        """0 or OWNER_DIED once locked (the latter: its last owner died
        holding it); TIMED_OUT if the deadline passed first."""
        rc = _trylock(m)
        while True:
            if rc == 0 or rc == OWNER_DIED:
                return rc
            if rc != errno.EBUSY and rc != errno.ETIMEDOUT:
                _raise_errno(rc)
            # Between slices the interpreter runs any pending signal handler.
            ns = LOCK_SLICE_NS
            if deadline >= 0:
                left = deadline - time.monotonic_ns()
                if left <= 0:
                    return TIMED_OUT
                ns = min(ns, left)
            rc = _waitlock(m, ns)

    # -- writing ----------------------------------------------------------

    def put(self, obj: object, timeout: float | None = None) -> None:
        """Write obj as one frame.  Raises queue.Full when the deadline passes
        before the frame could be written whole."""
        self._check()
        deadline = _deadline(timeout)
        # Pickle before taking any lock: a failure leaves the queue untouched.
        self._put_encoded(_encode(obj, self._ring_max), deadline)

    def _put_encoded(self, frame: _Encoded, deadline: int) -> None:
        """Write a frame from _encode: its ring frame if the ring has room
        for it, else the frame itself, through the pipe."""
        hdr, iov, total, ring = frame
        if ring is not None and self._put_frame(*ring[:3], deadline, ring):
            return
        self._put_frame(hdr, iov, total, deadline)

    def put_many(self, objs: Iterable[object], timeout: float | None = None) -> None:
        """Write every object of objs, in order, each as its own frame.  All
        are pickled before the first is written, so a pickling error leaves
        the queue untouched.  Raises BatchFull (a queue.Full) when the
        deadline passes first, saying how many went in.  (The compiled core
        sends runs of small frames by one write; this one writes each.)"""
        self._check()
        deadline = _deadline(timeout)
        frames = [_encode(obj, self._ring_max) for obj in objs]
        done = 0
        try:
            for frame in frames:
                self._put_encoded(frame, deadline)
                done += 1
        except queue.Full:
            raise BatchFull(done, len(frames)) from None
        except BaseException as exc:
            if done and hasattr(exc, "add_note"):
                exc.add_note(f"pipeq: put_many() had put {done} of {len(frames)} items, in order")
            raise

    def _put_frame(
        self,
        hdr: bytes,
        iov: list[memoryview],
        total: int,
        deadline: int,
        ring: _RingFrame | None = None,
    ) -> bool:
        """Write one frame; for a ring frame, ring.  True once written; False
        when the ring has no room for a ring frame."""
        # A frame that fits in the pipe is begun only once it fits whole, so a
        # timeout never cuts it; only a frame larger than the pipe is streamed
        # (holding the write lock) and can be left unfinished.  Room for a
        # sized frame is decided, and waited for, under the write lock, by
        # _begin_frame.
        sized = PIPE_BUF < total <= self._capacity
        maxsize = self._maxsize
        while True:
            if maxsize > 0 and self._count() >= maxsize:
                if not self._wait_room(deadline):
                    raise queue.Full
                continue
            if self._lock_writer(deadline, total) == TIMED_OUT:
                raise queue.Full
            try:
                r = self._begin_frame(hdr, iov, total, sized, deadline, ring)
            finally:
                _unlock(self._wlock)
            if r == PUT_DONE:
                return True
            if r == PUT_NO_RING:
                return False
            if r == PUT_UNSETTLED:
                # A writer was killed inside a write; wait (not holding the
                # lock) for a reader to drain the pipe and settle where it
                # stopped.
                if not _nap(SETTLE_NAP_NS, deadline):
                    raise queue.Full
            elif r == PUT_PIPE_FULL:
                if not self._wait_writable(deadline):
                    raise queue.Full

    def _lock_writer(self, deadline: int, room: int) -> int:
        """Take the write lock for a put.  Another writer holds it only while
        its frame goes in, and the stdlib's put() never fails for want of its
        internal lock: so, while the pipe has `room` bytes free, keep waiting
        past the deadline (up to LOCK_GRACE_NS), which is how put_nowait()
        on a queue with room succeeds when another process is mid-put."""
        if deadline < 0:
            return self._lock(self._wlock, -1)
        while True:
            now = time.monotonic_ns()
            st = self._lock(self._wlock, deadline if deadline > now else now + LOCK_SLICE_NS)
            if st != TIMED_OUT:
                return st
            if (
                not self._has_room(room)
                or self._wr_hold.value
                or time.monotonic_ns() >= deadline + LOCK_GRACE_NS
            ):
                return TIMED_OUT

    def _begin_frame(
        self,
        hdr: bytes,
        iov: list[memoryview],
        total: int,
        sized: bool,
        deadline: int,
        ring: _RingFrame | None,
    ) -> int:
        """Holding the write lock: write the frame.  PUT_DONE, or what to
        wait for (not holding the lock) before trying again."""
        if self._wr_hold.value:
            self._wr_hold.value = 0  # left by a writer killed in that wait
        if self._wr_end.value:
            if not _parity(self._wr_base.value, self._puts.value):
                # Its writer was killed after recording the frame and before
                # counting it: its header may be in the pipe, so it counts.
                self._puts.value += self._wr_cnt.value
            r = self._pay_debt(deadline)
            if r == DEBT_TIMEOUT:
                raise queue.Full
            if r == DEBT_UNSETTLED:
                return PUT_UNSETTLED
        if self._maxsize > 0 and self._count() >= self._maxsize:
            return PUT_AGAIN  # another producer took the last slot
        if sized and not self._has_room(total):
            # Wait for the room here, holding the lock: room waited for
            # without it can be taken, each time, by smaller frames that
            # other writers keep putting.  Here they queue behind this one.
            self._wr_hold.value = total
            try:
                if not self._wait_space(total, deadline):
                    raise queue.Full
            finally:
                self._wr_hold.value = 0
        if ring is not None:
            if total <= PIPE_BUF and not self._has_room(total):
                return PUT_PIPE_FULL  # before copying into the ring for nothing
            if not self._ring_put(ring):
                return PUT_NO_RING
        # The last frame is over: its bytes join WR_BASE before WR_POS is
        # reset (skipped if a writer killed here already moved it).
        if _parity(self._wr_base.value, self._puts.value):
            self._wr_base.value = _next_base(self._wr_base.value, self._wr_pos.value)
        # Record the frame before its first byte moves, so that whoever
        # takes the lock after us can end it if we stop midway.
        self._page[_shm.O_WR_HDR : _shm.O_WR_HDR + HDR] = hdr
        self._wr_pos.value = 0
        self._wr_try.value = 0
        self._wr_cnt.value = 1
        self._wr_end.value = total
        self._puts.value += 1
        r = -1
        try:
            r = self._write_iov(iov, deadline, True)
        finally:
            if ring is not None and r != WRITE_DONE and self._wr_end.value == 0:
                # Nothing of the frame went in: nor did its ring data.
                self._ring_head.value = int.from_bytes(ring[5][:8], "little")
        if r == WRITE_DONE:
            self._wr_end.value = 0
            return PUT_DONE
        if r == WRITE_TIMEOUT:
            raise queue.Full
        # WRITE_RETRY: the pipe was full before our first byte and the frame
        # was taken back.
        return PUT_PIPE_FULL

    def _ring_put(self, ring: _RingFrame) -> bool:
        """Holding the write lock: copy a ring frame's large part into the
        ring and fill in the frame's ring reference.  False if the ring has
        no room for it."""
        srcs, n, ref = ring[3:]
        size = self._ring_size
        head, tail = self._ring_head.value, self._ring_tail.value
        if head == tail and head:
            # Every frame in the ring has been read: start again at 0, on
            # pages that are warm.  No reader touches RING_TAIL until it has
            # read a ring frame, and none is in the pipe.
            self._ring_tail.value = 0
            self._ring_head.value = 0
            head = tail = 0
        pos = head
        off = pos % size
        lap = _shm.RING_LAP
        if off + n > size or (off and n <= lap and off + n > lap):
            # Never across the end, nor past RING_LAP (see _shm.RING_LAP):
            # to the start of the next lap, which must be free.
            pos += size - off
            off = 0
        if pos + n - tail > size:
            return False
        for src in srcs:
            self._ring[off : off + src.nbytes] = src
            off += src.nbytes
        _shm.RING_REF.pack_into(ref, 0, pos, n)
        # Before the frame's first byte: a frame in the pipe always lies
        # below RING_HEAD.  A writer killed between here and the frame
        # leaves a gap, freed by the next ring frame read.
        self._ring_head.value = pos + n
        return True

    def _has_room(self, total: int) -> bool:
        used = _fionread(self._rfd)
        return used >= 0 and self._capacity - used >= total

    def _wait_writable(self, deadline: int) -> bool:
        """A producer's wait for room in the pipe: True when there is some,
        False when the deadline passed first.  Past the stall time, warns once."""
        if self._stall_ns < 0:
            return _wait_fd(self._wfd, select.POLLOUT, deadline)
        t0 = time.monotonic_ns()
        warn_at = t0 + self._stall_ns
        if deadline < 0 or deadline > warn_at:
            if _wait_fd(self._wfd, select.POLLOUT, warn_at):
                return True
            warn_stalled(time.monotonic_ns() - t0, self._capacity)
        return _wait_fd(self._wfd, select.POLLOUT, deadline)

    def _wait_space(self, total: int, deadline: int) -> bool:
        """Wait until `total` bytes fit in the pipe.  False on timeout.  Past
        the stall time, warns once."""
        nap = 50_000
        t0 = time.monotonic_ns()
        warn_at = -1 if self._stall_ns < 0 else t0 + self._stall_ns
        while not self._has_room(total):
            if warn_at >= 0 and (deadline < 0 or deadline > warn_at):
                if not _wait_fd(self._wfd, select.POLLOUT, warn_at):
                    warn_stalled(time.monotonic_ns() - t0, self._capacity)
                    warn_at = -1
                    continue
            elif not _wait_fd(self._wfd, select.POLLOUT, deadline):
                return False
            if self._has_room(total):
                break
            if warn_at >= 0 and time.monotonic_ns() >= warn_at:
                warn_stalled(time.monotonic_ns() - t0, self._capacity)
                warn_at = -1
            # poll() says only that some space is free; sleep between checks.
            if deadline >= 0:
                left = deadline - time.monotonic_ns()
                if left <= 0:
                    return False
                nap = min(nap, left)
            time.sleep(nap / 1e9)
            if nap < 2_000_000:
                nap *= 2
        return True

    def _write_iov(self, iov: list[memoryview], deadline: int, frame: bool) -> int:
        """Write all of iov, holding the write lock, counting progress in
        WR_POS.  WRITE_DONE, WRITE_TIMEOUT when the deadline passed, or
        WRITE_RETRY when a frame's first write found the pipe full.  A frame
        stopped after its first byte is left as debt for the next lock holder;
        one stopped before it is taken back."""
        wr_pos, wr_try = self._wr_pos, self._wr_try
        # A frame larger than the pipe is streamed: see _shm.WRITE_SLICE.
        limit = _shm.WRITE_SLICE if frame and self._wr_end.value > self._capacity else 0
        ok = False
        try:
            i = 0
            while i < len(iov):
                part = iov[i : i + IOV_CAP]
                if limit:
                    part = _head(part, limit)
                # A kill between the write and the store below leaves the
                # true position in [WR_POS, WR_TRY], for _settle to resolve.
                wr_try.value = wr_pos.value + sum(v.nbytes for v in part)
                try:
                    n = os.writev(self._wfd, part)
                except BlockingIOError:
                    wr_try.value = wr_pos.value
                    if frame and wr_pos.value == 0:
                        return WRITE_RETRY
                    if not self._wait_writable(deadline):
                        return WRITE_TIMEOUT
                    continue
                except BrokenPipeError:
                    wr_try.value = wr_pos.value
                    _raise_errno(errno.EPIPE)
                # Any other exception (a signal handler that raised) may come
                # just after the write returned, its bytes in the pipe and not
                # counted: WR_TRY stays, and the next writer settles where
                # this one stopped, as for a writer killed there.
                wr_pos.value += n
                wr_try.value = wr_pos.value
                i = _advance(iov, i, n)
            ok = True
            return WRITE_DONE
        finally:
            if not ok and frame and wr_pos.value == 0 and wr_try.value == 0:
                # Nothing of this frame reached the pipe: it never existed.
                self._wr_end.value = 0
                self._puts.value -= self._wr_cnt.value

    def _pay_debt(self, deadline: int) -> int:
        """End a frame that an earlier writer left unfinished: fill up the
        chunk it stopped in and mark the frame TORN.  At most one chunk of
        filler.  Holding the write lock: DEBT_PAID, DEBT_TIMEOUT if the
        deadline passed first, DEBT_UNSETTLED if where that writer stopped is
        not known yet."""
        if not self._settle():
            return DEBT_UNSETTLED
        length = int.from_bytes(self._page[_shm.O_WR_HDR + 8 : _shm.O_WR_HDR + HDR], "little")
        while self._wr_end.value:
            pos = self._wr_pos.value
            if pos >= self._wr_end.value:
                # Its writer was killed after its last byte: nothing is owed.
                self._wr_end.value = 0
                break
            if pos < HDR:
                iov = [self._page[_shm.O_WR_HDR + pos : _shm.O_WR_HDR + HDR]]
            else:
                mark = _next_mark(pos, length)
                iov = [_ZEROS[: min(mark - pos, SCRATCH)] if pos < mark else _TORN]
            if not self._write_iov(iov, deadline, False):
                return DEBT_TIMEOUT
            if pos >= HDR and pos == _next_mark(pos, length):
                self._wr_end.value = 0  # the TORN marker is out
        return DEBT_PAID

    def _settle(self) -> bool:
        """Holding the write lock, with a frame left unfinished: make WR_POS
        exact.  A writer killed between a write and storing its new position
        leaves it somewhere in [WR_POS, WR_TRY].  Once every byte in the pipe
        is read and no reader is busy, the readers' own count tells it.
        True when WR_POS is exact (or the frame is settled), False if not yet."""
        wpos, wtry, end = self._wr_pos.value, self._wr_try.value, self._wr_end.value
        cnt = self._wr_cnt.value
        if wtry <= wpos:
            return True
        st = _trylock(self._rlock)
        if st != 0 and st != OWNER_DIED:
            return False
        try:
            if _fionread(self._rfd) != 0:
                return False
            rpos = self._rd_pos.value
            if self._rd_try.value > rpos or not _parity(self._rd_base.value, self._gets.value):
                return False  # a reader was killed too: the next get() settles it first
            if rpos and cnt > 1:
                # A group of frames (a compiled core's put_many) goes into the
                # pipe whole or not at all, so a reader inside a frame with the
                # pipe empty has read all of it and was killed before counting
                # it: count it here.
                n = self._read_step_end()
                if not n:
                    return False
                self._lost.value += n
                self._frame_done(n)
                rpos = 0
            pending = self._puts.value - self._gets.value
            if rpos:
                pos = rpos  # a reader is inside this frame, and read all of it
            elif pending == 0:
                pos = end  # the frame went out whole and was read
            elif pending == cnt and wpos == 0:
                pos = 0  # not one byte of it reached the pipe
            else:
                return False
            if not wpos <= pos <= wtry:
                return False
            self._wr_pos.value = self._wr_try.value = pos
            if pos == 0:
                # The frame never existed.
                self._wr_end.value = 0
                self._puts.value -= cnt
            return True
        finally:
            _unlock(self._rlock)

    def _wait_room(self, deadline: int) -> bool:
        """Wait for a get() to free a slot (maxsize > 0).  False on timeout.

        The protocol of the compiled core: a waiting producer is counted in
        WAITERS under the write lock, and a get() that sees a waiter writes a
        byte per frame taken into the notify pipe.  Python has no memory
        fence, so the wait is sliced: a wake-up missed here costs one slice.
        """
        if self._lock(self._wlock, deadline) == TIMED_OUT:
            return False
        try:
            full = self._count() >= self._maxsize
            if full:
                self._waiters.value += 1
        finally:
            _unlock(self._wlock)
        if not full:
            return True
        try:
            slice_end = time.monotonic_ns() + ROOM_SLICE_NS
            if 0 <= deadline < slice_end:
                slice_end = deadline
            if self._count() >= self._maxsize and _wait_fd(self._nrfd, select.POLLIN, slice_end):
                try:
                    os.read(self._nrfd, 1)
                except BlockingIOError:
                    pass  # another producer took the byte: we only re-check
        finally:
            self._lock(self._wlock, -1)
            try:
                self._waiters.value -= 1
            finally:
                _unlock(self._wlock)
        return deadline < 0 or time.monotonic_ns() < deadline

    # -- the read lock, for code that takes a queue's _rlock itself ---------

    def acquire_read_lock(self, timeout: float | None = None) -> bool:
        """Take the read lock (as get() does for one frame).  False on timeout."""
        self._check()
        return self._lock(self._rlock, _deadline(timeout)) != TIMED_OUT

    def release_read_lock(self) -> None:
        rc = _mutex_unlock(self._rlock)
        if rc:
            _raise_errno(rc)

    # -- tasks (JoinableQueue) ----------------------------------------------

    def _unfinished(self) -> int:
        return _signed((self._puts.value - self._lost.value - self._done.value) & _U64)

    def _check_joinable(self) -> None:
        self._check()
        if self._jrfd < 0:
            raise ValueError("channel is not joinable")

    def unfinished(self) -> int:
        """Frames put and not yet marked done with task_done()."""
        return max(self._unfinished(), 0)

    def task_done(self) -> None:
        """Mark one frame's task done; ValueError if none is unfinished."""
        self._check_joinable()
        self._lock(self._tlock, -1)
        try:
            left = self._unfinished()
            if left <= 0:
                raise ValueError("task_done() called too many times")
            self._done.value += 1
            joiners = self._joiners.value if left == 1 else 0
        finally:
            _unlock(self._tlock)
        # One byte per joiner; a full pipe already holds enough wake-ups.
        for _ in range(joiners):
            try:
                os.write(self._jwfd, b"\0")
            except BlockingIOError:
                break

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every frame put is marked done.  False on timeout."""
        self._check_joinable()
        deadline = _deadline(timeout)
        while True:
            self._lock(self._tlock, -1)
            try:
                done = self._unfinished() <= 0
                if not done:
                    self._joiners.value += 1
            finally:
                _unlock(self._tlock)
            if done:
                return True
            try:
                slice_end = time.monotonic_ns() + JOIN_SLICE_NS
                if deadline >= 0:
                    slice_end = min(slice_end, deadline)
                if _wait_fd(self._jrfd, select.POLLIN, slice_end):
                    try:
                        os.read(self._jrfd, 1)
                    except BlockingIOError:
                        pass  # another joiner took this wake-up
            finally:
                self._lock(self._tlock, -1)
                self._joiners.value -= 1
                _unlock(self._tlock)
            if deadline >= 0 and time.monotonic_ns() >= deadline:
                return self._unfinished() <= 0

    # -- reading ----------------------------------------------------------

    def get(self, timeout: float | None = None) -> Any:
        """Read and unpickle one frame.  Raises queue.Empty when no frame
        starts before the deadline."""
        self._check()
        deadline = _deadline(timeout)
        while True:
            held = False
            before = None
            try:
                held = self._lock_reader(deadline)
                if not held:
                    raise queue.Empty
                before = self._gets.value
                frame = self._read_frame()
                if frame is False:
                    self._frame_lost()
            finally:
                self._unlock_reader(held, before)
            if frame is None:
                if not _wait_fd(self._rfd, select.POLLIN, deadline):
                    raise queue.Empty
                continue
            if frame is False:
                continue  # a torn frame: its writer gave up, nothing to deliver
            data, buffers = frame
            try:
                return _unpickle(data, buffers)
            except BaseException as exc:
                _rescue(exc, data, buffers)
                raise

    def _lock_reader(self, deadline: int) -> bool:
        """Take the read lock for a get: True once held, False if the
        deadline passed first.  Called inside the try whose finally calls
        _unlock_reader, so that no moment is left where a signal handler
        that raises leaves it held."""
        st = _trylock(self._rlock)
        if st != 0 and st != OWNER_DIED:
            if st != errno.EBUSY:
                _raise_errno(st)
            if not _wait_fd(self._rfd, select.POLLIN, deadline):
                return False
            if self._lock(self._rlock, deadline) == TIMED_OUT:
                return False
        return True

    def _unlock_reader(self, held: bool, before: int | None) -> None:
        """The finally of a get: release the read lock (if held: if not, it
        may yet be, see _unlock_if_mine) and wake producers for the frames
        taken since GETS was `before`."""
        if not held:
            _unlock_if_mine(self._rlock)
            return
        taken = 0 if before is None else (self._gets.value - before) & _U64
        _unlock(self._rlock)
        if taken and self._maxsize > 0:
            self._wake_producers(taken)

    def get_many(self, max_messages: int, timeout: float | None = None) -> list[Any]:
        """Read and unpickle up to max_messages frames, in order, under one
        hold of the read lock: wait (as get() does) for the first, then take
        those that follow while the pipe holds more.  Every frame read is
        returned; none is kept back.  Raises queue.Empty when no frame starts
        before the deadline."""
        self._check()
        max_messages = _ssize(max_messages)
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        deadline = _deadline(timeout)
        frames: list[_Frame] = []
        while True:
            held = False
            before = None
            try:
                try:
                    held = self._lock_reader(deadline)
                    if not held:
                        raise queue.Empty
                    before = self._gets.value
                    base0 = self._rd_base.value
                    ring0 = self._ring_got
                    while True:
                        frame = self._read_frame()
                        if frame is None:
                            break
                        if frame is False:
                            self._frame_lost()  # torn: its writer gave up
                            continue
                        frames.append(frame)
                        # Only as far as the pipe goes now (no wait once there
                        # is something to return: the next _read_frame finds
                        # the pipe empty), and only while the frames are
                        # small enough for the batch to pay.
                        if (
                            len(frames) >= max_messages
                            or ((self._rd_base.value - base0) & _MASK) + self._ring_got - ring0
                            >= BATCH_BYTES
                        ):
                            break
                finally:
                    self._unlock_reader(held, before)
            except BaseException as exc:
                if frames:
                    # Interrupted (a signal handler raised) with frames taken:
                    # they go with the exception, not lost.
                    attach_messages(exc, _unpickle_all(frames, False), len(frames))
                raise
            if frames:
                return _unpickle_all(frames, True)
            if not _wait_fd(self._rfd, select.POLLIN, deadline):
                raise queue.Empty

    def _wake_producers(self, n: int) -> None:
        # One byte per frame taken, while producers wait for room: each byte
        # wakes one of them.  Stray bytes only cause a spurious re-check.
        if self._waiters.value == 0:
            return
        for _ in range(n):
            try:
                os.write(self._nwfd, b"\0")
            except BlockingIOError:
                pass  # the notify pipe is full of wake-ups already

    def _frame_lost(self) -> None:
        """Holding the read lock: a frame begun is never to be delivered."""
        self._lost.value += 1

    def _frame_done(self, count: int = 1) -> None:
        # RD_BASE first: a reader killed before GETS counts the frame leaves
        # the parity bit to say that the frame is over (see _read_frame), and
        # RD_CNT how many frames GETS still owes.
        self._rd_cnt.value = count
        self._rd_base.value = _next_base(self._rd_base.value, self._rd_pos.value)
        self._rd_try.value = 0
        self._rd_pos.value = 0
        self._gets.value += count

    def _read_step_end(self) -> int:
        """Holding the read lock: how many frames a reader stopped at RD_POS
        has read all of: 1 at the end of the frame in RD_HDR, the group's
        count at the end of a group that frame leads; 0 if inside a frame."""
        pos = self._rd_pos.value
        if pos < HDR:
            return 0
        fields = _shm.HEADER.unpack_from(self._page, _shm.O_RD_HDR)
        if not _shm.header_ok(*fields):
            return 0
        flags, nbuf, length = fields[2:]
        end = _shm.wire_size(length)
        frames, size = _shm.group_rest(flags, nbuf)
        if pos == end:
            return 1
        return frames + 1 if frames and pos == end + size else 0

    def _read_frame(self) -> _Frame | Literal[False] | None:
        """Holding the read lock: None if the pipe is empty, False for a torn
        frame, else (data, buffers or None)."""
        if not _parity(self._rd_base.value, self._gets.value):
            # A reader was killed in _frame_done: the frame is over, count it.
            self._rd_try.value = 0
            self._rd_pos.value = 0
            self._gets.value += self._rd_cnt.value
        if self._rd_try.value > self._rd_pos.value:
            self._settle_read()
        # The rest of a frame that a reader before us began and never
        # finished (it was killed or interrupted): it is dropped.
        if self._rd_pos.value:
            self._skip_frame()
        # The header goes straight into shared memory, so that a successor
        # can finish this frame if we stop partway through it.
        self._rd_try.value = HDR
        try:
            n = os.readv(self._rfd, [self._rd_hdr])
        except BlockingIOError:
            self._rd_try.value = 0
            return None
        # Any other exception (a signal handler that raised) may come just
        # after the read returned: RD_TRY stays, for the next reader to settle.
        if n == 0:
            self._rd_try.value = 0
            raise EOFError("pipeq: every write end of the pipe is closed")
        self._rd_pos.value = n
        self._rd_try.value = n
        if n < HDR and not self._finish_header():
            self._frame_done()
            return False
        return self._read_body()

    def _finish_header(self) -> bool:
        """Read the rest of a partial header.  False if its writer abandoned
        the frame (which is then dropped)."""
        pos = self._rd_pos.value
        if pos < HDR:
            return self._read_iov([self._rd_hdr[pos:]])
        return True

    def _header(self) -> tuple[int, int, int]:
        """(flags, n_buffers, body length) of the header being read."""
        fields = _shm.HEADER.unpack_from(self._page, _shm.O_RD_HDR)
        flags, nbuf, length = fields[2:]
        if not _shm.header_ok(*fields):
            self._rd_pos.value = self._rd_try.value = 0
            raise StreamError(
                f"pipeq: not a pipeq frame header: {bytes(self._rd_hdr)!r}; "
                "something other than pipeq wrote into the queue's pipe"
            )
        if flags & _shm.FLAG_GROUP:
            nbuf = 0  # a group's size, not buffers: this core reads its frames one by one
        return flags, nbuf, length

    def _read_body(self) -> _Frame | Literal[False]:
        flags, nbuf, length = self._header()
        rest = length
        ring = flags & _shm.FLAG_RING
        rpos = rlen = rleft = 0
        r = SPAN_MORE
        if ring:
            ref = bytearray(RING_REF)
            r = self._read_span(memoryview(ref), length)
            if r == SPAN_TORN:
                return self._torn_or_bad(r)
            # Checked once the frame is read whole (_ring_get): a torn one is
            # dropped, whatever its ring reference and table say.
            rpos, rlen = _shm.RING_REF.unpack(ref)
            rleft = rlen if rlen <= self._ring_size else 0  # allocate no more
            rest -= RING_REF
        buffers: list[bytearray] | None = None
        if nbuf:
            table = bytearray(8 * nbuf)
            r = self._read_span(memoryview(table), length)
            if r != SPAN_MORE:
                return self._torn_or_bad(r)
            rest -= 8 * nbuf
            buffers = []
            for (blen,) in struct.iter_unpack("<Q", table):
                if ring:
                    if blen > rleft:
                        break  # a bad table: _ring_get finds the sum short
                    rleft -= blen
                else:
                    if blen > rest:
                        raise StreamError("pipeq: buffer table exceeds the frame")
                    rest -= blen
                buffers.append(bytearray(blen))
        # Fresh objects, read into directly.  (Unlike the compiled core, a
        # raw bytes item is copied once at the end: Python cannot read into
        # a bytes object.)
        if ring and flags & _shm.FLAG_RAW:
            # Filled from the ring; no sane reference is longer than it.
            data = bytearray(rlen if rlen <= self._ring_size else 0)
        else:
            data = bytearray(rest)
            if r == SPAN_MORE:
                r = self._read_span(memoryview(data), length)
        if buffers is not None and not ring:
            for buf in buffers:
                if r != SPAN_MORE:
                    break
                r = self._read_span(memoryview(buf), length)
        if r == SPAN_MORE:
            r = self._read_span(_NOTHING, length)  # the COMMIT marker itself
        if r != SPAN_END:
            return self._torn_or_bad(r)
        if ring:
            self._ring_get(rpos, rlen, [data] if flags & _shm.FLAG_RAW else buffers or [])
        self._frame_done()
        if flags & _shm.FLAG_RAW:
            return bytes(data), None
        return data, (buffers if buffers is not None else ())

    def _ring_check(self, pos: int, n: int, got: int) -> None:
        """A ring frame read whole, whose reference says n bytes at pos and
        whose destinations come to got bytes: as a writer makes it, or the
        frame is counted lost and a StreamError raised."""
        size = self._ring_size
        if (
            size == 0
            or n == 0
            or n > size
            or pos % size + n > size
            or pos + n > self._ring_head.value
            or got != n
        ):
            self._frame_lost()
            self._frame_done()
            raise StreamError(
                f"pipeq: a frame refers to {n} bytes at {pos} in a ring of {size}"
                + ("" if got == n else f", its buffer table to {got}")
            )

    def _ring_get(self, pos: int, n: int, dsts: list[bytearray]) -> None:
        """Holding the read lock, a ring frame read whole: copy its data out
        of the ring into dsts, and free the ring up to its end."""
        self._ring_check(pos, n, sum(len(dst) for dst in dsts))
        off = pos % self._ring_size
        for dst in dsts:
            dst[:] = self._ring[off : off + len(dst)]
            off += len(dst)
        self._ring_got += n
        self._ring_tail.value = pos + n

    def _torn_or_bad(self, r: int) -> Literal[False]:
        if r == SPAN_TORN:
            self._frame_done()
            return False
        self._rd_pos.value = self._rd_try.value = 0
        raise StreamError("pipeq: frame ended before its declared length")

    def _read_span(self, dst: memoryview, length: int) -> int:
        """Read the next len(dst) body bytes into dst, and with them any
        marker they reach.  SPAN_MORE when they are read and the frame goes
        on, SPAN_END when they end it with COMMIT, SPAN_TORN when it was torn."""
        marker = self._marker
        n = len(dst)
        while True:
            pos = self._rd_pos.value
            mark = _next_mark(pos, length)
            take = min(mark - pos, n)
            iov = [dst[:take]] if take else []
            at_mark = pos + take == mark
            if at_mark:
                iov.append(memoryview(marker))
            elif n == 0:
                return SPAN_MORE
            if not self._read_iov(iov):
                return SPAN_TORN
            dst = dst[take:]
            n -= take
            if at_mark:
                if marker[0] == _shm.MARK_TORN:
                    return SPAN_TORN
                if mark == _shm.wire_size(length) - 1:
                    if marker[0] != _shm.MARK_COMMIT or n:
                        raise StreamError(f"pipeq: bad end-of-frame marker {marker[0]:#04x}")
                    return SPAN_END
                if marker[0] != _shm.MARK_CONT:
                    raise StreamError(f"pipeq: bad chunk marker {marker[0]:#04x}")
            if n == 0:
                return SPAN_MORE

    def _skip_frame(self) -> None:
        """Drop the rest of a frame that another reader began."""
        n = self._read_step_end()
        if n > 1:
            # A compiled reader took the rest of a group with its lead by
            # one read and was killed before counting them: all are lost.
            self._lost.value += n
            self._frame_done(n)
            return
        self._frame_lost()
        if not self._finish_header():
            self._frame_done()
            return
        length = self._header()[2]
        end = _shm.wire_size(length)
        scratch = memoryview(bytearray(SCRATCH))
        r = SPAN_MORE
        # Each span asks for no more than the body has left, so that the
        # last one ends exactly on the COMMIT marker.  A reader that died
        # after the marker but before counting the frame left pos == end.
        while r == SPAN_MORE and self._rd_pos.value < end:
            left = length - _body_done(self._rd_pos.value)
            r = self._read_span(scratch[: min(left, SCRATCH)], length)
        self._frame_done()

    def _read_iov(self, iov: list[memoryview]) -> bool:
        """Read all of iov holding the read lock, counting progress in
        RD_POS.  False when the frame's writer abandoned it."""
        rd_pos, rd_try = self._rd_pos, self._rd_try
        i = 0
        while i < len(iov):
            part = iov[i : i + IOV_CAP]
            # A kill between the read and the store below leaves the true
            # position in [RD_POS, RD_TRY], for _settle_read to resolve.
            rd_try.value = rd_pos.value + sum(v.nbytes for v in part)
            try:
                n = os.readv(self._rfd, part)
            except BlockingIOError:
                rd_try.value = rd_pos.value
                if self._writer_gone():
                    return False
                _wait_fd(self._rfd, select.POLLIN, time.monotonic_ns() + MIDFRAME_SLICE_NS)
                continue
            # As in _write_iov: on any other exception RD_TRY stays, for the
            # next reader to settle.
            rd_pos.value += n
            rd_try.value = rd_pos.value
            if n == 0:
                raise EOFError("pipeq: every write end of the pipe is closed")
            i = _advance(iov, i, n)
        return True

    def _writer_snapshot(self) -> tuple[int, int, int, int]:
        """(WR_BASE, PUTS, WR_POS, WR_TRY), WR_POS loaded before WR_TRY."""
        return (self._wr_base.value, self._puts.value, self._wr_pos.value, self._wr_try.value)

    def _settle_read(self) -> None:
        """Holding the read lock, with RD_TRY > RD_POS: a reader was killed
        between a read and storing how far it got, so the true position is
        somewhere in [RD_POS, RD_TRY].  The pipe holds every byte written and
        not yet read, so it is WR_BASE + WR_POS - FIONREAD - RD_BASE, with
        FIONREAD taken while no write is in the kernel: a writer's counts
        that read the same, and exact (WR_TRY == WR_POS), on both sides of it."""
        while True:
            st = _trylock(self._wlock)
            held = st == 0 or st == OWNER_DIED
            if not held and st != errno.EBUSY:
                _raise_errno(st)
            try:
                before = self._writer_snapshot()
                used = _fionread(self._rfd)
                after = self._writer_snapshot()
                base, puts, wpos, wtry = after
                if not _parity(base, puts):
                    wpos = wtry = 0  # WR_BASE is already past the last frame
                if before == after and used >= 0 and wtry == wpos:
                    break
                if held and wtry > wpos:
                    # Its writer was killed inside a write too, and only we
                    # could settle where it stopped.
                    self._rd_pos.value = self._rd_try.value = 0
                    raise StreamError(
                        "pipeq: a reader and a writer were both killed inside a "
                        "read and a write; where the stream stands is lost"
                    )
            finally:
                if held:
                    _unlock(self._wlock)
            time.sleep(SETTLE_NAP_NS / 1e9)  # a live writer is inside a write
        mask = _shm.BASE_PARITY - 1
        pos = ((base & mask) + wpos - used - (self._rd_base.value & mask)) & mask
        if not self._rd_pos.value <= pos <= self._rd_try.value:
            lo, hi = self._rd_pos.value, self._rd_try.value
            self._rd_pos.value = self._rd_try.value = 0
            raise StreamError(f"pipeq: lost count of the stream: at {pos}, not in [{lo}, {hi}]")
        self._rd_pos.value = self._rd_try.value = pos

    def _writer_gone(self) -> bool:
        """Mid-frame with an empty pipe: True if the frame's writer abandoned
        it (its debt is then forgiven here), False if it is still writing."""
        st = _trylock(self._wlock)
        if st != 0 and st != OWNER_DIED:
            return False  # a live writer holds it and will write more
        try:
            if _fionread(self._rfd) != 0:
                return False
            wpos = self._wr_pos.value
            rpos = self._rd_pos.value
            if self._wr_end.value and wpos < rpos <= self._wr_try.value:
                # Its writer was killed between a write and storing how far
                # it got: every byte it wrote is read, so rpos is that far.
                wpos = self._wr_pos.value = self._wr_try.value = rpos
            if self._wr_end.value == 0 or wpos != rpos:
                self._rd_pos.value = self._rd_try.value = 0
                writer = "finished it" if self._wr_end.value == 0 else f"stopped at byte {wpos}"
                raise StreamError(f"pipeq: frame cut short at byte {rpos}; its writer {writer}")
            self._wr_end.value = 0
            return True
        finally:
            _unlock(self._wlock)


def _unpickle(data: bytes | bytearray, buffers: list[bytearray] | tuple[()] | None) -> Any:
    """A frame's message: data itself for a raw frame (buffers None), else
    data unpickled with its out-of-band buffers."""
    if buffers is None:
        return data
    return loads(data, buffers=buffers)


def _interrupted(exc: BaseException) -> bool:
    """Whether exc, raised while a message was unpickled, is not the
    message's fault but an interruption: KeyboardInterrupt, SystemExit and
    the like, which a signal handler raises at a check inside the message's
    own unpickling code (a reduce function written in Python, numpy's)."""
    return not isinstance(exc, Exception)


def _rescue(
    exc: BaseException, data: bytes | bytearray, buffers: list[bytearray] | tuple[()] | None
) -> None:
    """get()'s message, read and so out of the pipe, did not unpickle: exc.
    If it was interrupted, unpickle it once more (its reduce code runs
    again) and hand it over with exc, as exc.messages, rather than lose it."""
    if _interrupted(exc):
        try:
            item = _unpickle(data, buffers)
        except BaseException:
            return  # exc is raised; the message cannot be had
        attach_messages(exc, [item], 1)


def _unpickle_all(frames: list[_Frame], strict: bool) -> list[Any]:
    """The messages of frames, in order.  Strict: if any cannot be
    unpickled, raise the first such error (an interruption before any
    other), the others attached to it (attach_messages); else skip those.
    An interrupted message is unpickled once more, as for get()."""
    out: list[Any] = []
    first: BaseException | None = None
    for data, buffers in frames:
        try:
            out.append(_unpickle(data, buffers))
        except BaseException as exc:
            if _interrupted(exc):
                try:
                    out.append(_unpickle(data, buffers))
                except BaseException:  # noqa: S110 - lost; exc says why
                    pass
            if first is None or (_interrupted(exc) and not _interrupted(first)):
                first = exc
    if first is not None and strict:
        attach_messages(first, out, len(frames))
        raise first
    return out


def _ssize(v: object) -> int:
    """v as a Py_ssize_t, converted the way the compiled core's arguments are."""
    n = operator.index(v)  # type: ignore[arg-type]
    if not -sys.maxsize - 1 <= n <= sys.maxsize:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return n


class _Detachable(Protocol):
    def detach(self) -> int: ...


def _rebuild(
    r: _Detachable | None,
    w: _Detachable | None,
    s: _Detachable | None,
    nr: _Detachable | None,
    nw: _Detachable | None,
    jr: _Detachable | None,
    jw: _Detachable | None,
    maxsize: int,
    stall: int | None = None,
) -> Channel:
    """Unpickle a Channel in a child process from the fds it was handed.

    Takes what either core's ``__reduce__`` hands over: both cores share the
    pipe, the shared page and its locks, so a child may use the other core.
    """
    self = Channel.__new__(Channel)
    fds = tuple([d.detach() if d is not None else -1 for d in (r, w, s, nr, nw, jr, jw)])
    for fd in fds:
        if fd >= 0:
            os.set_inheritable(fd, False)
    self._attach(fds, _ssize(maxsize), False)
    if stall is not None:
        self._stall_ns = int(stall)
    return self
