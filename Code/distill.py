"""The distillation loop, with the reference's semantics.

One experiment: initialise the synthetic set, then for every iteration

1. evaluate (at positive multiples of eval_interval and at the last iteration),
2. let the method's image step run its iteration (image_steps.py): for BACON
   and IDM, grow the network pool, take every class's image step under each
   picked net and train pool nets on real batches; for DM, one image step for
   all classes under a fresh network,
3. log, honour a stop request, checkpoint when due.

This process holds the classes of its chunks (``ClassLayout``); loss terms,
accuracy meters and the NaN watch stay on the device and are read only at log
points.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Callable, ContextManager, Protocol

import torch
from tqdm import tqdm

from augment import ParamDiffAug
from config import Config, resolve_fast_paths
from data import Dataset
from distributed import SINGLE, ClassLayout, World
from errors import Interrupted
from evaluation import protocol_of
from evaluation_points import BestOnTest, EvaluationPoints
from fast_paths import FastPaths
from methods import Method
from monitor import FiniteWatch, LossLog
from outputs import RunDirectory
from pool import NetPool
from results import ExperimentOutcome
from runtime import STOP
from synthetic import SyntheticSet, initial_images


class CheckpointSink(Protocol):
    """Where an experiment saves its state (checkpoint.Checkpoints)."""

    def save(self, experiment: "Experiment") -> None: ...

    def due(self, iterations_done: int) -> bool: ...


class NoCheckpoints:
    """A sink that saves nothing: experiments run outside a run directory's lifecycle (benchmarks, tests)."""

    def save(self, experiment: "Experiment") -> None:
        pass

    def due(self, iterations_done: int) -> bool:
        return False


class Experiment:
    """One distillation from initialisation to the final evaluation, on this process's classes."""

    def __init__(self, config: Config, method: Method, dataset: Dataset, run_dir: RunDirectory,
                 index: int, device: torch.device, best: BestOnTest, world: World = SINGLE,
                 fast: FastPaths | None = None) -> None:
        """``fast``: the run's speed settings, when its caller has resolved them already."""
        self.config, self.method, self.dataset, self.run_dir = config, method, dataset, run_dir
        self.index, self.device, self.world = index, device, world
        self.layout = ClassLayout(method.step.class_chunks(config, dataset), world)
        self.synset = SyntheticSet.create(initial_images(config, dataset, index, self.layout.mine, device),
                                          self.layout, config, lazy=config.class_steps == "batched")
        self.fast = fast if fast is not None else resolve_fast_paths(config, device)
        self.pool = NetPool(config, dataset, (index,), device, self.fast, world)
        self.dsa_param = ParamDiffAug(aug_mode=config.dsa_mode)
        self.points = EvaluationPoints(config, dataset, run_dir, world, protocol_of(config, self.fast), best, index)
        self.step = method.step(self)
        self.log = LossLog(world, self.step.classes_per_step)
        self.timer: Callable[[str], ContextManager[None]] = lambda phase: contextlib.nullcontext()
        self.health = FiniteWatch(device, index, world, self.step.watched_terms(method.loss.terms))
        self.started = False  # initial evaluation done and the step's start (the initial pool) taken
        self.next_iteration = 0
        self.evaluated_at = -1
        self.init: dict[str, list[float]] | None = None
        self.final: dict[str, list[float]] = {}

    def is_evaluation_point(self, it: int) -> bool:
        return it == self.config.Iteration or (it > 0 and it % self.config.eval_interval == 0)

    def run(self, checkpoints: CheckpointSink = NoCheckpoints()) -> ExperimentOutcome:
        """Distil (from the start or from a loaded state) and return the accuracies of the last set
        (and of the initial one with --eval_init).

        Between iterations it honours a stop request (SIGINT/SIGTERM, on any
        process) by raising ``Interrupted`` with the state at an iteration
        boundary, ready to save.
        """
        config = self.config
        if not self.started:
            self.init = self.evaluate(0, final=True) if config.eval_init else None
            self.step.start()
            self.started = True
        iterations = range(self.next_iteration, config.Iteration + 1)
        with tqdm(iterations, initial=self.next_iteration, total=config.Iteration + 1, desc=f"exp {self.index}",
                  unit="it", disable=None if self.world.is_main else True) as progress:
            self.log.restart_clock()
            for it in progress:
                self.next_iteration = self.health.iteration = it
                last = it == config.Iteration
                if last and self.log.iterations:
                    self.health.raise_if_bad()
                    self.write_log(it - 1, progress)  # the iterations since the last record
                if self.is_evaluation_point(it) and self.evaluated_at != it:
                    self.health.raise_if_bad()
                    self.final = self.evaluate(it, final=last)
                    self.pool.reset_meters()
                    self.evaluated_at = it
                    checkpoints.save(self)
                if last:
                    break
                self.step.iteration(it)
                self.log.iterations += 1
                self.next_iteration = it + 1
                if it % config.log_every == 0:
                    self.health.raise_if_bad()
                    self.write_log(it, progress)
                self.end_iteration(checkpoints, it + 1)
        return ExperimentOutcome(self.final, self.init)

    def end_iteration(self, checkpoints: CheckpointSink, iterations_done: int) -> None:
        """Between iterations, the processes agree in one exchange whether any was asked to stop
        (then all raise ``Interrupted`` at this boundary) and whether the first one's checkpoint
        is due (then all save)."""
        stop, due = self.world.agree(STOP.signum is not None, checkpoints.due(iterations_done))
        if stop:
            raise Interrupted(STOP.signum or signal.SIGTERM)
        if due:
            checkpoints.save(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of this experiment (see checkpoint.py); a collective call."""
        return {
            "index": self.index, "started": self.started, "next_iteration": self.next_iteration,
            "evaluated_at": self.evaluated_at, "init": self.init, "final": self.final,
            "synthetic": self.synset.state_dict(),
            "pool": self.pool.state_dict(), "log": self.log.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started, self.next_iteration, self.evaluated_at = state["started"], state["next_iteration"], \
            state["evaluated_at"]
        self.init, self.final = state["init"], state["final"]
        self.synset.load_state_dict(state["synthetic"])
        self.pool.load_state_dict(state["pool"])
        self.log.load_state_dict(state["log"], self.device)

    def write_log(self, iteration: int, progress: tqdm) -> None:
        extra = self.step.record()
        record = {"event": "train", "experiment": self.index, "iteration": iteration, **self.log.record(), **extra}
        self.run_dir.append_metrics(record)
        progress.set_postfix(loss=f"{record['loss']:.4g}")
        if progress.disable:
            details = "".join(f", {name} {value}" for name, value in extra.items())
            self.world.say(f"exp {self.index} it {iteration}: loss {record['loss']:.4f} "
                           f"({record['s_per_iteration']:.2f} s/it{details})")

    def evaluate(self, iteration: int, final: bool) -> dict[str, list[float]]:
        """Evaluate the whole current set (gathered from every process), save and log it."""
        accuracies, seconds = self.points.evaluate(self.synset.stored(), iteration, final)
        self.log.exclude(seconds)
        if self.config.test_pool_nets:
            self.points.test_pool_nets([entry.net for entry in self.pool.nets], iteration, self.fast.precision)
        return accuracies
