"""Benchmark: seconds per distillation iteration and per evaluation epoch, against the device's peak.

Runs the published configuration (``--dataset FashionMNIST --ipc 10`` is the
MNIST IPC-10 line of Command.txt on Fashion-MNIST) on the real data through the
project's own loop (the method's image step, Experiment.step). Not a test: it measures, it
asserts nothing. It prints one JSON line for the path the flags choose (the
default path when no speed flag is given, with the ``auto`` rules of the
scripts), then one for the plain path (fp32, no compile, contiguous layout)
measured in the same process, so that every speed-up is a ratio on one machine
(``--no_plain`` skips it).

    python bench/bench.py --dataset FashionMNIST --ipc 10 --iterations 3 --eval_epochs 3 --device cpu

FLOPs are counted from the layer shapes (2 x multiply-adds of every Conv2d and
Linear): a forward per real image, forward + input-gradient backward per
decoded synthetic image (the picked net is frozen), forward + full backward per
pool-training image. The peak is measured here, in the path's precision, as the
best of a large matmul and a large convolution in its faster layout (both are
reported), so ``efficiency`` compares like with like.

``first_iteration_s`` is the warm-up iteration, kept out of the median: with
``--compile`` it holds the compiling. ``stacked_eval`` times ``--stacked_nets``
ConvNets trained together (vmap) against training them one after another,
the measurement behind ``--eval_batched auto``.

How the image steps scale with the number of classes (docs/cost_model.md):

    # batched vs sequential class steps, one process, on the published Fashion-MNIST line
    python bench/bench.py --dataset FashionMNIST --ipc 10 --compare_class_steps --device cpu
    # the same on a generated 100-class 32x32 set with the published CIFAR-100 IPC-10 flags
    python bench/bench.py --dataset CIFAR100 --ipc 10 --generated_classes 100 --compare_class_steps
    # seconds per class step at 20 and 200 generated classes, same work per class
    python bench/bench.py --dataset CIFAR100 --ipc 10 --scaling_classes 20,200 --im_size 32 --compile off
    # the image optimiser alone, per class step, on sets of given shapes
    python bench/bench.py --optimizer_shapes 200x50x64,1000x10x64
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402  (the clock starts before the heavy imports)
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator, NamedTuple  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "Code"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cli import resolve_config  # noqa: E402
from config import Config, resolve_device, resolve_fast_paths  # noqa: E402
from data import Dataset  # noqa: E402
from data.splits import make_dataset  # noqa: E402
from distill import Experiment, NoCheckpoints  # noqa: E402
from distributed import join, leave  # noqa: E402
from errors import exit_code_of  # noqa: E402
from evaluation import EvalNet, EvalProtocol, test_accuracy, train_on_set, train_together  # noqa: E402
from evaluation_points import BestOnTest  # noqa: E402
from image_optimizer import LazySGD, WholeSetOptimizer  # noqa: E402
from methods import get_method  # noqa: E402
from networks import get_network  # noqa: E402
from outputs import RunDirectory  # noqa: E402
from pipeline import load_dataset  # noqa: E402
from precision import PRECISIONS, autocast, cpu_flags, cpu_has_bf16_units  # noqa: E402
from runtime import keep_freed_memory  # noqa: E402


class SpeedPath(NamedTuple):
    """The speed flags of one measured path."""

    precision: str
    compile: str
    memory_format: str


PLAIN = SpeedPath("fp32", "off", "contiguous")
PHASES = ("real_forward", "synthetic", "pool_training")  # the loop's timed phases (Experiment.timer)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Seconds per named phase, three ways (the device is synchronised at phase edges, for measurement
    only): ``seconds``, the wall time to the end of the phase's work; ``host``, the time until its
    last launch returned; ``device``, on CUDA, the GPU's span from its first to its last kernel (CUDA
    events). Host close to wall: the GPU waited on Python (host-bound); host well below wall: the
    host waited on the GPU (device-bound). A host sync inside a phase counts as host time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.host: dict[str, float] = defaultdict(float)
        self.on_device: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if self.device.type == "cuda" else None
        start = time.perf_counter()
        if events:
            events[0].record()
        yield
        if events:
            events[1].record()
        self.host[phase] += time.perf_counter() - start
        synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - start
        if events:
            self.on_device[phase] += events[0].elapsed_time(events[1]) / 1000

    def clear(self) -> None:
        for times in (self.seconds, self.host, self.on_device):
            times.clear()


def forward_flops_per_image(experiment: Experiment) -> float:
    """2 x multiply-adds of every Conv2d and Linear in one forward of the distilled model."""
    dataset = experiment.dataset
    net = get_network(experiment.config.model, dataset.channel, dataset.num_classes, dataset.im_size)
    total = 0.0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2.0 * output.numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            total += 2.0 * output.numel() * module.in_features

    handles = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, dataset.channel, *dataset.im_size))
    for handle in handles:
        handle.remove()
    return total


def flops_per_iteration(experiment: Experiment) -> float:
    config, dataset = experiment.config, experiment.dataset
    forward = forward_flops_per_image(experiment)
    decoded_per_class = experiment.synset.images_per_class
    real = dataset.num_classes * min(config.batch_real, min(dataset.train.class_sizes())) * forward
    synthetic = dataset.num_classes * decoded_per_class * forward * 2
    pool_batch = min(config.trained_bs, len(dataset.train))
    pool = config.fetch_net_num * config.model_train_steps * pool_batch * forward * 3
    return config.train_net_num * (real + synthetic) + pool


def best_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one untimed call."""
    best = float("inf")
    run()
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_tflops(device: torch.device, precision: torch.dtype | None) -> dict[str, float | str]:
    """The device's attainable rate in the run's precision: the best of a large matmul and a large
    3x3, 128-channel convolution in either layout (oneDNN's AMX and AVX-512 kernels want NHWC)."""
    cuda = device.type == "cuda"
    repeats, side, batch = (5, 8192, 512) if cuda else (3, 2048, 64)
    with torch.no_grad(), autocast(device, precision):
        a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
        matmul = 2.0 * side ** 3 / best_seconds(lambda: a @ b, device, repeats) / 1e12
        weight = torch.randn(128, 128, 3, 3, device=device)
        conv_flops = 2.0 * batch * 128 * 32 * 32 * 128 * 9
        convs = {}
        for layout, memory_format in (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last)):
            x = torch.randn(batch, 128, 32, 32, device=device).contiguous(memory_format=memory_format)
            w = weight.contiguous(memory_format=memory_format)
            convs[layout] = conv_flops / best_seconds(lambda: F.conv2d(x, w, padding=1), device, repeats) / 1e12
    layout = max(convs, key=convs.get)
    return {"matmul": round(matmul, 4), "conv": round(convs[layout], 4), "conv_layout": layout,
            "best": round(max(matmul, convs[layout]), 4)}


