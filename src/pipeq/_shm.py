"""The wire format, the shared page's layout, and fd set-up common to both cores."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile
from pickle import PickleBuffer

# A frame is a 16-byte header, then the body cut into chunks of at most
# CHUNK bytes, each followed by a marker byte: CONT after every chunk but the
# last, COMMIT after the last.  A writer that stops midway fills up the chunk
# it was in and ends the frame there with TORN, so abandoning a frame costs at
# most one chunk of filler and readers drop it whole.
VERSION = 1
HEADER = struct.Struct("<2sBBIQ")  # b"pq", version, flags, n_buffers, body length
HDR = HEADER.size
MAGIC = b"pq"
FLAG_OOB = 0x01  # body = u64 length table, pickle, then out-of-band buffers
FLAG_RAW = 0x02  # body = a bytes object, sent without pickling
# The frame leads a group: small frames that put_many() sent by one write, so
# all of them are in the pipe once this header is.  n_buffers (no FLAG_OOB
# here) = the number of frames that follow it in the group << 16 | their wire
# bytes, so that get_many() can take the rest of the group by one read.
FLAG_GROUP = 0x04
GROUP_SHIFT = 16
GROUP_BYTES = (1 << GROUP_SHIFT) - 1
# The frame's large part is in the ring (see RING_OFFSET), not in the pipe.
# Its body starts with a ring reference, RING_REF: the u64 position (a count
# of ring bytes; the data lie at position % ring size, never across the
# ring's end) and the u64 length of what lies there.  With FLAG_OOB the rest
# of the body is the length table and the pickle, and the out-of-band
# buffers lie in the ring back to back; with FLAG_RAW the bytes lie there.
FLAG_RING = 0x08
RING_REF = struct.Struct("<QQ")
CHUNK = 1 << 20
MARK_CONT = 0xA7
MARK_COMMIT = 0xC3
MARK_TORN = 0x5A
OOB_MIN = 16 * 1024  # smaller pickle buffers are copied in band
# A frame larger than the pipe is streamed into it by writes of at most this
# many bytes.  A write as large as the pipe fills it, and the writer sleeps
# until the reader has drained it, then the reader sleeps until it is full
# again: two context switches a pipe's worth.  Smaller writes keep both sides
# running, the reader taking bytes out while the writer goes on (1 MiB numpy
# arrays on a 1 MiB pipe, 1x1: 2.0 -> 0.6 context switches and about 15%
# more messages a second).  It changes nothing on the wire.
WRITE_SLICE = 256 * 1024
MAX_BODY = 1 << 48  # no sane frame is larger; a bigger length means garbage


def chunks(length: int) -> int:
    """Number of chunks (and so of marker bytes) in a body of `length` bytes."""
    return max(1, -(-length // CHUNK))


def wire_size(length: int) -> int:
    return HDR + length + chunks(length)


def group_rest(flags: int, nbuf: int) -> tuple[int, int]:
    """(frames, wire bytes) that follow a frame in its group; (0, 0) if none."""
    if not flags & FLAG_GROUP:
        return 0, 0
    return nbuf >> GROUP_SHIFT, nbuf & GROUP_BYTES


def as_buffer(obj: object) -> object:
    """What to pickle for obj: a large bytearray as a PickleBuffer of itself.

    Protocol 5 pickles a bytearray in band (the pickler has its own code for
    the type, ahead of any reducer), so the reader would copy it out of the
    pickle into a second fresh bytearray.  A PickleBuffer goes out of band
    instead, and a pickle that is only that buffer unpickles to the buffer
    object the reader passes in: the fresh bytearray the pipe was read into,
    the message itself.  Only the message's top level: a bytearray inside
    another object still travels in band."""
    if type(obj) is bytearray and len(obj) >= OOB_MIN:
        return PickleBuffer(obj)
    return obj


def header_ok(magic: bytes, version: int, flags: int, nbuf: int, length: int) -> bool:
    """Whether a header's fields (HEADER.unpack's) make sense."""
    if magic != MAGIC or version != VERSION:
        return False
    if flags & ~(FLAG_OOB | FLAG_RAW | FLAG_GROUP | FLAG_RING) or length > MAX_BODY:
        return False
    if flags & FLAG_RING:
        # A pickle with its buffers in the ring, or raw bytes there.
        kind = flags & (FLAG_OOB | FLAG_RAW | FLAG_GROUP)
        if kind == FLAG_RAW:
            return nbuf == 0 and length == RING_REF.size
        if kind != FLAG_OOB:
            return False
        return nbuf != 0 and RING_REF.size + nbuf * 8 <= length
    if flags & FLAG_GROUP:
        # Only small frames form groups; an odd number of frames in all, and
        # every frame that follows is at least a header and a marker.
        frames, size = group_rest(flags, nbuf)
        return (
            not flags & FLAG_OOB
            and frames >= 2
            and frames % 2 == 0
            and size >= frames * (HDR + 1)
            and length < CHUNK
        )
    return (nbuf != 0) == bool(flags & FLAG_OOB) and nbuf * 8 <= length


# The shared page.  Writer fields share one cache line, reader fields another;
# the two process-shared mutexes sit on lines of their own.  Positions count
# the wire bytes of the frame in flight, header included; 0 means none.
SHM_SIZE = 4096
SHM_MAGIC = 0x48535150  # "PQSH"
O_MAGIC = 0  # u32
O_LAYOUT = 4  # u32
O_MAXSIZE = 8  # i64
O_PUTS = 64  # u64, frames begun; written under the write lock
O_WR_POS = 72  # u64, wire bytes of the last frame already in the pipe
O_WR_END = 80  # u64, that frame's wire size, or 0 once it is complete
O_WR_HDR = 88  # 16 bytes, that frame's header
O_WAITERS = 104  # u64, producers waiting for room (maxsize); under the write lock
# u64: where the write now in the kernel may take WR_POS.  Equal to WR_POS
# between writes; a writer killed between a write and storing its new WR_POS
# leaves it larger, and the true position somewhere in [WR_POS, WR_TRY].
O_WR_TRY = 112
# u64: the stream offset (wire bytes ever written, mod 2**63) at which the
# frame in WR_* begins, so that WR_BASE + WR_POS counts every byte written.
# Its top bit is the parity of the PUTS value it belongs to: a writer moves
# it past the last frame (flipping the bit) before PUTS counts the next one,
# so a writer killed in between leaves a bit that says so.  RD_BASE is the
# readers' twin, with GETS.
O_WR_BASE = 120
O_GETS = 128  # u64, frames consumed; written under the read lock
O_RD_POS = 136  # u64, wire bytes of the current frame already read
O_LOST = 144  # u64, frames begun but never delivered (torn, or skipped); read lock
O_RD_HDR = 152  # 16 bytes, the header being read
# u64: where the read now in the kernel may take RD_POS, as WR_TRY is for
# writes.  A reader killed between a read and storing its new RD_POS (the
# kernel took the bytes; a SIGKILL during the read lands just there) leaves
# it larger; the next reader finds the true position from the byte counts.
O_RD_TRY = 168
O_RD_BASE = 176  # u64: the stream offset of the frame being read; see WR_BASE
# u64: how many frames the reader now counting one off counts: 1, or a
# group's frames when get_many() took the rest of a group with its lead (see
# FLAG_GROUP).  Stored just before RD_BASE moves, so that a reader killed
# between RD_BASE and GETS leaves what GETS still owes.
O_RD_CNT = 184
BASE_PARITY = 1 << 63
# JoinableQueue: unfinished tasks = PUTS - LOST - DONE.
O_DONE = 192  # u64, task_done() calls; under the task lock
O_JOINERS = 200  # u64, processes waiting in join(); under the task lock
# u64: how many frames the write in WR_* carries: 1, or (put_many) an odd
# number of small frames sent by one write of at most PIPE_BUF bytes, which
# the pipe takes whole or not at all.  PUTS counts them all in one store;
# the count is odd so that WR_BASE's parity bit still tells whether it did.
O_WR_CNT = 208
# u64: the wire size of a frame that fits in the pipe whose writer holds the
# write lock while it waits for room for it, or 0.  Writers that find the
# lock taken do not wait past their deadline for such a holder.  A writer
# killed in that wait leaves it set until the next writer takes the lock.
O_WR_HOLD = 216
O_WLOCK = 256
O_RLOCK = 384
O_TLOCK = 512
LOCK_SPACE = 128
# The ring: a region of shared memory after the page, in the same file, for
# the large part of a frame (see FLAG_RING).  A writer holding the write lock
# copies that part in at RING_HEAD and moves RING_HEAD past it before the
# frame's first byte goes into the pipe; a reader holding the read lock
# copies it out once it has read the whole frame, then moves RING_TAIL to the
# end of that frame's data.  Frames are read in the order they were written,
# so RING_TAIL frees every region before it too: the region of a frame that
# is dropped (torn, or skipped after its reader was killed) is freed by the
# next ring frame read.  RING_HEAD - RING_TAIL bytes are in use; when none
# are, the next writer starts again at 0, so a queue whose consumers keep up
# reuses the same few warm pages.  A writer that finds no room sends the
# frame through the pipe as usual: the ring never makes anyone wait.
O_RING_HEAD = 640  # u64; under the write lock
O_RING_TAIL = 704  # u64; under the read lock, read by writers
RING_OFFSET = SHM_SIZE  # where the ring starts in the shared file
RING_SIZE = 32 << 20  # default; PIPEQ_RING_SIZE (bytes, 0 for none) overrides
RING_MIN = OOB_MIN  # frames with less than this to put in the ring do not use it
RING_SHARE = 4  # nor does a frame with more than ring size / RING_SHARE
# Frames of up to RING_LAP bytes go round the first RING_LAP bytes of the
# ring only: the next one starts again at 0 when it would end past RING_LAP
# and what is in use lies wholly after it.  A producer that runs ahead of its
# consumers then reuses a few MiB that stay in the CPU's caches, where going
# round the whole ring would write and read every byte from main memory
# (1 MiB bytes, one producer and one consumer: 10,700 -> 29,700 messages a
# second).  Larger frames take the ring as it comes.
RING_LAP = 4 << 20

DEFAULT_PIPE_SIZE = 65536


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _enlarge(fd: int) -> None:
    """Raise the pipe's capacity as far as the OS lets this process."""
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsz is None:
        return
    size = _pipe_max_size()
    while size > DEFAULT_PIPE_SIZE:
        try:
            fcntl.fcntl(fd, setsz, size)
            return
        except OSError:
            # EPERM: over this user's pipe-user-pages-soft budget.
            size //= 2


