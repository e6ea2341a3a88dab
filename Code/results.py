"""What runs produce, typed: one experiment's outcome and a run's results.

An ``ExperimentOutcome`` is what ``Experiment.run`` returns and what a
checkpoint keeps of each finished experiment. ``RunResults`` is results.json,
the one schema of distillation runs and evaluate.py: a distillation fills the
``class_steps`` fields, an evaluation the ``source`` ones, and every key is
written either way (null where it does not apply). ``RunResults.record`` is
its only serialisation; the run directory writes that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evaluation import summarize
from fast_paths import FastPaths

Accuracies = dict[str, list[float]]  # model name -> one test accuracy (%) per evaluation network
Summary = dict[str, dict[str, Any]]  # model name -> mean, std, n and the accuracies pooled


@dataclass(frozen=True)
class ExperimentOutcome:
    """The accuracies of one experiment's last set and, with --eval_init, of the set it started from."""

    final: Accuracies
    init: Accuracies | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"final": self.final, "init": self.init}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ExperimentOutcome:
        return cls(dict(state["final"]), state["init"])


def pooled(per_experiment: list[Accuracies]) -> Summary:
    """Accuracies of every experiment pooled per model, with mean and std."""
    merged: Accuracies = {}
    for accuracies in per_experiment:
        for model, values in accuracies.items():
            merged.setdefault(model, []).extend(values)
    return {model: {**summarize(values), "accuracies": values} for model, values in merged.items()}


@dataclass(frozen=True)
class RunEnvironment:
    """Where and how the numbers were computed: nothing here changes what they mean."""

    device: str
    speed: dict[str, Any]  # FastPaths.record(): what ``auto`` resolved to on this machine
    processes: int
    run_dir: str
    seconds: float

    @classmethod
    def of(cls, device: torch.device, fast: FastPaths, processes: int, run_dir: Path, seconds: float
           ) -> RunEnvironment:
        return cls(str(device), fast.record(), processes, str(run_dir), seconds)


@dataclass(frozen=True)
class RunResults:
    """results.json. ``result`` is the headline: the distilled (or asked-for) model's pooled accuracy;
    ``best_on_test`` is a convenience chosen on the test set, never a result."""

    method: str  # the distillation method, or what evaluate.py evaluated (random_real, whole_train, ...)
    dataset: str
    ipc: int
    aug: bool  # the set is stored as 2x2 mosaics (decoded for training)
    seed: int
    iterations: int
    num_exp: int
    model: str
    epoch_eval_train: int
    num_eval: int
    eval_mode: str
    reduced_budget: bool
    departures_from_published: dict[str, dict[str, Any]]
    final: Summary
    protocol: dict[str, Any]  # fair_evaluation.fingerprint
    environment: RunEnvironment
    init: Summary | None = None
    best_on_test: dict[str, Any] | None = None
    class_steps: str | None = None  # distillation: batched or sequential
    class_chunks: int | None = None  # distillation: chunks of classes per batched pass
    source: str | None = None  # evaluation: the file or control evaluated
    selected: dict[str, Any] | None = None  # evaluation: learning rate and epoch chosen on validation data
    fair: dict[str, Any] | None = None  # evaluation with --controls: fair_evaluation.score

    @property
    def result_model(self) -> str:
        return self.model if self.model in self.final else next(iter(self.final))

    def record(self) -> dict[str, Any]:
        """The JSON object written as results.json (the environment's fields at the top level)."""
        fields = asdict(self)
        environment = fields.pop("environment")
        speed = environment.pop("speed")
        stats = {key: value for key, value in self.final[self.result_model].items() if key != "accuracies"}
        return {**fields, **environment, **speed, "result": {"model": self.result_model, **stats}}
