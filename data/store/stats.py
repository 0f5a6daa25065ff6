"""Round statistics from stored labels: per-annotator counts and speed, the strength and safety-bin
distributions, position bias, and agreement on overlapping tasks. Pure functions over
:class:`data.store.export.LabelRecord`; the store adds the task counts.
"""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence

from data.schemas import SafetyBin, Strength
from data.store import agreement
from data.store.export import LabelRecord, label_comparison


def annotator_table(records: Sequence[LabelRecord], skips: dict[tuple[str, str], int], now: dt.datetime) -> list[dict]:
    """One row per annotator: labels (all, today since 00:00 UTC), skips, "both bad" flags, how often
    they chose the left side, median seconds per label and the labels per hour that implies."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    rows: dict[str, dict] = {}
    secs: dict[str, list[float]] = {}

    def row(name: str, kind: str) -> dict:
        return rows.setdefault(name, {"annotator": name, "kind": kind, "labels": 0, "today": 0, "skips": 0, "both_bad": 0,
                                      "chose_left": 0})

    for r in records:
        d = row(r.annotator, r.annotator_kind)
        d["labels"] += 1
        d["today"] += r.created_at >= midnight
        d["both_bad"] += r.both_bad
        d["chose_left"] += r.chose_left
        if r.seconds is not None:
            secs.setdefault(r.annotator, []).append(r.seconds)
    for (name, kind), n in skips.items():  # (annotator, kind) -> skipped tasks
        row(name, kind)["skips"] = n
    for name, d in rows.items():
        s = secs.get(name)
        d["median_seconds"] = round(statistics.median(s), 1) if s else None
        d["labels_per_hour"] = round(3600.0 / statistics.median(s), 1) if s and statistics.median(s) > 0 else None
    return sorted(rows.values(), key=lambda d: (-d["labels"], d["annotator"]))


def distributions(records: Sequence[LabelRecord]) -> dict:
    """Counts of each strength and of Llama 2's safety bins (plus the dropped chosen-unsafe bin)."""
    strengths = {s.value: 0 for s in Strength}
    bins = {b.value: 0 for b in SafetyBin}
    unlabelled = 0
    for r in records:
        if r.strength:
            strengths[r.strength] += 1
        b = label_comparison(r).safety_bin
        if b is None:
            unlabelled += 1
        else:
            bins[b.value] += 1
    return {"strengths": strengths, "safety_bins": bins, "safety_unlabelled": unlabelled}


def agreement_stats(records: Sequence[LabelRecord]) -> dict:
    """Cohen's kappa per pair of annotators (on the tasks both labelled) and Krippendorff's alpha
    over every task with two or more labels: nominal on the choice, interval on the signed
    preference (+4 = A significantly better ... -4 = B significantly better)."""
    by_task: dict[int, dict[str, LabelRecord]] = {}
    for r in records:
        by_task.setdefault(r.task_id, {})[r.annotator] = r
    shared = [labs for labs in by_task.values() if len(labs) >= 2]
    names = sorted({n for labs in shared for n in labs})
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = [labs for labs in shared if a in labs and b in labs]
            if not common:
                continue
            kappa = agreement.cohen_kappa([c[a].chosen for c in common], [c[b].chosen for c in common])
            agree = sum(c[a].chosen == c[b].chosen for c in common) / len(common)
            pairs.append({"a": a, "b": b, "tasks": len(common), "agreement": round(agree, 4),
                          "kappa": None if kappa is None else round(kappa, 4)})
    alpha_c = agreement.krippendorff_alpha([[r.chosen for r in labs.values()] for labs in shared], "nominal")
    alpha_p = agreement.krippendorff_alpha(
        [[agreement.signed_preference(r.chosen, r.strength) for r in labs.values()] for labs in shared], "interval")
    return {"overlapping_tasks": len(shared), "labels": sum(len(v) for v in shared), "cohen_kappa": pairs,
            "krippendorff_alpha_choice": None if alpha_c is None else round(alpha_c, 4),
            "krippendorff_alpha_preference": None if alpha_p is None else round(alpha_p, 4)}


def summarize(records: Sequence[LabelRecord], *, round: int | None, now: dt.datetime, tasks: int, labels_needed: int,
              labels_done: int, missing: int, complete_tasks: int, overlap_tasks: int, skips: dict[tuple[str, str], int]) -> dict:
    """Everything ``align annotate stats`` and the admin tab show (JSON-ready)."""
    human = [r for r in records if r.annotator_kind == "human"]
    left = sum(r.chose_left for r in human)
    return {
        "round": round, "tasks": tasks, "labels_needed": labels_needed, "labels_done": labels_done, "missing": missing,
        "complete_tasks": complete_tasks, "overlap_tasks": overlap_tasks, "skips": sum(skips.values()),
        "both_bad": sum(r.both_bad for r in records),
        "annotators": annotator_table(records, skips, now),
        **distributions(records),
        "position_bias": {"human_labels": len(human), "chose_left": left,
                          "share_left": None if not human else float(f"{left / len(human):.4f}")},
        "agreement": agreement_stats(records),
    }
