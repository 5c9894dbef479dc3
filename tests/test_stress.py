"""A seeded random stress test: sizes, producers, consumers, timeouts and kills, mixed.

Producers put one item at a time or by put_many(), consumers get by get()
or get_many().  Every message whose put() returned (or that put_many() put:
all of them, or the first BatchFull.done) arrives exactly once, except those
in flight to a consumer that was killed (what one call of it was reading, or
had got and not yet logged); no message whose put() raised queue.Full ever
arrives; nothing arrives torn; each consumer sees each producer's messages
in order.

The seed is printed (and named in every failure).  The time budget is per
start method: PIPEQ_STRESS_SECONDS (default 4); PIPEQ_STRESS_SEED replays
a run.  For a long run by hand:

    PIPEQ_STRESS_SECONDS=600 python -m pytest tests/test_stress.py -s
"""

from __future__ import annotations

import os
import random
import signal
import time
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import stress_workers as sw
from workers import TIMEOUT

import pipeq

if TYPE_CHECKING:
    from conftest import Children

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
    ),
]

BUDGET_S = float(os.environ.get("PIPEQ_STRESS_SECONDS", "4"))
SEED = int(os.environ.get("PIPEQ_STRESS_SEED", random.SystemRandom().randrange(2**32)))


def _sizes(rng: random.Random, n: int, capacity: int) -> list[int]:
    """Mostly small messages, some pages, a few larger than the pipe."""
    kinds = [8, 100, 4096, 65_536, 300_000, 2 * capacity + 17]
    weights = [50, 25, 12, 8, 4, 1]
    return [rng.choices(kinds, weights)[0] + rng.randrange(8) for _ in range(n)]


