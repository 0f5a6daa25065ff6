"""Masked statistics over token tensors, optionally global across processes.

Every function takes ``mask`` (1 = a real response token, 0 = padding) with the same shape as
``x``. Functions that whiten take ``reduce``: a function that sums a tensor over all processes
(``lambda t: accelerator.reduce(t, "sum")``). With the default (no reduction) the statistics are
those of this process's batch; with it they are those of the global batch, as if all processes'
tensors were concatenated - the same code runs under one process and under DDP.

Variances are population variances (divide by n, not n - 1), as in OpenRLHF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

Reduce = Callable[["Tensor"], "Tensor"]


def _identity(t: Tensor) -> Tensor:
    return t


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is 1. x, mask: [...]; returns a scalar or x summed over ``dim``."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 where nothing is masked in)."""
    mask = mask.to(x.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_moments(x: Tensor, mask: Tensor, reduce: Reduce = _identity) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, variance, count) of the masked entries of ``x``, summed over processes by ``reduce``.

    x, mask: any shape; returns three scalars. One all-reduce of [sum, sum of squares, count]."""
    import torch

    mask = mask.to(x.dtype)
    sums = torch.stack([masked_sum(x, mask), masked_sum(x * x, mask), mask.sum()])
    total, total_sq, count = reduce(sums).unbind()
    n = count.clamp(min=1.0)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0.0)
    return mean, var, count


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce = _identity) -> Tensor:
    """(x - mean) / std over the masked entries (global with ``reduce``); padding stays 0.

    x, mask: [B, R] (or [B]); returns the same shape. ``shift_mean=False`` only rescales (the mean is
    added back), as TRL does for rewards."""
    mean, var, _ = masked_moments(x, mask, reduce)
    out = (x - mean) * (var + eps).rsqrt()
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce = _identity) -> Tensor:
    """1 - Var[returns - values] / Var[returns] over masked tokens: 1 = the critic predicts the
    returns perfectly, 0 = no better than their mean, < 0 = worse. NaN when the returns are constant.

    values, returns, mask: [B, R]; returns a scalar."""
    import torch

    _, var_returns, _ = masked_moments(returns, mask, reduce)
    _, var_residual, _ = masked_moments(returns - values, mask, reduce)
    if var_returns <= 0:
        return torch.tensor(float("nan"))
    return 1.0 - var_residual / var_returns


class RunningMoments:
    """Running mean and standard deviation of a stream of batches (Chan et al.'s parallel update).

    Used to normalise rewards with statistics that change slowly instead of per batch. Checkpointed
    through ``state_dict``."""

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0

    def update(self, x: Tensor, reduce: Reduce = _identity) -> tuple[float, float]:
        """Fold in a batch ``x`` [B] (global with ``reduce``); returns the batch's (mean, std)."""
        import torch

        batch_mean, batch_var, batch_count = masked_moments(x.float(), torch.ones_like(x, dtype=torch.float32), reduce)
        m, v, n = float(batch_mean), float(batch_var), float(batch_count)
        total = self.count + n
        delta = m - self.mean
        new_mean = self.mean + delta * n / total
        m2 = self.var * self.count + v * n + delta * delta * self.count * n / total
        self.mean, self.var, self.count = new_mean, m2 / total, total
        return m, v ** 0.5

    @property
    def std(self) -> float:
        return self.var ** 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
