"""Held-out prompts: drawn once per project, never trained or sampled on, and checked to stay that way.

A round project draws ``eval.heldout`` prompts from its prompt pool (``sample.prompts``) when it is
created and writes two files beside ``round.yaml``:

- ``heldout.jsonl``: the prompts every round's policy is evaluated on (win rates, gold reward);
- ``prompt_pool.jsonl``: the rest of the pool, the only prompts that sampling for annotation,
  rejection sampling and PPO see.

That makes the split disjoint by construction. :func:`check_disjoint` then checks it against what
the stages really read: every data source in every stage's resolved ``config.yaml`` (SFT
dialogues, reward-model comparisons, DPO pairs, RS/PPO prompts) and every round's sampled pairs.
Two prompts are the same when any user turn of one, lower-cased with whitespace collapsed, equals
the last user turn of a held-out prompt.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class HeldOutLeak(RuntimeError):
    """A held-out prompt was found in data a stage trained or sampled on."""


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def user_turns(messages: Sequence[dict]) -> set[str]:
    return {normalise(m["content"]) for m in messages if m.get("role") == "user"}


def draw(pool: Sequence[Any], k: int, safety_share: float | None, *, seed: int, used: Iterable[str] = ()) -> list[Any]:
    """``k`` distinct prompts of ``pool`` not in ``used`` (keys: the prompt's messages as sorted JSON),
    seeded; ``safety_share`` of them from safety prompts when the pool has enough."""
    seen, fresh = set(used), []
    for p in pool:
        key = json.dumps(p.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            fresh.append(p)
    rng = random.Random(seed)
    rng.shuffle(fresh)
    if safety_share is None:
        return fresh[:k]
    safety = [p for p in fresh if p.category == "safety"]
    other = [p for p in fresh if p.category != "safety"]
    n_safe = min(len(safety), round(k * safety_share))
    picked = safety[:n_safe] + other[:k - n_safe]
    if len(picked) < k:  # one pool ran short: fill from the other
        picked += (safety[n_safe:] + other[k - n_safe:])[:k - len(picked)]
    rng.shuffle(picked)
    return picked


def split_pool(pool: Sequence[Any], size: int, safety_share: float | None, *, seed: int) -> tuple[list[Any], list[Any]]:
    """(held-out, rest): ``size`` prompts drawn from ``pool``; the rest keeps the pool's order and
    drops every prompt that shares a user turn with a held-out one (duplicates across sources)."""
    heldout = draw(pool, size, safety_share, seed=seed) if size else []
    if size and len(heldout) < size:
        raise ValueError(f"eval.heldout: asked for {size} held-out prompts but the prompt pool has only "
                         f"{len(heldout)} distinct ones")
    held = {normalise(p.messages[-1]["content"]) for p in heldout}
    rest = [p for p in pool if not (user_turns(p.messages) & held)]
    return heldout, rest


def split_three(pool: Sequence[Any], test: int, validation: int, safety_share: float | None, *,
                seed: int) -> tuple[list[Any], list[Any], list[Any]]:
    """(test, validation, pool): ``test`` prompts drawn first, then ``validation`` from the rest, each
    tagged (``split:test`` / ``split:validation``, see ``data.splits``); the pool drops every prompt
    that shares a user turn with either."""
    from data.splits import TEST_TAG, VALIDATION_TAG

    held, rest = split_pool(pool, test, safety_share, seed=seed)
    try:
        val, rest = split_pool(rest, validation, safety_share, seed=seed + 1)
    except ValueError as exc:
        raise ValueError(f"eval.validation: {exc}") from None
    for records, tag in ((held, TEST_TAG), (val, VALIDATION_TAG)):
        for r in records:
            r.tags = [t for t in (r.tags or []) if not t.startswith("split:")] + [tag]
    return held, val, rest


def sources_of(stage_dir: Path) -> list[Any]:
    """The data sources a stage read, from its resolved ``config.yaml`` (``data.sources``; ``prompts.sources`` in RS configs
    saved before the rename)."""
    import yaml

    from data.loaders import DataSource

    cfg = yaml.safe_load((stage_dir / "config.yaml").read_text()) or {}
    out = []
    for section in ("data", "prompts"):
        for src in ((cfg.get(section) or {}).get("sources") or []):
            out.append(DataSource(**src) if isinstance(src, dict) else DataSource(path=str(src)))
    return out


def prompts_in(source: Any) -> list[set[str]]:
    """The user turns of every record of a data source (dialogues, comparisons or prompts)."""
    from data.loaders import load_prompts

    return [user_turns(p.messages) for p in load_prompts(source)]


def check_disjoint(heldout: Sequence[Any], used: dict[str, list[set[str]]]) -> dict[str, int]:
    """Raise :class:`HeldOutLeak` when a held-out prompt's last user turn is among the user turns of
    ``used`` (name -> user-turn sets of the records it holds). Returns name -> records checked."""
    held = {normalise(p.messages[-1]["content"]): p for p in heldout}
    leaks = []
    for name, records in used.items():
        for turns in records:
            for t in turns & held.keys():
                leaks.append(f"{name}: {held[t].messages[-1]['content'][:70]!r}")
    if leaks:
        raise HeldOutLeak(f"{len(leaks)} held-out prompts appear in data a stage trained or sampled on: "
                          + "; ".join(sorted(set(leaks))[:5]))
    return {name: len(records) for name, records in used.items()}


def stage_usage(round_dirs: Sequence[Path], stages: Sequence[str]) -> dict[str, list[set[str]]]:
    """name -> user-turn sets, for every stage output (with a ``config.yaml``) and every ``pairs.jsonl``
    in ``round_dirs``. Sources shared by several stages are loaded once."""
    from data.loaders import DataSource, read_rows

    cache: dict[str, list[set[str]]] = {}
    used: dict[str, list[set[str]]] = {}
    for d in round_dirs:
        for stage in stages:
            if not (d / stage / "config.yaml").is_file():
                continue
            for src in sources_of(d / stage):
                key = json.dumps({k: v for k, v in vars(src).items() if k in ("path", "split", "subset", "format", "limit")},
                                 sort_keys=True)
                if key not in cache:
                    cache[key] = prompts_in(DataSource(path=src.path, split=src.split, subset=src.subset,
                                                       format=src.format, limit=src.limit))
                used[f"{d.name}/{stage}: {src.path}"] = cache[key]
        pairs = d / "pairs.jsonl"
        if pairs.is_file():
            used[f"{d.name}/pairs.jsonl"] = [user_turns(row["prompt"]) for _, row in read_rows(pairs)]
    return used
