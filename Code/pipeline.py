"""One distillation job from start to finish: data, experiments, results.

``run`` resolves the device, loads the dataset onto it once, checks the
settings against the data, creates the run directory and runs ``num_exp``
experiments, then writes ``results.json`` and prints the summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from checkpoint import Checkpoint, Checkpoints, RunProgress
from compiled import compile_notice
from config import (Config, below_published, departures_from_reference, resolve_device, resolve_fast_paths,
                    validate_against_data)
from data import DataOptions, Dataset, get_dataset
from distill import Experiment
from distributed import World, join, leave
from errors import ConfigError, Interrupted
from evaluation import protocol_of
from fair_evaluation import FairOptions, fingerprint
from fast_paths import FastPaths
from methods import Method, get_method
from outputs import RunDirectory, default_run_name, ensure_writable
from results import RunEnvironment, RunResults, pooled


def load_dataset(config: Config, device: torch.device) -> Dataset:
    options = DataOptions(im_size=config.im_size, test_fraction=config.test_fraction, seed=config.seed, zca=config.zca)
    return get_dataset(config.dataset, config.data_path, options).to(device)


def announce(config: Config, fast: FastPaths, dataset: Dataset, device: torch.device, run_dir: RunDirectory,
             world: World) -> None:
    processes = f", {world.size} processes ({torch.get_num_threads()} CPU threads each)" if world.distributed else ""
    print(f"{config.method.upper()} on {dataset.name}: {dataset.num_classes} classes, {len(dataset.train)} "
          f"training / {len(dataset.test)} test images, IPC {config.ipc}, device {device}{processes}", flush=True)
    print(f"outputs: {run_dir.path}", flush=True)
    departures = departures_from_reference(config)
    if departures:
        listed = ", ".join(f"{name} {d['used']} (published {d['published']})" for name, d in departures.items())
        label = "REDUCED BUDGET" if below_published(departures) else "MODIFIED PROTOCOL"
        print(f"{label}, not the paper protocol: {listed}", flush=True)
    if fast.compiled:
        print(compile_notice(), flush=True)


def print_summary(results: RunResults) -> None:
    budget = " (reduced budget)" if results.reduced_budget else ""
    for model, stats in results.final.items():
        print(f"final{budget}: {model} {stats['mean']:.2f} ± {stats['std']:.2f} % over {stats['n']} nets", flush=True)
    for model, stats in (results.init or {}).items():
        print(f"initial set (the real images it started from): {model} {stats['mean']:.2f} ± {stats['std']:.2f} % "
              f"over {stats['n']} nets", flush=True)
    print(f"results: {Path(results.environment.run_dir) / 'results.json'}", flush=True)


def join_processes(config: Config) -> tuple[World, torch.device]:
    """This process's world (torchrun's, or the world of one) and its device."""
    return join(resolve_device(config.device).type, config.dist_backend)


def refuse_for_world(config: Config, world: World) -> None:
    """Settings that cannot run on this many processes."""
    if world.distributed and config.class_steps == "sequential":
        raise ConfigError("--class_steps sequential steps one optimiser over the whole set at every class's turn, "
                          "as the reference does, in one process; run it without torchrun or use --class_steps "
                          "batched")


def shared_run_directory(world: World, make: Callable[[], RunDirectory]) -> RunDirectory:
    """The first process makes the run's folder (``make``); every process then uses its path, and
    only the first process's writes happen."""
    path = world.main_value(make().path if world.is_main else None)
    return RunDirectory(path, writes=world.is_main)


def open_run_directory(config: Config, resume: Checkpoint | None, in_place: bool) -> RunDirectory:
    """A new run's folder (``in_place``: SAVE_PATH/RUN_NAME even if it exists, for --resume auto
    before any checkpoint), or a resumed run's, tidied: partial writes removed, metrics cut back
    to the checkpoint."""
    if resume is not None:
        run_dir = RunDirectory(resume.directory)
        run_dir.remove_partial_writes()
        run_dir.truncate_metrics(resume.metrics_bytes)
        return run_dir
    name = config.run_name or default_run_name(config)
    run_dir = RunDirectory.restart(config.save_path, name) if in_place else RunDirectory.create(config.save_path, name)
    run_dir.write_config(config.to_dict())
    return run_dir


