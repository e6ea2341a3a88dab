"""The run configuration: one typed object, resolved once, passed down everywhere.

``Config``'s field defaults are the settings every published BACON command
shares, so with ``configs/published.yaml`` (the per-dataset, per-IPC rows of
the paper's command list) a bare ``--dataset MNIST --ipc 10`` is the paper run.
Resolution order, later winning: field defaults, the entry script's defaults,
the published row, the method's defaults, ``--config FILE.yaml``, the command
line. ``cli.py`` turns the fields into flags; this module holds the fields,
the YAML layers and the checks that need no data.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
import types
from functools import lru_cache
from typing import Any, Callable, Iterable, get_args, get_type_hints

import torch
import yaml

from augment import parse_strategy
from data import dataset_names
from distributed import BACKENDS
from errors import ConfigError
from fast_paths import COMPILE_MIN_EVAL_EPOCHS, COMPILE_MIN_ITERATIONS, MEMORY_FORMATS, SWITCHES, FastPaths
from methods import get_method
from networks import get_eval_pool, model_names
from precision import PRECISIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "configs" / "published.yaml"
CLASS_STEPS = ("batched", "sequential")

RUN, SYNSET, MATCHING, POOL, EVAL, DATA, SPEED = (
    "run", "synthetic set", "matching", "network pool", "evaluation", "data", "speed",
)


@dataclass(frozen=True)
class Role:
    """What a setting is to the paper's protocol and to a resumed run.

    ``protocol``: compared with the published command (a difference is a
    departure, printed and recorded in results.json). ``budget``: a protocol
    setting whose value below the published one makes a reduced-budget run.
    ``resumable``: ``--resume`` may change it, because it changes no result.
    """

    protocol: bool = True
    budget: bool = False
    resumable: bool = False


PROTOCOL = Role()
BUDGET = Role(budget=True)
LOCAL = Role(protocol=False)  # how and where this run computes; fixed once a run has started
FREE = Role(protocol=False, resumable=True)  # where files go and how often they are written


@dataclass(frozen=True)
class Bound:
    """The range a numeric setting must lie in: at least ``low`` (above it when ``open``), below
    ``high`` when given; ``why`` is said with the error."""

    low: float
    open: bool = False
    high: float | None = None
    why: str = ""

    def violated_by(self, value: float) -> bool:
        below = value <= self.low if self.open else value < self.low
        return below or (self.high is not None and value >= self.high)

    def message(self, name: str, value: Any) -> str:
        if self.high is not None:
            rule = f"must be between {self.low:g} and {self.high:g}"
        elif self.open and self.low == 0:
            rule = "must be positive"
        elif self.low == 0:
            rule = "must not be negative"
        else:
            rule = f"must be at least {self.low:g}"
        return f"--{name} {rule}{': ' + self.why if self.why else ''}, got {value}"


AT_LEAST_ONE, NOT_NEGATIVE, ABOVE_ZERO = Bound(1), Bound(0), Bound(0, open=True)


def option(default: Any, help: str, group: str, choices: tuple[Any, ...] | None = None, *, role: Role = PROTOCOL,
           bound: Bound | None = None, evaluation: bool = False) -> Any:
    """A config field. Its metadata is the whole schema of the setting: the flag's help and group,
    the allowed choices or range, its role (protocol, budget, resumable) and whether evaluate.py
    takes it too. The default is the value every published command uses (configs/published.yaml
    holds the per-dataset rows that differ)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "role": role,
                                            "bound": bound, "evaluation": evaluation})


