"""PPO-Lagrangian (safe-rlhf, Dai et al. 2023, "Safe RLHF", arXiv:2310.12773): maximise the reward
subject to an expected cost below a limit, with a Lagrange multiplier learned alongside the policy.

    max_θ  J_r(θ)   s.t.   J_c(θ) = E[cost] <= d           (d = ``cost_limit``)
    min_{λ >= 0} max_θ   J_r(θ) - λ·(J_c(θ) - d)

- **λ by dual ascent in log space**: λ = exp(log_λ) stays positive; one optimiser step (SGD, as
  safe-rlhf, or Adam) on the loss ``-λ·(J_c - d)``, whose gradient with respect to log_λ is
  ``-λ·(J_c - d)``: λ grows while the mean episode cost J_c is above the limit and shrinks while it
  is below. ``max_value`` caps λ (safe-rlhf's ``lambda_max``).
- **Two critics, two advantages**: the reward and the cost each get per-token rewards (the score
  on the last token), a critic of their own and GAE; the policy follows
  ``A = (A_r - λ·A_c) / (1 + λ)`` (dividing by 1 + λ keeps its scale, so the PPO clip range means
  the same whatever λ is).
- **The KL penalty** goes into both streams with opposite signs (``-β·KL`` on the reward, ``+β·KL``
  on the cost), so the combined advantage carries exactly ``-β·KL`` for every λ. safe-rlhf puts
  half of it into each stream, which gives ``β/2``.

The cost is the safety reward model's score negated (``reward.combine``: higher safety score =
safer, so cost = -safety score; cost > 0 reads as unsafe, as with safe-rlhf's cost model).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor


def combine_advantages(reward_advantages: Tensor, cost_advantages: Tensor, lam: float) -> Tensor:
    """(A_r - λ·A_c) / (1 + λ): [B, R] x 2 -> [B, R] (λ >= 0)."""
    if lam < 0:
        raise ValueError(f"the Lagrange multiplier must be >= 0, got {lam}")
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


class LagrangeMultiplier:
    """λ = exp(log_λ), updated by one optimiser step per call on ``-λ·(mean episode cost - limit)``.

    State (``state_dict``): log_λ and the optimiser's state, so a resumed run continues exactly."""

    def __init__(self, init: float, lr: float, *, cost_limit: float = 0.0, optimizer: Literal["sgd", "adam"] = "sgd",
                 max_value: float | None = None) -> None:
        import torch

        if init <= 0:
            raise ValueError(f"the initial Lagrange multiplier must be > 0 (it is learned in log space), got {init}")
        if lr <= 0:
            raise ValueError(f"the multiplier's learning rate must be > 0, got {lr}")
        if max_value is not None and max_value < init:
            raise ValueError(f"max_value ({max_value}) must be >= the initial multiplier ({init})")
        self.cost_limit = float(cost_limit)
        self.max_value = max_value
        self.log_lambda = torch.nn.Parameter(torch.tensor(math.log(init), dtype=torch.float64))
        if optimizer == "sgd":
            self.optimizer: Any = torch.optim.SGD([self.log_lambda], lr=lr)
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.log_lambda], lr=lr)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r} (sgd or adam)")

    @property
    def value(self) -> float:
        return math.exp(self.log_lambda.item())

    def update(self, episode_cost: float) -> float:
        """One dual-ascent step from the mean episode cost J_c; returns the new λ.

        Every process calls it with the same global J_c, so every process holds the same λ."""
        import torch

        loss = -(float(episode_cost) - self.cost_limit) * self.log_lambda.exp()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.max_value is not None:
            with torch.no_grad():
                self.log_lambda.clamp_(max=math.log(self.max_value))
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (copied: the optimiser updates its moments in place)."""
        import copy

        return {"log_lambda": self.log_lambda.item(), "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            self.log_lambda.fill_(float(state["log_lambda"]))
        self.optimizer.load_state_dict(state["optimizer"])
