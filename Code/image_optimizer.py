"""The synthetic images' optimiser: the reference's one optimiser over the whole set, stepped at every
class's turn, in two implementations that compute the same thing.

The reference takes ONE step of SGD (momentum 0.5, or Adam) over the whole set
at every class's turn, with a gradient that is zero outside that class, so at
each turn every other class moves by its momentum alone. A turn is one such
step; ``clock`` counts the turns taken so far (C per picked pool net, one per
DM iteration).

- ``WholeSetOptimizer`` is that, literally: a ``torch.optim`` optimiser over
  the whole set, stepped once per turn. Every turn touches every image, so an
  iteration costs O(C x set size): the reference path (``--class_steps
  sequential``), kept to compare against.
- ``LazySGD`` and ``LazyAdam`` step only the rows of the classes being
  updated. The momentum-only moves of every other turn depend on nothing but
  a class's own state, so each class remembers the turn its rows are current
  at (``synced``) and the missed zero-gradient steps are applied to its rows
  alone when it is next touched (``images_at``) or read (``current``): for
  SGD in closed form, one pass per catch-up whatever the number of missed
  turns. An iteration then costs O(set size).

Reading the set (``current``) never changes the state: it returns a caught-up
copy. A catch-up split into two (j1 then j2 steps) rounds differently from one
of j1 + j2 steps, so if reading flushed the state, a checkpoint taken on a
timer would move the run's last bits; the state dict stores ``synced``
instead, and a resumed run continues bit for bit.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

SGD_MOMENTUM = 0.5
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
PER_CLASS_STATE = ("synced",)  # state entries with one value per class (the others: one row per image)


def on_device(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor of host ``values`` on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class ImageOptimizer(Protocol):
    """What an image step needs from the optimiser of a block of classes' images."""

    images: torch.Tensor  # this block's stored images, [classes x ipc, ch, H, W]
    clock: int

    def images_at(self, classes: range, turns: Sequence[int]) -> torch.Tensor:
        """The rows of ``classes`` as they are at each class's turn (no gradient)."""
        ...

    def step(self, classes: range, gradient: torch.Tensor) -> None:
        """One optimiser step at the turn ``images_at`` brought ``classes`` to, with ``gradient`` on their
        rows and none on any other class's."""
        ...

    def advance_to(self, clock: int) -> None:
        """The turns up to ``clock`` are over (the classes not stepped in them moved by momentum only)."""
        ...

    def current(self) -> torch.Tensor:
        """Every row of the block as it is at ``clock`` (not a view of the state)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Rows:
    """Which rows of a block hold which classes: ``ipc`` consecutive rows per class from ``classes.start``."""

    def __init__(self, classes: range, ipc: int) -> None:
        self.classes, self.ipc = classes, ipc

    def of(self, classes: range) -> slice:
        return slice((classes.start - self.classes.start) * self.ipc, (classes.stop - self.classes.start) * self.ipc)

    def positions(self, classes: range) -> range:
        """Indices of ``classes`` in this block's per-class lists."""
        return range(classes.start - self.classes.start, classes.stop - self.classes.start)


