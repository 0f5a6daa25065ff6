"""KL between the policy and the frozen reference, per token, and the coefficient that weighs it.

Estimators of KL(pi || pi_ref) from one sample y_t ~ pi (J. Schulman, "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html), with log r = log pi_ref(y_t) - log pi(y_t):

- k1 = -log r             unbiased, can be negative per token (the classic RLHF penalty);
- k2 = (log r)^2 / 2      biased, always >= 0;
- k3 = (r - 1) - log r    unbiased, always >= 0, lower variance (OpenRLHF's option).

The log-ratio is clamped to [-clamp, clamp] first, so a single token where the two policies
disagree wildly cannot blow up the reward (k3 grows exponentially in it).

Controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
arXiv:1909.08593, section 2.2): fixed beta, or adaptive beta that moves the measured KL towards
a target: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon), where n is
the number of samples in the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

Estimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: Estimator = "k1", clamp: float | None = 10.0) -> Tensor:
    """Per-token KL estimate: logprobs, ref_logprobs [B, R] -> [B, R] (not masked)."""
    log_ratio = ref_logprobs.float() - logprobs.float()  # log r = log pi_ref - log pi
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1.0 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


class FixedKLController:
    """A constant KL coefficient beta (Llama 2: 0.01 for 7B/13B, 0.005 for 34B/70B)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller of beta towards a target KL (see the module doc)."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        super().__init__(value)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """``current_kl``: the batch's mean KL per sequence; ``n_steps``: its number of sequences."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
