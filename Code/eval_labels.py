"""What evaluation training fits a batch to: hard labels, or a teacher's soft labels.

Three label modes (DD-Ranking's names in brackets):

- ``hard``: the set's class labels, cross-entropy (the reference protocol).
- ``stored`` (soft label mode S): one soft label per training image, computed
  once (by the teacher on the set's training images, or shipped with the
  set) and looked up for every batch.
- ``teacher`` (mode M): the teacher's logits on every augmented batch, so
  the soft label follows the augmentation.

Soft labels are kept as logits t (probabilities p are stored as log p, whose
softmax is p again), and fitted with a temperature T by one of three losses on
the student's logits s:

- ``kl``: T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean; the T^2
  keeps the gradient's scale independent of T (Hinton et al. 2015).
- ``sce``: soft cross-entropy, -sum softmax(t / T) * log_softmax(s / T),
  batch mean. It differs from ``kl`` by the targets' entropy, a constant, so
  the two train alike up to the factor T^2.
- ``mse_ce``: mean squared error between s and t plus the hard-label
  cross-entropy.

Under CutMix or Mixup (``eval_augment.Mix``) image i keeps the share lam and
takes 1 - lam from image ``partner[i]``: hard labels become lam * CE(y_i) +
(1 - lam) * CE(y_partner); stored soft labels are mixed the same way (the
probabilities for ``kl``/``sce``, the logits for ``mse_ce``); a teacher
labels the mixed image itself, so its labels are not mixed.

Targets travel as a tuple of tensors (``batch_targets``) and are consumed by
``batch_loss``, so the same two functions serve one network and a vmapped
stack of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from errors import ConfigError
from eval_augment import Mix

LABEL_MODES = ("hard", "stored", "teacher")
SOFT_LOSSES = ("kl", "sce", "mse_ce")

Targets = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class LabelProtocol:
    """The label mode, the soft-label loss and its temperature (the loss and T apply to soft modes)."""

    mode: str = "hard"
    loss: str = "kl"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in LABEL_MODES:
            raise ConfigError(f"unknown label mode {self.mode!r}; use one of {', '.join(LABEL_MODES)}")
        if self.loss not in SOFT_LOSSES:
            raise ConfigError(f"unknown soft-label loss {self.loss!r}; use one of {', '.join(SOFT_LOSSES)}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")

    @property
    def soft(self) -> bool:
        return self.mode != "hard"

    def record(self) -> dict[str, object]:
        """What results.json says about the labels (loss and temperature only where they act)."""
        if not self.soft:
            return {"label_mode": "hard"}
        return {"label_mode": self.mode, "soft_loss": self.loss, "temperature": self.temperature}


def logits_of_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """log p as logits (softmax(log p) = p); zeros become a large negative, not -inf."""
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def _mixed(values: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    if mix is None:
        return values
    return mix.lam * values + (1.0 - mix.lam) * values[mix.partner]


def _hard_targets(labels: torch.Tensor, mix: Mix | None) -> Targets:
    if mix is None:
        return (labels,)
    lam = torch.tensor(mix.lam, device=labels.device)
    return labels, labels[mix.partner], lam


def batch_targets(protocol: LabelProtocol, labels: torch.Tensor, soft_logits: torch.Tensor | None,
                  mix: Mix | None) -> Targets:
    """The tensors ``batch_loss`` needs for one batch.

    ``soft_logits`` are the batch's stored soft labels (mode ``stored``, mixed
    here under ``mix``) or the teacher's logits on the augmented batch (mode
    ``teacher``, never mixed); None for hard labels.
    """
    if not protocol.soft:
        return _hard_targets(labels, mix)
    if soft_logits is None:
        raise ValueError(f"label mode {protocol.mode} needs soft labels for every batch")
    stored_mix = mix if protocol.mode == "stored" else None
    if protocol.loss == "mse_ce":
        hard = _hard_targets(labels, mix)
        if len(hard) == 1:
            hard = (labels, labels, torch.ones((), device=labels.device))
        return (_mixed(soft_logits.float(), stored_mix), *hard)
    probabilities = F.softmax(soft_logits.float() / protocol.temperature, dim=1)
    return (_mixed(probabilities, stored_mix),)


def _hard_loss(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    if len(targets) == 1:
        return F.cross_entropy(logits, targets[0])
    own, partner, lam = targets
    return lam * F.cross_entropy(logits, own) + (1.0 - lam) * F.cross_entropy(logits, partner)


def batch_loss(protocol: LabelProtocol, logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """The training loss of float32 ``logits`` against ``batch_targets``' output."""
    if not protocol.soft:
        return _hard_loss(logits, targets)
    if protocol.loss == "mse_ce":
        return F.mse_loss(logits, targets[0]) + _hard_loss(logits, targets[1:])
    log_student = F.log_softmax(logits / protocol.temperature, dim=1)
    soft_ce = -(targets[0] * log_student).sum(dim=1).mean()
    if protocol.loss == "sce":
        return soft_ce
    entropy = -(targets[0] * logits_of_probabilities(targets[0])).sum(dim=1).mean()
    return protocol.temperature ** 2 * (soft_ce - entropy)
