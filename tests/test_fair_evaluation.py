"""evaluate.py --controls: a set scored against per-round random real controls and a cached teacher's
full-data accuracy, under one protocol whose fingerprint report.py respects."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import evaluate
import report
from data import DataOptions, get_dataset
from helpers import write_image_folder

TINY = ("--im_size", "16", "--num_eval", "2", "--epoch_eval_train", "1", "--batch_train", "8", "--device", "cpu",
        "--teacher_epochs", "0")


@pytest.fixture(scope="module")
def stored_set(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-per-class set of real training images saved as a run saves its sets."""
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    index = torch.cat([indices[:2] for indices in dataset.train.class_indices])
    path = tmp_path_factory.mktemp("set") / "set.pt"
    torch.save({"images": dataset.train.fetch(index), "labels": dataset.train.labels[index],
                "meta": {"dataset": "ImageFolder", "method": "bacon", "ipc": 2, "aug": False,
                         "mean": dataset.mean, "std": dataset.std}}, path)
    return path


def run(folder: Path, out: Path, name: str, *more: str) -> dict:
    return evaluate.evaluate([*more, "--data_path", str(folder), *TINY, "--save_path", str(out), "--run_name", name,
                              "--teacher_cache", str(out / "teachers")])


@pytest.fixture(scope="module")
def scored(image_folder: Path, stored_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fair")
    return out, run(image_folder, out, "soft", str(stored_set), "--label_mode", "stored", "--controls", "--ars")


def test_controls_give_every_score_per_round_in_fractions(scored) -> None:
    """Two rounds: the set, its hard-label twin, a random real control and both without augmentation
    per round; the scores are recomputed here from those accuracies and the teacher's."""
    _, results = scored
    fair = results["fair"]
    assert len(fair["set"]) == len(fair["set_hard"]) == len(fair["random_real"]) == 2
    assert len(fair["set_no_augmentation"]) == len(fair["random_real_no_augmentation"]) == 2
    assert fair["full_data_hard"] == pytest.approx(results["protocol"]["teacher"]["member_accuracies"][0])
    ior = [(s - r) / 100 for s, r in zip(fair["set"], fair["random_real"])]
    hlr = [(fair["full_data_hard"] - h) / 100 for h in fair["set_hard"]]
    assert fair["scores"]["ior"]["mean"] == pytest.approx(sum(ior) / 2)
    assert fair["scores"]["hlr"]["mean"] == pytest.approx(sum(hlr) / 2)
    assert all(0.0 <= fair["scores"][name]["mean"] <= 1.0 for name in ("lrs", "ars"))
    assert fair["ipc_matched"] == 2


def test_the_fingerprint_names_labels_teacher_and_augmentation(scored) -> None:
    _, results = scored
    protocol = results["protocol"]
    assert (protocol["label_mode"], protocol["soft_loss"], protocol["augmentation"]) == ("stored", "kl", "dsa")
    assert protocol["teacher"]["recipe"]["epochs"] == 0 and len(protocol["teacher"]["identity"]) == 16
    assert protocol["rounds"] == 2 and protocol["selection"]["rule"].startswith("none")
    assert len(protocol["id"]) == 16


def test_stored_soft_labels_are_saved_with_the_set_and_read_back(scored, image_folder: Path) -> None:
    """The teacher labels the training images once; the labelled set file carries them, and evaluating
    that file with stored labels needs no teacher at all."""
    out, _ = scored
    labelled = out / "soft" / "sets" / "labelled.pt"
    payload = torch.load(labelled, weights_only=True)
    assert payload["soft_labels"].shape == (6, 3) and payload["meta"]["soft_labels"] == "logits"
    again = run(image_folder, out, "reread", str(labelled), "--label_mode", "stored")
    assert again["protocol"]["teacher"] is None and again["protocol"]["label_mode"] == "stored"


def test_a_second_evaluation_reuses_the_cached_teacher(scored, image_folder: Path, stored_set: Path) -> None:
    out, first = scored
    cached = sorted((out / "teachers").glob("*.pt"))
    stamps = [path.stat().st_mtime_ns for path in cached]
    second = run(image_folder, out, "hard", str(stored_set), "--controls")
    assert [path.stat().st_mtime_ns for path in sorted((out / "teachers").glob("*.pt"))] == stamps
    assert second["protocol"]["teacher"]["identity"] == first["protocol"]["teacher"]["identity"]
    assert second["protocol"]["id"] != first["protocol"]["id"]  # hard labels: another protocol
    assert second["fair"]["set_hard"] == second["fair"]["set"]


def test_report_scores_each_evaluation_with_its_own_controls(scored, image_folder: Path, stored_set: Path,
                                                             tmp_path: Path) -> None:
    out, results = scored
    rows = report.report([str(out / "soft")], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    lrs = results["fair"]["scores"]["lrs"]
    assert f"{lrs['mean']:.4f} ± {lrs['std']:.4f}" in text and rows[0].labels == "stored"
    assert (tmp_path / "report" / "scores.png").stat().st_size > 0


def test_controls_of_another_protocol_are_never_matched(image_folder: Path, stored_set: Path, tmp_path: Path) -> None:
    """A set evaluated without augmentation is not scored against random real images and full data
    evaluated with DSA, although dataset, model and epochs agree."""
    run(image_folder, tmp_path, "set", str(stored_set), "--eval_aug", "none")
    run(image_folder, tmp_path, "random", "--dataset", "ImageFolder", "--random_real", "2")
    run(image_folder, tmp_path, "full", "--dataset", "ImageFolder", "--whole_train")
    rows = [report.row_from(path, {}) for path in sorted(tmp_path.glob("*/results.json"))]
    assert report.score_rows(rows) == []
    run(image_folder, tmp_path, "set_dsa", str(stored_set))
    rows = [report.row_from(path, {}) for path in sorted(tmp_path.glob("*/results.json"))]
    assert [row.run.endswith("set_dsa") for row in report.score_rows(rows)] == [True]


@pytest.mark.parametrize("flags, message", [
    (("--ars",), "--ars compares the set with its random controls; add --controls"),
    (("--controls", "--ars", "--eval_aug", "none"), "choose an --eval_aug other than none"),
    (("--select", "validation", "--lr_grid", "stored"), "--lr_grid stored needs a set that stores its learning rate"),
    (("--select", "validation", "--lr_grid", "0.1,fast"), "must be positive learning rates"),
    (("--label_mode", "stored", "--temperature", "0"), "--temperature must be positive"),
])
def test_contradictory_protocol_flags_are_one_line_errors(flags: tuple[str, ...], message: str, image_folder: Path,
                                                          stored_set: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code = evaluate.main([str(stored_set), *flags, "--data_path", str(image_folder), *TINY,
                          "--save_path", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1, error


def test_selection_records_its_choice_and_leaves_the_protocol_id_alone(image_folder: Path, stored_set: Path,
                                                                       tmp_path: Path) -> None:
    """With --select validation the learning rate and epoch are chosen per source on the validation
    split and recorded beside the fingerprint, whose id holds the rule, not the outcome."""
    results = run(image_folder, tmp_path, "sel", str(stored_set), "--select", "validation", "--lr_grid",
                  "0.003,0.03", "--val_fraction", "0.25")
    chosen = results["selected"]["bacon"]["ConvNet"]
    assert chosen["lr"] in (0.003, 0.03) and chosen["epoch"] in (0, 1)
    assert set(chosen["curves"]) == {"0.003", "0.03"}
    assert results["protocol"]["lr"] == "selected" and "lr" not in json.dumps(results["protocol"]["selection"]
                                                                              ).replace("lr_grid", "")


def test_report_pools_the_seeds_of_one_protocol(tmp_path: Path) -> None:
    """Two seeds under one protocol and teacher make one row of four rounds, scored again from all of
    them; their fingerprints differ only in the seed. (The folder has its own test/ split, so the
    seed does not change the data, and with it the teacher.)"""
    folder = write_image_folder(tmp_path / "data")
    shutil.copytree(folder / "train", folder / "test")
    dataset = get_dataset("ImageFolder", folder, DataOptions(im_size=16))
    index = torch.cat([indices[:2] for indices in dataset.train.class_indices])
    path = tmp_path / "set.pt"
    torch.save({"images": dataset.train.fetch(index), "labels": dataset.train.labels[index],
                "meta": {"dataset": "ImageFolder", "method": "dm", "ipc": 2, "aug": False}}, path)
    results = [run(folder, tmp_path / "out", f"seed{seed}", str(path), "--controls", "--seed", str(seed))
               for seed in (0, 1)]
    assert results[0]["protocol"]["id"] != results[1]["protocol"]["id"]
    rows = [report.row_from(tmp_path / "out" / f"seed{seed}" / "results.json", {}) for seed in (0, 1)]
    pooled = report.pool_seeds(report.score_rows(rows))
    assert len(pooled) == 1 and pooled[0].seeds == 2 and pooled[0].scores["lrs"]["rounds"] == 4
    lrs = [r["fair"]["scores"]["lrs"]["mean"] for r in results]
    assert pooled[0].scores["lrs"]["mean"] == pytest.approx(sum(lrs) / 2)  # equal rounds per seed
