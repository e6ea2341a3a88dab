"""Run outputs are replaced atomically and the run folder is never reused."""

from pathlib import Path

import pytest

from outputs import RunDirectory, atomic_write, atomic_write_text


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
