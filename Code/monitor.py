"""What a run watches while it distils: loss sums for the metric records, and non-finite values.

Both stay on the device between log points, so the hot loop never waits for
the host: loss terms are summed as tensors and read once per record, and the
NaN/inf watch keeps the first bad (iteration, class, term) in a device tensor
that is read only where the run could stop.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from distributed import World
from errors import NonFiniteError


class LossLog:
    """Sums of loss terms on the device since the last record; read at log points only.

    Each process sums the steps of its own classes; a record adds up every
    process's sums (a collective call), so it averages over all classes.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.iterations = 0
        self.started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            detached = value.detach().float()
            self.sums[name] = self.sums[name] + detached if name in self.sums else detached
        self.steps += 1

    def restart_clock(self) -> None:
        self.started = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside image updates and pool training (evaluation) out of s/iteration."""
        self.started += seconds

    def _totals(self) -> tuple[dict[str, float], int]:
        """Every process's sums and step counts added up (one collective)."""
        totals: dict[str, float] = {}
        steps = 0
        for sums, count in self.world.gather_objects(({n: t.item() for n, t in self.sums.items()}, self.steps)):
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + value
            steps += count
        return totals, steps

    def state_dict(self) -> dict[str, Any]:
        """The sums of every process (a collective call); a resumed run puts them on its first process."""
        totals, steps = self._totals()
        return {"sums": {name: torch.tensor(value) for name, value in totals.items()}, "steps": steps,
                "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        mine = self.world.is_main
        self.sums = {name: total.to(device) for name, total in state["sums"].items()} if mine else {}
        self.steps, self.iterations = state["steps"] if mine else 0, state["iterations"]

    def record(self) -> dict[str, float]:
        """Per-step averages over every process and seconds per iteration; resets the log."""
        totals, steps = self._totals()
        averages = {name: total / steps for name, total in totals.items()}
        averages["s_per_iteration"] = (time.perf_counter() - self.started) / max(self.iterations, 1)
        self.sums, self.steps, self.iterations, self.started = {}, 0, 0, time.perf_counter()
        return averages


class FiniteWatch:
    """Remembers, on the device, the first loss, gradient or image that was NaN or inf.

    Checking costs a few tiny kernels per step and no host sync; the flag is
    read only at log, evaluation and checkpoint points, which then stop the run
    before anything non-finite is evaluated or checkpointed.
    """

    TERMS = ("loss", "nll", "tv", "clip", "mean_distance", "syn_ce", "gradient", "image", "pool_ce")

    def __init__(self, device: torch.device, experiment: int, world: World) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)
        self.experiment, self.world = experiment, world
        self.iteration = 0

    def check(self, c: int, term: str, value: torch.Tensor) -> None:
        """Record (iteration, class c, term) if ``value`` has a non-finite entry; c = -1: all classes."""
        code = (self.iteration * 100_000 + (c + 1)) * len(self.TERMS) + self.TERMS.index(term)
        bad = ~torch.isfinite(value.detach()).all()
        self.first = torch.where(bad & (self.first < 0), code, self.first)

    def raise_if_bad(self) -> None:
        """Stop with the first bad value seen by any process (a collective call: all stop together)."""
        codes = [code for code in self.world.gather_objects(int(self.first)) if code >= 0]
        if not codes:
            return
        code = min(codes)
        where, term = divmod(code, len(self.TERMS))
        iteration, c = divmod(where, 100_000)
        scope = "pool training" if self.TERMS[term] == "pool_ce" else (
            "all classes" if c == 0 else f"class {c - 1}")
        raise NonFiniteError(
            f"the {self.TERMS[term]} became NaN or inf at experiment {self.experiment}, iteration {iteration}, "
            f"{scope}; nothing after it was saved (the last checkpoint and sets hold finite values); "
            "lower --lr_img or --lr_net and start again")
