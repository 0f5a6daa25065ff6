"""What a round's policy step costs on TruthfulQA, and which setting of it costs less, decided on validation data only.

    python -m benchmarks truthfulqa_tax --project runs/bench-alignment-s0 --round 3 \\
        [--variant beta_0.3=dpo.beta=0.3 --variant nll_0.2='dpo.loss_weights=[1.0, 0.2]' ...]

The loop benchmark's DPO round lowers TruthfulQA MC2 by more than the 2 points allowed (seed 0: -2.4 [-4.5, -0.7]
in that round alone), and ``alignment.evals.truthfulqa_compare.shift`` says most of it is the policy sharpening
towards the answers it already found likely. This trains round ``--round``'s policy step again from the same start
on the same data (``round-N/policy/config.yaml``, the stage's resolved config) once per ``--variant`` (extra
``key=value`` overrides), and reads, for the round's start, the round's own policy ("as_run"), the SFT model and
every variant:

- **TruthfulQA MC2 on tuning questions**: ``--questions`` drawn (seed ``--question-seed``) from the questions that
  none of the seeds ``--exclude-seeds`` draws for its reported numbers (the round eval's seeded sample of
  ``eval.truthfulqa.sample``): the reported questions never decide anything. Paired against the start and the
  SFT model, with the sharpening diagnostic against the start.
- **the win rate against the round's start on the project's validation prompts** by the project's first judge
  (what promotion reads), with its length-controlled companion.
- **ToxiGen % toxic on tuning prompts** (when the project evaluates ToxiGen; ``--toxigen-per-group``, 0 = off):
  ``--toxigen-per-group`` prompts per ToxiGen list and type drawn (seed ``--question-seed``) from the lines that none of
  the seeds ``--exclude-seeds`` draws for its reported ToxiGen numbers (``eval.toxigen.per_group`` a list), continued
  as the round's eval continues them (greedy, chat mode, ``eval.toxigen.max_new_tokens``), with the paired change
  against the start and the SFT model. Reported beside the choice; the rule below does not read it.

``chosen``: among the models whose validation win rate against the start has its 95% CI above 50% (the round
still improves the policy), the one with the highest tuning MC2. Variants are trained into
``<project>/truthfulqa_tax/<variant>`` (resumed if killed) and their answers and rows cached there, so a second
call only reads.

One seed's validation set (64 prompts in the loop benchmark) cannot tell a 60% win rate from 50%, so the results
file keeps one entry per project and round (``--results``: earlier entries are read from it and kept) and
``pooled`` reads every setting over all the projects that trained it: their validation outcomes as one sample of
prompts (each seed's own validation prompts; CI and length-controlled companion), and the tuning MC2 against each
project's start and SFT model averaged over projects question by question (the tuning questions are the same in
every project), with a CI over questions. ``pooled.chosen`` applies the rule above to the pooled numbers, among the
settings that every project trained. ``python -m benchmarks truthfulqa_tax`` writes
``benchmarks/results/truthfulqa_tax.json``; every call adds a line to ``truthfulqa_tax_history.jsonl`` beside it
(``--history``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_VARIANTS = {"beta_0.3": ["dpo.beta=0.3"], "nll_0.2": ["dpo.loss_weights=[1.0, 0.2]"], "lr_1e-4": ["train.lr=1.0e-4"]}


def tuning_questions(data: str, *, reported: int | None, exclude_seeds: list[int], n: int | None, seed: int) -> tuple[list, dict]:
    """TruthfulQA items that no seed in ``exclude_seeds`` reports (each reports ``seeded_sample(all, reported, seed)``,
    as a round's eval does), then a seeded sample of ``n`` of them."""
    from alignment.evals.truthfulqa_data import load_items, seeded_sample

    items = load_items(data)
    taken = {it.question for s in exclude_seeds for it in seeded_sample(items, reported, s)}
    free = [it for it in items if it.question not in taken]
    if not free:
        raise SystemExit(f"{data}: every question is in a reported sample of seeds {exclude_seeds}: no tuning questions left")
    picked = seeded_sample(free, n, seed)
    return picked, {"data": data, "all": len(items), "reported_by_excluded_seeds": len(taken), "free": len(free),
                    "n": len(picked), "seed": seed, "exclude_seeds": exclude_seeds, "reported_sample": reported}


def truthfulqa_rows(model: str, items: list, path: Path) -> list[dict]:
    """MC rows of ``model`` on ``items``, computed once in the enclosing dtype (``inference_precision``; each row says
    it) and read back from ``path`` after; rows of other questions or another dtype are computed again."""
    from alignment.evals.truthfulqa import evaluate_mc
    from data.loaders import write_jsonl
    from foundation.models import load_causal_lm, load_tokenizer
    from foundation.precision import dtype_name

    dtype = dtype_name()
    if path.is_file():
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if [r["question"] for r in rows] == [it.question for it in items] and _in_dtype(rows, dtype, path):
            return rows
    lm, tok = load_causal_lm(model), load_tokenizer(model)
    rows = [{**r, "dtype": dtype} for r in evaluate_mc(lm, tok, items)["rows"]]
    del lm
    write_jsonl(path, rows, overwrite=True)
    return rows


def _in_dtype(rows: list[dict], dtype: str, path: Path) -> bool:
    """Whether cached ``rows`` were computed in ``dtype`` (rows from before they said: fp32, the CPU's dtype then)."""
    from foundation.precision import rows_dtypes

    made_in = rows_dtypes(rows)
    if made_in != {dtype}:
        log.warning("%s: computed in %s, this call runs in %s; computing again", path, ", ".join(sorted(made_in)), dtype)
        return False
    return True


def toxigen_prompts(folder: str, *, per_group: int, reported_per_group: int, exclude_seeds: list[int],
                    seed: int) -> tuple[list, dict]:
    """``per_group`` ToxiGen prompts per list and type that no seed in ``exclude_seeds`` reports (each reports
    ``sample_prompts(folder, per_group=reported_per_group, seed=s)``, as a round's eval does), drawn with
    ``random.Random(f"{seed}:{list}")`` from each list's free lines, in line order."""
    from alignment.evals.toxigen import draw_free, sample_prompts

    taken = {p.source for s in exclude_seeds for p in sample_prompts(folder, per_group=reported_per_group, seed=s)}
    out = draw_free(folder, per_group=per_group, taken=taken, label=str(seed))
    return out, {"data": folder, "per_group": per_group, "n": len(out), "seed": seed, "exclude_seeds": exclude_seeds,
                 "reported_per_group": reported_per_group, "reported_by_excluded_seeds": len(taken)}


def toxigen_rows(model: str, prompts: list, path: Path, *, max_new_tokens: int, batch_size: int, seed: int) -> list[dict]:
    """Greedy chat continuations of ``prompts`` by ``model`` and their toxicity (``toxigen.continue_and_classify``, as a
    round's eval makes them), computed once and read back after."""
    from alignment.evals.toxicity import load_classifier
    from alignment.evals.toxigen import continue_and_classify
    from data.loaders import write_jsonl
    from foundation.models import load_causal_lm, load_tokenizer
    from foundation.precision import dtype_name

    dtype = dtype_name()
    if path.is_file():
        rows = _rows(str(path))
        if [r["source"] for r in rows] == [p.source for p in prompts] and _in_dtype(rows, dtype, path):
            return [{**r, "prompt": p.text} for r, p in zip(rows, prompts)]  # rows cached before they kept the prompt
    clf = load_classifier(None)
    lm, tok = load_causal_lm(model), load_tokenizer(model)
    rows, _ = continue_and_classify(lm, tok, clf, prompts, mode="chat", max_new_tokens=max_new_tokens, temperature=0.0,
                                    batch_size=batch_size, seed=seed)
    rows = [{**r, "dtype": dtype} for r in rows]
    del lm
    write_jsonl(path, rows, overwrite=True)
    return rows


def choose(models: dict[str, dict]) -> str | None:
    """The model with the highest tuning MC2 among those whose validation win rate against the start has its CI
    above 50% (None when none has)."""
    ok = [(m["truthfulqa"]["mc2"], name) for name, m in models.items()
          if (m.get("validation_vs_start") or {}).get("ci_low", 0) > 0.5]
    return max(ok)[1] if ok else None


def key_of(result: dict) -> str:
    return f"{Path(result['project']).name}:round-{result['round']}"


def earlier_runs(path: Path) -> dict[str, dict]:
    """The entries of a results file: ``runs`` by key, or the one run a file written before the keyed layout held."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if "runs" in data:
        return dict(data["runs"])
    return {key_of(data): {k: v for k, v in data.items() if k not in ("part", "command", "seconds")}} if "project" in data else {}


def validation_rows(result: dict, name: str) -> Path:
    """The per-prompt rows of model ``name``'s validation win rate against the start in one run."""
    given = (result["models"][name].get("validation_vs_start") or {}).get("rows")
    return Path(given) if given else (Path(result["project"]) / "truthfulqa_tax" / "winrate"
                                      / f"validation-{result['judge']}-{name}-vs-start_rows.jsonl")


def _check_one_dtype(runs: dict[str, dict]) -> None:
    dtypes = {k: r.get("dtype", "float32") for k, r in runs.items()}  # entries from before they said: fp32 (CPU)
    if len(set(dtypes.values())) > 1:
        raise SystemExit(f"truthfulqa_tax: the runs to pool were evaluated in different dtypes ({dtypes}); pooling them "
                         "would mix precisions (run the others again in one dtype, or keep them in another --results file)")


def pooled(runs: dict[str, dict], *, n_boot: int = 2000) -> dict:
    """Every trained setting (and ``as_run``) over the runs that have it: validation outcomes pooled as one sample of
    prompts, with the win rate's CI and its length-controlled companion; tuning MC2 minus the start's and minus the
    SFT model's, averaged over runs question by question, with a bootstrap CI over questions. ``chosen``: the rule of
    ``choose`` on these numbers, among the settings every run has."""
    import numpy as np

    from alignment.evals import lcwr, winrate

    _check_one_dtype(runs)
    names = list(dict.fromkeys(n for r in runs.values() for n in r["models"] if n not in ("sft", "start")))
    settings: dict[str, dict] = {}
    for name in names:
        keys = [k for k, r in runs.items() if name in r["models"]]
        outcomes: list[float] = []
        len_a: list[int] = []
        len_b: list[int] = []
        for k in keys:
            for line in validation_rows(runs[k], name).read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    outcomes.append(float(row["outcome"]))
                    len_a.append(len(row["response"]))
                    len_b.append(len(row["baseline_response"]))
        w = winrate.summarise(outcomes, n_boot=n_boot, seed=0)
        lc = lcwr.summarise(outcomes, len_a, len_b, n_boot=n_boot // 2, seed=0)
        entry: dict[str, Any] = {"runs": keys, "validation_vs_start": {**w, "lc_win_rate": lc["lc_win_rate"],
                                                                      "lc_ci_low": lc["ci_low"], "lc_ci_high": lc["ci_high"]}}
        for bench, key, value, scale in (("truthfulqa", "question", "mc2", 1.0), ("toxigen", "source", "toxic", 100.0)):
            if bench == "toxigen" and not all((runs[k]["models"][name].get("toxigen") or {}).get("rows") for k in keys):
                continue
            for ref in ("start", "sft"):
                diffs = []
                for k in keys:
                    rows = {m: _rows(runs[k]["models"][m][bench]["rows"]) for m in (name, ref)}
                    if [r[key] for r in rows[name]] != [r[key] for r in rows[ref]]:
                        raise ValueError(f"{k}: {name} and {ref} were read on other {bench} items")
                    diffs.append(([r[key] for r in rows[name]],
                                  [scale * (float(a[value]) - float(b[value])) for a, b in zip(rows[name], rows[ref])]))
                if any(q != diffs[0][0] for q, _ in diffs):
                    raise ValueError(f"{name}: the runs {keys} read other tuning {bench} items; pooling needs the same ones")
                d = np.mean([v for _, v in diffs], axis=0)
                means = d[np.random.default_rng(0).integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
                entry[f"{'mc2' if bench == 'truthfulqa' else 'toxic'}_vs_{ref}"] = {
                    "diff": float(d.mean()), "ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
                    "per_run": [float(np.mean(v)) for _, v in diffs], "items": int(d.size)}
        settings[name] = entry
    every = {n: s for n, s in settings.items() if len(s["runs"]) == len(runs)}
    ok = [(s["mc2_vs_start"]["diff"], n) for n, s in every.items() if s["validation_vs_start"]["ci_low"] > 0.5]
    return {"runs": list(runs), "settings": settings, "chosen": max(ok)[1] if ok else None,
            "rule": "among the settings every run trained: the highest mean tuning MC2 vs the start among those whose pooled "
                    "validation win rate vs the start has its 95% CI above 50%"}


def _rows(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    from alignment.evals.results import first_existing
    from alignment.evals.suite import RoundEval, _winrate_summary, respond
    from alignment.evals.toxigen import paired_change
    from alignment.evals.truthfulqa_compare import paired, shift
    from alignment.rounds import Project
    from alignment.rounds.config import StageSpec
    from alignment.rounds.steps import run_stage
    from foundation.precision import effective_inference_dtype, inference_precision
    from benchmarks.common import RESULTS
    from data.splits import selecting

    p = argparse.ArgumentParser(prog="python -m benchmarks truthfulqa_tax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", required=True, help="a project folder (<root>/<name>) whose round --round has run")
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=key=value[,key=value]",
                   help=f"a setting to train (repeatable; default {DEFAULT_VARIANTS})")
    p.add_argument("--questions", type=int, default=200, help="tuning questions (0 = all that are free)")
    p.add_argument("--question-seed", type=int, default=1000)
    p.add_argument("--exclude-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="the seeds whose reported TruthfulQA and ToxiGen samples are never read here")
    p.add_argument("--toxigen-per-group", type=int, default=8,
                   help="ToxiGen tuning prompts per list and type (0 = no ToxiGen reading)")
    p.add_argument("--results", default=str(RESULTS / "truthfulqa_tax.json"),
                   help="the results file whose entries for other projects are kept (and pooled)")
    p.add_argument("--history", default=str(RESULTS / "truthfulqa_tax_history.jsonl"), help="a line per call is added here")
    p.add_argument("--note", default="")
    a = p.parse_args(argv)
    variants = dict(DEFAULT_VARIANTS)
    if a.variant:
        variants = {}
        for v in a.variant:
            name, _, rest = v.partition("=")
            if not name or not rest:
                raise SystemExit(f"--variant {v!r}: expected NAME=key=value[,key=value]")
            variants[name] = _split_overrides(rest)
    project = Path(a.project).resolve()
    proj = Project(project.parent, project.name)
    dtype = effective_inference_dtype(proj.eval_dtype())  # what the block below runs in
    this = key_of({"project": str(project), "round": a.round})
    _check_one_dtype({**{k: r for k, r in earlier_runs(Path(a.results)).items() if k != this},
                      this: {"dtype": dtype}})  # before anything trains: the entries this call would pool with
    stage_dir = proj.round_dir(a.round) / "policy"
    config = stage_dir / "config.yaml"
    if not (stage_dir / "model").is_dir() or not config.is_file():
        raise SystemExit(f"{stage_dir}: round {a.round}'s policy step has not finished")
    import yaml

    stage_cfg = yaml.safe_load(config.read_text())
    stage, start = stage_cfg["stage"], stage_cfg["model"]["name"]
    settings = proj.cfg.eval.truthfulqa
    data = first_existing(settings.data) if settings else None
    if not data:
        raise SystemExit(f"{project}: no TruthfulQA data ({settings.data if settings else 'eval.truthfulqa is off'})")
    items, questions = tuning_questions(data, reported=settings.sample, exclude_seeds=a.exclude_seeds,
                                        n=a.questions or None, seed=a.question_seed)
    tox = proj.cfg.eval.toxigen
    tox_data = first_existing(tox.data) if tox and a.toxigen_per_group > 0 else None
    tox_prompts, tox_info = (toxigen_prompts(tox_data, per_group=a.toxigen_per_group, reported_per_group=tox.per_group,
                                             exclude_seeds=a.exclude_seeds, seed=a.question_seed)
                             if tox_data else ([], None))
    work = project / "truthfulqa_tax"
    models: dict[str, dict[str, Any]] = {"sft": {"model": proj.sft_model()}, "start": {"model": start},
                                         "as_run": {"model": str(stage_dir), "overrides": []}}
    t0 = time.time()
    for name, overrides in variants.items():
        if name in models:
            raise SystemExit(f"--variant {name}: the name is taken (sft, start, as_run)")
        t = time.time()
        summary = run_stage(stage, StageSpec(config=str(config), overrides=overrides), work / name, [])
        models[name] = {"model": str(work / name), "overrides": overrides, "train_seconds": summary.get("train_seconds"),
                        "wall_seconds_this_call": round(time.time() - t, 1)}
    validation = proj.validation()
    if not validation:
        raise SystemExit(f"{project}: no validation prompts")
    ev = RoundEval(proj, a.round)
    judge = proj.cfg.eval.judges[0]
    base_rows, tox_rows = {}, {}
    # answers, judges and TruthfulQA/ToxiGen rows in the eval step's dtype (its cached answers are reused as they are)
    with selecting("truthfulqa_tax: which policy-step setting to keep"), inference_precision(proj.eval_dtype()):
        scorer = ev.judge_scorer(judge, validation)
        answers = {}
        for name, m in models.items():
            cached = _cached_validation_answers(proj, m["model"], validation)
            path = cached or work / "answers" / f"{name}_validation.jsonl"
            respond(m["model"], validation, path, max_new_tokens=ev.e.max_new_tokens, batch_size=ev.e.batch_size,
                    seed=proj.cfg.seed)
            answers[name] = path
            m["truthfulqa"] = {"rows": str(work / "truthfulqa" / f"{name}_rows.jsonl")}
            rows = truthfulqa_rows(m["model"], items, Path(m["truthfulqa"]["rows"]))
            base_rows[name] = rows
            m["truthfulqa"]["mc2"] = sum(r["mc2"] for r in rows) / len(rows)
            if tox_prompts:
                m["toxigen"] = {"rows": str(work / "toxigen" / f"{name}_rows.jsonl")}
                tox_rows[name] = toxigen_rows(m["model"], tox_prompts, Path(m["toxigen"]["rows"]),
                                              max_new_tokens=tox.max_new_tokens, batch_size=ev.e.batch_size, seed=proj.cfg.seed)
                m["toxigen"]["pct_toxic"] = 100 * sum(r["toxic"] for r in tox_rows[name]) / len(tox_rows[name])
        from alignment.evals import winrate

        for name, m in models.items():
            if name != "sft":
                m["truthfulqa"]["vs_sft"] = paired(base_rows["sft"], base_rows[name])
                if "toxigen" in m:
                    m["toxigen"]["vs_sft"] = paired_change(tox_rows["sft"], tox_rows[name])
                    if name != "start":
                        m["toxigen"]["vs_start"] = paired_change(tox_rows["start"], tox_rows[name])
            if name in ("sft", "start"):
                continue
            m["truthfulqa"]["vs_start"] = paired(base_rows["start"], base_rows[name])
            m["truthfulqa"]["shift_vs_start"] = shift(base_rows["start"], base_rows[name])
            res = winrate.run(m["model"], start, prompts=str(proj.validation_path), judge="rm", out=work / "winrate",
                              scorer=scorer, responses=str(answers[name]), baseline_responses=str(answers["start"]),
                              tie_margin=proj.cfg.gold.tie_margin if judge == "gold" else 0.0, n_boot=ev.e.bootstrap,
                              seed=proj.cfg.seed, name=f"validation-{judge}-{name}-vs-start", overwrite=True)
            m["validation_vs_start"] = {**_winrate_summary(res), "judge": judge,
                                        "rows": str(work / "winrate" / f"validation-{judge}-{name}-vs-start_rows.jsonl")}
    out = {"project": str(project), "round": a.round, "stage": stage, "start": start, "tuning_questions": questions,
           "toxigen_tuning_prompts": tox_info,
           "validation_prompts": len(validation), "judge": judge, "dtype": dtype, "models": models, "chosen": choose(models),
           "rule": "highest tuning MC2 among the models whose validation win rate vs the start has its 95% CI above 50%",
           "minutes_this_call": round((time.time() - t0) / 60, 1), "note": a.note}
    history = Path(a.history)
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a") as f:
        f.write(json.dumps({k: out[k] for k in ("project", "round", "chosen", "minutes_this_call", "note")}
                           | {"models": {n: {"mc2": m["truthfulqa"]["mc2"],
                                             "winrate_vs_start": (m.get("validation_vs_start") or {}).get("win_rate"),
                                             "pct_toxic": (m.get("toxigen") or {}).get("pct_toxic")}
                                         for n, m in models.items()}}) + "\n")
    runs = earlier_runs(Path(a.results))
    runs[key_of(out)] = out
    result = {"runs": runs, "latest": key_of(out), "pooled": pooled(runs)}
    _print(out, result["pooled"])
    return result


def _split_overrides(text: str) -> list[str]:
    """``a=1,b=[1.0, 0.2]`` -> ``["a=1", "b=[1.0, 0.2]"]``: commas inside brackets stay."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[{" else -1 if ch in "]}" else 0
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    bad = [x for x in parts if "=" not in x]
    if bad:
        raise SystemExit(f"--variant: {bad[0]!r} is not key=value")
    return parts


def _cached_validation_answers(proj: Any, model: str, records: list) -> Path | None:
    """Where the round's own eval step keeps ``model``'s validation answers (the SFT model, a round's policy), if it
    answered these prompts in the enclosing dtype (never regenerated there: a file of the round is not rewritten; answers
    in another dtype are made again in this benchmark's own folder)."""
    path = None
    if model == proj.sft_model():
        path = proj.round_dir(1) / "eval" / "sft" / "validation_responses.jsonl"
    for k in proj.rounds():
        if model == proj.policy_of(k):
            path = proj.round_dir(k) / "eval" / "validation_responses.jsonl"
    if path is None or not path.is_file():
        return None
    from foundation.precision import dtype_name, rows_dtypes

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    same = [r.get("prompt") for r in rows] == [r.messages for r in records]
    return path if same and rows_dtypes(rows) == {dtype_name()} else None


def _print(out: dict, pool: dict) -> None:
    from benchmarks.common import table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    rows = []
    for name, m in out["models"].items():
        t, w = m["truthfulqa"], m.get("validation_vs_start") or {}
        rows.append([name, " ".join(m.get("overrides") or []), pct(t["mc2"]),
                     "" if "vs_start" not in t else f"{pct(t['vs_start']['diff'])} [{pct(t['vs_start']['ci'][0])}, "
                                                     f"{pct(t['vs_start']['ci'][1])}]",
                     "" if not w else (f"{pct(w['win_rate'])} [{pct(w['ci_low'])}, {pct(w['ci_high'])}], "
                                       f"LC {pct(w.get('lc_win_rate'))}"), _toxic_cell(m.get("toxigen"))])
    print(table(rows, ["model", "overrides", f"MC2 ({out['tuning_questions']['n']} tuning q)", "vs start, points",
                       f"validation win rate vs start ({out['judge']}, n={out['validation_prompts']})",
                       "ToxiGen % toxic (vs start, points)"]))
    print(f"chosen: {out['chosen']} ({out['rule']})")
    rows = []
    for name, s in pool["settings"].items():
        w, t = s["validation_vs_start"], s["mc2_vs_start"]
        x = s.get("toxic_vs_start")
        rows.append([name, len(s["runs"]), f"{pct(t['diff'])} [{pct(t['ci'][0])}, {pct(t['ci'][1])}]",
                     f"{pct(s['mc2_vs_sft']['diff'])}", f"{pct(w['win_rate'])} [{pct(w['ci_low'])}, {pct(w['ci_high'])}], "
                     f"LC {pct(w['lc_win_rate'])}, n={w['n']}",
                     "-" if not x else f"{x['diff']:+.1f} [{x['ci'][0]:+.1f}, {x['ci'][1]:+.1f}]"])
    print(table(rows, ["setting", "runs", "MC2 vs start, points (mean over runs)", "vs SFT", "pooled validation win rate",
                       "ToxiGen vs start, points"]))
    print(f"pooled chosen: {pool['chosen']} ({pool['rule']})")


def _toxic_cell(t: dict | None) -> str:
    if not t:
        return "-"
    d = t.get("vs_start")
    return f"{t['pct_toxic']:.1f}" + ("" if not d else f" ({d['diff_points']:+.1f} [{d['diff_ci'][0]:+.1f}, "
                                                         f"{d['diff_ci'][1]:+.1f}], p={d['p_value']:.3f})")


if __name__ == "__main__":
    main()
