"""What a run watches while it distils: loss sums for the metric records, and non-finite values.

Both stay on the device between log points, so the hot loop never waits for
the host: per-class loss terms are summed as tensors and read once per
record, and the NaN/inf watch keeps the first bad (iteration, class, term) in
a device tensor that is read only where the run could stop.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from distributed import World
from errors import NonFiniteError


class LossLog:
    """Sums of per-class loss terms on the device since the last record; read at log points only.

    Each process sums the terms of its own classes; a record adds up every
    process's sums (a collective call) and averages them per image-optimiser
    step, a step updating ``classes_per_step`` classes (1 for the pool
    methods' class steps, every class for DM's one step per iteration).
    """

    def __init__(self, world: World, classes_per_step: int = 1) -> None:
        self.world, self.classes_per_step = world, classes_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.classes = 0  # class terms added since the last record
        self.iterations = 0
        self.started = time.perf_counter()

    def add(self, per_class: dict[str, torch.Tensor]) -> None:
        """Terms of a chunk of classes, one value per class."""
        for name, values in per_class.items():
            total = values.detach().float().sum()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.classes += len(next(iter(per_class.values())))

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside image updates and pool training (evaluation) out of s/iteration."""
        self.started += seconds

    def _totals(self) -> tuple[dict[str, float], int]:
        """Every process's sums and class counts added up (one collective)."""
        totals: dict[str, float] = {}
        classes = 0
        for sums, count in self.world.gather_objects(({n: t.item() for n, t in self.sums.items()}, self.classes)):
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
            classes += count
        return totals, classes

    def state_dict(self) -> dict[str, Any]:
        """The sums of every process (a collective call); a resumed run puts them on its first process."""
        totals, classes = self._totals()
        return {"sums": {name: torch.tensor(value) for name, value in totals.items()}, "classes": classes,
                "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        mine = self.world.is_main
        self.sums = {name: total.to(device) for name, total in state["sums"].items()} if mine else {}
        self.classes, self.iterations = state["classes"] if mine else 0, state["iterations"]

    def record(self) -> dict[str, float]:
        """Per-step averages over every process and seconds per iteration; resets the log."""
        totals, classes = self._totals()
        steps = classes / self.classes_per_step
        averages = {name: total / steps for name, total in totals.items()}
        averages["s_per_iteration"] = (time.perf_counter() - self.started) / max(self.iterations, 1)
        self.sums, self.classes, self.iterations, self.started = {}, 0, 0, time.perf_counter()
        return averages


class FiniteWatch:
    """Remembers, on the device, the first loss term, gradient or image that was NaN or inf.

    Checking costs a few tiny kernels per chunk of classes and no host sync; the
    flag is read only at log, evaluation and checkpoint points, which then stop
    the run before anything non-finite is evaluated or checkpointed. ``terms``
    are the per-class values the image step watches (its method's loss terms
    among them), in the order it checks them; the watch adds its own.
    """

    OWN_TERMS = ("gradient", "image", "pool_ce")
    CLASS_SLOTS = 100_000  # the codes hold up to this many classes

    def __init__(self, device: torch.device, experiment: int, world: World, terms: Sequence[str]) -> None:
        self.terms = (*terms, *self.OWN_TERMS)
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.experiment, self.world = experiment, world
        self.iteration = 0

    def _code(self, c: int, term: str) -> int:
        """(iteration, class, term) as one number that orders them; class -1 is pool training."""
        return (self.iteration * self.CLASS_SLOTS + (c + 1)) * len(self.terms) + self.terms.index(term)

    def check(self, first_class: int, term: str, values: torch.Tensor) -> None:
        """Record (iteration, class, term) of the first non-finite entry of ``values``: one row per class
        from ``first_class`` on (a scalar: pool training, ``first_class`` -1)."""
        rows = values.detach().reshape(len(values) if values.dim() else 1, -1)
        bad = ~torch.isfinite(rows).all(dim=1)
        codes = self._code(first_class, term) + torch.arange(len(rows), device=rows.device) * len(self.terms)
        earliest = torch.where(bad, codes, torch.iinfo(torch.long).max).min()
        self.first = torch.where(bad.any() & (self.first < 0), earliest, self.first)

    def raise_if_bad(self) -> None:
        """Stop with the first bad value seen by any process (a collective call: all stop together)."""
        codes = [code for code in self.world.gather_objects(int(self.first)) if code >= 0]
        if not codes:
            return
        where, term = divmod(min(codes), len(self.terms))
        iteration, c = divmod(where, self.CLASS_SLOTS)
        scope = "pool training" if c == 0 else f"class {c - 1}"
        raise NonFiniteError(
            f"the {self.terms[term]} became NaN or inf at experiment {self.experiment}, iteration {iteration}, "
            f"{scope}; nothing after it was saved (the last checkpoint and sets hold finite values); "
            "lower --lr_img or --lr_net and start again")
