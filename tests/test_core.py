"""Below the Queue API: which core is live, pipe size, fds, and the frame format."""

from __future__ import annotations

import errno
import fcntl
import importlib.machinery
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from workers import TIMEOUT, call_with_timeout

import pipeq
import pipeq._core
from pipeq import _shm

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def q() -> Iterator[pipeq.Queue[Any]]:
    queue: pipeq.Queue[Any] = pipeq.Queue()
    yield queue
    queue.close()


# -- which core


@pytest.mark.skipif(pipeq._core.NO_EXTENSIONS, reason="PIPEQ_NO_EXTENSIONS selects the pure core")
def test_compiled_core_is_live() -> None:
    import pipeq._core_c

    assert pipeq._core.USING_EXTENSION is True
    assert pipeq._core.Channel is pipeq._core_c.Channel
    assert pipeq._core_c.__file__ is not None
    assert pipeq._core_c.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert type(pipeq.Queue()._channel) is pipeq._core_c.Channel


def test_installed_package_is_tested() -> None:
    # The tests import the installed wheel, not the source tree.
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    assert not os.path.abspath(pipeq.__file__).startswith(src + os.sep)


# -- pipe capacity


def _pipe_max_size_allowed() -> int:
    """/proc/sys/fs/pipe-max-size if this process may size a pipe that large, else 0."""
    with open("/proc/sys/fs/pipe-max-size") as f:
        size = int(f.read())
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError as e:
        if e.errno == errno.EPERM:
            return 0
        raise
    finally:
        os.close(r)
        os.close(w)
    return size


@pytest.mark.linux
@pytest.mark.skipif(not LINUX, reason="Linux pipe sizing")
@pytest.mark.parametrize("maxsize", [0, 10])
def test_pipe_capacity_is_pipe_max_size(maxsize: int) -> None:
    expected = _pipe_max_size_allowed()
    if not expected:
        pytest.skip("this user may not raise pipes to pipe-max-size")
    q: pipeq.Queue[Any] = pipeq.Queue(maxsize)
    try:
        assert q.pipe_capacity == expected
        assert q.pipe_capacity == fcntl.fcntl(q._channel.writer_fileno(), fcntl.F_GETPIPE_SZ)
    finally:
        q.close()


def test_pipe_capacity_at_least_default(q: pipeq.Queue[Any]) -> None:
    assert q.pipe_capacity >= 65536


@pytest.mark.pipe_only
def test_item_larger_than_pipe_with_no_reader_times_out(q: pipeq.Queue[Any]) -> None:
    # The documented trade-off: put() blocks when the pipe is full, and with
    # a timeout raises Full; the item is then not delivered.
    big = b"\x02" * (2 * q.pipe_capacity)
    with pytest.raises(pipeq.Full):
        q.put(big, timeout=0.3)
    with pytest.raises(pipeq.Empty):
        q.get(timeout=0.3)  # the abandoned frame is dropped, not delivered
    q.put("small", timeout=TIMEOUT)
    assert q.get(timeout=TIMEOUT) == "small"


# -- file descriptors


def _fds_of(q: pipeq.Queue[Any]) -> list[int]:
    return [q._channel.fileno(), q._channel.writer_fileno()]


def _open_fds() -> set[int]:
    """This process's open fds (without the one that listing them used)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue  # listdir's own fd, closed by now
        fds.add(int(name))
    return fds


def test_fds_close_on_exec(q: pipeq.Queue[Any]) -> None:
    for fd in _fds_of(q):
        assert not os.get_inheritable(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


@pytest.mark.linux
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("maxsize", [0, 4])
def test_every_new_fd_close_on_exec(maxsize: int) -> None:
    # All of them: data pipe, shared page and, when bounded, the wake-up pipe.
    before = _open_fds()
    q: pipeq.Queue[Any] = pipeq.Queue(maxsize)
    try:
        new = _open_fds() - before
        assert set(_fds_of(q)) <= new
        assert len(new) >= 3
        for fd in new:
            assert not os.get_inheritable(fd), os.readlink(f"/proc/self/fd/{fd}")
    finally:
        q.close()


def test_fds_not_leaked_into_subprocess(q: pipeq.Queue[Any]) -> None:
    # close_fds=False: only close-on-exec keeps them out of the new program.
    fds = _fds_of(q)
    code = (
        "import os, sys\n"
        "open_fds = []\n"
        "for fd in map(int, sys.argv[1:]):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        open_fds.append(fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(open_fds)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, fds)],
        close_fds=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_close_releases_fds() -> None:
    q: pipeq.Queue[Any] = pipeq.Queue(3)
    fds = _fds_of(q)
    q.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# -- frames


def _frame(body: bytes, flags: int = _shm.FLAG_RAW, marker: int = _shm.MARK_COMMIT) -> bytes:
    """A one-chunk frame as pipeq's wire format spells it."""
    return _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, flags, 0, len(body)) + body + bytes([marker])


def test_stream_error_is_value_error() -> None:
    assert issubclass(pipeq.StreamError, ValueError)


def test_handwritten_frame_is_received(q: pipeq.Queue[Any]) -> None:
    os.write(q._channel.writer_fileno(), _frame(b"hello"))
    assert call_with_timeout(lambda: q.get(timeout=TIMEOUT)) == b"hello"


def test_torn_frame_is_dropped(q: pipeq.Queue[Any]) -> None:
    os.write(q._channel.writer_fileno(), _frame(b"lost", marker=_shm.MARK_TORN) + _frame(b"next"))
    assert call_with_timeout(lambda: q.get(timeout=TIMEOUT)) == b"next"


GARBAGE = {
    "text": b"garbage! " * 10,
    "short": b"junk",  # less than a header, and nobody writing the rest
    "bad_magic": _shm.HEADER.pack(b"xx", _shm.VERSION, _shm.FLAG_RAW, 0, 3) + b"abc\xc3",
    "bad_version": _shm.HEADER.pack(_shm.MAGIC, 250, _shm.FLAG_RAW, 0, 3) + b"abc\xc3",
    "unknown_flag": _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, 0x80, 0, 3) + b"abc\xc3",
    "absurd_length": _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, _shm.FLAG_RAW, 0, 2**63),
    "buffers_without_flag": _shm.HEADER.pack(_shm.MAGIC, _shm.VERSION, 0, 2, 100) + bytes(101),
    "truncated_body": _frame(b"0123456789")[:-5],  # and no writer to finish it
    "bad_marker": _frame(b"abc", marker=0x00),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_in_pipe_raises_stream_error(q: pipeq.Queue[Any], garbage: bytes) -> None:
    os.write(q._channel.writer_fileno(), garbage)
    with pytest.raises(pipeq.StreamError, match="pipeq"):
        call_with_timeout(lambda: q.get(timeout=TIMEOUT))


def test_garbage_then_valid_frame(q: pipeq.Queue[Any]) -> None:
    # A whole bad header is consumed with the error; what follows is readable.
    os.write(q._channel.writer_fileno(), b"0123456789abcdef")
    q.put("fine")
    with pytest.raises(pipeq.StreamError):
        call_with_timeout(lambda: q.get(timeout=TIMEOUT))
    assert call_with_timeout(lambda: q.get(timeout=TIMEOUT)) == "fine"


def test_windows_refused_at_import_with_a_clear_message() -> None:
    # What `import pipeq` does on Windows, where the package installs without
    # its extension: refuse before anything imports fcntl or termios.
    code = "import sys; sys.platform = 'win32'; import pipeq"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode != 0
    assert "ImportError: pipeq needs POSIX pipes" in out.stderr
    assert "on Windows use multiprocessing.Queue" in out.stderr
