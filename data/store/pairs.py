"""Task files: the pairs an annotation round compares, and how many labels each needs.

One JSON object per line (``.jsonl``; ``.json``/``.csv``/``.parquet`` also read), the comparison
format without a judgement::

    {"id": "p-0001",                                   # optional; default: a hash of the content
     "prompt": "How do I ...?",                         # or [{role, content}, ...] ending with a user turn
     "response_a": "...", "response_b": "...",
     "source_a": {"model": "sft-r1", "temperature": 0.7}, "source_b": {"model": "sft-r1", "temperature": 1.2},
     "category": "helpfulness",                         # or safety
     "labels": 3,                                       # optional: labels this task needs (overrides overlap)
     "meta": {...}}                                     # optional, kept with the task

Everything is validated before anything is queued; a bad row raises :class:`DataError` with the
file, line and key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.loaders import read_rows
from data.schemas import CATEGORIES, Message, ResponseSource, prompt_messages

KNOWN_KEYS = {"id", "prompt", "response_a", "response_b", "source_a", "source_b", "category", "labels", "meta"}


@dataclass
class TaskSpec:
    """A comparison task to queue: a prompt and two responses in their TRUE order (A, B)."""

    prompt: list[Message]
    response_a: str
    response_b: str
    uid: str = ""
    source_a: dict | None = None
    source_b: dict | None = None
    category: str | None = None
    labels: int | None = None  # None: decided by the queue's overlap policy
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.uid:
            self.uid = content_uid(self.prompt, self.response_a, self.response_b)


def content_uid(prompt: list[Message], a: str, b: str) -> str:
    digest = hashlib.sha256(json.dumps([prompt, a, b], ensure_ascii=False).encode("utf-8")).hexdigest()
    return f"t-{digest[:16]}"


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError("missing required field", key=key)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", key=key)
    if not value.strip():
        raise DataError("empty text", key=key)
    return value


def _source(value: Any, key: str) -> dict | None:
    src = ResponseSource.from_value(value, key)
    return None if src is None else {k: v for k, v in asdict(src).items() if v is not None}


MAX_RESPONSE_BYTES = 32 * 1024  # a response longer than this is refused at queue time (configurable)
MAX_DEPTH = 32  # objects and lists nested deeper than this in a row are refused (the store and exports recurse)


def _check_values(value: Any, key: str, depth: int = 0) -> None:
    """No NUL characters or lone surrogates in text, no NaN/infinity in numbers, no nesting deeper than
    :data:`MAX_DEPTH` anywhere in a row: exports stay valid UTF-8 JSON (and PostgreSQL text columns accept
    every string)."""
    if depth > MAX_DEPTH:
        raise DataError(f"nested more than {MAX_DEPTH} levels deep", key=key)
    if isinstance(value, str):
        if "\x00" in value:
            raise DataError(f"contains a NUL character (at position {value.index(chr(0))})", key=key)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"contains a lone surrogate {value[exc.start]!r} (at position {exc.start}), "
                            "which is not valid UTF-8", key=key) from None
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(f"not a finite number: {value!r}", key=key)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_values(k, key, depth + 1)
            _check_values(v, f"{key}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_values(v, f"{key}[{i}]", depth + 1)


def parse_task(row: dict, *, max_bytes: int | None = MAX_RESPONSE_BYTES) -> TaskSpec:
    """One row -> :class:`TaskSpec`; errors name the key. ``max_bytes`` caps each response (UTF-8 bytes;
    None = no cap)."""
    if row.get("prompt") is None:
        raise DataError("missing required field", key="prompt")
    for key, value in row.items():
        _check_values(value, str(key))
    prompt = prompt_messages(row["prompt"], "prompt")
    a, b = _text(row, "response_a"), _text(row, "response_b")
    for key, text in (("response_a", a), ("response_b", b)):
        if max_bytes is not None and len(text.encode("utf-8")) > max_bytes:
            raise DataError(f"{len(text.encode('utf-8'))} bytes, over the limit of {max_bytes} "
                            "(align annotate queue --max-response-kb)", key=key)
    if a.strip() == b.strip():
        raise DataError("response_a and response_b are identical; a comparison needs two different responses", key="response_b")
    uid = row.get("id")
    if uid is not None and (not isinstance(uid, (str, int)) or isinstance(uid, bool) or not str(uid).strip()):
        raise DataError(f"expected a non-empty string, got {uid!r}", key="id")
    category = row.get("category")
    if category is not None and category not in CATEGORIES:
        raise DataError(f"unknown category {category!r}; expected one of: {', '.join(CATEGORIES)}", key="category")
    labels = row.get("labels")
    if labels is not None and (isinstance(labels, bool) or not isinstance(labels, int) or labels < 1):
        raise DataError(f"expected a positive integer, got {labels!r}", key="labels")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"expected an object, got {type(meta).__name__}", key="meta")
    meta = {**meta, **{k: v for k, v in row.items() if k not in KNOWN_KEYS}}
    return TaskSpec(prompt, a, b, "" if uid is None else str(uid).strip(), _source(row.get("source_a"), "source_a"),
                    _source(row.get("source_b"), "source_b"), category, labels, meta)


def read_tasks(path: str | Path, *, max_bytes: int | None = MAX_RESPONSE_BYTES) -> list[TaskSpec]:
    """Every task of a file, validated; duplicate ids fail naming both lines."""
    tasks: list[TaskSpec] = []
    first_line: dict[str, int] = {}
    for lineno, row in read_rows(path):
        try:
            task = parse_task(row, max_bytes=max_bytes)
        except DataError as exc:
            raise exc.located(path, lineno) from None
        if task.uid in first_line:
            raise DataError(f"duplicate task id {task.uid!r} (first on line {first_line[task.uid]})",
                            path=path, line=lineno, key="id")
        first_line[task.uid] = lineno
        tasks.append(task)
    if not tasks:
        raise DataError("no tasks", path=path)
    return tasks


def overlap_labels(uids: Iterable[str], *, labels: int = 1, overlap: float = 0.0, overlap_labels: int = 3,
                   seed: int = 0) -> dict[str, int]:
    """Labels needed per task: ``round(overlap * n)`` tasks get ``overlap_labels``, the rest ``labels``.

    The overlapping tasks are the ones with the smallest ``sha256(seed:uid)``: a fixed, spread-out
    choice that does not depend on the file's order.
    """
    uids = list(uids)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")
    if labels < 1 or overlap_labels < 1:
        raise ValueError("labels per task must be >= 1")
    k = round(overlap * len(uids))
    ranked = sorted(uids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    chosen = set(ranked[:k])
    return {u: overlap_labels if u in chosen else labels for u in uids}
