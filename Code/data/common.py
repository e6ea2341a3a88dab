"""What several loaders share: library errors as one line, the bounded download, digit class names."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

DOWNLOAD_TIMEOUT_S = 60.0
MNIST_CLASSES = [str(digit) for digit in range(10)]


def one_line(error: BaseException) -> str:
    """Library messages can span lines; user errors are one line."""
    return " ".join(str(error).split())


@contextlib.contextmanager
def network_timeout(seconds: float) -> Iterator[None]:
    """Bound each socket read/connect so a stalled download fails instead of hanging (restored after)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
