"""The reference chest radiograph model, built to be evaluable under CKKS.

``conv(1→C, kxk, stride k) → x² → linear → x² → linear``: one leading convolution (packed with
TenSEAL's im2col encoding), square activations (the only non-linearity CKKS evaluates exactly)
and plaintext-ciphertext matrix products, five multiplicative levels in all (see
:class:`plugins.base.HEEncoding`). The sigmoid is applied by the node after decryption.
"""

from __future__ import annotations

import torch
from torch import nn


class Square(nn.Module):
    """The activation ``x ↦ x²`` (a degree-2 polynomial: one CKKS multiplication)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class ChestXrayNet(nn.Module):
    """A small CKKS-friendly classifier of one ``(1, size, size)`` radiograph.

    Parameters
    ----------
    size : int
        Height and width of the input.
    kernel : int
        Kernel size and stride of the leading convolution (non-overlapping windows).
    channels : int
        Output channels of the convolution.
    hidden : int
        Width of the hidden layer.
    """

    def __init__(self, size: int = 64, kernel: int = 8, channels: int = 4, hidden: int = 32):
        super().__init__()
        windows = (size // kernel) ** 2
        self.conv = nn.Conv2d(1, channels, kernel_size=kernel, stride=kernel)
        self.act1 = Square()
        self.fc1 = nn.Linear(channels * windows, hidden)
        self.act2 = Square()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 1)`` of a batch ``(N, 1, size, size)``."""
        x = self.act1(self.conv(x))
        x = x.flatten(1)  # (channel, window) order, as TenSEAL packs the conv outputs
        x = self.act2(self.fc1(x))
        out: torch.Tensor = self.fc2(x)
        return out
