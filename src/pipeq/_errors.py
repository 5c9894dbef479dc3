"""Exceptions and warnings that both cores raise."""

from __future__ import annotations

import errno
import os
import queue
import sys
import warnings
from types import FrameType
from typing import Any, NoReturn

# How long put() waits for room in a full pipe before it warns, by default.
STALL_WARNING_S = 10.0


class StreamError(ValueError):
    """The bytes in the queue's pipe are not a valid pipeq frame.

    Raised by ``get()`` instead of unpickling noise or a huge allocation when
    something other than pipeq wrote into the pipe.
    """


class BatchFull(queue.Full):
    """``put_many()`` ran out of time (or, with ``block=False``, of room)
    before every item was in: the first ``done`` of the ``total`` items are
    in the queue, in order, and the rest are not.  A ``queue.Full``."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"put_many() put {done} of {total} items before the queue was full")
        self.done = done
        self.total = total

    def __reduce__(self) -> tuple[type[BatchFull], tuple[int, int]]:
        return type(self), (self.done, self.total)


def attach_messages(exc: BaseException, messages: list[Any], read: int) -> None:
    """A get() or get_many() raises exc after it had taken `read` messages
    out of the pipe: hand the ones it could unpickle to the caller with the
    exception, as ``exc.messages``, rather than lose them."""
    exc.messages = messages  # type: ignore[attr-defined]
    if hasattr(exc, "add_note"):  # 3.11+
        exc.add_note(
            f"pipeq: this call had taken {read} message(s) from the queue; "
            f"the {len(messages)} that could be unpickled are in this exception's "
            ".messages"
        )


class PipeFullWarning(RuntimeWarning):
    """``put()`` has waited a long time for room in the queue's full pipe.

    No consumer made room: typically a program that puts more than the pipe holds
    before any consumer runs.  See ``Queue(stall_warning=...)``.
    """


def raise_errno(err: int) -> NoReturn:
    """OSError for err (Python picks the subclass), worded for a queue."""
    if err == errno.EPIPE:
        raise BrokenPipeError(err, "Broken pipe: no process has the queue's read end open any more")
    raise OSError(err, os.strerror(err))


def warn_stalled(waited_ns: int, capacity: int) -> None:
    """Warn that a put() has waited waited_ns for room in a full pipe.

    The warning points at the first caller outside pipeq: the user's put().
    """
    level = 2
    f: FrameType | None = sys._getframe(1)
    while f is not None and f.f_globals.get("__name__", "").startswith("pipeq"):
        level, f = level + 1, f.f_back
    warnings.warn(
        PipeFullWarning(
            f"pipeq: put() has waited {waited_ns / 1e9:.1f} s for room in the "
            f"queue's pipe, which is full ({capacity} bytes): no consumer has "
            "made room in that time. Putting more than the pipe holds before "
            "any consumer runs blocks here: start the consumers first, or "
            "bound the queue with maxsize."
        ),
        stacklevel=level,
    )


def stall_ns(seconds: float | None) -> int:
    """Queue(stall_warning=...) as nanoseconds; -1 for never."""
    if seconds is None:
        return -1
    s = float(seconds)
    if not s >= 0:  # NaN too
        raise ValueError(f"stall_warning must be None or >= 0, not {seconds!r}")
    return int(min(s, 1e9) * 1e9)
