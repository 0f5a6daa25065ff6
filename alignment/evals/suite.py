"""A round's evaluation step: every round's policy on the same held-out prompts, judges and benchmarks.

What ``eval`` (``alignment.rounds``) runs for round N, with the policy of round N:

1. **Held-out prompts** (``runs/<project>/heldout.jsonl``, drawn when the project was created): checked
   disjoint from every prompt any stage of rounds 1..N trained or sampled on
   (:func:`alignment.heldout.check_disjoint`; a leak stops the step).
2. **Responses**: one greedy answer per held-out prompt from the policy, the SFT model and the
   previous policy, each generated once per model and reused by later rounds
   (``round-<k>/eval/heldout_responses.jsonl``, ``round-1/eval/sft/heldout_responses.jsonl``).
3. **Win rates** by each judge of ``judges``, against the previous round's policy and the SFT model,
   with n, ties (counted half) and a 95% bootstrap CI over prompts:
   ``gold`` = the gold judge (:mod:`alignment.evals.gold`, which the loop never trains on), ``rm`` =
   this round's reward models combined by the policy stage's reward rule (labelled as such: the
   policy was optimised against them). The first judge decides promotion.
4. **Gold reward**: the mean gold score of the policy's answers (and the SFT model's and the
   previous policy's) with a 95% bootstrap CI.
5. **TruthfulQA MC** (the first existing source of ``truthfulqa``; a seeded sample) and **ToxiGen**
   (``toxigen_per_group`` prompts per group and type); round 1 also scores the SFT model
   (``round-1/eval/sft/``), the baseline the later rounds are compared with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.config import check, option

log = logging.getLogger(__name__)

JUDGES = ("gold", "rm")
SMOKE_PER_GROUP = 4  # below 4 prompts per group and type (8 per group) a ToxiGen number is a smoke check


@dataclass
class EvalSuiteConfig:
    """Step `eval`: what every round's policy is checked with (null switches one off)."""

    heldout: int = option(64, "prompts drawn from sample.prompts when the project is created, held out of every stage; win rates and gold reward are measured on them")
    judges: list[str] = option(factory=lambda: ["gold", "rm"], doc="win-rate judges: gold (the gold judge; needs prompts with reference answers), rm (this round's reward models, with the policy's reward rule); the first decides promotion")
    truthfulqa: list[str] | None = option(factory=lambda: ["../shared/data/truthfulqa/mc_task.json", "bundled:truthfulness"],
                                          doc="TruthfulQA MC data, the first that exists: mc_task.json, a local copy of the Hub dataset (folder), truthful_qa (Hub), or bundled:truthfulness (a 50-item probe, not TruthfulQA); null = off")
    truthfulqa_sample: int | None = option(200, "a seeded sample of this many questions (null = all)")
    toxigen: list[str] | None = option(factory=lambda: ["../shared/data/toxigen/prompts"],
                                       doc="ToxiGen prompts, the first that exists (a folder of hate_*/neutral_* files, or a local copy of the Hub dataset); skipped with a note when none does; null = off")
    toxigen_per_group: int = option(4, "ToxiGen prompts per group and type (hate, neutral); under 4 (8 per group) reports call it a smoke check")
    toxigen_max_new_tokens: int = option(48, "length limit of ToxiGen continuations")
    max_new_tokens: int = option(128, "length limit of the answers to the held-out prompts")
    batch_size: int = option(16, "generation batch size")
    bootstrap: int = option(2000, "bootstrap resamples of the confidence intervals")

    def __post_init__(self) -> None:
        check(self.heldout >= 0, "heldout", f"must be >= 0, got {self.heldout}")
        for j in self.judges:
            check(j in JUDGES, "judges", f"unknown judge {j!r}; expected some of: {', '.join(JUDGES)}")
        check(self.toxigen_per_group >= 1, "toxigen_per_group", f"must be >= 1, got {self.toxigen_per_group}")
        check(self.truthfulqa_sample is None or self.truthfulqa_sample > 0, "truthfulqa_sample", "must be > 0 or null")


def first_existing(candidates: Sequence[str] | None) -> str | None:
    """The first candidate data source that is there (``bundled:``/``hub:`` names always are)."""
    for c in candidates or []:
        if c.startswith(("bundled:", "hub:")) or c == "truthful_qa" or Path(c).expanduser().exists():
            return c
    return None


def respond(model: str, records: Sequence[Any], path: Path, *, max_new_tokens: int, batch_size: int, seed: int) -> list[str]:
    """Greedy answers of ``model`` to ``records``, written to ``path`` once and read back after."""
    from alignment.generation import generate
    from alignment.models import load_causal_lm, load_tokenizer
    from data.loaders import read_rows, write_jsonl

    if path.is_file():
        rows = [row for _, row in read_rows(path)]
        if len(rows) == len(records) and all(r.get("prompt") == rec.messages for r, rec in zip(rows, records)):
            return [r["response"] for r in rows]
        log.warning("%s: answers to other prompts; generating again", path)
    lm, tok = load_causal_lm(model), load_tokenizer(model)
    gens = generate(lm, tok, [r.messages for r in records], max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size, seed=seed)
    del lm
    write_jsonl(path, [{"prompt": r.messages, "category": r.category, "response": g.text, "finished": g.finished, "model": model}
                       for r, g in zip(records, gens)], overwrite=True)
    return [g.text for g in gens]


