"""Child-process targets and helpers for test_core_twins.

They live outside the test module so that spawned children can import them
(the test modules are imported by path, under names a child cannot find).
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from types import ModuleType
from typing import Any

from workers import CHILD_TIMEOUT, make_payload

from pipeq import _shm

CORES = {"c": "pipeq._core_c", "py": "pipeq._core_py"}
CHUNK = _shm.CHUNK


def load(name: str) -> ModuleType:
    return importlib.import_module(CORES.get(name, name))


def twin(channel: Any, core: str) -> Any:
    """A Channel of `core` in this process on duplicates of channel's fds:
    the same pipe, shared page and locks.  Its DupFds go through
    multiprocessing's resource sharer, as they do outside a process start."""
    return load(core)._rebuild(*channel.__reduce__()[1])


def _rebuild_as(core: str, *state: Any) -> Any:
    return load(core)._rebuild(*state)


class Handoff:
    """A Channel for a child process that is to use it through `core`.

    Spawn pickles it: the child rebuilds the channel with `core`'s _rebuild
    straight from the DupFds of the other core's __reduce__.  Fork pickles
    nothing: the child converts the inherited channel with open().
    """

    def __init__(self, channel: Any, core: str) -> None:
        self.channel = channel
        self.core = core

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return _rebuild_as, (self.core, *self.channel.__reduce__()[1])

    def open(self) -> Any:
        return twin(self.channel, self.core)


def open_handoff(handoff: Any, core: str) -> Any:
    """In a child: the Channel that `handoff` became, checked to be of `core`."""
    ch = handoff.open() if isinstance(handoff, Handoff) else handoff
    assert type(ch).__module__ == CORES[core], type(ch)
    return ch


def same(a: Any, b: Any) -> bool:
    """Equal type and content, numpy arrays included."""
    return type(a) is type(b) and pickle.dumps(a, 4) == pickle.dumps(b, 4)


def payloads() -> list[Any]:
    """Built the same in parent and child: small objects, frames larger than
    the pipe, and numpy arrays that travel out of band."""
    return [
        42,
        "héllo ✓",
        (None, 1.5, [b"x"]),
        b"",
        make_payload("bytes", CHUNK + 1),
        make_payload("bytearray", 3 * CHUNK + 7),
        make_payload("ndarray", 2 * CHUNK),
        {
            "a": make_payload("ndarray", 64 * 1024),
            "f": make_payload("ndarray_fortran", 3 * CHUNK),
            "s": make_payload("ndarray_strided", 300_000),
        },
        "last",
    ]


def produce_payloads(handoff: Any, core: str) -> None:
    ch = open_handoff(handoff, core)
    for obj in payloads():
        ch.put(obj, timeout=CHILD_TIMEOUT)
    ch.close()


def consume_payloads(handoff: Any, core: str) -> None:
    ch = open_handoff(handoff, core)
    for i, want in enumerate(payloads()):
        got = ch.get(timeout=CHILD_TIMEOUT)
        assert same(got, want), f"payload {i}: got {type(got)}"
    ch.close()
