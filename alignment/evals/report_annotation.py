"""The report's Annotation section: who labelled each round's pairs (people or a simulated judge), with
counts, settled-short tasks, dropped ties, agreement and position bias, read from the rounds' manifests
(``align round`` projects), and a plot of labels per annotator."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignment.evals.results import pct, pyplot, save_png

_ROUND = re.compile(r"^round-(\d+)$")


def annotation_of(run: Path) -> list[dict]:
    """Who labelled each round's pairs, from the rounds' manifests (``align round`` projects; empty otherwise)."""
    out = []
    for d in sorted((p for p in run.iterdir() if p.is_dir() and _ROUND.match(p.name)),
                    key=lambda p: int(_ROUND.match(p.name).group(1))):  # type: ignore[union-attr]
        try:
            steps = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["steps"]
        except (OSError, ValueError, KeyError):
            continue
        ann = steps.get("annotate") or {}
        if ann.get("status") != "done":
            continue
        o, by = ann.get("outputs", {}), ann.get("inputs", {}).get("annotator")
        people = [a for a in o.get("annotators", []) if a.get("kind") == "human"]
        ag = o.get("agreement") or {}
        pb = o.get("position_bias") or {}
        out.append({"round": int(_ROUND.match(d.name).group(1)),  # type: ignore[union-attr]
                    "by": f"people ({len(people)} annotators)" if by == "people" else f"simulated: {by}",
                    "tasks": o.get("tasks"), "labels": o.get("labels"), "skips": o.get("skips"),
                    "settled_short": len(o.get("settled_short", [])),
                    "ties_dropped": (steps.get("export") or {}).get("outputs", {}).get("ties_dropped"),
                    "alpha": ag.get("krippendorff_alpha_choice"), "overlapping_tasks": ag.get("overlapping_tasks"),
                    "kappa": [k.get("kappa") for k in ag.get("cohen_kappa") or []],
                    "share_left": pb.get("share_left"), "human_labels": pb.get("human_labels"),
                    "per_annotator": {a["annotator"]: a["labels"] for a in o.get("annotators", [])}})
    return out


def annotation_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    def num(x: Any, fmt: str = "{:.2f}") -> str:
        return "—" if x is None else fmt.format(x)

    head = ["round", "labelled by", "tasks", "labels", "skips", "settled short", "ties dropped",
            "agreement: Krippendorff's alpha (tasks)", "Cohen's kappa (pairs)", "chose the left response"]
    body = []
    for r in rows:
        kappas = [k for k in r["kappa"] if k is not None]
        body.append([f"round {r['round']}", r["by"], num(r["tasks"], "{}"), num(r["labels"], "{}"), num(r["skips"], "{}"),
                     str(r["settled_short"]), num(r["ties_dropped"], "{}"),
                     f"{num(r['alpha'])} ({r['overlapping_tasks'] or 0})",
                     ", ".join(f"{k:.2f}" for k in kappas) or "—",
                     f"{pct(r['share_left'])} of {r['human_labels']}" if r["human_labels"] else "—"])
    return head, body


def plot_annotators(rows: Sequence[dict], path: Path) -> Path | None:
    """Labels per annotator in each round (bars grouped by annotator)."""
    names = sorted({n for r in rows for n in r["per_annotator"]})
    if not names:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.0 * len(names) + 3), 4))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [r["per_annotator"].get(n, 0) for n in names], width=width, label=f"round {r['round']}")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("labels")
    ax.set_title("Labels per annotator")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


