"""DD-Ranking's scores, in fractions: the formulas against values worked by hand, their range, and the
scores table report.py builds from a set and its two controls."""

import math
from pathlib import Path

import pytest

import report
import scores
from scores import Round, summarize_scores
from test_report import fabricate_run


def test_the_normalised_exponential_maps_minus_one_to_one_onto_zero_to_one() -> None:
    assert scores.normalised_exp(-1.0) == 0.0 and scores.normalised_exp(1.0) == pytest.approx(1.0)
    assert scores.normalised_exp(0.0) == pytest.approx(1 / (1 + math.e))  # (1 - 1/e) / (e - 1/e)


def test_one_round_worked_by_hand() -> None:
    """full 0.90, set 0.60 (hard), random 0.40: HLR 0.30, IOR 0.20, a = 0.1 - 0.15 = -0.05,
    LRS = (e^-0.05 - e^-1) / (e - e^-1) = (0.951229 - 0.367879) / 2.350402 = 0.248192."""
    result = scores.round_scores(Round(0.60, 0.40, 0.60), full_hard=0.90)
    assert result["hlr"] == pytest.approx(0.30) and result["ior"] == pytest.approx(0.20)
    assert result["lrs"] == pytest.approx(0.248192, abs=1e-6)
    assert "ars" not in result  # no evaluation without augmentation in this round


def test_ars_weighs_the_improvement_with_and_without_augmentation_by_hand() -> None:
    """IOR with augmentation 0.25, without 0.10: b = 0.175, ARS = (e^0.175 - e^-1) / (e - e^-1) = 0.350309."""
    result = scores.round_scores(Round(0.65, 0.40, 0.65, set_no_aug=0.50, random_no_aug=0.40), full_hard=0.9)
    assert result["ars"] == pytest.approx(0.350309, abs=1e-6)


@pytest.mark.parametrize("full, set_, random", [(1.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 1.0, 0.0), (0.5, 0.5, 0.5)])
def test_scores_of_fractions_stay_in_zero_to_one(full: float, set_: float, random: float) -> None:
    result = scores.round_scores(Round(set_, random, set_, set_, random), full_hard=full)
    assert 0.0 <= result["lrs"] <= 1.0 and 0.0 <= result["ars"] <= 1.0


def test_percentages_are_refused_not_scored() -> None:
    with pytest.raises(ValueError, match="61.5 is not a fraction in \\[0, 1\\]; give percentages / 100"):
        scores.improvement_over_random(61.5, 0.4)


def test_rounds_give_a_mean_and_a_population_std() -> None:
    summary = summarize_scores([Round(0.6, 0.4, 0.6), Round(0.7, 0.4, 0.7)], full_hard=0.9)
    assert summary["ior"] == {"mean": pytest.approx(0.25), "std": pytest.approx(0.05), "rounds": 2}
    assert summary["hlr"]["mean"] == pytest.approx(0.25) and set(summary) == {"hlr", "ior", "lrs"}


def test_report_scores_a_set_against_controls_of_its_ipc_and_protocol(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fabricate_run(runs, "set", "bacon", [60.0, 70.0], reduced=True, curve=[])
    fabricate_run(runs, "random", "random_real", [40.0, 40.0], reduced=True, curve=[])
    fabricate_run(runs, "full", "whole_train", [90.0, 90.0], reduced=False, curve=[])  # its own epochs
    rows = report.report([str(runs)], tmp_path / "out")
    [scored] = report.score_rows(rows)
    assert (scored.method, scored.set_accuracy, scored.random_accuracy, scored.full_accuracy) == \
        ("bacon", 65.0, 40.0, 90.0)
    assert scored.scores["ior"]["mean"] == pytest.approx(0.25) and scored.scores["hlr"]["mean"] == pytest.approx(0.25)
    lrs = [scores.label_robust_score(0.2, 0.3), scores.label_robust_score(0.3, 0.2)]
    assert scored.scores["lrs"]["mean"] == pytest.approx(sum(lrs) / 2)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert ("| FashionMNIST | 10 | bacon | ConvNet | hard | 65.00 | 65.00 | 40.00 | 90.00 | 0.2500 ± 0.0500 |"
            in markdown)


def test_no_scores_without_a_random_control_under_the_same_protocol(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    fabricate_run(runs, "set", "bacon", [60.0], reduced=True, curve=[])
    fabricate_run(runs, "random", "random_real", [40.0], reduced=False, curve=[])  # 1000 eval epochs, not 30
    fabricate_run(runs, "full", "whole_train", [90.0], reduced=True, curve=[])
    assert report.score_rows(report.report([str(runs)], tmp_path / "out")) == []
    assert "| IOR |" not in (tmp_path / "out" / "report.md").read_text()
