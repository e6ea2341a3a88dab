"""Does every CUDA path work? One command that answers on a machine with a GPU.

The CUDA defaults differ from the CPU ones: ``--precision auto`` is bf16
autocast, ``--eval_batched auto`` trains the evaluation networks together
(vmap), the real-batch and DSA generators live on the GPU. Beyond those, the
checks cover the CIFAR shape (3 channels, 32x32), channels-last, ZCA, the
six architectures of ``--eval_mode M``, a bit-exact resume and, with two GPUs,
two NCCL processes against one. The test suite runs
on CPUs only, so these paths are checked here, through the project's own entry
points as a user runs them, on real Fashion-MNIST with tiny budgets (no check
starts after ``--total_s``). Each check prints one line, ``ok`` or ``FAILED``
with the reason.

    bash scripts/gpu_check.sh [--data_path DIR] [--only NAME,...] [--keep DIR]

Exit codes: 0 every check passed, 1 some failed, 2 no CUDA device (or bad
arguments). ``--rehearse_on_cpu`` runs the same checks on the CPU, with bf16
and stacked evaluation asked for explicitly: it tests this harness, not CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
CODE = REPO / "Code"
BENCH = REPO / "bench" / "bench.py"
METHODS = ("bacon", "idm", "dm")
CHANCE_PERCENT = 10.0  # Fashion-MNIST has 10 classes
TINY_RUN = ["--dataset", "FashionMNIST", "--ipc", "2", "--Iteration", "4", "--eval_interval", "2", "--num_exp", "1",
            "--num_eval", "2", "--epoch_eval_train", "20", "--batch_real", "128", "--trained_bs", "128",
            "--model_train_steps", "2", "--log_every", "1"]
FINAL_SET = "exp0_it000004.pt"
RESUME_ITERATIONS, KILL_AFTER = 30, 5  # long enough that a GPU is still running when the kill comes
# Runs that must be bit-exact on CUDA: deterministic kernels, DSA ops that have them there, no mosaics
# (grid_sample's and interpolate's backward accumulate with atomics).
BIT_EXACT = ["--deterministic", "--dsa_strategy", "color_crop_cutout_flip", "--no-aug"]


class CheckFailed(Exception):
    """A check's reason for failing, printed on its line."""


class CheckSkipped(Exception):
    """Why a check cannot run on this machine (e.g. one GPU for a two-GPU check), printed on its line."""


