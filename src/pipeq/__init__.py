"""pipeq: a drop-in multiprocessing.Queue with a synchronous, fork-safe put()."""

from queue import Empty, Full

from pipeq._errors import PipeFullWarning, StreamError
from pipeq.queues import JoinableQueue, Queue, SimpleQueue

__version__ = "0.1.0.dev0"

__all__ = [
    "Empty",
    "Full",
    "JoinableQueue",
    "PipeFullWarning",
    "Queue",
    "SimpleQueue",
    "StreamError",
    "__version__",
]
