"""Process-wide behaviour set up by each entry point: memory reuse and stopping on signals.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves
blocks above 32 MB (a [256, 128, 32, 32] float activation is 128 MB) with a
fresh ``mmap`` and returns them on free, so every training step page-faults
hundreds of megabytes back in and the kernel zeroes them, a large share of
a CPU step. Telling glibc never to use mmap and never to trim keeps freed
blocks in the heap for reuse (figures: docs/benchmarks.md), at the price of
holding the peak memory until the process ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import signal
import sys
from types import FrameType
from typing import Iterator

from errors import Interrupted

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc reuse freed tensor memory instead of unmapping it; False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class StopRequest:
    """The first SIGINT/SIGTERM asks the loops to stop after their current step.

    Loops call ``check`` between steps (and evaluation between epochs); a
    second signal exits at once, which cannot corrupt a checkpoint because
    checkpoints are only ever replaced by a rename.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
              "(send it again to quit at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def clear(self) -> None:
        self.signum = None


STOP = StopRequest()


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """While a command runs, SIGINT and SIGTERM request a clean stop instead of killing it."""
    STOP.clear()
    previous = {signum: signal.signal(signum, STOP.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
