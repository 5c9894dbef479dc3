"""CPython's own queue tests from ``test._test_multiprocessing``, with pipeq's classes substituted.

This module is importable (``tests/`` is on ``sys.path``), because spawn and
forkserver children unpickle their targets, such as
``WithProcessesTestQueue._test_put``, by module and class name: they import
this module and find the same classes here.

The test classes are built the way ``install_tests_in_module_dict`` builds
them for ``test_multiprocessing_{fork,spawn,forkserver}``, from the running
interpreter's own ``test`` package, test code unchanged:

- ``WithProcessesTestQueue``: ``_TestQueue`` with a ProcessesMixin whose
  ``Queue`` and ``JoinableQueue`` are pipeq's;
- ``TestSimpleQueue``: ``TestSimpleQueue`` as it is;
- ``WithProcessesTestProcess``, ``WithProcessesTestBarrier`` ...: the other
  processes-type test classes, with the same mixin, limited to the test
  methods whose code calls ``self.Queue()`` or ``self.JoinableQueue()``
  (found in their source, so the selection follows the Python version).

A few of these tests call ``multiprocessing.Queue()``,
``multiprocessing.JoinableQueue()`` or ``multiprocessing.SimpleQueue()``
directly rather than ``self.Queue()``; ``main()`` points those names of the
``multiprocessing`` module at pipeq's classes too, in its own process only
(the children of these tests never call them).  A pipeq class that does not
exist yet is replaced by a factory that skips the test calling it.

``main()`` runs the tests under one start method, with CPython's module
fixtures (``setUpModule``/``tearDownModule`` from
``install_tests_in_module_dict``), and writes one JSON line per test to a
file.  ``test_cpython_suite.py`` starts it in a fresh interpreter per start
method, so that ``set_start_method``, the forkserver and the patched
``multiprocessing`` names stay out of the pytest process::

    python -c "import cpython_suite, sys; sys.exit(cpython_suite.main(sys.argv[1:]))" \\
        spawn results.jsonl
"""

from __future__ import annotations

import faulthandler
import importlib
import inspect
import json
import multiprocessing
import re
import sys
import time
import traceback
import unittest
from collections.abc import Iterator
from typing import Any, TextIO

import pipeq

# Seconds one CPython test may take in the runner before faulthandler dumps
# every thread's stack and ends the runner (the CPython tests' own waits are
# mostly unbounded).
TEST_TIMEOUT = 60.0

QUEUE_CLASSES = ("Queue", "JoinableQueue", "SimpleQueue")

# CPython tests that pipeq fails on purpose: they check behaviour of the
# stdlib's implementation that pipeq deliberately does not have.
# "CPythonClass.test_method": why.
KNOWN_DIFFERENCES: dict[str, str] = {
    "_TestQueue.test_queue_feeder_donot_stop_onexc": (
        "puts an unpicklable object and expects put() to succeed, the error to "
        "be printed by the feeder thread and the item dropped; pipeq pickles in "
        "put() and raises the error to the caller, leaving the queue unchanged"
    ),
    "_TestQueue.test_closed_queue_empty_exceptions": (
        "(3.13+) expects empty() after close() to raise OSError once the queue "
        "has been used, but not before: an artifact of the stdlib closing its "
        "pipe lazily, through the feeder thread; pipeq's empty() and qsize() "
        "keep answering after close(), used or not"
    ),
}

# CPython tests that pass but do not exercise pipeq at all.
NOT_EXERCISED: dict[str, str] = {
    "_TestQueue.test_queue_feeder_on_queue_feeder_error": (
        "subclasses multiprocessing.queues.Queue to override its feeder "
        "thread's _on_queue_feeder_error hook, so it tests the stdlib class; "
        "pipeq has no feeder thread and raises pickling errors from put()"
    ),
}


def _missing(name: str) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        raise unittest.SkipTest(f"pipeq.{name} does not exist")

    factory.__name__ = factory.__qualname__ = f"missing_{name}"
    return factory


