"""Fixtures: pipeq and stdlib queues, start methods, and children that are always reaped."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

import pytest
from workers import START_METHODS, TIMEOUT

import pipeq


class QueueFactory:
    """make_queue's value: call it like the Queue class; `kind` says which one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.created: list[Any] = []

    def __call__(self, maxsize: int = 0) -> Any:
        if self.kind == "pipeq":
            q: Any = pipeq.Queue(maxsize)
        else:
            q = multiprocessing.get_context().Queue(maxsize)
        self.created.append(q)
        return q

    def teardown(self) -> None:
        for q in self.created:
            q.close()
            if self.kind == "stdlib":
                # The feeder thread exits once it has flushed its buffer; with
                # nobody left to read, it may never manage to: then detach it
                # rather than hang.
                feeder = getattr(q, "_thread", None)
                if feeder is not None:
                    feeder.join(5)
                    if feeder.is_alive():
                        q.cancel_join_thread()
            q.join_thread()


@pytest.fixture(autouse=True)
def _pipe_only(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked pipe_only is about frames in the pipe (a put() that
    blocks on a full pipe, a frame larger than the pipe cut short): its
    queues are made with no ring, so that large items go through the pipe.
    (Autouse fixtures run first, so this is set before any queue is made.)"""
    if request.node.get_closest_marker("pipe_only"):
        monkeypatch.setenv("PIPEQ_RING_SIZE", "0")


@pytest.fixture(params=["pipeq", "stdlib"])
def make_queue(request: pytest.FixtureRequest) -> Iterator[QueueFactory]:
    factory = QueueFactory(request.param)
    yield factory
    factory.teardown()


class CtxQueues:
    """queues' value: makes pipeq.Queue() or ctx.Queue() and closes them all after the test.

    conftest's make_queue builds the stdlib queue in the default (fork)
    context, whose locks cannot go to spawn or forkserver children; here the
    stdlib queue comes from the test's own context, as a user would make it.
    """

    def __init__(self, kind: str, ctx: BaseContext) -> None:
        self.kind = kind
        self.ctx = ctx
        self.created: list[Any] = []

    def __call__(self, maxsize: int = 0) -> Any:
        q: Any = pipeq.Queue(maxsize) if self.kind == "pipeq" else self.ctx.Queue(maxsize)
        self.created.append(q)
        return q

    def teardown(self) -> None:
        for q in self.created:
            q.close()
            feeder = getattr(q, "_thread", None)
            if feeder is not None:  # stdlib: never hang on a feeder nobody reads
                feeder.join(5)
                if feeder.is_alive():
                    q.cancel_join_thread()
            q.join_thread()


@pytest.fixture(params=["pipeq", "stdlib"])
def queues(request: pytest.FixtureRequest, ctx: BaseContext) -> Iterator[CtxQueues]:
    factory = CtxQueues(request.param, ctx)
    yield factory
    factory.teardown()


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    method: str = request.param
    return multiprocessing.get_context(method)


def join_ok(p: Any, timeout: float = TIMEOUT) -> None:
    """Join p within timeout and assert it exited with status 0."""
    p.join(timeout)
    assert not p.is_alive(), f"{p} still running after {timeout} s"
    assert p.exitcode == 0, f"{p} exited with {p.exitcode}"


class Children:
    """Starts daemon children and makes sure none outlives the test."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def start(
        self,
        ctx: multiprocessing.context.BaseContext,
        target: Callable[..., Any],
        *args: Any,
    ) -> Any:
        p = ctx.Process(target=target, args=args, daemon=True)  # type: ignore[attr-defined]
        p.start()
        self.procs.append(p)
        return p

    join_ok = staticmethod(join_ok)

    def reap(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


@pytest.fixture
def children() -> Iterator[Children]:
    tracker = Children()
    yield tracker
    tracker.reap()


@pytest.fixture(name="join_ok")
def join_ok_fixture() -> Callable[[Any, float], None]:
    return join_ok


# -- bare os.fork() children


class Forked:
    """Bare os.fork() children, waited for with a timeout and killed if still there."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def fork(self, body: Callable[[], None]) -> int:
        """The child runs body and leaves with os._exit: 0 if body returned, else 1."""
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork() in a multi-threaded process; the
            # tests that fork with threads running do so on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                body()
                code = 0
            finally:
                os._exit(code)
        self.pids.add(pid)
        return pid

    def wait_ok(self, pid: int, timeout: float = TIMEOUT) -> None:
        """Wait for the child within timeout (killing it otherwise); assert exit status 0."""
        deadline = time.monotonic() + timeout
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                pidfd = -1
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.pids.discard(pid)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill(pid)
                    pytest.fail(f"forked child {pid} still running after {timeout} s")
                if pidfd >= 0:
                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(min(0.01, left))  # no pidfd: nothing to wait on
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        assert code == 0, f"forked child exited with {code}"

    def _kill(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.pids.discard(pid)

    def reap(self) -> None:
        for pid in list(self.pids):
            self._kill(pid)


@pytest.fixture
def forked() -> Iterator[Forked]:
    tracker = Forked()
    yield tracker
    tracker.reap()
