"""Does a round's policy win because its answers are shorter? Its answers against the SFT model's, made as short.

    python -m benchmarks length_control --project runs/bench-alignment-s0 [--project ...] [--round 2 ...]

The loop benchmark's PPO round answers in less than half the SFT model's characters (seed 0: 199 vs 433 on the
test prompts), and a reward that likes finished, short answers would make that look like alignment. The
length-controlled win rate adjusts for length with a fitted model; this is the direct control. The SFT model
answers greedily with a bias ``b`` added to its EOS logit (``SamplingParams.eos_bias``: its answers agree with its
unbiased ones up to where they end, and they only end sooner as ``b`` grows), ``b`` chosen by bisection so that
its mean answer length on the **validation** prompts matches the policy's there (a decision: it reads validation
prompts only); then the policy is judged against that length-matched SFT model on the **test** prompts by every
judge of the project (win rate with n, 95% CI and its length-controlled companion; mean characters of both).

A policy that still wins clearly is better at the same length; one that does not was winning by length (or by
ending its answers). Answers are cached under ``<project>/length_control`` (a second call only judges). Policies
longer than the SFT model get a negative ``b`` (the SFT model cannot answer longer than ``max_new_tokens``: then the
match is said to be out of reach).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

B_MAX = 64.0


def mean_chars(path: Path) -> float:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return sum(len(r["response"]) for r in rows) / len(rows)


def match_bias(length_at: Any, target: float, *, steps: int = 7, tolerance: float = 0.03) -> dict:
    """The EOS bias whose mean answer length is closest to ``target``. ``length_at(b)`` is non-increasing in ``b``:
    bracket the target by doubling from +-1 (up to +-B_MAX), then bisect ``steps`` times (stopping once within
    ``tolerance`` of it). Returns the chosen bias, its length and the trace of every bias tried."""
    trace: dict[float, float] = {}

    def f(b: float) -> float:
        if b not in trace:
            trace[b] = length_at(b)
        return trace[b]

    def done() -> dict:
        best = min(trace, key=lambda x: (abs(trace[x] - target), abs(x)))
        return {"bias": best, "length": trace[best], "target_length": target,
                "reached": abs(trace[best] - target) <= tolerance * target, "trace": [[x, trace[x]] for x in sorted(trace)]}

    if abs(f(0.0) - target) <= tolerance * target:
        return done()
    sign = 1.0 if f(0.0) > target else -1.0  # shorter than the SFT model: a positive bias
    lo, hi = 0.0, sign
    while (f(hi) > target) == (sign > 0) and abs(hi) < B_MAX:
        lo, hi = hi, hi * 2
    if (f(hi) > target) == (sign > 0):  # out of reach
        return done()
    for _ in range(steps):
        mid = (lo + hi) / 2
        if abs(f(mid) - target) <= tolerance * target:
            break
        if (f(mid) > target) == (sign > 0):
            lo = mid
        else:
            hi = mid
    return done()


def control_round(proj: Any, n: int, work: Path, *, steps: int = 7) -> dict:
    """Round ``n``'s policy against the SFT model matched to its validation length, judged on the test prompts."""
    from alignment.evals import winrate
    from alignment.evals.suite import RoundEval, _winrate_summary, respond
    from data.loaders import read_rows
    from data.splits import selecting
    from foundation.precision import dtype_name, rows_dtypes

    ev, e, seed = RoundEval(proj, n), proj.cfg.eval, proj.cfg.seed
    policy, sft = proj.policy_of(n), proj.sft_model()
    validation, heldout = proj.validation(), proj.heldout()
    if not validation or not heldout:
        raise SystemExit(f"{proj.dir}: the length control needs validation and test prompts")
    kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=seed)
    policy_val = ev.responses_path(policy, "validation")
    if not policy_val.is_file():
        raise SystemExit(f"{policy_val}: round {n}'s eval has not answered the validation prompts")
    policy_test = ev.responses_path(policy)
    dtype = dtype_name()  # the project's eval dtype (main's block): the policy's answers must be in it, as the SFT's will
    for path in (policy_val, policy_test):
        made_in = sorted(rows_dtypes(row for _, row in read_rows(path)))
        if made_in != [dtype]:
            raise SystemExit(f"{path}: answers generated in {', '.join(made_in)}, the length-matched SFT answers would be "
                             f"in {dtype}; a comparison stays in one dtype (run the round's eval again in {dtype})")
    target = mean_chars(policy_val)
    sft_dir = work / "sft"

    def length_at(b: float) -> float:
        path = sft_dir / f"validation_eos_bias_{b:+.4f}.jsonl"
        respond(sft, validation, path, eos_bias=b, **kw)
        return mean_chars(path)

    t0 = time.time()
    with selecting(f"length control: the EOS bias that matches round {n}'s answer length"):
        matched = match_bias(length_at, target, steps=steps)
    test_path = sft_dir / f"heldout_eos_bias_{matched['bias']:+.4f}.jsonl"
    respond(sft, heldout, test_path, eos_bias=matched["bias"], **kw)
    out: dict[str, Any] = {"round": n, "method": proj.cfg.method(n), "policy": policy, "baseline": sft, "match": matched,
                           "dtype": dtype,
                           "test_mean_chars": {"policy": mean_chars(policy_test), "baseline": mean_chars(test_path),
                                               "sft_unbiased": mean_chars(ev.responses_path(sft))}}
    for judge in e.judges:
        res = winrate.run(policy, f"{sft} (eos_bias={matched['bias']:+.4f})", prompts=str(proj.heldout_path), judge="rm",
                          out=work / f"round-{n}", scorer=ev.judge_scorer(judge, heldout), responses=str(policy_test),
                          baseline_responses=str(test_path), tie_margin=proj.cfg.gold.tie_margin if judge == "gold" else 0.0,
                          n_boot=e.bootstrap, seed=seed, name=f"winrate-{judge}-vs-length-matched", overwrite=True)
        out[f"winrate_{judge}_vs_length_matched"] = _winrate_summary(res)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> dict:
    from alignment.rounds import Project
    from foundation.precision import inference_precision

    p = argparse.ArgumentParser(prog="python -m benchmarks length_control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", action="append", required=True, help="a project folder (<root>/<name>); repeatable")
    p.add_argument("--round", type=int, action="append", help="rounds to control (default: every round with an eval)")
    p.add_argument("--steps", type=int, default=7, help="bisection steps after bracketing")
    a = p.parse_args(argv)
    projects = []
    for path in a.project:
        d = Path(path).resolve()
        proj = Project(d.parent, d.name)
        rounds = a.round or [k for k in proj.rounds() if (proj.round_dir(k) / "eval" / "heldout_responses.jsonl").is_file()]
        with inference_precision(proj.eval_dtype()):  # in the dtype its eval step answered in: one per comparison
            got = [control_round(proj, k, d / "length_control", steps=a.steps) for k in rounds]
        projects.append({"project": str(d), "rounds": got})
        _print(d, got)
    return {"projects": projects}


def _print(project: Path, rounds: list[dict]) -> None:
    from benchmarks.common import table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = []
    for r in rounds:
        m, c = r["match"], r["test_mean_chars"]
        for key in (k for k in r if k.startswith("winrate_")):
            w = r[key]
            rows.append([f"V{r['round']} ({r['method']})", key.split("_vs_")[0].removeprefix("winrate_"),
                         f"{m['bias']:+.3f} ({m['length']:.0f} / {m['target_length']:.0f} chars)",
                         f"{c['policy']:.0f} / {c['baseline']:.0f} / {c['sft_unbiased']:.0f}",
                         f"{pct(w['win_rate'])} [{pct(w['ci_low'])}, {pct(w['ci_high'])}] n={w['n']}",
                         f"{pct(w.get('lc_win_rate'))} [{pct(w.get('lc_ci_low'))}, {pct(w.get('lc_ci_high'))}]"])
    print(f"\n{project}")
    print(table(rows, ["policy", "judge", "EOS bias (validation chars / target)", "test chars: policy / matched SFT / SFT",
                       "win rate vs length-matched SFT", "LC"]))


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