# What stands in for multiprocessing's Queue, JoinableQueue and SimpleQueue.
SUBSTITUTES: dict[str, Any] = {
    name: getattr(pipeq, name, None) or _missing(name) for name in QUEUE_CLASSES
}
MISSING = [name for name in QUEUE_CLASSES if not hasattr(pipeq, name)]

_tm: Any
try:
    _tm = importlib.import_module("test._test_multiprocessing")
except (ImportError, unittest.SkipTest) as exc:
    _tm = None
    UNAVAILABLE = (
        f"CPython's test._test_multiprocessing is not available in this "
        f"interpreter ({type(exc).__name__}: {exc})"
    )
else:
    UNAVAILABLE = ""

# Our classes by CPython's class name, in the order they run, and the test
# methods of each that run (None: all of them).
CLASSES: dict[str, type[unittest.TestCase]] = {}
SELECTED: dict[str, list[str] | None] = {}

# Other CPython tests that create queues with self.Queue() or
# self.JoinableQueue(), mostly to get results back from their children.
_USES_QUEUE = re.compile(r"\bself\.(?:Joinable)?Queue\(")


def _queue_users(module: Any) -> Iterator[tuple[str, Any, list[str]]]:
    """(name, class, test methods) of the other processes-type test classes
    whose test methods call self.Queue() or self.JoinableQueue()."""
    loader = unittest.TestLoader()
    for name, base in vars(module).items():
        if (
            not isinstance(base, type)
            or not issubclass(base, module.BaseTestCase)
            or base in (module.BaseTestCase, module._TestQueue)
            or "processes" not in getattr(base, "ALLOWED_TYPES", ())
        ):
            continue
        methods = []
        for method in loader.getTestCaseNames(base):
            try:
                source = inspect.getsource(getattr(base, method))
            except (OSError, TypeError):
                continue
            if _USES_QUEUE.search(source):
                methods.append(method)
        if methods:
            yield name, base, methods


if _tm is not None:

    class PipeqProcessesMixin(_tm.ProcessesMixin):  # type: ignore[misc]
        """CPython's ProcessesMixin with pipeq's queues."""

        Queue = staticmethod(SUBSTITUTES["Queue"])
        JoinableQueue = staticmethod(SUBSTITUTES["JoinableQueue"])
        SimpleQueue = staticmethod(SUBSTITUTES["SimpleQueue"])

    # As install_tests_in_module_dict does: Temp(base, Mixin, unittest.TestCase)
    # for the typed classes, Temp(base, object) for plain TestCases.
    class WithProcessesTestQueue(
        _tm._TestQueue,  # type: ignore[misc]
        PipeqProcessesMixin,
        unittest.TestCase,
    ):
        pass

    class TestSimpleQueue(_tm.TestSimpleQueue):  # type: ignore[misc]
        pass

    CLASSES = {"_TestQueue": WithProcessesTestQueue, "TestSimpleQueue": TestSimpleQueue}
    SELECTED = {"_TestQueue": None, "TestSimpleQueue": None}

    # Module-level names, like the two above, so that children find them.
    for _name, _base, _methods in list(_queue_users(_tm)):
        _cls = type(
            "WithProcesses" + _name[1:], (_base, PipeqProcessesMixin, unittest.TestCase), {}
        )
        _cls.__module__ = __name__
        globals()[_cls.__name__] = _cls
        CLASSES[_name] = _cls
        SELECTED[_name] = _methods


def case_ids() -> list[str]:
    """Every test as "CPythonClass.test_method", in the order main() runs them."""
    loader = unittest.TestLoader()
    return [
        f"{name}.{method}"
        for name, cls in CLASSES.items()
        for method in SELECTED[name] or loader.getTestCaseNames(cls)
    ]


def _case_id(test: Any) -> str:
    for name, cls in CLASSES.items():
        if type(test) is cls:
            return f"{name}.{test._testMethodName}"
    return str(test)  # a fixture (setUpClass ...) reported as an _ErrorHolder


