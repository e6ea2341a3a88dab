"""Gather results.json files into one table beside the paper's numbers, and plot accuracy curves.

    python report.py ../results/RUN_A ../results/RUN_B --out ../reports

writes ``report.md`` (also printed), ``report.csv`` and ``accuracy_vs_iteration.png``
(test accuracy against iteration, from each run's metrics.jsonl). A run made with
a reduced budget is marked "reduced" in every row: it is not the paper protocol.

A second table scores sets against their controls (IOR, HLR, LRS, ARS:
scores.py, docs/fair_evaluation.md), drawn in ``scores.png``: the scores an
``evaluate.py --controls`` evaluation computed itself, and, for sets evaluated
alone, the controls found among the runs (``evaluate.py --random_real IPC``
with the set's IPC and protocol fingerprint, and ``evaluate.py --whole_train``).
Results whose protocol fingerprints differ are never scored against each other.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import yaml  # noqa: E402

from errors import ConfigError, DataError, exit_code_of  # noqa: E402
from scores import Round, normalised_exp, summarize_scores  # noqa: E402

PAPER_RESULTS = Path(__file__).resolve().parent / "configs" / "paper_results.yaml"
METHOD_ORDER = ("bacon", "idm", "dm", "random_real", "whole_train")
CONTROLS = ("random_real", "whole_train")


@dataclass
class Row:
    """One run's headline number and the budget that produced it."""

    dataset: str
    ipc: int
    method: str
    model: str
    mean: float
    std: float
    nets: int
    iterations: int
    eval_epochs: int
    budget: str
    paper: float | None
    difference: float | None
    run: str
    accuracies: list[float] = field(default_factory=list)  # each evaluation network's, in percent
    labels: str = "hard"  # the label mode of the evaluation
    augmentation: str = "dsa"
    protocol_id: str | None = None  # the fingerprint's hash (None: results from before fingerprints)
    setting: str | None = None  # a hash of the fingerprint less its seed: what seeds of one protocol share
    fair: dict[str, Any] | None = None  # the scores an evaluate.py --controls run computed

    def same_protocol(self, other: "Row") -> bool:
        """Evaluated under the same protocol fingerprint (what makes two rows comparable); results
        without one: on the same data by the same model for the same epochs, hard labels with DSA."""
        if self.protocol_id is not None or other.protocol_id is not None:
            return self.protocol_id == other.protocol_id
        return (self.dataset, self.model, self.eval_epochs) == (other.dataset, other.model, other.eval_epochs)

    def same_model(self, other: "Row") -> bool:
        return (self.dataset, self.model) == (other.dataset, other.model)


@dataclass
class ScoreRow:
    """A set scored against its controls: accuracies in percent, scores as fractions (mean, std)."""

    dataset: str
    ipc: int
    method: str
    model: str
    labels: str
    set_accuracy: float
    set_hard: float
    random_accuracy: float
    full_accuracy: float
    scores: dict[str, dict[str, float]]
    run: str
    rounds: list[Round] = field(default_factory=list)
    setting: str | None = None
    seeds: int = 1


