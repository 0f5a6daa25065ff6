"""Iterative RLHF rounds V1 ... Vn (Llama 2, section 3.2): the orchestrator that connects the stages.

    align round init    --project demo --config configs/round.yaml [key=value ...]
    align round next    --project demo     # run the next step (of the current round, or start round N+1)
    align round run     --project demo     # run steps until one needs people, or until `rounds` are done
    align round status  --project demo     # each round's steps, what is waiting, key metrics
    align round promote --project demo --round 2   # make round 2's policy the one the next round samples from

A round's steps (``runs/<project>/round-<N>/``):

  round 1: sft -> rm_helpful -> rm_safety -> policy -> eval -> promote
           (with ``sample.first_round: true``: sft -> sample -> annotate -> export -> rm_helpful -> ...,
           so round 1's reward models learn from its own labelled pairs too)
  round N: sample -> annotate -> export -> rm_before -> rm_helpful -> rm_safety -> policy -> eval -> promote

- **sample**: a fresh draw of prompts (never used by an earlier round; ``sample.safety_share`` of
  them from the safety pool) answered twice by the current policy (or by it and the previous
  round's policy, ``sample.compare_previous``) at two temperatures; ``pairs.jsonl``, queued in the
  annotation store (``runs/<project>/annotations.db`` by default).
- **annotate**: people label in the app (``align annotate serve --project P``), or a simulated
  annotator labels through the same store API (``annotation.simulated``: ``rules``, ``gold``, a reward
  model, or ``module:function``); ``run`` stops here while a task still needs labels that an active
  annotator could give (``align round status`` names each such task and why); a task every active
  annotator labelled or skipped is settled with the labels it has.
- **export**: the round's comparisons, as a numbered, hashed export of the store; it closes the round
  first (later labels and changes are refused, so none is confirmed and then ignored).
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
- **promote**: automatically (``promote.mode: auto``) when the validation win rate against the previous
  policy reaches ``promote.min_winrate`` and ToxiGen does not rise significantly on its validation draw
  (``promote.max_toxigen_increase``; never the prompts the reports use), or by hand (``align round promote``).

The registry is one ``manifest.json`` per round: every finished step with its inputs (config,
parent checkpoints, data files with SHA-256) and outputs (paths, metrics), written atomically
after the step. A step is done only when the manifest says so; a killed step is resumed (the
training stages continue from their last checkpoint, sampling and evaluation redo what they had
not finished), so killing ``align round run`` at any point and running it again loses nothing; the
manifest keeps each killed or failed attempt's time under the step's ``interrupted``. One process
runs a project's steps at a time (``<project>/.lock``); a second ``align round run`` is refused.
Training stages run as child processes (``align <stage> --config ... overrides``; with a
``launch`` accelerate config when set) that die with the orchestrator.
"""

from data.heldout import HeldOutLeak
from alignment.rounds.config import (
    FIRST_ROUND,
    FIRST_ROUND_SAMPLED,
    LATER_ROUND,
    WAITING,
    AnnotationConfig,
    Config,
    PromoteConfig,
    RoundConfig,
    SampleConfig,
    StageSpec,
)
from alignment.rounds.driver import current_round, format_status, next_step, promote, run, run_step, status
from alignment.rounds.project import Project, ProjectBusy, now, project_lock, sha256
from alignment.rounds.steps import StageFailed, Steps, draw_prompts, run_stage


def cli(name: str, argv: list[str]) -> int:
    """``align round ...`` (alignment/rounds/cli.py)."""
    from alignment.rounds.cli import cli as round_cli

    return round_cli(name, argv, description=__doc__)


__all__ = ["FIRST_ROUND", "FIRST_ROUND_SAMPLED", "LATER_ROUND", "WAITING", "AnnotationConfig", "Config", "HeldOutLeak",
           "Project", "ProjectBusy", "PromoteConfig", "RoundConfig", "SampleConfig", "StageFailed", "StageSpec", "Steps", "cli",
           "current_round", "draw_prompts", "format_status", "next_step", "now", "project_lock", "promote", "run", "run_stage",
           "run_step", "sha256", "status"]
