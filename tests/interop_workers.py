"""Child-process targets for test_interop: logging, connections, ForkingPickler reducers, wait()."""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any

from workers import CHILD_TIMEOUT

# -- logging.handlers.QueueHandler in a child

# (level, what the child logs at that level); ERROR is logged with a traceback.
LOG_LEVELS = [
    (logging.DEBUG, "debug"),
    (logging.INFO, "info"),
    (logging.WARNING, "warning"),
    (logging.ERROR, "error"),
    (logging.CRITICAL, "critical"),
]


def child_logger_name(child_id: int) -> str:
    return f"pipeq.interop.child{child_id}"


def log_records(q: Any, child_id: int, go: Any, rounds: int, exit_abruptly: bool = False) -> None:
    """Once go is set, log `rounds` times one record per LOG_LEVELS entry through a
    QueueHandler on q (the children log at the same time: QueueHandler uses put_nowait()).

    With exit_abruptly, leave with os._exit(0) right after the last record:
    no atexit handlers, no finalizers, no queue flush.
    """
    if not go.wait(CHILD_TIMEOUT):
        raise TimeoutError("never told to go")
    logger = logging.getLogger(child_logger_name(child_id))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # a forked child inherits the parent's root handlers
    handler = logging.handlers.QueueHandler(q)
    logger.addHandler(handler)
    try:
        for n in range(rounds):
            for level, word in LOG_LEVELS:
                if level == logging.ERROR:
                    try:
                        1 / 0  # noqa: B018 - raise something to log with a traceback
                    except ZeroDivisionError:
                        logger.exception("child %d: %s %d", child_id, word, n)
                else:
                    logger.log(level, "child %d: %s %d", child_id, word, n)
    finally:
        logger.removeHandler(handler)
    if exit_abruptly:
        os._exit(0)


# -- a multiprocessing.connection.Connection received through a queue


def serve_over_connection(q: Any) -> None:
    """Get a Connection from q, read one number from it, answer (number * 2, pid)."""
    conn = q.get(timeout=CHILD_TIMEOUT)
    try:
        if not conn.poll(CHILD_TIMEOUT):
            raise TimeoutError("no request on the connection")
        n = conn.recv()
        conn.send((n * 2, os.getpid()))
    finally:
        conn.close()


# -- a class that only travels through a reducer registered with ForkingPickler


class Sealed:
    """Refuses plain pickling; multiprocessing's ForkingPickler has a reducer for it.

    ``reduced_in`` is the pid of the process whose reducer pickled it (None
    for an instance built directly), so the receiver can tell the registered
    reducer ran, and where.
    """

    def __init__(self, value: int, reduced_in: int | None = None) -> None:
        self.value = value
        self.reduced_in = reduced_in

    def __reduce__(self) -> Any:
        raise TypeError("Sealed travels only through multiprocessing's ForkingPickler")


def _rebuild_sealed(value: int, reduced_in: int) -> Sealed:
    return Sealed(value, reduced_in)


def _reduce_sealed(obj: Sealed) -> tuple[Any, tuple[int, int]]:
    return _rebuild_sealed, (obj.value, os.getpid())


# At import, so every process that imports this module (the test's parent, and
# any child whose target lives here) pickles Sealed the same way.
ForkingPickler.register(Sealed, _reduce_sealed)


def bounce_sealed(q_in: Any, q_out: Any) -> None:
    """Get a Sealed; put back (its value, its reduced_in, a new Sealed(value + 1))."""
    obj = q_in.get(timeout=CHILD_TIMEOUT)
    assert isinstance(obj, Sealed), type(obj)
    q_out.put((obj.value, obj.reduced_in, Sealed(obj.value + 1)), timeout=CHILD_TIMEOUT)


# -- multiprocessing.connection.wait() on queue readers


def put_when_told(q: Any, item: Any, go: Any, delay: float) -> None:
    """Wait for go, then, after delay, put item.

    The delay gives the parent time to be blocked in connection.wait() when
    the item lands; no event can tell a child that another process is blocked.
    """
    if not go.wait(CHILD_TIMEOUT):
        raise TimeoutError("never told to go")
    time.sleep(delay)
    q.put(item, timeout=CHILD_TIMEOUT)


def put_each(pairs: list[tuple[Any, Any]]) -> None:
    """Put each (queue, item) pair, in order."""
    for q, item in pairs:
        q.put(item, timeout=CHILD_TIMEOUT)
