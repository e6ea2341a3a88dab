"""The ``--compile`` fast path: torch.compile for the networks, and what it needs.

Inductor builds CPU kernels with the system C++ compiler (and Triton's CUDA
launchers with it too), so its absence is reported before a run starts; the
compiled kernels are cached on disk between runs, in a folder stated here.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from errors import ConfigError
from networks import Network


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def compiler_found() -> bool:
    """Whether inductor can build kernels here: its CPU kernels (and Triton's CUDA launchers) need the
    system C++ compiler."""
    return shutil.which(_compiler()) is not None


@lru_cache(maxsize=1)
def require_compiler() -> None:
    """Fail before the run, not at its first step."""
    if not compiler_found():
        raise ConfigError(f"--compile needs a C++ compiler and {_compiler()!r} was not found: install one "
                          "(e.g. apt-get install g++, or set CXX) or run with --compile off")


@lru_cache(maxsize=1)
def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels between runs, set before the first compile.

    ``TORCHINDUCTOR_CACHE_DIR`` when given; else inductor's own default
    (``torchinductor_<user>`` in the temporary folder), named here rather than
    read from inductor's private modules, which differ between releases. The
    ATen capability is appended when ``ATEN_CPU_CAPABILITY`` is set: inductor's
    cache key leaves that variable out, and kernels generated under one
    capability fail to build under another ("'at::vec' has not been declared").
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None:
        capability = os.environ.get("ATEN_CPU_CAPABILITY")
        chosen = str(Path(tempfile.gettempdir()) / f"torchinductor_{_user()}{'_' + capability if capability else ''}")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = chosen
    return Path(chosen)


def _user() -> str:
    """The user name inductor puts in its default folder name (the uid where there is none)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


def compile_network(net: Network) -> Network:
    """Route ``net``'s forward and embed through torch.compile (``--compile``).

    Inductor fuses each block's norm, activation and pooling into one pass over
    memory, which is most of a small ConvNet's time outside the convolutions.
    Nets of one class share the compiled code (parameters are graph inputs), so a
    growing pool compiles once per input shape and grad mode, not once per net.
    """
    require_compiler()
    compile_cache_dir()
    net.forward = torch.compile(net.forward)
    net.embed = torch.compile(net.embed)
    return net


def compile_notice() -> str:
    """What a compiled run costs, and where the cost is kept for the next run."""
    return ("compiling the networks (torch.compile): the first iteration and the first evaluation take tens of "
            f"seconds longer; compiled code is cached in {compile_cache_dir()} for later runs")
