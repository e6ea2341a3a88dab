"""The lazy per-class image optimisers compute the reference's whole-set optimiser, to fp32 rounding.

The reference (``WholeSetOptimizer``, a torch.optim SGD or Adam over the whole
set) takes one step per turn with a gradient only on the class whose turn it
is; ``LazySGD``/``LazyAdam`` step a class's rows at its turn and apply the
other turns' momentum-only moves when the class is next touched or read.
Gradients here are fixed random tensors, so both sides see the same ones.
"""

from __future__ import annotations

import pytest
import torch

from image_optimizer import LazyAdam, LazySGD, WholeSetOptimizer

U = 2.0 ** -24  # unit roundoff of float32
LR = 0.2


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_closed_form_catch_up_equals_iterated_zero_gradient_sgd_steps() -> None:
    """After one gradient step, j zero-gradient steps of torch's SGD against one closed-form catch-up.

    Velocity: both scale it by 0.5 per step, exactly (a power of two), so the buffers are equal bit for
    bit. Position: the iterated x_k = fl(x_(k-1) - fl(lr v_k)) rounds twice per step, each time by at
    most u = 2^-24 times a magnitude below M = max_k |x_k| + lr |v_0|: within 2 j u M of the exact
    x_0 - lr v_0 (mu + ... + mu^j). The closed form rounds the coefficient lr (mu + ... + mu^j) (and
    lr itself, which torch also rounds to float32), its product with v_0 and the sum: within 4 u M.
    So |iterated - closed| <= (2 j + 4) u M, element by element."""
    for j in (1, 3, 9, 40):
        x0, g = random(6, 3, 4, 4, seed=j), random(6, 3, 4, 4, seed=100 + j)
        reference = torch.optim.SGD([x := x0.clone().requires_grad_(True)], lr=LR, momentum=0.5)
        x.grad = g.clone()
        reference.step()
        trajectory = [x.detach().abs().clone()]
        v0 = reference.state[x]["momentum_buffer"].clone()
        x.grad.zero_()
        for _ in range(j):
            reference.step()
            trajectory.append(x.detach().abs().clone())

        lazy = LazySGD(x0, range(3), ipc=2, lr=LR)
        lazy.images_at(range(3), [0, 0, 0])
        lazy.step(range(3), g)
        lazy.advance_to(1 + j)
        bound = (2 * j + 4) * U * (torch.stack(trajectory).amax(dim=0) + LR * v0.abs())
        assert torch.all((lazy.current() - x.detach()).abs() <= bound), j
        lazy.images_at(range(3), [1 + j] * 3)
        assert torch.equal(lazy.velocity, reference.state[x]["momentum_buffer"]), j


def whole_set_and_lazy(optimizer: str, classes: int, passes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``passes`` passes of one turn per class (class c at turn c of its pass), gradients fixed per
    (pass, class); the lazy side touches its classes in chunks of 2 and is read at the end. Returns both
    final sets and max |x| + lr seen along the reference's trajectory."""
    ipc, start = 2, random(classes * 2, 1, 3, 3, seed=7)
    gradients = random(passes, classes * ipc, 1, 3, 3, seed=8)
    reference = WholeSetOptimizer(start, range(classes), ipc, optimizer, LR)
    lazy = LazyAdam(start, range(classes), ipc, LR) if optimizer == "adam" else LazySGD(start, range(classes), ipc, LR)
    largest = 0.0
    for p in range(passes):
        for c in range(classes):
            reference.step(range(c, c + 1), gradients[p, c * ipc:(c + 1) * ipc])
            largest = max(largest, reference.images.abs().max().item())
        for first in range(0, classes, 2):
            chunk = range(first, min(first + 2, classes))
            lazy.images_at(chunk, [p * classes + c for c in chunk])
            lazy.step(chunk, gradients[p, chunk.start * ipc:chunk.stop * ipc])
        lazy.advance_to((p + 1) * classes)
    return reference.current(), lazy.current(), largest + LR


def test_lazy_sgd_over_many_turns_is_the_whole_set_sgd() -> None:
    """5 classes, 4 passes (20 turns): each of the reference's 20 steps rounds every element twice
    (2 u M each); the lazy side rounds each gradient step as the reference does, and each of its at most
    5 catch-ups per class within 4 u M (see above): |difference| <= (2 x 20 + 4 x 5) u M."""
    reference, lazy, largest = whole_set_and_lazy("sgd", classes=5, passes=4)
    assert (lazy - reference).abs().max().item() <= (2 * 20 + 4 * 5) * U * largest


def test_lazy_adam_over_many_turns_is_the_whole_set_adam() -> None:
    """Adam's zero-gradient steps are iterated on the class's rows with the reference's step counts.
    Each step rounds x, the two moments, the bias corrections and the quotient, each by a relative u,
    the same roundings in another grouping on the two sides: at most 8 per step, and errors in the
    moments carry to later steps but shrink by beta each step. Over T = 20 steps the positions agree
    within 8 T u (max |x| + lr) (a step moves x by at most about lr)."""
    reference, lazy, largest = whole_set_and_lazy("adam", classes=5, passes=4)
    assert (lazy - reference).abs().max().item() <= 8 * 20 * U * largest


@pytest.mark.parametrize("kind", [LazySGD, LazyAdam])
def test_reading_leaves_the_state_alone_and_a_saved_state_resumes_bit_for_bit(kind: type) -> None:
    """A read never applies the pending moves (a split catch-up rounds otherwise), so saving on a timer
    cannot change a run; the state dict carries each class's turn instead."""
    start, gradient = random(6, 1, 3, 3, seed=9), random(6, 1, 3, 3, seed=10)

    def run(optimizer: LazySGD | LazyAdam, passes: range) -> None:
        for p in passes:
            for c in range(3):
                optimizer.images_at(range(c, c + 1), [3 * p + c])
                optimizer.step(range(c, c + 1), gradient[2 * c:2 * c + 2] * (p + 1))
            optimizer.advance_to(3 * (p + 1))

    whole = kind(start, range(3), 2, LR)
    run(whole, range(3))
    halted = kind(start, range(3), 2, LR)
    run(halted, range(2))
    before = {name: value.clone() if isinstance(value, torch.Tensor) else value
              for name, value in halted.state_dict().items()}
    halted.current()
    assert all(torch.equal(value, halted.state_dict()[name]) if isinstance(value, torch.Tensor)
               else value == halted.state_dict()[name] for name, value in before.items())
    resumed = kind(torch.zeros_like(start), range(3), 2, LR)
    resumed.load_state_dict(before)
    run(resumed, range(2, 3))
    assert torch.equal(resumed.current(), whole.current())


def test_a_class_cannot_be_taken_back_to_a_turn_it_has_passed() -> None:
    lazy = LazySGD(random(4, 1, 2, 2, seed=11), range(2), 2, LR)
    lazy.images_at(range(2), [3, 3])
    with pytest.raises(ValueError, match="passed"):
        lazy.images_at(range(2), [2, 2])
