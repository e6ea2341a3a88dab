"""Gather results.json files into one table beside the paper's numbers, and plot accuracy curves.

    python report.py ../results/RUN_A ../results/RUN_B --out ../reports

writes ``report.md`` (also printed), ``report.csv`` and ``accuracy_vs_iteration.png``
(test accuracy against iteration, from each run's metrics.jsonl). A run made with
a reduced budget is marked "reduced" in every row: it is not the paper protocol.

Where the runs include the controls of a set (``evaluate.py --random_real IPC``
with the set's IPC, and ``evaluate.py --whole_train``) evaluated by the same
model for the same number of epochs, a second table scores the set against them
(IOR, HLR, LRS: scores.py, docs/fair_evaluation.md).
"""

from __future__ import annotations

import argparse
import csv
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
from scores import Round, summarize_scores  # noqa: E402

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

    def same_protocol(self, other: "Row") -> bool:
        """Evaluated on the same data by the same model for the same epochs (what makes two rows comparable)."""
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
    set_accuracy: float
    random_accuracy: float
    full_accuracy: float
    scores: dict[str, dict[str, float]]
    run: str


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
        return Row(dataset=results["dataset"], ipc=results["ipc"], method=results["method"], model=result["model"],
                   mean=result["mean"], std=result["std"], nets=result["n"], iterations=results["iterations"],
                   eval_epochs=results["epoch_eval_train"], budget=budget_label(results), paper=paper,
                   difference=None if paper is None else result["mean"] - paper, run=str(path.parent),
                   accuracies=list(results["final"][result["model"]]["accuracies"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a results.json written by this project ({type(error).__name__}: {error})")


def sort_key(row: Row) -> tuple:
    method_rank = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
    return row.dataset, row.ipc, method_rank, row.run


def markdown_table(rows: list[Row]) -> str:
    lines = ["| dataset | IPC | method | model | accuracy (%) | nets | iterations | eval epochs | budget "
             "| paper (%) | difference |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "–" if r.paper is None else f"{r.paper:.2f}"
        difference = "–" if r.difference is None else f"{r.difference:+.2f}"
        lines.append(f"| {r.dataset} | {r.ipc} | {r.method} | {r.model} | {r.mean:.2f} ± {r.std:.2f} | {r.nets} "
                     f"| {r.iterations} | {r.eval_epochs} | {r.budget} | {paper} | {difference} |")
    notes = ("\nEval epochs are the reference's `epoch_eval_train` (each network trains that many + 1). "
             "\"reduced\": fewer iterations, networks, epochs or smaller batches than the paper protocol, "
             "so the difference to the paper is not a reproduction result.")
    return "\n".join(lines) + "\n" + notes + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        fields = [name for name in asdict(rows[0]) if name != "accuracies"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def score_rows(rows: list[Row]) -> list[ScoreRow]:
    """Every set row that has both controls, scored against them. The random control must have the
    set's protocol and IPC (stored images per class: a mosaic set's decoded images are not
    counted); the full-data control the set's dataset and model, trained for its own epochs (the
    whole training set needs far fewer than a set of a few images). The first matching control in
    the table's order is used. Round k pairs the k-th evaluation network of the set with the k-th
    of its random control; the full-data accuracy is the mean of its networks. These results are
    hard-label evaluations, so the set's hard accuracy is its accuracy."""
    scored = []
    for row in rows:
        if row.method in CONTROLS:
            continue
        random = next((r for r in rows if r.method == "random_real" and r.ipc == row.ipc and r.same_protocol(row)),
                      None)
        full = next((r for r in rows if r.method == "whole_train" and r.same_model(row)), None)
        if random is None or full is None:
            continue
        rounds = [Round(a / 100, b / 100, a / 100) for a, b in zip(row.accuracies, random.accuracies)]
        scored.append(ScoreRow(row.dataset, row.ipc, row.method, row.model, row.mean, random.mean, full.mean,
                               summarize_scores(rounds, full.mean / 100), row.run))
    return scored


def scores_table(rows: list[ScoreRow]) -> str:
    lines = ["| dataset | IPC | method | model | set (%) | random real (%) | full data (%) | IOR | HLR | LRS "
             "| rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spreads = " | ".join(f"{r.scores[name]['mean']:.4f} ± {r.scores[name]['std']:.4f}"
                             for name in ("ior", "hlr", "lrs"))
        lines.append(f"| {r.dataset} | {r.ipc} | {r.method} | {r.model} | {r.set_accuracy:.2f} | "
                     f"{r.random_accuracy:.2f} | {r.full_accuracy:.2f} | {spreads} | {r.scores['lrs']['rounds']} |")
    notes = ("\nScores are fractions (hard labels): IOR = set - random real, HLR = full data - set, "
             "LRS = (e^a - e^-1) / (e - e^-1) with a = (IOR - HLR) / 2 (docs/fair_evaluation.md).")
    return "\n".join(lines) + "\n" + notes + "\n"


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
    scored = score_rows(rows)
    if scored:
        text += "\n" + scores_table(scored)
    (out / "report.md").write_text(text)
    write_csv(rows, out / "report.csv")
    plotted = plot_curves(rows, out / "accuracy_vs_iteration.png")
    print(text, end="")
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}"
          + (f", {out / 'accuracy_vs_iteration.png'}" if plotted else ""))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--out", default=".", help="directory for report.md, report.csv and the plot")
    args = parser.parse_args(argv)
    return exit_code_of("report.py", lambda: report(args.runs, Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
