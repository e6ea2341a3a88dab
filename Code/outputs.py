"""Everything a run writes, in one directory, each file replaced atomically.

Layout of ``<save_path>/<run_name>/``::

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON record per logged iteration / evaluation
    sets/*.pt          distilled sets (images, labels, metadata), torch.save
    images/*.png       de-normalised grids of the stored images
    results.json       the final accuracies

Files are written to a temporary name in the same directory, flushed to disk,
then renamed over the target, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from errors import ConfigError


def atomic_write(path: Path, write: Callable[[Path], None], keep_previous: Path | None = None) -> None:
    """Call ``write(tmp)``, flush it to disk, then rename ``tmp`` over ``path``.

    ``path`` is intact if writing fails (a full disk, a kill). With
    ``keep_previous``, the old ``path`` is first renamed there, so a complete
    file exists under one of the two names at every moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable(directory: Path) -> None:
    """Fail early, with the fix, when runs cannot be saved under ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot write to --save_path {directory}: {error.strerror or error}; "
            "choose a writable directory"
        ) from None


def default_run_name(config: Any) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.method}_{config.dataset}_ipc{config.ipc}_seed{config.seed}_{stamp}"


class RunDirectory:
    """The output folder of one run.

    Every change it makes to the disk goes through ``_replace``, ``_append``,
    ``_truncate`` and ``_remove``, which do nothing when ``writes`` is false:
    under torchrun the first process writes every file and the others hold
    the same directory read-only, so a write method added later is skipped on
    them without saying so.
    """

    def __init__(self, path: Path, writes: bool = True) -> None:
        self.path, self.writes = path, writes

    @classmethod
    def create(cls, save_path: str | Path, run_name: str) -> "RunDirectory":
        """Create a fresh folder; an existing name gets a numeric suffix, never overwritten."""
        root = Path(save_path)
        root.mkdir(parents=True, exist_ok=True)
        path, suffix = root / run_name, 1
        while True:
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                suffix += 1
                path = root / f"{run_name}_{suffix}"

    @classmethod
    def restart(cls, save_path: str | Path, run_name: str) -> "RunDirectory":
        """The folder ``run_name``, created if missing, emptied of a start that made no checkpoint."""
        run_dir = cls(Path(save_path) / run_name)
        run_dir.path.mkdir(parents=True, exist_ok=True)
        run_dir.remove_partial_writes()
        run_dir.truncate_metrics(0)
        return run_dir

    def _replace(self, path: Path, write: Callable[[Path], None], keep_previous: Path | None = None) -> Path:
        if self.writes:
            atomic_write(path, write, keep_previous)
        return path

    def _append(self, path: Path, line: str) -> None:
        """One line in a single write, so a crash cannot split it."""
        if self.writes:
            with open(path, "a") as handle:
                handle.write(line + "\n")
                handle.flush()

    def _truncate(self, path: Path, size: int) -> None:
        if self.writes:
            os.truncate(path, size)

    def _remove(self, path: Path) -> None:
        if self.writes:
            path.unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self._replace(self.path / "config.yaml", lambda tmp: tmp.write_text(text))

    def remove_partial_writes(self) -> None:
        """Temporary files left by a process killed while writing (the targets are intact)."""
        for partial in self.path.rglob(".*.tmp"):
            self._remove(partial)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def metrics_size(self) -> int:
        return self.metrics_path.stat().st_size if self.metrics_path.exists() else 0

    def truncate_metrics(self, size: int) -> None:
        """Drop records written after a checkpoint, so a resumed run writes each exactly once."""
        if self.metrics_size() > size:
            self._truncate(self.metrics_path, size)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._append(self.metrics_path, json.dumps(record))

    def save_set(self, name: str, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any],
                 soft_labels: torch.Tensor | None = None) -> Path:
        """A set file: images, labels, metadata and, when given, one soft label (logits) per training image."""
        payload = {"images": images.detach().cpu(), "labels": labels.detach().cpu(), "meta": meta}
        if soft_labels is not None:
            payload["soft_labels"] = soft_labels.detach().cpu()
        return self._replace(self.path / "sets" / f"{name}.pt", lambda tmp: torch.save(payload, tmp))

    def save_grid(self, name: str, pixels: torch.Tensor, nrow: int) -> Path:
        """A PNG grid of images already mapped to [0, 1] pixel space (clipped here)."""
        path = self.path / "images" / f"{name}.png"
        if not self.writes:
            return path
        from torchvision.utils import save_image  # here, not at start-up: importing torchvision takes seconds

        grid = pixels.detach().float().cpu().clamp(0.0, 1.0)
        return self._replace(path, lambda tmp: save_image(grid, tmp, nrow=nrow, format="png"))

    def write_results(self, results: dict[str, Any]) -> Path:
        text = json.dumps(results, indent=2) + "\n"
        return self._replace(self.path / "results.json", lambda tmp: tmp.write_text(text))

    def write_checkpoint(self, payload: dict[str, Any], name: str, previous: str) -> None:
        """Replace checkpoint ``name``, keeping the one it replaces as ``previous`` until then."""
        self._replace(self.path / name, lambda tmp: torch.save(payload, tmp), keep_previous=self.path / previous)
