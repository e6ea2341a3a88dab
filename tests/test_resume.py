"""Runs that survive: SIGKILL + --resume is bit-identical, SIGTERM/SIGINT stop cleanly,
damaged checkpoints fall back, non-finite values stop the run, failed writes lose nothing."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import runtime
from checkpoint import CHECKPOINT, PREVIOUS, load_checkpoint
from cli import main
from errors import ConfigError
from helpers import CODE_DIR, UPDATE_TOLERANCE, tiny_experiment

TIMING_KEYS = {"s_per_iteration", "seconds", "run_dir"}


def run_args(folder: Path, save_path: Path, name: str, *more: str) -> list[str]:
    """Two experiments of 16 iterations on tiny data (3 classes in batched chunks of 2 and 1): a few
    seconds, many checkpoints, each with image rows that wait for their momentum-only moves."""
    return ["--dataset", "ImageFolder", "--data_path", str(folder), "--im_size", "16", "--ipc", "2",
            "--Iteration", "16", "--eval_interval", "8", "--num_exp", "2", "--num_eval", "1",
            "--epoch_eval_train", "2", "--batch_real", "6", "--trained_bs", "8", "--model_train_steps", "1",
            "--batch_train", "8", "--log_every", "1", "--checkpoint_every", "1", "--device", "cpu", "--class_chunk", "2",
            "--save_path", str(save_path), "--run_name", name, *more]


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "BACON_cifar.py", *args], cwd=CODE_DIR, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_records(run_dir: Path, experiment: int, iteration: int, process: subprocess.Popen) -> None:
    """Block until metrics.jsonl shows (experiment, iteration) trained, or fail if the run ended first."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                record = json.loads(line) if line.endswith("}") else {}
                if record.get("event") == "train" and (record["experiment"], record["iteration"]) >= \
                        (experiment, iteration):
                    return
        assert process.poll() is None, f"the run ended early: {process.communicate()[1][-2000:]}"
        time.sleep(0.02)
    pytest.fail("the run made no progress")


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Bit-identical sets, identical results (timings aside), each metric record exactly once."""
    expected = json.loads((reference / "results.json").read_text())
    actual = json.loads((resumed / "results.json").read_text())
    assert {k: v for k, v in actual.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in expected.items() if k not in TIMING_KEYS}
    assert records(resumed) == records(reference)
    sets = sorted(p.name for p in (reference / "sets").iterdir())
    assert sets == sorted(p.name for p in (resumed / "sets").iterdir())
    for name in sets:
        a = torch.load(reference / "sets" / name, weights_only=True)
        b = torch.load(resumed / "sets" / name, weights_only=True)
        assert torch.equal(a["images"], b["images"]) and a["meta"] == b["meta"], name


@pytest.fixture(scope="module")
def reference_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    save_path = tmp_path_factory.mktemp("reference")
    result = subprocess.run([sys.executable, "BACON_cifar.py", *run_args(image_folder, save_path, "whole")],
                            cwd=CODE_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return save_path / "whole"


def test_sigkill_anywhere_then_resume_is_bit_identical(image_folder: Path, tmp_path: Path,
                                                       reference_run: Path) -> None:
    run_dir = tmp_path / "killed"
    process = start(*run_args(image_folder, tmp_path, "killed"))
    wait_for_records(run_dir, 0, 11, process)  # mid-experiment, after an evaluation point
    process.kill()
    process.wait()
    resumed = start("--resume", str(run_dir))
    wait_for_records(run_dir, 1, 5, resumed)  # killed again in the second experiment
    resumed.kill()
    resumed.wait()
    final = subprocess.run([sys.executable, "BACON_cifar.py", "--resume", str(run_dir)], cwd=CODE_DIR,
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert_same_run(reference_run, run_dir)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_finishes_the_step_checkpoints_and_says_how_to_resume(
        image_folder: Path, tmp_path: Path, reference_run: Path, signum: int, code: int) -> None:
    run_dir = tmp_path / "stopped"
    process = start(*run_args(image_folder, tmp_path, "stopped"))
    wait_for_records(run_dir, 0, 10, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"BACON_cifar.py: stopped by {signal.Signals(signum).name} at experiment 0")
    assert last_line.endswith(f"resume with: python BACON_cifar.py --resume {run_dir}")
    assert (run_dir / CHECKPOINT).is_file() and not (run_dir / "results.json").exists()
    resumed = subprocess.run([sys.executable, "BACON_cifar.py", "--resume", str(run_dir)], cwd=CODE_DIR,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference_run, run_dir)


def test_a_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits = []
    monkeypatch.setattr(runtime.os, "_exit", lambda code: exits.append(code))
    request = runtime.StopRequest()
    request.handle(signal.SIGINT, None)
    assert exits == [] and request.signum == signal.SIGINT
    request.handle(signal.SIGINT, None)
    assert exits == [130]


def test_resume_refuses_flags_that_change_the_result(reference_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    assert main({}, ["--resume", str(copy), "--lr_img", "0.5", "--seed", "3", "--log_every", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--seed, --lr_img would change its result: drop them") and "log_every" not in err


def test_resume_needs_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main({}, ["--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no checkpoint.pt there" in capsys.readouterr().err


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(reference_run: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    previous = torch.load(copy / PREVIOUS, weights_only=True)
    with open(copy / CHECKPOINT, "r+b") as handle:
        handle.truncate(1000)
    loaded = load_checkpoint(copy)
    assert loaded.payload["metrics_bytes"] == previous["metrics_bytes"]
    assert "checkpoint.pt: " in capsys.readouterr().err
    (copy / PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="no checkpoint can be loaded"):
        load_checkpoint(copy)


def test_a_failed_checkpoint_write_keeps_the_previous_one(reference_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(reference_run, copy)
    before = (copy / CHECKPOINT).read_bytes()
    saved = load_checkpoint(copy)
    config = checkpoint.Config(**saved.config)
    sink = checkpoint.Checkpoints(checkpoint.RunDirectory(copy), config, saved.progress())

    def full_disk(payload: object, path: Path) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError):
        sink.save(None)
    assert (copy / CHECKPOINT).read_bytes() == before
    assert load_checkpoint(copy).payload["experiment"] == saved.payload["experiment"]
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]


def test_a_non_finite_value_stops_the_run_with_exit_code_3(image_folder: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    code = main({}, run_args(image_folder, tmp_path, "exploding", "--lr_img", "1e38", "--num_exp", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert "became NaN or inf at experiment 0, iteration" in err and "class" in err
    assert len(err.splitlines()) == 1
    run_dir = tmp_path / "exploding"
    state = load_checkpoint(run_dir).payload["experiment_state"]
    assert torch.isfinite(state["synthetic"]["images"]).all()  # the last good checkpoint is kept
    assert not (run_dir / "results.json").exists()
    for saved in (run_dir / "sets").glob("*.pt"):
        assert torch.isfinite(torch.load(saved, weights_only=True)["images"]).all()


def test_a_checkpoint_of_the_previous_format_resumes_with_batched_class_steps(image_folder: Path,
                                                                            tmp_path: Path) -> None:
    """Format 2 (before batched class steps) held the whole-set optimiser, which has every class current
    at the last turn, and a config with the inert reference flags; loaded, the run goes on with
    --class_steps batched and ends within rounding of the run that never stopped: each class within
    helpers.UPDATE_TOLERANCE of its update."""
    flags = ["--dataset", "ImageFolder", "--data_path", str(image_folder), "--im_size", "16", "--ipc", "2",
             "--Iteration", "4", "--eval_interval", "4", "--num_exp", "1", "--num_eval", "1",
             "--epoch_eval_train", "0", "--batch_real", "6", "--trained_bs", "8", "--model_train_steps", "1",
             "--device", "cpu", "--precision", "fp32", "--compile", "off", "--save_path", str(tmp_path)]
    assert main({}, [*flags, "--run_name", "whole", "--class_steps", "sequential"]) == 0
    config = checkpoint.Config(**load_checkpoint(tmp_path / "whole").config)
    run_dir = checkpoint.RunDirectory.create(tmp_path, "old")
    run_dir.write_config(config.to_dict())
    experiment = tiny_experiment(config, run_dir)
    initial = experiment.synset.stored().clone()
    experiment.step.start()
    experiment.started = True
    for it in range(2):  # what the previous version would have saved after two iterations
        experiment.step.iteration(it)
        experiment.log.iterations += 1
    experiment.next_iteration = 2
    checkpoint.Checkpoints(run_dir, config, checkpoint.RunProgress()).save(experiment)
    payload = torch.load(run_dir.path / CHECKPOINT, weights_only=True)
    state = payload["experiment_state"]
    whole_set = state.pop("synthetic")
    state["images"], state["optimizer"] = whole_set["images"], whole_set["optimizer"]
    log = state["log"]
    state["log"] = {"sums": log["sums"], "steps": log["classes"], "iterations": log["iterations"]}
    for name in ("class_steps", "class_chunk"):
        del payload["config"][name]
    payload["config"].update({"net_train_real": True, "mismatch_lambda": 0.0, "aug_num": 1, "dis_metric": "ours"})
    torch.save({**payload, "format": 2}, run_dir.path / CHECKPOINT)

    assert main({}, ["--resume", str(run_dir.path)]) == 0
    assert load_checkpoint(run_dir.path).config["class_steps"] == "batched"
    final = "sets/exp0_it000004.pt"
    reference = torch.load(tmp_path / "whole" / final, weights_only=True)["images"].view(3, -1)
    resumed = torch.load(run_dir.path / final, weights_only=True)["images"].view(3, -1)
    moved = (reference - initial.view(3, -1)).norm(dim=1)
    assert torch.all((resumed - reference).norm(dim=1) <= UPDATE_TOLERANCE * moved)