@dataclass(frozen=True)
class Config:
    """Every setting of a distillation run. Names follow the reference's flags."""

    method: str = option("bacon", "matching method", RUN)
    dataset: str = option("CIFAR10", "dataset name", RUN, evaluation=True)
    model: str = option("ConvNet", "network distilled with (and evaluated by eval_mode S)", RUN, evaluation=True)
    ipc: int = option(50, "synthetic images per class", RUN, bound=AT_LEAST_ONE)
    seed: int = option(0, "root seed of every random stream", RUN, role=LOCAL, evaluation=True)
    device: str = option("auto", "auto = cuda when available, else cpu", RUN, ("auto", "cpu", "cuda"), role=LOCAL,
                         evaluation=True)
    data_path: str = option(str(REPO_ROOT / "data"), "where datasets are found or downloaded", RUN, role=FREE,
                            evaluation=True)
    save_path: str = option(str(REPO_ROOT / "results"), "directory that receives one folder per run", RUN,
                            role=FREE, evaluation=True)
    run_name: str | None = option(None, "run folder name (unset: method_dataset_ipcN_seedS_time)", RUN, role=FREE,
                                  evaluation=True)
    num_exp: int = option(5, "independent distillations (experiments)", RUN, role=BUDGET, bound=AT_LEAST_ONE)
    Iteration: int = option(20000, "distillation iterations per experiment", RUN, role=BUDGET, bound=NOT_NEGATIVE)
    eval_interval: int = option(100, "evaluate at every positive multiple of this (and at the end)", RUN,
                                bound=AT_LEAST_ONE)
    log_every: int = option(10, "iterations between metric records", RUN, role=FREE, bound=AT_LEAST_ONE)
    checkpoint_every: int = option(0, "iterations between checkpoints (also at every evaluation); 0 = whenever "
                                   "10 minutes of work have passed", RUN, role=FREE, bound=NOT_NEGATIVE)
    dist_backend: str = option("auto", "torch.distributed backend when launched by torchrun: auto = nccl on CUDA, "
                               "gloo on CPU", RUN, BACKENDS, role=FREE, evaluation=True)
    deterministic: bool = option(False, "deterministic kernels where PyTorch has them; on CUDA also no cuDNN "
                                 "algorithm search (slower; DSA scale/rotate and mosaic decoding still use atomic "
                                 "additions in their backward there)", RUN, role=LOCAL, evaluation=True)
    check_replicas: bool = option(False, "debugging: after every iteration compare the network pool's checksum "
                                  "across processes (torchrun) and stop if they differ", RUN, role=FREE)

    init: str = option("real", "initialise from random real images or from noise", SYNSET, ("real", "noise"))
    aug: bool = option(True, "multi-formation: each stored image is a 2x2 mosaic decoded to 4", SYNSET)
    lr_img: float = option(0.2, "learning rate of the synthetic images", SYNSET, bound=ABOVE_ZERO)
    optim: str = option("sgd", "image optimiser (SGD has momentum 0.5)", SYNSET, ("sgd", "adam"))

    batch_real: int = option(256, "real images per class per image step (capped at the class size)", MATCHING,
                             role=BUDGET, bound=Bound(2, why="the likelihood needs a feature std"))
    embed_last: int = option(1000, "feature modules kept by embed(); -1 drops the last one", MATCHING)
    syn_ce: bool = option(True, "add the accuracy-weighted cross-entropy of the synthetic images", MATCHING)
    ce_weight: float = option(0.5, "weight of the synthetic cross-entropy", MATCHING)
    dsa_strategy: str = option("color_crop_cutout_flip_scale_rotate", "DSA ops joined by '_', or none", MATCHING,
                               evaluation=True)
    dsa_mode: str = option("S", "DSA mode: S = one op group per call, M = all groups", MATCHING, ("S", "M"),
                           evaluation=True)
    ipc1_rules: bool = option(False, "the CIFAR-10 script's IPC-1 rules: lowest-CE real images, CE only "
                              "when wrong (IPC 1 without --aug only)", MATCHING)

    net_num: int = option(100, "largest size of the network pool", POOL, bound=AT_LEAST_ONE)
    net_generate_interval: int = option(30, "add nets to the pool every this many iterations", POOL,
                                        bound=AT_LEAST_ONE)
    net_push_num: int = option(1, "nets added each time", POOL, bound=AT_LEAST_ONE)
    train_net_num: int = option(1, "pool nets used for image updates per iteration", POOL, role=BUDGET,
                                bound=AT_LEAST_ONE)
    fetch_net_num: int = option(2, "pool nets trained on real data per iteration", POOL, role=BUDGET,
                                bound=NOT_NEGATIVE)
    model_train_steps: int = option(10, "SGD steps per trained pool net", POOL, role=BUDGET, bound=NOT_NEGATIVE)
    trained_bs: int = option(256, "real batch size of pool training", POOL, role=BUDGET, bound=AT_LEAST_ONE)
    lr_net: float = option(0.01, "learning rate of pool nets and evaluation nets", POOL, bound=ABOVE_ZERO,
                           evaluation=True)
    net_decay: bool = option(True, "pool SGD with momentum 0.9 and weight decay 5e-4", POOL)
    net_begin: int = option(0, "pick image-update nets from pool[net_begin:net_end] when that holds > 10", POOL,
                            bound=NOT_NEGATIVE)
    net_end: int = option(100000, "see net_begin", POOL)
    outer_loop: int = option(1, "image update + pool training rounds per iteration", POOL, bound=AT_LEAST_ONE)

    eval_mode: str = option("S", "evaluation pool: S, SS, M, W, D, A, P or N", EVAL, evaluation=True)
    num_eval: int = option(5, "fresh networks per evaluation model", EVAL, role=BUDGET, bound=AT_LEAST_ONE,
                           evaluation=True)
    epoch_eval_train: int = option(1000, "training epochs of each evaluation network (+1, as the reference)", EVAL,
                                   role=BUDGET, bound=NOT_NEGATIVE, evaluation=True)
    batch_train: int = option(256, "batch size of evaluation training", EVAL, role=BUDGET, bound=AT_LEAST_ONE,
                              evaluation=True)
    eval_init: bool = option(False, "also evaluate the initial set (the real images it starts from)", EVAL,
                             role=LOCAL)
    test_pool_nets: bool = option(False, "at evaluation points also test every pool net (slow)", EVAL, role=FREE)

    zca: bool = option(False, "ZCA-whiten the data (eps 0.1)", DATA, evaluation=True)
    im_size: int | None = option(None, "ImageFolder only: resize images to this square side (32 if unset)", DATA,
                                 role=LOCAL, bound=Bound(2), evaluation=True)
    test_fraction: float = option(0.2, "ImageFolder without test/: fraction of each class held out", DATA,
                                  role=LOCAL, bound=Bound(0, open=True, high=1), evaluation=True)

    precision: str = option("auto", "fp32 (IEEE: TF32 off on CUDA), tf32 (CUDA's TensorFloat-32 convolutions and "
                            "matmuls) or bf16 autocast; auto = bf16 where the device has bf16 matrix units (CUDA, "
                            "AMX, AVX-512-BF16), else fp32", SPEED, PRECISIONS, role=LOCAL, evaluation=True)
    eval_batched: str = option("auto", "train the num_eval networks of a model together (vmap); auto = on CUDA "
                               "only (on CPUs one after another is faster)", SPEED, SWITCHES, role=LOCAL,
                               evaluation=True)
    compile: str = option("auto", "torch.compile the networks (fuses norm, activation and pooling; compiling "
                          "delays the first iteration); auto = on for CPU runs of >= "
                          f"{COMPILE_MIN_ITERATIONS} iterations with a C++ compiler, in fp32 or on AMX units; off "
                          "for bf16 without AMX (slower there than eager) and on CUDA (unmeasured)", SPEED, SWITCHES,
                          role=LOCAL, evaluation=True)
    class_steps: str = option("batched", "image steps of many classes in one pass, each class at its own turn "
                              "of the one optimiser (batched), or one class per pass with the whole set stepped "
                              "at every turn as the reference does (sequential: one process only)", SPEED,
                              CLASS_STEPS, role=LOCAL)
    class_chunk: int = option(0, "classes per batched pass; 0 = as many as 2 GiB of activations hold, at most "
                              "ceil(classes / 8)", SPEED, role=LOCAL, bound=NOT_NEGATIVE)
    memory_format: str = option("auto", "layout of the network weights and activations; auto = contiguous "
                                "(faster on the CPUs measured; channels_last may pay on AMX)", SPEED, MEMORY_FORMATS,
                                role=LOCAL, evaluation=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _value_type(hint: Any) -> type:
    """The type a flag parses to: X for ``X | None`` (such fields may also be left unset)."""
    if isinstance(hint, types.UnionType):
        return next(arg for arg in get_args(hint) if arg is not type(None))
    return hint


FIELD_TYPES: dict[str, type] = {name: _value_type(hint) for name, hint in get_type_hints(Config).items()}


@lru_cache(maxsize=1)
def _published_table() -> dict[str, Any]:
    return yaml.safe_load(PUBLISHED_CONFIGS.read_text())


def published_defaults(dataset: str, ipc: int) -> dict[str, Any]:
    """The published command's flags for this dataset and IPC ({} when unpublished)."""
    return dict(_published_table().get(dataset, {}).get(ipc, {}))


def protocol_defaults(dataset: str, ipc: int, method: str) -> dict[str, Any]:
    """The settings the paper's protocol prescribes beyond the field defaults.

    The method's own defaults (DM's learning rate, say) win over the published
    BACON row, which was tuned for BACON.
    """
    return {"dataset": dataset, "ipc": ipc, "method": method,
            **published_defaults(dataset, ipc), **get_method(method).defaults}


def reference_config(dataset: str, ipc: int, method: str) -> Config:
    """The configuration of the paper's protocol for this dataset, IPC and method."""
    return Config(**protocol_defaults(dataset, ipc, method))


def _roles(test: Callable[[Role], bool]) -> frozenset[str]:
    return frozenset(name for name, spec in FIELDS.items() if test(spec.metadata["role"]))


BUDGET_FIELDS = _roles(lambda role: role.budget)
NOT_PROTOCOL = _roles(lambda role: not role.protocol)
RESUME_MAY_CHANGE = _roles(lambda role: role.resumable)
EVALUATION_FIELDS = tuple(name for name, spec in FIELDS.items() if spec.metadata["evaluation"])


@dataclass(frozen=True)
class InertFlag:
    """A flag of the reference scripts that changes nothing in this implementation. The parser
    accepts it, so the published commands run unchanged, and checks it against ``choices`` where
    the reference allows only one value; it is never part of Config."""

    default: Any
    note: str
    choices: tuple[Any, ...] | None = None


INERT_GROUP = "accepted for compatibility with the reference scripts (no effect)"
INERT_FLAGS = {
    "net_train_real": InertFlag(True, "pool nets always train on real data"),
    "mismatch_lambda": InertFlag(0.0, "unused"),
    "mismatch_type": InertFlag("l1", "unused"),
    "inner_loop": InertFlag(1, "unused"),
    "last": InertFlag(100, "unused"),
    "weight_layer_index": InertFlag(0, "unused"),
    "conf_path": InertFlag("", "unused"),
    "local_num": InertFlag(10, "unused"),
    "local_weight": InertFlag(0.1, "unused"),
    "dis_metric": InertFlag("ours", "unused"),
    "aug_num": InertFlag(1, "must be 1", (1,)),
    "ij_selection": InertFlag("random", "must be random", ("random",)),
}


def departures_from_reference(config: Config) -> dict[str, dict[str, Any]]:
    """Settings that differ from the paper's protocol for this dataset, IPC and method."""
    reference = reference_config(config.dataset, config.ipc, config.method)
    return {
        name: {"used": getattr(config, name), "published": getattr(reference, name)}
        for name, spec in FIELDS.items()
        if name not in NOT_PROTOCOL and getattr(config, name) != getattr(reference, name)
    }


def below_published(departures: dict[str, dict[str, Any]], names: Iterable[str] = BUDGET_FIELDS) -> bool:
    """True when any of ``names`` departs downwards from the published value."""
    return any(departures[name]["used"] < departures[name]["published"] for name in names if name in departures)


def is_reduced_budget(config: Config) -> bool:
    """True when any budget setting is below the published protocol's."""
    return below_published(departures_from_reference(config))


def resolve_fast_paths(config: Config, device: torch.device, evaluation_only: bool = False) -> FastPaths:
    """The run's speed settings on ``device``, with the process-wide math they imply set. Compiling
    pays for a long run: a distillation of COMPILE_MIN_ITERATIONS iterations, or an evaluation of
    COMPILE_MIN_EVAL_EPOCHS epochs."""
    long_run = (config.epoch_eval_train >= COMPILE_MIN_EVAL_EPOCHS if evaluation_only
                else config.Iteration >= COMPILE_MIN_ITERATIONS)
    fast = FastPaths.resolve(device, precision=config.precision, compile=config.compile,
                             memory_format=config.memory_format, eval_batched=config.eval_batched,
                             long_run=long_run, deterministic=config.deterministic)
    fast.configure_process(device)
    return fast


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for absent CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but this machine has no usable CUDA device; use --device cpu")
    return torch.device(name)


def _as_switch(name: str, value: Any) -> Any:
    """An on/off/auto setting given as a boolean: YAML reads ``off`` as false, and checkpoints saved
    before ``--compile auto`` existed hold ``compile`` as one."""
    if FIELDS[name].metadata["choices"] == SWITCHES and isinstance(value, bool):
        return "on" if value else "off"
    return value


def saved_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A saved configuration in today's terms: switches as on/off, settings added since at their
    defaults, and the inert reference flags that older runs stored dropped."""
    return {**{name: spec.default for name, spec in FIELDS.items()},
            **{name: _as_switch(name, value) for name, value in values.items() if name not in INERT_FLAGS}}


def check_value(name: str, value: Any, source: str) -> Any:
    """Type-check one setting from a YAML file (ints are accepted for floats)."""
    if name in INERT_FLAGS:
        return _check_inert(name, value, source)
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {name!r} in {source}{hint}")
    value = _as_switch(name, value)
    if value is None and FIELDS[name].default is None:
        return None
    return _typed(name, value, FIELD_TYPES[name], source)


def _typed(name: str, value: Any, expected: type, source: str) -> Any:
    accepted = (int, float) if expected is float else (expected,)
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, accepted):
        raise ConfigError(
            f"{name} in {source} must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    return float(value) if expected is float else value


def _check_inert(name: str, value: Any, source: str) -> Any:
    flag = INERT_FLAGS[name]
    value = _typed(name, value, type(flag.default), source)
    if flag.choices and value not in flag.choices:
        raise ConfigError(f"{name} in {source} {flag.note}, got {value!r}")
    return value


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a --config file: a flat mapping of field names to values."""
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read --config {source}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"--config {source} is not valid YAML{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {source} must hold a mapping of flag names to values")
    checked = {name: check_value(name, value, str(source)) for name, value in data.items()}
    return {name: value for name, value in checked.items() if name not in INERT_FLAGS}