@dataclass
class Context:
    """What every check shares: the interpreter, a scratch directory and the device flags."""

    python: str
    work: Path
    data_path: str | None
    rehearsal: bool
    timeout_s: float
    sets: dict[str, Path] = field(default_factory=dict)
    total_s: float = math.inf  # no check starts once this much time has passed

    @property
    def device(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    def defaults_flags(self) -> list[str]:
        """The device's defaults; a rehearsal asks for the CUDA defaults by name."""
        rehearse = ["--precision", "bf16", "--eval_batched", "on"] if self.rehearsal else []
        return ["--device", self.device, *rehearse]

    def data_flags(self) -> list[str]:
        return ["--data_path", self.data_path] if self.data_path else []


def one_line(text: str) -> str:
    """The last non-empty line of a process's output: where errors and tracebacks end."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_process(context: Context, script: Path, args: Sequence[str], launcher: Sequence[str] | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a project script as a user would (from Code/), with ``launcher`` (torchrun) and ``env``
    added to the environment if given; a non-zero exit fails the check."""
    command = [*(launcher or [context.python]), str(script), *args]
    try:
        done = subprocess.run(command, cwd=CODE, capture_output=True, text=True, timeout=context.timeout_s,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{script.name} ran past {context.timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise CheckFailed(f"{script.name} exited {done.returncode}: {one_line(done.stderr or done.stdout)}")
    return done


def distil_args(context: Context, method: str, name: str, *flags: str) -> list[str]:
    """BACON_mnist.py's arguments for a tiny Fashion-MNIST run written to ``work/name``."""
    return [*TINY_RUN, "--method", method, *context.data_flags(), *flags, "--save_path", str(context.work),
            "--run_name", name]


def distil(context: Context, method: str, name: str, *flags: str) -> dict:
    """A tiny Fashion-MNIST distillation; returns its results.json."""
    run_process(context, CODE / "BACON_mnist.py", distil_args(context, method, name, *flags))
    return json.loads((context.work / name / "results.json").read_text())


def expect_results(results: dict, context: Context, precision: str, stacked: bool, compiled: bool = False) -> str:
    """The run used the path it was meant to, and its networks learned (better than chance)."""
    used = (results["device"].split(":")[0], results["precision"], results["eval_stacked"], results["compiled"])
    wanted = (context.device, precision, stacked, compiled)
    if used != wanted:
        raise CheckFailed("ran with device {}, precision {}, stacked evaluation {}, compiled {}; expected "
                          "{}, {}, {}, {}".format(*used, *wanted))
    accuracy = results["result"]["mean"]
    if not (math.isfinite(accuracy) and CHANCE_PERCENT < accuracy <= 100.0):
        raise CheckFailed(f"final accuracy {accuracy} % is not above chance ({CHANCE_PERCENT:.0f} %)")
    return f"{results['result']['model']} {accuracy:.1f} % over {results['result']['n']} nets, {precision}, " \
        f"{'stacked' if stacked else 'sequential'} evaluation on {results['device']}"


def check_defaults(method: str) -> Callable[[Context], str]:
    def check(context: Context) -> str:
        name = f"defaults-{method}"
        results = distil(context, method, name, *context.defaults_flags())
        context.sets[method] = context.work / name / "sets" / FINAL_SET
        return expect_results(results, context, "bf16", stacked=True)
    return check


def check_fp32_sequential(method: str) -> Callable[[Context], str]:
    """The reference's order on the device: fp32, one evaluation network and one class step at a time."""
    def check(context: Context) -> str:
        results = distil(context, method, f"fp32-{method}", "--device", context.device, "--precision", "fp32",
                         "--eval_batched", "off", "--class_steps", "sequential")
        if results.get("class_steps") != "sequential":
            raise CheckFailed(f"results.json says class steps {results.get('class_steps')!r}, not sequential")
        return expect_results(results, context, "fp32", stacked=False)
    return check


def check_compile(context: Context) -> str:
    results = distil(context, "bacon", "compiled", *context.defaults_flags(), "--compile")
    return expect_results(results, context, "bf16", stacked=True, compiled=True)


def wait_for_iteration(run_dir: Path, iteration: int, process: subprocess.Popen, stderr: Path,
                       timeout_s: float) -> None:
    """Block until metrics.jsonl has a training record at ``iteration`` or later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        for line in lines:
            record = json.loads(line) if line.endswith("}") else {}
            if record.get("event") == "train" and record["iteration"] >= iteration:
                return
        if process.poll() is not None:
            raise CheckFailed(f"the run ended before iteration {iteration}: {one_line(stderr.read_text())}")
        time.sleep(0.02)
    raise CheckFailed(f"the run did not reach iteration {iteration} in {timeout_s:.0f} s")


def saved_images(context: Context, name: str, file: str = f"exp0_it{RESUME_ITERATIONS:06d}.pt") -> torch.Tensor:
    """The images of a set that run ``name`` saved (by default the resume check's last)."""
    return torch.load(context.work / name / "sets" / file, weights_only=True)["images"]


def records(context: Context, name: str) -> list[tuple[str, int]]:
    lines = (context.work / name / "metrics.jsonl").read_text().splitlines()
    return [(record["event"], record["iteration"]) for record in map(json.loads, lines)]


def check_resume(context: Context) -> str:
    """SIGKILL mid-run, then --resume: every record once, and the set bit-identical to an uninterrupted
    run's (``BIT_EXACT`` runs); two uninterrupted runs tell a nondeterministic kernel from a resume
    that lost state."""
    longer = ["--Iteration", str(RESUME_ITERATIONS), "--eval_interval", str(RESUME_ITERATIONS // 2),
              "--checkpoint_every", "1", *BIT_EXACT, *context.defaults_flags()]
    for name in ("whole-a", "whole-b"):
        distil(context, "bacon", name, *longer)
    stderr = context.work / "killed.stderr"
    with stderr.open("w") as sink:
        process = subprocess.Popen([context.python, str(CODE / "BACON_mnist.py"),
                                    *distil_args(context, "bacon", "killed", *longer)],
                                   cwd=CODE, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            wait_for_iteration(context.work / "killed", KILL_AFTER, process, stderr, context.timeout_s)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    if process.returncode != -signal.SIGKILL:
        raise CheckFailed(f"the run ended by itself (exit {process.returncode}) before the kill; "
                          "raise RESUME_ITERATIONS in scripts/gpu_check.py")
    run_process(context, CODE / "BACON_mnist.py", ["--resume", str(context.work / "killed")])
    if records(context, "killed") != records(context, "whole-a"):
        raise CheckFailed("the resumed run's metrics.jsonl does not hold every record exactly once")
    noise = (saved_images(context, "whole-a") - saved_images(context, "whole-b")).abs().max().item()
    resumed = (saved_images(context, "killed") - saved_images(context, "whole-a")).abs().max().item()
    if noise:
        raise CheckFailed(f"two uninterrupted --deterministic runs differ by {noise:.2e}: a kernel without a "
                          f"deterministic version ran (the resumed set differs by {resumed:.2e})")
    if resumed:
        raise CheckFailed(f"the resumed set differs from an uninterrupted one by {resumed:.2e}, and two "
                          "uninterrupted runs are bit-identical")
    return f"killed after iteration {KILL_AFTER} and resumed: bit-identical, like two uninterrupted runs"


def check_evaluate(context: Context) -> str:
    set_file = context.sets.get("bacon")
    if set_file is None or not set_file.is_file():
        raise CheckFailed("needs the set saved by defaults-bacon, which did not run or failed")
    run_process(context, CODE / "evaluate.py", [str(set_file), *context.data_flags(), *context.defaults_flags(),
                                                "--num_eval", "2", "--epoch_eval_train", "20",
                                                "--save_path", str(context.work), "--run_name", "evaluated"])
    results = json.loads((context.work / "evaluated" / "results.json").read_text())
    return expect_results(results, context, "bf16", stacked=True)


def check_bench(context: Context) -> str:
    done = run_process(context, BENCH, ["--dataset", "FashionMNIST", "--ipc", "10", "--iterations", "1",
                                        "--eval_epochs", "1", "--device", context.device, *context.data_flags()])
    try:
        printed = [json.loads(line) for line in done.stdout.strip().splitlines()]
        chosen = next(record for record in printed if record["path"] == "chosen")
    except (json.JSONDecodeError, KeyError, StopIteration):
        raise CheckFailed(f"bench.py printed no record of the default path: {one_line(done.stdout)}") from None
    speedup = chosen.get("speedup_vs_plain", {}).get("iteration", 1.0)
    return (f"{chosen['s_per_iteration']} s/iteration ({speedup}x the fp32 path), {chosen['s_per_eval_epoch']} s/eval "
            f"epoch, efficiency {chosen['efficiency']} on {chosen['device_name']} ({chosen['precision']})")


def check_two_processes(context: Context) -> str:
    """torchrun over 2 GPUs (NCCL; 2 CPU processes on gloo in a rehearsal), --check_replicas: the same
    results and sets as one process, bit for bit (``BIT_EXACT`` runs)."""
    if not context.rehearsal and torch.cuda.device_count() < 2:
        raise CheckSkipped(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    flags = [*BIT_EXACT, *context.defaults_flags()]
    # CPU convolutions sum in another order with another thread count: one thread per process there
    threads = {"OMP_NUM_THREADS": "1"} if context.rehearsal else None
    run_process(context, CODE / "BACON_mnist.py", distil_args(context, "bacon", "one-process", *flags), env=threads)
    one = json.loads((context.work / "one-process" / "results.json").read_text())
    torchrun = [context.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_process(context, CODE / "BACON_mnist.py", distil_args(context, "bacon", "two-processes", *flags,
                                                              "--check_replicas"), launcher=torchrun, env=threads)
    two = json.loads((context.work / "two-processes" / "results.json").read_text())
    if (two.get("processes"), two["final"]) != (2, one["final"]):
        raise CheckFailed(f"2 processes reached {two['final']} ({two.get('processes')} processes), one process "
                          f"{one['final']}")
    differs = (saved_images(context, "two-processes", FINAL_SET) - saved_images(context, "one-process", FINAL_SET))
    if differs.abs().max().item():
        raise CheckFailed(f"the 2-process set differs from the 1-process one by {differs.abs().max().item():.2e}")
    backend = "gloo" if context.rehearsal else "NCCL"
    return f"2 processes ({backend}) equal one process: accuracies and the final set, bit for bit"


def write_cifar_like(root: Path, classes: int = 10, per_class: int = 12, side: int = 32) -> Path:
    """DIR/train/<class>/*.png: 3-channel images of one colour per class plus noise, CIFAR's shape."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = torch.randint(0, 256, (3,), generator=generator)
        for i in range(per_class):
            noise = torch.randint(-40, 41, (side, side, 3), generator=generator)
            pixels = (colour + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def check_cifar_shape(context: Context) -> str:
    """3 channels at 32x32, the CIFAR and SVHN shape, through BACON_cifar.py on a generated folder."""
    folder = write_cifar_like(context.work / "cifar-like-data")
    tiny = [*TINY_RUN]
    tiny[tiny.index("FashionMNIST")] = "ImageFolder"
    run_process(context, CODE / "BACON_cifar.py", [*tiny, "--method", "bacon", "--data_path", str(folder), "--im_size",
                                                   "32", *context.defaults_flags(), "--save_path", str(context.work),
                                                   "--run_name", "cifar-like"])
    return expect_results(json.loads((context.work / "cifar-like" / "results.json").read_text()), context, "bf16",
                          stacked=True)


def check_flagged(name: str, *flags: str) -> Callable[[Context], str]:
    """A tiny default run with ``flags`` added (a layout, ZCA)."""
    def check(context: Context) -> str:
        return expect_results(distil(context, "bacon", name, *context.defaults_flags(), *flags), context, "bf16",
                              stacked=True)
    return check


def check_eval_mode_m(context: Context) -> str:
    """evaluate.py over the six architectures of --eval_mode M, stacked where they allow it."""
    set_file = context.sets.get("bacon")
    if set_file is None or not set_file.is_file():
        raise CheckFailed("needs the set saved by defaults-bacon, which did not run or failed")
    run_process(context, CODE / "evaluate.py", [str(set_file), *context.data_flags(), *context.defaults_flags(),
                                                "--eval_mode", "M", "--num_eval", "2", "--epoch_eval_train", "2",
                                                "--save_path", str(context.work), "--run_name", "evaluated-M"])
    final = json.loads((context.work / "evaluated-M" / "results.json").read_text())["final"]
    return ", ".join(f"{model} {stats['mean']:.1f} %" for model, stats in final.items())


CHECKS: dict[str, Callable[[Context], str]] = {
    **{f"defaults-{method}": check_defaults(method) for method in METHODS},
    **{f"fp32-sequential-{method}": check_fp32_sequential(method) for method in METHODS},
    "resume": check_resume,
    "compile": check_compile,
    "evaluate": check_evaluate,
    "eval-mode-M": check_eval_mode_m,
    "cifar-shape": check_cifar_shape,
    "channels-last": check_flagged("channels-last", "--memory_format", "channels_last"),
    "zca": check_flagged("zca", "--zca"),
    "two-processes": check_two_processes,
    "bench": check_bench,
}


def run_checks(checks: dict[str, Callable[[Context], str]], context: Context, out=print) -> int:
    """Run every check, one line each, then the total; 0 if none failed, else 1. Checks that would start
    after ``context.total_s`` are reported as not run, and count as failed."""
    failed = 0
    width = max(map(len, checks))
    started_all = time.perf_counter()
    for name, check in checks.items():
        started = time.perf_counter()
        if started - started_all >= context.total_s:
            failed += 1
            out(f"FAILED  {name:<{width}}  not run: the total limit of {context.total_s:.0f} s was reached")
            continue
        try:
            detail = check(context)
        except CheckSkipped as reason:
            out(f"skipped {name:<{width}}  {reason}")
            continue
        except CheckFailed as reason:
            failed += 1
            out(f"FAILED  {name:<{width}}  {reason}")
            continue
        except Exception as error:  # a bug in the harness itself: say so, keep checking
            failed += 1
            out(f"FAILED  {name:<{width}}  harness error {type(error).__name__}: {error}")
            continue
        out(f"ok      {name:<{width}}  {detail} ({time.perf_counter() - started:.0f} s)")
    out(f"{len(checks) - failed} of {len(checks)} checks passed or were skipped, "
        f"in {time.perf_counter() - started_all:.0f} s")
    return 1 if failed else 0


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"gpu_check: error: {message}; see --help\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", help="directory holding the Fashion-MNIST idx files (plain or .gz); "
                        "default: the project's data folder, then the Debian package's")
    parser.add_argument("--only", help=f"comma-separated checks to run (default all): {', '.join(CHECKS)}")
    parser.add_argument("--keep", metavar="DIR", help="write the runs into DIR and keep them (default: a temporary "
                        "directory, removed at the end)")
    parser.add_argument("--timeout_s", type=float, default=300.0, help="limit for each process (default 300)")
    parser.add_argument("--total_s", type=float, default=1200.0, help="no check starts after this many seconds "
                        "(default 1200); those left are reported as not run")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("--rehearse_on_cpu", action="store_true",
                        help="run the checks on the CPU with the CUDA defaults asked for by name (tests this "
                        "harness, not CUDA)")
    args = parser.parse_args(argv)
    if args.only:
        unknown = [name for name in args.only.split(",") if name not in CHECKS]
        if unknown:
            parser.error(f"unknown check {unknown[0]!r}; valid checks: {', '.join(CHECKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if not args.rehearse_on_cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
              "with an NVIDIA GPU (--rehearse_on_cpu exercises the harness on the CPU)", file=sys.stderr)
        return 2
    chosen = {name: CHECKS[name] for name in (args.only.split(",") if args.only else CHECKS)}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        context = Context(sys.executable, work, args.data_path, args.rehearse_on_cpu, args.timeout_s,
                          total_s=args.total_s)
        where = "the CPU (rehearsal: not a GPU check)" if args.rehearse_on_cpu else torch.cuda.get_device_name(0)
        print(f"gpu_check on {where}, torch {torch.__version__}, runs in {work}", flush=True)
        return run_checks(chosen, context, out=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
