"""Producers and consumers for test_stress.py; every outcome goes to an append-only log.

Each log line is written with one os.write() on an O_APPEND fd, straight
after the call it reports, so a SIGKILL leaves every line whole and loses
at most the outcome of the call the process was in.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import queue
import random
from typing import Any

CHILD_TIMEOUT = 60.0


def _log(fd: int, line: str) -> None:
    os.write(fd, (line + "\n").encode())


def payload(producer: int, seq: int, size: int) -> bytes:
    return (producer * 1_000_003 + seq).to_bytes(8, "little") * (size // 8) + b"p" * (size % 8)


def _item(producer: int, seq: int, size: int) -> tuple[int, int, int, bytes, Any]:
    """The item for one seq.  Its body goes out of band for an even seq (a
    PickleBuffer, which arrives as a bytearray), so that a large one takes
    pipeq's ring; for an odd seq it is bytes inside the pickle, and a large
    one goes through the pipe."""
    body = payload(producer, seq, size)
    digest = hashlib.sha256(body).digest()
    if seq % 2 == 0:
        return (producer, seq, size, digest, pickle.PickleBuffer(bytearray(body)))
    return (producer, seq, size, digest, body)


def produce(
    q: Any,
    log_path: str,
    producer: int,
    sizes: list[int],
    timeouts: list[Any],
    batches: list[int],
) -> None:
    """Put (producer, seq, size, sha256, payload) for each size, with the
    given timeouts (None blocks; 0 is the _nowait call), one item at a time
    or, for a batch of more than 1, by put_many().  Logs "try a b" before
    the call that puts seqs a to b - 1, then "ok a b", or "full a b k" when
    it raised queue.Full after k of them went in."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    seq = 0
    for batch in batches:
        end = min(seq + batch, len(sizes))
        if end <= seq:
            break
        timeout = timeouts[seq]
        _log(fd, f"try {seq} {end}")
        try:
            if batch == 1:
                item = _item(producer, seq, sizes[seq])
                if timeout == 0:
                    q.put_nowait(item)
                else:
                    q.put(item, timeout=CHILD_TIMEOUT if timeout is None else timeout)
            else:
                items = [_item(producer, k, sizes[k]) for k in range(seq, end)]
                if timeout == 0:
                    q.put_many_nowait(items)
                else:
                    q.put_many(items, timeout=CHILD_TIMEOUT if timeout is None else timeout)
        except queue.Full as exc:
            _log(fd, f"full {seq} {end} {getattr(exc, 'done', 0)}")
        else:
            _log(fd, f"ok {seq} {end}")
        seq = end
    os.close(fd)


# The most items one get_many() of consume() asks for.
MAX_BATCH = 50


def consume(q: Any, log_path: str, stop_path: str, seed: int) -> None:
    """Get items, with a mix of timeouts, by get() or get_many() of up to
    MAX_BATCH, until the queue is empty and the stop file exists.  Logs
    "got producer seq good|BAD" for each item, every item of one call with
    one write."""
    rng = random.Random(seed)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    while True:
        timeout = rng.choice([0, 0.001, 0.05, 0.2])
        many = rng.choice([0, 0, 2, 7, MAX_BATCH])
        try:
            if many:
                items = (
                    q.get_many_nowait(many) if timeout == 0 else q.get_many(many, timeout=timeout)
                )
            else:
                items = [q.get_nowait() if timeout == 0 else q.get(timeout=timeout)]
        except queue.Empty:
            if os.path.exists(stop_path):
                break
            continue
        lines = []
        for producer, seq, size, digest, body in items:
            good = len(body) == size and hashlib.sha256(body).digest() == digest
            good = good and body == payload(producer, seq, size)
            lines.append(f"got {producer} {seq} {'good' if good else 'BAD'}")
        _log(fd, "\n".join(lines))
    os.close(fd)
