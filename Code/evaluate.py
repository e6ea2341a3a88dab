"""Evaluate any distilled set, or a reference point, with the reference protocol.

    python evaluate.py ../results/RUN/sets/exp0_it020000.pt              # a set saved by a run
    python evaluate.py other.pt --dataset CIFAR10 --decode mosaic        # any file of (images, labels) tensors
    python evaluate.py logged_files/CIFAR10/RUN --dataset CIFAR10 --zca  # MTT/DATM, DC-BENCH, DD-Ranking sets
    python evaluate.py --dataset FashionMNIST --random_real 10           # IPC random real images per class
    python evaluate.py --dataset FashionMNIST --whole_train              # a ConvNet on the whole training set

Each writes ``<save_path>/<run_name>/`` with config.yaml, metrics.jsonl and a
results.json of the same schema as a distillation run. Files are loaded with
``torch.load(weights_only=True)``: nothing in them is executed. The set formats
other projects publish are read as set_formats.py describes. MTT sets distilled
with ZCA (MTT's --zca) need ``--zca``: their files do not say so, and the test
images must be whitened as theirs were (data/whitening.py, eps 0.1 on [0,1]
pixels, as MTT's kornia ZCA).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from compiled import compile_notice
from cli import OneLineParser, add_config_flags
from config import (EVALUATION_FIELDS, Config, below_published, departures_from_reference, resolve_fast_paths,
                    validate)
from data import Dataset, ImageSplit
from distributed import leave, reports_errors
from errors import ConfigError, DataError, exit_code_of
from eval_augment import EVAL_AUGMENTATIONS
from eval_labels import LABEL_MODES, SOFT_LOSSES, LabelProtocol
from evaluation import protocol_of, summarize
from fair_evaluation import (FairEvaluator, FairOptions, draw_random_real, fingerprint, score, shipped_soft_labels,
                             teacher_record)
from networks import get_eval_pool, model_names
from outputs import RunDirectory, ensure_writable
from pipeline import join_processes, load_dataset, shared_run_directory
from results import RunEnvironment, RunResults, pooled
from runtime import keep_freed_memory
from selection import LR_GRID, VALIDATION_FRACTION
from set_formats import LoadedSet, fit_to_dataset, load_set_file
from synthetic import decoded_set
from teachers import TeacherRecipe, get_teachers, load_teacher

WHOLE_TRAIN_EPOCHS = 20


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="evaluate.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    source = parser.add_argument_group("what to evaluate (exactly one)")
    source.add_argument("set_file", nargs="?", help="a run's set .pt, or another project's set (see set_formats.py)")
    source.add_argument("--random_real", type=int, metavar="IPC", help="IPC random training images per class (seeded)")
    source.add_argument("--whole_train", action="store_true",
                        help=f"the whole training set (default budget {WHOLE_TRAIN_EPOCHS} epochs)")
    options = parser.add_argument_group("set files")
    options.add_argument("--decode", choices=("auto", "mosaic", "none"), default="auto",
                         help="multi-formation decoding: auto = as the file's metadata says (none if it has none)")
    options.add_argument("--experiment", type=int, default=0, help="which experiment of a reference res_*.pt")
    options.add_argument("--labels", metavar="PATH", help="labels [N] of an images tensor (DD-Ranking input)")
    options.add_argument("--soft_labels", metavar="PATH", help="soft labels [N, C] (teacher logits) for the set")
    options.add_argument("--models", help="comma-separated models to evaluate (instead of --eval_mode)")
    add_protocol_flags(parser)
    add_config_flags(parser, EVALUATION_FIELDS)
    parser.set_defaults(dataset=None, epoch_eval_train=None)
    return parser


def add_protocol_flags(parser: OneLineParser) -> None:
    """The fair-evaluation choices (fair_evaluation.py); every default is the reference protocol's."""
    labels = parser.add_argument_group("labels and augmentation of evaluation training")
    labels.add_argument("--label_mode", choices=LABEL_MODES, default="hard",
                        help="hard (the reference), stored (one teacher soft label per image, computed once, or "
                             "shipped with the set) or teacher (the teacher labels every augmented batch)")
    labels.add_argument("--soft_loss", choices=SOFT_LOSSES, default="kl",
                        help="soft-label loss: kl (T^2-scaled), sce (soft cross-entropy) or mse_ce (MSE on logits "
                             "+ hard CE)")
    labels.add_argument("--temperature", type=float, default=1.0, help="soft-label temperature T")
    labels.add_argument("--eval_aug", choices=EVAL_AUGMENTATIONS, default="dsa",
                        help="augmentation of evaluation training: dsa (the reference), none, cutmix or mixup")
    teachers = parser.add_argument_group("teachers (soft labels and the full-data control)")
    teachers.add_argument("--teacher", metavar="PATH[,PATH]", help="saved teacher weights (several: an ensemble) "
                          "instead of trained, cached teachers")
    teachers.add_argument("--teacher_model", default="ConvNet", help="the teachers' architecture")
    teachers.add_argument("--teachers", type=int, default=1, metavar="K", help="ensemble size (logits averaged)")
    teachers.add_argument("--teacher_epochs", type=int, default=TeacherRecipe.epochs,
                          help="teacher training epochs (+1, as evaluation counts them)")
    teachers.add_argument("--teacher_seed", type=int, default=0,
                          help="seed of the teachers (part of the protocol: the same for every --seed)")
    teachers.add_argument("--teacher_cache", metavar="DIR", help="where teachers are cached (default: "
                          "SAVE_PATH/teachers)")
    fair = parser.add_argument_group("selection, controls and scores")
    fair.add_argument("--select", choices=("none", "validation"), default="none",
                      help="none: the protocol's learning rate and last epoch (the reference); validation: both "
                           "chosen on a validation split of the training data")
    fair.add_argument("--val_fraction", type=float, default=VALIDATION_FRACTION,
                      help="share of every training class held out for --select validation")
    fair.add_argument("--lr_grid", default=",".join(map(str, LR_GRID)),
                      help="learning rates tried by --select validation (comma-separated), or 'stored': the set's "
                           "own (MTT's lr_best.pt)")
    fair.add_argument("--controls", action="store_true",
                      help="per round also a fresh random real subset of the set's IPC; with the full-data "
                           "accuracy of the teachers: IOR, HLR and LRS in results.json")
    fair.add_argument("--ars", action="store_true", help="with --controls, also evaluate without augmentation: ARS")