def time_iterations(experiment: Experiment, iterations: int,
                    device: torch.device) -> tuple[float, list[float], dict[str, dict[str, float]]]:
    """Time a warm-up iteration (first-call costs, compiling) and ``iterations`` more, with the
    loop's own phase timer attached; returns the warm-up, the timed totals and, per phase, the
    median wall, host and (CUDA) device seconds (``PhaseTimer``)."""
    experiment.step.start()
    timer = PhaseTimer(device)
    totals, phases = [], defaultdict(lambda: defaultdict(list))
    for it in range(iterations + 1):
        experiment.timer = timer
        timer.clear()
        synchronize(device)
        start = time.perf_counter()
        experiment.step.iteration(it)
        experiment.end_iteration(NoCheckpoints(), it + 1)
        synchronize(device)
        total = time.perf_counter() - start
        totals.append(total)
        if it > 0:
            for phase in PHASES:
                phases["wall"][phase].append(timer.seconds[phase])
                phases["host"][phase].append(timer.host[phase])
                if device.type == "cuda":
                    phases["device"][phase].append(timer.on_device[phase])
            phases["wall"]["other"].append(total - sum(timer.seconds.values()))
    medians = {kind: {name: statistics.median(values) for name, values in times.items()}
               for kind, times in phases.items()}
    return totals[0], totals[1:], medians


