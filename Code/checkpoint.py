"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the resolved config, the results of the finished
experiments, the best-on-test record and, in the middle of an experiment, its
whole state (``Experiment.state_dict``: synthetic images and their optimiser,
every pool network with its optimiser and accuracy meter, the pool's two
running generators (every other stream is derived from the seed and the step
it serves, rng.make_generator), the loop position, the loss log), plus the length of metrics.jsonl
at that moment: records written after it are dropped on resume, so none is
duplicated or missing. It is written to a temporary file, flushed and renamed,
the previous one kept as checkpoint.prev.pt until the new one is complete, and
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from config import Config, saved_settings
from distill import Experiment
from distributed import SINGLE, World
from errors import ConfigError
from evaluation_points import BestOnTest
from outputs import RunDirectory
from results import ExperimentOutcome

CHECKPOINT, PREVIOUS = "checkpoint.pt", "checkpoint.prev.pt"
FORMAT = 3
AUTO_INTERVAL_S = 600.0  # --checkpoint_every 0: at most ~10 minutes of work are lost
REQUIRED_KEYS = {"format", "config", "experiment", "outcomes", "best", "experiment_state", "metrics_bytes",
                 "world_size"}


@dataclass
class RunProgress:
    """What a run has finished: the experiments done and the best set seen on the test set."""

    experiment: int = 0
    outcomes: list[ExperimentOutcome] = field(default_factory=list)
    best: BestOnTest = field(default_factory=BestOnTest)


@dataclass
class Checkpoint:
    """A loaded checkpoint and the run directory it belongs to; its payload is read only through
    the accessors below."""

    directory: Path
    payload: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings in today's terms (config.saved_settings)."""
        return saved_settings(self.payload["config"])

    @property
    def metrics_bytes(self) -> int:
        """The length of metrics.jsonl when the checkpoint was taken: later records are dropped."""
        return int(self.payload["metrics_bytes"])

    @property
    def world_size(self) -> int:
        """How many processes wrote it."""
        return int(self.payload["world_size"])

    def progress(self) -> RunProgress:
        return RunProgress(self.payload["experiment"],
                           [ExperimentOutcome.from_state(state) for state in self.payload["outcomes"]],
                           BestOnTest(**self.payload["best"]))

    def experiment_state(self, index: int) -> dict[str, Any] | None:
        """The saved state of experiment ``index`` when the checkpoint was taken in its middle."""
        state = self.payload["experiment_state"]
        return state if state is not None and state["index"] == index else None


class Checkpoints:
    """Writes the run's checkpoint at evaluation points and every ``every`` iterations.

    ``every`` = 0 checkpoints whenever ``AUTO_INTERVAL_S`` of work have passed
    since the last one, whatever the device's speed. Checkpointing draws no
    random numbers, so it never changes a result.
    """

    def __init__(self, run_dir: RunDirectory, config: Config, progress: RunProgress, world: World = SINGLE) -> None:
        self.run_dir, self.config, self.progress, self.world = run_dir, config, progress, world
        self.last_saved = time.monotonic()

    def save(self, experiment: Experiment | None) -> None:
        """Checkpoint now; ``experiment`` is the one in progress (None between experiments). Every
        process calls it (the state is gathered from all); the run directory of the first writes it."""
        if experiment is not None:
            experiment.health.raise_if_bad()
        payload = {
            "format": FORMAT, "config": self.config.to_dict(), "experiment": self.progress.experiment,
            "outcomes": [outcome.state_dict() for outcome in self.progress.outcomes], "best": dataclasses.asdict(self.progress.best),
            "experiment_state": experiment.state_dict() if experiment is not None else None,
            "metrics_bytes": self.run_dir.metrics_size(), "world_size": self.world.size,
        }
        self.run_dir.write_checkpoint(payload, CHECKPOINT, PREVIOUS)
        self.last_saved = time.monotonic()

    def due(self, iterations_done: int) -> bool:
        """Whether a checkpoint is due after ``iterations_done`` iterations, by this process's count or
        clock; the experiment lets the first process's answer decide for all (``World.agree``)."""
        every = self.config.checkpoint_every
        if every > 0:
            return iterations_done % every == 0
        return time.monotonic() - self.last_saved >= AUTO_INTERVAL_S


def _synthetic_from_whole_set(images: torch.Tensor, optimizer: dict[str, Any], classes: int) -> dict[str, Any]:
    """Format 2 kept the whole-set torch optimiser, stepped at every turn: every class current at the
    last turn. As lazy per-class state: each class synced to turn 0 of a new clock (SGD), or, for Adam,
    to its step count."""
    slot = next(iter(optimizer["state"].values()), {})
    if "exp_avg" in slot:
        step = int(slot["step"])
        return {"kind": "adam", "images": images, "exp_avg": slot["exp_avg"], "exp_avg_sq": slot["exp_avg_sq"],
                "synced": torch.full((classes,), step, dtype=torch.long), "clock": step}
    velocity = slot.get("momentum_buffer", torch.zeros_like(images))
    return {"kind": "sgd", "images": images, "velocity": velocity,
            "synced": torch.zeros(classes, dtype=torch.long), "clock": 0}


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """A format-2 checkpoint (before batched class steps) in format 3: the run continues with the
    default --class_steps batched, which computes the same to rounding."""
    state = payload["experiment_state"]
    if state is not None:
        config = saved_settings(payload["config"])
        classes = len(state["images"]) // config["ipc"]
        synthetic = _synthetic_from_whole_set(state.pop("images"), state.pop("optimizer"), classes)
        log = state["log"]
        per_step = classes if config["method"] == "dm" else 1
        state["synthetic"] = synthetic
        state["log"] = {"sums": log["sums"], "classes": log["steps"] * per_step, "iterations": log["iterations"]}
    return {**payload, "format": FORMAT}


def _read(path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not REQUIRED_KEYS <= set(payload) or payload["format"] not in (2, FORMAT):
        raise ValueError("not a checkpoint of this project's format")
    return _upgrade(payload) if payload["format"] == 2 else payload


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """The newest complete checkpoint of a run; a damaged one falls back to the previous."""
    directory = Path(directory)
    candidates = [directory / name for name in (CHECKPOINT, PREVIOUS) if (directory / name).exists()]
    if not candidates:
        raise ConfigError(f"--resume {directory}: no {CHECKPOINT} there; it is not a run directory, or the run "
                          "stopped before its first checkpoint (start it again)")
    problems = []
    for path in candidates:
        try:
            payload = _read(path)
        except Exception as error:
            problems.append(f"{path.name}: {type(error).__name__}")
            continue
        if problems:
            print(f"warning: {problems[0]} is damaged; resuming from {path.name} instead", file=sys.stderr)
        return Checkpoint(directory, payload)
    raise ConfigError(f"--resume {directory}: no checkpoint can be loaded ({'; '.join(problems)}); "
                      "start the run again")
