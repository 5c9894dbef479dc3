"""Build the compiled core; all metadata lives in pyproject.toml."""

import os
import sys

from setuptools import Extension, setup

# Windows has no POSIX pipes or process-shared pthread mutexes: build no
# extension there, and let `import pipeq` say why it cannot work.
NO_EXTENSIONS = (
    bool(os.environ.get("PIPEQ_NO_EXTENSIONS"))
    or sys.implementation.name != "cpython"
    or sys.platform == "win32"
)
DEBUG_BUILD = bool(os.environ.get("PIPEQ_DEBUG_BUILD"))


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
    return cythonize([ext], compiler_directives=directives)


setup(ext_modules=extensions())