class JsonLinesResult(unittest.TestResult):
    """Writes one JSON object per test to `out`, as soon as the test ends.

    {"test": "CPythonClass.test_method", "outcome": "passed" | "failed" |
    "error" | "skipped" | "xfail" | "xpass", "details": str, "duration": s}.
    Errors outside a test (setUpClass, tearDownClass) become
    {"fixture": description, "outcome": "error", "details": traceback}.
    """

    def __init__(self, out: TextIO) -> None:
        super().__init__()
        self.out = out
        self._start = 0.0
        self._outcome = ""
        self._details: list[str] = []

    def _emit(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def _set(self, outcome: str, details: str = "") -> None:
        # A failure or error (also of a subtest) is not overridden by a
        # later, milder outcome.
        if self._outcome not in ("failed", "error"):
            self._outcome = outcome
        if details:
            self._details.append(details)

    def _format(self, test: Any, err: Any) -> str:
        return "".join(traceback.format_exception(*err))

    def startTest(self, test: Any) -> None:
        super().startTest(test)
        self._start = time.monotonic()
        self._outcome = ""
        self._details = []
        faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
        sys.stderr.write(f"--- {_case_id(test)}\n")
        sys.stderr.flush()

    def stopTest(self, test: Any) -> None:
        faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        self._emit(
            {
                "test": _case_id(test),
                "outcome": self._outcome or "passed",
                "details": "\n".join(self._details),
                "duration": round(time.monotonic() - self._start, 3),
            }
        )

    def addSuccess(self, test: Any) -> None:
        super().addSuccess(test)
        self._set("passed")

    def addFailure(self, test: Any, err: Any) -> None:
        super().addFailure(test, err)
        self._set("failed", self._format(test, err))

    def addError(self, test: Any, err: Any) -> None:
        super().addError(test, err)
        if isinstance(test, unittest.TestCase):
            self._set("error", self._format(test, err))
        else:
            self._emit(
                {"fixture": str(test), "outcome": "error", "details": self._format(test, err)}
            )

    def addSkip(self, test: Any, reason: str) -> None:
        super().addSkip(test, reason)
        if isinstance(test, unittest.TestCase):
            self._set("skipped", reason)
        else:
            self._emit({"fixture": str(test), "outcome": "skipped", "details": reason})

    def addExpectedFailure(self, test: Any, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._set("xfail", self._format(test, err))

    def addUnexpectedSuccess(self, test: Any) -> None:
        super().addUnexpectedSuccess(test)
        self._set("xpass")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._set("failed" if failed else "error", f"{subtest}:\n{self._format(test, err)}")


def main(argv: list[str]) -> int:
    """main([start_method, results_path]): run the tests, one JSON line each."""
    start_method, results_path = argv
    faulthandler.enable()
    with open(results_path, "w", encoding="utf-8") as out:
        result = JsonLinesResult(out)
        if _tm is None:
            result._emit({"fixture": "import", "outcome": "skipped", "details": UNAVAILABLE})
            return 0

        for name, substitute in SUBSTITUTES.items():
            setattr(multiprocessing, name, substitute)

        module_fixtures: dict[str, Any] = {"__name__": __name__}
        install = _tm.install_tests_in_module_dict
        if "only_type" in inspect.signature(install).parameters:
            install(module_fixtures, start_method, only_type="processes")
        else:  # Python 3.10
            install(module_fixtures, start_method)
        try:
            module_fixtures["setUpModule"]()
        except unittest.SkipTest as exc:
            result._emit({"fixture": "setUpModule", "outcome": "skipped", "details": str(exc)})
            return 0

        suite = unittest.TestSuite()
        for case in case_ids():
            name, method = case.split(".")
            suite.addTest(CLASSES[name](method))
        try:
            suite.run(result)
        finally:
            # An error here ends the runner with a traceback and exit status 1.
            module_fixtures["tearDownModule"]()
        # BaseMixin.tearDownClass and tearDownModule set this when a test
        # left processes or threads behind (regrtest's "env changed").
        altered = bool(getattr(_tm.support, "environment_altered", False))
        result._emit({"fixture": "environment", "environment_altered": altered})
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(
        "run through test_cpython_suite.py, or: python -c "
        '"import cpython_suite, sys; sys.exit(cpython_suite.main(sys.argv[1:]))" '
        "START_METHOD RESULTS_FILE"
    )
