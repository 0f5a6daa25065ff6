"""From stored labels to comparison records: one per label, or one per task by majority.

Pure functions over :class:`LabelRecord` (a label joined with its task and annotator), so the
disagreement policy is tested without a database. The output is :class:`data.schemas.Comparison`
in TRUE A/B identities: the left/right order an annotator saw is resolved before anything is stored.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from data.schemas import Comparison, ResponseSource, Strength
from data.store.label import META_FIELDS, Judgement

Policy = Literal["majority", "weighted", "all"]
POLICIES: tuple[str, ...] = ("majority", "weighted", "all")
# strongest first; index = how weak the preference is
STRENGTH_ORDER = [s.value for s in Strength]


@dataclass(frozen=True, kw_only=True)
class LabelRecord(Judgement):
    """One stored label: its :class:`Judgement` fields plus what export and statistics need of its task and annotator."""

    label_id: int
    task_id: int
    task_uid: str
    round: int
    prompt: list
    response_a: str
    response_b: str
    source_a: dict | None
    source_b: dict | None
    category: str | None
    labels_needed: int
    labels_done: int
    annotator: str
    annotator_kind: str
    swapped: bool  # the left side showed the true B
    seconds: float | None
    created_at: dt.datetime
    task_meta: dict = field(default_factory=dict)

    @property
    def chose_left(self) -> bool:
        return (self.chosen == "A") != self.swapped


def _source(d: dict | None) -> ResponseSource | None:
    return None if not d else ResponseSource(model=d.get("model"), temperature=d.get("temperature"))


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def label_comparison(r: LabelRecord) -> Comparison:
    """One label as a comparison (policy ``all``)."""
    meta = {"task": r.task_uid, "shown_left": "B" if r.swapped else "A",
            "annotator_kind": r.annotator_kind, "labels": r.labels_done,
            **{k: getattr(r, k) for k in META_FIELDS if getattr(r, k) is not None}}
    if r.comment:
        meta["comment_positions"] = shown_as(r)  # "A"/"B" in the comment are screen positions
    if r.seconds is not None:
        meta["seconds"] = round(r.seconds, 1)
    if r.task_meta:
        meta["task_meta"] = r.task_meta
    return Comparison(
        prompt=r.prompt, response_a=r.response_a, response_b=r.response_b, chosen=r.chosen,  # type: ignore[arg-type]
        strength=Strength(r.strength) if r.strength else None, safe_a=r.safe_a, safe_b=r.safe_b, category=r.category,
        source_a=_source(r.source_a), source_b=_source(r.source_b), annotator=r.annotator, round=r.round,
        id=f"r{r.round}-{r.task_uid}-{r.annotator}", created_at=_iso(r.created_at), meta=meta,
    )


def weaker_median(strengths: Sequence[str | None]) -> str | None:
    """The median strength; between two middle values the weaker one (a smaller margin is the safer
    claim). Missing strengths are ignored; None when all are missing.

    ``weaker_median(["significantly_better", "slightly_better"]) == "slightly_better"``
    """
    known = sorted((STRENGTH_ORDER.index(s) for s in strengths if s), reverse=False)
    if not known:
        return None
    return STRENGTH_ORDER[known[len(known) // 2]]


def majority_vote(values: Sequence[bool | None], *, tie: bool = False) -> bool | None:
    """Majority of the known booleans; ``tie`` on a tie (False = "unsafe" for safety labels); None if none known."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    yes = sum(known)
    return tie if 2 * yes == len(known) else 2 * yes > len(known)


def strength_weight(strength: str | None) -> int:
    """A vote's weight under policy ``weighted``: 4 significantly better ... 1 negligibly better (1 if missing)."""
    return len(STRENGTH_ORDER) - STRENGTH_ORDER.index(strength) if strength in STRENGTH_ORDER else 1


def shown_as(r: LabelRecord) -> str:
    """What the annotator's screen called A and B (comments name screen positions; records use true A/B)."""
    return "screen A = response_b, screen B = response_a" if r.swapped else "screen A = response_a, screen B = response_b"