def pipe_capacity(fd: int) -> int:
    getsz = getattr(fcntl, "F_GETPIPE_SZ", None)
    if getsz is None:
        return DEFAULT_PIPE_SIZE  # macOS and the BSDs grow pipes to 64 KiB
    return fcntl.fcntl(fd, getsz)


def _pipe() -> tuple[int, int]:
    if hasattr(os, "pipe2"):
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    r, w = os.pipe()  # non-inheritable since Python 3.4
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def ring_size() -> int:
    """The ring size for a new queue: PIPEQ_RING_SIZE bytes (rounded down to
    whole pages; 0 for no ring), or RING_SIZE."""
    value = os.environ.get("PIPEQ_RING_SIZE", "").strip()
    if not value:
        return RING_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"PIPEQ_RING_SIZE must be a number of bytes, not {value!r}") from None
    if size < 0:
        raise ValueError(f"PIPEQ_RING_SIZE must not be negative, not {size}")
    return size - size % mmap.PAGESIZE


def _shared_page() -> int:
    """The shared page and, after it, the ring, in one memory-backed file.
    The ring's pages cost memory only once written."""
    ring = ring_size()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("pipeq", os.MFD_CLOEXEC)
    else:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="pipeq-", dir=where)
        os.unlink(path)
        # No ring in such a file: on disk it would be written back, and a
        # size-limited tmpfs that fills up kills a writer with SIGBUS.
        ring = 0
    try:
        os.ftruncate(fd, RING_OFFSET + ring)
    except BaseException:
        os.close(fd)
        raise
    return fd


def attached_ring_size(fd: int) -> int:
    """The ring size of the queue whose shared file is fd."""
    return max(os.fstat(fd).st_size - RING_OFFSET, 0)


def create(maxsize: int, joinable: bool = False) -> tuple[int, ...]:
    """New fds: data pipe (r, w), shared page; for a bounded queue, a pipe
    that getters use to wake producers waiting for room; for a joinable one,
    a pipe that task_done() uses to wake join().  Absent pipes are -1, -1."""
    fds: list[int] = []
    try:
        r, w = _pipe()
        fds += (r, w)
        _enlarge(w)
        fds.append(_shared_page())
        fds += _pipe() if maxsize > 0 else (-1, -1)
        fds += _pipe() if joinable else (-1, -1)
    except BaseException:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        raise
    return tuple(fds)


def init_header(fd: int, maxsize: int) -> None:
    os.pwrite(fd, struct.pack("<IIq", SHM_MAGIC, VERSION, maxsize), O_MAGIC)
