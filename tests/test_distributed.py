"""One run over several processes (torchrun, gloo on the CPU) computes exactly what one process does.

Every process of these runs uses one CPU thread, and so does the single-process
run they are compared with: convolution kernels may sum in another order with
another thread count, and that alone would change the last bits. With equal
threads per process the promise is bit-identity: the classes' image steps, the
pool training and every evaluation network are the same computations wherever
they run (distributed.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import World
from helpers import CODE_DIR, run_together, write_image_folder

TIMING_KEYS = {"s_per_iteration", "seconds", "run_dir"}
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_args(folder: Path, save_path: Path, name: str, *more: str) -> list[str]:
    """5 classes in batched chunks of 2, 2 and 1 (uneven over 2 processes: 4 and 1 classes), 6
    iterations with evaluations at 3 and 6."""
    return ["--dataset", "ImageFolder", "--data_path", str(folder), "--im_size", "16", "--ipc", "2",
            "--Iteration", "6", "--eval_interval", "3", "--num_exp", "1", "--num_eval", "3",
            "--epoch_eval_train", "2", "--batch_real", "6", "--trained_bs", "8", "--model_train_steps", "2",
            "--batch_train", "8", "--log_every", "1", "--device", "cpu", "--precision", "fp32", "--class_chunk", "2",
            "--save_path", str(save_path), "--run_name", name, *more]


def torchrun(processes: int, *args: str, restarts: int = 0, script: str = "BACON_cifar.py") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "--max-restarts", str(restarts), script, *args]


def start_together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Run independent ``commands`` at the same time from Code/, one thread each, so results do not
    depend on what else runs; a run that is mostly process start-up, or one of one process, leaves a
    core to the other. torchrun --standalone binds its rendezvous store to a port the system picks
    (localhost:0) and its workers share that store, so runs started together never meet."""
    return run_together(commands, cwd=CODE_DIR, env=ONE_THREAD)


def finish(*commands: list[str]) -> None:
    """Run independent ``commands`` at the same time (start_together); each must succeed."""
    for done in start_together(*commands):
        assert done.returncode == 0, done.stderr[-3000:]


def results(run_dir: Path) -> dict:
    record = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in record.items() if k not in TIMING_KEYS | {"processes"}}


def sets(run_dir: Path) -> dict[str, torch.Tensor]:
    return {path.name: torch.load(path, weights_only=True)["images"] for path in sorted((run_dir / "sets").iterdir())}


def same_sets(run_dir: Path, other: Path) -> bool:
    """Both runs saved the same set files, at least one, each with identical images."""
    mine, theirs = sets(run_dir), sets(other)
    return bool(mine) and mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


def events(run_dir: Path) -> list[tuple[str, int]]:
    """(event, iteration) of every complete metrics record (a running process may be mid-line)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["event"], r["iteration"]) for r in map(json.loads, (line for line in lines if line.endswith("}")))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run by one process, by two (checking the pools agree after every iteration) and by three;
    DM by one and by three. (A run repeated at one world size is identical too: the restarted run below
    ends bit for bit as "two".)"""
    root = tmp_path_factory.mktemp("distributed")
    folder = write_image_folder(root / "folder", classes=5, per_class=10)
    finish([sys.executable, "BACON_cifar.py", *run_args(folder, root, "one")],
                    torchrun(2, *run_args(folder, root, "two", "--check_replicas")))
    finish([sys.executable, "BACON_cifar.py", *run_args(folder, root, "one-dm", "--method", "dm",
                                                                 "--lr_img", "1", "--no-syn_ce")],
                    torchrun(3, *run_args(folder, root, "three", "--method", "dm", "--lr_img", "1", "--no-syn_ce")))
    finish(torchrun(3, *run_args(folder, root, "three-bacon")))
    return {"root": root, "folder": folder, **{name: root / name for name in
                                               ("one", "two", "three", "one-dm", "three-bacon")}}


@pytest.mark.parametrize("count, size", [(10, 3), (10, 2), (5, 2), (2, 3), (200, 8)])
def test_classes_are_split_into_blocks_that_cover_each_class_once(count: int, size: int) -> None:
    blocks = [World(rank, size).block(count) for rank in range(size)]
    assert [c for block in blocks for c in block] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    dealt = [World(rank, size).deals(count) for rank in range(size)]
    assert sorted(i for share in dealt for i in share) == list(range(count))


def test_two_processes_compute_exactly_what_one_does(runs: dict[str, Path]) -> None:
    """Sets after the first evaluation interval and at the end, and every evaluation accuracy."""
    one, two = sets(runs["one"]), sets(runs["two"])
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    assert results(runs["one"]) == results(runs["two"])
    assert events(runs["one"]) == events(runs["two"])


def test_three_processes_each_holding_one_chunk_compute_exactly_what_one_does(runs: dict[str, Path]) -> None:
    one, three = sets(runs["one"]), sets(runs["three-bacon"])
    assert one.keys() == three.keys() and all(torch.equal(one[name], three[name]) for name in one)
    assert results(runs["one"]) == results(runs["three-bacon"])


def test_three_processes_share_dm_classes_unevenly_and_still_match_one(runs: dict[str, Path]) -> None:
    one, three = sets(runs["one-dm"]), sets(runs["three"])
    assert all(torch.equal(one[name], three[name]) for name in one)
    assert results(runs["one-dm"]) == results(runs["three"])


