"""A round's evaluation step: every round's policy on the same held-out prompts, judges and benchmarks.

Length (~450 lines): one step read top to bottom: its config, the answers, every judge and benchmark, the summary.

What ``eval`` (``alignment.rounds``) runs for round N, with the policy of round N:

1. **Held-out prompts** (``runs/<project>/heldout.jsonl``, drawn when the project was created): checked
   disjoint from every prompt any stage of rounds 1..N trained or sampled on
   (:func:`data.heldout.check_disjoint`; a leak stops the step).
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
5. **Benchmarks** (``BENCHMARKS``: TruthfulQA MC on a seeded sample, ToxiGen with ``eval.toxigen.per_group``
   prompts per group and type), each configured by its section ``eval.<name>``; round 1 also scores
   the SFT model (``round-1/eval/sft/``), the baseline the later rounds are compared with.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from foundation.config import check, option
from foundation.precision import INFERENCE_DTYPES
from foundation.runs import file_sha256
from alignment.evals.toxigen import RoundSettings as ToxiGenSettings
from alignment.evals.truthfulqa import RoundSettings as TruthfulQASettings
from reward.scorer import RewardScorer, Scorer

log = logging.getLogger(__name__)

JUDGES = ("gold", "gold_rm", "rm")


@runtime_checkable
class BenchmarkModule(Protocol):
    """What a benchmark's module exposes (``Benchmark``'s docstring says what each is for)."""

    RoundSettings: type
    REPORT_COLUMN: str

    def run_round(self, model: str, out: Path, settings: Any, *, seed: int, batch_size: int) -> dict: ...
    def headline(self, summary: dict) -> dict: ...
    def describe_settings(self, settings: Any) -> str: ...
    def demo_label(self, summaries: Sequence[dict]) -> str: ...
    def demo_cell(self, summary: dict | None) -> str: ...
    def report_cell(self, result: dict) -> str: ...
    def caption(self, rounds: Sequence[Any]) -> tuple[str, str]: ...
    def plot(self, rounds: Sequence[Any], path: Path) -> Path | None: ...
    def report_blocks(self, rounds: Sequence[Any]) -> list[tuple[str, Any]]: ...
    def cli(self, argv: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class Benchmark:
    """A benchmark every round runs on its policy (and round 1 on the SFT model). Its module exposes:

    - ``RoundSettings``: a dataclass, the section ``eval.<name>`` of a round config (null switches it off);
      ``RoundSettings.SHORTHAND`` names the field a bare value fills (``eval.truthfulqa: [a.json]``);
    - ``run_round(model, out, settings, *, seed, batch_size) -> dict``: evaluate one model, write
      ``<out>/<name>.json`` and return the summary the round keeps (``{"skipped": why}`` without data);
    - ``headline(summary) -> dict``: what the round logs to its metrics, as ``<name>_<key>``;
    - ``describe_settings(settings) -> str``: what will run, in words;
    - ``demo_label(summaries) -> str`` and ``demo_cell(summary) -> str``: its row of the demo's table;
    - for ``align report``: ``REPORT_COLUMN`` and ``report_cell(result)`` (its summary-table column),
      ``caption(rounds) -> (title, text)``, ``plot(rounds, path) -> Path | None`` and ``report_blocks(rounds)``;
    - ``cli(argv)``: ``align eval <name>``.

    A new benchmark: its module, a line in ``BENCHMARKS`` and a field of ``EvalSuiteConfig`` below."""

    name: str
    module: str
    help: str

    def load(self) -> BenchmarkModule:
        """Its module; one that lacks part of ``BenchmarkModule`` is refused, naming what is missing."""
        mod = importlib.import_module(self.module)
        if not isinstance(mod, BenchmarkModule):
            members = {*BenchmarkModule.__annotations__, *(n for n in vars(BenchmarkModule) if not n.startswith("_"))}
            missing = [m for m in members if not hasattr(mod, m)]
            raise TypeError(f"benchmark {self.name!r}: {self.module} lacks {', '.join(sorted(missing))} (BenchmarkModule)")
        return mod


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("truthfulqa", "alignment.evals.truthfulqa",
              "TruthfulQA MC1/MC2 (lm-eval scoring) and the BLEU/ROUGE generation variant"),
    Benchmark("toxigen", "alignment.evals.toxigen", "% toxic continuations of ToxiGen prompts, overall and per group"),
)


@dataclass
class EvalSuiteConfig:
    """Step `eval`: what every round's policy is checked with (null switches one off)."""

    heldout: int = option(64, "test prompts drawn from sample.prompts when the project is created, held out of every stage and "
                              "of every decision: the reported win rates and gold reward are measured on them")
    validation: int = option(64, "validation prompts drawn next (disjoint): what decisions read: promotion's win rate "
                                 "against the previous policy, PPO/GRPO keep-best and early stopping; 0 = none (then "
                                 "promotion has no win-rate gate)")
    judges: list[str] = option(factory=lambda: ["gold", "rm"],
                               doc="win-rate judges: gold (the reference judge of alignment.evals.gold; needs prompts with "
                                   "reference answers), gold_rm (the gold reward model trained on human preferences, "
                                   "eval.gold_model), rm (this round's reward models, with the policy's reward rule); the "
                                   "first decides promotion, on the validation prompts")
    gold_model: str = option("gold:hh-smollm2", "the gold_rm judge's reward model: gold:<name> (reward.gold, `align gold "
                                                "build`) or a reward-model folder")
    truthfulqa: TruthfulQASettings | None = option(factory=TruthfulQASettings,
                                                   doc="TruthfulQA MC (a bare list is its data); null = off")
    toxigen: ToxiGenSettings | None = option(factory=ToxiGenSettings, doc="ToxiGen % toxic (a bare list is its data); null = off")
    max_new_tokens: int = option(128, "length limit of the answers to the held-out prompts")
    batch_size: int = option(16, "generation batch size")
    bootstrap: int = option(2000, "bootstrap resamples of the confidence intervals")
    dtype: str = option("auto", "the CPU dtype of the whole step (answers, judges, benchmarks; no training): float32, "
                                "bfloat16 (CPUs with native bf16: avx512_bf16 / amx_bf16; `python -m benchmarks precision` "
                                "measures its speed and fidelity), auto = bfloat16 on such CPUs, float32 on others. GPUs "
                                "use bf16 where supported either way. Answers cached by an earlier eval in another dtype "
                                "are generated again")
    decoding_control: int = option(0, "also judge the policy, on the test prompts and by every judge, against the SFT model "
                                      "decoding greedily with no_repeat_ngram_size=<this> (a decoding change instead of "
                                      "training: what training has to beat); 0 = off")

    def __post_init__(self) -> None:
        check(self.heldout >= 0, "heldout", f"must be >= 0, got {self.heldout}")
        check(self.decoding_control >= 0, "decoding_control", f"must be >= 0 (0 = off), got {self.decoding_control}")
        check(self.validation >= 0, "validation", f"must be >= 0, got {self.validation}")
        check(self.dtype in INFERENCE_DTYPES, "dtype", f"must be one of {', '.join(INFERENCE_DTYPES)}, got {self.dtype!r}")
        for j in self.judges:
            check(j in JUDGES, "judges", f"unknown judge {j!r}; expected some of: {', '.join(JUDGES)}")

    def benchmarks(self) -> list[tuple[Benchmark, Any]]:
        """(benchmark, its settings) of every benchmark switched on, in ``BENCHMARKS`` order."""
        return [(b, getattr(self, b.name)) for b in BENCHMARKS if getattr(self, b.name) is not None]


