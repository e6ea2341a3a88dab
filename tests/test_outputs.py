"""Run outputs are replaced atomically, the run folder is never reused, and a read-only run
directory (every process but the first under torchrun) writes nothing."""

import inspect
from pathlib import Path

import pytest
import torch

from outputs import RunDirectory, atomic_write


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "previous")

    def failing_writer(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, failing_writer)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_files_follow_the_umask_not_a_private_mode(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert (tmp_path / "config.yaml").stat().st_mode & 0o044 == 0o044


def test_an_existing_run_name_gets_a_new_folder(tmp_path: Path) -> None:
    first = RunDirectory.create(tmp_path, "run")
    second = RunDirectory.create(tmp_path, "run")
    assert first.path.name == "run" and second.path.name == "run_2"


def every_public_call(run_dir: RunDirectory) -> dict[str, object]:
    """One call of each public method of a run directory, with arguments of the right kind."""
    images = torch.zeros(2, 1, 4, 4)
    return {
        "write_config": lambda: run_dir.write_config({"ipc": 1}),
        "remove_partial_writes": run_dir.remove_partial_writes,
        "metrics_size": run_dir.metrics_size,
        "truncate_metrics": lambda: run_dir.truncate_metrics(0),
        "append_metrics": lambda: run_dir.append_metrics({"event": "train"}),
        "save_set": lambda: run_dir.save_set("s", images, torch.zeros(2), {}),
        "save_grid": lambda: run_dir.save_grid("s", images, nrow=2),
        "write_results": lambda: run_dir.write_results({"final": {}}),
        "write_checkpoint": lambda: run_dir.write_checkpoint({"format": 3}, "checkpoint.pt", "checkpoint.prev.pt"),
    }


def test_a_read_only_run_directory_leaves_the_disk_as_it_is(tmp_path: Path) -> None:
    """Every public method is called (a new one must be added here, or the test fails), and the
    folder, with a metrics file and a partial write in it, is byte for byte what it was."""
    public = {name for name, member in inspect.getmembers(RunDirectory)
              if not name.startswith("_") and callable(member) and name not in ("create", "restart")}
    (tmp_path / "metrics.jsonl").write_text('{"event": "train"}\n')
    (tmp_path / ".results.json.1.tmp").write_text("partial")
    before = {path: path.read_bytes() for path in tmp_path.rglob("*")}
    calls = every_public_call(RunDirectory(tmp_path, writes=False))
    assert set(calls) == public
    for call in calls.values():
        call()
    assert {path: path.read_bytes() for path in tmp_path.rglob("*")} == before
    writable = every_public_call(RunDirectory(tmp_path))
    for call in writable.values():
        call()
    assert {path.name for path in tmp_path.rglob("*")} >= {"config.yaml", "s.pt", "s.png", "results.json",
                                                           "checkpoint.pt"}
