"""What a distillation does at an evaluation point: evaluate the set, save it, log it.

At every positive multiple of ``eval_interval`` and at the last iteration, the
current set is decoded and evaluated with the reference protocol (the
distilled model; the whole eval pool at the last iteration), saved as a
``.pt`` with its metadata and as a PNG grid, and its accuracies appended to
metrics.jsonl. The set with the best test accuracy so far is also kept,
labelled as a selection on the test set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from config import Config, is_reduced_budget
from data import Dataset
from distributed import World
from evaluation import EvalProtocol, evaluate_set, summarize, test_accuracy
from networks import Network, get_eval_pool
from outputs import RunDirectory
from synthetic import decoded_set, set_labels


@dataclass
class BestOnTest:
    """The set with the best training-model test accuracy seen so far in the run.

    This selection uses the test set, so it is kept for convenience and always
    labelled "best on test"; it is never the run's result. The run creates it
    (or restores it from a checkpoint), evaluation points ``offer`` it their
    accuracies (its only change), and checkpoints and results.json read it.
    """

    mean: float = float("-inf")
    experiment: int = -1
    iteration: int = -1

    def offer(self, mean: float, experiment: int, iteration: int) -> bool:
        """Take an evaluation point's accuracy if it beats the best (the initial set, iteration 0,
        never competes); True when it does, and its set is then the one to keep."""
        if iteration <= 0 or not mean > self.mean:
            return False
        self.mean, self.experiment, self.iteration = mean, experiment, iteration
        return True

    def record(self) -> dict[str, Any]:
        """The results.json block."""
        found = self.experiment >= 0
        return {"note": "selected by test accuracy: a convenience, not a result", "mean": self.mean if found else None,
                "experiment": self.experiment, "iteration": self.iteration,
                "file": "sets/best_on_test.pt" if found else None}


def set_metadata(config: Config, dataset: Dataset, **extra: Any) -> dict[str, Any]:
    """What a saved set needs to be loaded, decoded and evaluated on its own."""
    return {
        "dataset": dataset.name, "method": config.method, "model": config.model, "ipc": config.ipc,
        "aug": config.aug, "decoding": "mosaic_2x2" if config.aug else "none",
        "num_classes": dataset.num_classes, "channel": dataset.channel, "im_size": list(dataset.im_size),
        "mean": list(dataset.mean), "std": list(dataset.std), "zca": dataset.zca is not None,
        "class_names": list(dataset.class_names), "seed": config.seed, "iterations": config.Iteration,
        "reduced_budget": is_reduced_budget(config), **extra,
    }


class EvaluationPoints:
    """Evaluates, saves and logs the sets of one experiment; every process takes part, the first writes."""

    def __init__(self, config: Config, dataset: Dataset, run_dir: RunDirectory, world: World,
                 protocol: EvalProtocol, best: BestOnTest, experiment: int) -> None:
        self.config, self.dataset, self.run_dir, self.world = config, dataset, run_dir, world
        self.protocol, self.best, self.experiment = protocol, best, experiment

    def models(self, final: bool) -> list[str]:
        """The whole eval pool at the final iteration, the distilled model before."""
        if final:
            return get_eval_pool(self.config.eval_mode, self.config.model)
        return [self.config.model]

    def evaluate(self, stored: torch.Tensor, iteration: int, final: bool) -> tuple[dict[str, list[float]], float]:
        """Evaluate the whole stored set, save it with a PNG and log the accuracies; returns them and
        the seconds spent."""
        started = time.perf_counter()
        stored_labels = set_labels(range(self.dataset.num_classes), self.config.ipc, stored.device)
        images, labels = decoded_set(stored, stored_labels, self.config.aug)
        accuracies = evaluate_set(images, labels, self.models(final), self.config.num_eval, self.dataset,
                                  self.protocol, self.config.seed, ("eval", self.experiment, iteration),
                                  description=f"exp {self.experiment} eval it {iteration}", world=self.world)
        seconds = time.perf_counter() - started
        summary = {model: summarize(values) for model, values in accuracies.items()}
        self.run_dir.append_metrics({"event": "eval", "experiment": self.experiment, "iteration": iteration,
                                     "accuracies": accuracies, "summary": summary, "seconds": seconds})
        for model, stats in summary.items():
            self.world.say(f"exp {self.experiment} it {iteration}: {model} test accuracy {stats['mean']:.2f} ± "
                           f"{stats['std']:.2f} % ({stats['n']} nets, {seconds:.0f} s)")
        self.save(stored, stored_labels, iteration, summary)
        return accuracies, seconds

    def save(self, stored: torch.Tensor, labels: torch.Tensor, iteration: int, summary: dict[str, Any]) -> None:
        name = f"exp{self.experiment}_it{iteration:06d}"
        meta = set_metadata(self.config, self.dataset, experiment=self.experiment, iteration=iteration,
                            accuracy=summary)
        self.run_dir.save_set(name, stored, labels, meta)
        self.run_dir.save_grid(name, self.dataset.denormalize(stored), nrow=self.config.ipc)
        stats = summary.get(self.config.model)
        if stats is not None and self.best.offer(stats["mean"], self.experiment, iteration):
            meta["selection"] = "best on test: chosen by test accuracy, not a result"
            self.run_dir.save_set("best_on_test", stored, labels, meta)

    def test_pool_nets(self, nets: list[Network], iteration: int, precision: torch.dtype | None) -> None:
        """Optional diagnostic of the reference: every pool net on the test set (dealt out to the processes)."""
        mine = {i: test_accuracy(nets[i], self.dataset.test, precision=precision)
                for i in self.world.deals(len(nets))}
        accuracies = {i: value for share in self.world.gather_objects(mine) for i, value in share.items()}
        self.run_dir.append_metrics({"event": "pool_test", "experiment": self.experiment, "iteration": iteration,
                                     "accuracies": [accuracies[i] for i in range(len(nets))]})
