"""Decode image files into one uint8 [N,C,H,W] tensor, on all cores."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from errors import DataError

from .common import one_line


def _decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 HxWxC, resized bilinearly to size x size when needed."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(size, size, -1)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({one_line(error)}); replace or remove the file") from error


def decode_images(paths: list[Path], size: int, mode: str) -> torch.Tensor:
    """Decode on all cores (PIL releases the GIL) into one preallocated uint8 [N,C,H,W]."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for position, pixels in enumerate(pool.map(partial(_decode_image, size=size, mode=mode), paths)):
            out[position] = pixels.transpose(2, 0, 1)
    return torch.from_numpy(out)


def image_mode(path: Path) -> str:
    """PIL mode from the header only, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({one_line(error)}); replace or remove the file") from error
