"""report.py: rows beside the paper's numbers, reduced budgets marked, accuracy curves drawn."""

import csv
import json
from pathlib import Path

import pytest
import yaml

import report
from helpers import CODE_DIR

PAPER = yaml.safe_load((CODE_DIR / "configs" / "paper_results.yaml").read_text())


def fabricate_run(root: Path, name: str, method: str, accuracies: list[float], reduced: bool,
                  curve: list[tuple[int, float]]) -> Path:
    """A results.json and metrics.jsonl as a FashionMNIST IPC-10 run would write them."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    mean = sum(accuracies) / len(accuracies)
    std = (sum((a - mean) ** 2 for a in accuracies) / len(accuracies)) ** 0.5
    stats = {"mean": mean, "std": std, "n": len(accuracies)}
    results = {"method": method, "dataset": "FashionMNIST", "model": "ConvNet", "ipc": 10, "aug": True, "seed": 0,
               "device": "cpu", "iterations": 100 if reduced else 20000, "epoch_eval_train": 30 if reduced else 1000,
               "num_exp": 1, "num_eval": len(accuracies), "eval_mode": "S", "reduced_budget": reduced,
               "departures_from_published": {"Iteration": {"used": 100, "published": 20000}} if reduced else {},
               "result": {"model": "ConvNet", **stats}, "final": {"ConvNet": {**stats, "accuracies": accuracies}},
               "init": None, "best_on_test": None, "run_dir": str(run_dir), "seconds": 1.0}
    (run_dir / "results.json").write_text(json.dumps(results))
    records = [{"event": "eval", "experiment": 0, "iteration": it, "summary": {"ConvNet": {"mean": acc}}}
               for it, acc in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_rows_sit_beside_the_paper_numbers_and_reduced_runs_are_marked(tmp_path: Path) -> None:
    bacon_accs, idm_accs = [80.0, 82.0], [79.0, 80.5, 81.0]
    fabricate_run(tmp_path / "runs", "b", "bacon", bacon_accs, reduced=True, curve=[(0, 70.0), (50, 78.0), (100, 81.0)])
    fabricate_run(tmp_path / "runs", "i", "idm", idm_accs, reduced=False, curve=[(100, 80.0)])
    rows = report.report([str(tmp_path / "runs")], tmp_path / "out")

    with open(tmp_path / "out" / "report.csv") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    for method, accs, budget in (("bacon", bacon_accs, "reduced"), ("idm", idm_accs, "published")):
        mean = sum(accs) / len(accs)
        paper = PAPER[method]["FashionMNIST"][10]
        row = table[method]
        assert float(row["mean"]) == pytest.approx(mean)
        assert int(row["nets"]) == len(accs) and row["budget"] == budget
        assert float(row["paper"]) == pytest.approx(paper)
        assert float(row["difference"]) == pytest.approx(mean - paper)
    assert [row.method for row in rows] == ["bacon", "idm"]

    markdown = (tmp_path / "out" / "report.md").read_text()
    bacon_mean = sum(bacon_accs) / 2
    bacon_std = (sum((a - bacon_mean) ** 2 for a in bacon_accs) / 2) ** 0.5
    expected = (f"| FashionMNIST | 10 | bacon | ConvNet | hard | dsa | {bacon_mean:.2f} ± {bacon_std:.2f} | 2 "
                f"| 100 | 30 | reduced | {PAPER['bacon']['FashionMNIST'][10]:.2f} "
                f"| {bacon_mean - PAPER['bacon']['FashionMNIST'][10]:+.2f} | – |")
    assert expected in markdown.splitlines()
    assert (tmp_path / "out" / "accuracy_vs_iteration.png").stat().st_size > 0


def test_curves_average_the_experiments_per_iteration(tmp_path: Path) -> None:
    run_dir = fabricate_run(tmp_path, "r", "bacon", [80.0], reduced=True, curve=[(0, 70.0), (0, 72.0), (50, 78.0)])
    assert report.accuracy_curve(run_dir, "ConvNet") == ([0, 50], [71.0, 78.0])


def test_no_paper_number_for_baselines_outside_the_table(tmp_path: Path) -> None:
    fabricate_run(tmp_path / "runs", "r", "random_real", [70.0, 71.0], reduced=True, curve=[])
    [row] = report.report([str(tmp_path / "runs")], tmp_path / "out")
    assert row.paper is None and row.difference is None


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(tmp_path / "nowhere")]) == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{}")
    assert report.main([str(tmp_path / "broken"), "--out", str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "no such file or directory" in errors[0] and "is not a results.json written by this project" in errors[1]
