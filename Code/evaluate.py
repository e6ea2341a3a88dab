"""Evaluate any distilled set, or a reference point, with the reference protocol.

    python evaluate.py ../results/RUN/sets/exp0_it020000.pt              # a set saved by a run
    python evaluate.py other.pt --dataset CIFAR10 --decode mosaic        # any file of (images, labels) tensors
    python evaluate.py --dataset FashionMNIST --random_real 10           # IPC random real images per class
    python evaluate.py --dataset FashionMNIST --whole_train              # a ConvNet on the whole training set

Each writes ``<save_path>/<run_name>/`` with config.yaml, metrics.jsonl and a
results.json of the same schema as a distillation run. Files are loaded with
``torch.load(weights_only=True)``: nothing in them is executed.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from augment import ParamDiffAug
from compiled import compile_notice
from cli import OneLineParser, add_config_flags
from config import Config, below_published, departures_from_reference, resolve_fast_paths, validate
from data import Dataset
from distributed import leave, reports_errors
from errors import ConfigError, DataError, exit_code_of
from evaluation import EvalProtocol, evaluate_set, summarize
from networks import get_eval_pool, model_names
from outputs import RunDirectory, ensure_writable
from pipeline import join_processes, load_dataset, merge_accuracies, results_record, shared_run_directory
from pool import RealSampler
from rng import make_generator
from runtime import keep_freed_memory
from synthetic import decoded_set, set_labels

WHOLE_TRAIN_EPOCHS = 20
EVAL_FLAGS = ("dataset", "model", "seed", "device", "data_path", "save_path", "run_name", "eval_mode", "num_eval",
              "epoch_eval_train", "batch_train", "lr_net", "dsa_strategy", "dsa_mode", "zca", "im_size",
              "test_fraction", "precision", "eval_batched", "compile", "memory_format", "dist_backend",
              "deterministic")


@dataclass
class LoadedSet:
    """A set to evaluate: the stored images, their labels and what the file says about them."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="evaluate.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("what to evaluate (exactly one)")
    source.add_argument("set_file", nargs="?", help="a .pt file: a run's set, a reference res_*.pt, or (images, labels)")
    source.add_argument("--random_real", type=int, metavar="IPC", help="IPC random training images per class (seeded)")
    source.add_argument("--whole_train", action="store_true",
                        help=f"the whole training set (default budget {WHOLE_TRAIN_EPOCHS} epochs)")
    options = parser.add_argument_group("set files")
    options.add_argument("--decode", choices=("auto", "mosaic", "none"), default="auto",
                         help="multi-formation decoding: auto = as the file's metadata says (none if it has none)")
    options.add_argument("--experiment", type=int, default=0, help="which experiment of a reference res_*.pt")
    options.add_argument("--models", help="comma-separated models to evaluate (instead of --eval_mode)")
    add_config_flags(parser, EVAL_FLAGS)
    parser.set_defaults(dataset=None, epoch_eval_train=None)
    return parser


