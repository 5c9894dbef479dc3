"""Pick the core: the compiled one when it is built and allowed, else the pure one."""

from __future__ import annotations

import os
import sys

from pipeq._shm import check_platform

check_platform()

NO_EXTENSIONS = bool(os.environ.get("PIPEQ_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)

if NO_EXTENSIONS:
    raise ImportError(
        "pipeq: the pure-Python core is not available yet; "
        "unset PIPEQ_NO_EXTENSIONS and install with a C compiler"
    )

from pipeq._core_c import Channel  # noqa: E402

USING_EXTENSION = True

__all__ = ["Channel", "USING_EXTENSION"]
