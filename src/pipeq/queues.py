"""The multiprocessing.Queue API on top of a core Channel."""

from __future__ import annotations

import types
from multiprocessing.context import BaseContext, assert_spawning
from queue import Empty, Full
from typing import Generic, TypeVar

from pipeq._core import Channel

__all__ = ["Queue", "Empty", "Full"]

T = TypeVar("T")


class Queue(Generic[T]):
    """A process-shared FIFO queue with the API of ``multiprocessing.Queue``.

    ``put()`` pickles in the calling thread and writes the whole message into
    a pipe before it returns.  There is no feeder thread, so a queue keeps
    working across ``fork()``, nothing is lost when a process exits right
    after ``put()``, and pickling errors are raised by ``put()`` itself.

    ``ctx`` is accepted for compatibility and not needed: one queue works
    with children started by fork, spawn and forkserver alike.
    """

    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, maxsize: int = 0, *, ctx: BaseContext | None = None) -> None:
        self._maxsize = maxsize if maxsize > 0 else 0
        self._channel = Channel(self._maxsize)
        self._closed = False

    # -- pickling: only while a child process is being started, as in the
    # -- stdlib (the fds travel with the new process).

    def __getstate__(self) -> tuple[int, Channel]:
        assert_spawning(self)
        self._check_closed()
        return (self._maxsize, self._channel)

    def __setstate__(self, state: tuple[int, Channel]) -> None:
        self._maxsize, self._channel = state
        self._closed = False

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
        self._check_closed()
        item: T = self._channel.get(timeout if block else 0)
        return item

    def get_nowait(self) -> T:
        """Equivalent to ``get(False)``."""
        return self.get(False)

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
