"""The gold reward model's cache: where a gold lives (``$ALIGN_CACHE/gold/<name>/``), whether it may judge (its
card), and which prompts it saw (the seed-free partition of HH-RLHF prompts). Building it is :mod:`reward.gold`;
:mod:`reward.model` resolves ``gold:<name>`` here without importing the builder."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

DEFAULT_NAME = "hh-smollm2"
PARTITION = (("train", 0.65), ("held_out", 0.10))  # the rest: "policy"


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def first_turn(messages: Sequence[dict]) -> str:
    return next((m["content"] for m in messages if m.get("role") == "user"), "")


def prompt_key(messages: Sequence[dict]) -> str:
    """The hash a prompt is partitioned and excluded by: its first user turn, normalised."""
    return hashlib.sha1(normalise(first_turn(messages)).encode("utf-8")).hexdigest()


def partition_of(messages: Sequence[dict]) -> str:
    """``train``, ``held_out`` or ``policy``: where the gold protocol puts this prompt (seed-free)."""
    unit = int(prompt_key(messages)[:12], 16) / 16**12
    edge = 0.0
    for name, share in PARTITION:
        edge += share
        if unit < edge:
            return name
    return "policy"


def gold_dir(name: str) -> Path:
    from foundation.models import cache_root

    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"a gold model name is a plain name, got {name!r}")
    return cache_root() / "gold" / name


def resolve(name_or_path: str) -> Path:
    """The reward-model folder of ``gold:<name>`` (or of a gold folder / its ``model/``)."""
    name = name_or_path[len("gold:"):] if name_or_path.startswith("gold:") else None
    folder = gold_dir(name) if name is not None else Path(name_or_path)
    if (folder / "card.json").is_file():
        folder = folder / "model"
    if not folder.is_dir():
        hint = f"build it with `align gold build --name {name}`" if name else "no such folder"
        raise FileNotFoundError(f"gold model {name_or_path!r} is not built ({folder}): {hint}")
    card_path = folder.parent / "card.json"
    if card_path.is_file():
        weak = weakness(json.loads(card_path.read_text()))
        if weak:
            raise ValueError(f"gold model {name_or_path!r} is not a gold: {weak}")
    return folder


def weakness(card: dict) -> str | None:
    """Why a built gold may not judge anything (None: it may): its held-out accuracy on human labels must
    be above chance with 95% confidence. A gold at chance would make every curve measured against it noise."""
    h = card.get("held_out") or {}
    lo = (h.get("ci95") or [None])[0]
    if lo is None or lo > 0.5:
        return None
    return (f"its held-out accuracy on human preferences is {100 * h['accuracy']:.1f}% [{100 * lo:.1f}, "
            f"{100 * h['ci95'][1]:.1f}] (n={h.get('n')}), not above chance; rebuild it (align gold build --force; "
            f"the recipe that learns: LoRA in every layer, --max-length 320)")


def load_card(name: str = DEFAULT_NAME) -> dict:
    path = gold_dir(name) / "card.json"
    if not path.is_file():
        raise FileNotFoundError(f"gold model {name!r} is not built ({path}): run `align gold build --name {name}`")
    return json.loads(path.read_text())


def gold_prompt_keys(name: str = DEFAULT_NAME) -> set[str]:
    """Hashes (:func:`prompt_key`) of every prompt the gold trained or was measured on."""
    card = load_card(name)
    return set(card["prompt_keys"]["train"]) | set(card["prompt_keys"]["held_out"])