def host_bound(phases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per timed phase: wall, host and (CUDA) device seconds, and the host's share of the wall time
    (near 1: host-bound; well below: device-bound)."""
    return {phase: {"wall_s": round(phases["wall"][phase], 4), "host_s": round(phases["host"][phase], 4),
                    "device_s": round(phases["device"][phase], 4) if "device" in phases else None,
                    "host_share": round(phases["host"][phase] / phases["wall"][phase], 3)
                    if phases["wall"][phase] > 0 else None}
            for phase in PHASES}


def time_eval_epochs(experiment: Experiment, nets: int, epochs: int, stacked: bool, device: torch.device) -> float:
    """Seconds per epoch of ``nets`` fresh ConvNets trained on the decoded synthetic set
    (reference protocol: DSA per image, SGD), together (vmap) or one after another."""
    images, labels = experiment.synset.training_set()
    protocol = experiment.points.protocol
    protocol = replace(protocol, fast=replace(protocol.fast, eval_stacked=stacked))

    def train(protocol: EvalProtocol, key: str) -> None:
        members = [EvalNet.fresh("ConvNet", experiment.dataset, protocol, 0, (key, k), device) for k in range(nets)]
        if stacked and members:
            train_together(members, images, labels, protocol)
        else:
            for member in members:
                train_on_set(member.net, images, labels, protocol, member.order, member.augment)

    train(replace(protocol, epochs=0), "warm-up")  # one epoch: first-call costs (and compiling)
    synchronize(device)
    start = time.perf_counter()
    train(replace(protocol, epochs=epochs - 1), "timed")
    synchronize(device)
    return (time.perf_counter() - start) / epochs


def cpu_name() -> str:
    """The model name with family and model numbers (VMs often report only "AMD EPYC")."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="FashionMNIST")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--eval_epochs", type=int, default=3, help="timed evaluation epochs (after one warm-up)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help="torch.compile the networks (auto: the run's rule, see the scripts' --help)")
    parser.add_argument("--memory_format", default="auto", choices=("auto", "contiguous", "channels_last"))
    parser.add_argument("--stacked_nets", type=int, default=5,
                        help="also time this many ConvNets trained together (vmap) per epoch; 0 skips")
    parser.add_argument("--no_plain", action="store_true",
                        help="skip the plain path (fp32, no compile, contiguous) measured after the chosen one")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--nproc", type=int, default=0,
                        help="scaling: measure one process, then this many under torchrun, each with --threads "
                        "threads, and print both with their speed-up per phase")
    parser.add_argument("--threads", type=int, default=0, help="with --nproc: CPU threads per process "
                        "(default: cores / nproc)")
    parser.add_argument("--class_steps", default="batched", choices=("batched", "sequential"),
                        help="how the image steps run (see the scripts' --help)")
    parser.add_argument("--class_chunk", type=int, default=0, help="classes per batched pass (0: the auto rule)")
    parser.add_argument("--compare_class_steps", action="store_true",
                        help="measure --class_steps batched, then sequential, in one process (instead of the "
                        "plain speed path) and print both with their ratio")
    parser.add_argument("--generated_classes", type=int, default=0,
                        help="distil a generated set of this many classes (--im_size, RGB, --per_class images "
                        "each) with the published flags of --dataset and --ipc, instead of the real data")
    parser.add_argument("--per_class", type=int, default=300, help="images per generated class")
    parser.add_argument("--im_size", type=int, default=32, help="side of generated images")
    parser.add_argument("--scaling_classes", default="",
                        help="e.g. 20,200: time the image phase per class step at each number of generated "
                        "classes, batched and sequential, with the same work per class (the published CIFAR "
                        "flags at --ipc with a real batch of --scaling_batch_real images)")
    parser.add_argument("--scaling_batch_real", type=int, default=32,
                        help="real images per class step in --scaling_classes (published: 256)")
    parser.add_argument("--optimizer_shapes", default="",
                        help="e.g. 200x50x64,1000x10x64 (classes x IPC x side, RGB): time the image optimiser "
                        "alone per class step on sets of these shapes, the whole-set step (sequential) against "
                        "a class's own rows with its catch-up (batched)")
    parser.add_argument("--as_process", action="store_true", help=argparse.SUPPRESS)  # one side of --nproc
    return parser.parse_args(argv)


