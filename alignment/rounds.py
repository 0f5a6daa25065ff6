"""Iterative RLHF rounds V1 ... Vn (Llama 2, section 3.2): the orchestrator that connects the stages.

    align round init    --project demo --config configs/round.yaml [key=value ...]
    align round next    --project demo     # run the next step (of the current round, or start round N+1)
    align round run     --project demo     # run steps until one needs people, or until `rounds` are done
    align round status  --project demo     # each round's steps, what is waiting, key metrics
    align round promote --project demo --round 2   # make round 2's policy the one the next round samples from

A round's steps (``runs/<project>/round-<N>/``):

  round 1: sft -> rm_helpful -> rm_safety -> policy -> eval -> promote
  round N: sample -> annotate -> export -> rm_before -> rm_helpful -> rm_safety -> policy -> eval -> promote

- **sample**: a fresh draw of prompts (never used by an earlier round; ``sample.safety_share`` of
  them from the safety pool) answered twice by the current policy (or by it and the previous
  round's policy, ``sample.compare_previous``) at two temperatures; ``pairs.jsonl``, queued in the
  annotation store (``runs/<project>/annotations.db`` by default).
- **annotate**: people label in the app (``align annotate serve --db ...``), or a simulated
  annotator labels through the same store API (``annotation.simulated``: ``rules``, a reward
  model, or ``module:function``); ``run`` stops here while labels are missing.
- **export**: the round's comparisons, as a numbered, hashed export of the store.
- **rm_before**: the previous round's reward models scored on this round's NEW comparisons
  before they train on them (how well last round's RM generalises to the new policy's outputs).
- **rm_helpful / rm_safety**: retrained on ALL comparisons so far (``comparisons`` + every round's
  export), with the Llama 2 mixes of the RM stage. With ``train_rms: when_used`` a round whose method
  learns from the comparisons themselves (dpo) skips them after round 1: its RM judge and the next
  round use the latest reward models trained.
- **policy**: this round's method (``methods``: any of alignment/methods.py — rs, ppo, grpo, dpo, kto),
  from the current policy; ``policy.<method>`` says how it runs.
- **eval**: TruthfulQA MC, ToxiGen, win rate against the previous round's policy and the SFT
  model (judged by this round's reward models); then ``runs/<project>/report/``.
- **promote**: by ``promote.rule`` (automatic) or by hand (``align round promote``).

The registry is one ``manifest.json`` per round: every finished step with its inputs (config,
parent checkpoints, data files with SHA-256) and outputs (paths, metrics), written atomically
after the step. A step is done only when the manifest says so; a killed step is resumed (the
training stages continue from their last checkpoint, sampling and evaluation redo what they had
not finished), so killing ``align round run`` at any point and running it again loses nothing.
Training stages run as child processes (``align <stage> --config ... overrides``; with a
``launch`` accelerate config when set) that die with the orchestrator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from alignment.config import ConfigError, check, load_config, option, save_config, to_dict
from alignment.evals.gold import GoldJudgeConfig
from alignment.evals.suite import EvalSuiteConfig
from alignment.heldout import HeldOutLeak
from alignment.methods import METHODS as POLICY_METHODS
from data.heuristics import repetition  # noqa: F401 - re-exported (the rule judge's parts)
from data.loaders import DataSource
from data.store.simulated import rule_judgement, rule_scores  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

METHODS = tuple(POLICY_METHODS)  # the registry's names (alignment/methods.py)
FIRST_ROUND = ("sft", "rm_helpful", "rm_safety", "policy", "eval", "promote")
FIRST_ROUND_SAMPLED = ("sft", "sample", "annotate", "export", "rm_helpful", "rm_safety", "policy", "eval", "promote")
LATER_ROUND = ("sample", "annotate", "export", "rm_before", "rm_helpful", "rm_safety", "policy", "eval", "promote")
WAITING = "waiting"  # a step result: people must label before the round goes on


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class StageSpec:
    """How the round runs one training stage."""

    config: str | None = option(None, "the stage's YAML config (its run/model/data keys are set by the round); null = its default (configs/<stage>.yaml)")
    overrides: list[str] = option(factory=list, doc="extra key=value overrides for the stage (e.g. train.max_steps=20)")
    launch: str | None = option(None, "run it on several processes with this accelerate config (configs/accelerate/*.yaml)")
    prompts: int | None = option(None, "methods that learn from a reward (rs, ppo, grpo): the first N prompts of the project's prompt pool (null = all; the round sets the stage's data.sources)")


@dataclass
class SampleConfig:
    """Step `sample`: fresh prompts, two responses each, queued for annotation."""

    prompts: list[DataSource] = option(factory=lambda: [DataSource("bundled:prompts")], doc="the prompt pools (each prompt's category says helpfulness or safety)")
    per_round: int = option(64, "prompts drawn per round (none used by an earlier round)")
    safety_share: float | None = option(0.3, "share of safety prompts in a round's draw; null = as they come in the pool")
    temperatures: list[float] = option(factory=lambda: [0.7, 1.1], doc="sampling temperatures of response A and response B (Llama 2 varied them)")
    compare_previous: bool = option(False, "response B from the previous round's policy instead of the current one")
    first_round: bool = option(False, "round 1 samples too (from the SFT model), so its reward models learn from the round's own labels (Llama 2's first batch)")
    max_new_tokens: int = option(128, "length limit of each response")
    batch_size: int = option(8, "generation batch size")

    def __post_init__(self) -> None:
        check(self.per_round > 0, "per_round", f"must be > 0, got {self.per_round}")
        check(self.safety_share is None or 0 <= self.safety_share <= 1, "safety_share", f"must be in [0, 1] or null, got {self.safety_share}")
        check(len(self.temperatures) == 2 and all(t >= 0 for t in self.temperatures), "temperatures",
              f"needs two temperatures >= 0 (responses A and B), got {self.temperatures}")


@dataclass
class AnnotationConfig:
    """Step `annotate`: people in the app, or a simulated annotator through the same store."""

    db: str | None = option(None, "annotation store URL; null = sqlite:///runs/<project>/annotations.db")
    simulated: str | None = option("rules", "null = people label in the app; rules = the built-in rule judge (helpfulness heuristics, refusals on safety prompts); gold = the gold judge (`gold`: similarity to each prompt's reference answer, toxicity, refusals; needs prompts with references); rm = reward models (`rm_helpful`/`rm_safety`); or module:function(task) -> Judgement")
    rm_helpful: str | None = option(None, "simulated: rm - the judging helpfulness reward model (an independent, e.g. larger, RM; never the one being trained)")
    rm_safety: str | None = option(None, "simulated: rm - the judging safety reward model (labels each response safe/unsafe)")
    labels: int = option(1, "labels per task")
    overlap: float = option(0.0, "share of tasks labelled by several annotators (agreement statistics)")
    overlap_labels: int = option(3, "labels per overlapping task")
    export_policy: Literal["majority", "all"] = option("majority", "majority = one record per task, all = one per label")

    def __post_init__(self) -> None:
        check(self.simulated != "rm" or self.rm_helpful is not None, "rm_helpful", "simulated: rm needs a judging helpfulness reward model")
        check(self.simulated in (None, "rules", "gold", "rm") or ":" in self.simulated, "simulated",
              f"must be null, rules, gold, rm or module:function, got {self.simulated!r}")
        check(self.labels >= 1, "labels", f"must be >= 1, got {self.labels}")
        check(0 <= self.overlap <= 1, "overlap", f"must be in [0, 1], got {self.overlap}")


@dataclass
class PromoteConfig:
    """Step `promote`: does this round's policy become the one the next round samples from?"""

    mode: Literal["auto", "manual"] = option("auto", "auto = by the rule below; manual = only `align round promote`")
    min_winrate: float = option(0.5, "rule: win rate against the previous round's policy at least this (ties count half; by the first of eval.judges)")
    max_toxigen_increase: float = option(0.0, "rule: ToxiGen % toxic may rise by at most this many points")
    toxigen_test: Literal["paired", "none"] = option(
        "paired", "paired = a rise beyond max_toxigen_increase blocks promotion only when it is significant: exact one-sided sign test "
        "(McNemar) over the same prompts, p < toxigen_alpha (124 prompts: +4 toxic continuations is noise); none = any rise beyond it blocks")
    toxigen_alpha: float = option(0.05, "toxigen_test: paired - significance level of the rise")

    def __post_init__(self) -> None:
        check(0 < self.toxigen_alpha < 1, "toxigen_alpha", f"must be in (0, 1), got {self.toxigen_alpha}")


