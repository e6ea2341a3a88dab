"""The registry of distillation methods: which loss, which image step, which defaults.

BACON and IDM share the network-pool step (trained nets, one image step per
class) and differ only in the matching loss; DM matches under a fresh random
network each iteration with one image step for all classes. Adding a method
that matches features another way is one ``MatchingLoss`` in ``losses.py``
plus one entry here; its terms reach the log and the NaN watch by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from errors import ConfigError
from image_steps import FreshNetworkMatching, ImageStep, PoolMatching
from losses import BACON_LOSS, MEAN_DISTANCE_LOSS, MatchingLoss


@dataclass(frozen=True)
class Method:
    """A matching loss, how its images step, and the settings that make the method what it is."""

    name: str
    loss: MatchingLoss
    description: str
    step: type[ImageStep] = PoolMatching
    defaults: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "bacon": Method("bacon", BACON_LOSS, "Bayesian likelihood + TV prior + clip term (Zhou et al. 2024)"),
    "idm": Method("idm", MEAN_DISTANCE_LOSS, "squared mean-feature distance (Zhao et al. CVPR 2023)"),
    "dm": Method("dm", MEAN_DISTANCE_LOSS, "squared mean-feature distance under fresh random networks "
                 "(Zhao & Bilen WACV 2023)", step=FreshNetworkMatching,
                 defaults={"lr_img": 1.0, "batch_real": 256, "syn_ce": False}),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
