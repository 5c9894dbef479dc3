"""The multiprocessing.Queue API on top of a core Channel."""

from __future__ import annotations

import operator
import select
from collections.abc import Iterable
from multiprocessing.context import BaseContext, assert_spawning
from queue import Empty, Full
from typing import Generic, TypeVar

from pipeq._core import Channel
from pipeq._errors import STALL_WARNING_S

__all__ = ["Empty", "Full", "JoinableQueue", "Queue", "SimpleQueue"]

T = TypeVar("T")

# get_many() without max_messages: faster-fifo's default, 1e9.
_NO_LIMIT = 1_000_000_000


class PipeEnd:
    """One end of a queue's pipe: enough of a ``multiprocessing.connection.Connection``
    for ``multiprocessing.connection.wait([q._reader, ...])`` and ``poll()``.

    It is readable when a message has begun to arrive; ``get()`` still reads
    whole messages only.  It cannot send or receive by itself.
    """

    __slots__ = ("_channel", "_writable")

    def __init__(self, channel: Channel, writable: bool) -> None:
        self._channel = channel
        self._writable = writable

    @property
    def closed(self) -> bool:
        return bool(self._channel.closed)

    @property
    def readable(self) -> bool:
        return not self._writable

    @property
    def writable(self) -> bool:
        return self._writable

    def fileno(self) -> int:
        if self._channel.closed:
            raise OSError("handle is closed")
        fd: int = self._channel.writer_fileno() if self._writable else self._channel.fileno()
        return fd

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether data is waiting to be read (reader end only)."""
        if self._writable:
            raise OSError("connection is write-only")
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        return bool(p.poll(None if timeout is None else max(timeout, 0.0) * 1000))

    def close(self) -> None:
        """Closes the whole queue in this process, as its owner's close() does."""
        self._channel.close()

    def __repr__(self) -> str:
        end = "writer" if self._writable else "reader"
        return f"<pipeq.queues.PipeEnd {end} {'closed' if self.closed else 'open'}>"


class ReadLock:
    """The queue's process-shared read lock, as ``q._rlock``: ``get()`` holds
    it while it reads one message.  Like multiprocessing's Lock, it is not
    recursive, and only the thread that took it may release it."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        return bool(self._channel.acquire_read_lock(timeout if block else 0))

    def release(self) -> None:
        self._channel.release_read_lock()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Ends:
    """_reader, _writer and _rlock, the names that code written against
    multiprocessing's queues reaches for."""

    _channel: Channel
    _reader: PipeEnd
    _writer: PipeEnd
    _rlock: ReadLock

    def _make_ends(self) -> None:
        self._reader = PipeEnd(self._channel, False)
        self._writer = PipeEnd(self._channel, True)
        self._rlock = ReadLock(self._channel)