def fair_options(args: Any, loaded: LoadedSet | None) -> FairOptions:
    """The protocol choices of the command line, checked (one-line errors)."""
    if args.ars and not args.controls:
        raise ConfigError("--ars compares the set with its random controls; add --controls")
    if args.ars and args.eval_aug == "none":
        raise ConfigError("--ars compares evaluation with and without augmentation; choose an --eval_aug other "
                          "than none")
    if args.controls and args.whole_train:
        raise ConfigError("--controls scores a set against random real images and the full data; the whole "
                          "training set is the full data itself, so drop --controls")
    if args.teachers < 1:
        raise ConfigError(f"--teachers must be at least 1, got {args.teachers}")
    grid = lr_grid(args, loaded)
    return FairOptions(LabelProtocol(args.label_mode, args.soft_loss, args.temperature), args.eval_aug,
                       args.select == "validation", args.val_fraction, grid, args.controls, args.ars)


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        grid = ()
    if not grid or not all(lr > 0 for lr in grid):
        raise ConfigError(f"--lr_grid {text!r} must be positive learning rates separated by commas, or 'stored'")
    return grid


def lr_grid(args: Any, loaded: LoadedSet | None) -> tuple[float, ...]:
    """The learning rates --select tries: the flag's, or the one stored with the set."""
    if args.lr_grid != "stored":
        return parse_grid(args.lr_grid)
    if loaded is None or loaded.lr is None:
        raise ConfigError("--lr_grid stored needs a set that stores its learning rate (MTT's lr_best.pt); give "
                          "learning rates instead")
    return (float(loaded.lr),)


