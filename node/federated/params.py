"""A torch model's weights as the list of NumPy arrays Flower carries, in state-dict order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's state dict as ``float32``-or-native arrays, in key order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load *weights* (as :func:`get_weights` returns them) into *model*.

    Raises
    ------
    ValueError
        If the number of arrays or a shape differs from the model's.
    """
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} weight arrays, got {len(weights)}")
    state = {}
    for key, current, array in zip(keys, model.state_dict().values(), weights, strict=True):
        if tuple(current.shape) != tuple(np.shape(array)):
            raise ValueError(f"weight {key}: shape {np.shape(array)} != {tuple(current.shape)}")
        state[key] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(state)


def update_norm(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> float:
    """The L2 norm of the update ``new - old`` over all arrays."""
    return float(
        np.sqrt(
            sum(
                float(np.sum((n.astype(np.float64) - o) ** 2))
                for n, o in zip(new, old, strict=True)
            )
        )
    )
