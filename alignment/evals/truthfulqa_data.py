"""TruthfulQA's data: multiple-choice items and generation items from every layout the eval accepts.

``--data`` values (``alignment.evals.truthfulqa`` documents them for users): ``truthful_qa`` /
``hub:truthful_qa`` (the Hub dataset, configs ``multiple_choice`` and ``generation``, split
``validation``), a local copy of it (the Hub repository's parquet files or ``save_to_disk``
folders), the original files (``mc_task.json``, ``TruthfulQA.csv``) or ``bundled:truthfulness``.
Categories come with the items (CSV, bundled) or are joined from the generation set by question
text. ``seeded_sample`` is the one way every caller (rounds, benchmarks) draws a reproducible
subset, so a question's membership in a seed's reported sample can be recomputed anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.schemas import TruthfulnessItem

log = logging.getLogger(__name__)

HUB_ID = "truthful_qa"



def _hf_targets(value: Any) -> Any:
    """Hub layout ``{"choices": [...], "labels": [...]}`` -> ``{choice: label}`` (mc_task.json layout)."""
    if isinstance(value, dict) and set(value) == {"choices", "labels"}:
        return dict(zip(value["choices"], value["labels"]))
    return value


def _split_source(source: str) -> tuple[bool, str]:
    """(is_hub, name) of a --data value."""
    if source.startswith("hub:"):
        return True, source[4:]
    if source == HUB_ID:
        return True, HUB_ID
    return False, source


def dataset_label(data: str, n: int, *, sample: int | None = None, limit: int | None = None, seed: int = 0) -> str:
    """What a result was computed on, in words every table and plot uses (the bundled probe is never
    called TruthfulQA)."""
    if data.startswith("bundled:"):
        return f"bundled truthfulness probe ({n} items, not TruthfulQA)"
    if sample is not None:
        return f"TruthfulQA MC ({n} questions, seeded sample, seed {seed})"
    if limit is not None:
        return f"TruthfulQA MC (first {n} questions)"
    return f"TruthfulQA MC ({n} questions)"


def seeded_sample(items: list, n: int | None, seed: int = 0) -> list:
    """``n`` items drawn without replacement with ``random.Random(seed)``, in their original order (all when None)."""
    import random

    if n is None or n >= len(items):
        return items
    keep = set(random.Random(seed).sample(range(len(items)), n))
    return [it for i, it in enumerate(items) if i in keep]


def load_items(source: str, *, categories: str | None = None, limit: int | None = None, sample: int | None = None,
               seed: int = 0) -> list[TruthfulnessItem]:
    """Multiple-choice items from the Hub, an ``mc_task.json``-style file, or ``bundled:truthfulness``
    (the first ``limit``, or a seeded ``sample`` of all)."""
    from data.loaders import source_rows

    is_hub, name = _split_source(source)
    if is_hub:
        where, rows = source_rows("hub:" + name, split="validation", subset="multiple_choice")
    elif Path(name).is_dir():  # a local copy of the Hub dataset (repository files or save_to_disk)
        where, rows = source_rows(name, split="validation", subset="multiple_choice")
    else:
        where, rows = source_rows(name)
    items = []
    for lineno, row in rows:
        row = {**row, "mc1_targets": _hf_targets(row.get("mc1_targets")), "mc2_targets": _hf_targets(row.get("mc2_targets"))}
        try:
            items.append(TruthfulnessItem.from_dict(row))
        except DataError as exc:
            raise exc.located(where, lineno) from None
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError("no items", path=where)
    items = seeded_sample(items, sample, seed)
    cat_source = categories
    if cat_source is None and not is_hub and Path(name).is_file() and (Path(name).parent / "TruthfulQA.csv").is_file():
        cat_source = str(Path(name).parent / "TruthfulQA.csv")
    if cat_source is None and is_hub:
        cat_source = "hub:" + name
    if cat_source is None and Path(name).is_dir():
        cat_source = name
    if cat_source and any(it.category is None for it in items):
        _join_categories(items, cat_source)
    return items


def _join_categories(items: list[TruthfulnessItem], source: str) -> None:
    """Fill ``category`` from the generation set (CSV or Hub ``generation``) by question text."""
    from data.loaders import source_rows

    try:
        if source.startswith("hub:") or Path(source).is_dir():
            _, rows = source_rows(source, split="validation", subset="generation")
        else:
            _, rows = source_rows(source)
        table = {}
        for _, row in rows:
            q = row.get("Question", row.get("question"))
            c = row.get("Category", row.get("category"))
            if q and c:
                table[q.strip()] = c.strip()
    except DataError as exc:
        log.warning("no categories: %s", exc)
        return
    missing = 0
    for it in items:
        if it.category is None:
            it.category = table.get(it.question.strip())
            missing += it.category is None
    if missing:
        log.warning("%d questions have no category in %s", missing, source)


@dataclass
class GenItem:
    """A question with the correct and incorrect reference answers of the generation variant."""

    question: str
    correct: list[str]
    incorrect: list[str]
    category: str | None = None


def _format_answers(answers: Sequence[str]) -> list[str]:
    """lm-eval's ``preprocess_function``: strip, drop empty, end with a full stop."""
    out = []
    for a in answers:
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def gen_item(question: str, correct: Sequence[str], incorrect: Sequence[str], category: str | None = None) -> GenItem:
    correct_f = _format_answers(correct)
    if "I have no comment." not in correct_f:
        correct_f.append("I have no comment.")
    return GenItem(question.strip(), correct_f, _format_answers(incorrect), category)


def load_gen_items(source: str, *, limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[GenItem]:
    return seeded_sample(_load_gen_items(source, limit=limit), sample, seed)


def _load_gen_items(source: str, *, limit: int | None = None) -> list[GenItem]:
    """Generation items from TruthfulQA.csv, the Hub ``generation`` config, or any MC source (mc2 answers)."""
    from data.loaders import source_rows

    is_hub, name = _split_source(source)
    if is_hub:
        where, rows = source_rows("hub:" + name, split="validation", subset="generation")
    elif Path(name).is_dir():
        where, rows = source_rows(name, split="validation", subset="generation")
    elif Path(name).suffix.lower() == ".csv":
        where, rows = source_rows(name)
    else:
        if Path(name).is_file() and (Path(name).parent / "TruthfulQA.csv").is_file():
            return _load_gen_items(str(Path(name).parent / "TruthfulQA.csv"), limit=limit)
        items = load_items(source, limit=limit)
        return [gen_item(it.question, [a for a, v in it.mc2_targets.items() if v],
                         [a for a, v in it.mc2_targets.items() if not v], it.category) for it in items]
    out = []
    for lineno, row in rows:
        try:
            if "Question" in row:  # TruthfulQA.csv: answers separated by ';'
                for key in ("Question", "Correct Answers", "Incorrect Answers"):
                    if not str(row.get(key) or "").strip():
                        raise DataError("empty", key=key)
                out.append(gen_item(row["Question"], row["Correct Answers"].split(";"), row["Incorrect Answers"].split(";"),
                                    row.get("Category")))
            else:
                out.append(gen_item(row["question"], row["correct_answers"], row["incorrect_answers"], row.get("category")))
        except KeyError as exc:
            raise DataError("missing column", path=where, line=lineno, key=str(exc.args[0])) from None
        except DataError as exc:
            raise exc.located(where, lineno) from None
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError("no items", path=where)
    return out
