"""Seeding and capture/restore of every random number generator, for exact resumption."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism

__all__ = ["capture_rng_state", "epoch_generator", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and all GPUs) with ``seed mod 2**32``.

    This is ``monai.utils.set_determinism(seed)``, which also records the seed for the MONAI transforms built
    afterwards (``monai.utils.get_seed``), but the cuDNN flags are left as they were: ``set_determinism``
    would set ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``, and the training loop
    re-seeds before every validation, so a run would switch to the deterministic (often slower) kernels
    and lose ``benchmark`` after its first validation. Set those flags yourself for bit-exact GPU runs.
    """
    deterministic, benchmark = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    set_determinism(seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A ``torch.Generator`` for one epoch's data order, seeded from ``SeedSequence(seed, spawn_key=(epoch,))``.

    The hash keeps it apart from every other stream derived from the same seed (e.g. the samples' seeds, which
    use ``spawn_key=(epoch, index)``).
    """
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence(seed, spawn_key=(epoch,)).generate_state(1)[0]))
    return generator


def capture_rng_state() -> dict[str, Any]:
    """The state of the Python, NumPy, torch CPU and CUDA generators, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` output."""
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
