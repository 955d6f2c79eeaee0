"""Streaming per-column mean and variance (Chan et al.'s parallel update), pure tensor math.

Memory is one row of means and one of squared deviations, whatever the number of rows
seen: :func:`asrfx.stripe` measures gates over whole datasets without storing them.
"""

from __future__ import annotations

import torch

__all__ = ["RunningMoments", "relative_variation"]


class RunningMoments:
    """Count, mean and sum of squared deviations (M2) of the columns of [n, k] batches.

    Accumulates in float64. ``update`` merges a batch's own moments into the running ones
    (Chan, Golub, LeVeque 1979), which is exact up to rounding for any split into batches.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None  # [k]
        self.m2: torch.Tensor | None = None  # [k]: sum of squared deviations from the mean

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of ``rows`` ([n, k]; n may be 0)."""
        if rows.dim() != 2:
            raise ValueError(f"RunningMoments.update takes [n, k] rows, got shape {tuple(rows.shape)}")
        rows = rows.detach().to(torch.float64)
        n = rows.shape[0]
        if n == 0:
            return
        mean_b = rows.mean(0)
        m2_b = (rows - mean_b).square().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"RunningMoments: rows of width {mean_b.shape[0]} after width {self.mean.shape[0]}")
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n / total)
        self.count = total

    def variance(self) -> torch.Tensor:
        """Population variance of each column (divides by the count, not count - 1)."""
        if self.mean is None:
            raise ValueError("RunningMoments: no rows seen")
        return self.m2 / self.count

    def std(self) -> torch.Tensor:
        """Population standard deviation of each column."""
        return self.variance().sqrt()


def relative_variation(mean: torch.Tensor, std: torch.Tensor) -> float:
    """sqrt(mean_c std_c^2 / mean_c mean_c^2): how far a value strays from its column mean,
    relative to the size of the column means (rms over columns). 0 when every column is
    constant; 0.05 means replacing each value by its column mean changes it by 5% (rms)."""
    spread = float(std.square().mean())
    size = float(mean.square().mean())
    if spread == 0.0:
        return 0.0
    return (spread / size) ** 0.5 if size > 0.0 else float("inf")
