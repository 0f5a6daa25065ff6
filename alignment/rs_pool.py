"""Rejection sampling's selection and pool: which of a prompt's K samples is kept, and the pool of every round's.

Pure functions on samples and rows (no model): ``alignment.rs`` calls them while it samples, and the RS control
(``benchmarks/alignment.py``) calls :func:`repick` on a finished round's ``samples.jsonl`` to draw another pick from
the same samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from data.schemas import Message, PromptRecord


def prompt_key(messages: Sequence[Message]) -> str:
    """Stable identity of a prompt conversation (its content, not its id: ids collide across sources)."""
    return hashlib.sha1(json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def best_of(rewards: Sequence[float], eligible: Sequence[bool]) -> int | None:
    """Index of the highest reward among eligible samples (first one on ties), None if none is eligible."""
    best = None
    for i, (r, ok) in enumerate(zip(rewards, eligible)):
        if ok and (best is None or r > rewards[best]):
            best = i
    return best


def pick_of(rewards: Sequence[float], eligible: Sequence[bool], how: str, seed: int) -> int | None:
    """The sample a prompt keeps: :func:`best_of`, or (``how="random"``) one of the eligible samples drawn with
    ``seed`` (the same draw when a run resumes or runs on other processes); None if none is eligible."""
    if how == "best":
        return best_of(rewards, eligible)
    import random

    idx = [i for i, ok in enumerate(eligible) if ok]
    return random.Random(seed).choice(idx) if idx else None


def eligible_of(samples: Sequence[dict], require_eos: bool) -> list[bool]:
    """Which of a prompt's samples may be kept: not empty, and (``require_eos``) finished with the end-of-turn token."""
    return [bool(s["response"].strip()) and (s["finished"] or not require_eos) for s in samples]


def pick_seed(key: str, seed: int) -> int:
    """The seed of a prompt's random pick: its key (:func:`prompt_key`) and the run's seed, so a resumed run, another
    process and :func:`repick` draw the same sample."""
    return int(key, 16) ^ seed


def repick(records: Sequence[dict], how: str, seed: int, require_eos: bool) -> list[dict]:
    """``samples.jsonl`` records with each prompt's kept sample picked again by ``how`` (the draw a run with
    ``sampling.pick=how`` and ``run.seed=seed`` makes for the same samples): the rejection-sampling control keeps the
    K samples and changes only the pick."""
    return [{**r, "best": pick_of([s["reward"] for s in r["samples"]], eligible_of(r["samples"], require_eos), how,
                                  pick_seed(r["key"], seed))} for r in records]


def expected_best_of(rewards: Sequence[float], k: int) -> float:
    """E[max of k samples drawn without replacement] from K >= k observed rewards (unbiased).

    With r_(1) <= ... <= r_(K) sorted, the i-th smallest is the maximum of a k-subset in
    C(i-1, k-1) of the C(K, k) subsets: E = sum_i r_(i) * C(i-1, k-1) / C(K, k). k = 1 is the mean.
    """
    from math import comb

    r = sorted(rewards)
    if not 1 <= k <= len(r):
        raise ValueError(f"k must be in [1, {len(r)}], got {k}")
    return sum(x * comb(i, k - 1) for i, x in enumerate(r)) / comb(len(r), k)


def merge_pools(earlier: Sequence[Sequence[dict]], new: Sequence[dict]) -> list[dict]:
    """The new pool: the earlier pools' records in the order given, each record once, then this round's.

    A pool file already holds every earlier round's records, so the same record (same round,
    prompt and response) met in several of ``earlier`` is kept only once: passing the pools of
    rounds 1 and 2 gives round 1's records once, not twice."""
    out, seen = [], set()
    for row in (row for pool in earlier for row in pool):
        key = (row["round"], json.dumps(row["messages"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out + list(new)


def pool_record(prompt: PromptRecord, response: str, reward: float, round_: int, *, temperature: float, model: str) -> dict:
    """A pool row: an SFT dialogue (``messages``) tagged with its round and reward."""
    return {"messages": [*prompt.messages, {"role": "assistant", "content": response}], "prompt_key": prompt_key(prompt.messages),
            "id": prompt.id, "category": prompt.category, "round": round_, "reward": reward, "temperature": temperature,
            "model": model, "source": "rejection-sampling"}


def read_pool(path: str) -> list[dict]:
    """An earlier round's pool file; every row must be a dialogue tagged with its round."""
    from data.errors import DataError
    from data.loaders import read_rows

    rows = []
    for lineno, row in read_rows(path):
        if not isinstance(row.get("messages"), list) or not isinstance(row.get("round"), int):
            raise DataError("a pool row needs `messages` (a dialogue) and `round` (an integer)", path=path, line=lineno)
        rows.append(row)
    return rows