class WholeSetOptimizer:
    """The reference: one ``torch.optim`` SGD (momentum 0.5) or Adam over the whole block, stepped at every
    turn with a gradient that is zero outside the classes stepped. Only possible with every class in one
    process (the sequential path is single-process)."""

    def __init__(self, images: torch.Tensor, classes: range, ipc: int, name: str, lr: float) -> None:
        self.param = images.detach().clone().requires_grad_(True)
        self.rows = Rows(classes, ipc)
        self.clock = 0
        if name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam([self.param], lr=lr)
        else:
            self.optimizer = torch.optim.SGD([self.param], lr=lr, momentum=SGD_MOMENTUM)

    @property
    def images(self) -> torch.Tensor:
        return self.param.detach()

    def images_at(self, classes: range, turns: Sequence[int]) -> torch.Tensor:
        if any(turn != self.clock for turn in turns):
            raise ValueError(f"the whole-set optimiser is at turn {self.clock}; it cannot look ahead to {turns}")
        return self.images[self.rows.of(classes)]

    def step(self, classes: range, gradient: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        self.param.grad[self.rows.of(classes)] = gradient
        self.optimizer.step()
        self.clock += 1

    def advance_to(self, clock: int) -> None:
        while self.clock < clock:  # turns of classes that took no step: momentum only
            self.step(range(self.rows.classes.start, self.rows.classes.start), self.param.new_empty(0))

    def current(self) -> torch.Tensor:
        return self.images.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "whole_set", "images": self.images, "optimizer": self.optimizer.state_dict(),
                "clock": self.clock}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.param.copy_(state["images"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.clock = state["clock"]


class LazyRows:
    """The per-class bookkeeping the lazy optimisers share: the rows, the turn each class is current at."""

    def __init__(self, images: torch.Tensor, classes: range, ipc: int) -> None:
        self.images = images.detach().clone()
        self.rows = Rows(classes, ipc)
        self.synced = [0] * len(classes)  # per class: the turn its rows are current at (steps reflected)
        self.clock = 0

    def pending(self, classes: range, turns: Sequence[int]) -> list[int]:
        """Missed zero-gradient steps of each of ``classes`` before its turn in ``turns``."""
        missed = [turn - self.synced[i] for turn, i in zip(turns, self.rows.positions(classes))]
        if min(missed, default=0) < 0:
            raise ValueError(f"classes {classes} were asked for turns {list(turns)} they have passed")
        return missed

    def per_class(self, tensor: torch.Tensor, classes: range) -> torch.Tensor:
        """The rows of ``classes`` in ``tensor``, viewed [classes, ipc, ...] (a view: edits write through)."""
        return tensor[self.rows.of(classes)].view(len(classes), self.rows.ipc, *tensor.shape[1:])

    def coefficient(self, values: list[float], like: torch.Tensor) -> torch.Tensor | float:
        """One factor per class, shaped to broadcast over its rows; a plain number when all agree."""
        if len(set(values)) == 1:
            return values[0]
        return on_device(values, like.device).view(-1, *[1] * (like.dim() - 1))

    def mark(self, classes: range, turns: Sequence[int]) -> None:
        for i, turn in zip(self.rows.positions(classes), turns):
            self.synced[i] = turn

    def advance_to(self, clock: int) -> None:
        if clock < self.clock:
            raise ValueError(f"the clock cannot go back from turn {self.clock} to {clock}")
        self.clock = clock

    def all_classes(self) -> range:
        return self.rows.classes

    def synced_tensor(self) -> torch.Tensor:
        return torch.tensor(self.synced, dtype=torch.long, device=self.images.device)


class LazySGD(LazyRows):
    """SGD with momentum over per-class rows, each class caught up in closed form when touched.

    j zero-gradient steps of SGD (momentum mu, learning rate lr) from (x, v) give
    v_j = mu^j v and x_j = x - lr v (mu + ... + mu^j) = x - lr v mu (1 - mu^j) / (1 - mu).
    With mu = 0.5 every power is exact in binary, so v_j is exactly the iterated
    buffer; x_j differs from the iterated position by rounding only: j roundings
    of x there against one (and that of the rounded coefficient) here
    (tests/test_image_optimizer.py derives the bound). The gradient step itself
    is the reference's: v = mu v + g, x = x - lr v.
    """

    def __init__(self, images: torch.Tensor, classes: range, ipc: int, lr: float,
                 momentum: float = SGD_MOMENTUM) -> None:
        super().__init__(images, classes, ipc)
        self.lr, self.momentum = lr, momentum
        self.velocity = torch.zeros_like(self.images)

    def _move(self, steps: int) -> float:
        """lr x (mu + mu^2 + ... + mu^steps), in double precision."""
        return self.lr * self.momentum * (1 - self.momentum ** steps) / (1 - self.momentum)

    def _catch_up(self, x: torch.Tensor, v: torch.Tensor, missed: list[int]) -> None:
        """Apply ``missed[k]`` zero-gradient steps to class k of the [classes, ipc, ...] views x and v."""
        if not any(missed):
            return
        x.add_(v * self.coefficient([-self._move(j) for j in missed], x))
        v.mul_(self.coefficient([self.momentum ** j for j in missed], v))

    def images_at(self, classes: range, turns: Sequence[int]) -> torch.Tensor:
        x, v = self.per_class(self.images, classes), self.per_class(self.velocity, classes)
        self._catch_up(x, v, self.pending(classes, turns))
        self.mark(classes, turns)
        return self.images[self.rows.of(classes)]

    def step(self, classes: range, gradient: torch.Tensor) -> None:
        rows = self.rows.of(classes)
        velocity = self.velocity[rows]
        velocity.mul_(self.momentum).add_(gradient)
        self.images[rows].add_(velocity, alpha=-self.lr)
        self.mark(classes, [self.synced[i] + 1 for i in self.rows.positions(classes)])

    def current(self) -> torch.Tensor:
        classes = self.all_classes()
        x, v = self.per_class(self.images.clone(), classes), self.per_class(self.velocity.clone(), classes)
        self._catch_up(x, v, self.pending(classes, [self.clock] * len(classes)))
        return x.flatten(0, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd", "images": self.images, "velocity": self.velocity, "synced": self.synced_tensor(),
                "clock": self.clock}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images.copy_(state["images"])
        self.velocity.copy_(state["velocity"])
        self.synced, self.clock = [int(t) for t in state["synced"]], state["clock"]


class LazyAdam(LazyRows):
    """Adam over per-class rows, each class caught up when touched.

    Zero-gradient Adam steps have no closed form (eps and the bias corrections
    enter every step), so a class's missed steps are iterated on its own rows,
    each with the step count the reference had at that turn: exact to
    rounding, and O(missed steps) passes over the class's images rather than
    over the whole set. ``synced`` is also each class's step count. The
    arithmetic is torch.optim.Adam's (defaults betas (0.9, 0.999), eps 1e-8).
    """

    def __init__(self, images: torch.Tensor, classes: range, ipc: int, lr: float) -> None:
        super().__init__(images, classes, ipc)
        self.lr = lr
        self.exp_avg = torch.zeros_like(self.images)
        self.exp_avg_sq = torch.zeros_like(self.images)

    def _update(self, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, steps: list[int],
                gradient: torch.Tensor | None) -> None:
        """One Adam step of each class k of the [classes, ipc, ...] views, as its step number ``steps[k]``;
        step number 0 leaves a class unchanged (it has no step to take here)."""
        beta1, beta2 = ADAM_BETAS
        active = [t > 0 for t in steps]
        if gradient is None:
            m.mul_(self.coefficient([beta1 if a else 1.0 for a in active], m))
            v.mul_(self.coefficient([beta2 if a else 1.0 for a in active], v))
        else:
            m.lerp_(gradient, 1 - beta1)
            v.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        root = self.coefficient([(1 - beta2 ** t) ** 0.5 if t else 1.0 for t in steps], v)
        size = self.coefficient([-self.lr / (1 - beta1 ** t) if t else 0.0 for t in steps], m)
        x.add_(m / (v.sqrt() / root + ADAM_EPS) * size)

    def _catch_up(self, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, classes: range,
                  missed: list[int]) -> None:
        synced = [self.synced[i] for i in self.rows.positions(classes)]
        for k in range(max(missed, default=0)):
            self._update(x, m, v, [s + k + 1 if k < j else 0 for s, j in zip(synced, missed)], None)

    def _views(self, classes: range, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [self.per_class(t, classes) for t in tensors]

    def images_at(self, classes: range, turns: Sequence[int]) -> torch.Tensor:
        x, m, v = self._views(classes, self.images, self.exp_avg, self.exp_avg_sq)
        self._catch_up(x, m, v, classes, self.pending(classes, turns))
        self.mark(classes, turns)
        return self.images[self.rows.of(classes)]

    def step(self, classes: range, gradient: torch.Tensor) -> None:
        steps = [self.synced[i] + 1 for i in self.rows.positions(classes)]
        x, m, v = self._views(classes, self.images, self.exp_avg, self.exp_avg_sq)
        self._update(x, m, v, steps, gradient.view_as(x))
        self.mark(classes, steps)

    def current(self) -> torch.Tensor:
        classes = self.all_classes()
        x, m, v = self._views(classes, self.images.clone(), self.exp_avg.clone(), self.exp_avg_sq.clone())
        self._catch_up(x, m, v, classes, self.pending(classes, [self.clock] * len(classes)))
        return x.flatten(0, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adam", "images": self.images, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                "synced": self.synced_tensor(), "clock": self.clock}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("images", "exp_avg", "exp_avg_sq"):
            getattr(self, name).copy_(state[name])
        self.synced, self.clock = [int(t) for t in state["synced"]], state["clock"]


def make_image_optimizer(images: torch.Tensor, classes: range, ipc: int, name: str, lr: float,
                         lazy: bool) -> ImageOptimizer:
    """The optimiser of a block of classes: lazy per-class rows (batched steps) or the reference's
    whole-set ``torch.optim`` (sequential steps)."""
    if not lazy:
        return WholeSetOptimizer(images, classes, ipc, name, lr)
    return LazyAdam(images, classes, ipc, lr) if name == "adam" else LazySGD(images, classes, ipc, lr)
