"""Rejection sampling with room to rank: does the reward models' pick beat a random one when K answers can differ?

    python -m benchmarks rs_room --project runs/bench-alignment-s0 [--round 1] [--samples 8] [--max-new-tokens 256]
                                 [--prompts 192]

The loop benchmark's RS control (``benchmarks alignment --rs-control``) found the ranking adds nothing measurable
(50.5 / 53.6 / 54.2% against a random pick of the same samples over three seeds), and why: with K = 4 answers of at
most 128 tokens, and only finished answers eligible, 10-14 of 42 prompts had a choice to make. This runs round
``--round``'s rejection sampling again from the same start with the same reward models, prompts and fine-tuning,
but ``--samples`` answers per prompt of at most ``--max-new-tokens`` tokens, on ``--prompts`` prompts of the
project's training pool when given (``ranked``), and again from those very samples with a seeded random eligible
pick (``random``, :func:`alignment.rs_pool.repick`). It reports:

- **what the pick keeps, by the gold** (no fine-tuning in between): on the training prompts with a choice (two or
  more eligible samples), the gold reward model's mean score of the ranked pick, of the random pick, of the gold's
  own best eligible sample and of all eligible samples; the ranked-minus-random difference with a bootstrap CI over
  prompts and the share of the gold's own gain over a random pick that the reward models' pick gets
  (``share_of_oracle_gain``, rlhf_core's best-of-n measure at this round's K).
- **what fine-tuning on the pick gives**, on the project's test prompts (greedy answers, the round eval's
  settings), by each of the project's judges: ranked vs random, ranked vs the SFT model, random vs the SFT model,
  and ranked vs the round's own policy (K = the round's), each with n, a 95% CI and the length-controlled companion.
- the room each run had (``picks``: eligible samples per prompt, prompts with a choice, picks that coincide).

Everything lands in ``<project>/controls/rs-room-round-<n>-k<K>-t<T>[-p<P>]/`` (the stages resume when killed; answers
are cached); ``benchmarks/results/rs_room.json`` keeps one entry per project and setting (``--results``: where earlier entries
are read), and every call adds a line to ``rs_room_history.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any


def pick_gains(ranked: dict[str, dict], random: dict[str, dict], gold: dict[str, list[float]], require_eos: bool, *,
               n_boot: int = 2000, seed: int = 0) -> dict:
    """The gold's view of the picks, on the prompts where there was a choice.

    ``ranked`` / ``random``: ``samples.jsonl`` records by prompt key (the same samples, each with its ``best``);
    ``gold``: the gold score of each sample of a prompt, in order. Over the prompts with two or more eligible samples
    (and a pick in both): the mean gold score of the ranked pick, the random pick, the gold's own best eligible
    sample and the mean over eligible samples (what a random pick gets in expectation); ``ranked_minus_random`` with a
    bootstrap CI over prompts; ``share_of_oracle_gain`` = (ranked - mean eligible) / (gold best - mean eligible)."""
    import numpy as np

    from alignment.evals.results import bootstrap_ci
    from alignment.rs_pool import eligible_of

    rows = []
    for key, rec in ranked.items():
        other = random.get(key)
        if other is None or rec["best"] is None or other["best"] is None or key not in gold:
            continue
        ok = eligible_of(rec["samples"], require_eos)
        if sum(ok) < 2:
            continue
        g = gold[key]
        if len(g) != len(rec["samples"]):
            raise ValueError(f"prompt {key}: {len(g)} gold scores for {len(rec['samples'])} samples")
        eligible = [s for s, e in zip(g, ok) if e]
        rows.append((g[rec["best"]], g[other["best"]], max(eligible), sum(eligible) / len(eligible)))
    if not rows:
        return {"prompts": 0}
    a = np.array(rows, dtype=np.float64)
    diff = a[:, 0] - a[:, 1]
    lo, hi = bootstrap_ci(diff.tolist(), n_boot=n_boot, seed=seed)
    room = a[:, 2].mean() - a[:, 3].mean()
    return {"prompts": len(rows), "gold_ranked": float(a[:, 0].mean()), "gold_random": float(a[:, 1].mean()),
            "gold_best": float(a[:, 2].mean()), "gold_mean_eligible": float(a[:, 3].mean()),
            "ranked_minus_random": {"diff": float(diff.mean()), "ci": [lo, hi]},
            "ranked_above_random": int((diff > 0).sum()), "ranked_below_random": int((diff < 0).sum()),
            "share_of_oracle_gain": float((a[:, 0].mean() - a[:, 3].mean()) / room) if room > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    from alignment.evals import winrate
    from alignment.evals.suite import RoundEval, _winrate_summary, respond
    from alignment.rounds import Project
    from alignment.rounds.steps import Steps
    from alignment.rs_pool import repick
    from benchmarks.alignment import cfg_of, pick_overlap
    from benchmarks.common import RESULTS
    from data.loaders import read_rows, write_jsonl
    from foundation.precision import inference_precision

    p = argparse.ArgumentParser(prog="python -m benchmarks rs_room", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="a project folder (<root>/<name>) whose rejection-sampling round ran")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--samples", type=int, default=8, help="answers per prompt (K)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=0,
                   help="prompts from the project's training pool (0: the round's own number, policy.rs.prompts)")
    p.add_argument("--results", default=str(RESULTS / "rs_room.json"))
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    if a.samples < 2 or a.max_new_tokens < 1 or a.prompts < 0:
        raise SystemExit("--samples must be >= 2, --max-new-tokens >= 1 and --prompts >= 0")
    project = Path(a.project).resolve()
    if not (project / "round.yaml").is_file():
        raise SystemExit(f"{project}: no project here (no round.yaml); --project names a folder <root>/<name> of `align round`")
    proj, n = Project(project.parent, project.name), a.round
    if proj.cfg.method(n) != "rs":
        raise SystemExit(f"{project}: round {n}'s policy stage is {proj.cfg.method(n)}, not rejection sampling (rs)")
    src = proj.round_dir(n) / "policy"
    if not (src / "summary.json").is_file():
        raise SystemExit(f"{src}: round {n}'s rejection sampling has not finished")
    t0 = time.time()
    setting = [f"sampling.num_samples={a.samples}", f"sampling.max_new_tokens={a.max_new_tokens}"]
    home = project / "controls" / f"rs-room-round-{n}-k{a.samples}-t{a.max_new_tokens}{f'-p{a.prompts}' if a.prompts else ''}"
    if a.prompts:  # more (or fewer) prompts of the same pool, the round's held-out share of them kept out
        setting.append(f"data.sources=[{json.dumps({'path': str(proj.pool_path), 'limit': a.prompts})}]")
    ranked_dir, random_dir = home / "ranked", home / "random"
    for d in (ranked_dir, random_dir):
        d.mkdir(parents=True, exist_ok=True)
    if not a.prompts:  # the same start on the same held-out prompts: evaluated once (the eval decoding does not change)
        for d in (ranked_dir, random_dir):
            if not (d / "eval_before.json").is_file():
                shutil.copyfile(src / "eval_before.json", d / "eval_before.json")
    cfg = cfg_of(src)
    seed, require_eos = int(cfg["run"]["seed"]), bool(cfg["sampling"]["require_eos"])
    steps = Steps(proj, n)
    steps.policy(out=ranked_dir, last=setting)
    ranked_rows = [row for _, row in read_rows(ranked_dir / "samples.jsonl")]
    if not (random_dir / "config.yaml").is_file():  # not started: the ranked run's samples, picked at random
        write_jsonl(random_dir / "samples.jsonl", repick(ranked_rows, "random", seed, require_eos), overwrite=True)
        if not (random_dir / "eval_before.json").is_file():  # and the start as the ranked run evaluated it
            shutil.copyfile(ranked_dir / "eval_before.json", random_dir / "eval_before.json")
    steps.policy(out=random_dir, last=[*setting, "sampling.pick=random"])
    kept = {name: {row["key"]: row for _, row in read_rows(d / "samples.jsonl")}
            for name, d in (("ranked", ranked_dir), ("random", random_dir))}

    ev = RoundEval(proj, n)
    with inference_precision(ev.p.eval_dtype()):  # answers and judges in the eval step's dtype, the RS control's reused
        judges = list(ev.e.judges)
        gold_judge = next((j for j in judges if j == "gold_rm"), None)
        picks: dict[str, Any] = {"ranked_vs_random": pick_overlap(kept["ranked"], kept["random"], cfg_of(ranked_dir))}
        if gold_judge:
            picks["by_the_gold"] = pick_gains(kept["ranked"], kept["random"],
                                              gold_scores(ev.judge_scorer(gold_judge, []), kept["ranked"], require_eos),
                                              require_eos, seed=proj.cfg.seed)

        records = proj.heldout()
        gen = {"max_new_tokens": ev.e.max_new_tokens, "batch_size": ev.e.batch_size, "seed": proj.cfg.seed}
        earlier = project / "controls" / f"rs-random-round-{n}" / "eval"  # the RS control's answers, same settings
        answers = {"ranked": home / "eval" / "ranked_heldout_responses.jsonl",
                   "random": home / "eval" / "random_heldout_responses.jsonl",
                   "round": _reuse(earlier / "rs_heldout_responses.jsonl", home / "eval" / "round_heldout_responses.jsonl"),
                   "sft": _reuse(earlier / "sft_heldout_responses.jsonl", home / "eval" / "sft_heldout_responses.jsonl")}
        models = {"ranked": str(ranked_dir), "random": str(random_dir), "round": proj.policy_of(n), "sft": proj.sft_model()}
        answers["ranked"].parent.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            respond(model, records, answers[name], **gen)
        sides = {"ranked_vs_random": ("ranked", "random"), "ranked_vs_sft": ("ranked", "sft"),
                 "random_vs_sft": ("random", "sft"), "ranked_vs_round": ("ranked", "round")}
        result: dict[str, Any] = {"project": str(project), "round": n, "samples": a.samples, "max_new_tokens": a.max_new_tokens,
                                  "prompts": a.prompts or proj.cfg.spec("rs").prompts, "overrides": setting,
                                  "round_samples": cfg["sampling"]["num_samples"],
                                  "round_max_new_tokens": cfg["sampling"]["max_new_tokens"], "judges": judges,
                                  "models": models, "picks": picks,
                                  "pool_new": {name: json.loads((d / "summary.json").read_text()).get("pool_new")
                                               for name, d in (("ranked", ranked_dir), ("random", random_dir))},
                                  "test_prompts": len(records)}
        for judge in judges:
            scorer = ev.judge_scorer(judge, records)
            for name, (x, y) in sides.items():
                res = winrate.run(models[x], models[y], prompts=str(proj.heldout_path), judge="rm", out=home / "eval",
                                  scorer=scorer, responses=str(answers[x]), baseline_responses=str(answers[y]),
                                  tie_margin=proj.cfg.gold.tie_margin if judge == "gold" else 0.0, n_boot=ev.e.bootstrap,
                                  seed=proj.cfg.seed, name=f"winrate-{judge}-{name.replace('_', '-')}", overwrite=True)
                result[f"winrate_{judge}_{name}"] = _winrate_summary(res)
    result.update(minutes_this_call=round((time.time() - t0) / 60, 1), note=a.note)
    (home / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    _print(result)
    return {"runs": merged(Path(a.results), result), "latest": key_of(result)}


def gold_scores(scorer: Any, records: dict[str, dict], require_eos: bool, batch: int = 16) -> dict[str, list[float]]:
    """The gold score of every sample of the prompts with a choice (two or more eligible samples), by prompt key."""
    from alignment.rs_pool import eligible_of

    todo = [(key, i, rec["prompt"], s["response"]) for key, rec in records.items()
            if sum(eligible_of(rec["samples"], require_eos)) >= 2 for i, s in enumerate(rec["samples"])]
    out: dict[str, list[float]] = {}
    for k in range(0, len(todo), batch):
        chunk = todo[k:k + batch]
        values = scorer.score([c[2] for c in chunk], [c[3] for c in chunk]).tolist()
        for (key, _, _, _), v in zip(chunk, values):
            out.setdefault(key, []).append(float(v))
    return out


def _reuse(path: Path, fallback: Path) -> Path:
    return path if path.is_file() else fallback


def key_of(result: dict) -> str:
    return (f"{Path(result['project']).name}:round-{result['round']}:k{result['samples']}:t{result['max_new_tokens']}"
            f":p{result['prompts']}")


def merged(path: Path, result: dict) -> dict:
    """Every entry of ``path`` (the part's results file, rewritten by ``python -m benchmarks``) with this one added or
    replaced: one per (project, round, K, T). The history file beside it gets a line per call."""
    from benchmarks.common import machine

    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[key_of(result)] = {**result, "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.stem + "_history.jsonl").open("a") as f:
        f.write(json.dumps({"key": key_of(result), "minutes_this_call": result["minutes_this_call"], "note": result["note"],
                            "picks": result["picks"],
                            **{k: v for k, v in result.items() if k.startswith("winrate_")}}) + "\n")
    return runs


def _print(result: dict) -> None:
    from benchmarks.common import table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    rows = []
    for judge in result["judges"]:
        for side in ("ranked_vs_random", "ranked_vs_sft", "random_vs_sft", "ranked_vs_round"):
            w = result.get(f"winrate_{judge}_{side}") or {}
            if w:
                rows.append([judge, side, f"{pct(w['win_rate'])} [{pct(w['ci_low'])}, {pct(w['ci_high'])}]",
                             pct(w.get("lc_win_rate")), w["n"]])
    print(table(rows, ["judge", "comparison", "win rate [95% CI]", "LC", "n"]))
    g = result["picks"].get("by_the_gold") or {}
    if g.get("prompts"):
        d = g["ranked_minus_random"]
        print(f"kept samples by the gold on {g['prompts']} prompts with a choice: ranked {g['gold_ranked']:.3f}, random "
              f"{g['gold_random']:.3f}, gold's best {g['gold_best']:.3f}, mean eligible {g['gold_mean_eligible']:.3f}; "
              f"ranked - random {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]; share of the oracle's gain "
              f"{g['share_of_oracle_gain']}")

