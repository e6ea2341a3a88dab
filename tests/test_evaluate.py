"""evaluate.py: saved sets, foreign files, random real images, and clear errors for bad files."""

import json
from pathlib import Path

import pytest
import torch

import evaluate
from data import DataOptions, get_dataset
from helpers import run_script


@pytest.fixture(scope="module")
def folder_stats(image_folder: Path) -> tuple[list[float], list[float]]:
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    return dataset.mean, dataset.std


def save_set(path: Path, images: torch.Tensor, labels: torch.Tensor, **meta: object) -> Path:
    torch.save({"images": images, "labels": labels, "meta": meta}, path)
    return path


def our_set(tmp_path: Path, stats: tuple[list[float], list[float]], aug: bool = False) -> Path:
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3).repeat_interleave(2)
    return save_set(tmp_path / "set.pt", images, labels, dataset="ImageFolder", method="bacon", ipc=2, aug=aug,
                    mean=stats[0], std=stats[1], iteration=40, iterations=40, reduced_budget=True)


def evaluate_args(folder: Path, tmp_path: Path, *more: str) -> list[str]:
    return [*more, "--data_path", str(folder), "--im_size", "16", "--num_eval", "2", "--epoch_eval_train", "1",
            "--batch_train", "8", "--device", "cpu", "--save_path", str(tmp_path / "evals"), "--run_name", "ev"]


def test_a_saved_set_gets_the_results_schema_of_a_run(image_folder: Path, tmp_path: Path, folder_stats) -> None:
    results = evaluate.evaluate(evaluate_args(image_folder, tmp_path, str(our_set(tmp_path, folder_stats))))
    written = json.loads((tmp_path / "evals" / "ev" / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    run_keys = {"method", "dataset", "model", "ipc", "aug", "seed", "device", "iterations", "epoch_eval_train",
                "num_exp", "num_eval", "eval_mode", "reduced_budget", "departures_from_published", "result",
                "final", "init", "best_on_test", "run_dir", "seconds"}
    assert run_keys <= set(written)
    assert (written["method"], written["ipc"], written["iterations"], written["reduced_budget"]) == ("bacon", 2, 40, True)
    assert written["final"]["ConvNet"]["n"] == 2


def test_mosaic_sets_are_decoded(image_folder: Path, tmp_path: Path, folder_stats,
                                 capsys: pytest.CaptureFixture) -> None:
    evaluate.evaluate(evaluate_args(image_folder, tmp_path, str(our_set(tmp_path, folder_stats, aug=True))))
    assert "(24 training images)" in capsys.readouterr().out


def test_a_reference_results_file_and_a_plain_pair(image_folder: Path, tmp_path: Path) -> None:
    images, labels = torch.randn(3, 3, 16, 16), torch.arange(3)
    torch.save({"data": [[images, labels], [images + 1, labels]], "accs_all_exps": {"ConvNet": [0.5]}},
               tmp_path / "res.pt")
    torch.save((images, labels), tmp_path / "pair.pt")
    for name, extra in (("res.pt", ["--experiment", "1"]), ("pair.pt", [])):
        results = evaluate.evaluate(evaluate_args(image_folder, tmp_path, str(tmp_path / name), "--dataset",
                                                  "ImageFolder", "--run_name", name, *extra))
        assert results["final"]["ConvNet"]["n"] == 2


def test_random_real_sets_are_seeded(image_folder: Path) -> None:
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    train = dataset.train
    first, again = evaluate.random_real_set(dataset, 3, 0, train), evaluate.random_real_set(dataset, 3, 0, train)
    other = evaluate.random_real_set(dataset, 3, 1, train)
    assert torch.equal(first.images, again.images) and not torch.equal(first.images, other.images)
    assert first.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_random_real_evaluates_through_the_command_line(image_folder: Path, tmp_path: Path) -> None:
    code = evaluate.main(evaluate_args(image_folder, tmp_path, "--dataset", "ImageFolder", "--random_real", "2"))
    results = json.loads((tmp_path / "evals" / "ev" / "results.json").read_text())
    assert code == 0 and results["method"] == "random_real" and results["ipc"] == 2


def bad_file_message(tmp_path: Path, folder: Path, path: Path, capsys: pytest.CaptureFixture, *more: str) -> str:
    code = evaluate.main(evaluate_args(folder, tmp_path, str(path), *more))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "evals" / "ev" / "results.json").exists()
    return err


class NotATensor:
    pass


@pytest.mark.parametrize("make, message", [
    (lambda s: (torch.randn(6, 16, 16), torch.arange(3).repeat_interleave(2)), "must be a float tensor [N, C, H, W]"),
    (lambda s: (torch.randn(6, 1, 16, 16), torch.arange(3).repeat_interleave(2)), "have 1 channels but ImageFolder has 3"),
    (lambda s: (torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2)), "are 8x8 but ImageFolder images are 16x16"),
    (lambda s: (torch.randn(6, 3, 16, 16), torch.arange(6)), "labels cover 6 classes (0..5) but ImageFolder has 3"),
    (lambda s: (torch.randn(6, 3, 16, 16), torch.arange(3).repeat_interleave(2).float()), "labels must be an integer"),
])
def test_mismatched_sets_are_refused(make, message: str, image_folder: Path, tmp_path: Path, folder_stats,
                                     capsys: pytest.CaptureFixture) -> None:
    images, labels = make(folder_stats)
    path = save_set(tmp_path / "bad.pt", images, labels, dataset="ImageFolder", mean=folder_stats[0],
                    std=folder_stats[1])
    assert message in bad_file_message(tmp_path, image_folder, path, capsys)


def test_a_set_normalised_for_other_data_is_refused(image_folder: Path, tmp_path: Path, folder_stats,
                                                    capsys: pytest.CaptureFixture) -> None:
    path = save_set(tmp_path / "bad.pt", torch.randn(6, 3, 16, 16), torch.arange(3).repeat_interleave(2),
                    dataset="ImageFolder", mean=[0.5, 0.5, 0.5], std=folder_stats[1])
    assert "was normalised with mean [0.5, 0.5, 0.5]" in bad_file_message(tmp_path, image_folder, path, capsys)


def test_files_that_are_not_plain_tensors_are_refused_without_running_them(image_folder: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    torch.save({"images": NotATensor(), "labels": torch.arange(3)}, tmp_path / "object.pt")
    (tmp_path / "text.pt").write_text("not a tensor file")
    torch.save({"weights": torch.randn(3)}, tmp_path / "other.pt")
    for name, message in (("object.pt", "is not a file of plain tensors that can be loaded safely"),
                          ("text.pt", "is not a file of plain tensors"),
                          ("other.pt", "expected a dict with 'images' and 'labels'"),
                          ("missing.pt", "no such file"),
                          (".", "is a directory; pass one set file")):
        assert message in bad_file_message(tmp_path, image_folder, tmp_path / name, capsys, "--dataset", "ImageFolder")


def test_exactly_one_source_is_required(capsys: pytest.CaptureFixture) -> None:
    assert evaluate.main(["--dataset", "MNIST"]) == 2
    assert "give exactly one of" in capsys.readouterr().err


def test_the_script_runs_as_a_process(image_folder: Path, tmp_path: Path, folder_stats) -> None:
    result = run_script("evaluate.py", *evaluate_args(image_folder, tmp_path, str(our_set(tmp_path, folder_stats))))
    assert result.returncode == 0, result.stderr
    assert "bacon: ConvNet" in result.stdout
