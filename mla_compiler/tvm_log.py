"""Keep TVM's own warnings off the user's terminal (``--verbose`` shows them).

libtvm writes ``LOG(WARNING)`` / ``LOG(INFO)`` straight to file descriptor 2 (``std::cerr``), e.g.
``[20:45:55] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there
are out-of-bounds indices...`` or ``.../codegen_cpu.cc:1183: Warning: Unknown pragma
pragma_scope``: internal notes a user can do nothing about. ``quiet_tvm`` points fd 2 at a
temporary file for the duration of a block and forwards every line that is not such a note to
the real stderr (within ``POLL_S``, and all of it when the block ends, exception or not), so real
errors are never swallowed. Python warnings raised in TVM and library deprecation notices are
ignored and the ``tvm`` loggers raised to ERROR over the same block.

    with quiet_tvm(args.verbose) as say:
        compile_model(..., log=say)

``say(msg)`` prints ``msg`` on the real stderr at once (fd 2 itself is redirected meanwhile).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator

# TVM's LogMessage prefix: "[HH:MM:SS] file:line: " then "Warning: " / "Debug: " / nothing (INFO)
# / "Error: ". Errors stay visible.
TVM_LOG_LINE = re.compile(rb"^\[\d\d:\d\d:\d\d\] \S+\.(?:cc|h|cpp|cu|cuh):\d+: (?!Error: )")
# a warning raised from TVM's Python code (the module it is attributed to)
TVM_WARNING_MODULE = r"tvm(\.|$)"
# deprecation notices of the libraries we drive (torch.export's treespec FutureWarning)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
POLL_S = 0.2


def is_noise(line: bytes) -> bool:
    """Whether one line written to fd 2 is a TVM info / debug / warning log line."""
    return TVM_LOG_LINE.match(line) is not None


@contextlib.contextmanager
def quiet_tvm(verbose: bool) -> Iterator[Callable[[str], None]]:
    """Hide TVM's warning output inside the block unless ``verbose``; yield ``say(msg)``, which
    prints ``msg`` on the real stderr immediately (thread-safe)."""
    if verbose:
        yield lambda msg: print(msg, file=sys.stderr, flush=True)
        return
    with warnings.catch_warnings(), _quiet_loggers(), _FilteredStderr() as stderr:
        warnings.filterwarnings("ignore", module=TVM_WARNING_MODULE)
        for category in DEPRECATIONS:
            warnings.filterwarnings("ignore", category=category)
        yield stderr.say


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    logger = logging.getLogger("tvm")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


class _FilteredStderr:
    """fd 2 -> a temporary file; a thread forwards its non-noise lines to the saved fd 2.

    A file rather than a pipe: writers (C++ holding the GIL included) never block on a reader.
    """

    def __enter__(self) -> _FilteredStderr:
        _flush_stderr()
        self._real = os.dup(2)
        self._file = tempfile.TemporaryFile(prefix="mla-stderr-")
        self._pos, self._partial = 0, b""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        os.dup2(self._file.fileno(), 2)
        self._thread = threading.Thread(target=self._poll, name="quiet_tvm", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _flush_stderr()
        self._stop.set()
        self._thread.join()
        try:
            os.dup2(self._real, 2)  # restore first: nothing written from here on is captured
            with self._lock:
                self._forward(final=True)
        finally:
            os.close(self._real)
            self._file.close()

    def say(self, msg: str) -> None:
        _flush_stderr()
        with self._lock:
            self._forward()  # what was written before comes first
            _write_all(self._real, (msg + "\n").encode(errors="replace"))

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            with self._lock:
                self._forward()

    def _forward(self, final: bool = False) -> None:
        """Write the complete new lines that are not noise to the real stderr (lock held)."""
        chunks = []
        while chunk := os.pread(self._file.fileno(), 1 << 20, self._pos):
            self._pos += len(chunk)
            chunks.append(chunk)
        if not chunks and not final:
            return
        *lines, self._partial = (self._partial + b"".join(chunks)).split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not is_noise(line))
        if final:  # an unfinished last line goes out as it is
            out += b"" if is_noise(self._partial) else self._partial
            self._partial = b""
        if out:
            _write_all(self._real, out)


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
