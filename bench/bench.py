"""Benchmark: seconds per distillation iteration and per evaluation epoch.

Runs the published configuration (``--dataset FashionMNIST --ipc 10`` is the
MNIST IPC-10 line of Command.txt on Fashion-MNIST) on the real data for a few
iterations and prints ONE JSON line. Not a test: it measures, it asserts nothing.

    python bench/bench.py --dataset FashionMNIST --ipc 10 --iterations 3 --eval_epochs 3 --device cpu
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402  (the clock starts before the heavy imports)
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Code"))

import torch  # noqa: E402

from cli import resolve_config  # noqa: E402
from distill import BestOnTest, Experiment  # noqa: E402
from evaluation import EvalProtocol, train_on_set  # noqa: E402
from augment import DSA  # noqa: E402
from methods import get_method  # noqa: E402
from networks import get_network  # noqa: E402
from outputs import RunDirectory  # noqa: E402
from pipeline import load_dataset  # noqa: E402
from config import resolve_device  # noqa: E402
from rng import make_generator  # noqa: E402
from runtime import keep_freed_memory  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_bf16" in flags


def time_iterations(experiment: Experiment, iterations: int, device: torch.device) -> tuple[list[float], dict]:
    """Time warm-up + ``iterations`` loop iterations, split into image update and pool training."""
    config = experiment.config
    experiment.pool.push(3)
    totals, phases = [], {"image_update": [], "pool_training": []}
    for it in range(iterations + 1):
        synchronize(device)
        start = time.perf_counter()
        if it % config.net_generate_interval == 0:
            experiment.pool.push(config.net_push_num)
        for entry in experiment.pool.pick_for_images():
            experiment.update_images(entry)
        synchronize(device)
        middle = time.perf_counter()
        experiment.pool.train_on_real(experiment.sampler)
        synchronize(device)
        end = time.perf_counter()
        if it > 0:  # iteration 0 is the warm-up
            totals.append(end - start)
            phases["image_update"].append(middle - start)
            phases["pool_training"].append(end - middle)
    return totals, {name: statistics.median(values) for name, values in phases.items()}


def time_eval_epochs(experiment: Experiment, epochs: int, device: torch.device) -> float:
    """Seconds per epoch of one ConvNet trained on the decoded synthetic set (reference protocol)."""
    images, labels = experiment.synset.training_set()
    dataset = experiment.dataset
    protocol = EvalProtocol(epochs=0, batch_train=experiment.config.batch_train, lr=experiment.config.lr_net,
                            dsa_strategy=experiment.config.dsa_strategy)
    net = get_network("ConvNet", dataset.channel, dataset.num_classes, dataset.im_size,
                      generator=make_generator(0, "bench"), device=device)
    dsa = DSA(protocol.dsa_strategy, make_generator(0, "c"), make_generator(0, "v", device=device))
    order = make_generator(0, "o", device=device)
    train_on_set(net, images, labels, protocol, order, dsa)  # warm-up epoch
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        train_on_set(net, images, labels, protocol, order, dsa)
    synchronize(device)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="FashionMNIST")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--eval_epochs", type=int, default=3, help="timed evaluation epochs (after one warm-up)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--data_path", default=None)
    args = parser.parse_args()
    keep_freed_memory()

    argv = ["--dataset", args.dataset, "--ipc", str(args.ipc), "--device", args.device]
    config = resolve_config(argv + (["--data_path", args.data_path] if args.data_path else []), {}).config
    device = resolve_device(config.device)
    dataset = load_dataset(config, device)
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(config, get_method(config.method), dataset, RunDirectory(Path(scratch)), 0, device,
                                BestOnTest())
        startup = time.perf_counter() - STARTED
        totals, phases = time_iterations(experiment, args.iterations, device)
        eval_epoch = time_eval_epochs(experiment, args.eval_epochs, device)
    print(json.dumps({
        "dataset": args.dataset, "ipc": args.ipc, "config": "published (Command.txt MNIST IPC-10 flags)",
        "s_per_iteration": round(statistics.median(totals), 3),
        "s_per_eval_epoch": round(eval_epoch, 4),
        "phases": {name: round(value, 3) for name, value in phases.items()},
        "startup_s": round(startup, 2),
        "iterations_timed": len(totals), "eval_epochs_timed": args.eval_epochs,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "amx": has_amx() if device.type == "cpu" else None,
        "threads": torch.get_num_threads(), "torch_version": torch.__version__, "precision": "fp32",
    }))


if __name__ == "__main__":
    main()
