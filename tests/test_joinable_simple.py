"""JoinableQueue and SimpleQueue, checked against pipeq and the stdlib alike."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

import pytest
import workers
from workers import TIMEOUT, call_with_timeout

import pipeq

if TYPE_CHECKING:
    from conftest import Children

SHORT = 0.2  # a wait that is meant to expire


class Made:
    """Queues of one kind ("pipeq" or "stdlib"), closed after the test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.created: list[Any] = []

    def _keep(self, q: Any) -> Any:
        self.created.append(q)
        return q

    def joinable(self, ctx: BaseContext | None = None) -> Any:
        if self.kind == "pipeq":
            return self._keep(pipeq.JoinableQueue())
        return self._keep((ctx or multiprocessing.get_context()).JoinableQueue())

    def simple(self, ctx: BaseContext | None = None) -> Any:
        if self.kind == "pipeq":
            return self._keep(pipeq.SimpleQueue())
        return self._keep((ctx or multiprocessing.get_context()).SimpleQueue())

    def teardown(self) -> None:
        for q in self.created:
            if hasattr(q, "cancel_join_thread"):
                q.cancel_join_thread()  # the stdlib's feeder may have nobody to flush to
            q.close()


@pytest.fixture(params=["pipeq", "stdlib"])
def made(request: pytest.FixtureRequest) -> Iterator[Made]:
    m = Made(request.param)
    yield m
    m.teardown()


def start_join(q: Any) -> threading.Thread:
    """q.join() in a daemon thread; the caller joins the thread once join()
    must have returned, so no thread outlives the queue."""
    t = threading.Thread(target=q.join, daemon=True)
    t.start()
    return t


def joins_within(q: Any, timeout: float) -> bool:
    """Whether q.join() returns within timeout; only for a join() that must."""
    t = start_join(q)
    t.join(timeout)
    return not t.is_alive()


# -- JoinableQueue


def test_join_with_nothing_put_returns(made: Made) -> None:
    q = made.joinable()
    assert joins_within(q, TIMEOUT)


def test_task_done_too_often_raises_value_error(made: Made) -> None:
    q = made.joinable()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    q.put("a")
    assert q.get(timeout=TIMEOUT) == "a"
    q.task_done()
    with pytest.raises(ValueError, match="too many times"):
        q.task_done()
    # The queue keeps working afterwards.
    q.put("b")
    assert q.get(timeout=TIMEOUT) == "b"
    q.task_done()
    assert joins_within(q, TIMEOUT)


def test_join_waits_for_every_task_done(made: Made) -> None:
    q = made.joinable()
    for i in range(3):
        q.put(i)
    for i in range(3):
        assert q.get(timeout=TIMEOUT) == i
    waiting = [start_join(q)]
    q.task_done()
    q.task_done()
    waiting.append(start_join(q))
    for t in waiting:
        t.join(SHORT)
        assert t.is_alive(), "join() returned with a task unfinished"
    q.task_done()
    for t in waiting:
        t.join(TIMEOUT)
        assert not t.is_alive(), "join() still waiting after the last task_done()"


def test_join_wakes_when_another_thread_finishes(made: Made) -> None:
    q = made.joinable()
    q.put("job")

    def work() -> None:
        q.get(timeout=TIMEOUT)
        q.task_done()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    call_with_timeout(q.join, TIMEOUT)
    t.join(TIMEOUT)
    assert not t.is_alive()


def test_joinable_is_a_full_queue(made: Made) -> None:
    q = made.joinable()
    q.put_nowait(1)
    assert q.get(timeout=TIMEOUT) == 1
    with pytest.raises(pipeq.Empty):
        q.get_nowait()
    q.task_done()
    q.close()
    with pytest.raises(ValueError, match="closed"):
        q.put(2)


def test_join_across_processes(made: Made, ctx: BaseContext, children: Children) -> None:
    q = made.joinable(ctx)
    n_workers, n_items = 3, 200
    for i in range(n_items):
        q.put(i, timeout=TIMEOUT)
    for _ in range(n_workers):
        q.put(None, timeout=TIMEOUT)
    procs = [children.start(ctx, workers.get_and_task_done, q) for _ in range(n_workers)]
    assert joins_within(q, TIMEOUT), "join() did not return after every task_done()"
    for p in procs:
        children.join_ok(p)


def test_joinable_pickling_outside_process_start_raises(made: Made) -> None:
    q = made.joinable()
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(q)


# -- SimpleQueue


def test_simple_fifo_and_empty(made: Made) -> None:
    q = made.simple()
    assert q.empty() is True
    for item in ("a", 2, [3], {"four": 4}, None):
        q.put(item)
    assert q.empty() is False
    for item in ("a", 2, [3], {"four": 4}, None):
        assert call_with_timeout(q.get, TIMEOUT) == item
    assert q.empty() is True


def test_simple_get_waits_for_another_thread(made: Made) -> None:
    q = made.simple()
    started = threading.Event()

    def later() -> None:
        started.wait(TIMEOUT)
        q.put("late")

    t = threading.Thread(target=later, daemon=True)
    t.start()
    started.set()
    assert call_with_timeout(q.get, TIMEOUT) == "late"
    t.join(TIMEOUT)


def test_simple_after_close_raises_oserror(made: Made) -> None:
    q = made.simple()
    q.put("x")
    q.close()
    with pytest.raises(OSError):
        q.get()
    with pytest.raises(OSError):
        q.put("y")
    with pytest.raises(OSError):
        q.empty()
    q.close()  # idempotent


def test_simple_unpicklable_put() -> None:
    # The stdlib's SimpleQueue pickles in put() too: both raise there and
    # keep working.
    for q in (pipeq.SimpleQueue(), multiprocessing.SimpleQueue()):
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put(lambda: None)
        q.put("after")
        assert call_with_timeout(q.get, TIMEOUT) == "after"
        q.close()


def test_simple_across_processes(made: Made, ctx: BaseContext, children: Children) -> None:
    q_in, q_out = made.simple(ctx), made.simple(ctx)
    p = children.start(ctx, workers.simple_echo, q_in, q_out, 50)
    for i in range(50):
        q_in.put(("ping", i))
    got = [call_with_timeout(q_out.get, TIMEOUT) for _ in range(50)]
    assert got == [("pong", i) for i in range(50)]
    children.join_ok(p)


def test_generic_subscription() -> None:
    assert pipeq.JoinableQueue[int] is not None
    assert pipeq.SimpleQueue[str] is not None
    assert issubclass(pipeq.JoinableQueue, pipeq.Queue)
