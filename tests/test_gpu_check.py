"""scripts/gpu_check.sh: what it does without a GPU, its arguments, and how it reports checks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402  (needs the path above)


def run_gpu_check(*args: str) -> subprocess.CompletedProcess:
    """The shell entry point as a user runs it, with CUDA hidden (CI machines have none anyway)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_without_cuda_it_says_so_in_one_line_and_exits_2() -> None:
    result = run_gpu_check()
    assert result.returncode == 2
    assert result.stderr.startswith("gpu_check: no CUDA device is visible") and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_an_unknown_check_is_one_line_naming_the_valid_ones() -> None:
    result = run_gpu_check("--only", "defaults-bacon,nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown check 'nope'" in result.stderr and "defaults-bacon" in result.stderr


def test_list_names_every_cuda_path_the_issue_asks_for() -> None:
    result = run_gpu_check("--list")
    assert result.returncode == 0
    names = result.stdout.split()
    for method in ("bacon", "idm", "dm"):
        assert f"defaults-{method}" in names and f"fp32-sequential-{method}" in names
    assert {"resume", "compile", "evaluate", "bench"} <= set(names)
    assert {"two-processes", "cifar-shape", "channels-last", "zca", "eval-mode-M"} <= set(names)


def test_every_check_gets_one_line_and_any_failure_makes_the_exit_code_1(tmp_path: Path) -> None:
    def broken(context: gpu_check.Context) -> str:
        raise gpu_check.CheckFailed("BACON_mnist.py exited 1: boom")

    def harness_bug(context: gpu_check.Context) -> str:
        raise KeyError("precision")

    lines: list[str] = []
    context = gpu_check.Context(sys.executable, tmp_path, None, rehearsal=True, timeout_s=1)
    checks = {"fine": lambda context: "all good", "broken": broken, "harness": harness_bug}
    assert gpu_check.run_checks(checks, context, out=lines.append) == 1
    assert lines[0].startswith("ok") and "all good" in lines[0]
    assert lines[1].startswith("FAILED") and lines[1].endswith("BACON_mnist.py exited 1: boom")
    assert lines[2].startswith("FAILED") and "harness error KeyError" in lines[2]
    assert lines[3].startswith("1 of 3 checks passed or were skipped, in ")
    assert gpu_check.run_checks({"fine": lambda context: "ok"}, context, out=lines.append) == 0


def test_a_check_this_machine_cannot_run_says_why_and_checks_past_the_total_limit_fail(tmp_path: Path) -> None:
    def two_gpus(context: gpu_check.Context) -> str:
        raise gpu_check.CheckSkipped("needs 2 GPUs, 1 visible")

    lines: list[str] = []
    context = gpu_check.Context(sys.executable, tmp_path, None, rehearsal=True, timeout_s=1)
    assert gpu_check.run_checks({"two": two_gpus}, context, out=lines.append) == 0
    assert lines[0].startswith("skipped") and lines[0].endswith("needs 2 GPUs, 1 visible")
    context.total_s = 0
    assert gpu_check.run_checks({"late": lambda context: "ok"}, context, out=lines.append) == 1
    assert lines[2].startswith("FAILED") and "not run: the total limit of 0 s was reached" in lines[2]


def results(**changes: object) -> dict:
    record = {"device": "cuda:0", "precision": "bf16", "eval_stacked": True, "compiled": False,
              "result": {"model": "ConvNet", "mean": 61.5, "n": 2}}
    return {**record, **changes}


def test_a_run_must_have_used_the_path_it_checks_and_learned_something(tmp_path: Path) -> None:
    context = gpu_check.Context(sys.executable, tmp_path, None, rehearsal=False, timeout_s=1)
    assert "61.5 %" in gpu_check.expect_results(results(), context, "bf16", stacked=True)
    with pytest.raises(gpu_check.CheckFailed, match="precision fp32"):
        gpu_check.expect_results(results(precision="fp32"), context, "bf16", stacked=True)
    with pytest.raises(gpu_check.CheckFailed, match="device cpu"):
        gpu_check.expect_results(results(device="cpu"), context, "bf16", stacked=True)
    with pytest.raises(gpu_check.CheckFailed, match="not above chance"):
        gpu_check.expect_results(results(result={"model": "ConvNet", "mean": 9.0, "n": 2}), context, "bf16",
                                 stacked=True)


def test_the_last_output_line_is_the_reason() -> None:
    assert gpu_check.one_line("Traceback ...\n  File x\nRuntimeError: CUDA error\n\n") == "RuntimeError: CUDA error"
    assert gpu_check.one_line("") == "(no output)"
