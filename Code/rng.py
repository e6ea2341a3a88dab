"""Explicit random generators derived from one seed.

Every random choice in the project draws from a ``torch.Generator`` made here, so
a run is reproducible from ``--seed`` alone and torch's global RNG is never
touched. Child seeds are derived by hashing a path of keys, which makes each
stream independent of how many draws other streams made before it.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """Return a 63-bit seed determined by ``seed`` and the key path ``keys``."""
    text = "/".join([str(seed), *map(str, keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int, *keys: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``derive_seed(seed, *keys)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator
