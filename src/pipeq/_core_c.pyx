# cython: language_level=3, embedsignature=True
"""Compiled core of pipeq: whole pickled frames over a pipe, under shared locks.

The wire format and the shared page's layout are described in _shm.py; the
pure core follows the same ones, so both can serve one queue.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport UINT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import copyreg
import os
import queue
from multiprocessing.reduction import DupFd, ForkingPickler
from pickle import PickleBuffer, Pickler
from pickle import loads as _loads

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

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <poll.h>
    #include <pthread.h>
    #include <string.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <sys/uio.h>
    #include <time.h>
    #include <unistd.h>

    #if defined(__linux__)
    #define PQ_ROBUST 1
    #else
    #define PQ_ROBUST 0
    #endif
    #define PQ_OWNERDEAD 1

    static int64_t pq_now_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    }

    static int pq_mutex_init(void *p) {
        pthread_mutexattr_t a;
        int rc = pthread_mutexattr_init(&a);
        if (rc) return rc;
        rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    #if PQ_ROBUST
        if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    #endif
        if (!rc) rc = pthread_mutex_init((pthread_mutex_t *)p, &a);
        pthread_mutexattr_destroy(&a);
        return rc;
    }

    /* 0: locked; PQ_OWNERDEAD: locked, the last owner died holding it (the
       mutex is made consistent again, the caller repairs what it guarded);
       EBUSY / ETIMEDOUT: not locked; anything else: an errno value. */
    static int pq_mutex_settle(pthread_mutex_t *m, int rc) {
    #if PQ_ROBUST
        if (rc == EOWNERDEAD) {
            pthread_mutex_consistent(m);
            return PQ_OWNERDEAD;
        }
    #endif
        return rc;
    }

    static int pq_mutex_trylock(void *p) {
        pthread_mutex_t *m = (pthread_mutex_t *)p;
        return pq_mutex_settle(m, pthread_mutex_trylock(m));
    }

    /* Wait at most ns for the mutex.  Called without the GIL. */
    static int pq_mutex_waitlock(void *p, int64_t ns) {
        pthread_mutex_t *m = (pthread_mutex_t *)p;
    #if defined(__linux__)
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += ns / 1000000000LL;
        ts.tv_nsec += ns % 1000000000LL;
        if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
        return pq_mutex_settle(m, pthread_mutex_timedlock(m, &ts));
    #else
        /* No timed lock here (macOS): try, then sleep, backing off to 1 ms. */
        int64_t end = pq_now_ns() + ns, nap = 20000;
        for (;;) {
            int rc = pq_mutex_settle(m, pthread_mutex_trylock(m));
            if (rc != EBUSY) return rc;
            int64_t left = end - pq_now_ns();
            if (left <= 0) return ETIMEDOUT;
            struct timespec ts = {0, (long)(nap < left ? nap : left)};
            nanosleep(&ts, NULL);
            if (nap < 1000000) nap *= 2;
        }
    #endif
    }

    static int pq_mutex_unlock(void *p) {
        return pthread_mutex_unlock((pthread_mutex_t *)p);
    }

    static uint64_t pq_load(void *p) {
        return __atomic_load_n((uint64_t *)p, __ATOMIC_ACQUIRE);
    }
    static void pq_store(void *p, uint64_t v) {
        __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
    }
    static void pq_fence(void) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }

    static int pq_fionread(int fd) {
        int n = 0;
        if (ioctl(fd, FIONREAD, &n) < 0) return -1;
        return n;
    }

    static void *pq_mmap(int fd, size_t size) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    """
    int PQ_OWNERDEAD
    int64_t pq_now_ns() nogil
    int pq_mutex_init(void *p) nogil
    int pq_mutex_trylock(void *p) nogil
    int pq_mutex_waitlock(void *p, int64_t ns) nogil
    int pq_mutex_unlock(void *p) nogil
    uint64_t pq_load(void *p) nogil
    void pq_store(void *p, uint64_t v) nogil
    void pq_fence() nogil
    int pq_fionread(int fd) nogil
    void *pq_mmap(int fd, size_t size) nogil

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR, EAGAIN, EWOULDBLOCK, EBUSY, ETIMEDOUT

cdef extern from "<limits.h>":
    int PIPE_BUF

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLIN, POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t readv(int fd, const iovec *iov, int iovcnt)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)

cdef extern from "<sys/mman.h>" nogil:
    int munmap(void *addr, size_t length)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec *req, timespec *rem)

cdef enum:
    HDR = 16
    RING_REF = 16  # _shm.RING_REF.size
    IOV_CAP = 1024
    SCRATCH = 65536
    TIMED_OUT = 2
    # _read_span results
    SPAN_TORN = 0
    SPAN_MORE = 1
    SPAN_END = 2
    # Most frames put_many() sends by one write (a frame is at least HDR + 1 bytes).
    GROUP_MAX = 256

cdef uint64_t CHUNK = _shm.CHUNK
cdef uint8_t MARK_CONT = _shm.MARK_CONT
cdef uint8_t MARK_COMMIT = _shm.MARK_COMMIT
cdef uint8_t MARK_TORN = _shm.MARK_TORN
cdef uint8_t FLAG_OOB = _shm.FLAG_OOB
cdef uint8_t FLAG_RAW = _shm.FLAG_RAW
cdef uint8_t FLAG_GROUP = _shm.FLAG_GROUP
cdef uint8_t FLAG_RING = _shm.FLAG_RING
cdef uint32_t GROUP_SHIFT = _shm.GROUP_SHIFT
cdef uint32_t GROUP_BYTES = _shm.GROUP_BYTES
cdef uint8_t KNOWN_FLAGS = FLAG_OOB | FLAG_RAW | FLAG_GROUP | FLAG_RING
cdef uint8_t VERSION = _shm.VERSION
cdef Py_ssize_t OOB_MIN = _shm.OOB_MIN
cdef uint64_t WRITE_SLICE = _shm.WRITE_SLICE
cdef uint64_t RING_MIN = _shm.RING_MIN
cdef uint64_t RING_SHARE = _shm.RING_SHARE
cdef uint64_t RING_LAP = _shm.RING_LAP
cdef uint64_t MAX_BODY = _shm.MAX_BODY

cdef size_t SHM_SIZE = _shm.SHM_SIZE
cdef size_t RING_OFFSET = _shm.RING_OFFSET
cdef size_t O_PUTS = _shm.O_PUTS
cdef size_t O_WR_POS = _shm.O_WR_POS
cdef size_t O_WR_END = _shm.O_WR_END
cdef size_t O_WR_TRY = _shm.O_WR_TRY
cdef size_t O_WR_HDR = _shm.O_WR_HDR
cdef size_t O_WAITERS = _shm.O_WAITERS
cdef size_t O_GETS = _shm.O_GETS
cdef size_t O_RD_POS = _shm.O_RD_POS
cdef size_t O_RD_HDR = _shm.O_RD_HDR
cdef size_t O_WR_BASE = _shm.O_WR_BASE
cdef size_t O_RD_TRY = _shm.O_RD_TRY
cdef size_t O_RD_BASE = _shm.O_RD_BASE
cdef size_t O_RD_CNT = _shm.O_RD_CNT
cdef uint64_t BASE_PARITY = _shm.BASE_PARITY
cdef size_t O_WLOCK = _shm.O_WLOCK
cdef size_t O_RLOCK = _shm.O_RLOCK
cdef size_t O_TLOCK = _shm.O_TLOCK
cdef size_t O_LOST = _shm.O_LOST
cdef size_t O_DONE = _shm.O_DONE
cdef size_t O_JOINERS = _shm.O_JOINERS
cdef size_t O_WR_CNT = _shm.O_WR_CNT
cdef size_t O_WR_HOLD = _shm.O_WR_HOLD
cdef size_t O_RING_HEAD = _shm.O_RING_HEAD
cdef size_t O_RING_TAIL = _shm.O_RING_TAIL

# Lock waits are sliced so that signal handlers run while a lock is awaited.
cdef int64_t LOCK_SLICE_NS = 50_000_000
# A reader in the middle of a frame looks this often for an abandoned writer.
cdef int64_t MIDFRAME_SLICE_NS = 20_000_000
# A producer waiting for room re-checks this often even without a wake-up
# (the wake-up protocol is exact for the compiled core; this covers the rest).
cdef int64_t ROOM_SLICE_NS = 100_000_000
# join() re-checks this often even without a wake-up: a frame dropped or
# taken back can end the last task without a task_done() to wake anyone.
cdef int64_t JOIN_SLICE_NS = 100_000_000
# How often a writer looks again at a frame whose writer was killed inside a
# write, until the readers have settled where it stopped.
cdef int64_t SETTLE_NAP_NS = 2_000_000
# How long past its deadline a put waits for another writer's lock while the
# pipe has room for its frame.
cdef int64_t LOCK_GRACE_NS = 5_000_000_000
# What _begin_frame asks of _put_frame.
cdef enum:
    PUT_DONE = 1
    PUT_AGAIN = 2
    PUT_PIPE_FULL = 3
    PUT_UNSETTLED = 4
    PUT_NO_RING = 5
# Longest single poll(); longer waits loop (poll takes an int of ms).
cdef int64_t MAX_POLL_MS = 86_400_000

# Filler for torn chunks (stays zero), and a sink for bytes being skipped.
cdef uint8_t _zeros[SCRATCH]
cdef uint8_t _scratch[SCRATCH]
memset(_zeros, 0, SCRATCH)


cdef inline int64_t _deadline(object timeout) except? -2:
    """-1 for no deadline; otherwise monotonic ns (negative timeouts mean 0)."""
    if timeout is None:
        return -1
    cdef double t = timeout
    if t != t:
        raise ValueError("timeout must be a number, not NaN")
    if t <= 0:
        return pq_now_ns()
    if t > 1e9:  # beyond 30 years: as good as forever
        return -1
    return pq_now_ns() + <int64_t>(t * 1e9)


cdef inline void _put_u64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline uint64_t _get_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef inline uint32_t _get_u32(const uint8_t *p) noexcept nogil:
    return p[0] | (p[1] << 8) | (p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t _nchunks(uint64_t length) noexcept nogil:
    return 1 if length == 0 else (length + CHUNK - 1) // CHUNK


cdef inline uint64_t _next_mark(uint64_t pos, uint64_t length) noexcept nogil:
    """Wire offset of the first marker at or after wire offset pos >= HDR."""
    cdef uint64_t k = (pos - HDR) // (CHUNK + 1)
    cdef uint64_t clen = length - k * CHUNK
    if clen > CHUNK:
        clen = CHUNK
    return HDR + k * (CHUNK + 1) + clen


cdef inline uint64_t _next_base(uint64_t base, uint64_t pos) noexcept nogil:
    """WR_BASE or RD_BASE moved past a frame of pos wire bytes, its parity flipped."""
    return ((base + pos) & (BASE_PARITY - 1)) | (~base & BASE_PARITY)


cdef inline bint _parity(uint64_t base, uint64_t count) noexcept nogil:
    """Whether a BASE belongs to the frame that PUTS or GETS (count) counts."""
    return ((base & BASE_PARITY) != 0) == ((count & 1) != 0)


cdef inline uint64_t _body_done(uint64_t pos, uint64_t length) noexcept nogil:
    """Body bytes (markers not counted) before wire offset pos >= HDR."""
    cdef uint64_t k = (pos - HDR) // (CHUNK + 1)
    cdef uint64_t off = (pos - HDR) % (CHUNK + 1)
    cdef uint64_t clen = length - k * CHUNK
    if clen > CHUNK:
        clen = CHUNK
    return k * CHUNK + (off if off < clen else clen)


cdef inline void _fill_header(uint8_t *hdr, uint8_t flags, uint32_t nbuf,
                              uint64_t length) noexcept:
    hdr[0] = 0x70  # 'p'
    hdr[1] = 0x71  # 'q'
    hdr[2] = VERSION
    hdr[3] = flags
    hdr[4] = nbuf & 0xff
    hdr[5] = (nbuf >> 8) & 0xff
    hdr[6] = (nbuf >> 16) & 0xff
    hdr[7] = (nbuf >> 24) & 0xff
    _put_u64(hdr + 8, length)


cdef inline void _mark_group(uint8_t *hdr, uint32_t frames, uint32_t size) noexcept:
    """Make hdr lead a group of frames more frames (size wire bytes), or none."""
    cdef uint32_t nbuf = (frames << GROUP_SHIFT) | size if frames else 0
    if frames:
        hdr[3] |= FLAG_GROUP
    else:
        hdr[3] &= ~FLAG_GROUP
    hdr[4] = nbuf & 0xff
    hdr[5] = (nbuf >> 8) & 0xff
    hdr[6] = (nbuf >> 16) & 0xff
    hdr[7] = (nbuf >> 24) & 0xff


cdef inline uint64_t _wire_size(uint64_t length) noexcept nogil:
    return HDR + length + _nchunks(length)


cdef inline int _frame_iov(iovec *iov, uint8_t *hdr, iovec *segs, Py_ssize_t nsegs,
                           uint64_t length) noexcept:
    """Fill iov with a frame: the header, the body's segments cut at every
    CHUNK bytes by a CONT marker, and the COMMIT marker.  The number of
    entries, at most 2 + nsegs + 2 * _nchunks(length)."""
    cdef int niov = 1
    cdef uint64_t filled = 0, take
    cdef Py_ssize_t i
    cdef char *base
    cdef size_t left
    iov[0].iov_base = hdr
    iov[0].iov_len = HDR
    for i in range(nsegs):
        base = <char *>segs[i].iov_base
        left = segs[i].iov_len
        while left:
            if filled == CHUNK:
                iov[niov].iov_base = &MARK_CONT
                iov[niov].iov_len = 1
                niov += 1
                filled = 0
            take = CHUNK - filled
            if take > left:
                take = left
            iov[niov].iov_base = base
            iov[niov].iov_len = take
            niov += 1
            base += take
            left -= take
            filled += take
    iov[niov].iov_base = &MARK_COMMIT
    iov[niov].iov_len = 1
    return niov + 1


# What a ring frame puts in the ring: nsrc segments, length bytes in all,
# and where in the frame's body the ring reference to them goes.
cdef struct RingPut:
    iovec *src
    int nsrc
    uint64_t length
    uint8_t *ref


cdef enum:
    KIND_SMALL = 0  # one chunk, a small frame: may go out in a group
    KIND_BIG = 1  # a frame of its own, by _put_parts


cdef class _Batch:
    """The frames of one put_many(), pickled before any is written: a small
    frame's body is the one bytes object its pickle came as (or the bytes
    item itself); a large one's are parts for _put_parts."""

    cdef list items, parts
    cdef Py_ssize_t n
    cdef uint8_t *kind
    cdef uint8_t *flags
    cdef uint32_t *nbuf
    cdef Py_ssize_t *npickle
    cdef uint64_t *length
    cdef char **body
    cdef uint8_t *hdrs

    def __cinit__(self, list items):
        self.items = items
        self.n = len(items)
        self.parts = [None] * self.n
        self.kind = <uint8_t *>PyMem_Malloc(self.n)
        self.flags = <uint8_t *>PyMem_Malloc(self.n)
        self.nbuf = <uint32_t *>PyMem_Malloc(self.n * sizeof(uint32_t))
        self.npickle = <Py_ssize_t *>PyMem_Malloc(self.n * sizeof(Py_ssize_t))
        self.length = <uint64_t *>PyMem_Malloc(self.n * sizeof(uint64_t))
        self.body = <char **>PyMem_Malloc(self.n * sizeof(char *))
        self.hdrs = <uint8_t *>PyMem_Malloc(self.n * HDR)
        if (self.kind == NULL or self.flags == NULL or self.nbuf == NULL
                or self.npickle == NULL or self.length == NULL or self.body == NULL
                or self.hdrs == NULL):
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.kind)
        PyMem_Free(self.flags)
        PyMem_Free(self.nbuf)
        PyMem_Free(self.npickle)
        PyMem_Free(self.length)
        PyMem_Free(self.body)
        PyMem_Free(self.hdrs)

    cdef int encode(self) except -1:
        cdef Py_ssize_t i
        cdef _Pickling pk = None
        cdef list chunks, oob
        cdef uint64_t length
        cdef Py_buffer view
        try:
            for i in range(self.n):
                obj = self.items[i]
                self.nbuf[i] = 0
                self.npickle[i] = 1
                if type(obj) is bytes:
                    self.flags[i] = FLAG_RAW
                    self.length[i] = len(<bytes>obj)
                    self.body[i] = PyBytes_AS_STRING(obj)
                    if HDR + self.length[i] + 1 <= PIPE_BUF:
                        self.kind[i] = KIND_SMALL
                    else:
                        self.kind[i] = KIND_BIG
                        self.parts[i] = [obj]
                    continue
                if pk is None:
                    pk = _take_pickling()
                first = pk.dump(_as_buffer(obj))
                self.flags[i] = 0
                if (type(first) is bytes
                        and HDR + len(<bytes>first) + 1 <= PIPE_BUF):
                    self.kind[i] = KIND_SMALL
                    self.length[i] = len(<bytes>first)
                    self.body[i] = PyBytes_AS_STRING(first)
                    self.parts[i] = first  # kept alive with the batch
                    continue
                if first is not None:
                    chunks, oob = [first], None
                else:
                    chunks, oob = pk.chunks(), pk.views()
                self.kind[i] = KIND_BIG
                self.npickle[i] = len(chunks)
                length = 0
                for chunk in chunks:
                    PyObject_GetBuffer(chunk, &view, PyBUF_SIMPLE)
                    length += view.len
                    PyBuffer_Release(&view)
                if oob:
                    self.flags[i] = FLAG_OOB
                    self.nbuf[i] = len(oob)
                    chunks.extend(oob)
                self.length[i] = length
                self.parts[i] = chunks
        finally:
            if pk is not None:
                pk.done()
        for i in range(self.n):
            _fill_header(self.hdrs + i * HDR, self.flags[i], self.nbuf[i], self.length[i])
        return 0


cdef void _note_put_many(object exc, Py_ssize_t done, Py_ssize_t total):
    if done and hasattr(exc, "add_note"):
        exc.add_note(f"pipeq: put_many() had put {done} of {total} items, in order")


cdef bint _header_ok(const uint8_t *h) noexcept nogil:
    """Whether a frame header makes sense (as _shm.header_ok, magic too)."""
    cdef uint8_t flags = h[3]
    cdef uint64_t length = _get_u64(h + 8)
    cdef uint32_t nbuf = _get_u32(h + 4), frames
    if (h[0] != 0x70 or h[1] != 0x71 or h[2] != VERSION
            or (flags & ~KNOWN_FLAGS) or length > MAX_BODY):
        return False
    if flags & FLAG_RING:
        flags &= FLAG_OOB | FLAG_RAW | FLAG_GROUP
        if flags == FLAG_RAW:
            return nbuf == 0 and length == RING_REF
        return (flags == FLAG_OOB and nbuf != 0
                and RING_REF + (<uint64_t>nbuf) * 8 <= length)
    if flags & FLAG_GROUP:
        frames = nbuf >> GROUP_SHIFT
        return (not (flags & FLAG_OOB) and frames >= 2 and frames % 2 == 0
                and (nbuf & GROUP_BYTES) >= frames * (HDR + 1) and length < CHUNK)
    return (nbuf != 0) == ((flags & FLAG_OOB) != 0) and (<uint64_t>nbuf) * 8 <= length


cdef int _raise_errno(int err) except -1:
    raise_errno(err)


cdef inline object _as_buffer(object obj):
    """What to pickle for obj: a large bytearray as a PickleBuffer of
    itself, so that it travels out of band (see _shm.as_buffer)."""
    if type(obj) is bytearray and len(<bytearray>obj) >= OOB_MIN:
        return PickleBuffer(obj)
    return obj


cdef class _OOBCollector:
    """pickle buffer_callback: large contiguous buffers go out of band."""

    cdef list views  # None until the first

    def __call__(self, pb):
        try:
            view = pb.raw()
        except BufferError:
            return True  # not contiguous: let pickle copy it in band
        if view.nbytes < OOB_MIN:
            return True
        if self.views is None:
            self.views = [view]
        else:
            self.views.append(view)
        return False


# get_many() stops once it has read this many bytes: past it, a batch saves
# nothing worth having, and holding many large fresh buffers at once costs
# page faults.
cdef uint64_t BATCH_BYTES = 65536

# A frame whose body is at most this long (and has no out-of-band buffers,
# and leads no group) is read whole, header, body and COMMIT marker, in one
# release of the GIL: it went into the pipe by one write of at most PIPE_BUF
# bytes, so with its header in the pipe the rest is there too.
cdef enum:
    SMALL_BODY = 512

cdef class _Reducers:
    """The dispatch table that a ForkingPickler builds when it is made:
    ForkingPickler's registered reducers over copyreg's.  Looked up live
    (the pickler asks only for types it has no code of its own for), so a
    reducer registered at any time applies at once, with no copy per dump."""

    def __getitem__(self, cls):
        reduce = ForkingPickler._extra_reducers.get(cls)
        if reduce is None:
            return copyreg.dispatch_table[cls]  # KeyError: none
        return reduce


cdef _Reducers _REDUCERS = _Reducers()


cdef class _Sink:
    """The pickler's file: keeps what it is given, uncopied.  A small pickle
    arrives by one write of a bytes object; a large one by several, a large
    in-band buffer by a write of that buffer itself.  Together they are the
    pickle, sent as they are."""

    cdef object first  # the first chunk; None before it
    cdef list more  # the chunks after it; None while there is one

    def write(self, data):
        if self.first is None:
            self.first = data
        elif self.more is None:
            self.more = [data]
        else:
            self.more.append(data)


cdef class _Pickling:
    """One pickler, its sink and its buffer collector, reused across put()s.

    Building a ForkingPickler per message costs more than pickling a small
    object.  This pickles the same way: protocol 5, and ForkingPickler's
    reducers (see _Reducers)."""

    cdef _Sink sink
    cdef object pickler
    cdef object _clear_memo, _dump  # the pickler's bound methods, looked up once
    cdef _OOBCollector collector
    cdef bint busy

    def __cinit__(self):
        self.sink = _Sink()
        self.collector = _OOBCollector()
        self.pickler = Pickler(self.sink, 5, fix_imports=True, buffer_callback=self.collector)
        self.pickler.dispatch_table = _REDUCERS
        self._clear_memo = self.pickler.clear_memo
        self._dump = self.pickler.dump
        self.busy = False

    cdef object dump(self, obj):
        """Pickle obj.  Returns the pickle when it is one chunk with no
        out-of-band buffers (small objects: no list is built for them), else
        None, and chunks() and views() have it.  The caller calls done()
        before the next dump."""
        self._reset()
        self._clear_memo()
        self._dump(obj)
        if self.sink.more is None and self.collector.views is None:
            return self.sink.first
        return None

    cdef list chunks(self):
        """The pickle's chunks, a fresh list."""
        cdef list out = [self.sink.first]
        if self.sink.more is not None:
            out.extend(self.sink.more)
        return out

    cdef list views(self):
        """The out-of-band buffers' views, in order, a fresh list."""
        return self.collector.views if self.collector.views is not None else []

    cdef inline void _reset(self) noexcept:
        self.sink.first = None
        self.sink.more = None
        self.collector.views = None

    cdef void done(self) noexcept:
        self._reset()
        self.busy = False


# The process's reusable pickler.  The GIL makes take-and-mark atomic; a
# thread that finds it busy (another thread is in a dump, perhaps inside a
# __reduce__ of user code) pickles with one of its own.
cdef _Pickling _pickling = _Pickling()


cdef _Pickling _take_pickling():
    if _pickling.busy:
        return _Pickling()
    _pickling.busy = True
    return _pickling


cdef class Channel:
    """One pipe, two process-shared locks and a page of shared state.

    A writer holds the write lock for exactly one frame; a reader holds the
    read lock for exactly one frame and waits for data without it.  Both pipe
    ends are non-blocking: every wait is a poll() with the GIL released, so
    timeouts bound the wait and signal handlers run during it.
    """

    cdef int _rfd, _wfd, _shmfd, _nrfd, _nwfd, _jrfd, _jwfd
    cdef readonly Py_ssize_t maxsize
    cdef readonly Py_ssize_t capacity
    cdef uint8_t *_shm
    # The ring (see _shm.O_RING_HEAD), mapped with the page; NULL if none.
    cdef uint8_t *_ring
    cdef uint64_t _ring_size
    cdef uint64_t _ring_got  # ring bytes read here; under the read lock
    cdef bint _closed
    cdef int64_t _stall_ns  # a put waiting this long for pipe room warns; -1: never
    # The last get() here left no frame counted in the queue: the next one
    # most likely finds the pipe empty, so it waits for data before it tries
    # a read (saving a read that would fail, in ping-pong traffic).
    cdef bint _drained
    # Holding the read lock: a small frame's body and COMMIT marker, read by
    # the same release of the GIL as its header (see _read_frame).
    cdef uint8_t _small[SMALL_BODY + 1]

    def __cinit__(self):
        self._rfd = self._wfd = self._shmfd = self._nrfd = self._nwfd = -1
        self._jrfd = self._jwfd = -1
        self._shm = NULL
        self._ring = NULL
        self._ring_size = 0
        self._ring_got = 0
        self._closed = True
        self._stall_ns = stall_ns(STALL_WARNING_S)

    def __init__(self, Py_ssize_t maxsize=0, bint joinable=False):
        if maxsize < 0:
            maxsize = 0
        self._attach(_shm.create(maxsize, joinable), maxsize, True)

    cdef _attach(self, tuple fds, Py_ssize_t maxsize, bint fresh):
        (self._rfd, self._wfd, self._shmfd, self._nrfd, self._nwfd,
         self._jrfd, self._jwfd) = fds
        cdef int s = self._shmfd
        self.maxsize = maxsize
        cdef uint64_t ring = _shm.attached_ring_size(s)
        self._shm = <uint8_t *>pq_mmap(s, RING_OFFSET + ring)
        if self._shm == NULL:
            _raise_errno(errno)
        self._ring_size = ring
        if ring:
            self._ring = self._shm + RING_OFFSET
        self._closed = False
        cdef int rc
        if fresh:
            for off in (O_WLOCK, O_RLOCK, O_TLOCK):
                rc = pq_mutex_init(self._shm + <size_t>off)
                if rc:
                    _raise_errno(rc)
            _shm.init_header(s, maxsize)
        self.capacity = _shm.pipe_capacity(self._wfd)

    def __reduce__(self):
        # Only meaningful while a child process is being started: DupFd hands
        # each fd to the new process.  The queue wrapper enforces that.
        self._check()
        fds = [DupFd(fd) if fd >= 0 else None
               for fd in (self._rfd, self._wfd, self._shmfd, self._nrfd, self._nwfd,
                          self._jrfd, self._jwfd)]
        return _rebuild, (*fds, self.maxsize, self._stall_ns)

    def __dealloc__(self):
        self._close_fds()
        if self._shm != NULL:
            munmap(self._shm, RING_OFFSET + self._ring_size)
            self._shm = NULL
            self._ring = NULL

    cdef void _close_fds(self) noexcept:
        cdef int fd
        for fd in (self._rfd, self._wfd, self._shmfd, self._nrfd, self._nwfd,
                   self._jrfd, self._jwfd):
            if fd >= 0:
                close(fd)
        self._rfd = self._wfd = self._shmfd = self._nrfd = self._nwfd = -1
        self._jrfd = self._jwfd = -1

    def close(self):
        """Close this process's fds; the shared page stays mapped until GC."""
        if not self._closed:
            self._closed = True
            self._close_fds()

    @property
    def closed(self):
        return self._closed

    @property
    def stall_warning(self):
        """Seconds a put() waits for room in a full pipe before it warns
        (PipeFullWarning), or None for never."""
        return None if self._stall_ns < 0 else self._stall_ns / 1e9

    @stall_warning.setter
    def stall_warning(self, seconds):
        self._stall_ns = stall_ns(seconds)

    @property
    def joinable(self):
        return self._jrfd >= 0

    def fileno(self):
        """The read end of the pipe, for poll/select-style waiting."""
        self._check()
        return self._rfd

    def writer_fileno(self):
        self._check()
        return self._wfd

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ValueError("channel is closed")
        return 0

    # -- counters ---------------------------------------------------------
    # The shared page stays mapped until the Channel is collected, so the
    # counters can be read after close(), as the stdlib's semaphore can.

    cdef inline int64_t _count(self) noexcept:
        # Callers make sure the page is mapped (see _check_page).
        cdef uint64_t p = pq_load(self._shm + O_PUTS)
        cdef uint64_t g = pq_load(self._shm + O_GETS)
        return <int64_t>(p - g)

    cdef inline int _check_page(self) except -1:
        if self._shm == NULL:
            raise ValueError("channel is not initialised")
        return 0

    def qsize(self):
        """Frames in the pipe, counting one being written."""
        self._check_page()
        cdef int64_t n = self._count()
        return n if n > 0 else 0

    def full(self):
        self._check_page()
        return self.maxsize > 0 and self._count() >= self.maxsize

    def empty(self):
        self._check_page()
        return self._count() <= 0

    # -- waiting ----------------------------------------------------------

    cdef int _wait_fd(self, int fd, short events, int64_t deadline) except -1:
        """1 when fd is ready, 0 when the deadline passed first."""
        cdef pollfd p
        cdef int rc, err, ms
        cdef int64_t left
        p.fd = fd
        p.events = events
        while True:
            if deadline < 0:
                ms = -1
            else:
                left = deadline - pq_now_ns()
                left = 0 if left <= 0 else (left + 999_999) // 1_000_000
                ms = <int>(left if left < MAX_POLL_MS else MAX_POLL_MS)
            with nogil:
                rc = poll(&p, 1, ms)
                err = errno
            if rc > 0:
                return 1
            if rc == 0:
                if deadline >= 0 and pq_now_ns() >= deadline:
                    return 0
                continue
            if err != EINTR:
                _raise_errno(err)
            PyErr_CheckSignals()

    cdef int _wait_writable(self, int64_t deadline) except -1:
        """A producer's wait for room in the pipe: 1 when there is some, 0
        when the deadline passed first.  Past the stall time, warns once."""
        cdef int64_t t0, warn_at
        if self._stall_ns < 0:
            return self._wait_fd(self._wfd, POLLOUT, deadline)
        t0 = pq_now_ns()
        warn_at = t0 + self._stall_ns
        if deadline < 0 or deadline > warn_at:
            if self._wait_fd(self._wfd, POLLOUT, warn_at):
                return 1
            warn_stalled(pq_now_ns() - t0, self.capacity)
        return self._wait_fd(self._wfd, POLLOUT, deadline)

    cdef int _lock(self, size_t off, int64_t deadline) except -1:
        """0 or PQ_OWNERDEAD once locked (the latter: its last owner died
        holding it); TIMED_OUT if the deadline passed first."""
        cdef void *m = self._shm + off
        cdef int rc = pq_mutex_trylock(m)
        cdef int64_t left, ns
        while True:
            if rc == 0 or rc == PQ_OWNERDEAD:
                return rc
            if rc != EBUSY and rc != ETIMEDOUT:
                _raise_errno(rc)
            PyErr_CheckSignals()
            ns = LOCK_SLICE_NS
            if deadline >= 0:
                left = deadline - pq_now_ns()
                if left <= 0:
                    return TIMED_OUT
                if left < ns:
                    ns = left
            with nogil:
                rc = pq_mutex_waitlock(m, ns)

    cdef inline void _unlock(self, size_t off) noexcept:
        pq_mutex_unlock(self._shm + off)

    # -- writing ----------------------------------------------------------

    def put(self, obj, timeout=None):
        """Write obj as one frame.  Raises queue.Full when the deadline passes
        before the frame could be written whole."""
        self._check()
        cdef int64_t deadline = _deadline(timeout)
        cdef uint8_t flags = 0
        cdef uint32_t nbuf = 0
        cdef list parts, oob
        # Pickle before taking any lock: a failure leaves the queue untouched.
        if type(obj) is bytes:
            self._put_parts([obj], 1, FLAG_RAW, 0, deadline)
            return
        obj = _as_buffer(obj)
        cdef _Pickling pickling = _take_pickling()
        try:
            first = pickling.dump(obj)
            if first is not None:
                parts, oob = [first], None
            else:
                parts, oob = pickling.chunks(), pickling.views()
        finally:
            pickling.done()
        cdef Py_ssize_t npickle = len(parts)
        if oob:
            flags = FLAG_OOB
            nbuf = len(oob)
            parts.extend(oob)
        self._put_parts(parts, npickle, flags, nbuf, deadline)

    def put_many(self, objs, timeout=None):
        """Write every object of the iterable objs, in order, each as its own
        frame.  All are pickled before the first is written, so a pickling
        error leaves the queue untouched.  Runs of small frames go out
        together, by one write of at most PIPE_BUF bytes under one hold of
        the write lock.  Raises BatchFull (a queue.Full) when the deadline
        passes first, saying how many went in."""
        self._check()
        cdef int64_t deadline = _deadline(timeout)
        cdef list items = list(objs)
        cdef Py_ssize_t n = len(items)
        if n == 0:
            return
        cdef _Batch batch = _Batch(items)
        batch.encode()
        self._put_batch(batch, deadline)

    cdef int _put_batch(self, _Batch b, int64_t deadline) except -1:
        cdef Py_ssize_t n = b.n, i = 0, j, k, room
        cdef uint64_t size, w
        cdef int niov
        cdef iovec iov[3 * GROUP_MAX]
        try:
            while i < n:
                if b.kind[i] == KIND_BIG:
                    self._put_parts(b.parts[i], b.npickle[i], b.flags[i], b.nbuf[i], deadline)
                    i += 1
                    continue
                # A run of small frames: as many as fit in PIPE_BUF bytes and
                # in the free slots of a bounded queue, an odd number of them.
                room = n
                if self.maxsize > 0:
                    room = self.maxsize - self._count()
                j = i
                size = 0
                while j < n and j - i < room and j - i < GROUP_MAX and b.kind[j] == KIND_SMALL:
                    w = HDR + b.length[j] + 1
                    if size + w > <uint64_t>PIPE_BUF:
                        break
                    size += w
                    j += 1
                k = j - i
                if k > 1 and k % 2 == 0:
                    k -= 1
                if k <= 1:
                    k = 1  # one frame, as put() writes it (waiting for a free slot)
                size = 0
                niov = 0
                for j in range(i, i + k):
                    iov[niov].iov_base = b.hdrs + j * HDR
                    iov[niov].iov_len = HDR
                    iov[niov + 1].iov_base = b.body[j]
                    iov[niov + 1].iov_len = b.length[j]
                    iov[niov + 2].iov_base = &MARK_COMMIT
                    iov[niov + 2].iov_len = 1
                    niov += 3
                    size += HDR + b.length[j] + 1
                # The lead's header says what follows it (see FLAG_GROUP).
                _mark_group(b.hdrs + i * HDR, <uint32_t>(k - 1),
                            <uint32_t>(size - HDR - b.length[i] - 1))
                if self._put_frame(b.hdrs + i * HDR, iov, niov, size, deadline, <uint64_t>k, NULL):
                    i += k
                # else: the free slots went to another producer; look again.
        except queue.Full:
            raise BatchFull(i, n) from None
        except BaseException as exc:
            _note_put_many(exc, i, n)
            raise
        return 0

    cdef int _put_parts(self, list parts, Py_ssize_t npickle, uint8_t flags, uint32_t nbuf,
                        int64_t deadline) except -1:
        """Write one frame whose body is parts: the pickle's npickle chunks
        (or the bytes), then its out-of-band buffers.  Its large part (the
        buffers, or the bytes) goes through the ring when it has room."""
        cdef uint8_t hdr[HDR]
        cdef uint8_t ref[RING_REF]
        # The common frame, one or two parts and no buffers, needs no heap.
        cdef Py_buffer views_s[2]
        cdef iovec segs_s[4]
        cdef iovec iov_s[8]
        cdef uint8_t table_s[1]
        cdef Py_buffer *views = views_s
        cdef iovec *segs = segs_s
        cdef iovec *iov = iov_s
        cdef uint8_t *table = table_s
        cdef Py_ssize_t nviews = 0, nsegs = 1, i, rfirst
        cdef uint64_t length = 0, rlen = 0
        cdef size_t niov_max
        cdef int niov
        cdef RingPut rp
        try:
            # segs[0] is the ring reference, for a ring frame only; then the
            # body: [length table,] pickle or bytes, [buffers...]
            if len(parts) > 2 or nbuf:
                views = <Py_buffer *>PyMem_Malloc(len(parts) * sizeof(Py_buffer))
                segs = <iovec *>PyMem_Malloc((len(parts) + 2) * sizeof(iovec))
                table = <uint8_t *>PyMem_Malloc(nbuf * 8 + 1)
                if views == NULL or segs == NULL or table == NULL:
                    raise MemoryError()
            segs[0].iov_base = ref
            segs[0].iov_len = RING_REF
            if nbuf:
                segs[1].iov_base = table
                segs[1].iov_len = nbuf * 8
                nsegs = 2
            for part in parts:
                PyObject_GetBuffer(part, &views[nviews], PyBUF_SIMPLE)
                segs[nsegs].iov_base = views[nviews].buf
                segs[nsegs].iov_len = views[nviews].len
                nviews += 1
                nsegs += 1
            for i in range(nbuf):
                _put_u64(table + 8 * i, <uint64_t>views[npickle + i].len)
            for i in range(1, nsegs):
                length += segs[i].iov_len

            niov_max = 2 + nsegs + 2 * _nchunks(length)
            if niov_max > 8:
                iov = <iovec *>PyMem_Malloc(niov_max * sizeof(iovec))
                if iov == NULL:
                    raise MemoryError()

            # The ring's part: the buffers, or the bytes.
            rfirst = nsegs
            if self._ring != NULL:
                if nbuf:
                    rfirst = 2 + npickle
                elif flags & FLAG_RAW:
                    rfirst = 1
                for i in range(rfirst, nsegs):
                    rlen += segs[i].iov_len
            if rlen >= RING_MIN and rlen <= self._ring_size // RING_SHARE:
                rp.src = segs + rfirst
                rp.nsrc = <int>(nsegs - rfirst)
                rp.length = rlen
                rp.ref = ref
                _fill_header(hdr, flags | FLAG_RING, nbuf, length - rlen + RING_REF)
                niov = _frame_iov(iov, hdr, segs, rfirst, length - rlen + RING_REF)
                if self._put_frame(hdr, iov, niov, _wire_size(length - rlen + RING_REF),
                                   deadline, 1, &rp) != 2:
                    return 0
                # The ring had no room: through the pipe, then.
            _fill_header(hdr, flags, nbuf, length)
            niov = _frame_iov(iov, hdr, segs + 1, nsegs - 1, length)
            self._put_frame(hdr, iov, niov, _wire_size(length), deadline, 1, NULL)
        finally:
            for i in range(nviews):
                PyBuffer_Release(&views[i])
            if views != views_s:
                PyMem_Free(views)
            if segs != segs_s:
                PyMem_Free(segs)
            if iov != iov_s:
                PyMem_Free(iov)
            if table != table_s:
                PyMem_Free(table)
        return 0

    cdef int _put_frame(self, uint8_t *hdr, iovec *iov, int niov, uint64_t total,
                        int64_t deadline, uint64_t count, RingPut *ring) except -1:
        """Write iov: one frame (count 1), or count small frames that
        together fit in PIPE_BUF bytes; for a ring frame, ring says what goes
        into the ring.  1 when written; 0 when a bounded queue has no room
        for count > 1 frames (the caller sends fewer); 2 when the ring has
        no room for a ring frame (the caller sends it through the pipe)."""
        cdef int r
        # A frame that fits in the pipe is begun only once it fits whole, so a
        # timeout never cuts it; only a frame larger than the pipe is streamed
        # (holding the write lock) and can be left unfinished.
        cdef bint sized = total > <uint64_t>PIPE_BUF and total <= <uint64_t>self.capacity
        # Room for a sized frame is decided, and waited for, under the write
        # lock, by _begin_frame.
        while True:
            if self.maxsize > 0 and self._count() + <int64_t>count > self.maxsize:
                if count > 1:
                    return 0
                if not self._wait_room(deadline):
                    raise queue.Full
                continue
            if self._lock_writer(deadline, total) == TIMED_OUT:
                raise queue.Full
            try:
                r = self._begin_frame(hdr, iov, niov, total, sized, deadline, count, ring)
            finally:
                self._unlock(O_WLOCK)
            if r == PUT_DONE:
                return 1
            if r == PUT_NO_RING:
                return 2
            if r == PUT_UNSETTLED:
                # A writer was killed inside a write; wait (not holding the
                # lock) for a reader to drain the pipe and settle where it
                # stopped.
                if not self._nap(SETTLE_NAP_NS, deadline):
                    raise queue.Full
            elif r == PUT_PIPE_FULL:
                if not self._wait_writable(deadline):
                    raise queue.Full

    cdef int _lock_writer(self, int64_t deadline, uint64_t room) except -1:
        """Take the write lock for a put.  Another writer holds it only while
        its frame goes in, and the stdlib's put() never fails for want of its
        internal lock: so, while the pipe has `room` bytes free, keep waiting
        past the deadline (up to LOCK_GRACE_NS), which is how put_nowait()
        on a queue with room succeeds when another process is mid-put."""
        cdef int st
        cdef int64_t now
        if deadline < 0:
            return self._lock(O_WLOCK, -1)
        while True:
            now = pq_now_ns()
            st = self._lock(O_WLOCK, deadline if deadline > now else now + LOCK_SLICE_NS)
            if st != TIMED_OUT:
                return st
            if (not self._has_room(room) or pq_load(self._shm + O_WR_HOLD)
                    or pq_now_ns() >= deadline + LOCK_GRACE_NS):
                return TIMED_OUT

    cdef int _begin_frame(self, uint8_t *hdr, iovec *iov, int niov, uint64_t total,
                          bint sized, int64_t deadline, uint64_t count,
                          RingPut *ring) except -1:
        """Holding the write lock: write the frame.  PUT_DONE, or what to
        wait for (not holding the lock) before trying again."""
        cdef uint8_t *shm = self._shm
        cdef int r
        if pq_load(shm + O_WR_HOLD):
            pq_store(shm + O_WR_HOLD, 0)  # left by a writer killed in that wait
        if pq_load(shm + O_WR_END):
            if not _parity(pq_load(shm + O_WR_BASE), pq_load(shm + O_PUTS)):
                # Its writer was killed after recording the frame and before
                # counting it: its header may be in the pipe, so it counts.
                pq_store(shm + O_PUTS, pq_load(shm + O_PUTS) + pq_load(shm + O_WR_CNT))
            r = self._pay_debt(deadline)
            if r == 0:
                raise queue.Full
            if r == 2:
                return PUT_UNSETTLED
        if self.maxsize > 0 and self._count() + <int64_t>count > self.maxsize:
            return PUT_AGAIN  # another producer took the last slot
        if sized and not self._has_room(total):
            # Wait for the room here, holding the lock: room waited for
            # without it can be taken, each time, by smaller frames that
            # other writers keep putting.  Here they queue behind this one.
            pq_store(shm + O_WR_HOLD, total)
            try:
                if not self._wait_space(total, deadline):
                    raise queue.Full
            finally:
                pq_store(shm + O_WR_HOLD, 0)
        if ring != NULL:
            if total <= <uint64_t>PIPE_BUF and not self._has_room(total):
                return PUT_PIPE_FULL  # before copying into the ring for nothing
            if not self._ring_put(ring):
                return PUT_NO_RING
        # The last frame is over: its bytes join WR_BASE before WR_POS is
        # reset (skipped if a writer killed here already moved it).
        if _parity(pq_load(shm + O_WR_BASE), pq_load(shm + O_PUTS)):
            pq_store(shm + O_WR_BASE, _next_base(pq_load(shm + O_WR_BASE), pq_load(shm + O_WR_POS)))
        # Record the frame before its first byte moves, so that whoever
        # takes the lock after us can end it if we stop midway.
        memcpy(shm + O_WR_HDR, hdr, HDR)
        pq_store(shm + O_WR_POS, 0)
        pq_store(shm + O_WR_TRY, 0)
        pq_store(shm + O_WR_CNT, count)
        pq_store(shm + O_WR_END, total)
        pq_store(shm + O_PUTS, pq_load(shm + O_PUTS) + count)
        if ring == NULL:
            r = self._write_iov(iov, niov, deadline, True)
        else:
            r = 0
            try:
                r = self._write_iov(iov, niov, deadline, True)
            finally:
                if r != 1 and pq_load(shm + O_WR_END) == 0:
                    # Nothing of the frame went in: nor did its ring data.
                    pq_store(shm + O_RING_HEAD, _get_u64(ring.ref))
        if r == 1:
            pq_store(shm + O_WR_END, 0)
            return PUT_DONE
        if r == 0:
            raise queue.Full
        # The pipe was full before our first byte and the frame was taken back.
        return PUT_PIPE_FULL

    cdef bint _ring_put(self, RingPut *ring) except -1:
        """Holding the write lock: copy a ring frame's large part into the
        ring and fill in the frame's ring reference.  0 if the ring has no
        room for it."""
        cdef uint8_t *shm = self._shm
        cdef uint64_t size = self._ring_size, n = ring.length
        cdef uint64_t head = pq_load(shm + O_RING_HEAD)
        cdef uint64_t tail = pq_load(shm + O_RING_TAIL)
        cdef uint64_t pos, off
        cdef uint8_t *dst
        cdef int i
        if head == tail and head:
            # Every frame in the ring has been read: start again at 0, on
            # pages that are warm.  No reader touches RING_TAIL until it has
            # read a ring frame, and none is in the pipe.
            pq_store(shm + O_RING_TAIL, 0)
            pq_store(shm + O_RING_HEAD, 0)
            head = tail = 0
        pos = head
        off = pos % size
        if off + n > size or (off and n <= RING_LAP and off + n > RING_LAP):
            # Never across the end, nor past RING_LAP (see _shm.RING_LAP):
            # to the start of the next lap, which must be free.
            pos += size - off
            off = 0
        if pos + n - tail > size:
            return 0
        dst = self._ring + off
        with nogil:
            for i in range(ring.nsrc):
                memcpy(dst, ring.src[i].iov_base, ring.src[i].iov_len)
                dst += ring.src[i].iov_len
        _put_u64(ring.ref, pos)
        _put_u64(ring.ref + 8, n)
        # Before the frame's first byte: a frame in the pipe always lies
        # below RING_HEAD.  A writer killed between here and the frame
        # leaves a gap, freed by the next ring frame read.
        pq_store(shm + O_RING_HEAD, pos + n)
        return 1

    cdef inline bint _has_room(self, uint64_t total) noexcept:
        cdef int used = pq_fionread(self._rfd)
        return used >= 0 and <uint64_t>(self.capacity - used) >= total

    cdef int _wait_space(self, uint64_t total, int64_t deadline) except -1:
        """Wait until `total` bytes fit in the pipe.  0 on timeout.  Past
        the stall time, warns once."""
        cdef int64_t nap = 50_000, left, t0 = pq_now_ns()
        cdef int64_t warn_at = -1 if self._stall_ns < 0 else t0 + self._stall_ns
        cdef timespec ts
        while not self._has_room(total):
            if warn_at >= 0 and (deadline < 0 or deadline > warn_at):
                if not self._wait_fd(self._wfd, POLLOUT, warn_at):
                    warn_stalled(pq_now_ns() - t0, self.capacity)
                    warn_at = -1
                    continue
            elif not self._wait_fd(self._wfd, POLLOUT, deadline):
                return 0
            if self._has_room(total):
                break
            if warn_at >= 0 and pq_now_ns() >= warn_at:
                warn_stalled(pq_now_ns() - t0, self.capacity)
                warn_at = -1
            # poll() says only that some space is free; sleep between checks.
            if deadline >= 0:
                left = deadline - pq_now_ns()
                if left <= 0:
                    return 0
                if left < nap:
                    nap = left
            ts.tv_sec = 0
            ts.tv_nsec = nap
            with nogil:
                nanosleep(&ts, NULL)
            PyErr_CheckSignals()
            if nap < 2_000_000:
                nap *= 2
        return 1

    cdef int _write_iov(self, iovec *iov, int niov, int64_t deadline,
                        bint frame) except -1:
        """Write all of iov, holding the write lock, counting progress in
        WR_POS.  1 when done; 0 when the deadline passed; 2 when a frame's
        first write found the pipe full.  A frame stopped after its first
        byte is left as debt for the next lock holder; one stopped before it
        is taken back."""
        cdef uint8_t *shm = self._shm
        cdef ssize_t n
        cdef int err, i = 0, cnt, k
        cdef uint64_t pos, want, limit = UINT64_MAX
        cdef size_t cut_len = 0
        cdef int cut
        cdef bint ok = False
        if frame and pq_load(shm + O_WR_END) > <uint64_t>self.capacity:
            limit = WRITE_SLICE  # streamed: see _shm.WRITE_SLICE
        try:
            while i < niov:
                cnt = niov - i
                if cnt > IOV_CAP:
                    cnt = IOV_CAP
                pos = pq_load(shm + O_WR_POS)
                want = 0
                for k in range(i, i + cnt):
                    want += iov[k].iov_len
                cut = -1
                if want > limit:
                    # This write ends inside iov[cut]: shorten that entry for
                    # the call, and give it back its length after.
                    want = 0
                    cut = i
                    while want + iov[cut].iov_len < limit:
                        want += iov[cut].iov_len
                        cut += 1
                    cut_len = iov[cut].iov_len
                    iov[cut].iov_len = limit - want
                    want = limit
                    cnt = cut - i + 1
                with nogil:
                    # Both stores are as close to the syscall as C allows, so
                    # that a SIGKILL leaves WR_POS exact, or at worst inside
                    # [WR_POS, WR_TRY] for _settle to resolve.
                    pq_store(shm + O_WR_TRY, pos + want)
                    n = writev(self._wfd, iov + i, cnt)
                    err = errno
                    if n >= 0:
                        pq_store(shm + O_WR_POS, pos + <uint64_t>n)
                    pq_store(shm + O_WR_TRY, pq_load(shm + O_WR_POS))
                if cut >= 0:
                    iov[cut].iov_len = cut_len
                if n >= 0:
                    i = _advance(iov, niov, i, n)
                    if i < niov:
                        # Part of a frame larger than the pipe is in: a signal
                        # handler that raises now abandons the frame (its
                        # debt is paid by the next writer), as one raising in
                        # the wait for room does, rather than once it is all
                        # sent.  WR_POS is exact here.
                        PyErr_CheckSignals()
                elif n < 0 and err == EINTR:
                    PyErr_CheckSignals()
                elif n < 0 and (err == EAGAIN or err == EWOULDBLOCK):
                    if frame and pq_load(shm + O_WR_POS) == 0:
                        return 2
                    if not self._wait_writable(deadline):
                        return 0
                else:
                    _raise_errno(err)
            ok = True
            return 1
        finally:
            if not ok and frame and pq_load(shm + O_WR_POS) == 0:
                # Nothing of this frame reached the pipe: it never existed.
                pq_store(shm + O_WR_END, 0)
                pq_store(shm + O_PUTS, pq_load(shm + O_PUTS) - pq_load(shm + O_WR_CNT))

    cdef int _pay_debt(self, int64_t deadline) except -1:
        """End a frame that an earlier writer left unfinished: fill up the
        chunk it stopped in and mark the frame TORN.  At most one chunk of
        filler.  Holding the write lock: 1 when paid, 0 if the deadline
        passed first, 2 if where that writer stopped is not known yet."""
        cdef uint8_t *shm = self._shm
        cdef uint64_t pos, mark, n, length = _get_u64(shm + O_WR_HDR + 8)
        cdef iovec iov[2]
        cdef int niov
        if not self._settle():
            return 2
        while pq_load(shm + O_WR_END):
            pos = pq_load(shm + O_WR_POS)
            if pos >= pq_load(shm + O_WR_END):
                # Its writer was killed after its last byte: nothing is owed.
                pq_store(shm + O_WR_END, 0)
                break
            niov = 0
            if pos < HDR:
                iov[0].iov_base = shm + O_WR_HDR + pos
                iov[0].iov_len = HDR - pos
                niov = 1
            else:
                mark = _next_mark(pos, length)
                if pos < mark:
                    n = mark - pos
                    iov[0].iov_base = _zeros
                    iov[0].iov_len = n if n < SCRATCH else SCRATCH
                else:
                    iov[0].iov_base = &MARK_TORN
                    iov[0].iov_len = 1
                niov = 1
            if not self._write_iov(iov, niov, deadline, False):
                return 0
            if pos >= HDR and pos == _next_mark(pos, length):
                pq_store(shm + O_WR_END, 0)  # the TORN marker is out
        return 1

    cdef int _settle(self) except -1:
        """Holding the write lock, with a frame left unfinished: make WR_POS
        exact.  A writer killed between a write and storing its new position
        leaves it somewhere in [WR_POS, WR_TRY].  Once every byte in the pipe
        is read and no reader is busy, the readers' own count tells it.
        1 when WR_POS is exact (or the frame is settled), 0 if not yet."""
        cdef uint8_t *shm = self._shm
        cdef uint64_t wpos = pq_load(shm + O_WR_POS)
        cdef uint64_t wtry = pq_load(shm + O_WR_TRY)
        cdef uint64_t end = pq_load(shm + O_WR_END)
        cdef uint64_t cnt = pq_load(shm + O_WR_CNT)
        cdef uint64_t rpos, pending, pos, read
        cdef int st
        if wtry <= wpos:
            return 1
        st = pq_mutex_trylock(shm + O_RLOCK)
        if st != 0 and st != PQ_OWNERDEAD:
            return 0
        try:
            if pq_fionread(self._rfd) != 0:
                return 0
            rpos = pq_load(shm + O_RD_POS)
            if (pq_load(shm + O_RD_TRY) > rpos
                    or not _parity(pq_load(shm + O_RD_BASE), pq_load(shm + O_GETS))):
                return 0  # a reader was killed too: the next get() settles it first
            if rpos and cnt > 1:
                # A group of frames goes into the pipe whole or not at all, so
                # a reader inside a frame with the pipe empty has read all of
                # it and stopped (killed) before counting it: count it here.
                read = self._read_step_end()
                if not read:
                    return 0
                pq_store(shm + O_LOST, pq_load(shm + O_LOST) + read)
                self._frame_done(read)
                rpos = 0
            pending = pq_load(shm + O_PUTS) - pq_load(shm + O_GETS)
            if rpos:
                pos = rpos  # a reader is inside this frame, and read all of it
            elif pending == 0:
                pos = end  # the frame went out whole and was read
            elif pending == cnt and wpos == 0:
                pos = 0  # not one byte of it reached the pipe
            else:
                return 0
            if pos < wpos or pos > wtry:
                return 0
            pq_store(shm + O_WR_POS, pos)
            pq_store(shm + O_WR_TRY, pos)
            if pos == 0:
                # The frame never existed.
                pq_store(shm + O_WR_END, 0)
                pq_store(shm + O_PUTS, pq_load(shm + O_PUTS) - cnt)
            return 1
        finally:
            self._unlock(O_RLOCK)

    cdef int _nap(self, int64_t ns, int64_t deadline) except -1:
        """Sleep ns, or until the deadline if sooner; 0 if it has passed."""
        cdef timespec ts
        cdef int64_t left
        if deadline >= 0:
            left = deadline - pq_now_ns()
            if left <= 0:
                return 0
            if left < ns:
                ns = left
        ts.tv_sec = ns // 1_000_000_000
        ts.tv_nsec = ns % 1_000_000_000
        with nogil:
            nanosleep(&ts, NULL)
        PyErr_CheckSignals()
        return 1

    cdef int _wait_room(self, int64_t deadline) except -1:
        """Wait for a get() to free a slot (maxsize > 0).  0 on timeout.

        A waiting producer is counted in WAITERS, changed only under the
        write lock; every get() that sees a waiter writes one byte into the
        notify pipe per frame it took.  The producer counts itself before it
        looks at the queue's size and the getter bumps GETS before it looks
        at WAITERS, so one of the two always sees the other."""
        cdef uint8_t *shm = self._shm
        cdef char b = 0
        cdef int64_t slice_end
        cdef bint registered = False, full = False
        if self._lock(O_WLOCK, deadline) == TIMED_OUT:
            return 0
        try:
            if self._count() >= self.maxsize:
                pq_store(shm + O_WAITERS, pq_load(shm + O_WAITERS) + 1)
                registered = True
                pq_fence()
                full = self._count() >= self.maxsize
        finally:
            self._unlock(O_WLOCK)
        if not registered:
            return 1
        try:
            if full:
                slice_end = pq_now_ns() + ROOM_SLICE_NS
                if deadline >= 0 and deadline < slice_end:
                    slice_end = deadline
                if self._wait_fd(self._nrfd, POLLIN, slice_end):
                    with nogil:
                        read(self._nrfd, &b, 1)
        finally:
            self._lock(O_WLOCK, -1)
            pq_store(shm + O_WAITERS, pq_load(shm + O_WAITERS) - 1)
            self._unlock(O_WLOCK)
        return deadline < 0 or pq_now_ns() < deadline

    # -- the read lock, for code that takes a queue's _rlock itself ---------

    def acquire_read_lock(self, timeout=None):
        """Take the read lock (as get() does for one frame).  False on timeout."""
        self._check()
        return self._lock(O_RLOCK, _deadline(timeout)) != TIMED_OUT

    def release_read_lock(self):
        self._check_page()
        cdef int rc = pq_mutex_unlock(self._shm + O_RLOCK)
        if rc:
            _raise_errno(rc)

    # -- tasks (JoinableQueue) ----------------------------------------------

    cdef inline int64_t _unfinished(self) noexcept:
        cdef uint8_t *shm = self._shm
        return <int64_t>(pq_load(shm + O_PUTS) - pq_load(shm + O_LOST)
                         - pq_load(shm + O_DONE))

    cdef int _check_joinable(self) except -1:
        self._check()
        if self._jrfd < 0:
            raise ValueError("channel is not joinable")
        return 0

    def unfinished(self):
        """Frames put and not yet marked done with task_done()."""
        self._check_page()
        cdef int64_t n = self._unfinished()
        return n if n > 0 else 0

    def task_done(self):
        """Mark one frame's task done; ValueError if none is unfinished."""
        self._check_joinable()
        cdef uint8_t *shm = self._shm
        cdef int64_t left
        cdef uint64_t joiners
        cdef char b = 0
        self._lock(O_TLOCK, -1)
        try:
            left = self._unfinished()
            if left <= 0:
                raise ValueError("task_done() called too many times")
            pq_store(shm + O_DONE, pq_load(shm + O_DONE) + 1)
            joiners = pq_load(shm + O_JOINERS) if left == 1 else 0
        finally:
            self._unlock(O_TLOCK)
        # One byte per joiner; a full pipe already holds enough wake-ups.
        while joiners > 0:
            joiners -= 1
            with nogil:
                write(self._jwfd, &b, 1)

    def join(self, timeout=None):
        """Wait until every frame put is marked done.  False on timeout."""
        self._check_joinable()
        cdef uint8_t *shm = self._shm
        cdef int64_t deadline = _deadline(timeout), slice_end
        cdef char b
        cdef bint done
        while True:
            self._lock(O_TLOCK, -1)
            try:
                done = self._unfinished() <= 0
                if not done:
                    pq_store(shm + O_JOINERS, pq_load(shm + O_JOINERS) + 1)
            finally:
                self._unlock(O_TLOCK)
            if done:
                return True
            try:
                slice_end = pq_now_ns() + JOIN_SLICE_NS
                if deadline >= 0 and deadline < slice_end:
                    slice_end = deadline
                if self._wait_fd(self._jrfd, POLLIN, slice_end):
                    with nogil:
                        read(self._jrfd, &b, 1)
            finally:
                self._lock(O_TLOCK, -1)
                pq_store(shm + O_JOINERS, pq_load(shm + O_JOINERS) - 1)
                self._unlock(O_TLOCK)
            if deadline >= 0 and pq_now_ns() >= deadline:
                return self._unfinished() <= 0

    # -- reading ----------------------------------------------------------

    cdef int _lock_reader(self, int64_t deadline) except -1:
        """Take the read lock for a get: 1 once held (waiting for data first,
        without it, if another reader has it), 0 if the deadline passed."""
        cdef int st = pq_mutex_trylock(self._shm + O_RLOCK)
        if st != 0 and st != PQ_OWNERDEAD:
            if st != EBUSY:
                _raise_errno(st)
            if not self._wait_fd(self._rfd, POLLIN, deadline):
                return 0
            if self._lock(O_RLOCK, deadline) == TIMED_OUT:
                return 0
        return 1

    cdef void _unlock_reader(self, uint64_t before) noexcept:
        """The finally of a get: release the read lock and wake producers
        for the frames taken since GETS was `before`."""
        cdef uint64_t taken = pq_load(self._shm + O_GETS) - before
        self._unlock(O_RLOCK)
        if taken and self.maxsize > 0:
            self._wake_producers(taken)

    def get(self, timeout=None):
        """Read and unpickle one frame.  Raises queue.Empty when no frame
        starts before the deadline."""
        self._check()
        cdef int64_t deadline = _deadline(timeout)
        cdef uint64_t before
        cdef bint wait_first = self._drained
        while True:
            if wait_first and not self._wait_fd(self._rfd, POLLIN, deadline):
                raise queue.Empty
            wait_first = False
            if not self._lock_reader(deadline):
                raise queue.Empty
            before = pq_load(self._shm + O_GETS)
            try:
                frame = self._read_frame(1)
                if frame is False:
                    self._frame_lost()
            finally:
                self._unlock_reader(before)
            if frame is None:
                if not self._wait_fd(self._rfd, POLLIN, deadline):
                    raise queue.Empty
                continue
            if frame is False:
                continue  # a torn frame: its writer gave up, nothing to deliver
            self._drained = self._count() <= 0
            data, buffers = frame
            try:
                item = _unpickle(data, buffers)
            except BaseException as exc:
                _rescue(exc, data, buffers)
                raise
            _hand_over(item, False)
            return item

    def get_many(self, Py_ssize_t max_messages, timeout=None):
        """Read and unpickle up to max_messages frames, in order, under one
        hold of the read lock: wait (as get() does) for the first, then take
        those that follow while the pipe holds more.  Every frame read is
        returned; none is kept back.  Raises queue.Empty when no frame starts
        before the deadline."""
        self._check()
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        cdef int64_t deadline = _deadline(timeout)
        cdef uint64_t base0, before, ring0
        cdef list frames = []
        while True:
            if not self._lock_reader(deadline):
                raise queue.Empty
            before = pq_load(self._shm + O_GETS)
            base0 = pq_load(self._shm + O_RD_BASE)
            ring0 = self._ring_got
            try:
                try:
                    while True:
                        frame = self._read_frame(max_messages - len(frames))
                        if frame is None:
                            break
                        if frame is False:
                            self._frame_lost()  # torn: its writer gave up
                            continue
                        if type(frame) is list:
                            frames.extend(<list>frame)  # a group, by one read
                        else:
                            frames.append(frame)
                        # Only as far as the pipe goes now (no wait once there
                        # is something to return: the next _read_frame finds
                        # the pipe empty, one failed read per batch rather
                        # than a FIONREAD per frame), and only while the
                        # frames are small enough for the batch to pay.
                        if (len(frames) >= max_messages
                                or ((pq_load(self._shm + O_RD_BASE) - base0) & (BASE_PARITY - 1))
                                + self._ring_got - ring0 >= BATCH_BYTES):
                            break
                finally:
                    self._unlock_reader(before)
            except BaseException as exc:
                if frames:
                    # Interrupted (a signal handler raised) with frames taken:
                    # they go with the exception, not lost.
                    attach_messages(exc, _unpickle_all(frames, False), len(frames))
                raise
            if frames:
                out = _unpickle_all(frames, True)
                _hand_over(out, True)
                return out
            if not self._wait_fd(self._rfd, POLLIN, deadline):
                raise queue.Empty

    cdef void _wake_producers(self, uint64_t taken) noexcept:
        # One byte per frame taken, while producers wait for room: each byte
        # wakes one of them.  Stray bytes only cause a spurious re-check.
        cdef char b = 0
        pq_fence()
        if pq_load(self._shm + O_WAITERS) == 0:
            return
        while taken > 0:
            taken -= 1
            with nogil:
                write(self._nwfd, &b, 1)

    cdef void _frame_lost(self) noexcept:
        """Holding the read lock: a frame begun is never to be delivered."""
        pq_store(self._shm + O_LOST, pq_load(self._shm + O_LOST) + 1)

    cdef void _frame_done(self, uint64_t count=1) noexcept:
        cdef uint8_t *shm = self._shm
        # RD_BASE first: a reader killed before GETS counts the frame leaves
        # the parity bit to say that the frame is over (see _read_frame), and
        # RD_CNT how many frames GETS still owes.
        pq_store(shm + O_RD_CNT, count)
        pq_store(shm + O_RD_BASE, _next_base(pq_load(shm + O_RD_BASE), pq_load(shm + O_RD_POS)))
        pq_store(shm + O_RD_TRY, 0)
        pq_store(shm + O_RD_POS, 0)
        pq_store(shm + O_GETS, pq_load(shm + O_GETS) + count)

    cdef uint64_t _read_step_end(self) noexcept:
        """Holding the read lock: how many frames a reader stopped at RD_POS
        has read all of: 1 at the end of the frame in RD_HDR, the group's
        count at the end of a group that frame leads; 0 if inside a frame."""
        cdef const uint8_t *h = self._shm + O_RD_HDR
        cdef uint64_t pos = pq_load(self._shm + O_RD_POS)
        cdef uint64_t length = _get_u64(h + 8), end
        cdef uint32_t nbuf = _get_u32(h + 4)
        if pos < HDR or not _header_ok(h):
            return 0
        end = HDR + length + _nchunks(length)
        if pos == end:
            return 1
        if (h[3] & FLAG_GROUP) and pos == end + (nbuf & GROUP_BYTES):
            return (nbuf >> GROUP_SHIFT) + 1
        return 0

    cdef object _read_frame(self, Py_ssize_t room):
        """Holding the read lock: None if the pipe is empty, False for a torn
        frame, else (data, buffers or None); or, when the frame leads a
        group that fits in room frames, the list of the group's frames."""
        cdef uint8_t *shm = self._shm
        cdef ssize_t n
        cdef int err
        if not _parity(pq_load(shm + O_RD_BASE), pq_load(shm + O_GETS)):
            # A reader was killed in _frame_done: the frame is over, count it.
            pq_store(shm + O_RD_TRY, 0)
            pq_store(shm + O_RD_POS, 0)
            pq_store(shm + O_GETS, pq_load(shm + O_GETS) + pq_load(shm + O_RD_CNT))
        if pq_load(shm + O_RD_TRY) > pq_load(shm + O_RD_POS):
            self._settle_read()
        # The rest of a frame that a reader before us began and never
        # finished (it was killed or interrupted): it is dropped.
        if pq_load(shm + O_RD_POS):
            self._skip_frame()
        # The header goes straight into shared memory, so that a successor
        # can finish this frame if we stop partway through it.
        cdef ssize_t got = -1
        cdef uint64_t length
        with nogil:
            pq_store(shm + O_RD_TRY, HDR)  # see _read_iov
            n = read(self._rfd, shm + O_RD_HDR, HDR)
            err = errno
            if n > 0:
                pq_store(shm + O_RD_POS, <uint64_t>n)
            pq_store(shm + O_RD_TRY, <uint64_t>n if n > 0 else 0)
            length = _get_u64(shm + O_RD_HDR + 8)
            if (n == HDR and _header_ok(shm + O_RD_HDR)
                    and (shm[O_RD_HDR + 3] & ~FLAG_RAW) == 0 and length <= SMALL_BODY):
                # A small frame: its body and marker with the same release.
                pq_store(shm + O_RD_TRY, HDR + length + 1)
                got = read(self._rfd, self._small, length + 1)
                if got > 0:
                    pq_store(shm + O_RD_POS, HDR + <uint64_t>got)
                pq_store(shm + O_RD_TRY, pq_load(shm + O_RD_POS))
        if got >= 0:
            return self._small_frame(length, <uint64_t>got)
        if n < 0:
            if err == EAGAIN or err == EWOULDBLOCK:
                return None
            if err == EINTR:
                PyErr_CheckSignals()
                return None
            _raise_errno(err)
        if n == 0:
            raise EOFError("pipeq: every write end of the pipe is closed")
        if n < HDR and not self._finish_header():
            self._frame_done()
            return False
        return self._read_body(room)

    cdef object _small_frame(self, uint64_t length, uint64_t got):
        """Holding the read lock, a small frame's header read and got bytes
        of its body and marker in _small: the frame, as _read_body returns
        it.  got is all of them but for a writer that broke the pipe's
        atomic write (not pipeq): then the rest is read as for any frame."""
        cdef uint8_t flags = self._shm[O_RD_HDR + 3]
        cdef uint64_t body = got if got < length else length
        cdef uint8_t marker
        cdef int r
        if got == length + 1:  # always, from a pipeq writer
            data = PyBytes_FromStringAndSize(<const char *>self._small, length)
            marker = self._small[length]
            if marker == MARK_TORN:
                r = SPAN_TORN
            elif marker != MARK_COMMIT:
                raise StreamError(f"pipeq: bad end-of-frame marker {marker:#04x}")
            else:
                r = SPAN_END
        else:
            data = PyBytes_FromStringAndSize(NULL, length)
            memcpy(PyBytes_AS_STRING(data), self._small, body)
            r = self._read_span(PyBytes_AS_STRING(data) + body, length - body, length)
        return self._end_frame(r, length, flags, data, (), 0, 0)

    cdef int _finish_header(self) except -1:
        """Read the rest of a partial header and check it.  0 if its writer
        abandoned the frame (which is then dropped), else 1."""
        cdef uint8_t *shm = self._shm
        cdef iovec iov
        cdef uint64_t pos = pq_load(shm + O_RD_POS)
        if pos < HDR:
            iov.iov_base = shm + O_RD_HDR + pos
            iov.iov_len = HDR - pos
            if not self._read_iov(&iov, 1):
                return 0
        return 1

    cdef uint64_t _header_length(self) except? 0xFFFFFFFFFFFFFFFF:
        cdef const uint8_t *h = self._shm + O_RD_HDR
        cdef uint64_t length = _get_u64(h + 8)
        if not _header_ok(h):
            pq_store(self._shm + O_RD_POS, 0)
            pq_store(self._shm + O_RD_TRY, 0)
            raise StreamError(
                f"pipeq: not a pipeq frame header: {bytes(h[:HDR])!r}; "
                "something other than pipeq wrote into the queue's pipe")
        return length

    cdef object _read_body(self, Py_ssize_t room):
        cdef uint8_t *shm = self._shm
        cdef uint64_t length = self._header_length()
        cdef uint8_t flags = shm[O_RD_HDR + 3]
        cdef uint32_t nbuf = _get_u32(shm + O_RD_HDR + 4)
        if flags & FLAG_GROUP:
            if <Py_ssize_t>(nbuf >> GROUP_SHIFT) < room:
                return self._read_group(length, flags, nbuf)
            nbuf = 0  # read the lead alone: the rest are frames of their own
        cdef uint8_t *table = NULL
        cdef uint8_t ref[RING_REF]
        cdef uint64_t rest = length, blen, rpos = 0, rlen = 0, rleft = 0
        cdef uint32_t i
        cdef int r = SPAN_MORE
        cdef bint ring = flags & FLAG_RING
        if ring:
            r = self._read_span(<char *>ref, RING_REF, length)
            if r == SPAN_TORN:
                return self._torn_or_bad(r)
            # Checked once the frame is read whole (_ring_get): a torn one is
            # dropped, whatever its ring reference and table say.
            rpos = _get_u64(ref)
            rlen = _get_u64(ref + 8)
            rleft = rlen if rlen <= self._ring_size else 0  # allocate no more
            rest -= RING_REF
        buffers = None
        try:
            if nbuf:
                table = <uint8_t *>PyMem_Malloc(nbuf * 8)
                if table == NULL:
                    raise MemoryError()
                r = self._read_span(<char *>table, nbuf * 8, length)
                if r != SPAN_MORE:
                    return self._torn_or_bad(r)
                rest -= nbuf * 8
                buffers = []
                for i in range(nbuf):
                    blen = _get_u64(table + 8 * i)
                    if ring:
                        if blen > rleft:
                            break  # a bad table: _ring_get finds the sum short
                        rleft -= blen
                    else:
                        if blen > rest:
                            raise StreamError("pipeq: buffer table exceeds the frame")
                        rest -= blen
                    buffers.append(PyByteArray_FromStringAndSize(NULL, blen))
        finally:
            PyMem_Free(table)
        # Fresh objects, read into directly: no copy on this side.
        if ring and flags & FLAG_RAW:
            # Filled from the ring; no sane reference is longer than it.
            data = PyBytes_FromStringAndSize(NULL, rlen if rlen <= self._ring_size else 0)
        else:
            data = PyBytes_FromStringAndSize(NULL, rest)
            if r == SPAN_MORE:
                r = self._read_span(PyBytes_AS_STRING(data), rest, length)
        if buffers is not None and not ring:
            for buf in buffers:
                if r != SPAN_MORE:
                    break
                r = self._read_span(PyByteArray_AS_STRING(buf), len(buf), length)
        return self._end_frame(r, length, flags, data,
                               buffers if buffers is not None else (), rpos, rlen)

    cdef int _ring_check(self, uint64_t pos, uint64_t n, uint64_t got) except -1:
        """A ring frame read whole, whose reference says n bytes at pos and
        whose destinations come to got bytes: as a writer makes it, or the
        frame is counted lost and a StreamError raised."""
        cdef uint64_t size = self._ring_size
        if (size == 0 or n == 0 or n > size or pos % size + n > size
                or pos + n > pq_load(self._shm + O_RING_HEAD) or got != n):
            self._frame_lost()
            self._frame_done()
            raise StreamError(
                f"pipeq: a frame refers to {n} bytes at {pos} in a ring of {size}"
                + ("" if got == n else f", its buffer table to {got}"))
        return 0

    cdef object _end_frame(self, int r, uint64_t length, uint8_t flags, object data,
                           object buffers, uint64_t rpos, uint64_t rlen):
        """A frame's last step, r what its body's last span returned: its
        COMMIT marker if that span did not reach it, then, for a ring frame,
        its data out of the ring, then the frame counted and returned as
        (data, buffers), (data, None) for a raw one; or what a torn or bad
        frame comes to (_torn_or_bad)."""
        if r == SPAN_MORE:
            r = self._read_span(NULL, 0, length)  # the COMMIT marker itself
        if r != SPAN_END:
            return self._torn_or_bad(r)
        if flags & FLAG_RING:
            self._ring_get(rpos, rlen, data if flags & FLAG_RAW else None, buffers)
        self._frame_done()
        if flags & FLAG_RAW:
            return data, None
        return data, buffers

    cdef int _ring_get(self, uint64_t pos, uint64_t n, object data, object buffers) except -1:
        """Holding the read lock, a ring frame read whole: copy its data out
        of the ring into data (raw bytes) or buffers, and free the ring up to
        its end."""
        cdef char *src
        cdef char *dst
        cdef Py_ssize_t blen
        cdef uint64_t got = 0
        if data is not None:
            got = len(<bytes>data)
        else:
            for buf in buffers:
                got += len(buf)
        self._ring_check(pos, n, got)
        src = <char *>self._ring + pos % self._ring_size
        if data is not None:
            dst = PyBytes_AS_STRING(data)
            with nogil:
                memcpy(dst, src, n)
        else:
            for buf in buffers:
                dst = PyByteArray_AS_STRING(buf)
                blen = len(buf)
                with nogil:
                    memcpy(dst, src, blen)
                src += blen
        self._ring_got += n
        pq_store(self._shm + O_RING_TAIL, pos + n)
        return 0

    cdef list _read_group(self, uint64_t length, uint8_t flags, uint32_t nbuf):
        """Holding the read lock, a group's lead header read: read the lead's
        body and COMMIT marker and every frame that follows it in the group,
        by one read (one write put them all in the pipe), and count them."""
        cdef uint64_t frames = nbuf >> GROUP_SHIFT, size = nbuf & GROUP_BYTES
        cdef uint64_t off = 0, blen, k
        cdef uint8_t marker = 0
        cdef const uint8_t *p
        cdef const uint8_t *h
        cdef iovec iov[3]
        data = PyBytes_FromStringAndSize(NULL, length)
        rest = PyBytes_FromStringAndSize(NULL, size)
        iov[0].iov_base = PyBytes_AS_STRING(data)
        iov[0].iov_len = length
        iov[1].iov_base = &marker
        iov[1].iov_len = 1
        iov[2].iov_base = PyBytes_AS_STRING(rest)
        iov[2].iov_len = size
        if not self._read_iov(iov, 3):
            return self._bad_group("it was cut short")
        if marker != MARK_COMMIT:
            return self._bad_group(f"its lead ends with {marker:#04x}")
        cdef list out = [(data, None if flags & FLAG_RAW else ())]
        p = <const uint8_t *>PyBytes_AS_STRING(rest)
        for k in range(frames):
            h = p + off
            if size - off < HDR + 1 or not _header_ok(h) or (h[3] & ~FLAG_RAW) or _get_u32(h + 4):
                return self._bad_group(f"frame {k + 1} has a bad header")
            blen = _get_u64(h + 8)
            if blen > size - off - HDR - 1 or h[HDR + blen] != MARK_COMMIT:
                return self._bad_group(f"frame {k + 1} overruns it")
            out.append((PyBytes_FromStringAndSize(<const char *>h + HDR, blen),
                        None if h[3] & FLAG_RAW else ()))
            off += HDR + blen + 1
        if off != size:
            return self._bad_group("its frames do not fill it")
        self._frame_done(frames + 1)
        return out

    cdef list _bad_group(self, str why):
        # The group's bytes are out of the pipe: count its frames as lost.
        cdef uint64_t n = (_get_u32(self._shm + O_RD_HDR + 4) >> GROUP_SHIFT) + 1
        pq_store(self._shm + O_LOST, pq_load(self._shm + O_LOST) + n)
        self._frame_done(n)
        raise StreamError(f"pipeq: a group of {n} frames is not valid: {why}")

    cdef object _torn_or_bad(self, int r):
        if r == SPAN_TORN:
            self._frame_done()
            return False
        pq_store(self._shm + O_RD_POS, 0)
        pq_store(self._shm + O_RD_TRY, 0)
        raise StreamError("pipeq: frame ended before its declared length")

    cdef int _read_span(self, char *dst, uint64_t n, uint64_t length) except -1:
        """Read the next n body bytes into dst, and with them any marker
        they reach.  SPAN_MORE when they are read and the frame goes on,
        SPAN_END when they end it with COMMIT, SPAN_TORN when it was torn."""
        cdef uint8_t *shm = self._shm
        cdef uint64_t pos, mark, take
        cdef uint8_t marker = 0
        cdef iovec iov[2]
        cdef int niov
        while True:
            pos = pq_load(shm + O_RD_POS)
            mark = _next_mark(pos, length)
            take = mark - pos
            if take > n:
                take = n
            niov = 0
            if take:
                iov[0].iov_base = dst
                iov[0].iov_len = take
                niov = 1
            if pos + take == mark:
                iov[niov].iov_base = &marker
                iov[niov].iov_len = 1
                niov += 1
            elif n == 0:
                return SPAN_MORE
            if not self._read_iov(iov, niov):
                return SPAN_TORN
            if dst != NULL:
                dst += take
            n -= take
            if pos + take == mark:
                if marker == MARK_TORN:
                    return SPAN_TORN
                if mark == HDR + length + _nchunks(length) - 1:
                    if marker != MARK_COMMIT or n:
                        raise StreamError(f"pipeq: bad end-of-frame marker {marker:#04x}")
                    return SPAN_END
                if marker != MARK_CONT:
                    raise StreamError(f"pipeq: bad chunk marker {marker:#04x}")
            if n == 0:
                return SPAN_MORE

    cdef int _skip_frame(self) except -1:
        """Drop the rest of a frame that another reader began."""
        cdef uint64_t length, left, n
        cdef int r = SPAN_MORE
        n = self._read_step_end()
        if n > 1:
            # A reader took the rest of a group with its lead by one read and
            # was killed before counting them: all are lost.
            pq_store(self._shm + O_LOST, pq_load(self._shm + O_LOST) + n)
            self._frame_done(n)
            return 0
        self._frame_lost()
        if not self._finish_header():
            self._frame_done()
            return 0
        length = self._header_length()
        # A reader that died after the COMMIT marker but before counting the
        # frame (a kill during that last read, settled) left RD_POS at its end.
        if pq_load(self._shm + O_RD_POS) < HDR + length + _nchunks(length):
            left = length - _body_done(pq_load(self._shm + O_RD_POS), length)
            while r == SPAN_MORE:
                n = left if left < SCRATCH else SCRATCH
                r = self._read_span(<char *>_scratch, n, length)
                left -= n
        self._frame_done()
        return 0

    cdef int _read_iov(self, iovec *iov, int niov) except -1:
        """Read all of iov holding the read lock, counting progress in
        RD_POS.  1 when done; 0 when the frame's writer abandoned it."""
        cdef uint8_t *shm = self._shm
        cdef ssize_t n
        cdef int err, i = 0, cnt, k
        cdef uint64_t want
        while i < niov:
            cnt = niov - i
            if cnt > IOV_CAP:
                cnt = IOV_CAP
            want = 0
            for k in range(i, i + cnt):
                want += iov[k].iov_len
            with nogil:
                # A SIGKILL that arrives during the read ends the process as
                # the read returns, the bytes taken and not counted: the true
                # position is then in [RD_POS, RD_TRY], for _settle_read.
                pq_store(shm + O_RD_TRY, pq_load(shm + O_RD_POS) + want)
                n = readv(self._rfd, iov + i, cnt)
                err = errno
                if n > 0:  # counted at once: see _write_iov
                    pq_store(shm + O_RD_POS, pq_load(shm + O_RD_POS) + <uint64_t>n)
                pq_store(shm + O_RD_TRY, pq_load(shm + O_RD_POS))
            if n > 0:
                i = _advance(iov, niov, i, n)
            elif n == 0:
                raise EOFError("pipeq: every write end of the pipe is closed")
            elif err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN or err == EWOULDBLOCK:
                if self._writer_gone():
                    return 0
                self._wait_fd(self._rfd, POLLIN, pq_now_ns() + MIDFRAME_SLICE_NS)
            else:
                _raise_errno(err)
        return 1

    cdef int _settle_read(self) except -1:
        """Holding the read lock, with RD_TRY > RD_POS: a reader was killed
        between a read and storing how far it got, so the true position is
        somewhere in [RD_POS, RD_TRY].  The pipe holds every byte written and
        not yet read, so it is WR_BASE + WR_POS - FIONREAD - RD_BASE, with
        FIONREAD taken while no write is in the kernel: a writer's counts
        that read the same, and exact (WR_TRY == WR_POS), on both sides of it."""
        cdef uint8_t *shm = self._shm
        cdef uint64_t b0, p0, w0, t0, base = 0, puts = 0, wpos = 0, wtry = 0, pos, lo, hi
        cdef uint64_t mask = BASE_PARITY - 1
        cdef int used = -1, st
        cdef bint held, same
        while True:
            st = pq_mutex_trylock(shm + O_WLOCK)
            held = st == 0 or st == PQ_OWNERDEAD
            if not held and st != EBUSY:
                _raise_errno(st)
            try:
                b0 = pq_load(shm + O_WR_BASE)
                p0 = pq_load(shm + O_PUTS)
                w0 = pq_load(shm + O_WR_POS)
                t0 = pq_load(shm + O_WR_TRY)
                pq_fence()
                used = pq_fionread(self._rfd)
                pq_fence()
                base = pq_load(shm + O_WR_BASE)
                puts = pq_load(shm + O_PUTS)
                wpos = pq_load(shm + O_WR_POS)
                wtry = pq_load(shm + O_WR_TRY)
                same = b0 == base and p0 == puts and w0 == wpos and t0 == wtry
                if not _parity(base, puts):
                    wpos = wtry = 0  # WR_BASE is already past the last frame
                if same and used >= 0 and wtry == wpos:
                    break
                if held and wtry > wpos:
                    # Its writer was killed inside a write too, and only we
                    # could settle where it stopped.
                    pq_store(shm + O_RD_POS, 0)
                    pq_store(shm + O_RD_TRY, 0)
                    raise StreamError(
                        "pipeq: a reader and a writer were both killed inside a "
                        "read and a write; where the stream stands is lost")
            finally:
                if held:
                    self._unlock(O_WLOCK)
            self._nap(SETTLE_NAP_NS, -1)  # a live writer is inside a write
        pos = ((base & mask) + wpos - <uint64_t>used - (pq_load(shm + O_RD_BASE) & mask)) & mask
        lo = pq_load(shm + O_RD_POS)
        hi = pq_load(shm + O_RD_TRY)
        if pos < lo or pos > hi:
            pq_store(shm + O_RD_POS, 0)
            pq_store(shm + O_RD_TRY, 0)
            raise StreamError(f"pipeq: lost count of the stream: at {pos}, not in [{lo}, {hi}]")
        pq_store(shm + O_RD_POS, pos)
        pq_store(shm + O_RD_TRY, pos)
        return 0

    cdef int _writer_gone(self) except -1:
        """Mid-frame with an empty pipe: 1 if the frame's writer abandoned it
        (its debt is then forgiven here), 0 if it is still writing."""
        cdef uint8_t *shm = self._shm
        cdef int st = pq_mutex_trylock(shm + O_WLOCK)
        cdef uint64_t wpos, rpos
        if st != 0 and st != PQ_OWNERDEAD:
            return 0  # a live writer holds it and will write more
        try:
            if pq_fionread(self._rfd) != 0:
                return 0
            wpos = pq_load(shm + O_WR_POS)
            rpos = pq_load(shm + O_RD_POS)
            if (pq_load(shm + O_WR_END) and wpos < rpos
                    and rpos <= pq_load(shm + O_WR_TRY)):
                # Its writer was killed between a write and storing how far
                # it got: every byte it wrote is read, so rpos is that far.
                wpos = rpos
                pq_store(shm + O_WR_POS, wpos)
                pq_store(shm + O_WR_TRY, wpos)
            if pq_load(shm + O_WR_END) == 0 or wpos != rpos:
                pq_store(shm + O_RD_POS, 0)
                pq_store(shm + O_RD_TRY, 0)
                how = ("finished it" if pq_load(shm + O_WR_END) == 0
                       else f"stopped at byte {wpos}")
                raise StreamError(f"pipeq: frame cut short at byte {rpos}; its writer {how}")
            pq_store(shm + O_WR_END, 0)
            return 1
        finally:
            self._unlock(O_WLOCK)