def obtain_teacher(args: Any, options: FairOptions, loaded: LoadedSet | None, dataset: Dataset,
                   device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """The teacher the options need (None if none), and where it came from: saved weights given with
    --teacher, or members trained by the recipe and cached (trained once, then loaded)."""
    shipped = loaded is not None and loaded.soft_labels is not None
    needed = options.controls or options.labels.mode == "teacher" or (options.labels.mode == "stored" and not shipped)
    if not needed:
        return None, None
    if args.teacher:
        return load_teacher(args.teacher, dataset, args.teacher_model, device), {"files": args.teacher}
    recipe = TeacherRecipe(model=args.teacher_model, epochs=args.teacher_epochs)
    cache = Path(args.teacher_cache) if args.teacher_cache else Path(args.save_path or Config.save_path) / "teachers"
    teacher = get_teachers(dataset, recipe, args.teacher_seed, args.teachers, cache, device)
    return teacher, {"recipe": recipe.record(), "seed": args.teacher_seed}


def shipped_labels(source: "Source", count: int, device: torch.device) -> torch.Tensor | None:
    """Soft labels that came with the set, as logits, one per training image."""
    soft = source.loaded.soft_labels
    if soft is None:
        return None
    if len(soft) != count:
        raise DataError(f"the set ships {len(soft)} soft labels but trains on {count} images"
                        f"{' (decoded mosaics)' if source.decode else ''}; give one soft label per training image, "
                        "or drop them with --label_mode teacher")
    return shipped_soft_labels(soft.to(device), source.loaded.meta.get("soft_labels", "logits"))


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


def random_real_set(dataset: Dataset, ipc: int, seed: int, real: ImageSplit) -> LoadedSet:
    """IPC distinct random images per class of ``real`` (the training split less any validation
    split), drawn from the seed."""
    if not 1 <= ipc <= min(real.class_sizes()):
        raise ConfigError(f"--random_real {ipc} must be between 1 and the smallest class of {dataset.name} "
                          f"({min(real.class_sizes())} images outside the validation split)")
    images, labels = draw_random_real(real, dataset.num_classes, ipc, seed, ("random-real",))
    return LoadedSet(images, labels, {"method": "random_real", "ipc": ipc, "aug": False})


def whole_train_set(dataset: Dataset) -> LoadedSet:
    train = dataset.train
    images = train.fetch(torch.arange(len(train), device=train.labels.device))
    return LoadedSet(images, train.labels, {"method": "whole_train", "ipc": min(train.class_sizes()), "aug": False})


def evaluation_departures(config: Config) -> dict[str, dict[str, Any]]:
    """Where the evaluation protocol differs from the published one (only evaluation settings count)."""
    return {name: d for name, d in departures_from_reference(config).items() if name in EVALUATION_FIELDS}


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
    if loaded and loaded.meta.get("zca") is True and not args.zca:
        raise ConfigError(f"{args.set_file} was distilled on ZCA-whitened images; add --zca to whiten the test set too")
    epochs = args.epoch_eval_train if args.epoch_eval_train is not None else (
        WHOLE_TRAIN_EPOCHS if args.whole_train else Config.epoch_eval_train)
    config = Config(**{**{name: getattr(args, name) for name in EVALUATION_FIELDS}, "dataset": dataset_name,
                       "epoch_eval_train": epochs, "num_exp": 1})
    validate(config)
    return config


def choose_source(args: Any, loaded: LoadedSet | None, dataset: Dataset, seed: int, real: ImageSplit) -> Source:
    if loaded is not None:
        check_set(loaded, dataset, Path(args.set_file))
        decode = args.decode == "mosaic" or (args.decode == "auto" and bool(loaded.meta.get("aug")))
        return Source(loaded.meta.get("method", "unknown"), loaded, decode)
    if args.random_real is not None:
        return Source("random_real", random_real_set(dataset, args.random_real, seed, real), False)
    return Source("whole_train", whole_train_set(dataset), False)


def is_reduced(config: Config, source: Source) -> bool:
    """Below the published evaluation budget (or the whole-train default), or a set distilled with less."""
    if source.kind == "whole_train":
        reduced = config.epoch_eval_train < WHOLE_TRAIN_EPOCHS or config.num_eval < Config.num_eval
    else:
        reduced = below_published(evaluation_departures(config), ("num_eval", "epoch_eval_train", "batch_train"))
    return reduced or bool(source.loaded.meta.get("reduced_budget", False))


def evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse, load, check, evaluate and write results.json; returns its record."""
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    loaded = load_set_file(Path(args.set_file), args.experiment, args.labels and Path(args.labels),
                           args.soft_labels and Path(args.soft_labels)) if args.set_file else None
    config = resolve_settings(args, loaded)
    models = choose_models(args.models, config)
    world, device = join_processes(config)
    ensure_writable(Path(config.save_path))
    with world.main_first():
        dataset = load_dataset(config, device)
    loaded = fit_to_dataset(loaded, dataset) if loaded else None
    fast = resolve_fast_paths(config, device, evaluation_only=True)
    options = fair_options(args, loaded)
    with world.main_first():  # the first process trains a missing teacher; the others load it
        teacher, teacher_source = obtain_teacher(args, options, loaded, dataset, device)
    evaluator = FairEvaluator(dataset, protocol_of(config, fast), options, config.seed, world, teacher)
    source = choose_source(args, loaded, dataset, config.seed, evaluator.real)
    images, labels = source.training_images(device)
    data = evaluator.labelled(images, labels, shipped_labels(source, len(images), device))
    meta = source.loaded.meta

    ipc = meta.get("ipc", len(source.loaded.labels) // dataset.num_classes)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    origin = args.set_file or source.kind

    def create_run_directory() -> RunDirectory:
        run_dir = RunDirectory.create(config.save_path,
                                      config.run_name or f"eval_{source.kind}_{dataset.name}_ipc{ipc}_{stamp}")
        run_dir.write_config({**config.to_dict(), **vars(args), "source": origin, "dataset": config.dataset,
                              "epoch_eval_train": config.epoch_eval_train, "decode": source.decode,
                              "models": models})
        return run_dir

    run_dir = shared_run_directory(world, create_run_directory)
    world.say(f"evaluating {source.kind} ({len(images)} training images) on {dataset.name} with "
              f"{', '.join(models)}: {config.num_eval} nets x {config.epoch_eval_train + 1} epochs, labels "
              f"{options.labels.mode}, augmentation {options.augmentation}, device {device}")
    if fast.compiled:
        world.say(compile_notice())
    if data.soft_labels is not None:
        run_dir.save_set("labelled", source.loaded.images, source.loaded.labels,
                         {**meta, "soft_labels": "logits", "soft_labels_of": "training images (decoded)",
                          "teacher": teacher_record(teacher)}, soft_labels=data.soft_labels)
    accuracies = evaluator.evaluate(source.kind, data, models, config.num_eval, options.labels, options.augmentation,
                                    ("evaluate",))
    run_dir.append_metrics({"event": "eval", "experiment": 0, "iteration": meta.get("iteration", 0),
                            "accuracies": accuracies, "summary": {m: summarize(v) for m, v in accuracies.items()}})
    final = pooled([accuracies])
    scored_model = config.model if config.model in final else models[0]
    fair = (score(evaluator, data, ipc, scored_model, accuracies[scored_model], ("evaluate",))
            if options.controls else None)
    protocol = fingerprint(options, evaluator.protocol, dataset, models, config.num_eval, config.seed, teacher,
                           teacher_source)
    results = RunResults(
        method=source.kind, dataset=config.dataset, ipc=ipc, aug=source.decode, seed=config.seed,
        iterations=meta.get("iterations", meta.get("iteration", 0)), num_exp=1, model=config.model,
        epoch_eval_train=config.epoch_eval_train, num_eval=config.num_eval, eval_mode=config.eval_mode,
        reduced_budget=is_reduced(config, source), departures_from_published=evaluation_departures(config),
        final=final, protocol=protocol,
        environment=RunEnvironment.of(device, fast, world.size, run_dir.path, time.perf_counter() - started),
        source=origin, fair=fair,
        selected={name: {m: chosen.record() for m, chosen in per_model.items()}
                  for name, per_model in evaluator.selections.items()})
    record = results.record()
    run_dir.write_results(record)
    for model, stats in final.items():
        world.say(f"{source.kind}: {model} {stats['mean']:.2f} ± {stats['std']:.2f} % over {stats['n']} nets")
    if fair is not None:
        world.say("scores: " + ", ".join(f"{name.upper()} {value['mean']:.4f} ± {value['std']:.4f}"
                                         for name, value in fair["scores"].items()))
    world.say(f"results: {run_dir.path / 'results.json'}")
    leave(world)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    return exit_code_of("evaluate.py", lambda: evaluate(argv), quiet=not reports_errors())


if __name__ == "__main__":
    sys.exit(main())
