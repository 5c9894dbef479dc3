"""Build the compiled core; all metadata lives in pyproject.toml."""

import os
import sys

from setuptools import Extension, setup


def _flag(name):
    """An environment switch: set and not "0"."""
    return os.environ.get(name, "") not in ("", "0")


# Windows has no POSIX pipes or process-shared pthread mutexes: build no
# extension there, and let `import pipeq` say why it cannot work.
NO_EXTENSIONS = (
    _flag("PIPEQ_NO_EXTENSIONS") or sys.implementation.name != "cpython" or sys.platform == "win32"
)
# Without a working C compiler the build goes on without the extension and
# pipeq runs on its pure-Python core; wheel builds set this to fail instead.
REQUIRE_EXTENSION = _flag("PIPEQ_REQUIRE_EXTENSION")
DEBUG_BUILD = _flag("PIPEQ_DEBUG_BUILD")


def extensions():
    if NO_EXTENSIONS:
        return []
    from Cython.Build import cythonize

    directives = {"language_level": "3", "embedsignature": True}
    ext = Extension(
        "pipeq._core_c",
        ["src/pipeq/_core_c.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG_BUILD else ["-O2"],
    )
    built = cythonize([ext], compiler_directives=directives)
    for e in built:  # set after cythonize, which does not carry it over
        e.optional = not REQUIRE_EXTENSION
    return built


setup(ext_modules=extensions())
