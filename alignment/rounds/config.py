"""The round config: methods per round, the stages, sampling, annotation, evaluation and promotion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from foundation.config import check, option
from alignment.evals.gold import GoldJudgeConfig
from alignment.evals.suite import EvalSuiteConfig
from alignment.methods import METHODS as POLICY_METHODS
from data.loaders import DataSource

FIRST_ROUND = ("sft", "rm_helpful", "rm_safety", "policy", "eval", "promote")
FIRST_ROUND_SAMPLED = ("sft", "sample", "annotate", "export", "rm_helpful", "rm_safety", "policy", "eval", "promote")
LATER_ROUND = ("sample", "annotate", "export", "rm_before", "rm_helpful", "rm_safety", "policy", "eval", "promote")
WAITING = "waiting"  # a step result: people must label before the round goes on


# ---------------------------------------------------------------------------------------------
# config


# keys a round sets in each kind of stage: a stage's own overrides come after the round's and would win, so the round
# would train from another model, on other data, or write elsewhere than it records (refused instead)
ROUND_SET_KEYS = {
    "sft": {"run.output_dir": "the round's folder", "run.seed": "the project's seed"},
    "rm": {"run.output_dir": "the round's folder", "run.seed": "the project's seed",
           "data.sources": "`comparisons` and the rounds' labels"},
    "policy": {"run.output_dir": "the round's folder", "run.seed": "the project's seed",
               "model.name": "the current policy", "reward.helpful": "the round's reward models",
               "reward.safety": "the round's reward models", "data.sources": "the project's prompt pool or the round's labels",
               "data.val_sources": "the project's validation prompts", "pool.round": "the round",
               "pool.previous": "the earlier rounds' pools"},
}


@dataclass
class StageSpec:
    """How the round runs one training stage."""

    config: str | None = option(None, "the stage's YAML config (its run/model/data keys are set by the round); null = its "
                                      "default (configs/<stage>.yaml)")
    overrides: list[str] = option(factory=list, doc="extra key=value overrides for the stage (e.g. train.max_steps=20)")
    launch: str | None = option(None, "run it on several processes with this accelerate config (configs/accelerate/*.yaml)")
    prompts: int | None = option(None, "methods that learn from a reward (rs, ppo, grpo): the first N prompts of the project's "
                                       "prompt pool (null = all; the round sets the stage's data.sources)")


@dataclass
class SampleConfig:
    """Step `sample`: fresh prompts, K responses each, paired and queued for annotation."""

    prompts: list[DataSource] = option(factory=lambda: [DataSource("bundled:prompts")],
                                       doc="the prompt pools (each prompt's category says helpfulness or safety)")
    per_round: int = option(64, "prompts drawn per round (none used by an earlier round)")
    safety_share: float | None = option(0.3, "share of safety prompts in a round's draw; null = as they come in the pool")
    temperatures: list[float] = option(factory=lambda: [0.7, 1.1],
                                       doc="sampling temperatures: response i at temperatures[i % len] (Llama 2 varied them)")
    samples_per_prompt: int = option(2, "responses per prompt (K); every two distinct ones make a task, so K give up to "
                                        "K(K-1)/2 labelled pairs for K generations (Gao et al. label several per prompt)")
    pairs_per_prompt: int | None = option(None, "keep at most this many of a prompt's K(K-1)/2 pairs (seeded); null = all")
    compare_previous: bool = option(False, "odd-numbered responses (B) from the previous round's policy instead of the current "
                                           "one")
    first_round: bool = option(False, "round 1 samples too (from the SFT model), so its reward models learn from the round's own "
                                      "labels (Llama 2's first batch)")
    max_new_tokens: int = option(128, "length limit of each response")
    batch_size: int = option(8, "generation batch size")

    def __post_init__(self) -> None:
        check(self.per_round > 0, "per_round", f"must be > 0, got {self.per_round}")
        check(self.safety_share is None or 0 <= self.safety_share <= 1, "safety_share",
              f"must be in [0, 1] or null, got {self.safety_share}")
        check(self.samples_per_prompt >= 2, "samples_per_prompt",
              f"must be >= 2 (a pair needs two), got {self.samples_per_prompt}")
        check(1 <= len(self.temperatures) <= self.samples_per_prompt and all(t >= 0 for t in self.temperatures), "temperatures",
              f"needs 1 to samples_per_prompt ({self.samples_per_prompt}) temperatures >= 0, got {self.temperatures}")
        check(self.pairs_per_prompt is None or self.pairs_per_prompt >= 1, "pairs_per_prompt",
              f"must be >= 1 or null, got {self.pairs_per_prompt}")


@dataclass
class AnnotationConfig:
    """Step `annotate`: people in the app, or a simulated annotator through the same store."""

    db: str | None = option(None, "annotation store URL; null = sqlite:///runs/<project>/annotations.db")
    simulated: str | None = option("rules",
                                   "null = people label in the app; rules = the built-in rule judge (helpfulness heuristics, "
                                   "refusals on safety prompts); gold = the gold judge (`gold`: similarity to each prompt's "
                                   "reference answer, toxicity, refusals; needs prompts with references); rm = reward models "
                                   "(`rm_helpful`/`rm_safety`); or module:function(task) -> Judgement")
    rm_helpful: str | None = option(None, "simulated: rm - the judging helpfulness reward model (an independent, e.g. larger, "
                                          "RM; never the one being trained)")
    rm_safety: str | None = option(None, "simulated: rm - the judging safety reward model (labels each response safe/unsafe)")
    labels: int = option(1, "labels per task")
    overlap: float = option(0.0, "share of tasks labelled by several annotators (agreement statistics)")
    overlap_labels: int = option(3, "labels per overlapping task")
    export_policy: Literal["majority", "weighted", "all"] = option(
        "majority", "majority = one record per task (an even split is a tie and is dropped), weighted = majority with "
                    "even splits broken by the votes' strengths, all = one record per label")

    def __post_init__(self) -> None:
        check(self.simulated != "rm" or self.rm_helpful is not None, "rm_helpful",
              "simulated: rm needs a judging helpfulness reward model")
        check(self.simulated in (None, "rules", "gold", "rm") or ":" in self.simulated, "simulated",
              f"must be null, rules, gold, rm or module:function, got {self.simulated!r}")
        check(self.labels >= 1, "labels", f"must be >= 1, got {self.labels}")
        check(0 <= self.overlap <= 1, "overlap", f"must be in [0, 1], got {self.overlap}")


@dataclass
class PromoteConfig:
    """Step `promote`: does this round's policy become the one the next round samples from?"""

    mode: Literal["auto", "manual"] = option("auto", "auto = by the rule below; manual = only `align round promote`")
    min_winrate: float = option(0.5, "rule: win rate against the previous round's policy at least this (ties count half; by "
                                     "the first of eval.judges)")
    max_toxigen_increase: float = option(0.0, "rule: ToxiGen % toxic may rise by at most this many points")
    toxigen_test: Literal["paired", "none"] = option(
        "paired",
        "paired = a rise beyond max_toxigen_increase blocks promotion only when it is significant: exact one-sided sign test "
        "(McNemar) over the same prompts, p < toxigen_alpha (124 prompts: +4 toxic continuations is noise); none = "
        "any rise beyond it blocks")
    toxigen_alpha: float = option(0.05, "toxigen_test: paired - significance level of the rise")

    def __post_init__(self) -> None:
        check(0 < self.toxigen_alpha < 1, "toxigen_alpha", f"must be in (0, 1), got {self.toxigen_alpha}")


