"""bench/bench.py runs the loop it measures and reports every figure the speed work is judged by."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_together, write_image_folder

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 5 generated images, 4 of each class for training: the bench runs the published
    configuration, whose pool training steps over every training image, so fewer images make each
    measured iteration cheaper without changing which figures it reports."""
    return write_image_folder(tmp_path_factory.mktemp("bench-folder"), per_class=5)


@pytest.fixture(scope="module")
def bench_runs(small_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """The bench processes this module reads, started together: "measured", one run on the small generated
    folder (fp32, eager, 2 stacked nets); "nproc", one process then two under torchrun, one thread each;
    "missing", a folder that does not exist. The tests check which figures each reports and how they
    relate, never how large a time is, so sharing the cores changes no assertion (every time only has to
    be positive)."""
    common = ["--dataset", "ImageFolder", "--data_path", str(small_folder), "--ipc", "2", "--iterations", "1",
              "--eval_epochs", "1", "--device", "cpu", "--precision", "fp32", "--compile", "off"]
    runs = {"measured": [*common, "--stacked_nets", "2"],
            "nproc": [*common, "--nproc", "2", "--threads", "1"],
            "missing": ["--dataset", "ImageFolder", "--data_path", str(tmp_path_factory.mktemp("bench") / "missing"),
                        "--device", "cpu"]}
    return dict(zip(runs, run_together([[sys.executable, str(BENCH), *args] for args in runs.values()])))


@pytest.fixture(scope="module")
def measured(bench_runs: dict[str, subprocess.CompletedProcess]) -> subprocess.CompletedProcess:
    """One bench run on the small generated folder: fp32, eager, 2 stacked nets."""
    return bench_runs["measured"]


def test_one_json_line_with_every_figure(measured: subprocess.CompletedProcess) -> None:
    assert measured.returncode == 0, measured.stderr
    lines = measured.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    for seconds in ("s_per_iteration", "s_per_eval_epoch", "startup_s", "first_iteration_s"):
        assert record[seconds] > 0, seconds
    assert set(record["phases"]) == {"real_forward", "synthetic", "pool_training", "other"}
    for phase, split in record["phases_host_bound"].items():  # on a CPU the host does all the work
        assert split["device_s"] is None and split["host_s"] <= split["wall_s"] and split["host_share"] > 0.99, phase
    assert record["stacked_eval"]["nets"] == 2 and record["stacked_eval"]["s_per_epoch"] > 0
    assert record["achieved_tflops"] > 0 and record["efficiency"] > 0
    peak = record["peak"]
    assert record["device_peak_tflops"] == peak["best"] == max(peak["matmul"], peak["conv"]) > 0
    assert peak["conv_layout"] in ("NCHW", "NHWC")
    assert record["path"] == "chosen" and "speedup_vs_plain" not in record  # fp32 eager contiguous is the plain path
    assert record["peak_memory_mb"] > 0 and record["threads"] >= 1
    assert (record["device"], record["precision"], record["compile"], record["memory_format"]) == \
        ("cpu", "fp32", False, "contiguous")
    assert (record["class_steps"], record["class_chunks"]) == ("batched", 3)
    for key in ("device_name", "amx", "avx512", "bf16_units", "torch_version"):
        assert key in record, key


def test_flops_are_counted_from_the_layer_shapes(measured: subprocess.CompletedProcess) -> None:
    """By hand, one forward of the 32x32 RGB ConvNet: 2 x multiply-adds of
    conv1 32*32*128*27 + conv2 16*16*128*128*9 + conv3 8*8*128*128*9 + fc 2048*3 = 101.5 MFLOP.
    The small generated folder has 12 training images, 4 per class, so an IPC-2 iteration is
    3 classes x 4 real forwards + 3 x 8 decoded images x 2 (fwd + input grad)
    + 2 nets x 10 steps x 12 images x 3 (fwd + full backward) = 780 forwards."""
    forward = 2 * (32 * 32 * 128 * 27 + 16 * 16 * 128 * 128 * 9 + 8 * 8 * 128 * 128 * 9 + 2048 * 3)
    record = json.loads(measured.stdout)
    assert record["tflops_per_iteration"] == round(780 * forward / 1e12, 3)


def test_errors_are_one_line(bench_runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = bench_runs["missing"]
    assert result.returncode == 2
    assert result.stderr.strip().startswith("bench.py: error: ImageFolder:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_fast_path_is_printed_beside_the_plain_path_with_their_ratio(monkeypatch, capsys) -> None:
    sys.path.insert(0, str(BENCH.parent))
    import bench

    def measure(args, path: bench.SpeedPath) -> dict:
        seconds = {"bf16": (2.0, 0.5), "fp32": (3.0, 0.6)}[path.precision]
        return {"s_per_iteration": seconds[0], "s_per_eval_epoch": seconds[1], "precision": path.precision,
                "compile": path.compile == "on", "memory_format": "contiguous", "startup_s": 1.0}

    monkeypatch.setattr(bench, "measure", measure)
    bench.benchmark(bench.parse_args(["--precision", "bf16"]))
    chosen, plain = map(json.loads, capsys.readouterr().out.splitlines())
    assert (chosen["path"], chosen["precision"], plain["path"], plain["precision"]) == ("chosen", "bf16", "plain", "fp32")
    assert chosen["speedup_vs_plain"] == {"iteration": 1.5, "eval_epoch": 1.2}
    assert plain["startup_s"] is None  # the process had started long before


def test_nproc_measures_one_process_then_several_with_their_shares_and_traffic(
        bench_runs: dict[str, subprocess.CompletedProcess]) -> None:
    result = bench_runs["nproc"]
    assert result.returncode == 0, result.stderr
    one, two = map(json.loads, result.stdout.strip().splitlines())
    assert (one["processes"], two["processes"], two["threads_per_process"]) == (1, 2, 1)
    assert two["work_per_process"] == {"classes": [2, 1], "pool_nets_trained": [1, 1], "eval_nets": [3, 2]}
    assert one["collective_bytes_per_iteration"] == {} and two["collective_bytes_per_iteration"]["broadcast"] > 0
    # per iteration: each of the 2 trained nets in one float32 and one int64 broadcast, one agreement
    assert two["collectives_per_iteration"] == {"broadcast": 4, "agree": 1}
    assert set(two["speedup_vs_one_process"]) == {"iteration", "pool_training", "image_updates", "evaluation_epoch",
                                                  "evaluation_test"}


def in_process_bench():
    """bench.py as a module, for checks that need no fresh process."""
    sys.path.insert(0, str(BENCH.parent))
    import bench
    return bench


def test_class_steps_are_compared_in_one_process_with_their_ratios(monkeypatch, capsys) -> None:
    bench = in_process_bench()

    def measure(args, path) -> dict:
        seconds = {"batched": (2.0, 0.5), "sequential": (3.0, 1.0)}[args.class_steps]
        return {"class_steps": args.class_steps, "s_per_iteration": seconds[0], "s_per_image_phase": seconds[1]}

    monkeypatch.setattr(bench, "measure", measure)
    bench.benchmark(bench.parse_args(["--compare_class_steps"]))
    batched, sequential = map(json.loads, capsys.readouterr().out.splitlines())
    assert (batched["class_steps"], sequential["class_steps"]) == ("batched", "sequential")
    assert batched["speedup_vs_sequential"] == {"iteration": 1.5, "image_phase": 2.0}


def test_class_scaling_times_a_class_step_at_each_count_of_generated_classes(capsys) -> None:
    bench = in_process_bench()
    bench.benchmark(bench.parse_args(["--dataset", "CIFAR100", "--ipc", "2", "--scaling_classes", "3,6", "--im_size",
                                      "8", "--scaling_batch_real", "4", "--device", "cpu", "--precision", "fp32",
                                      "--compile", "off"]))
    record = json.loads(capsys.readouterr().out)
    assert record["classes"] == [3, 6] and record["real_images_per_class_step"] == 4
    assert record["decoded_images_per_class"] == 8 and "published 256" in record["reduced_work"]
    for path in ("batched", "sequential"):
        seconds = record["s_per_class_step"][path]
        assert all(value > 0 for value in seconds.values())
        assert record["growth"][path] == round(seconds["6"] / seconds["3"], 3)
    assert record["batched_chunks"] == {"3": 3, "6": 6}  # at most ceil(classes / 8) per chunk


def test_the_optimiser_alone_is_timed_per_class_step_on_each_set_shape(capsys) -> None:
    bench = in_process_bench()
    bench.benchmark(bench.parse_args(["--optimizer_shapes", "6x2x8,12x1x4", "--device", "cpu"]))
    first, second = map(json.loads, capsys.readouterr().out.strip().splitlines())
    assert (first["classes"], first["ipc"], first["side"], second["classes"]) == (6, 2, 8, 12)
    assert first["set_mb"] == round(6 * 2 * 3 * 8 * 8 * 4 / 2**20, 1)
    assert first["sequential_ms_per_class_step"] > 0 and first["batched_ms_per_class_step"] > 0
