"""Pick the core: the compiled one when it is built and allowed, else the pure one."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

# Set (and not "0"): use the pure core even where the compiled one is built.
NO_EXTENSIONS = os.environ.get("PIPEQ_NO_EXTENSIONS", "") not in ("", "0") or (
    sys.implementation.name != "cpython"
)

if TYPE_CHECKING:
    from pipeq._core_py import Channel
elif NO_EXTENSIONS:
    from pipeq._core_py import Channel
else:
    try:
        from pipeq._core_c import Channel
    except ImportError:  # built without a compiler: the pure twin does the same
        from pipeq._core_py import Channel

# Which core is live; a test asserts the compiled one in a normal install.
USING_EXTENSION: bool = Channel.__module__ == "pipeq._core_c"

__all__ = ["NO_EXTENSIONS", "USING_EXTENSION", "Channel"]