def published_config(args: argparse.Namespace, path: SpeedPath, *more: str) -> Config:
    """The published configuration of the benchmarked dataset and IPC, on one speed path (``more``: flags
    that change it)."""
    argv = ["--dataset", args.dataset, "--ipc", str(args.ipc), "--device", args.device, "--precision", path.precision,
            "--compile", path.compile, "--memory_format", path.memory_format, "--class_steps", args.class_steps,
            "--class_chunk", str(args.class_chunk), *(["--data_path", args.data_path] if args.data_path else []),
            *more]
    return resolve_config(argv, {}).config


def generated_dataset(classes: int, per_class: int, side: int, seed: int = 0) -> Dataset:
    """``classes`` classes of ``per_class`` RGB images (``side`` pixels square; a fifth as many test images):
    one colour per class plus noise, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        colours = torch.randint(0, 256, (classes, 1, 3, 1, 1), generator=torch.Generator().manual_seed(seed))
        noise = torch.randint(-40, 41, (classes, count, 3, side, side), generator=generator)
        images = (colours + noise).clamp(0, 255).to(torch.uint8).flatten(0, 1)
        return images, torch.arange(classes).repeat_interleave(count)

    return make_dataset(f"generated-{classes}", [f"class{c}" for c in range(classes)], [0.5] * 3, [0.25] * 3,
                        split(per_class), split(max(1, per_class // 5)))


def bench_dataset(args: argparse.Namespace, config: Config, device: torch.device) -> Dataset:
    """The real data of ``config``, or the generated set ``--generated_classes`` asks for."""
    if args.generated_classes:
        return generated_dataset(args.generated_classes, args.per_class, args.im_size).to(device)
    return load_dataset(config, device)


def chosen_path(args: argparse.Namespace) -> SpeedPath:
    return SpeedPath(args.precision, args.compile, args.memory_format)


def measure(args: argparse.Namespace, path: SpeedPath) -> dict[str, Any]:
    """Time one speed path through the loop and return its record."""
    config = published_config(args, path)
    device = resolve_device(config.device)
    dataset = bench_dataset(args, config, device)
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(config, get_method(config.method), dataset, RunDirectory(Path(scratch)), 0, device,
                                BestOnTest())
        startup = time.perf_counter() - STARTED
        first_iteration, totals, phases = time_iterations(experiment, args.iterations, device)
        eval_epoch = time_eval_epochs(experiment, 1, args.eval_epochs, False, device)
        peak_memory = peak_memory_mb(device)  # before the stacked nets, whose vmapped activations dwarf a run's
        stacked_epoch = (time_eval_epochs(experiment, args.stacked_nets, args.eval_epochs, True, device)
                         if args.stacked_nets else None)
    seconds = statistics.median(totals)
    tflops = flops_per_iteration(experiment) / 1e12
    peak = peak_tflops(device, experiment.fast.precision)
    return {
        "dataset": dataset.name, "classes": dataset.num_classes, "ipc": args.ipc,
        "config": f"published defaults for {args.dataset} IPC {args.ipc}",
        "class_steps": config.class_steps, "class_chunks": len(experiment.layout.chunks),
        "s_per_image_phase": round(seconds - phases["wall"]["pool_training"], 3),
        "s_per_iteration": round(seconds, 3), "s_per_eval_epoch": round(eval_epoch, 4),
        "phases": {name: round(value, 3) for name, value in phases["wall"].items()},
        "phases_host_bound": host_bound(phases),
        "stacked_eval": None if stacked_epoch is None else {
            "nets": args.stacked_nets, "s_per_epoch": round(stacked_epoch, 3),
            "peak_memory_mb": round(peak_memory_mb(device)),
            "speedup_vs_sequential": round(args.stacked_nets * eval_epoch / stacked_epoch, 2)},
        "tflops_per_iteration": round(tflops, 3), "achieved_tflops": round(tflops / seconds, 4),
        "device_peak_tflops": peak["best"], "peak": peak, "efficiency": round(tflops / seconds / peak["best"], 3),
        "startup_s": round(startup, 2), "first_iteration_s": round(first_iteration, 2),
        "peak_memory_mb": round(peak_memory),
        "iterations_timed": len(totals), "eval_epochs_timed": args.eval_epochs, "device": str(device),
        "compile": experiment.fast.compiled,
        "memory_format": experiment.fast.record()["memory_format"],
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "amx": "amx_bf16" in cpu_flags() if device.type == "cpu" else None,
        "avx512": "avx512f" in cpu_flags() if device.type == "cpu" else None,
        "bf16_units": cpu_has_bf16_units() if device.type == "cpu" else torch.cuda.is_bf16_supported(),
        "threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "precision": experiment.fast.precision_name, "deterministic": experiment.fast.deterministic,
    }


def time_test_passes(experiment: Experiment, nets: int, device: torch.device) -> float:
    """Seconds to test ``nets`` ConvNets on the test split, after one warm-up pass (what a network
    has learned does not change what testing it costs)."""
    protocol, test = experiment.points.protocol, experiment.dataset.test
    net = EvalNet.fresh("ConvNet", experiment.dataset, protocol, 0, ("test-pass",), device).net
    test_accuracy(net, test, precision=protocol.fast.precision)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(nets):
        test_accuracy(net, test, precision=protocol.fast.precision)
    synchronize(device)
    return time.perf_counter() - start


def time_evaluation_point(experiment: Experiment, epochs: int, device: torch.device) -> tuple[float, float]:
    """This process's share of an evaluation point, the ``num_eval`` ConvNets dealt to it: seconds per
    training epoch and seconds of their test passes, apart, since a real point trains for hundreds
    of epochs and tests once."""
    nets = len(experiment.world.deals(experiment.config.num_eval))
    per_epoch = time_eval_epochs(experiment, nets, epochs, experiment.fast.eval_stacked, device)
    return per_epoch, time_test_passes(experiment, nets, device)


def measure_processes(args: argparse.Namespace) -> dict[str, Any] | None:
    """One side of --nproc: this process's part of the run (alone, or one of torchrun's); the first
    process returns the record: per phase the slowest process's seconds, each process's share of
    the work, and the payload bytes its collectives moved per iteration."""
    config = published_config(args, chosen_path(args))
    device_type = resolve_device(config.device).type
    world, device = join(device_type, config.dist_backend)
    torch.set_num_threads(args.threads)
    with world.main_first():
        dataset = load_dataset(config, device)
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(config, get_method(config.method), dataset, RunDirectory(Path(scratch)), 0, device,
                                BestOnTest(), world)
        _, totals, phases = time_iterations(experiment, args.iterations, device)
        traffic = {name: round(size / (args.iterations + 1)) for name, size in world.traffic.items()}
        calls = {name: count / (args.iterations + 1) for name, count in world.calls.items()}
        eval_epoch, eval_test = time_evaluation_point(experiment, args.eval_epochs, device)
    pool_training = phases["wall"]["pool_training"]
    mine = {"iteration": statistics.median(totals), "pool_training": pool_training,
            "image_updates": statistics.median(totals) - pool_training, "evaluation_epoch": eval_epoch,
            "evaluation_test": eval_test}
    everyone = world.gather_objects(mine)
    # Left explicitly: a process that exits still in the group can abort (SIGABRT) while the
    # interpreter shuts down, when gloo's threads release what they hold.
    leave(world)
    if not world.is_main:
        return None
    return {
        "dataset": args.dataset, "classes": dataset.num_classes, "ipc": args.ipc, "processes": world.size,
        "threads_per_process": torch.get_num_threads(),
        "seconds": {phase: round(max(p[phase] for p in everyone), 3) for phase in mine},
        "work_per_process": {
            "classes": [len(experiment.layout.classes(rank)) for rank in range(world.size)],
            "pool_nets_trained": [len(range(rank, config.fetch_net_num, world.size)) for rank in range(world.size)],
            "eval_nets": [len(range(rank, config.num_eval, world.size)) for rank in range(world.size)]},
        "collective_bytes_per_iteration": traffic, "collectives_per_iteration": calls,
        "device_name": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_version": torch.__version__,
    }


def print_process_record(args: argparse.Namespace) -> None:
    record = measure_processes(args)
    if record is not None:
        print(json.dumps(record), flush=True)


def scaling(args: argparse.Namespace) -> None:
    """Measure one process, then ``--nproc`` processes under torchrun, each with the same threads,
    and print both records and the speed-up of every phase."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    child = [str(Path(__file__).resolve()), "--dataset", args.dataset, "--ipc", str(args.ipc), "--iterations",
             str(args.iterations), "--eval_epochs", str(args.eval_epochs), "--device", args.device, "--precision",
             args.precision, "--compile", args.compile, "--memory_format", args.memory_format,
             *(["--data_path", args.data_path] if args.data_path else []), "--as_process", "--threads", str(threads)]
    records = []
    for processes in (1, args.nproc):
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        done = subprocess.run([sys.executable, *(launcher if processes > 1 else []), *child], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {processes}-process measurement failed: {done.stderr.strip()[-2000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, many = records
    print(json.dumps(one), flush=True)
    print(json.dumps({**many, "speedup_vs_one_process": {
        phase: round(one["seconds"][phase] / many["seconds"][phase], 2) for phase in one["seconds"]}}), flush=True)


def compare_class_steps(args: argparse.Namespace) -> None:
    """Print one JSON line for --class_steps batched and one for sequential, measured in one process on the
    chosen speed path; the batched line carries the ratios."""
    batched = measure(argparse.Namespace(**{**vars(args), "class_steps": "batched"}), chosen_path(args))
    sequential = measure(argparse.Namespace(**{**vars(args), "class_steps": "sequential"}), chosen_path(args))
    batched["speedup_vs_sequential"] = {
        "iteration": round(sequential["s_per_iteration"] / batched["s_per_iteration"], 3),
        "image_phase": round(sequential["s_per_image_phase"] / batched["s_per_image_phase"], 3)}
    print(json.dumps(batched), flush=True)
    print(json.dumps(sequential), flush=True)


def image_pass_seconds(config: Config, dataset: Dataset, device: torch.device) -> tuple[float, int]:
    """Seconds of one pass of every class's image step under a pool net (after an untimed pass: first-call
    costs), and the number of chunks the classes came in."""
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(config, get_method(config.method), dataset, RunDirectory(Path(scratch)), 0, device,
                                BestOnTest())
        experiment.step.start()
        entry = experiment.pool.nets[0]
        experiment.step.match_under(entry, (0, 0, 0))
        synchronize(device)
        start = time.perf_counter()
        experiment.step.match_under(entry, (1, 0, 0))
        synchronize(device)
        return time.perf_counter() - start, len(experiment.layout.chunks)


def class_scaling(args: argparse.Namespace) -> None:
    """One JSON line: per number of generated classes and per path, the image phase's seconds per class
    step, with the same work per class at every count; and how each path's cost grows with the classes."""
    counts = [int(count) for count in args.scaling_classes.split(",")]
    seconds: dict[str, dict[int, float]] = {"batched": {}, "sequential": {}}
    chunks: dict[int, int] = {}
    for classes in counts:
        dataset = None
        for class_steps in seconds:
            config = published_config(argparse.Namespace(**{**vars(args), "class_steps": class_steps}),
                                      chosen_path(args), "--batch_real", str(args.scaling_batch_real))
            device = resolve_device(config.device)
            if dataset is None:
                per_class = max(config.batch_real, config.ipc) + 8
                dataset = generated_dataset(classes, per_class, args.im_size).to(device)
            total, count = image_pass_seconds(config, dataset, device)
            seconds[class_steps][classes] = round(total / classes, 4)
            if class_steps == "batched":
                chunks[classes] = count
    first, last = counts[0], counts[-1]
    print(json.dumps({
        "bench": "class_scaling", "classes": counts, "im_size": args.im_size, "ipc": args.ipc,
        "aug": config.aug, "decoded_images_per_class": 4 * config.ipc if config.aug else config.ipc,
        "real_images_per_class_step": config.batch_real,
        "reduced_work": f"real batch {config.batch_real} per class step (published 256); otherwise the published "
                        f"{args.dataset} IPC {args.ipc} flags; one pass under one pool net, timed after a warm-up",
        "s_per_class_step": seconds, "batched_chunks": chunks,
        "growth": {path: round(values[last] / values[first], 3) for path, values in seconds.items()},
        "device_name": torch.cuda.get_device_name() if config.device == "cuda" else cpu_name(),
        "avx512": "avx512f" in cpu_flags(), "amx": "amx_bf16" in cpu_flags(), "threads": torch.get_num_threads(),
        **resolve_fast_paths(config, resolve_device(config.device)).record(), "torch_version": torch.__version__,
    }), flush=True)


def optimizer_costs(args: argparse.Namespace) -> None:
    """One JSON line per set shape: seconds of the image optimiser's work per class step, no network:
    the reference's whole-set step (zero the gradient, write a class's rows, step every image) against a
    class's rows caught up over C - 1 missed turns and stepped (the batched path's work per class)."""
    device = resolve_device(args.device)
    for shape in args.optimizer_shapes.split(","):
        classes, ipc, side = (int(part) for part in shape.split("x"))
        images = torch.randn(classes * ipc, 3, side, side, device=device)
        gradient = torch.randn(ipc, 3, side, side, device=device)
        whole = WholeSetOptimizer(images, range(classes), ipc, "sgd", 0.2)
        lazy = LazySGD(images, range(classes), ipc, 0.2)
        probes = range(0, classes, max(1, classes // 8))

        def whole_steps() -> None:
            for c in probes:
                whole.step(range(c, c + 1), gradient)

        def lazy_steps() -> None:
            for c in probes:
                lazy.images_at(range(c, c + 1), [lazy.synced[c] + classes - 1])
                lazy.step(range(c, c + 1), gradient)

        record = {"bench": "optimizer_costs", "classes": classes, "ipc": ipc, "side": side,
                  "set_mb": round(images.numel() * 4 / 2**20, 1)}
        for name, run in (("sequential", whole_steps), ("batched", lazy_steps)):
            record[f"{name}_ms_per_class_step"] = round(1000 * best_seconds(run, device, 3) / len(probes), 3)
        record["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        print(json.dumps(record), flush=True)
        del images, whole, lazy


def benchmark(args: argparse.Namespace) -> None:
    """Print one JSON line for the chosen path, then one for the plain path (fp32, no compile, contiguous)
    measured in the same process, so that their ratio compares like with like on one machine."""
    if args.compare_class_steps:
        compare_class_steps(args)
        return
    if args.scaling_classes:
        class_scaling(args)
        return
    if args.optimizer_shapes:
        optimizer_costs(args)
        return
    chosen = measure(args, chosen_path(args))
    chosen["path"] = "chosen"
    resolved = (chosen["precision"], "on" if chosen["compile"] else "off", chosen["memory_format"])
    if args.no_plain or SpeedPath(*resolved) == PLAIN:
        print(json.dumps(chosen), flush=True)
        return
    plain = {**measure(args, PLAIN), "path": "plain", "startup_s": None}
    chosen["speedup_vs_plain"] = {"iteration": round(plain["s_per_iteration"] / chosen["s_per_iteration"], 2),
                                  "eval_epoch": round(plain["s_per_eval_epoch"] / chosen["s_per_eval_epoch"], 2)}
    print(json.dumps(chosen), flush=True)
    print(json.dumps(plain), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    if args.as_process:
        return exit_code_of("bench.py", lambda: print_process_record(args))
    return exit_code_of("bench.py", lambda: scaling(args) if args.nproc else benchmark(args))


if __name__ == "__main__":
    sys.exit(main())