def respond(model: str, records: Sequence[Any], path: Path, *, max_new_tokens: int, batch_size: int, seed: int,
            no_repeat_ngram_size: int = 0, eos_bias: float = 0.0) -> list[str]:
    """Greedy answers of ``model`` to ``records`` (with ``no_repeat_ngram_size`` decoding when > 0, ``eos_bias`` added
    to the EOS logits when not 0), written to ``path`` once and read back after."""
    from foundation.generation import generate
    from foundation.models import load_causal_lm, load_tokenizer
    from foundation.precision import dtype_name, rows_dtypes
    from data.loaders import read_rows, write_jsonl

    dtype = dtype_name()  # what load_causal_lm below loads in
    if path.is_file():
        rows = [row for _, row in read_rows(path)]
        if not (len(rows) == len(records) and all(r.get("prompt") == rec.messages for r, rec in zip(rows, records))):
            log.warning("%s: answers to other prompts; generating again", path)
        elif rows_dtypes(rows) != {dtype}:
            log.warning("%s: answers generated in %s, this eval runs in %s; generating again", path,
                        ", ".join(sorted(rows_dtypes(rows))), dtype)
        else:
            return [r["response"] for r in rows]
    lm, tok = load_causal_lm(model), load_tokenizer(model)
    gens = generate(lm, tok, [r.messages for r in records], max_new_tokens=max_new_tokens, temperature=0.0,
                    batch_size=batch_size, seed=seed, no_repeat_ngram_size=no_repeat_ngram_size, eos_bias=eos_bias)
    del lm
    write_jsonl(path, [{"prompt": r.messages, "category": r.category, "response": g.text, "finished": g.finished, "model": model,
                        "dtype": dtype} for r, g in zip(records, gens)], overwrite=True)
    return [g.text for g in gens]