def distillation_results(config: Config, progress: RunProgress, dataset: Dataset, fast: FastPaths, method: Method,
                         environment: RunEnvironment) -> RunResults:
    """The run's results.json: every experiment's accuracies pooled, the protocol fingerprinted."""
    inits = [outcome.init for outcome in progress.outcomes if outcome.init is not None]
    final = pooled([outcome.final for outcome in progress.outcomes])
    departures = departures_from_reference(config)
    return RunResults(
        method=config.method, dataset=config.dataset, ipc=config.ipc, aug=config.aug, seed=config.seed,
        iterations=config.Iteration, num_exp=config.num_exp, model=config.model,
        epoch_eval_train=config.epoch_eval_train, num_eval=config.num_eval, eval_mode=config.eval_mode,
        reduced_budget=below_published(departures), departures_from_published=departures, final=final,
        protocol=fingerprint(FairOptions(), protocol_of(config, fast), dataset, list(final), config.num_eval,
                             config.seed),
        environment=environment, init=pooled(inits) if inits else None, best_on_test=progress.best.record(),
        class_steps=config.class_steps, class_chunks=len(method.step.class_chunks(config, dataset)))


def run(config: Config, resume: Checkpoint | None = None, in_place: bool = False) -> dict[str, Any]:
    """Distil ``config.dataset`` as configured (or continue ``resume``) and return results.json's record.

    Under torchrun every process runs this together (distributed.py says what
    each one does). On SIGINT/SIGTERM the experiment in progress is
    checkpointed and ``Interrupted`` re-raised; on a non-finite value nothing
    more is saved.
    """
    started = time.perf_counter()
    world, device = join_processes(config)
    method = get_method(config.method)
    refuse_for_world(config, world)
    ensure_writable(Path(config.save_path))
    with world.main_first():
        dataset = load_dataset(config, device)
    validate_against_data(config, dataset.train.class_sizes(), dataset.im_size)
    fast = resolve_fast_paths(config, device)
    run_dir = shared_run_directory(world, lambda: open_run_directory(config, resume, in_place))
    progress = RunProgress() if resume is None else resume.progress()
    if world.is_main:
        announce(config, fast, dataset, device, run_dir, world)
        if resume is not None and resume.world_size != world.size:
            print(f"resuming a run started with {resume.world_size} process(es) on {world.size}: "
                  "classes, pool nets and evaluation networks are dealt out anew; the results are the same "
                  "(to rounding if the threads per process changed)", flush=True)
    checkpoints = Checkpoints(run_dir, config, progress, world)
    while progress.experiment < config.num_exp:
        experiment = Experiment(config, method, dataset, run_dir, progress.experiment, device, progress.best, world,
                                fast)
        saved = resume.experiment_state(progress.experiment) if resume is not None else None
        if saved is not None:
            experiment.load_state_dict(saved)
            world.say(f"resuming experiment {progress.experiment} at iteration {experiment.next_iteration}")
        try:
            progress.outcomes.append(experiment.run(checkpoints))
        except Interrupted as stop:
            checkpoints.save(experiment)
            stop.where, stop.run_dir = f" at experiment {experiment.index}, iteration {experiment.next_iteration}", \
                run_dir.path
            raise
        progress.experiment += 1
        checkpoints.save(None)
    results = distillation_results(config, progress, dataset, fast, method,
                                   RunEnvironment.of(device, fast, world.size, run_dir.path,
                                                     time.perf_counter() - started))
    record = results.record()
    run_dir.write_results(record)
    if world.is_main:
        print_summary(results)
    leave(world)
    return record