class Queue(_Ends, Generic[T]):
    """A process-shared FIFO queue with the API of ``multiprocessing.Queue``.

    ``put()`` pickles in the calling thread and writes the whole message into
    a pipe before it returns.  There is no feeder thread, so a queue keeps
    working across ``fork()``, nothing is lost when a process exits right
    after ``put()``, and pickling errors are raised by ``put()`` itself.

    ``ctx`` is accepted for compatibility and not needed: one queue works
    with children started by fork, spawn and forkserver alike.

    ``stall_warning`` (not in multiprocessing): a ``put()`` that has waited
    this many seconds for room in the full pipe emits one
    :class:`pipeq.PipeFullWarning`, naming the pipe's capacity; ``None``
    turns it off.  Children get the queue with the same setting.
    """

    _joinable = False

    def __init__(
        self,
        maxsize: int = 0,
        *,
        ctx: BaseContext | None = None,
        stall_warning: float | None = STALL_WARNING_S,
    ) -> None:
        if maxsize > 0 or maxsize != maxsize:  # NaN: a TypeError, as in the stdlib
            operator.index(maxsize)
        self._maxsize = maxsize if maxsize > 0 else 0
        self._channel = Channel(self._maxsize, self._joinable)
        self._channel.stall_warning = stall_warning
        self._closed = False
        self._make_ends()

    # -- pickling: only while a child process is being started, as in the
    # -- stdlib (the fds travel with the new process).

    def __getstate__(self) -> tuple[int, Channel]:
        assert_spawning(self)
        self._check_closed()
        return (self._maxsize, self._channel)

    def __setstate__(self, state: tuple[int, Channel]) -> None:
        self._maxsize, self._channel = state
        self._closed = False
        self._make_ends()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"maxsize={self._maxsize}"
        return f"<{type(self).__module__}.{type(self).__qualname__} {state} at {id(self):#x}>"

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- the multiprocessing.Queue API

    def put(self, obj: T, block: bool = True, timeout: float | None = None) -> None:
        """Put obj into the queue.

        Unlike multiprocessing, returns only once the whole pickled message is
        in the pipe; a pickling error is raised here.  Blocks while the queue
        holds ``maxsize`` items or the pipe is full; raises ``queue.Full``
        when ``block`` is false or ``timeout`` passes first.
        """
        if self._closed:  # _check_closed(), inline on the hot path
            self._check_closed()
        self._channel.put(obj, timeout if block else 0)

    def put_nowait(self, obj: T) -> None:
        """Equivalent to ``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return an item; raise ``queue.Empty`` if none arrives in time.

        Waits for data without holding any lock, so a consumer killed while
        waiting leaves the queue usable for the others.
        """
        if self._closed:  # _check_closed(), inline on the hot path
            self._check_closed()
        item: T = self._channel.get(timeout if block else 0)
        return item

    def get_nowait(self) -> T:
        """Equivalent to ``get(False)``."""
        return self.get(False)

    # -- batches (not in multiprocessing; the names are faster-fifo's)

    def put_many(
        self, items: Iterable[T], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every item of ``items``, in order, each as its own message.

        All are pickled first, so a pickling error is raised before any is
        put.  Small messages go into the pipe together, many per write, which
        is where the speed of a batch comes from.  Blocks while the queue is
        full, as ``put()`` does; when ``block`` is false or ``timeout``
        passes first, raises :class:`pipeq.BatchFull` (a ``queue.Full``)
        whose ``done`` says how many of the items went in: the first ones.
        """
        self._check_closed()
        self._channel.put_many(items, timeout if block else 0)

    def put_many_nowait(self, items: Iterable[T]) -> None:
        """Equivalent to ``put_many(items, False)``."""
        self.put_many(items, False)

    def get_many(
        self,
        max_messages: int | None = None,
        block: bool = True,
        timeout: float | None = None,
        *,
        max_messages_to_get: int | None = None,
    ) -> list[T]:
        """Remove and return a list of 1 to ``max_messages`` items, in order.

        Waits, as ``get()`` does, for the first item (``queue.Empty`` if none
        arrives in time), then takes those already in the pipe behind it,
        holding the read lock once for all of them.  Every message it reads
        is returned: none is kept in a buffer of this process.  If one cannot
        be unpickled, its error is raised with the others that could be on it,
        as ``.messages``.  ``max_messages_to_get`` is faster-fifo's name for
        ``max_messages``; the default is no limit.
        """
        self._check_closed()
        if max_messages_to_get is not None:
            if max_messages is not None:
                raise TypeError("give max_messages or max_messages_to_get, not both")
            max_messages = max_messages_to_get
        if max_messages is None:
            limit = _NO_LIMIT
        elif isinstance(max_messages, bool):
            raise TypeError(
                "get_many()'s first argument is max_messages, an int, not a bool: "
                "pass block= by keyword"
            )
        else:
            limit = min(operator.index(max_messages), _NO_LIMIT)
        items: list[T] = self._channel.get_many(limit, timeout if block else 0)
        return items

    def get_many_nowait(self, max_messages: int | None = None) -> list[T]:
        """Equivalent to ``get_many(max_messages, False)``."""
        return self.get_many(max_messages, False)

    def qsize(self) -> int:
        """Approximate number of items in the queue.

        Works on macOS too (no ``sem_getvalue``) and has no 32,767 cap.
        Like multiprocessing's, still answers after ``close()``.
        """
        n: int = self._channel.qsize()
        return n

    def empty(self) -> bool:
        """True if the queue looked empty; approximate, as in multiprocessing.

        Still answers after ``close()``, where multiprocessing raises OSError.
        """
        return bool(self._channel.empty())

    def full(self) -> bool:
        """True if the queue held ``maxsize`` items; approximate, as in multiprocessing."""
        return bool(self._channel.full())

    def close(self) -> None:
        """Close this process's ends of the queue.

        Every item already put is in the pipe, so nothing needs flushing.
        """
        if not self._closed:
            self._closed = True
            self._channel.close()

    def join_thread(self) -> None:
        """Accepted for compatibility: there is no feeder thread to wait for.

        As in multiprocessing, may only be called after ``close()``.
        """
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """Accepted for compatibility: there is no feeder thread, so no data can be lost."""

    @property
    def pipe_capacity(self) -> int:
        """Bytes the underlying pipe holds; ``put()`` blocks when it is full.

        Not in multiprocessing: useful to size workloads that put before any
        consumer runs.
        """
        capacity: int = self._channel.capacity
        return capacity


class JoinableQueue(Queue[T]):
    """A :class:`Queue` with ``task_done()`` and ``join()``, as
    ``multiprocessing.JoinableQueue``.

    The count of unfinished tasks lives in the queue's shared page.  A message
    that never arrives whole (its producer was killed or interrupted midway,
    or the consumer reading it was killed) leaves the count, so ``join()``
    does not wait for it forever.
    """

    _joinable = True

    def task_done(self) -> None:
        """Mark one item got from the queue as processed.

        Raises ``ValueError`` if called more times than items were put.
        """
        self._check_closed()
        self._channel.task_done()

    def join(self) -> None:
        """Block until every item put has been marked done with ``task_done()``."""
        self._check_closed()
        self._channel.join()


class SimpleQueue(_Ends, Generic[T]):
    """The API of ``multiprocessing.SimpleQueue``: ``get``, ``put``, ``empty``
    and ``close``, unbounded, with blocking calls and no timeouts.

    Like :class:`Queue`, ``put()`` writes the whole message before it
    returns; it blocks only while the pipe is full (and warns, as
    :class:`Queue` does, after ``stall_warning`` seconds).
    """

    def __init__(
        self, *, ctx: BaseContext | None = None, stall_warning: float | None = STALL_WARNING_S
    ) -> None:
        self._channel = Channel(0)
        self._channel.stall_warning = stall_warning
        self._make_ends()

    def __getstate__(self) -> Channel:
        assert_spawning(self)
        return self._channel

    def __setstate__(self, state: Channel) -> None:
        self._channel = state
        self._make_ends()

    def __repr__(self) -> str:
        state = " closed" if self._channel.closed else ""
        return f"<{type(self).__module__}.{type(self).__qualname__}{state} at {id(self):#x}>"

    def _check_closed(self) -> None:
        # multiprocessing's SimpleQueue raises OSError from its closed pipe.
        if self._channel.closed:
            raise OSError(f"SimpleQueue {self!r} is closed")

    def put(self, obj: T) -> None:
        """Put obj into the queue; returns once the whole message is in the pipe."""
        self._check_closed()
        self._channel.put(obj, None)

    def get(self) -> T:
        """Remove and return an item, waiting as long as it takes."""
        self._check_closed()
        item: T = self._channel.get(None)
        return item

    def empty(self) -> bool:
        """True if no message is waiting; ``OSError`` after ``close()``, as in
        multiprocessing (where ``Queue.empty()`` still answers)."""
        self._check_closed()
        return bool(self._channel.empty())

    def close(self) -> None:
        """Close this process's ends of the queue."""
        self._channel.close()