def find_results(paths: Sequence[str]) -> list[Path]:
    """results.json files named directly or found under the given directories."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob("results.json")))
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not found:
        raise DataError(f"no results.json under {', '.join(paths)}; give run directories or results.json files")
    return found


def paper_number(table: dict[str, Any], method: str, dataset: str, ipc: int) -> float | None:
    return table.get(method, {}).get(dataset, {}).get(ipc)


def budget_label(results: dict[str, Any]) -> str:
    if results["reduced_budget"]:
        return "reduced"
    return "modified" if results["departures_from_published"] else "published"


def row_from(path: Path, table: dict[str, Any]) -> Row:
    try:
        results = json.loads(path.read_text())
        result = results["result"]
        paper = paper_number(table, results["method"], results["dataset"], results["ipc"])
        protocol = results.get("protocol") or {}
        return Row(dataset=results["dataset"], ipc=results["ipc"], method=results["method"], model=result["model"],
                   mean=result["mean"], std=result["std"], nets=result["n"], iterations=results["iterations"],
                   eval_epochs=results["epoch_eval_train"], budget=budget_label(results), paper=paper,
                   difference=None if paper is None else result["mean"] - paper, run=str(path.parent),
                   accuracies=list(results["final"][result["model"]]["accuracies"]),
                   labels=protocol.get("label_mode", "hard"), augmentation=protocol.get("augmentation", "dsa"),
                   protocol_id=protocol.get("id"), setting=setting_of(protocol), fair=results.get("fair"))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a results.json written by this project ({type(error).__name__}: {error})")


def setting_of(protocol: dict[str, Any]) -> str | None:
    """A hash of the fingerprint without its seed (and id): equal for the seeds of one protocol."""
    if not protocol:
        return None
    rest = {name: value for name, value in protocol.items() if name not in ("seed", "id")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sort_key(row: Row) -> tuple:
    method_rank = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
    return row.dataset, row.ipc, method_rank, row.run


def markdown_table(rows: list[Row]) -> str:
    lines = ["| dataset | IPC | method | model | labels | augmentation | accuracy (%) | nets | iterations "
             "| eval epochs | budget | paper (%) | difference | protocol |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "–" if r.paper is None else f"{r.paper:.2f}"
        difference = "–" if r.difference is None else f"{r.difference:+.2f}"
        lines.append(f"| {r.dataset} | {r.ipc} | {r.method} | {r.model} | {r.labels} | {r.augmentation} "
                     f"| {r.mean:.2f} ± {r.std:.2f} | {r.nets} | {r.iterations} | {r.eval_epochs} | {r.budget} "
                     f"| {paper} | {difference} | {(r.protocol_id or '–')[:8]} |")
    notes = ("\nProtocol: the first digits of the evaluation's fingerprint (results.json \"protocol\"); "
             "rows with different ones were evaluated differently. "
             "Eval epochs are the reference's `epoch_eval_train` (each network trains that many + 1). "
             "\"reduced\": fewer iterations, networks, epochs or smaller batches than the paper protocol, "
             "so the difference to the paper is not a reproduction result.")
    return "\n".join(lines) + "\n" + notes + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        fields = [name for name in asdict(rows[0]) if name not in ("accuracies", "fair")]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def own_scores(row: Row) -> ScoreRow:
    """The scores an ``evaluate.py --controls`` run computed with its own controls."""
    fair = row.fair
    no_aug = (zip(fair["set_no_augmentation"], fair["random_real_no_augmentation"])
              if fair["set_no_augmentation"] is not None else [()] * len(fair["set"]))
    rounds = [Round(s / 100, r / 100, h / 100, *(v / 100 for v in pair))
              for s, r, h, pair in zip(fair["set"], fair["random_real"], fair["set_hard"], no_aug)]
    return ScoreRow(row.dataset, row.ipc, row.method, fair["model"], row.labels, _mean(fair["set"]),
                    _mean(fair["set_hard"]), _mean(fair["random_real"]), fair["full_data_hard"], fair["scores"],
                    row.run, rounds, row.setting)


def pool_seeds(scored: list[ScoreRow]) -> list[ScoreRow]:
    """Score rows that differ only in their seed, merged: their rounds pooled and scored again, the
    accuracies averaged over all rounds. Rows of other protocols, teachers or full-data accuracies
    stay apart."""
    groups: dict[tuple, list[ScoreRow]] = {}
    for row in scored:
        key = (row.dataset, row.ipc, row.method, row.model, row.labels, row.setting or row.run, row.full_accuracy)
        groups.setdefault(key, []).append(row)
    pooled = []
    for rows in groups.values():
        rounds = [r for row in rows for r in row.rounds]
        first = rows[0]
        pooled.append(ScoreRow(first.dataset, first.ipc, first.method, first.model, first.labels,
                               100 * _mean([r.set_accuracy for r in rounds]), 100 * _mean([r.set_hard for r in rounds]),
                               100 * _mean([r.random_accuracy for r in rounds]), first.full_accuracy,
                               summarize_scores(rounds, first.full_accuracy / 100),
                               ", ".join(row.run for row in rows), rounds, first.setting, len(rows)))
    return pooled


def score_rows(rows: list[Row]) -> list[ScoreRow]:
    """Every set row scored: by its own controls where it has them (``own_scores``), else against
    controls among the rows. The random control must have the set's protocol fingerprint and IPC
    (stored images per class: a mosaic set's decoded images are not counted); the full-data
    control the set's dataset and model, trained for its own epochs (the whole training set needs
    far fewer than a set of a few images). The first matching control in the table's order is
    used. Round k pairs the k-th evaluation network of the set with the k-th of its random
    control; the full-data accuracy is the mean of its networks. Matched this way only hard-label
    evaluations are scored, so the set's hard accuracy is its accuracy."""
    scored = []
    for row in rows:
        if row.method in CONTROLS:
            continue
        if row.fair is not None:
            scored.append(own_scores(row))
            continue
        if row.labels != "hard":
            continue
        random = next((r for r in rows if r.method == "random_real" and r.ipc == row.ipc and r.same_protocol(row)),
                      None)
        full = next((r for r in rows if r.method == "whole_train" and r.same_model(row)), None)
        if random is None or full is None:
            continue
        rounds = [Round(a / 100, b / 100, a / 100) for a, b in zip(row.accuracies, random.accuracies)]
        scored.append(ScoreRow(row.dataset, row.ipc, row.method, row.model, row.labels, row.mean, row.mean,
                               random.mean, full.mean, summarize_scores(rounds, full.mean / 100), row.run, rounds,
                               None))
    return scored