def test_only_the_first_process_writes_and_it_says_how_many_ran(runs: dict[str, Path]) -> None:
    assert json.loads((runs["two"] / "results.json").read_text())["processes"] == 2
    assert sorted(p.name for p in runs["root"].iterdir() if p.name.startswith("two")) == ["two"]
    assert len(events(runs["two"])) == len(set(events(runs["two"])))  # one record per event, not one per process


def rank_pid(agent: subprocess.Popen, rank: int) -> int | None:
    """The process id of the worker with ``rank`` started by the torchrun ``agent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == agent.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_killed_process_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(
        runs: dict[str, Path]) -> None:
    name = "restarted"
    run_dir = runs["root"] / name
    command = torchrun(2, *run_args(runs["folder"], runs["root"], name, "--checkpoint_every", "1",
                                    "--resume", "auto"), restarts=1)
    agent = subprocess.Popen(command, cwd=CODE_DIR, env=ONE_THREAD, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and ("train", 4) in events(run_dir)):
        assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read()[-3000:]
        time.sleep(0.05)
    victim = rank_pid(agent, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, err = agent.communicate(timeout=240)
    assert agent.returncode == 0, err[-3000:]
    assert "resuming experiment 0 at iteration" in out
    assert results(run_dir) == results(runs["two"])
    assert events(run_dir) == events(runs["two"])
    assert same_sets(run_dir, runs["two"])


def test_resume_auto_needs_a_run_name(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "BACON_cifar.py", "--resume", "auto", "--save_path", str(tmp_path)],
                          cwd=CODE_DIR, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--resume auto needs --run_name" in done.stderr


USER_ERRORS = {"bad-value": ["--ipc", "0"], "unknown-flag": ["--no-such-flag"]}


@pytest.fixture(scope="module")
def user_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """The outcome of a two-process run given each of USER_ERRORS, started together
    (start_together): each run is mostly process start-up."""
    root = tmp_path_factory.mktemp("user-errors")
    outcomes = start_together(*(torchrun(2, *bad, "--device", "cpu", "--save_path", str(root / name))
                                for name, bad in USER_ERRORS.items()))
    return dict(zip(USER_ERRORS, outcomes))


@pytest.mark.parametrize("bad", USER_ERRORS)
def test_a_user_error_is_one_line_from_one_process(bad: str,
                                                   user_errors: dict[str, subprocess.CompletedProcess]) -> None:
    done = user_errors[bad]
    said = [line for line in done.stderr.splitlines() if line.startswith("BACON_cifar.py: error")]
    assert done.returncode != 0 and len(said) == 1, done.stderr[-3000:]


def test_the_sequential_reference_path_is_refused_on_several_processes() -> None:
    """It steps one optimiser over the whole set at every turn: that set lives in one process."""
    from config import Config
    from errors import ConfigError
    from pipeline import refuse_for_world

    refuse_for_world(Config(class_steps="sequential"), World(0, 1))
    refuse_for_world(Config(class_steps="batched"), World(1, 2))
    with pytest.raises(ConfigError, match="one process; run it without torchrun or use --class_steps batched"):
        refuse_for_world(Config(class_steps="sequential"), World(1, 2))


def test_evaluating_one_set_gives_the_same_accuracies_on_any_number_of_processes(runs: dict[str, Path]) -> None:
    """evaluate.py deals its networks out; each draws from streams keyed by its own name."""
    args = [str(runs["one"] / "sets" / "exp0_it000006.pt"), "--data_path", str(runs["folder"]), "--im_size", "16",
            "--num_eval", "5", "--epoch_eval_train", "3", "--batch_train", "8", "--device", "cpu",
            "--precision", "fp32", "--save_path", str(runs["root"])]
    finish([sys.executable, "evaluate.py", *args, "--run_name", "evaluated-by-one"],
                    torchrun(3, *args, "--run_name", "evaluated-by-three", script="evaluate.py"))
    one, three = (json.loads((runs["root"] / name / "results.json").read_text())
                  for name in ("evaluated-by-one", "evaluated-by-three"))
    assert one["final"] == three["final"] and three["processes"] == 3


def test_ctrl_c_stops_every_process_at_one_checkpoint_and_one_process_can_finish_the_run(
        runs: dict[str, Path]) -> None:
    """torchrun passes SIGINT to every process; they agree on the iteration to stop at, checkpoint
    together, and the run resumed by one process ends as the uninterrupted one."""
    name = "interrupted"
    run_dir = runs["root"] / name
    agent = subprocess.Popen(torchrun(2, *run_args(runs["folder"], runs["root"], name, "--checkpoint_every", "1")),
                             cwd=CODE_DIR, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and ("train", 2) in events(run_dir)):
        assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read()[-3000:]
        time.sleep(0.02)
    agent.send_signal(signal.SIGINT)
    _, err = agent.communicate(timeout=120)
    stops = [line for line in err.splitlines() if line.startswith("BACON_cifar.py: stopped by SIGINT")]
    assert len(stops) == 1 and "checkpoint saved" in stops[0], err[-3000:]  # said once, not per process
    assert not (run_dir / "results.json").exists()
    finish([sys.executable, "BACON_cifar.py", "--resume", str(run_dir)])
    assert results(run_dir) == results(runs["one"])
    assert same_sets(run_dir, runs["one"])
