"""The registry of distillation methods: which loss, which loop, which defaults.

BACON and IDM share the network-pool loop (trained nets, one image step per
class) and differ only in the matching loss; DM matches under a fresh random
network each iteration with one image step for all classes. Adding a method
that matches features another way is one loss function in ``losses.py`` plus
one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from errors import ConfigError
from losses import MatchLoss, bacon_loss, mean_feature_distance


@dataclass(frozen=True)
class Method:
    """A matching loss plus the settings that make the method what it is."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], MatchLoss]
    description: str
    network_pool: bool = True
    defaults: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "bacon": Method("bacon", bacon_loss, "Bayesian likelihood + TV prior + clip term (Zhou et al. 2024)"),
    "idm": Method("idm", mean_feature_distance, "squared mean-feature distance (Zhao et al. CVPR 2023)"),
    "dm": Method("dm", mean_feature_distance, "squared mean-feature distance under fresh random networks "
                 "(Zhao & Bilen WACV 2023)", network_pool=False,
                 defaults={"lr_img": 1.0, "batch_real": 256, "syn_ce": False}),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