def _winrate_summary(res: dict) -> dict:
    m, lc = res["metrics"], res.get("length_controlled") or {}
    out = {"win_rate": m["win_rate"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n": m["n"], "wins": m["wins"],
           "ties": m["ties"], "losses": m["losses"], "baseline": res["baseline"]}
    if lc:
        out.update(lc_win_rate=lc["lc_win_rate"], lc_ci_low=lc["ci_low"], lc_ci_high=lc["ci_high"],
                   mean_chars=lc["mean_len_a"], baseline_mean_chars=lc["mean_len_b"])
    return out


class RoundEval:
    """The eval step of round ``n`` of a project (``alignment.rounds.Project``)."""

    def __init__(self, project: Any, n: int) -> None:
        self.p, self.n, self.cfg = project, n, project.cfg
        self.e: EvalSuiteConfig = project.cfg.eval
        self.out = project.round_dir(n) / "eval"
        self.sft_out = project.round_dir(1) / "eval" / "sft"
        self._scorers: dict[str, Any] = {}  # one per judge for the whole step (see judge_scorer)

    # -- responses of each model, cached where the model's own round keeps them
    def responses_path(self, model: str, split: str = "heldout") -> Path:
        if model == self.p.sft_model():
            return self.sft_out / f"{split}_responses.jsonl"
        for k in self.p.rounds():
            if model == self.p.policy_of(k):
                return self.p.round_dir(k) / "eval" / f"{split}_responses.jsonl"
        raise ValueError(f"{model} is neither the SFT model nor a round's policy")

    def answers(self, model: str, records: Sequence[Any], split: str = "heldout") -> tuple[list[str], Path]:
        path = self.responses_path(model, split)
        return respond(model, records, path, max_new_tokens=self.e.max_new_tokens, batch_size=self.e.batch_size,
                       seed=self.cfg.seed), path

    def run(self) -> dict:
        """Every check of the step, in the project's eval dtype (``Project.eval_dtype``: ``eval.dtype``, ``auto`` kept at
        the dtype of the project's first eval; ``foundation.precision.inference_precision``)."""
        from foundation.precision import dtype_name, inference_precision

        with inference_precision(self.p.eval_dtype()):
            dtype = dtype_name()
            earlier = {k: d for k, d in self.p.recorded_eval_dtypes().items() if k != self.n and d != dtype}
            if earlier:  # an explicit eval.dtype changed mid-project, or the project moved between a CPU and a GPU
                log.warning("round %d: this eval runs in %s, the evals of round(s) %s ran in %s: comparisons with their "
                            "stored results (ToxiGen and TruthfulQA against the SFT model, promotion's ToxiGen check) mix "
                            "dtypes", self.n, dtype, ", ".join(map(str, earlier)), ", ".join(sorted(set(earlier.values()))))
            result = self._run()
            result["outputs"]["dtype"] = dtype
            if earlier:
                result["outputs"]["dtype_differs_from"] = earlier
        return result

    def _run(self) -> dict:
        from data.heldout import check_disjoint, stage_usage

        policy, sft = self.p.policy_of(self.n), self.p.sft_model()
        previous = self.p.current_policy(before=self.n) if self.n > 1 else sft
        outputs: dict[str, Any] = {}
        records = self.p.heldout() if self.e.heldout else []
        if records:
            used = stage_usage([self.p.round_dir(k) for k in range(1, self.n + 1)], STAGE_DIRS)
            checked = check_disjoint(records, used)
            outputs["heldout"] = {"n": len(records), "path": str(self.p.heldout_path), "sha256": file_sha256(self.p.heldout_path),
                                  "disjoint_from": checked}
            answers = {m: self.answers(m, records) for m in dict.fromkeys([policy, previous, sft])}
            if "gold" in self.e.judges:
                outputs.update(self.gold(records, answers, policy, previous, sft))
            if "gold_rm" in self.e.judges:
                outputs.update(self.gold_rm(answers, policy, previous, sft))
            if "rm" in self.e.judges:
                outputs.update(self.rm_winrates(answers, policy, previous, sft))
            if self.e.decoding_control and self.e.judges:
                outputs.update(self.decoding_control(records, policy, answers[policy][1]))
            first = self.e.judges[0] if self.e.judges else None
            if first:
                outputs["winrate_vs_previous"] = {**outputs[f"winrate_{first}_vs_previous"], "judge": first}
        validation = self.p.validation()
        if validation and self.e.judges:
            outputs["validation"] = self.validation(validation, policy, previous)
        self._scorers.clear()  # the judges' models are not needed by the benchmarks, which load the policy
        outputs.update(self.benchmarks(policy, self.out, "policy"))
        if self.n == 1:
            outputs.update({f"{k}_sft": v for k, v in self.benchmarks(sft, self.sft_out, "SFT model").items()})
        return {"inputs": {"policy": policy, "previous": previous, "sft": sft, "suite": _to_dict(self.e)}, "outputs": outputs}

    # -- judges
    def gold(self, records: Sequence[Any], answers: dict, policy: str, previous: str, sft: str) -> dict:
        from alignment.evals import winrate
        from alignment.evals.gold import GoldScorer, mean_ci
        from alignment.evals.results import header, write_json
        from data.loaders import write_jsonl

        judge = self.gold_judge()
        out: dict[str, Any] = {}
        scores = {m: judge.score(records, answers[m][0]) for m in answers}
        out["gold_reward"] = {name: {**mean_ci(scores[m].score, n_boot=self.e.bootstrap, seed=self.cfg.seed), "model": m,
                                     "parts": scores[m].means()}
                              for name, m in (("policy", policy), ("previous", previous), ("sft", sft))}
        rows = [{"prompt": r.messages, "category": r.category, **{f"{name}_{k}": v
                                                                  for name, m in (("policy", policy), ("sft", sft))
                                                                  for k, v in scores[m].row(i).items()}}
                for i, r in enumerate(records)]
        write_json(self.out / "gold.json", header("gold", policy, judge=judge.describe(), n=len(records),
                                                  heldout=str(self.p.heldout_path),
                                                  metrics={k: v["mean"] for k, v in out["gold_reward"].items()},
                                                  models=out["gold_reward"]), overwrite=True)
        write_jsonl(self.out / "gold_rows.jsonl", rows, overwrite=True)
        scorer = GoldScorer(judge, records)
        for label, base in (("previous", previous), ("sft", sft)):
            if label == "sft" and base == previous and "winrate_gold_vs_previous" in out:
                out["winrate_gold_vs_sft"] = out["winrate_gold_vs_previous"]
                continue
            res = winrate.run(policy, base, prompts=str(self.p.heldout_path), judge="rm", out=self.out, scorer=scorer,
                              responses=str(answers[policy][1]), baseline_responses=str(answers[base][1]),
                              tie_margin=self.cfg.gold.tie_margin,
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-gold-vs-{label}", overwrite=True)
            out[f"winrate_gold_vs_{label}"] = _winrate_summary(res)
        return out

    def decoding_control(self, records: Sequence[Any], policy: str, policy_answers: Path) -> dict:
        """The policy against the SFT model decoding with ``no_repeat_ngram_size``, on the test prompts, by every
        judge (``winrate_<judge>_vs_decoding``). The control's answers are generated once per project."""
        from alignment.evals import winrate

        k, sft = self.e.decoding_control, self.p.sft_model()
        path = self.sft_out / f"heldout_responses_no_repeat_{k}.jsonl"
        respond(sft, records, path, max_new_tokens=self.e.max_new_tokens, batch_size=self.e.batch_size, seed=self.cfg.seed,
                no_repeat_ngram_size=k)
        out: dict[str, Any] = {}
        for judge in self.e.judges:
            res = winrate.run(policy, f"{sft} (no_repeat_ngram_size={k})", prompts=str(self.p.heldout_path), judge="rm",
                              out=self.out, scorer=self.judge_scorer(judge, records), responses=str(policy_answers),
                              baseline_responses=str(path), tie_margin=self.cfg.gold.tie_margin if judge == "gold" else 0.0,
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-{judge}-vs-decoding", overwrite=True)
            out[f"winrate_{judge}_vs_decoding"] = {**_winrate_summary(res), "no_repeat_ngram_size": k}
        return out

    def judge_scorer(self, judge: str, records: Sequence[Any]) -> Any:
        """A reward-like scorer for ``judge`` (gold: the reference judge on ``records``' references). The reward-model
        judges are built once per eval step and score each (prompt, answer) once (``MemoScorer``): the policy's
        answers, read by the comparisons with the previous round, the SFT model and the decoding control, are scored
        once, and each model is loaded once."""
        if judge == "gold":
            from alignment.evals.gold import GoldScorer

            return GoldScorer(self.gold_judge(), records)
        if judge not in self._scorers:
            if judge == "gold_rm":
                from reward import load_scorer

                self._scorers[judge] = MemoScorer(load_scorer(self.e.gold_model))
            else:
                from reward.config import build_scorer

                scorer, _ = build_scorer(self.reward_config())
                for part in ("helpful", "safety"):
                    if getattr(scorer, part, None) is not None:
                        setattr(scorer, part, MemoScorer(getattr(scorer, part)))
                self._scorers[judge] = scorer
        return self._scorers[judge]

    def gold_judge(self) -> Any:
        """The reference judge (its embedding and toxicity models load once per eval step)."""
        if "gold" not in self._scorers:
            from alignment.evals.gold import GoldJudge

            self._scorers["gold"] = GoldJudge(self.cfg.gold)
        return self._scorers["gold"]

    def validation(self, records: Sequence[Any], policy: str, previous: str) -> dict:
        """The decision set: this round's policy against the previous one on the validation prompts, by
        the first judge (what promotion reads; the test prompts are not read here)."""
        from alignment.evals import winrate
        from data.splits import selecting

        judge = self.e.judges[0]
        with selecting(f"round {self.n}'s promotion evidence"):
            answers = {m: self.answers(m, records, "validation") for m in dict.fromkeys([policy, previous])}
            res = winrate.run(policy, previous, prompts=str(self.p.validation_path), judge="rm", out=self.out,
                              scorer=self.judge_scorer(judge, records), responses=str(answers[policy][1]),
                              baseline_responses=str(answers[previous][1]),
                              tie_margin=self.cfg.gold.tie_margin if judge == "gold" else 0.0, n_boot=self.e.bootstrap,
                              seed=self.cfg.seed, name=f"validation-winrate-{judge}-vs-previous", overwrite=True)
        return {"n": len(records), "path": str(self.p.validation_path), "judge": judge,
                "winrate_vs_previous": {**_winrate_summary(res), "judge": judge}}

    def gold_rm(self, answers: dict, policy: str, previous: str, sft: str) -> dict:
        """Win rates and mean scores by the gold reward model (trained on human preferences)."""
        from alignment.evals import winrate
        from alignment.evals.gold import mean_ci

        records = self.p.heldout()
        scorer = self.judge_scorer("gold_rm", records)
        out: dict[str, Any] = {}
        convs = [r.messages for r in records]
        out["gold_rm_reward"] = {name: {**mean_ci(scorer.score(convs, answers[m][0]).tolist(), n_boot=self.e.bootstrap,
                                                  seed=self.cfg.seed), "model": m}
                                 for name, m in (("policy", policy), ("previous", previous), ("sft", sft))}
        for label, base in (("previous", previous), ("sft", sft)):
            if label == "sft" and base == previous:
                out["winrate_gold_rm_vs_sft"] = out["winrate_gold_rm_vs_previous"]
                continue
            res = winrate.run(policy, base, prompts=str(self.p.heldout_path), judge="rm", out=self.out, scorer=scorer,
                              responses=str(answers[policy][1]), baseline_responses=str(answers[base][1]),
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-gold_rm-vs-{label}", overwrite=True)
            out[f"winrate_gold_rm_vs_{label}"] = _winrate_summary(res)
        return out

    def rm_winrates(self, answers: dict, policy: str, previous: str, sft: str) -> dict:
        from alignment.evals import winrate

        reward = self.reward_config()
        rm, safety, rule = reward.helpful, reward.safety, reward.rule
        scorer = self.judge_scorer("rm", self.p.heldout())
        out: dict[str, Any] = {}
        for label, base in (("previous", previous), ("sft", sft)):
            if label == "sft" and base == previous:
                out["winrate_rm_vs_sft"] = out["winrate_rm_vs_previous"]
                continue
            res = winrate.run(policy, base, prompts=str(self.p.heldout_path), judge="rm", out=self.out, scorer=scorer, rm=str(rm),
                              safety_rm=str(safety), rule=rule, responses=str(answers[policy][1]),
                              baseline_responses=str(answers[base][1]),
                              n_boot=self.e.bootstrap, seed=self.cfg.seed, name=f"winrate-rm-vs-{label}", overwrite=True)
            out[f"winrate_rm_vs_{label}"] = _winrate_summary(res)
        return out

    def reward_config(self) -> Any:
        """The reward the round's policy stage trained with (its rule, safety threshold and λ; RS, PPO, GRPO),
        else Llama 2's defaults, on the round's reward models: the RM judge scores what the policy optimised."""
        import yaml

        from foundation.config import load_config
        from reward.config import RewardConfig

        cfg_path = self.p.round_dir(self.n) / "policy" / "config.yaml"
        reward = (yaml.safe_load(cfg_path.read_text()) or {}).get("reward") if cfg_path.is_file() else None
        keys = ("rule", "safety_threshold", "cost_weight", "batch_size")
        overrides = [f"{k}={json.dumps(v)}" for k, v in (reward or {}).items() if k in keys]
        overrides += [f"helpful={self.p.rm_dir('rm_helpful', self.n)}", f"safety={self.p.rm_dir('rm_safety', self.n)}"]
        return load_config(RewardConfig, None, overrides)

    # -- benchmarks
    def benchmarks(self, model: str, out: Path, who: str) -> dict:
        outputs = {}
        for bench, settings in self.e.benchmarks():
            log.info("round %d: %s on the %s benchmark", self.n, who, bench.name)
            outputs[bench.name] = bench.load().run_round(model, out, settings, seed=self.cfg.seed, batch_size=self.e.batch_size)
        return outputs


STAGE_DIRS = ("sft", "rm_helpful", "rm_safety", "policy")


class MemoScorer(Scorer):
    """A reward model that scores each (prompt, response) once, however often it is asked."""

    def __init__(self, inner: RewardScorer) -> None:
        self.inner, self.cache = inner, {}

    def describe(self) -> dict:
        return self.inner.describe()

    def score(self, prompts: Sequence[Any], responses: Sequence[str], is_safety: Any = None) -> Any:
        import torch

        from alignment.evals.gold import prompt_key

        keys = [(prompt_key(p), r) for p, r in zip(prompts, responses)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            new = self.inner.score([prompts[first[k]] for k in todo], [k[1] for k in todo])
            self.cache.update(zip(todo, new.float().cpu().tolist()))
        return torch.tensor([self.cache[k] for k in keys], dtype=torch.float32)


def _to_dict(cfg: Any) -> dict:
    from foundation.config import to_dict

    return to_dict(cfg)