cdef int _hand_over(object got, bint batch) except -1:
    """Run the signal handlers that came due while this call worked, before
    it returns: one that raises then raises here, with the messages, rather
    than just after the return, in the caller, where they would be lost."""
    try:
        PyErr_CheckSignals()
    except BaseException as exc:
        if batch:
            attach_messages(exc, got, len(got))
        else:
            attach_messages(exc, [got], 1)
        raise
    return 0


cdef inline object _unpickle(object data, object buffers):
    """A frame's message: data itself for a raw frame (buffers None), else
    data unpickled with its out-of-band buffers.  Without any, loads() gets
    data alone: its positional fast path, where buffers=() costs a keyword
    parse per message; a pickle that refers to out-of-band data fails the
    same way either way."""
    if buffers is None:
        return data
    if not buffers:
        return _loads(data)
    return _loads(data, buffers=buffers)


cdef inline bint _interrupted(object exc):
    """Whether exc, raised while a message was unpickled, is not the
    message's fault but an interruption: KeyboardInterrupt, SystemExit and
    the like, which a signal handler raises at a check inside the message's
    own unpickling code (a reduce function written in Python, numpy's)."""
    return not isinstance(exc, Exception)


cdef int _rescue(object exc, object data, object buffers) except -1:
    """get()'s message, read and so out of the pipe, did not unpickle: exc.
    If it was interrupted, unpickle it once more (its reduce code runs
    again) and hand it over with exc, as exc.messages, rather than lose it."""
    if _interrupted(exc):
        try:
            item = _unpickle(data, buffers)
        except BaseException:
            return 0  # exc is raised; the message cannot be had
        attach_messages(exc, [item], 1)
    return 0


