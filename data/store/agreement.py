"""Inter-annotator agreement: Cohen's kappa for a pair of annotators, Krippendorff's alpha overall.

Pure functions over plain values; the store feeds them the labels of overlapping tasks.

- Cohen (1960): ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e``
  the agreement expected from each annotator's own label frequencies.
- Krippendorff (2011, "Computing Krippendorff's Alpha-Reliability"): ``alpha = 1 - D_o / D_e`` over
  the coincidence matrix of all pairable values; any number of annotators, missing labels allowed,
  with a distance for nominal, ordinal or interval values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from itertools import permutations
from typing import Literal


def cohen_kappa(x: Sequence[Hashable], y: Sequence[Hashable]) -> float | None:
    """Kappa of two annotators' labels on the same items (``x[i]`` and ``y[i]`` label item i).

    None when it is undefined: no items, or both annotators always used one and the same label
    (``p_e = 1``).
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} labels against {len(y)}")
    n = len(x)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(x, y)) / n
    fx, fy = Counter(x), Counter(y)
    p_e = sum(fx[c] * fy[c] for c in fx) / (n * n)
    if p_e >= 1.0:
        return None
    return (p_o - p_e) / (1.0 - p_e)


def coincidences(units: Sequence[Sequence[Hashable]]) -> dict[tuple[Hashable, Hashable], float]:
    """Coincidence matrix ``o[c, k]``: each ordered pair of values within a unit of ``m`` values adds ``1/(m-1)``.

    ``units[u]`` holds the values the annotators gave unit u (missing ones left out); units with
    fewer than two values are not pairable and add nothing.
    """
    o: dict[tuple[Hashable, Hashable], float] = {}
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for c, k in permutations(values, 2):
            o[(c, k)] = o.get((c, k), 0.0) + 1.0 / (m - 1)
    return o


def krippendorff_alpha(units: Sequence[Sequence[Hashable]],
                       metric: Literal["nominal", "ordinal", "interval"] = "nominal") -> float | None:
    """Krippendorff's alpha of ``units`` (see :func:`coincidences`); None when undefined (no pairable
    values, or every value the same so no disagreement is expected).

    Ordinal and interval values must be numbers (their order is the numeric order).
    """
    o = coincidences(units)
    if not o:
        return None
    n_c: dict[Hashable, float] = {}
    for (c, _), v in o.items():
        n_c[c] = n_c.get(c, 0.0) + v
    n = sum(n_c.values())
    values = sorted(n_c) if metric != "nominal" else list(n_c)

    if metric == "nominal":
        def d2(c: Hashable, k: Hashable) -> float:
            return 0.0 if c == k else 1.0
    elif metric == "interval":
        def d2(c: Hashable, k: Hashable) -> float:
            return float(c - k) ** 2  # type: ignore[operator]
    elif metric == "ordinal":
        rank = {v: i for i, v in enumerate(values)}

        def d2(c: Hashable, k: Hashable) -> float:
            lo, hi = sorted((rank[c], rank[k]))
            between = sum(n_c[values[g]] for g in range(lo, hi + 1))
            return (between - (n_c[c] + n_c[k]) / 2.0) ** 2
    else:
        raise ValueError(f"unknown metric {metric!r}; expected nominal, ordinal or interval")

    d_o = sum(v * d2(c, k) for (c, k), v in o.items()) / n
    d_e = sum(n_c[c] * n_c[k] * d2(c, k) for c in values for k in values) / (n * (n - 1))
    if d_e == 0:
        return None
    return 1.0 - d_o / d_e


def signed_preference(chosen: str, strength: str | None) -> int:
    """A label as one number for interval alpha: +4 .. +1 for A significantly better .. negligibly
    better, -1 .. -4 for B; a missing strength counts as "better" (3)."""
    level = {"significantly_better": 4, "better": 3, "slightly_better": 2, "negligibly_better": 1}.get(strength or "better", 3)
    return level if chosen == "A" else -level
