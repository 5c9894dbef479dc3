"""pipeq: a drop-in multiprocessing.Queue with a synchronous, fork-safe put()."""

import sys

if sys.platform == "win32":  # before anything imports fcntl or termios
    raise ImportError(
        "pipeq needs POSIX pipes and process-shared mutexes, which Windows does not "
        "have; on Windows use multiprocessing.Queue"
    )

from queue import Empty, Full  # noqa: E402

from pipeq._errors import BatchFull, PipeFullWarning, StreamError  # noqa: E402
from pipeq.queues import JoinableQueue, Queue, SimpleQueue  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "BatchFull",
    "Empty",
    "Full",
    "JoinableQueue",
    "PipeFullWarning",
    "Queue",
    "SimpleQueue",
    "StreamError",
    "__version__",
]
