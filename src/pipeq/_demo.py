"""One run of the seed's fork scenario: ``python -m pipeq._demo {stdlib,pipeq} {1,2}``."""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import warnings
from typing import Any

SLEEP = 0.3  # the seed's time.sleep(1), shortened
CHILD_TIMEOUT = 2.0  # a child not gone by then never will be
GET_TIMEOUT = 5.0


def make_queue(kind: str) -> Any:
    """A fresh multiprocessing.Queue ("stdlib") or pipeq.Queue ("pipeq")."""
    if kind == "pipeq":
        import pipeq

        return pipeq.Queue()
    return multiprocessing.Queue()


def wait_child(pid: int, put_done: int) -> str:
    """Reap the child within CHILD_TIMEOUT, killing it if need be; say how it ended."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return "ok" if code == 0 else f"child exited with status {code}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    where = "after put()" if os.read(put_done, 1) else "in put()"
    return f"child hung {where}, killed after {CHILD_TIMEOUT:g} s"


def run(kind: str, script: int) -> dict[str, Any]:
    """The seed's script 1 or 2 with the given queue; what the receiver got."""
    q = make_queue(kind)
    received: list[Any] = []
    got_none = threading.Event()

    def receive() -> None:
        try:
            msg = q.get(timeout=GET_TIMEOUT)
            while msg is not None:
                received.append(msg)
                msg = q.get(timeout=GET_TIMEOUT)
            got_none.set()
        except queue.Empty:
            pass

    t = threading.Thread(target=receive, daemon=True)
    t.start()

    if script == 2:
        q.put("before fork")
    put_done, put_done_w = os.pipe()
    os.set_blocking(put_done, False)
    with warnings.catch_warnings():
        # 3.12+ warns that fork() with threads may deadlock: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()

    if pid == 0:
        q.put("child")
        os.write(put_done_w, b"1")
        # The seed's child ends with a normal exit, exit handlers included
        # (they let a live stdlib feeder thread flush); SystemExit unwinds
        # straight out of the interpreter, never into the parent's code.
        sys.exit(0)

    os.close(put_done_w)
    time.sleep(SLEEP)
    child = wait_child(pid, put_done)
    os.close(put_done)
    q.put("parent")
    q.put(None)
    t.join(GET_TIMEOUT)  # the seed sleeps here
    return {"delivered": list(received), "child": child, "got_none": got_none.is_set()}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]))), flush=True)