def _tensor_pair(images: Any, labels: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError(f"{path}: expected an images tensor and a labels tensor, got "
                        f"{type(images).__name__} and {type(labels).__name__}")
    return images, labels


def load_set_file(path: Path, experiment: int = 0) -> LoadedSet:
    """Read a set without executing anything in the file (weights_only=True)."""
    if path.is_dir():
        sets = sorted((path / "sets").glob("exp*_it*.pt"))
        example = sets[-1] if sets else path / "sets" / "exp0_it000100.pt"
        raise DataError(f"{path} is a directory; pass one set file, e.g. {example}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as error:
        raise DataError(f"{path} is not a file of plain tensors that can be loaded safely "
                        f"({type(error).__name__}); re-save it with torch.save((images, labels), PATH) "
                        "from a session you trust") from None
    if isinstance(payload, dict) and "images" in payload and "labels" in payload:
        images, labels = _tensor_pair(payload["images"], payload["labels"], path)
        meta = payload.get("meta", {})
        return LoadedSet(images, labels, meta if isinstance(meta, dict) else {})
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):  # the reference's res_*.pt
        if not 0 <= experiment < len(payload["data"]):
            raise ConfigError(f"{path} holds {len(payload['data'])} experiments; --experiment {experiment} is not one")
        return LoadedSet(*_tensor_pair(*payload["data"][experiment][:2], path), {})
    if isinstance(payload, (tuple, list)) and len(payload) == 2:
        return LoadedSet(*_tensor_pair(*payload, path), {})
    raise DataError(f"{path}: expected a dict with 'images' and 'labels', a reference res_*.pt, or a pair "
                    f"(images, labels); got {type(payload).__name__}")


def check_set(loaded: LoadedSet, dataset: Dataset, path: Path) -> None:
    """Refuse a set that cannot belong to ``dataset``, naming what does not match."""
    images, labels = loaded.images, loaded.labels
    if images.ndim != 4 or not images.is_floating_point():
        raise DataError(f"{path}: images must be a float tensor [N, C, H, W], got {images.dtype} of shape "
                        f"{tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise DataError(f"{path}: labels must be an integer tensor [N] for {images.shape[0]} images, got "
                        f"{labels.dtype} of shape {tuple(labels.shape)}")
    if images.shape[1] != dataset.channel:
        raise DataError(f"{path}: images have {images.shape[1]} channels but {dataset.name} has {dataset.channel}")
    if tuple(images.shape[2:]) != dataset.im_size:
        raise DataError(f"{path}: images are {images.shape[2]}x{images.shape[3]} but {dataset.name} images are "
                        f"{dataset.im_size[0]}x{dataset.im_size[1]}")
    classes = sorted(set(labels.tolist()))
    if classes != list(range(dataset.num_classes)):
        raise DataError(f"{path}: labels cover {len(classes)} classes ({classes[0]}..{classes[-1]}) but "
                        f"{dataset.name} has {dataset.num_classes} (0..{dataset.num_classes - 1})")
    for key in ("mean", "std"):
        if key in loaded.meta and not torch.allclose(torch.tensor(loaded.meta[key], dtype=torch.float64),
                                                     torch.tensor(getattr(dataset, key), dtype=torch.float64),
                                                     atol=1e-4):
            raise DataError(f"{path}: the set was normalised with {key} {loaded.meta[key]} but {dataset.name} "
                            f"uses {getattr(dataset, key)}; evaluate it against the dataset it was made from")
    if not torch.isfinite(images).all():
        raise DataError(f"{path}: images contain NaN or inf")


def random_real_set(dataset: Dataset, ipc: int, seed: int) -> LoadedSet:
    """IPC distinct random training images per class, drawn from the seed."""
    if not 1 <= ipc <= min(dataset.train.class_sizes()):
        raise ConfigError(f"--random_real {ipc} must be between 1 and the smallest class of {dataset.name} "
                          f"({min(dataset.train.class_sizes())} images)")
    device = dataset.train.labels.device
    sampler = RealSampler(dataset.train, make_generator(seed, "random-real", device=device))
    images = torch.cat([sampler.class_batch(c, ipc) for c in range(dataset.num_classes)])
    labels = set_labels(range(dataset.num_classes), ipc, device)
    return LoadedSet(images, labels, {"method": "random_real", "ipc": ipc, "aug": False})


def whole_train_set(dataset: Dataset) -> LoadedSet:
    train = dataset.train
    images = train.fetch(torch.arange(len(train), device=train.labels.device))
    return LoadedSet(images, train.labels, {"method": "whole_train", "ipc": min(train.class_sizes()), "aug": False})


def evaluation_departures(config: Config) -> dict[str, dict[str, Any]]:
    """Where the evaluation protocol differs from the published one (only evaluation settings count)."""
    return {name: d for name, d in departures_from_reference(config).items() if name in EVAL_FLAGS}


def choose_models(models: str | None, config: Config) -> list[str]:
    if models is None:
        return get_eval_pool(config.eval_mode, config.model)
    chosen = [name.strip() for name in models.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in model_names()]
    if unknown or not chosen:
        raise ConfigError(f"unknown model {unknown[0] if unknown else models!r} in --models; valid models: "
                          f"{', '.join(model_names())}")
    return chosen


@dataclass
class Source:
    """What is evaluated: its images as stored, its kind (method name), whether to decode mosaics."""

    kind: str
    loaded: LoadedSet
    decode: bool

    def training_images(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.loaded.images.to(device), self.loaded.labels.to(device)
        return decoded_set(images, labels, self.decode)


def resolve_settings(args: Any, loaded: LoadedSet | None) -> Config:
    """The evaluation configuration: the dataset from the flag or the file, the epoch budget by source."""
    if sum((args.set_file is not None, args.random_real is not None, bool(args.whole_train))) != 1:
        raise ConfigError("give exactly one of: a set file, --random_real IPC, --whole_train")
    dataset_name = args.dataset or (loaded.meta.get("dataset") if loaded else None)
    if dataset_name is None:
        raise ConfigError("--dataset is required: the file does not say which dataset it belongs to")
    if loaded and loaded.meta.get("dataset") not in (None, dataset_name):
        raise ConfigError(f"{args.set_file} was distilled from {loaded.meta['dataset']}, not {dataset_name}; "
                          "drop --dataset or name the right one")
    epochs = args.epoch_eval_train if args.epoch_eval_train is not None else (
        WHOLE_TRAIN_EPOCHS if args.whole_train else Config.epoch_eval_train)
    config = Config(**{**{name: getattr(args, name) for name in EVAL_FLAGS}, "dataset": dataset_name,
                       "epoch_eval_train": epochs, "num_exp": 1})
    validate(config)
    return config


def choose_source(args: Any, loaded: LoadedSet | None, dataset: Dataset, seed: int) -> Source:
    if loaded is not None:
        check_set(loaded, dataset, Path(args.set_file))
        decode = args.decode == "mosaic" or (args.decode == "auto" and bool(loaded.meta.get("aug")))
        return Source(loaded.meta.get("method", "unknown"), loaded, decode)
    if args.random_real is not None:
        return Source("random_real", random_real_set(dataset, args.random_real, seed), False)
    return Source("whole_train", whole_train_set(dataset), False)


def is_reduced(config: Config, source: Source) -> bool:
    """Below the published evaluation budget (or the whole-train default), or a set distilled with less."""
    if source.kind == "whole_train":
        reduced = config.epoch_eval_train < WHOLE_TRAIN_EPOCHS or config.num_eval < Config.num_eval
    else:
        reduced = below_published(evaluation_departures(config), ("num_eval", "epoch_eval_train", "batch_train"))
    return reduced or bool(source.loaded.meta.get("reduced_budget", False))


def evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, load, check, evaluate and write results.json; returns the results."""
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    loaded = load_set_file(Path(args.set_file), args.experiment) if args.set_file else None
    config = resolve_settings(args, loaded)
    models = choose_models(args.models, config)
    world, device = join_processes(config)
    ensure_writable(Path(config.save_path))
    with world.main_first():
        dataset = load_dataset(config, device)
    source = choose_source(args, loaded, dataset, config.seed)
    images, labels = source.training_images(device)
    meta = source.loaded.meta

    ipc = meta.get("ipc", len(source.loaded.labels) // dataset.num_classes)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    origin = args.set_file or source.kind

    def create_run_directory() -> RunDirectory:
        run_dir = RunDirectory.create(config.save_path,
                                      config.run_name or f"eval_{source.kind}_{dataset.name}_ipc{ipc}_{stamp}")
        run_dir.write_config({**config.to_dict(), "source": origin, "decode": source.decode, "models": models})
        return run_dir

    run_dir = shared_run_directory(world, create_run_directory)
    world.say(f"evaluating {source.kind} ({len(images)} training images) on {dataset.name} with "
              f"{', '.join(models)}: {config.num_eval} nets x {config.epoch_eval_train + 1} epochs, device {device}")
    fast = resolve_fast_paths(config, device, evaluation_only=True)
    if fast.compiled:
        world.say(compile_notice())
    protocol = EvalProtocol(config.epoch_eval_train, config.batch_train, config.lr_net, config.dsa_strategy,
                            ParamDiffAug(aug_mode=config.dsa_mode), fast)
    accuracies = evaluate_set(images, labels, models, config.num_eval, dataset, protocol, config.seed,
                              ("evaluate", source.kind), description="evaluate", world=world)
    run_dir.append_metrics({"event": "eval", "experiment": 0, "iteration": meta.get("iteration", 0),
                            "accuracies": accuracies, "summary": {m: summarize(v) for m, v in accuracies.items()}})
    results = results_record(
        config, merge_accuracies([accuracies]), fast, device, run_dir, time.perf_counter() - started,
        method=source.kind, ipc=ipc, aug=source.decode, iterations=meta.get("iterations", meta.get("iteration", 0)),
        num_exp=1, reduced_budget=is_reduced(config, source),
        departures_from_published=evaluation_departures(config), source=origin, processes=world.size)
    run_dir.write_results(results)
    for model, stats in results["final"].items():
        world.say(f"{source.kind}: {model} {stats['mean']:.2f} ± {stats['std']:.2f} % over {stats['n']} nets")
    world.say(f"results: {run_dir.path / 'results.json'}")
    leave(world)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    return exit_code_of("evaluate.py", lambda: evaluate(argv), quiet=not reports_errors())


if __name__ == "__main__":
    sys.exit(main())
