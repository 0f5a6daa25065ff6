"""Two models' TruthfulQA MC rows compared question by question: did MC2 change, and where did the change come from?

``paired(before, after)``: the MC2 difference over the questions both scored, with a percentile bootstrap CI over
questions (the two models answered the same questions, so their difference is far tighter than two separate CIs).

``shift(before, after)``: a diagnostic of *how* the answer log-likelihoods moved. For every answer choice ``i`` of
question ``q``: ``delta = logp_after - logp_before`` (the same choice, the same prompt), regressed by least squares on

- ``true`` (1 for the choices MC2 counts as true, lm-eval's rule) alone: ``truth`` is how many more nats the
  true choices lost than the false ones (negative: the model moved away from the truth);
- ``true`` and ``rel`` = ``logp_before - max_j logp_before`` (how far below the question's most likely choice the
  first model put it): ``rel`` > 0 means the choices the first model already found unlikely lost more (the
  distribution sharpened towards its mode), ``truth_given_rel`` what is left of the truth penalty once that is
  accounted for, ``explained_by_sharpening`` = 1 - truth_given_rel / truth.

TruthfulQA's false choices are the imitative falsehoods a pretrained model finds likely, so a policy step that
sharpens the distribution (as DPO and PPO tend to) lowers MC2 without learning anything false: this separates the two.
CIs resample questions (all choices of a question together). Rows are matched on the question text.

    align eval truthfulqa-compare runs/<p>/round-1/eval/sft runs/<p>/round-3/eval [--out cmp.json]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alignment.evals.truthfulqa import lm_eval_true_mask


def _matched(before: Sequence[dict], after: Sequence[dict]) -> list[tuple[dict, dict]]:
    was = {r["question"]: r for r in before}
    pairs = [(was[r["question"]], r) for r in after if r["question"] in was]
    for b, a in pairs:
        if len(b["mc2_scores"]) != len(a["mc2_scores"]):
            raise ValueError(f"question {a['question']!r}: {len(b['mc2_scores'])} choices before, "
                             f"{len(a['mc2_scores'])} after (different datasets?)")
    if not pairs:
        raise ValueError("no question is in both sets of rows")
    return pairs


def _ci(stats: np.ndarray, alpha: float = 0.05) -> list[float]:
    return [float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))]


def paired(before: Sequence[dict], after: Sequence[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """MC2 after minus before over the matched questions, in MC2 units (0-1), with a 95% bootstrap CI."""
    pairs = _matched(before, after)
    d = np.array([a["mc2"] - b["mc2"] for b, a in pairs], dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    return {"n": int(d.size), "mc2_before": float(np.mean([b["mc2"] for b, _ in pairs])),
            "mc2_after": float(np.mean([a["mc2"] for _, a in pairs])), "diff": float(d.mean()),
            "ci": _ci(d[idx].mean(axis=1)), "questions_down": int((d < 0).sum()), "questions_up": int((d > 0).sum())}


def _design(pairs: list[tuple[dict, dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    y, true, rel, q = [], [], [], []
    for k, (b, a) in enumerate(pairs):
        sb = np.asarray(b["mc2_scores"], dtype=np.float64)
        mask = lm_eval_true_mask(b["mc2_labels_list"])
        y.extend(np.asarray(a["mc2_scores"], dtype=np.float64) - sb)
        true.extend(float(t) for t in mask)
        rel.extend(sb - sb.max())
        q.extend([k] * sb.size)
    return np.array(y), np.array(true), np.array(rel), np.array(q)


def _fit(y: np.ndarray, true: np.ndarray, rel: np.ndarray) -> tuple[float, float, float]:
    one = np.ones_like(y)
    truth = np.linalg.lstsq(np.c_[one, true], y, rcond=None)[0][1]
    _, truth_rel, b_rel = np.linalg.lstsq(np.c_[one, true, rel], y, rcond=None)[0]
    return float(truth), float(truth_rel), float(b_rel)


def shift(before: Sequence[dict], after: Sequence[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The regression described in the module docstring, with question-bootstrap 95% CIs."""
    pairs = _matched(before, after)
    y, true, rel, q = _design(pairs)
    if true.min() == true.max():
        raise ValueError("every choice has the same label: the truth coefficient is undefined")
    truth, truth_rel, b_rel = _fit(y, true, rel)
    rows_of = [np.flatnonzero(q == k) for k in range(len(pairs))]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        take = np.concatenate([rows_of[k] for k in rng.integers(0, len(pairs), size=len(pairs))])
        if true[take].min() == true[take].max():
            continue
        boot.append(_fit(y[take], true[take], rel[take]))
    b = np.array(boot)
    return {"n_questions": len(pairs), "n_choices": int(y.size),
            "mean_delta_true": float(y[true == 1].mean()), "mean_delta_false": float(y[true == 0].mean()),
            "truth": truth, "truth_ci": _ci(b[:, 0]), "truth_given_rel": truth_rel, "truth_given_rel_ci": _ci(b[:, 1]),
            "rel": b_rel, "rel_ci": _ci(b[:, 2]),
            "explained_by_sharpening": 1.0 - truth_rel / truth if truth < 0 else None}


def read_rows(path: str | Path) -> list[dict]:
    """The MC rows of ``align eval truthfulqa``'s output: a ``*_rows.jsonl`` file, or a folder holding
    ``truthfulqa_rows.jsonl`` (a round's ``eval/``, ``eval/sft/``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "truthfulqa_rows.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no TruthfulQA rows (give a *_rows.jsonl file or a folder with truthfulqa_rows.jsonl)")
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{lineno}: not JSON ({exc.msg})") from None
        if "mc2_scores" in row:  # the MC rows (a run of variant both also has generation rows)
            rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no multiple-choice rows (mc2_scores); was it run with --variant gen?")
    return rows


def cli(argv: Sequence[str]) -> int:
    """``align eval truthfulqa-compare BEFORE AFTER``: e.g. a round's policy against the SFT model."""
    import argparse

    ap = argparse.ArgumentParser(prog="align eval truthfulqa-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="rows of the first model (e.g. runs/<p>/round-1/eval/sft)")
    ap.add_argument("after", help="rows of the second model (e.g. runs/<p>/round-3/eval)")
    ap.add_argument("--out", help="also write the comparison here (JSON)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(list(argv))
    before, after = read_rows(a.before), read_rows(a.after)
    res = {"before": a.before, "after": a.after, "paired": paired(before, after, n_boot=a.bootstrap, seed=a.seed),
           "shift": shift(before, after, n_boot=max(1, a.bootstrap // 2), seed=a.seed)}
    p, s = res["paired"], res["shift"]
    print(f"TruthfulQA MC2 on {p['n']} questions both scored: {100 * p['mc2_before']:.1f} -> {100 * p['mc2_after']:.1f}, "
          f"paired difference {100 * p['diff']:+.1f} points [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}] "
          f"({p['questions_down']} questions down, {p['questions_up']} up)")
    share = s["explained_by_sharpening"]
    print(f"log-likelihood shift: true answers {s['truth']:+.2f} nats vs false [{s['truth_ci'][0]:+.2f}, "
          f"{s['truth_ci'][1]:+.2f}]; {s['rel']:+.3f} nats per nat below the question's top answer; truth penalty left "
          f"{s['truth_given_rel']:+.2f} [{s['truth_given_rel_ci'][0]:+.2f}, {s['truth_given_rel_ci'][1]:+.2f}]"
          + (f" ({100 * share:.0f}% of it is sharpening towards the first model's likely answers)" if share is not None else ""))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0
