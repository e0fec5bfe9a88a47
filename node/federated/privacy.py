"""Privacy accounting of the central Gaussian mechanism (Rényi DP).

Each round the coordinator releases the mean of the participating nodes' updates, each clipped
to L2 norm ``C`` on the node (``fixedclipping_mod``), plus Gaussian noise of standard deviation
``z * C / n`` (Flower's ``DifferentialPrivacyClientSideFixedClipping``, ``n`` the number of
sampled nodes). With uniform weighting and ``n`` fixed, adding or removing one node's data
changes the sum by at most ``C``: each round is the Gaussian mechanism with noise multiplier
``z`` at the level of a whole node (node-level DP, not example-level).

Every node takes part in every round (cross-silo: no sampling, so no amplification). The
Gaussian mechanism has RDP ``eps(a) = a / (2 z^2)`` at every order a > 1 (Mironov 2017,
Prop. 7); T rounds compose to ``T a / (2 z^2)``, and the conversion to (eps, delta)-DP uses
``eps = eps_RDP(a) + log((a - 1) / a) - (log(delta) + log(a)) / (a - 1)`` (Balle et al.
2020, Thm. 21), minimised over a grid of orders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ORDERS = tuple(
    [1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128.0, 256.0, 512.0]
)


@dataclass
class GaussianAccountant:
    """Cumulative (epsilon, delta) of T Gaussian releases with noise multiplier *z*."""

    noise_multiplier: float
    delta: float
    releases: int = 0
    orders: tuple[float, ...] = field(default=ORDERS)

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError("delta must lie strictly between 0 and 1")
        if self.noise_multiplier < 0:
            raise ValueError("the noise multiplier must not be negative")

    def step(self, count: int = 1) -> float:
        """Account for *count* more releases; return the cumulative epsilon."""
        self.releases += count
        return self.epsilon()

    def epsilon(self) -> float:
        """The cumulative epsilon at :attr:`delta` (``inf`` without noise, 0 before any release)."""
        if self.releases == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        best = math.inf
        z2 = self.noise_multiplier**2
        log_delta = math.log(self.delta)
        for alpha in self.orders:
            rdp = self.releases * alpha / (2.0 * z2)
            eps = (
                rdp
                + math.log((alpha - 1.0) / alpha)
                - (log_delta + math.log(alpha)) / (alpha - 1.0)
            )
            best = min(best, eps)
        return max(best, 0.0)