cdef list _unpickle_all(list frames, bint strict):
    """The messages of frames, in order.  Strict: if any cannot be
    unpickled, raise the first such error (an interruption before any
    other), the others attached to it (attach_messages); else skip those.
    An interrupted message is unpickled once more, as for get()."""
    cdef list out = []
    first = None
    for data, buffers in frames:
        try:
            out.append(_unpickle(data, buffers))
        except BaseException as exc:
            if _interrupted(exc):
                try:
                    out.append(_unpickle(data, buffers))
                except BaseException:
                    pass  # lost; exc says why
            if first is None or (_interrupted(exc) and not _interrupted(first)):
                first = exc
    if first is not None and strict:
        attach_messages(first, out, len(frames))
        raise first
    return out


cdef int _advance(iovec *iov, int niov, int i, ssize_t n) noexcept:
    """Consume n bytes from iov[i:], return the index of the first entry
    with bytes left."""
    while n > 0:
        if <size_t>n >= iov[i].iov_len:
            n -= iov[i].iov_len
            i += 1
        else:
            iov[i].iov_base = <char *>iov[i].iov_base + n
            iov[i].iov_len -= n
            n = 0
    while i < niov and iov[i].iov_len == 0:
        i += 1
    return i


def _rebuild(r, w, s, nr, nw, jr, jw, Py_ssize_t maxsize, stall=None):
    """Unpickle a Channel in a child process from the fds it was handed."""
    cdef Channel self = Channel.__new__(Channel)
    fds = tuple([d.detach() if d is not None else -1 for d in (r, w, s, nr, nw, jr, jw)])
    for fd in fds:
        if fd >= 0:
            os.set_inheritable(fd, False)
    self._attach(fds, maxsize, False)
    if stall is not None:
        self._stall_ns = stall
    return self
