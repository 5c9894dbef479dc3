"""Producers and consumers for test_stress.py; every outcome goes to an append-only log.

Each log line is written with one os.write() on an O_APPEND fd, straight
after the call it reports, so a SIGKILL leaves every line whole and loses
at most the outcome of the call the process was in.
"""

from __future__ import annotations

import hashlib
import os
import queue
import random
from typing import Any

CHILD_TIMEOUT = 60.0


def _log(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def payload(producer: int, seq: int, size: int) -> bytes:
    return (producer * 1_000_003 + seq).to_bytes(8, "little") * (size // 8) + b"p" * (size % 8)


def produce(q: Any, log_path: str, producer: int, sizes: list[int], timeouts: list[Any]) -> None:
    """Put (producer, seq, size, sha256, payload) for each size, with the
    given timeouts (None blocks; 0 is put_nowait).  Logs "try seq" before a
    put and "ok seq" or "full seq" after it."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for seq, (size, timeout) in enumerate(zip(sizes, timeouts, strict=True)):
        body = payload(producer, seq, size)
        item = (producer, seq, size, hashlib.sha256(body).digest(), body)
        _log(fd, f"try {seq}")
        try:
            if timeout == 0:
                q.put_nowait(item)
            else:
                q.put(item, timeout=CHILD_TIMEOUT if timeout is None else timeout)
        except queue.Full:
            _log(fd, f"full {seq}")
        else:
            _log(fd, f"ok {seq}")
    os.close(fd)


def consume(q: Any, log_path: str, stop_path: str, seed: int) -> None:
    """Get items, with a mix of timeouts, until the queue is empty and the
    stop file exists.  Logs "got producer seq good|BAD" for each item."""
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        timeout = rng.choice([0, 0.001, 0.05, 0.2])
        try:
            item = q.get_nowait() if timeout == 0 else q.get(timeout=timeout)
        except queue.Empty:
            if os.path.exists(stop_path):
                break
            continue
        producer, seq, size, digest, body = item
        good = len(body) == size and hashlib.sha256(body).digest() == digest
        good = good and body == payload(producer, seq, size)
        _log(fd, f"got {producer} {seq} {'good' if good else 'BAD'}")
    os.close(fd)