def _winrate_summary(res: dict) -> dict:
    m = res["metrics"]
    return {"win_rate": m["win_rate"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"], "wins": m["wins"],
            "ties": m["ties"], "losses": m["losses"], "baseline": res["baseline"]}


class RoundEval:
    """The eval step of round ``n`` of a project (``alignment.rounds.Project``)."""

    def __init__(self, project: Any, n: int) -> None:
        self.p, self.n, self.cfg = project, n, project.cfg
        self.e: EvalSuiteConfig = project.cfg.eval
        self.out = project.round_dir(n) / "eval"
        self.sft_out = project.round_dir(1) / "eval" / "sft"

    # -- responses of each model, cached where the model's own round keeps them
    def responses_path(self, model: str) -> Path:
        if model == self.p.sft_model():
            return self.sft_out / "heldout_responses.jsonl"
        for k in self.p.rounds():
            if model == self.p.policy_of(k):
                return self.p.round_dir(k) / "eval" / "heldout_responses.jsonl"
        raise ValueError(f"{model} is neither the SFT model nor a round's policy")

    def answers(self, model: str, records: Sequence[Any]) -> tuple[list[str], Path]:
        path = self.responses_path(model)
        return respond(model, records, path, max_new_tokens=self.e.max_new_tokens, batch_size=self.e.batch_size, seed=self.cfg.seed), path

    def run(self) -> dict:
        from alignment.heldout import check_disjoint, stage_usage

        policy, sft = self.p.policy_of(self.n), self.p.sft_model()
        previous = self.p.current_policy(before=self.n) if self.n > 1 else sft
        outputs: dict[str, Any] = {}
        records = self.p.heldout() if self.e.heldout else []
        if records:
            used = stage_usage([self.p.round_dir(k) for k in range(1, self.n + 1)], STAGE_DIRS)
            checked = check_disjoint(records, used)
            outputs["heldout"] = {"n": len(records), "path": str(self.p.heldout_path), "sha256": _sha256(self.p.heldout_path),
                                  "disjoint_from": checked}
            answers = {m: self.answers(m, records) for m in dict.fromkeys([policy, previous, sft])}
            if "gold" in self.e.judges:
                outputs.update(self.gold(records, answers, policy, previous, sft))
            if "rm" in self.e.judges:
                outputs.update(self.rm_winrates(answers, policy, previous, sft))
            first = self.e.judges[0] if self.e.judges else None
            if first:
                outputs["winrate_vs_previous"] = {**outputs[f"winrate_{first}_vs_previous"], "judge": first}
        outputs.update(self.benchmarks(policy, self.out, "policy"))
        if self.n == 1:
            outputs.update({f"{k}_sft": v for k, v in self.benchmarks(sft, self.sft_out, "SFT model").items()})
        return {"inputs": {"policy": policy, "previous": previous, "sft": sft, "suite": _to_dict(self.e)}, "outputs": outputs}

    # -- judges
    def gold(self, records: Sequence[Any], answers: dict, policy: str, previous: str, sft: str) -> dict:
        from alignment.evals import winrate
        from alignment.evals.gold import GoldJudge, GoldScorer, mean_ci
        from alignment.evals.results import header, write_json
        from data.loaders import write_jsonl

        judge = GoldJudge(self.cfg.gold)
        out: dict[str, Any] = {}
        scores = {m: judge.score(records, answers[m][0]) for m in answers}
        out["gold_reward"] = {name: {**mean_ci(scores[m].score, n_boot=self.e.bootstrap, seed=self.cfg.seed), "model": m,
                                     "parts": scores[m].means()}
                              for name, m in (("policy", policy), ("previous", previous), ("sft", sft))}
        rows = [{"prompt": r.messages, "category": r.category, **{f"{name}_{k}": v for name, m in (("policy", policy), ("sft", sft))
                                                                  for k, v in scores[m].row(i).items()}} for i, r in enumerate(records)]
        write_json(self.out / "gold.json", header("gold", policy, judge=judge.describe(), n=len(records), heldout=str(self.p.heldout_path),
                                                  metrics={k: v["mean"] for k, v in out["gold_reward"].items()},
                                                  models=out["gold_reward"]), overwrite=True)
        write_jsonl(self.out / "gold_rows.jsonl", rows, overwrite=True)
        scorer = GoldScorer(judge, records)
        for label, base in (("previous", previous), ("sft", sft)):
            if label == "sft" and base == previous and "winrate_gold_vs_previous" in out:
                out["winrate_gold_vs_sft"] = out["winrate_gold_vs_previous"]
                continue
            res = winrate.run(policy, base, prompts=str(self.p.heldout_path), judge="rm", out=self.out, scorer=scorer,
                              responses=str(answers[policy][1]), baseline_responses=str(answers[base][1]), tie_margin=self.cfg.gold.tie_margin,
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-gold-vs-{label}", overwrite=True)
            out[f"winrate_gold_vs_{label}"] = _winrate_summary(res)
        return out

    def rm_winrates(self, answers: dict, policy: str, previous: str, sft: str) -> dict:
        from alignment.evals import winrate
        from reward.config import build_scorer

        reward = self.reward_config()
        rm, safety, rule = reward.helpful, reward.safety, reward.rule
        scorer, _ = build_scorer(reward)
        scorer.helpful, scorer.safety = MemoScorer(scorer.helpful), MemoScorer(scorer.safety)  # the policy's answers are judged twice
        out: dict[str, Any] = {}
        for label, base in (("previous", previous), ("sft", sft)):
            if label == "sft" and base == previous:
                out["winrate_rm_vs_sft"] = out["winrate_rm_vs_previous"]
                continue
            res = winrate.run(policy, base, prompts=str(self.p.heldout_path), judge="rm", out=self.out, scorer=scorer, rm=str(rm),
                              safety_rm=str(safety), rule=rule, responses=str(answers[policy][1]), baseline_responses=str(answers[base][1]),
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-rm-vs-{label}", overwrite=True)
            out[f"winrate_rm_vs_{label}"] = _winrate_summary(res)
        return out

    def reward_config(self) -> Any:
        """The reward the round's policy stage trained with (its rule, safety threshold and λ; RS, PPO, GRPO),
        else Llama 2's defaults, on the round's reward models: the RM judge scores what the policy optimised."""
        import yaml

        from alignment.config import load_config
        from reward.config import RewardConfig

        cfg_path = self.p.round_dir(self.n) / "policy" / "config.yaml"
        reward = (yaml.safe_load(cfg_path.read_text()) or {}).get("reward") if cfg_path.is_file() else None
        keys = ("rule", "safety_threshold", "cost_weight", "batch_size")
        overrides = [f"{k}={json.dumps(v)}" for k, v in (reward or {}).items() if k in keys]
        overrides += [f"helpful={self.p.rm_dir('rm_helpful', self.n)}", f"safety={self.p.rm_dir('rm_safety', self.n)}"]
        return load_config(RewardConfig, None, overrides)

    # -- benchmarks
    def benchmarks(self, model: str, out: Path, who: str) -> dict:
        from alignment.evals import toxigen, truthfulqa

        e, outputs = self.e, {}
        data = first_existing(e.truthfulqa)
        if data:
            res = truthfulqa.run(model, data=data, out=out, sample=e.truthfulqa_sample, seed=self.cfg.seed, overwrite=True)
            outputs["truthfulqa"] = {"mc1": res["metrics"]["mc1"], "mc2": res["metrics"]["mc2"], "n": res["n"], "dataset": res["dataset"],
                                     "data": data}
            log.info("round %d: %s on %s: MC2 %.4f", self.n, who, res["dataset"], res["metrics"]["mc2"])
        elif e.truthfulqa:
            outputs["truthfulqa"] = {"skipped": f"none of {e.truthfulqa} found"}
        prompts = first_existing(e.toxigen)
        if prompts:
            res = toxigen.run(model, prompts=prompts, out=out, per_group=e.toxigen_per_group, max_new_tokens=e.toxigen_max_new_tokens,
                              batch_size=e.batch_size, seed=self.cfg.seed, overwrite=True)
            outputs["toxigen"] = {"pct_toxic": res["metrics"]["pct_toxic"], "n": res["n"], "per_group": 2 * e.toxigen_per_group,
                                  "smoke_check": e.toxigen_per_group < SMOKE_PER_GROUP, "classifier": res.get("classifier", {}).get("summary")}
        elif e.toxigen:
            outputs["toxigen"] = {"skipped": f"none of {e.toxigen} found"}
            log.warning("round %d: ToxiGen skipped: none of %s found", self.n, e.toxigen)
        return outputs


STAGE_DIRS = ("sft", "rm_helpful", "rm_safety", "policy")


class MemoScorer:
    """A reward model that scores each (prompt, response) once, however often it is asked."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.cache = inner, {}

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> Any:
        import torch

        from alignment.evals.gold import prompt_key

        keys = [(prompt_key(p), r) for p, r in zip(prompts, responses)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            new = self.inner.score([prompts[first[k]] for k in todo], [k[1] for k in todo])
            self.cache.update(zip(todo, new.float().cpu().tolist()))
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.float32)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _to_dict(cfg: Any) -> dict:
    from alignment.config import to_dict

    return to_dict(cfg)