def majority_comparison(labels: Sequence[LabelRecord], *, weighted: bool = False) -> Comparison | None:
    """One comparison for a task from all its labels (policy ``majority``); None on a tie of A against B.
    ``weighted`` (policy ``weighted``) breaks an even split by the summed strengths of each side's votes
    (:func:`strength_weight`); only an even split of equal strengths stays a tie.

    - chosen: the response most annotators preferred;
    - strength: :func:`weaker_median` of the winners' strengths;
    - safe_a / safe_b: majority of every annotator's label, a tie counts as unsafe (conservative);
    - meta: the votes, the annotators, the share who agreed, any "both bad" flags and comments.
    """
    if not labels:
        return None
    votes = Counter(r.chosen for r in labels)
    if votes["A"] == votes["B"]:
        if not weighted:
            return None
        side = {c: sum(strength_weight(r.strength) for r in labels if r.chosen == c) for c in "AB"}
        if side["A"] == side["B"]:
            return None
        winner = "A" if side["A"] > side["B"] else "B"
    else:
        winner = "A" if votes["A"] > votes["B"] else "B"
    first = labels[0]
    winners = [r for r in labels if r.chosen == winner]
    names = sorted(r.annotator for r in labels)
    meta: dict = {"task": first.task_uid, "votes": {"A": votes["A"], "B": votes["B"]}, "annotators": names,
                  "agreement": round(len(winners) / len(labels), 4), "labels": len(labels),
                  "both_bad": sum(r.both_bad for r in labels)}
    comments = [f"{r.annotator} ({shown_as(r)}): {r.comment}" for r in labels if r.comment]
    if comments:
        meta["comments"] = comments
    for name in META_FIELDS:  # any other label field: each annotator's value (a new field is never dropped)
        if name in ("both_bad", "comment"):
            continue  # counted / quoted above
        values = {r.annotator: getattr(r, name) for r in labels if getattr(r, name) is not None}
        if values:
            meta[name] = values
    if first.task_meta:
        meta["task_meta"] = first.task_meta
    if votes["A"] == votes["B"]:
        meta["tie_broken_by_strength"] = True
    strength = weaker_median([r.strength for r in winners])
    return Comparison(
        prompt=first.prompt, response_a=first.response_a, response_b=first.response_b, chosen=winner,  # type: ignore[arg-type]
        strength=Strength(strength) if strength else None,
        safe_a=majority_vote([r.safe_a for r in labels]), safe_b=majority_vote([r.safe_b for r in labels]),
        category=first.category, source_a=_source(first.source_a), source_b=_source(first.source_b),
        annotator="+".join(names), round=first.round, id=f"r{first.round}-{first.task_uid}",
        created_at=_iso(max(r.created_at for r in labels)), meta=meta,
    )


@dataclass
class ExportPlan:
    comparisons: list[Comparison]
    tasks: int  # labelled tasks considered
    ties_dropped: int  # majority: tasks whose annotators split evenly
    incomplete_skipped: int  # complete_only: tasks still missing labels
    both_bad_dropped: int


def plan_export(records: Iterable[LabelRecord], *, policy: Policy = "majority", complete_only: bool = False,
                drop_both_bad: bool = False) -> ExportPlan:
    """Apply a disagreement policy to a round's labels (ordered by task, then label)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown export policy {policy!r}; expected one of: {', '.join(POLICIES)}")
    by_task: dict[int, list[LabelRecord]] = {}
    for r in records:
        by_task.setdefault(r.task_id, []).append(r)
    out: list[Comparison] = []
    ties = incomplete = bad = 0
    for labels in by_task.values():
        if complete_only and len(labels) < labels[0].labels_needed:
            incomplete += 1
            continue
        if drop_both_bad:
            kept = [r for r in labels if not r.both_bad]
            bad += len(labels) - len(kept)
            labels = kept
            if not labels:
                continue
        if policy == "all":
            out.extend(label_comparison(r) for r in labels)
        else:
            c = majority_comparison(labels, weighted=policy == "weighted")
            if c is None:
                ties += 1
            else:
                out.append(c)
    return ExportPlan(out, len(by_task), ties, incomplete, bad)