def _read_log(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


class Round:
    """One round: a fresh queue, random producers and consumers, random kills."""

    def __init__(self, rng: random.Random, ctx: BaseContext, children: Children, d: Path):
        self.rng, self.ctx, self.children, self.dir = rng, ctx, children, d
        d.mkdir()
        self.maxsize = rng.choice([0, 0, 0, 2, 40])
        self.q: pipeq.Queue[Any] = pipeq.Queue(self.maxsize, stall_warning=None)
        self.stop = d / "stop"
        self.producers: list[tuple[Any, Path]] = []
        self.consumers: list[tuple[Any, Path]] = []
        self.killed_consumers = 0
        self.killed_producers: set[int] = set()

    def describe(self) -> str:
        # Exit codes say more than "hung": a consumer that died of an
        # exception leaves producers blocked on a full pipe.
        codes = [p.exitcode for p, _ in self.consumers]
        return (
            f"seed {SEED}, round in {self.dir.name}: maxsize {self.maxsize}, "
            f"{len(self.producers)} producers ({len(self.killed_producers)} killed), "
            f"{len(self.consumers)} consumers ({self.killed_consumers} killed; "
            f"exit codes now {codes})"
        )

    def start_consumer(self) -> None:
        log = self.dir / f"c{len(self.consumers)}.log"
        p = self.children.start(
            self.ctx, sw.consume, self.q, str(log), str(self.stop), self.rng.randrange(2**32)
        )
        self.consumers.append((p, log))

    def run(self) -> None:
        rng = self.rng
        for i in range(rng.randint(1, 4)):
            n = rng.randint(10, 120)
            sizes = _sizes(rng, n, self.q.pipe_capacity)
            timeouts = [rng.choice([None, None, 0, 0.001, 0.05, 1.0]) for _ in range(n)]
            # One at a time, or by put_many() in runs of random length.
            batches = [rng.choice([1, 1, 1, 3, 10, 40]) for _ in range(n)]
            log = self.dir / f"p{i}.log"
            p = self.children.start(
                self.ctx, sw.produce, self.q, str(log), i, sizes, timeouts, batches
            )
            self.producers.append((p, log))
        for _ in range(rng.randint(1, 4)):
            self.start_consumer()

        # Kills, at random moments while the round runs: a producer, or a
        # consumer (replaced at once, so someone is always reading).
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            time.sleep(rng.uniform(0.0, 0.3))
            if rng.random() < 0.5:
                i = rng.randrange(len(self.producers))
                p, _ = self.producers[i]
                if p.is_alive():
                    p.kill()
                    self.killed_producers.add(i)
            else:
                live = [p for p, _ in self.consumers if p.is_alive()]
                if live:
                    rng.choice(live).kill()
                    self.killed_consumers += 1
                    self.start_consumer()

        for i, (p, _) in enumerate(self.producers):
            p.join(TIMEOUT)
            assert not p.is_alive(), f"producer {i} hung; {self.describe()}"
            # A kill sent as it finished may find it already gone.
            assert p.exitcode == 0 or (i in self.killed_producers and p.exitcode == -9), (
                f"producer {i} exited {p.exitcode}; {self.describe()}"
            )
        self.stop.touch()
        for i, (p, _) in enumerate(self.consumers):
            p.join(TIMEOUT)
            assert not p.is_alive(), f"consumer {i} hung; {self.describe()}"
            assert p.exitcode in (0, -signal.SIGKILL), (
                f"consumer {i} exited {p.exitcode}; {self.describe()}"
            )
        self.q.close()

    def check(self) -> None:
        where = self.describe()
        ok: set[tuple[int, int]] = set()
        full: set[tuple[int, int]] = set()
        in_flight: set[tuple[int, int]] = set()
        for i, (_, log) in enumerate(self.producers):
            tried: tuple[int, int] | None = None
            for word, *args in _read_log(log):
                a, b = int(args[0]), int(args[1])
                if word == "try":
                    tried = (a, b)
                    continue
                # put_many() that raised Full put the first `done` of its items.
                done = b - a if word == "ok" else int(args[2])
                ok.update((i, k) for k in range(a, a + done))
                full.update((i, k) for k in range(a + done, b))
                tried = None
            if tried is not None:
                assert i in self.killed_producers, f"producer {i} left {tried} open; {where}"
                in_flight.update((i, k) for k in range(*tried))
        got: list[tuple[int, int]] = []
        for c, (_, log) in enumerate(self.consumers):
            last: dict[int, int] = {}
            for _, producer, seq, verdict in _read_log(log):
                key = (int(producer), int(seq))
                assert verdict == "good", f"consumer {c} got {key} torn or changed; {where}"
                assert last.get(key[0], -1) < key[1], (
                    f"consumer {c} got producer {key[0]}'s items out of order; {where}"
                )
                last[key[0]] = key[1]
                got.append(key)
        assert len(got) == len(set(got)), f"an item arrived twice; {where}"
        arrived = set(got)
        assert not arrived & full, (
            f"items whose put() raised Full arrived: {sorted(arrived & full)[:5]}; {where}"
        )
        assert arrived <= ok | in_flight, (
            f"items never put arrived: {sorted(arrived - ok - in_flight)[:5]}; {where}"
        )
        # A killed consumer loses what it was reading: one get()'s item, or
        # one get_many()'s batch.
        missing = ok - arrived
        assert len(missing) <= self.killed_consumers * sw.MAX_BATCH, (
            f"{len(missing)} items put and never delivered, e.g. {sorted(missing)[:5]}; {where}"
        )


def test_random_faults_lose_nothing(
    ctx: BaseContext, children: Children, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(f"{SEED}:{ctx.get_start_method()}")
    with capsys.disabled():
        print(f"\n[stress] seed {SEED} ({ctx.get_start_method()}), {BUDGET_S:g} s")
    end = time.monotonic() + BUDGET_S
    rounds = 0
    while rounds == 0 or time.monotonic() < end:
        r = Round(rng, ctx, children, tmp_path / f"round{rounds}")
        r.run()
        r.check()
        rounds += 1
    with capsys.disabled():
        print(f"[stress] {rounds} rounds passed")
