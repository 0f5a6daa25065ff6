"""Mixtures of datasets and deterministic splits.

- :func:`mix` takes (records, weight) parts where the weight multiplies a part's size: 1 keeps
  every record once, 0.5 keeps a seeded random half, 2.5 repeats every record twice plus a half.
- :func:`mix_proportions` samples parts so they make up given shares of the result (Llama 2's
  "safety data mixed 90/10 with helpfulness data").
- :func:`split` assigns each record to train/validation/test by a stable hash of its *content*
  (by default its prompt), so the assignment does not depend on file order and duplicates of a
  prompt never straddle two splits.
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable, Sequence, TypeVar

from data.templates import stable_unit

T = TypeVar("T")


def _take(records: Sequence[T], weight: float, rng: random.Random) -> list[T]:
    whole = int(weight)
    out = list(records) * whole
    frac = weight - whole
    if frac > 0:
        k = round(frac * len(records))
        out += rng.sample(list(records), k)
    return out


def mix(parts: Sequence[tuple[Sequence[T], float]], seed: int = 0, shuffle: bool = True) -> list[T]:
    """Concatenate parts, each scaled by its weight, then shuffle (seeded)."""
    rng = random.Random(seed)
    out: list[T] = []
    for records, weight in parts:
        if weight < 0:
            raise ValueError(f"mixture weight must be >= 0, got {weight}")
        out += _take(records, weight, rng)
    if shuffle:
        rng.shuffle(out)
    return out


def mix_proportions(
    parts: Sequence[tuple[Sequence[T], float]], seed: int = 0, total: int | None = None
) -> list[T]:
    """Sample parts so part i is ``share_i / sum(shares)`` of the result.

    ``total`` defaults to the largest size reachable without repeating the first part (the
    main data is used once; the others are sub-sampled, or repeated if they are too small).
    """
    shares = [s for _, s in parts]
    if any(s < 0 for s in shares) or sum(shares) <= 0:
        raise ValueError(f"shares must be >= 0 with a positive sum, got {shares}")
    norm = [s / sum(shares) for s in shares]
    if total is None:
        main_records, _ = parts[0]
        total = round(len(main_records) / norm[0]) if norm[0] > 0 else sum(len(r) for r, _ in parts)
    rng = random.Random(seed)
    out: list[T] = []
    for (records, _), share in zip(parts, norm):
        want = round(total * share)
        if not records or want == 0:
            continue
        out += _take(records, want / len(records), rng)
    rng.shuffle(out)
    return out


def default_key(record: Any) -> str:
    """The content a split is keyed on: the prompt (comparisons, prompts) or the first user turn."""
    for attr in ("prompt", "messages"):
        value = getattr(record, attr, None)
        if value is not None:
            if attr == "messages":
                value = [m for m in value if m["role"] != "assistant"][:1] or value[:1]
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return json.dumps(record, sort_keys=True, default=str)


def split(
    records: Sequence[T],
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
    key: Callable[[T], str] = default_key,
    *,
    at_least_one_val: bool = False,
) -> tuple[list[T], list[T], list[T]]:
    """Deterministic (train, validation, test) split by a stable hash of ``key(record)``.

    A small set can hash no record into the validation band. With ``at_least_one_val`` (stages that
    cannot run without held-out records: RS, DPO, KTO, PPO), ``val_fraction > 0`` and at least two
    training records, the training record whose hash lies nearest the band then moves to validation
    with its duplicates (24 prompts at 0.125 got none: the demo's rejection sampling stopped on it)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"fractions must be in [0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    train: list[T] = []
    val: list[T] = []
    test: list[T] = []
    for rec in records:
        u = stable_unit(key(rec), seed)
        if u < test_fraction:
            test.append(rec)
        elif u < test_fraction + val_fraction:
            val.append(rec)
        else:
            train.append(rec)
    if at_least_one_val and val_fraction > 0 and not val and len(train) >= 2:
        units = [stable_unit(key(r), seed) for r in train]
        nearest = min(units)  # every record with that key moves: duplicates stay together
        if units.count(nearest) < len(train):
            val = [r for r, u in zip(train, units) if u == nearest]
            train = [r for r, u in zip(train, units) if u != nearest]
    return train, val, test