def _spread(scores: dict[str, dict[str, float]], name: str) -> str:
    return f"{scores[name]['mean']:.4f} ± {scores[name]['std']:.4f}" if name in scores else "–"


def scores_table(rows: list[ScoreRow]) -> str:
    lines = ["| dataset | IPC | method | model | labels | set (%) | set, hard (%) | random real (%) "
             "| full data (%) | IOR | HLR | LRS | ARS | rounds | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spreads = " | ".join(_spread(r.scores, name) for name in ("ior", "hlr", "lrs", "ars"))
        lines.append(f"| {r.dataset} | {r.ipc} | {r.method} | {r.model} | {r.labels} | {r.set_accuracy:.2f} "
                     f"| {r.set_hard:.2f} | {r.random_accuracy:.2f} | {r.full_accuracy:.2f} | {spreads} "
                     f"| {r.scores['lrs']['rounds']} | {r.seeds} |")
    notes = ("\nEvaluations that differ only in their seed are pooled (seeds): their rounds together. "
             "Accuracies are means over rounds; scores are fractions, mean ± std over rounds: IOR = set - "
             "random real (same labels and augmentation), HLR = full data - set (hard labels), "
             "LRS = N((IOR - HLR) / 2), ARS = N((IOR with augmentation + IOR without) / 2), "
             "N(a) = (e^a - e^-1) / (e - e^-1) (docs/fair_evaluation.md).")
    return "\n".join(lines) + "\n" + notes + "\n"


def plot_scores(rows: list[ScoreRow], path: Path) -> bool:
    """LRS and ARS (mean, std over rounds) per set, one group of bars per dataset and IPC."""
    if not rows:
        return False
    names = [name for name in ("lrs", "ars") if any(name in r.scores for r in rows)]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * len(names) + 2), 4.5))
    width = 0.8 / len(names)
    for offset, name in enumerate(names):
        values = [r.scores.get(name, {"mean": 0.0, "std": 0.0}) for r in rows]
        axes.bar([i + offset * width for i in range(len(rows))], [v["mean"] for v in values], width,
                 yerr=[v["std"] for v in values], capsize=3, label=name.upper())
    axes.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(rows))])
    axes.set_xticklabels([f"{r.method}\n{r.dataset} IPC {r.ipc}\n{r.labels}" for r in rows], fontsize=8)
    axes.axhline(normalised_exp(0.0), color="grey", linewidth=0.8, linestyle="--")
    axes.set_ylabel("score (0-1; dashed: IOR = HLR)")
    axes.set_ylim(0.0, 1.0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def accuracy_curve(run_dir: Path, model: str) -> tuple[list[int], list[float]]:
    """Mean test accuracy of ``model`` at each evaluated iteration, averaged over experiments."""
    by_iteration: dict[int, list[float]] = {}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return [], []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval" and model in record.get("summary", {}):
            by_iteration.setdefault(record["iteration"], []).append(record["summary"][model]["mean"])
    iterations = sorted(by_iteration)
    return iterations, [sum(by_iteration[i]) / len(by_iteration[i]) for i in iterations]


def plot_curves(rows: list[Row], path: Path) -> bool:
    """One line per run that logged more than one evaluation; False when there is nothing to draw."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for row in rows:
        iterations, accuracies = accuracy_curve(Path(row.run), row.model)
        if len(iterations) > 1:
            label = f"{row.method} {row.dataset} IPC {row.ipc}" + (" (reduced budget)" if row.budget == "reduced" else "")
            axes.plot(iterations, accuracies, marker="o", label=label)
            drawn += 1
    if drawn:
        axes.set_xlabel("distillation iteration")
        axes.set_ylabel("test accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    plt.close(figure)
    return bool(drawn)


def report(paths: Sequence[str], out: Path) -> list[Row]:
    table = yaml.safe_load(PAPER_RESULTS.read_text())
    rows = sorted((row_from(path, table) for path in find_results(paths)), key=sort_key)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows)
    scored = pool_seeds(score_rows(rows))
    if scored:
        text += "\n" + scores_table(scored)
    (out / "report.md").write_text(text)
    write_csv(rows, out / "report.csv")
    drawn = {"accuracy_vs_iteration.png": plot_curves(rows, out / "accuracy_vs_iteration.png"),
             "scores.png": plot_scores(scored, out / "scores.png")}
    plots = [name for name, done in drawn.items() if done]
    print(text, end="")
    print(f"wrote {', '.join(str(out / name) for name in ['report.md', 'report.csv', *plots])}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--out", default=".", help="directory for report.md, report.csv and the plot")
    args = parser.parse_args(argv)
    return exit_code_of("report.py", lambda: report(args.runs, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