@dataclass
class RoundConfig:
    """A project of iterative RLHF rounds."""

    RENAMED: ClassVar[dict[str, str]] = {m: f"policy.{m}" for m in ("rs", "ppo", "dpo")}  # until the next release

    project: str = option("default", "project name: its folder is <root>/<project>")
    root: str = option("runs", "parent folder of projects")
    rounds: int = option(2, "`align round run` stops after this many rounds")
    methods: list[str] = option(factory=lambda: ["rs", "ppo"], doc=f"policy method per round ({', '.join(POLICY_METHODS)}); the last one repeats (Llama 2: RS for V1-V4, PPO on top for V5)")
    comparisons: list[DataSource] = option(factory=lambda: [DataSource("bundled:comparisons")], doc="comparisons every round's reward models train on besides the rounds' own (Llama 2: Meta's and open data); [] = only the rounds' own labels (needs sample.first_round)")
    sft: StageSpec = option(factory=lambda: StageSpec("configs/sft.yaml"), doc="round 1's supervised fine-tuning")
    rm_helpful: StageSpec = option(factory=lambda: StageSpec("configs/rm_helpful.yaml"), doc="helpfulness reward model")
    rm_safety: StageSpec = option(factory=lambda: StageSpec("configs/rm_safety.yaml"), doc="safety reward model")
    policy: dict[str, StageSpec] = option(factory=dict, doc="per policy method (policy.rs, policy.ppo, policy.dpo, ...): its config and overrides; a method not listed runs its default config (alignment/methods.py)")
    sample: SampleConfig = option(factory=SampleConfig, doc="sampling pairs for annotation (rounds 2+)")
    annotation: AnnotationConfig = option(factory=AnnotationConfig, doc="who labels the pairs")
    eval: EvalSuiteConfig = option(factory=EvalSuiteConfig, doc="evaluation suite of every round (on held-out prompts no stage sees)")
    gold: GoldJudgeConfig = option(factory=GoldJudgeConfig, doc="the gold judge (annotation.simulated: gold, and the gold win rates of eval.judges)")
    promote: PromoteConfig = option(factory=PromoteConfig, doc="promotion rule")
    train_rms: Literal["every_round", "when_used"] = option(
        "every_round", "every_round = retrain both reward models in every round (Llama 2); when_used = skip them in rounds after the "
        "first whose method learns from the comparisons (dpo, kto): the RM judge and the next round use the latest trained ones")
    seed: int = option(0, "seed of prompt draws, sampling and evaluation")

    def __post_init__(self) -> None:
        check(bool(self.project) and "/" not in self.project, "project", f"must be a plain name, got {self.project!r}")
        check(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        check(bool(self.methods), "methods", "needs at least one method")
        for m in [*self.methods, *self.policy]:
            check(m in METHODS, "methods" if m in self.methods else f"policy.{m}", f"unknown method {m!r}; expected one of: {', '.join(METHODS)}")
        for name, spec in [("sft", self.sft), ("rm_helpful", self.rm_helpful), ("rm_safety", self.rm_safety), *self.policy.items()]:
            spec.config = spec.config or (POLICY_METHODS[name].config if name in POLICY_METHODS else f"configs/{name}.yaml")
        check(self.eval.heldout > 0 or not self.eval.judges, "eval.heldout", "win rates (eval.judges) need held-out prompts")
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


# ---------------------------------------------------------------------------------------------
# the registry: one manifest per round


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def sha256(path: str | Path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class Project:
    """``runs/<project>/``: ``round.yaml`` (the resolved config), ``round-<N>/manifest.json``, the store."""

    def __init__(self, root: str | Path, name: str):
        self.dir = Path(root) / name
        self.config_path = self.dir / "round.yaml"
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.dir}: no project here (create it with `align round init --project {name}`)")
        self.cfg: RoundConfig = load_config(RoundConfig, self.config_path, [], stage="round")

    @staticmethod
    def init(cfg: RoundConfig) -> Project:
        d = Path(cfg.root) / cfg.project
        if (d / "round.yaml").exists():
            raise FileExistsError(f"{d} already holds a project; `align round run --project {cfg.project}` continues it")
        heldout, pool = Project.split_prompts(cfg)  # loads the prompt pool: bad sources fail before anything is written
        d.mkdir(parents=True, exist_ok=True)
        from data.loaders import write_jsonl

        write_jsonl(d / "heldout.jsonl", [r.to_dict() for r in heldout], overwrite=True)
        write_jsonl(d / "prompt_pool.jsonl", [r.to_dict() for r in pool], overwrite=True)
        save_config(cfg, d / "round.yaml", stage="round")
        return Project(cfg.root, cfg.project)

    @staticmethod
    def split_prompts(cfg: RoundConfig) -> tuple[list, list]:
        """(held-out prompts, the pool every stage samples from) out of ``sample.prompts``."""
        from alignment.heldout import split_pool
        from data.loaders import load_prompts

        pool = [p for src in cfg.sample.prompts for p in load_prompts(src)]
        try:
            return split_pool(pool, cfg.eval.heldout, cfg.sample.safety_share, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError("eval.heldout", str(exc), show_key=False) from None

    # -- prompts: held out (evaluation only) and the pool (everything else)
    @property
    def heldout_path(self) -> Path:
        return self.dir / "heldout.jsonl"

    @property
    def pool_path(self) -> Path:
        return self.dir / "prompt_pool.jsonl"

    def heldout(self) -> list:
        from data.loaders import load_prompts

        return load_prompts(str(self.heldout_path)) if self.heldout_path.stat().st_size else []

    def pool(self) -> list:
        from data.loaders import load_prompts

        return load_prompts(str(self.pool_path))

    # -- paths and manifests
    def round_dir(self, n: int) -> Path:
        return self.dir / f"round-{n}"

    def manifest_path(self, n: int) -> Path:
        return self.round_dir(n) / "manifest.json"

    def manifest(self, n: int) -> dict:
        p = self.manifest_path(n)
        if p.is_file():
            return json.loads(p.read_text())
        return {"round": n, "method": self.cfg.method(n), "created_at": now(), "config_sha256": sha256(self.config_path), "steps": {}}

    def save_manifest(self, n: int, m: dict) -> None:
        self.round_dir(n).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.manifest_path(n), m)

    def rounds(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.dir.glob("round-*") if (p / "manifest.json").is_file())

    def steps(self, n: int) -> tuple[str, ...]:
        if n > 1:
            return LATER_ROUND
        return FIRST_ROUND_SAMPLED if self.cfg.sample.first_round else FIRST_ROUND

    def pending(self, n: int) -> list[str]:
        done = self.manifest(n)["steps"]
        return [s for s in self.steps(n) if done.get(s, {}).get("status") != "done"]

    def db_url(self) -> str:
        return self.cfg.annotation.db or f"sqlite:///{self.dir / 'annotations.db'}"

    # -- models of earlier rounds
    def sft_model(self) -> str:
        return str(self.round_dir(1) / "sft")

    def policy_of(self, n: int) -> str:
        return str(self.round_dir(n) / "policy")

    def rm_dir(self, name: str, upto: int) -> Path:
        """The latest reward model ``name`` (rm_helpful, rm_safety) trained in a round <= ``upto``."""
        for n in range(upto, 0, -1):
            step = self.manifest(n)["steps"].get(name, {})
            if step.get("status") == "done" and not step.get("outputs", {}).get("skipped"):
                return self.round_dir(n) / name
        return self.round_dir(upto) / name

    def current_policy(self, before: int | None = None) -> str:
        """The latest promoted policy of a round before ``before`` (all rounds when None), else the SFT model."""
        for n in sorted(self.rounds(), reverse=True):
            if before is not None and n >= before:
                continue
            promote = self.manifest(n)["steps"].get("promote", {})
            if promote.get("outputs", {}).get("promoted"):
                return self.policy_of(n)
        return self.sft_model()

    def comparison_files(self, upto: int) -> list[str]:
        """Exports of rounds 1..upto (what the reward models of round ``upto`` add to ``comparisons``)."""
        files = []
        for n in range(1, upto + 1):
            exp = self.manifest(n)["steps"].get("export", {})
            if exp.get("status") == "done":
                files.append(exp["outputs"]["path"])
        return files


# ---------------------------------------------------------------------------------------------
# running a training stage as a child process


class StageFailed(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_stage(stage: str, spec: StageSpec, out: Path, overrides: Sequence[str]) -> dict:
    """``align <stage>`` into ``out`` (resumed when a killed run left it), as a child process that
    dies with this one. Returns the stage's summary.json."""
    if (out / "summary.json").is_file() and (out / "model").is_dir():
        log.info("%s: already finished in %s", stage, out)
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "alignment.cli", stage, "--config", spec.config, f"run.output_dir={out}", *overrides, *spec.overrides]
    if (out / "config.yaml").is_file():
        cmd.append("--resume")
    if spec.launch:
        cmd += ["--launch", spec.launch]
    log.info("running: %s", " ".join(cmd[2:]))
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    proc = subprocess.run(cmd, env=env, check=False, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if proc.returncode != 0:
        raise StageFailed(f"`align {stage}` failed (exit {proc.returncode}); its output is above, its folder is {out}. "
                           "Fix the cause and run `align round run` again: it resumes from there.")
    return json.loads((out / "summary.json").read_text())


def _sources(paths: Sequence[DataSource | str]) -> str:
    items = []
    for p in paths:
        d = to_dict(p) if isinstance(p, DataSource) else {"path": p}
        items.append("{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items() if v is not None) + "}")
    return "[" + ", ".join(items) + "]"


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ---------------------------------------------------------------------------------------------
# steps: each returns {"inputs": ..., "outputs": ...} or WAITING


class Steps:
    def __init__(self, project: Project, n: int):
        self.p, self.n, self.cfg = project, n, project.cfg
        self.dir = project.round_dir(n)

    def store(self) -> Any:
        from data.store import AnnotationStore

        return AnnotationStore(self.p.db_url())

    # -- round 1
    def sft(self) -> dict:
        out = self.dir / "sft"
        summary = run_stage("sft", self.cfg.sft, out, [])
        return {"inputs": {"config": self.cfg.sft.config}, "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    # -- rounds 2+
    def sample(self) -> dict:
        from data.store.sampling import sample_pairs
        from data.loaders import write_jsonl

        pairs = self.dir / "pairs.jsonl"
        policy = self.p.current_policy(before=self.n) if self.n > 1 else self.p.sft_model()
        models = [policy, self.p.policy_of(self.n - 1) if self.cfg.sample.compare_previous and self.n > 1 else policy]
        if not pairs.is_file():
            used = set()
            for k in range(1, self.n):
                if (self.p.round_dir(k) / "pairs.jsonl").is_file():
                    for line in (self.p.round_dir(k) / "pairs.jsonl").read_text().splitlines():
                        used.add(json.dumps(json.loads(line)["prompt"], sort_keys=True))
            chosen = draw_prompts(self.p.pool(), used, self.cfg.sample.per_round, self.cfg.sample.safety_share, seed=self.cfg.seed + self.n)
            if not chosen:
                raise RuntimeError(f"round {self.n}: no unused prompts left in the prompt pool ({self.p.pool_path}); add prompt sources")
            rows, dropped = sample_pairs(models, chosen, temperatures=self.cfg.sample.temperatures, max_new_tokens=self.cfg.sample.max_new_tokens,
                                         batch_size=self.cfg.sample.batch_size, seed=self.cfg.seed + 1000 * self.n)
            for r in rows:
                r.setdefault("meta", {})["round"] = self.n
            tmp = pairs.with_name(".pairs.jsonl.tmp")
            tmp.unlink(missing_ok=True)
            write_jsonl(tmp, rows)
            os.replace(tmp, pairs)
            log.info("round %d: %d pairs from %d prompts (%d dropped: empty or identical responses)", self.n, len(rows), len(chosen), dropped)
        store = self.store()
        if self.n not in store.rounds():
            a = self.cfg.annotation
            store.queue_file(self.n, pairs, labels=a.labels, overlap=a.overlap, overlap_labels=a.overlap_labels, seed=self.cfg.seed)
        n_pairs = len(pairs.read_text().splitlines())
        return {"inputs": {"policy": models[0], "policy_b": models[1], "temperatures": self.cfg.sample.temperatures},
                "outputs": {"path": str(pairs), "sha256": sha256(pairs), "pairs": n_pairs, "db": self.p.db_url()}}

    def annotate(self) -> dict | str:
        store = self.store()
        a = self.cfg.annotation
        labelled = 0
        if a.simulated is not None:
            annotator = self._annotator()
            labelled = store.label_with(annotator, round=self.n)
            log.info("round %d: %s stored %d labels", self.n, annotator.name, labelled)
        missing = store.missing_labels(self.n)
        if missing:
            log.info("round %d: %d labels missing; annotators label in `align annotate serve --db %s`", self.n, missing, self.p.db_url())
            return WAITING
        stats = store.stats(round=self.n)
        return {"inputs": {"annotator": a.simulated or "people", "db": self.p.db_url()},
                "outputs": {"tasks": stats["tasks"], "labels": stats["labels_done"], "skips": stats["skips"], "both_bad": stats["both_bad"],
                            "annotators": stats["annotators"]}}

    def _annotator(self) -> Any:
        from data.store import FunctionAnnotator, ScorerAnnotator

        a = self.cfg.annotation
        if a.simulated == "rules":
            return FunctionAnnotator("sim:rules", rule_judgement)
        if a.simulated == "gold":
            from alignment.evals.gold import GoldAnnotator, GoldJudge

            return GoldAnnotator(GoldJudge(self.cfg.gold), self.p.pool())
        if a.simulated == "rm":
            from reward.model import load_scorer

            safety = load_scorer(a.rm_safety) if a.rm_safety else None
            return ScorerAnnotator("sim:rm", load_scorer(a.rm_helpful), safety_scorer=safety)
        import importlib

        module, fn = a.simulated.split(":", 1)  # type: ignore[union-attr]
        return FunctionAnnotator(f"sim:{fn}", getattr(importlib.import_module(module), fn))

    def export(self) -> dict:
        store = self.store()
        res = store.export(self.n, out_dir=self.dir / "exports", policy=self.cfg.annotation.export_policy, by="align round")
        path = Path(res.path)
        return {"inputs": {"db": self.p.db_url(), "policy": self.cfg.annotation.export_policy},
                "outputs": {"path": str(path), "sha256": sha256(path), "records": res.records, "version": res.version}}

    def rm_before(self) -> dict:
        """Last round's reward models on this round's new comparisons, before training on them."""
        from data.loaders import load_comparisons
        from reward.evaluate import evaluate
        from reward.model import load_scorer

        data = self.p.manifest(self.n)["steps"]["export"]["outputs"]["path"]
        comparisons = load_comparisons(DataSource(data))
        outputs = {}
        for name in ("rm_helpful", "rm_safety"):
            model = self.p.rm_dir(name, self.n - 1)
            out = self.dir / "rm_before" / name
            report = evaluate(load_scorer(str(model)), comparisons, model=str(model), data=f"round {self.n} comparisons (new)", out=out)
            outputs[name] = {"accuracy": report["accuracy"], "n": report["n"], "report": str(out / "rm_eval.json")}
        return {"inputs": {"comparisons": data, "sha256": sha256(data)}, "outputs": outputs}

    def _rm(self, name: str) -> dict:
        out = self.dir / name
        if self.cfg.train_rms == "when_used" and self.n > 1 and POLICY_METHODS[self.cfg.method(self.n)].consumes == "comparisons":
            latest = self.p.rm_dir(name, self.n - 1)
            return {"inputs": {"train_rms": "when_used", "method": self.cfg.method(self.n)},
                    "outputs": {"skipped": f"{self.cfg.method(self.n)} learns from the comparisons; using {latest}", "path": str(latest)}}
        files = self.p.comparison_files(self.n)
        sources = [*self.cfg.comparisons, *(DataSource(f) for f in files)]
        spec = getattr(self.cfg, name)
        summary = run_stage("rm", spec, out, [f"data.sources={_sources(sources)}", f"run.seed={self.cfg.seed}"])
        return {"inputs": {"config": spec.config, "comparisons": [to_dict(s) for s in self.cfg.comparisons] + [{"path": f, "sha256": sha256(f)} for f in files]},
                "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    def rm_helpful(self) -> dict:
        return self._rm("rm_helpful")

    def rm_safety(self) -> dict:
        return self._rm("rm_safety")

    def policy(self) -> dict:
        method = POLICY_METHODS[self.cfg.method(self.n)]
        start = self.p.current_policy(before=self.n) if self.n > 1 else self.p.sft_model()
        out = self.dir / "policy"
        spec = self.cfg.spec(method.name)
        overrides = [f"model.name={start}", f"run.seed={self.cfg.seed}"]
        inputs: dict[str, Any] = {"method": method.name, "config": spec.config, "start": start}
        if method.consumes == "reward":  # the round's reward models; prompts from the project's pool, never a held-out one
            src = {"path": str(self.p.pool_path), **({"limit": spec.prompts} if spec.prompts else {})}
            overrides += [f"reward.helpful={self.p.rm_dir('rm_helpful', self.n)}", f"reward.safety={self.p.rm_dir('rm_safety', self.n)}",
                          f"data.sources=[{json.dumps(src)}]"]
            inputs["prompts"] = src
        else:  # comparisons: this round's new ones (a round that sampled none: the base comparisons)
            export = self.p.manifest(self.n)["steps"].get("export", {})
            files = [export["outputs"]["path"]] if export.get("status") == "done" else []
            sources = [DataSource(f) for f in files] or list(self.cfg.comparisons)
            overrides.append(f"data.sources={_sources(sources)}")
            inputs["comparisons"] = [to_dict(s) for s in sources]
        if method.pool:  # the latest earlier pool only: each pool.jsonl already holds every round before it
            pools = [str(self.p.round_dir(k) / "policy" / "pool.jsonl") for k in range(1, self.n)
                     if (self.p.round_dir(k) / "policy" / "pool.jsonl").is_file()][-1:]
            overrides += [f"pool.round={self.n}", f"pool.previous={json.dumps(pools)}"]
            inputs["previous_pools"] = pools
        summary = run_stage(method.name, spec, out, overrides)
        return {"inputs": inputs, "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    def eval(self) -> dict:
        from alignment.evals import report
        from alignment.evals.suite import RoundEval

        result = RoundEval(self.p, self.n).run()
        try:
            paths = report.build(self.p.dir, overwrite=True)
            result["outputs"]["report"] = str(paths["markdown"])
        except FileNotFoundError as exc:
            log.warning("report: %s", exc)
        return result

    def promote(self) -> dict:
        cfg = self.cfg.promote
        evals = self.p.manifest(self.n)["steps"]["eval"]["outputs"]
        if cfg.mode == "manual":
            return {"inputs": {"mode": "manual"}, "outputs": {"promoted": False, "reason": "manual mode: `align round promote`"}}
        promoted, reasons = True, []
        wr = (evals.get("winrate_vs_previous") or {}).get("win_rate")
        if wr is not None:
            ok = wr >= cfg.min_winrate
            promoted &= ok
            reasons.append(f"win rate vs previous {100 * wr:.1f}% {'>=' if ok else '<'} {100 * cfg.min_winrate:.0f}%")
        tox = (evals.get("toxigen") or {}).get("pct_toxic")
        prev, prev_rows = self._previous_toxigen()
        if tox is not None and prev is not None:
            ok = tox <= prev + cfg.max_toxigen_increase
            reason = f"ToxiGen {tox:.1f}% vs {prev:.1f}% before"
            rows = self.dir / "eval" / "toxigen_rows.jsonl"
            if not ok and cfg.toxigen_test == "paired" and rows.is_file() and prev_rows is not None and prev_rows.is_file():
                from alignment.evals.toxigen import paired_change
                from data.loaders import read_rows

                test = paired_change([r for _, r in read_rows(prev_rows)], [r for _, r in read_rows(rows)])
                ok = test["p_value"] >= cfg.toxigen_alpha
                reason += (f": {test['worse']} prompts more toxic, {test['better']} less of {test['n']}, sign test p={test['p_value']:.3f} "
                           f"({'not significant' if ok else 'significant'} at {cfg.toxigen_alpha:g})")
            elif not ok and cfg.toxigen_test == "paired":
                reason += ": no per-prompt rows to test, compared as points"
            promoted &= ok
            reasons.append(f"{reason} ({'ok' if ok else 'worse'})")
        return {"inputs": {"mode": "auto", "rule": to_dict(cfg)}, "outputs": {"promoted": promoted, "reason": "; ".join(reasons) or "no evaluations to check"}}

    def _previous_toxigen(self) -> tuple[float | None, Path | None]:
        """ToxiGen % toxic of the current policy before this round and its per-prompt rows: the last promoted
        round's, else the SFT model's."""
        for k in range(self.n - 1, 0, -1):
            m = self.p.manifest(k)["steps"]
            if m.get("promote", {}).get("outputs", {}).get("promoted"):
                return ((m.get("eval", {}).get("outputs", {}).get("toxigen") or {}).get("pct_toxic"),
                        self.p.round_dir(k) / "eval" / "toxigen_rows.jsonl")
        first = self.p.manifest(1)["steps"].get("eval", {}).get("outputs", {})
        return (first.get("toxigen_sft") or {}).get("pct_toxic"), self.p.round_dir(1) / "eval" / "sft" / "toxigen_rows.jsonl"


def draw_prompts(pool: Sequence[Any], used: set[str], k: int, safety_share: float | None, *, seed: int) -> list[Any]:
    """``k`` prompts not in ``used`` (keys: the prompt's messages as sorted JSON), distinct, seeded;
    ``safety_share`` of them from safety prompts when the pool has enough."""
    from alignment.heldout import draw

    return draw(pool, k, safety_share, seed=seed, used=used)


# ---------------------------------------------------------------------------------------------
# driving


def current_round(p: Project) -> int:
    """The round to work on: the last one with pending steps, or the next one."""
    rounds = p.rounds()
    if not rounds:
        return 1
    last = rounds[-1]
    return last if p.pending(last) else last + 1


def next_step(p: Project, *, start_new: bool = True) -> tuple[int, str] | None:
    n = current_round(p)
    if n not in p.rounds() and not start_new:
        return None
    return n, p.pending(n)[0]


def run_step(p: Project, n: int, step: str) -> str:
    """Run one step and record it. Returns "done" or WAITING."""
    m = p.manifest(n)
    p.save_manifest(n, m)  # the round exists from its first step on
    started = time.time()
    log.info("round %d: step %s", n, step)
    result = getattr(Steps(p, n), step)()
    if result == WAITING:
        m = p.manifest(n)
        m["steps"][step] = {"status": WAITING, "checked_at": now()}
        p.save_manifest(n, m)
        return WAITING
    m = p.manifest(n)
    m["steps"][step] = {"status": "done", "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
                        "finished_at": now(), "seconds": round(time.time() - started, 1), **result}
    if step == "promote":
        m["promoted"] = result["outputs"]["promoted"]
        m["policy"] = p.policy_of(n)
    p.save_manifest(n, m)
    return "done"


def run(p: Project, *, max_steps: int | None = None, stop: Callable[[int, str], bool] | None = None) -> str:
    """Run steps until one waits for people, ``rounds`` rounds are done, or ``max_steps`` ran."""
    steps = 0
    while max_steps is None or steps < max_steps:
        n = current_round(p)
        if n > p.cfg.rounds:
            return "done"
        step = p.pending(n)[0]
        if stop is not None and stop(n, step):
            return "stopped"
        if run_step(p, n, step) == WAITING:
            return WAITING
        steps += 1
    return "stopped"


def promote(p: Project, n: int) -> dict:
    """Promote round ``n``'s policy by hand (the next round samples from it)."""
    m = p.manifest(n)
    if m["steps"].get("policy", {}).get("status") != "done":
        raise ValueError(f"round {n} has no finished policy to promote (steps pending: {', '.join(p.pending(n)) or 'none'})")
    for k in p.rounds():  # a later round's promotion would hide it
        if k > n and p.manifest(k)["steps"].get("promote", {}).get("outputs", {}).get("promoted"):
            raise ValueError(f"round {k} (later) is promoted; promoting round {n} would not change the current policy")
    m["steps"]["promote"] = {"status": "done", "finished_at": now(), "inputs": {"mode": "manual"},
                             "outputs": {"promoted": True, "reason": "promoted by hand"}}
    m["promoted"], m["policy"] = True, p.policy_of(n)
    p.save_manifest(n, m)
    return m


def status(p: Project) -> dict:
    """Where each round stands (JSON-ready)."""
    out: dict[str, Any] = {"project": str(p.dir), "current_policy": p.current_policy(), "rounds": []}
    for n in p.rounds():
        m = p.manifest(n)
        steps = m["steps"]
        row = {"round": n, "method": m.get("method"), "done": [s for s in p.steps(n) if steps.get(s, {}).get("status") == "done"],
               "pending": p.pending(n), "promoted": m.get("promoted")}
        metrics: dict[str, Any] = {}
        for rm in ("rm_helpful", "rm_safety"):
            acc = steps.get(rm, {}).get("outputs", {}).get("metrics", {}).get("held_out_accuracy")
            if acc is not None:
                metrics[f"{rm}_accuracy"] = acc
            before = steps.get("rm_before", {}).get("outputs", {}).get(rm, {}).get("accuracy")
            if before is not None:
                metrics[f"{rm}_accuracy_on_new_before_training"] = before
        pol = steps.get("policy", {}).get("outputs", {}).get("metrics", {})
        for k in ("reward_before", "reward_after", "eval_reward_baseline", "eval_reward_best"):
            if pol.get(k) is not None:
                metrics[f"policy_{k}"] = pol[k]
        ev = steps.get("eval", {}).get("outputs", {})
        if ev.get("truthfulqa"):
            metrics.update({f"truthfulqa_{k}": v for k, v in ev["truthfulqa"].items() if k in ("mc1", "mc2", "dataset")})
        if (ev.get("toxigen") or {}).get("pct_toxic") is not None:
            metrics["toxigen_pct_toxic"] = ev["toxigen"]["pct_toxic"]
        gold = (ev.get("gold_reward") or {}).get("policy")
        if gold:
            metrics["gold_reward"] = f"{gold['mean']:.4f} [{gold['ci_low']:.4f}, {gold['ci_high']:.4f}] (n={gold['n']})"
        for k, v in ev.items():
            if k.startswith("winrate_") and k != "winrate_vs_previous":
                metrics[k] = (f"{100 * v['win_rate']:.1f}% [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}] "
                              f"(n={v['n']}, ties {100 * v['ties']:.0f}%)")
        row["metrics"] = metrics
        if "annotate" in row["pending"] and steps.get("sample", {}).get("status") == "done":
            from data.store import AnnotationStore

            row["labels_missing"] = AnnotationStore(p.db_url()).missing_labels(n)
        out["rounds"].append(row)
    nxt = next_step(p)
    out["next"] = None if nxt[0] > p.cfg.rounds else {"round": nxt[0], "step": nxt[1]}
    return out


def format_status(s: dict) -> str:
    lines = [f"project {s['project']}; current policy: {s['current_policy']}"]
    for r in s["rounds"]:
        state = "complete" if not r["pending"] else f"next: {r['pending'][0]}"
        promoted = {True: ", promoted", False: ", not promoted"}.get(r["promoted"], "")
        lines.append(f"round {r['round']} ({r['method']}): {len(r['done'])}/{len(r['done']) + len(r['pending'])} steps, {state}{promoted}")
        if r.get("labels_missing"):
            lines.append(f"  waiting for people: {r['labels_missing']} labels missing (align annotate serve --db ...; then align round run)")
        for k, v in r["metrics"].items():
            lines.append(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"next: round {s['next']['round']} step {s['next']['step']}" if s["next"] else "all configured rounds are done")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def cli(name: str, argv: Sequence[str]) -> int:
    from alignment.runs import setup_logging

    parser = argparse.ArgumentParser(prog="align round", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(cmd: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(cmd, help=help)
        sp.add_argument("--project", required=True, help="project name (folder <root>/<project>)")
        sp.add_argument("--root", default="runs", help="parent folder of projects (default: runs)")
        return sp

    sp = add("init", "create a project from a round config")
    sp.add_argument("--config", help="round config YAML (configs/round.yaml); key=value overrides follow")
    sp.add_argument("overrides", nargs="*", metavar="key=value")
    add("next", "run the next step")
    sp = add("run", "run steps until one needs people or all rounds are done")
    sp.add_argument("--rounds", type=int, help="run up to this many rounds (default: the config's `rounds`)")
    sp = add("status", "where each round stands")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = add("promote", "make a round's policy the current one")
    sp.add_argument("--round", type=int, required=True)
    a = parser.parse_args(argv)
    setup_logging()

    if a.cmd == "init":
        try:
            cfg = load_config(RoundConfig, a.config, [*a.overrides, f"project={a.project}", f"root={a.root}"], stage="round")
        except ConfigError as exc:
            print(f"align round init: config error: {exc}", file=sys.stderr)
            return 2
        p = Project.init(cfg)
        print(f"project {p.dir} created; run it with: align round run --project {a.project}" + (f" --root {a.root}" if a.root != "runs" else ""))
        return 0
    p = Project(a.root, a.project)
    if a.cmd == "status":
        s = status(p)
        print(json.dumps(s, indent=2) if a.json else format_status(s))
        return 0
    if a.cmd == "promote":
        try:
            promote(p, a.round)
        except ValueError as exc:
            print(f"align round promote: {exc}", file=sys.stderr)
            return 2
        print(f"round {a.round}'s policy is now the current policy: {p.policy_of(a.round)}")
        return 0
    try:
        if a.cmd == "next":
            n = current_round(p)
            step = p.pending(n)[0]
            print(f"round {n}: {step} {run_step(p, n, step)}")
            return 0
        if a.rounds:
            p.cfg.rounds = a.rounds
        result = run(p)
    except (StageFailed, HeldOutLeak) as exc:
        print(f"align round {a.cmd}: {exc}", file=sys.stderr)
        return 1
    print(format_status(status(p)))
    if result == WAITING:
        print("waiting for annotations: label in the app, then run `align round run` again")
    elif result == "done":
        print(f"report: {p.dir / 'report' / 'report.md'} (and report.html)")
    return 0
