"""Reward-model tools: ``align rm-eval`` (accuracy report) and ``align score`` (score responses).

    align rm-eval --model runs/<run>/rm_helpful --data ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz --sample 500
    align rm-eval --model runs/<run>/rm_safety --held-out          # the validation split the run held out
    align score --helpful runs/<run>/rm_helpful --safety runs/<run>/rm_safety --data responses.jsonl --out scores.jsonl

``align score`` reads rows with ``prompt`` (a string or a conversation) or ``messages`` plus a
``response`` (what ``align generate --out`` writes), or dialogues whose last turn is the
assistant's; ``category: safety`` or ``is_safety: true`` marks a safety prompt for the Llama 2
rule. Each row is written back with ``helpful``, ``safety`` and ``combined`` scores.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from data.errors import DataError
from data.schemas import Message, prompt_messages

log = logging.getLogger(__name__)


def _default_out(model: str, data: str | None) -> Path:
    if data is None:
        name = "held-out"
    elif data.startswith("bundled:"):
        name = data.split(":", 1)[1]
    else:
        p = Path(data)
        stem = p.name.split(".")[0]
        name = f"{p.parent.name}-{stem}" if p.parent.name else stem
    return Path(model) / f"rm_eval-{name}"


def held_out_comparisons(model: str) -> tuple[list, str]:
    """The validation split of the run that trained ``model`` (a stage output folder), rebuilt from its config."""
    from foundation.config import load_config
    from reward.rm import RMConfig, load_data

    config = Path(model) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"--held-out needs a reward-model stage output folder with config.yaml; {config} does not exist")
    cfg = load_config(RMConfig, config, stage="rm")
    _, val, _ = load_data(cfg.data, cfg.objective, cfg.run.seed)
    if not val:
        raise ValueError(f"{config}: the run held out no validation split (data.val_fraction=0)")
    return val, f"validation split of {', '.join(s.path for s in cfg.data.sources)}"


def cmd_rm_eval(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align rm-eval", description="Reward-model accuracy: overall, per strength rating, per "
                                "safety bin, calibration by reward gap. Writes rm_eval.json, rm_eval.md and rewards.png.")
    p.add_argument("--model", required=True,
                   help="reward model: stage output (runs/<run>/rm_helpful), checkpoint or adapter folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="comparisons: bundled:comparisons, our JSONL, HH-RLHF, PKU-SafeRLHF or TRL "
                                    "preference file, a local copy of a Hub dataset (folder) or hub:Anthropic/hh-rlhf (with "
                                    "--subset helpful-base --split test)")
    src.add_argument("--held-out", action="store_true",
                     help="the validation split the run held out (needs the run's config.yaml)")
    p.add_argument("--format", default="auto", help="row format of --data (default: detected)")
    p.add_argument("--subset", help="dataset configuration or data_dir of a Hub dataset or local copy (e.g. helpful-base "
                                    "for Anthropic/hh-rlhf)")
    p.add_argument("--split", default="test", help="split of a Hub dataset or local copy (default: test)")
    p.add_argument("--category", choices=["helpfulness", "safety"],
                   help="category for rows without one (e.g. safety for harmless-base)")
    p.add_argument("--limit", type=int, help="read only the first N comparisons")
    p.add_argument("--sample", type=int, help="evaluate a seeded random sample of N comparisons")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--out", help="report folder (default: <model>/rm_eval-<data name>); an existing report is never replaced")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, help="truncate longer sequences from the start (default: the training max_length)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    from foundation.runs import setup_logging
    from data.loaders import DataSource, load_comparisons
    from reward.evaluate import evaluate, to_markdown
    from reward.model import load_scorer

    setup_logging()
    if a.held_out:
        comparisons, data_name = held_out_comparisons(a.model)
    else:
        comparisons = load_comparisons(DataSource(path=a.data, format=a.format, category=a.category,
                                                  limit=a.limit, subset=a.subset, split=a.split))
        data_name = a.data + (f" ({a.subset}, {a.split})" if a.subset else "")
    if a.sample is not None and a.sample < len(comparisons):
        comparisons = random.Random(a.seed).sample(comparisons, a.sample)
        data_name += f" (random sample of {a.sample}, seed {a.seed})"
    out = Path(a.out) if a.out else _default_out(a.model, a.data)
    if (out / "rm_eval.json").exists():
        raise FileExistsError(f"{out / 'rm_eval.json'} exists; refusing to overwrite it (choose another --out)")
    scorer = load_scorer(a.model, device=a.device, batch_size=a.batch_size, max_length=a.max_length)
    report = evaluate(scorer, comparisons, model=a.model, data=data_name, out=out)
    print(to_markdown(report))
    print(f"written: {out}/rm_eval.json, rm_eval.md, rewards.png")
    return 0


def _row_pair(row: dict) -> tuple[list[Message], str]:
    """(prompt conversation, response) of one row of ``align score --data``."""
    if "response" in row:
        response = row["response"]
        if not isinstance(response, str) or not response.strip():
            raise DataError("expected a non-empty string", key="response")
        if row.get("prompt") is not None:
            return prompt_messages(row["prompt"], "prompt"), response
        if row.get("messages") is not None:
            return prompt_messages(row["messages"], "messages"), response
        raise DataError("a row with a response needs its `prompt` (string or conversation) or `messages`", key="prompt")
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        from data.schemas import parse_messages

        msgs = parse_messages(messages)
        return prompt_messages(msgs[:-1], "messages"), msgs[-1]["content"]
    raise DataError("expected `prompt` + `response`, or `messages` ending with an assistant turn", key="response")


def _row_is_safety(row: dict) -> bool:
    flag = row.get("is_safety")
    if flag is not None:
        if not isinstance(flag, bool):
            raise DataError(f"expected true/false, got {flag!r}", key="is_safety")
        return flag
    return row.get("category") == "safety"


def cmd_score(argv: Sequence[str]) -> int:
    from reward.combine import RULES

    p = argparse.ArgumentParser(prog="align score", description="Score responses with the helpfulness and/or safety reward "
                                "model; with both, also the combined reward (Llama 2 eq. 4, or safe-rlhf's reward - λ·cost).")
    p.add_argument("--helpful", help="helpfulness reward model (runs/<run>/rm_helpful)")
    p.add_argument("--safety", help="safety reward model (runs/<run>/rm_safety)")
    p.add_argument("--data", required=True,
                   help="JSONL/JSON/CSV rows: prompt (or messages) + response, or dialogues ending with the assistant")
    p.add_argument("--out", required=True,
                   help="output JSONL: every input row plus its scores (an existing file is never replaced)")
    p.add_argument("--rule", choices=list(RULES), default="llama2", help="how the two scores combine (reward.combine.RULES)")
    p.add_argument("--threshold", type=float, default=0.15, help="llama2 rule: use the safety score when σ(safety) is below this")
    p.add_argument("--lam", type=float, default=1.0, help="safe_rlhf rule: λ in helpful - λ·cost (cost = -safety score)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if not (a.helpful or a.safety):
        p.error("give --helpful MODEL, --safety MODEL, or both")
    from foundation.runs import setup_logging
    from data.loaders import read_rows, write_jsonl
    from reward.combine import CombinedScorer
    from reward.model import load_scorer

    setup_logging()
    out = Path(a.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it")
    rows, prompts, responses, flags = [], [], [], []
    for lineno, row in read_rows(Path(a.data)):  # every row is validated before a model loads
        try:
            prompt, response = _row_pair(row)
            flags.append(_row_is_safety(row))
        except DataError as exc:
            raise exc.located(a.data, lineno) from None
        rows.append(row)
        prompts.append(prompt)
        responses.append(response)
    if not rows:
        raise DataError("no rows to score", path=a.data)
    scorers = {k: load_scorer(m, device=a.device, batch_size=a.batch_size)
               for k, m in (("helpful", a.helpful), ("safety", a.safety)) if m}
    if len(scorers) == 2:
        combined = CombinedScorer(scorers["helpful"], scorers["safety"], rule=a.rule, threshold=a.threshold, lam=a.lam)
        scores = combined.score_detailed(prompts, responses, is_safety=flags)
    else:
        ((key, scorer),) = scorers.items()
        scores = {key: scorer.score(prompts, responses)}
    as_lists = {k: v.tolist() for k, v in scores.items()}
    write_jsonl(out, ({**row, **{k: v[i] for k, v in as_lists.items()}} for i, row in enumerate(rows)))
    means = ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in as_lists.items())
    print(f"scored {len(rows)} responses (mean {means}) -> {out}")
    return 0


def cli(name: str, argv: Sequence[str]) -> int:
    try:
        return {"rm-eval": cmd_rm_eval, "score": cmd_score}[name](argv)
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        print(f"align {name}: error: {exc}", file=sys.stderr)
        return 2
