"""pipeq.Queue across processes: start methods, os.fork(), pools, big objects, dying children."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import threading
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import pytest
import workers
from workers import START_METHODS, TIMEOUT, pipe_bytes, process_state, wait_until

import pipeq

if TYPE_CHECKING:
    from conftest import Children, Forked

pytestmark = [
    # Python 3.12+ warns when a multi-threaded process forks (pytest's
    # faulthandler watchdog is a thread); forking is what these tests do.
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]


def _close_all(*queues: Any) -> None:
    for q in queues:
        q.close()
        q.join_thread()


# -- 1. passing a queue to a child


def test_queue_as_process_arg(ctx: BaseContext, children: Children) -> None:
    q_in: pipeq.Queue[Any] = pipeq.Queue()
    q_out: pipeq.Queue[Any] = pipeq.Queue(3)  # bounded: its wake-up pipe travels too
    try:
        p = children.start(ctx, workers.echo, q_in, q_out, ctx.get_start_method())
        q_in.put({"token": 1})
        tag, item, pid = q_out.get(timeout=TIMEOUT)
        assert (tag, item, pid) == (ctx.get_start_method(), {"token": 1}, p.pid)
        children.join_ok(p)
    finally:
        _close_all(q_in, q_out)


def test_one_queue_all_start_methods(children: Children) -> None:
    # Created without ctx; children of every start method share it.
    q_in: pipeq.Queue[Any] = pipeq.Queue()
    q_out: pipeq.Queue[Any] = pipeq.Queue()
    try:
        procs = {}
        for method in START_METHODS * 2:
            c = multiprocessing.get_context(method)
            p = children.start(c, workers.echo, q_in, q_out, method)
            procs[p.pid] = (method, p)
        tokens = list(range(len(procs)))
        for t in tokens:
            q_in.put(t)
        replies = [q_out.get(timeout=TIMEOUT) for _ in tokens]
        assert sorted(item for _, item, _ in replies) == tokens
        assert {(tag, procs[pid][0]) for tag, _, pid in replies} == {(m, m) for m in START_METHODS}
        assert sorted(pid for _, _, pid in replies) == sorted(procs)
        for _, p in procs.values():
            children.join_ok(p)
    finally:
        _close_all(q_in, q_out)


def test_child_fds_not_inheritable(ctx: BaseContext, children: Children) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    results: pipeq.Queue[Any] = pipeq.Queue()
    try:
        p = children.start(ctx, workers.report_fds, q, results)
        assert results.get(timeout=TIMEOUT) == [False, False]
        children.join_ok(p)
    finally:
        _close_all(q, results)


def test_closed_queue_cannot_be_passed(ctx: BaseContext, children: Children) -> None:
    if ctx.get_start_method() == "fork":
        pytest.skip("fork does not pickle the Process arguments")
    q: pipeq.Queue[Any] = pipeq.Queue()
    q.close()
    with pytest.raises(ValueError, match="closed"):
        children.start(ctx, workers.put_one, q, "x")


# -- 2. many producers and consumers


def _run_producers_consumers(
    ctx: BaseContext,
    children: Children,
    *,
    maxsize: int,
    n_producers: int,
    n_consumers: int,
    per_producer: int,
    timeout: float,
) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue(maxsize)
    results: pipeq.Queue[Any] = pipeq.Queue()
    try:
        consumers = [
            children.start(ctx, workers.consumer, q, results, i, timeout)
            for i in range(n_consumers)
        ]
        producers = [
            children.start(ctx, workers.producer, q, i, per_producer, timeout)
            for i in range(n_producers)
        ]
        for p in producers:
            children.join_ok(p)
        for _ in consumers:
            q.put(None, timeout=timeout)
        reports = dict(results.get(timeout=timeout) for _ in consumers)
        for p in consumers:
            children.join_ok(p)
    finally:
        _close_all(q, results)

    assert sorted(reports) == list(range(n_consumers))
    counts = dict.fromkeys(range(n_producers), 0)
    everything: set[tuple[int, int]] = set()
    for seen in reports.values():
        for pid, seqs in seen.items():
            assert seqs == sorted(seqs), f"producer {pid}'s items out of order"
            counts[pid] += len(seqs)
            everything.update((pid, s) for s in seqs)
    assert counts == dict.fromkeys(range(n_producers), per_producer)  # no duplicates
    assert everything == {(p, s) for p in range(n_producers) for s in range(per_producer)}


def test_producers_consumers(ctx: BaseContext, children: Children) -> None:
    _run_producers_consumers(
        ctx, children, maxsize=0, n_producers=4, n_consumers=4, per_producer=20_000, timeout=TIMEOUT
    )


def test_bounded_producers_consumers(ctx: BaseContext, children: Children) -> None:
    # Producers block on a full queue and must each be woken as room appears.
    # Short timeouts: a lost wake-up should fail in seconds, not minutes.
    _run_producers_consumers(
        ctx, children, maxsize=2, n_producers=4, n_consumers=1, per_producer=2000, timeout=10.0
    )


# -- 3. ProcessPoolExecutor with the queue handed to its initializer


def test_process_pool_initializer(ctx: BaseContext) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    n_tasks, per_task = 8, 200
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=2, mp_context=ctx, initializer=workers.pool_init, initargs=(q,)
        ) as pool:
            futures = [pool.submit(workers.pool_task, i, per_task) for i in range(n_tasks)]
            got = [q.get(timeout=TIMEOUT) for _ in range(n_tasks * per_task)]
            pids = {f.result(timeout=TIMEOUT) for f in futures}
        assert pids and os.getpid() not in pids
        assert sorted(got) == [(i, j) for i in range(n_tasks) for j in range(per_task)]
        with pytest.raises(pipeq.Empty):
            q.get(timeout=0.1)
    finally:
        _close_all(q)


# -- 4. objects from 0 B to 10 MiB


def _payload_specs(capacity: int) -> list[tuple[str, int]]:
    hdr, trailer = 16, 1  # a raw bytes frame is header + body + trailer
    sizes = [0, 1, 4095, 4096, 4097, 4096 - hdr - trailer, 4096 - hdr]
    sizes += [65535, 65536, 65537]
    sizes += [capacity - hdr - trailer, capacity - hdr, capacity - 1, capacity, capacity + 1]
    sizes += [(2 << 20) - 1, 2 << 20, (2 << 20) + 1]  # 1 MiB chunks: body boundaries
    sizes += [10 << 20]
    specs = [("bytes", n) for n in sizes]
    specs += [("bytearray", n) for n in (0, 16 * 1024 - 1, 16 * 1024, 100_000, capacity + 1)]
    specs += [
        ("ndarray", 1 << 20),
        ("ndarray", 10 << 20),
        ("ndarray_fortran", 1 << 20),
        ("ndarray_strided", 1 << 20),
        ("many_bytearrays", 1100 * 16 * 1024),
    ]
    return specs


@pytest.mark.parametrize("direction", ["child_to_parent", "parent_to_child"])
def test_payload_sizes(ctx: BaseContext, children: Children, direction: str) -> None:
    pytest.importorskip("numpy")
    q: pipeq.Queue[Any] = pipeq.Queue()
    results: pipeq.Queue[Any] = pipeq.Queue()
    specs = _payload_specs(q.pipe_capacity)
    try:
        if direction == "child_to_parent":
            p = children.start(ctx, workers.put_payloads, q, specs)
            bad = []
            for kind, size in specs:
                got = q.get(timeout=TIMEOUT)
                if workers.payload_digest(got) != workers.payload_digest(
                    workers.make_payload(kind, size)
                ):
                    bad.append((kind, size, workers.payload_digest(got)[0]))
        else:
            p = children.start(ctx, workers.check_payloads, q, specs, results)
            workers.put_payloads(q, specs)
            bad = results.get(timeout=TIMEOUT)
        children.join_ok(p)
        assert bad == []
        with pytest.raises(pipeq.Empty):
            q.get(timeout=0.1)
    finally:
        _close_all(q, results)


# -- 5. a bare forked child that puts and leaves at once


@pytest.mark.parametrize(
    "kind",
    workers.kinds(
        "the stdlib's put() leaves the item to a feeder thread, which os._exit() kills "
        "before it writes",
        strict=False,
    ),
)
def test_forked_child_put_then_exit(forked: Forked, kind: str) -> None:
    # Bare os.fork(), so no start method is involved.
    q: Any = pipeq.Queue() if kind == "pipeq" else multiprocessing.get_context().Queue()
    wait = TIMEOUT if kind == "pipeq" else 1.0
    try:
        pid = forked.fork(lambda: q.put("from child"))
        forked.wait_ok(pid)
        assert q.get(timeout=wait) == "from child"
    finally:
        _close_all(q)


def test_forked_child_puts_many_and_large_then_exits(forked: Forked) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    big = workers.make_payload("bytes", 3 * q.pipe_capacity)

    def body() -> None:
        for i in range(100):
            q.put(i)
        q.put(big)  # larger than the pipe: put() returns once all of it is in
        q.put("last")

    try:
        pid = forked.fork(body)
        got = [q.get(timeout=TIMEOUT) for _ in range(102)]
        forked.wait_ok(pid)
        assert got[:100] == list(range(100))
        assert got[100] == big
        assert got[101] == "last"
    finally:
        _close_all(q)


# -- 6. the seed scenario: a receiver thread, and put() on both sides of fork()


def _seed_scenario(q: Any, forked: Forked, put_before_fork: bool, child_wait: float) -> list[Any]:
    received: list[Any] = []
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            while (msg := q.get(timeout=TIMEOUT)) is not None:
                received.append(msg)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    if put_before_fork:
        q.put("before fork")
    pid = forked.fork(lambda: q.put("child"))
    q.put("parent")
    # The child's put() is done once it exited; only then the end marker, so
    # that "child" cannot come after it.
    forked.wait_ok(pid, child_wait)
    q.put(None)
    receiver.join(TIMEOUT)
    assert not receiver.is_alive()
    assert not errors
    return received


@pytest.mark.parametrize(
    "kind",
    workers.kinds(
        "the stdlib's feeder thread, started by the put() before fork(), does not exist "
        "in the child, so the child's item is never sent",
        strict=True,
    ),
)
def test_seed_put_before_fork(forked: Forked, kind: str) -> None:
    q: Any = pipeq.Queue() if kind == "pipeq" else multiprocessing.get_context().Queue()
    try:
        # stdlib: the child may also hang in put() on a lock the feeder thread held
        # at fork(); it is killed after 2 s.
        received = _seed_scenario(q, forked, True, TIMEOUT if kind == "pipeq" else 2.0)
        assert received[0] == "before fork"
        assert sorted(received[1:]) == ["child", "parent"]
    finally:
        _close_all(q)


def test_seed_no_put_before_fork(forked: Forked) -> None:
    # pipeq only: with the stdlib the child's os._exit() races its own feeder.
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        received = _seed_scenario(q, forked, False, TIMEOUT)
        assert sorted(received) == ["child", "parent"]
    finally:
        _close_all(q)


# -- 7. a burst of small items with no consumer yet


@pytest.mark.linux
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux pipe sizing")
def test_small_items_before_any_consumer(ctx: BaseContext, children: Children) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    n, size = 5243, 100  # 512 KiB of payload
    try:
        p = children.start(ctx, workers.put_small_nowait, q, n, size)
        children.join_ok(p)  # it finished without anyone reading: no Full, no block
        assert q.qsize() == n
        for i in range(n):
            assert q.get(timeout=TIMEOUT) == i.to_bytes(4, "little") * (size // 4)
        assert q.empty()
    finally:
        _close_all(q)


# -- processes killed at a bad moment


@pytest.mark.linux
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
@pytest.mark.parametrize(
    "kind",
    workers.kinds(
        "a stdlib consumer killed inside get() leaves the queue's read lock held forever",
        strict=False,
    ),
)
def test_consumer_killed_while_waiting(ctx: BaseContext, children: Children, kind: str) -> None:
    if kind == "pipeq":
        q: Any = pipeq.Queue()
        acks: Any = pipeq.Queue()
    else:
        q, acks = ctx.Queue(), ctx.Queue()
    try:
        p = children.start(ctx, workers.get_loop_then_block, q, acks)
        q.put("ping")
        assert acks.get(timeout=TIMEOUT) == "pong"
        # Right after "pong" the child calls get() again and sleeps in it.
        wait_until(lambda: process_state(p.pid) == "S", "the child sleeps in get()")
        p.kill()
        p.join(TIMEOUT)
        assert p.exitcode == -9
        q.put("after")
        assert q.get(timeout=TIMEOUT if kind == "pipeq" else 1.0) == "after"
    finally:
        if kind == "stdlib":
            q.cancel_join_thread()
            acks.cancel_join_thread()
        _close_all(q, acks)


@pytest.mark.pipe_only
@pytest.mark.linux
@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs robust mutexes and /proc")
def test_producer_killed_mid_frame(ctx: BaseContext, children: Children) -> None:
    q: pipeq.Queue[Any] = pipeq.Queue()
    try:
        p = children.start(ctx, workers.put_oversized, q, 4 * q.pipe_capacity)
        # The frame cannot be complete while nobody reads: once its first
        # bytes are in the pipe and the child sleeps, it waits mid-frame for
        # room, holding the write lock.
        wait_until(
            lambda: pipe_bytes(q) > 0 and process_state(p.pid) == "S",
            "the child waits in the middle of its frame",
        )
        p.kill()
        p.join(TIMEOUT)
        assert p.exitcode == -9

        # The next writer completes the torn frame (so it must run alongside a
        # reader); the reader drops the torn frame and gets the next one.
        errors: list[BaseException] = []

        def put_after() -> None:
            try:
                q.put("after", timeout=TIMEOUT)
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        t = threading.Thread(target=put_after, daemon=True)
        t.start()
        assert q.get(timeout=TIMEOUT) == "after"
        t.join(TIMEOUT)
        assert not t.is_alive() and not errors
        assert q.qsize() == 0
        q.put("again")
        assert q.get(timeout=TIMEOUT) == "again"
    finally:
        _close_all(q)


@pytest.mark.pipe_only
@pytest.mark.linux
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs robust mutexes")
def test_producer_killed_right_after_a_write(ctx: BaseContext, children: Children) -> None:
    # SIGKILL can land between writev() returning and the writer recording
    # how far it got.  The frame must still be dropped whole, and the queue
    # keep working.  The child kills itself at that point most of the time;
    # a few rounds make hitting it near certain.
    for _ in range(5):
        q: pipeq.Queue[Any] = pipeq.Queue()
        try:
            p = children.start(
                ctx, workers.put_oversized_killed_after_first_write, q, 4 * q.pipe_capacity
            )
            p.join(TIMEOUT)
            assert p.exitcode == -9
            with pytest.raises(pipeq.Empty):
                q.get(timeout=0.2)  # the torn frame is dropped
            q.put("after", timeout=TIMEOUT)
            assert q.get(timeout=TIMEOUT) == "after"
        finally:
            _close_all(q)