def validate(config: Config) -> None:
    """Reject settings that cannot work, before any data is loaded: every field's bound and
    choices (its metadata), then the rules that relate fields or need a registry."""
    for name, spec in FIELDS.items():
        bound, choices, value = spec.metadata["bound"], spec.metadata["choices"], getattr(config, name)
        if bound is not None and value is not None and bound.violated_by(value):
            raise ConfigError(bound.message(name, value))
        if choices and value not in choices:
            raise ConfigError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    parse_strategy(config.dsa_strategy)
    method = get_method(config.method)
    if config.syn_ce and not method.step.trains_networks:
        raise ConfigError(f"--syn_ce weights by a trained network's accuracy, and {config.method} trains none; "
                          "drop --syn_ce")
    if config.dataset not in dataset_names():
        raise ConfigError(f"unknown dataset {config.dataset!r}; valid datasets: {', '.join(dataset_names())}")
    if config.model not in model_names():
        raise ConfigError(f"unknown model {config.model!r}; valid models: {', '.join(model_names())}")
    get_eval_pool(config.eval_mode, config.model)


def validate_against_data(config: Config, class_sizes: list[int], im_size: tuple[int, int]) -> None:
    """Checks that need the loaded dataset: class sizes and image side."""
    smallest = min(class_sizes)
    if config.ipc > smallest:
        raise ConfigError(f"--ipc {config.ipc} is larger than the smallest class of {config.dataset} "
                          f"({smallest} images); use --ipc {smallest} or less")
    if smallest < 2:
        raise ConfigError(f"a class of {config.dataset} has {smallest} image; every class needs at least 2 "
                          "for the feature statistics")
    if config.aug and (im_size[0] % 2 or im_size[1] % 2):
        raise ConfigError(f"--aug needs an even image side to split into 2x2 mosaics, but {config.dataset} "
                          f"images are {im_size[0]}x{im_size[1]}; use --no-aug (or an even --im_size)")
