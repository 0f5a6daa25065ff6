"""Length-controlled win rate (AlpacaEval 2; Dubois et al. 2024): the win rate a judge would give
if both answers had the same length.

For a model A against a baseline B on n prompts, with outcomes y_i (1 = A better, 1/2 = tie,
0 = B better) and length differences Δ_i = len(A_i) - len(B_i):

    P(A preferred on i) = σ(θ + φ · tanh(Δ_i / s)),      s = standard deviation of the Δ_i

θ and φ are fitted by maximum likelihood (a tie is half a win and half a loss; a tiny ridge on φ
keeps a perfectly length-separated sample finite), and the length-controlled win rate is σ(θ):
the fitted preference with the length term at zero. φ > 0 says the judge prefers the longer
answer. AlpacaEval's model also has a per-instruction difficulty term shared across many models;
with one pair of models it is not identifiable and is left out. The CI is a percentile bootstrap
over prompts, refitting each resample.

Report it beside every raw win rate, with the two mean lengths: a judge that likes length must
not make verbosity look like alignment.
"""

from __future__ import annotations

from collections.abc import Sequence

RIDGE = 1e-3


def fit(outcomes: Sequence[float], length_diffs: Sequence[float], *, ridge: float = RIDGE) -> tuple[float, float]:
    """(θ, φ) by Newton's method on the penalised log-likelihood."""
    import numpy as np

    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(length_diffs, dtype=np.float64)
    if y.shape != d.shape or y.size == 0:
        raise ValueError(f"need one length difference per outcome, got {y.size} outcomes and {d.size} differences")
    s = d.std()
    t = np.tanh(d / s) if s > 0 else np.zeros_like(d)
    x = np.stack([np.ones_like(t), t], axis=1)
    beta = np.zeros(2)
    penalty = np.diag([0.0, ridge])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (y - p) - penalty @ beta
        hess = x.T @ (x * (p * (1 - p))[:, None]) + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def lc_win_rate(outcomes: Sequence[float], length_diffs: Sequence[float]) -> float:
    import math

    theta, _ = fit(outcomes, length_diffs)
    return 1.0 / (1.0 + math.exp(-theta))


def summarise(outcomes: Sequence[float], len_a: Sequence[float], len_b: Sequence[float], *, n_boot: int = 1000,
              seed: int = 0) -> dict:
    """{lc_win_rate, ci_low, ci_high, length_coef, n, mean_len_a, mean_len_b} (rates as fractions)."""
    import numpy as np

    y = np.asarray(outcomes, dtype=np.float64)
    a, b = np.asarray(len_a, dtype=np.float64), np.asarray(len_b, dtype=np.float64)
    if not (y.size == a.size == b.size) or y.size == 0:
        raise ValueError("need the outcome and both lengths for every prompt")
    d = a - b
    theta, phi = fit(y, d)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, size=y.size)
        boots.append(lc_win_rate(y[idx], d[idx]))
    return {"lc_win_rate": float(1 / (1 + np.exp(-theta))), "ci_low": float(np.quantile(boots, 0.025)),
            "ci_high": float(np.quantile(boots, 0.975)), "length_coef": phi, "n": int(y.size),
            "mean_len_a": float(a.mean()), "mean_len_b": float(b.mean())}
