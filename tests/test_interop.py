"""pipeq.Queue with what builds on multiprocessing.Queue: logging, pools, reducers, wait()."""

from __future__ import annotations

import concurrent.futures
import logging
import logging.handlers
import os
import pickle
import threading
from collections.abc import Callable, Iterator
from multiprocessing import connection as mp_connection
from multiprocessing import resource_sharer
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import interop_workers as iw
import pytest
import workers
from workers import TIMEOUT

import pipeq

if TYPE_CHECKING:
    from conftest import Children, CtxQueues

pytestmark = [
    # Python 3.12+ warns when a multi-threaded process forks (pytest's
    # faulthandler watchdog is a thread); forking is what these tests do.
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]

# How long a child waits before putting, so that the parent is (very likely)
# already blocked in connection.wait() when the item lands.
WAKE_DELAY = 0.05


@pytest.fixture
def sharer() -> Iterator[None]:
    """Stop multiprocessing's fd-sharing thread after a test that pickled a Connection.

    Outside of a child's start, a Connection pickles through resource_sharer,
    which starts a listening thread in this process: stop it, so later tests
    do not fork with it running.
    """
    yield
    resource_sharer.stop(timeout=TIMEOUT)


# -- 1. logging: QueueHandler in the children, QueueListener in the parent

# Each child logs LOG_LEVELS this many times, all children at once: about
# 130 KiB of records in all, which would fit in a Linux pipe even if the
# listener fell behind (its pickled LogRecords are ~0.5 KiB each).
LOG_ROUNDS = 20


class _TimedListener(logging.handlers.QueueListener):
    """A QueueListener whose wait for the next record is bounded: its thread cannot hang."""

    def dequeue(self, block: bool) -> logging.LogRecord:
        record: logging.LogRecord = self.queue.get(block, timeout=TIMEOUT)
        return record


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _check_records(records: list[logging.LogRecord], pids: dict[int, int]) -> None:
    """Every child's LOG_LEVELS x LOG_ROUNDS records, each once, in its order, from its pid."""
    want_n = len(pids) * LOG_ROUNDS * len(iw.LOG_LEVELS)
    # A record QueueHandler could not enqueue is reported on the child's stderr.
    assert len(records) == want_n, f"{want_n - len(records)} of {want_n} records lost"
    by_child: dict[str, list[logging.LogRecord]] = {}
    for r in records:
        by_child.setdefault(r.name, []).append(r)
    assert sorted(by_child) == sorted(iw.child_logger_name(i) for i in pids)
    for i, pid in pids.items():
        mine = by_child[iw.child_logger_name(i)]
        got = [(r.levelno, r.levelname, r.getMessage().splitlines()[0]) for r in mine]
        want = [
            (level, logging.getLevelName(level), f"child {i}: {word} {n}")
            for n in range(LOG_ROUNDS)
            for level, word in iw.LOG_LEVELS
        ]
        assert got == want
        assert {r.process for r in mine} == {pid}
        errors = [r for r in mine if r.levelno == logging.ERROR]
        assert len(errors) == LOG_ROUNDS
        for r in errors:
            assert "ZeroDivisionError" in r.getMessage()  # the child's traceback came along


def _listen(q: Any, procs: list[Any], go: Any, children: Children) -> list[logging.LogRecord]:
    """Run a QueueListener on q, tell procs to log, until they have all exited."""
    collect = _Collect()
    # Started after the children: forking with the listener's thread running
    # is what Python 3.12+ warns about.
    listener = _TimedListener(q, collect, respect_handler_level=True)
    listener.start()
    try:
        go.set()
        for p in procs:
            children.join_ok(p)
    finally:
        listener.stop()  # its sentinel lands after every child's records
    return collect.records


def test_logging_queue_handler_listener(
    ctx: BaseContext, queues: CtxQueues, children: Children
) -> None:
    q, go = queues(), ctx.Event()
    procs = {i: children.start(ctx, iw.log_records, q, i, go, LOG_ROUNDS) for i in range(3)}
    records = _listen(q, list(procs.values()), go, children)
    _check_records(records, {i: p.pid for i, p in procs.items()})


