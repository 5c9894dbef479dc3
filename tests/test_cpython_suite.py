"""CPython's own queue tests (the running interpreter's Lib/test/_test_multiprocessing.py) on pipeq.

``cpython_suite`` builds CPython's ``_TestQueue`` (Queue and JoinableQueue),
``TestSimpleQueue``, and the other process tests that use ``self.Queue()``,
with pipeq's classes substituted; this module runs
them once per start method, each run in a fresh interpreter, and turns every
CPython test into one pytest test, ``test_cpython[<method>-<Class.test>]``.
A CPython test that calls a pipeq class which does not exist yet is skipped.

CPython tests that check stdlib-internal behaviour pipeq deliberately does not
have are listed in ``cpython_suite.KNOWN_DIFFERENCES`` and expected to fail.
The module is skipped where the interpreter has no ``test`` package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cpython_suite as suite
import pytest
from workers import START_METHODS

if suite.UNAVAILABLE:
    pytest.skip(suite.UNAVAILABLE, allow_module_level=True)

# Bound for one runner (all CPython tests under one start method); each
# CPython test is also bounded by suite.TEST_TIMEOUT inside the runner.
RUN_TIMEOUT = 300.0

RUNNER_CODE = "import cpython_suite, sys; sys.exit(cpython_suite.main(sys.argv[1:]))"


@dataclasses.dataclass
class SuiteRun:
    """What one runner reported."""

    method: str
    returncode: int | None  # None: killed after RUN_TIMEOUT
    records: dict[str, dict[str, Any]]  # "Class.test" -> record
    fixtures: list[dict[str, Any]]  # setUpModule, setUpClass, ... records
    environment_altered: bool | None  # None: the runner did not get that far
    log: str

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def module_skip(self) -> str | None:
        """Why the whole module was skipped (start method not supported ...), if it was."""
        for f in self.fixtures:
            if f.get("fixture") in ("import", "setUpModule") and f["outcome"] == "skipped":
                return str(f["details"])
        return None

    def fixture_errors(self) -> list[dict[str, Any]]:
        return [f for f in self.fixtures if f.get("outcome") == "error"]

    def describe(self) -> str:
        if self.returncode is None:
            status = f"killed after {RUN_TIMEOUT:.0f} s"
        else:
            status = f"exit status {self.returncode}"
        errors = "".join(f"\n{f['fixture']}:\n{f['details']}" for f in self.fixture_errors())
        tail = self.log_tail()
        return f"runner for {self.method!r}: {status}{errors}\n--- runner output (tail):\n{tail}"


def _wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait up to timeout for proc to exit, leaving it a zombie; True if it exited.

    While the zombie is there its pid, and so its process group, cannot be
    reused: the group can still be killed safely.
    """
    if not hasattr(os, "waitid"):  # pragma: no cover - no waitid: reap
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _run_suite(method: str, workdir: Path) -> SuiteRun:
    """Run every CPython test under `method` in a fresh interpreter."""
    results = workdir / "results.jsonl"
    log = workdir / "runner.log"
    env = dict(os.environ)
    # The runner and its spawn/forkserver children import cpython_suite.
    here = str(Path(suite.__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER_CODE, method, str(results)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see below
        )
        exited = clean = False
        try:
            exited = _wait_unreaped(proc, RUN_TIMEOUT)
            clean = exited and _exit_status(proc) == 0
        finally:
            if not clean:
                # Timed out, or ended by the faulthandler watchdog: its
                # children, forkserver and resource tracker may be left
                # waiting forever.  Not reaped yet, so its group is still its.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    records: dict[str, dict[str, Any]] = {}
    fixtures: list[dict[str, Any]] = []
    altered = None
    if results.exists():
        for line in results.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if "test" in record:
                records[record["test"]] = record
            elif record.get("fixture") == "environment":
                altered = bool(record["environment_altered"])
            else:
                fixtures.append(record)
    return SuiteRun(
        method=method,
        returncode=proc.returncode if exited else None,
        records=records,
        fixtures=fixtures,
        environment_altered=altered,
        log=log.read_text(encoding="utf-8", errors="replace"),
    )


def _exit_status(proc: subprocess.Popen[bytes]) -> int:
    """Exit status of a process that _wait_unreaped saw exit, without reaping it."""
    if proc.returncode is not None:  # already reaped (no waitid)
        return proc.returncode
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is None or info.si_code != os.CLD_EXITED:
        return -1
    return info.si_status


@pytest.fixture(scope="module")
def cpython_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], SuiteRun]]:
    """cpython_run(method): the runner's report for that start method, run once."""
    runs: dict[str, SuiteRun] = {}

    def get(method: str) -> SuiteRun:
        if method not in runs:
            runs[method] = _run_suite(method, tmp_path_factory.mktemp(f"cpython-{method}"))
        return runs[method]

    yield get


def _cases() -> Iterator[Any]:
    for method in START_METHODS:
        for case in suite.case_ids():
            marks = []
            if case in suite.KNOWN_DIFFERENCES:
                marks.append(pytest.mark.xfail(reason=suite.KNOWN_DIFFERENCES[case], strict=True))
            yield pytest.param(method, case, id=f"{method}-{case}", marks=marks)


@pytest.mark.parametrize(("method", "case"), list(_cases()))
def test_cpython(method: str, case: str, cpython_run: Callable[[str], SuiteRun]) -> None:
    run = cpython_run(method)
    why_skipped = run.module_skip()
    if why_skipped is not None:
        pytest.skip(f"CPython's setUpModule skipped: {why_skipped}")
    record = run.records.get(case)
    if record is None:
        pytest.fail(f"{case} reported nothing; {run.describe()}", pytrace=False)
    outcome = record["outcome"]
    if outcome == "skipped":
        pytest.skip(record["details"])
    # "xfail": a CPython test marked expectedFailure failed, as CPython expects.
    if outcome not in ("passed", "xfail"):
        pytest.fail(
            f"CPython's {case} under {method!r}: {outcome}\n{record['details']}", pytrace=False
        )


@pytest.mark.parametrize("method", START_METHODS)
def test_cpython_runner_clean(method: str, cpython_run: Callable[[str], SuiteRun]) -> None:
    """The runner ended normally, no class or module fixture failed, and no
    test left processes or threads behind (regrtest's "env changed")."""
    run = cpython_run(method)
    if run.module_skip() is not None:
        pytest.skip(f"CPython's setUpModule skipped: {run.module_skip()}")
    assert run.returncode == 0, run.describe()
    assert not run.fixture_errors(), run.describe()
    assert run.environment_altered is False, (
        f"a CPython test left processes or threads behind; {run.describe()}"
    )
