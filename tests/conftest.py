"""Code/ on the import path (as the entry scripts see it) and shared fixtures."""

import os
import sys
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest.ini runs two workers: each, and every process its tests start, computes on one thread
    # (set before torch is imported), so the workers do not share cores, where OpenMP threads that
    # wait on each other can make a step many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Code"))

from helpers import write_image_folder  # noqa: E402  (needs the path above)
from compiled import compile_cache_dir  # noqa: E402

compile_cache_dir()  # before any test touches inductor (torch._dynamo.reset() fixes its cache folder)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 10 generated 16x16 RGB images, split 80/20 by the loader."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))