def test_logging_child_exits_abruptly(ctx: BaseContext, children: Children) -> None:
    # Deliberate difference: each record is in the pipe when QueueHandler.emit()
    # returns, so a child that leaves with os._exit() loses nothing.  The
    # stdlib's feeder thread dies with the child, and so may its records.
    q: pipeq.Queue[Any] = pipeq.Queue()
    go = ctx.Event()
    try:
        procs = {
            i: children.start(ctx, iw.log_records, q, i, go, LOG_ROUNDS, True) for i in range(3)
        }
        records = _listen(q, list(procs.values()), go, children)
        _check_records(records, {i: p.pid for i, p in procs.items()})
    finally:
        q.close()


# -- 2. concurrent.futures.ProcessPoolExecutor, queue handed to the initializer


def _bounded(fn: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Run fn (a pool's shutdown, which takes no timeout) in a thread; fail if it outlasts timeout.

    The pool's own threads join its workers: joining them from here as well
    would race with them for waitpid().
    """
    t = threading.Thread(target=fn, name=what, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} still running after {timeout} s"


def _exited_ok(procs: list[Any]) -> None:
    for p in procs:
        assert not p.is_alive(), f"{p} still running"
        assert p.exitcode == 0, f"{p} exited with {p.exitcode}"


def test_process_pool_executor_initializer(ctx: BaseContext, queues: CtxQueues) -> None:
    q = queues()
    n_tasks, per_task = 6, 50
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=2, mp_context=ctx, initializer=workers.pool_init, initargs=(q,)
    )
    procs: list[Any] = []
    try:
        futures = [pool.submit(workers.pool_task, i, per_task) for i in range(n_tasks)]
        got = [q.get(timeout=TIMEOUT) for _ in range(n_tasks * per_task)]
        pids = {f.result(timeout=TIMEOUT) for f in futures}
        procs = list(pool._processes.values())  # type: ignore[attr-defined]
    finally:
        _bounded(lambda: pool.shutdown(wait=True, cancel_futures=True), "executor shutdown")
    _exited_ok(procs)

    assert pids and os.getpid() not in pids
    assert pids <= {p.pid for p in procs}
    assert sorted(got) == [(i, j) for i in range(n_tasks) for j in range(per_task)]
    for i in range(n_tasks):  # each worker's items in the order it put them
        assert [j for t, j in got if t == i] == list(range(per_task))
    with pytest.raises(pipeq.Empty):
        q.get(timeout=0.05)


# -- 3. objects with a reducer registered with ForkingPickler


def test_connection_through_queue(
    ctx: BaseContext, queues: CtxQueues, children: Children, sharer: None
) -> None:
    q = queues()
    ours, theirs = ctx.Pipe()
    try:
        p = children.start(ctx, iw.serve_over_connection, q)
        q.put(theirs, timeout=TIMEOUT)
        if queues.kind == "pipeq":
            # Deliberate difference: put() has pickled the Connection (its
            # reducer dup()ed the fd) before returning, so the sender may close
            # its end at once.  The stdlib pickles later, in its feeder thread:
            # closing now races with it and may lose the item.
            theirs.close()
        ours.send(21)
        assert ours.poll(TIMEOUT), "no answer over the connection"
        assert ours.recv() == (42, p.pid)
        children.join_ok(p)
        theirs.close()
        # The child's copy of the fd is closed too: the peer is gone.
        assert ours.poll(TIMEOUT)
        with pytest.raises(EOFError):
            ours.recv()
    finally:
        ours.close()
        theirs.close()


def test_forking_pickler_reducer(ctx: BaseContext, queues: CtxQueues, children: Children) -> None:
    with pytest.raises(TypeError, match="ForkingPickler"):
        pickle.dumps(iw.Sealed(0))  # only the registered reducer can pickle it
    q_in, q_out = queues(), queues()
    p = children.start(ctx, iw.bounce_sealed, q_in, q_out)
    q_in.put(iw.Sealed(41), timeout=TIMEOUT)
    value, reduced_in, back = q_out.get(timeout=TIMEOUT)
    assert (value, reduced_in) == (41, os.getpid())  # our reducer ran, here
    assert isinstance(back, iw.Sealed)
    assert (back.value, back.reduced_in) == (42, p.pid)  # and the child's, there
    children.join_ok(p)


# -- 4. multiprocessing.connection.wait() on several queues' readers


def _ready(readers: list[Any], timeout: float | None) -> list[int]:
    """Indices of the readers connection.wait() says are ready."""
    ready = mp_connection.wait(readers, timeout=timeout)
    return sorted(i for i, r in enumerate(readers) if any(r is x for x in ready))


def test_connection_wait_on_queue_readers(
    ctx: BaseContext, queues: CtxQueues, children: Children
) -> None:
    q1, q2 = queues(), queues()
    readers = [q1._reader, q2._reader]
    assert _ready(readers, 0) == []
    assert _ready(readers, 0.05) == []  # times out with nothing put

    for target, index, item in ((q2, 1, "to q2"), (q1, 0, "to q1")):
        go = ctx.Event()
        p = children.start(ctx, iw.put_when_told, target, item, go, WAKE_DELAY)
        go.set()
        assert _ready(readers, TIMEOUT) == [index]  # woken by the put, the right reader
        assert readers[index].poll(0)
        assert target.get(timeout=TIMEOUT) == item
        children.join_ok(p)
        assert _ready(readers, 0) == []  # nothing left once the item is taken

    # Both have something: wait() names both.
    p = children.start(ctx, iw.put_each, [(q1, "a"), (q2, "b")])
    children.join_ok(p)  # once the child has exited, both items are in their pipes
    assert _ready(readers, TIMEOUT) == [0, 1]
    assert (q1.get(timeout=TIMEOUT), q2.get(timeout=TIMEOUT)) == ("a", "b")
    assert _ready(readers, 0) == []


def test_connection_wait_mixed_with_stdlib(ctx: BaseContext, children: Children) -> None:
    # One wait() over a pipeq queue, a multiprocessing queue and a plain Connection.
    pq: pipeq.Queue[Any] = pipeq.Queue()
    sq: Any = ctx.Queue()
    conn_r, conn_w = ctx.Pipe(duplex=False)
    try:
        readers = [pq._reader, sq._reader, conn_r]
        assert _ready(readers, 0) == []
        for target, index in ((pq, 0), (sq, 1)):
            go = ctx.Event()
            p = children.start(ctx, iw.put_when_told, target, index, go, WAKE_DELAY)
            go.set()
            assert _ready(readers, TIMEOUT) == [index]
            assert target.get(timeout=TIMEOUT) == index
            children.join_ok(p)
        conn_w.send("conn")
        assert _ready(readers, TIMEOUT) == [2]
        assert conn_r.recv() == "conn"
        assert _ready(readers, 0) == []
    finally:
        conn_r.close()
        conn_w.close()
        for q in (pq, sq):
            q.close()
            q.join_thread()


# -- 5. multiprocessing.Pool, queue handed to the initializer


def test_pool_initializer(ctx: BaseContext, queues: CtxQueues) -> None:
    q = queues()
    n_tasks, per_task = 6, 50
    pool = ctx.Pool(2, initializer=workers.pool_init, initargs=(q,))
    done = False
    try:
        result = pool.starmap_async(workers.pool_task, [(i, per_task) for i in range(n_tasks)])
        got = [q.get(timeout=TIMEOUT) for _ in range(n_tasks * per_task)]
        pids = set(result.get(timeout=TIMEOUT))
        procs = list(pool._pool)  # type: ignore[attr-defined]
        pool.close()
        _bounded(pool.join, "Pool.join()")
        done = True
    finally:
        if not done:
            _bounded(pool.terminate, "Pool.terminate()")
    _exited_ok(procs)

    assert pids and os.getpid() not in pids
    assert pids <= {p.pid for p in procs}
    assert sorted(got) == [(i, j) for i in range(n_tasks) for j in range(per_task)]
    for i in range(n_tasks):
        assert [j for t, j in got if t == i] == list(range(per_task))
    with pytest.raises(pipeq.Empty):
        q.get(timeout=0.05)