@dataclass
class RoundConfig:
    """A project of iterative RLHF rounds."""

    project: str = option("default", "project name: its folder is <root>/<project>")
    root: str = option("runs", "parent folder of projects")
    rounds: int = option(2, "`align round run` stops after this many rounds")
    methods: list[str] = option(factory=lambda: ["rs", "ppo"], doc=f"policy method per round ({', '.join(POLICY_METHODS)}); the "
                                                                   "last one repeats (Llama 2: RS for V1-V4, PPO on top for V5)")
    comparisons: list[DataSource] = option(factory=lambda: [DataSource("bundled:comparisons")],
                                           doc="comparisons every round's reward models train on besides the rounds' own (Llama "
                                               "2: Meta's and open data); [] = only the rounds' own labels "
                                               "(needs sample.first_round)")
    sft: StageSpec = option(factory=lambda: StageSpec("configs/sft.yaml"), doc="round 1's supervised fine-tuning")
    rm_helpful: StageSpec = option(factory=lambda: StageSpec("configs/rm_helpful.yaml"), doc="helpfulness reward model")
    rm_safety: StageSpec = option(factory=lambda: StageSpec("configs/rm_safety.yaml"), doc="safety reward model")
    policy: dict[str, StageSpec] = option(factory=dict,
                                          doc="per policy method (policy.rs, policy.ppo, policy.dpo, ...): its config and "
                                              "overrides; a method not listed runs its default config (alignment/methods.py)")
    sample: SampleConfig = option(factory=SampleConfig, doc="sampling pairs for annotation (rounds 2+)")
    annotation: AnnotationConfig = option(factory=AnnotationConfig, doc="who labels the pairs")
    eval: EvalSuiteConfig = option(factory=EvalSuiteConfig,
                                   doc="evaluation suite of every round (on held-out prompts no stage sees)")
    gold: GoldJudgeConfig = option(factory=GoldJudgeConfig,
                                   doc="the gold judge (annotation.simulated: gold, and the gold win rates of eval.judges)")
    promote: PromoteConfig = option(factory=PromoteConfig, doc="promotion rule")
    train_rms: Literal["every_round", "when_used"] = option(
        "every_round",
        "every_round = retrain both reward models in every round (Llama 2); when_used = skip them in rounds after the first "
        "whose method learns from the comparisons (dpo, kto): the RM judge and the next round use the latest trained ones")
    rm_start: Literal["base", "previous"] = option(
        "base",
        "where a round's reward models start: base = the reward model config's model, trained on `comparisons` and every "
        "round's labels so far (Llama 2); previous = from round 2 on, the latest trained reward model, trained further on "
        "the labels it has not seen (the rounds since it was trained)")
    seed: int = option(0, "seed of prompt draws, sampling and evaluation")

    def __post_init__(self) -> None:
        check(bool(self.project) and "/" not in self.project, "project", f"must be a plain name, got {self.project!r}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(bool(self.methods), "methods", "needs at least one method")
        for m in [*self.methods, *self.policy]:
            check(m in POLICY_METHODS, "methods" if m in self.methods else f"policy.{m}",
                  f"unknown method {m!r}; expected one of: {', '.join(POLICY_METHODS)}")
        for name, spec in [("sft", self.sft), ("rm_helpful", self.rm_helpful),
                           ("rm_safety", self.rm_safety), *self.policy.items()]:
            spec.config = spec.config or (POLICY_METHODS[name].config if name in POLICY_METHODS else f"configs/{name}.yaml")
        check(self.eval.heldout > 0 or not self.eval.judges, "eval.heldout", "win rates (eval.judges) need held-out prompts")
        stages = [("sft", self.sft, "sft"), ("rm_helpful", self.rm_helpful, "rm"), ("rm_safety", self.rm_safety, "rm"),
                  *((f"policy.{m}", s, "policy") for m, s in self.policy.items())]
        for name, spec, kind in stages:
            for item in spec.overrides:
                key = item.split("=", 1)[0].strip()
                check(key not in ROUND_SET_KEYS[kind], f"{name}.overrides",
                      f"{key} is set by the round ({ROUND_SET_KEYS[kind].get(key)}); remove {item!r}")
        check(bool(self.comparisons) or self.sample.first_round, "comparisons",
              "round 1's reward models need comparisons: list some, or set sample.first_round: true so round 1 labels its own")

    def method(self, n: int) -> str:
        return self.methods[min(n, len(self.methods)) - 1]

    def spec(self, method: str) -> StageSpec:
        """How the round runs ``method``: ``policy.<method>``, else the method's default config."""
        if method not in self.policy:
            self.policy[method] = StageSpec(POLICY_METHODS[method].config)
        return self.policy[method]

    def stage_specs(self) -> list[StageSpec]:
        """Every stage the rounds may run: SFT, both reward models, each configured method."""
        return [self.sft, self.rm_helpful, self.rm_safety, *(self.spec(m) for m in dict.fromkeys([*self.methods, *self.policy]))]


Config = RoundConfig  # what `align <command>` config checks look for
