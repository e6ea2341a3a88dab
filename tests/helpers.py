"""Helpers shared by the test modules: generated image folders and the script runner."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CODE_DIR = Path(__file__).resolve().parent.parent / "Code"


def write_image_folder(root: Path, classes: int = 3, per_class: int = 10, size: int = 16, seed: int = 0) -> Path:
    """DIR/train/<class>/*.png: one colour per class plus noise, so classes are learnable."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-40, 41, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an entry script as a user would, from Code/."""
    return subprocess.run([sys.executable, script, *args], cwd=CODE_DIR, capture_output=True, text=True,
                          timeout=timeout)
