"""Helpers shared by the test modules: generated image folders, tiny configurations and experiments,
the script runner, and the distance between two trainings."""

import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

CODE_DIR = Path(__file__).resolve().parent.parent / "Code"
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))

from config import Config  # noqa: E402  (needs the path above)
from data import DataOptions, get_dataset  # noqa: E402
from distill import Experiment  # noqa: E402
from distributed import SINGLE, World  # noqa: E402
from evaluation_points import BestOnTest  # noqa: E402
from methods import get_method  # noqa: E402
from outputs import RunDirectory  # noqa: E402

TINY = dict(dataset="ImageFolder", im_size=16, ipc=2, Iteration=4, eval_interval=2, num_exp=2, num_eval=2,
            epoch_eval_train=2, batch_real=6, trained_bs=8, model_train_steps=1, batch_train=8, log_every=1,
            device="cpu", run_name="tiny")


def tiny_config(folder: Path, save_path: Path | None = None, **changes: object) -> Config:
    """A complete run in seconds on a generated image folder (3 classes of 16x16 images): TINY, changed."""
    paths = {"data_path": str(folder), **({"save_path": str(save_path)} if save_path is not None else {})}
    return Config(**{**TINY, **paths, **changes})


def tiny_experiment(config: Config, run_dir: RunDirectory, world: World = SINGLE) -> Experiment:
    """Experiment 0 of ``config`` on the CPU, its dataset loaded as a run loads it."""
    dataset = get_dataset(config.dataset, config.data_path, DataOptions(im_size=config.im_size))
    return Experiment(config, get_method(config.method), dataset, run_dir, 0, torch.device("cpu"), BestOnTest(),
                      world)


def write_image_folder(root: Path, classes: int = 3, per_class: int | Sequence[int] = 10, size: int = 16,
                       seed: int = 0) -> Path:
    """DIR/train/<class>/*.png: one colour per class plus noise, so classes are learnable; ``per_class``
    images in every class, or ``per_class[c]`` in class c."""
    rng = np.random.default_rng(seed)
    sizes = [per_class] * classes if isinstance(per_class, int) else list(per_class)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(sizes[c]):
            noise = rng.integers(-40, 41, size=(size, size, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an entry script as a user would, from Code/."""
    return subprocess.run([sys.executable, script, *args], cwd=CODE_DIR, capture_output=True, text=True,
                          timeout=timeout)


def run_together(commands: Sequence[Sequence[str]], cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start independent ``commands`` at once and wait for all; each one's exit code, stdout and
    stderr, in order. The output goes to files, so no process blocks on a full pipe while another
    is waited for."""
    with ExitStack() as files:
        started = []
        for command in commands:
            out, err = (files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            started.append((subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err, text=True),
                            out, err))
        done = []
        for process, out, err in started:
            process.wait(timeout=timeout)
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read()))
    return done


# Two code paths that do the same arithmetic in another order (stacked or compiled vs eager one after
# another) train the same weights up to fp32 rounding, which grows only slowly over a few SGD steps and
# stays well below this bound under every CPU kernel set measured; it is taken relative to each layer's
# update because absolute differences vary widely between CPUs (per-machine figures:
# docs/benchmarks.md). Real bugs move a layer by 0.1 of its update or more (a learning rate 10 % off:
# 0.1; momentum 0.8 for 0.9: 0.25; DSA skipped for one net: 0.7).
UPDATE_TOLERANCE = 2e-2


def _per_layer(reference: Mapping[str, torch.Tensor], term: Callable[[str], torch.Tensor]) -> dict[str, float]:
    """Per layer, the sum of ``term(name)`` over its parameters. A layer's parameters
    count together: the bias of a convolution in front of instance norm has no gradient in exact
    arithmetic, so on its own its update is weight decay plus rounding noise."""
    sums: dict[str, float] = {}
    for name in reference:
        layer = name.rsplit(".", 1)[0]
        sums[layer] = sums.get(layer, 0.0) + term(name).sum().item()
    return sums


def update_distances(trained: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                     initial: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, ||trained - reference|| / ||reference - initial||: how far two trainings from one
    initialisation ended apart, relative to how far the reference moved."""
    apart = _per_layer(reference, lambda name: (trained[name] - reference[name]).double().square())
    moved = _per_layer(reference, lambda name: (reference[name] - initial[name]).double().square())
    return {layer: (apart[layer] / moved[layer]) ** 0.5 for layer in apart}


def update_scales(trained: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  initial: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the projection of the trained update on the reference one, in units of the reference
    update: 1 when they agree in size along it. Rounding noise points every which way and barely
    moves it, while a learning rate 10 % off makes it 1.1 on every layer."""
    along = _per_layer(reference, lambda name: (trained[name] - initial[name]).double()
                       * (reference[name] - initial[name]).double())
    moved = _per_layer(reference, lambda name: (reference[name] - initial[name]).double().square())
    return {layer: along[layer] / moved[layer] for layer in along}


def parameters_of(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters, by name."""
    return {name: param.detach().clone() for name, param in net.named_parameters()}
