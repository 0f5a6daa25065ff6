"""``align eval <evaluation>`` and ``align report``: dispatch to one module per evaluation."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from alignment.evals.suite import BENCHMARKS

# subcommand -> (module exposing cli(argv), one line): the rounds' benchmarks, then the other evaluations
EVALS: dict[str, tuple[str, str]] = {
    **{b.name: (b.module, b.help) for b in BENCHMARKS},
    "truthfulqa-compare": ("alignment.evals.truthfulqa_compare",
                           "two models' TruthfulQA rows question by question: paired MC2 difference with CI, and why"),
    "winrate": ("alignment.evals.winrate", "policy A vs baseline B judged by reward models or an LLM judge, bootstrap CI"),
    "metrics": ("alignment.evals.metrics",
                "ROUGE, BLEU, perplexity, P/R/F1, embedding cosine, tag-set metrics of a predictions file"),
    "train-classifier": ("alignment.evals.toxicity", "train the offline toxicity classifier (MiniLM embeddings + logistic head)"),
}


def usage() -> str:
    width = max(len(n) for n in EVALS)
    lines = ["usage: align eval <evaluation> [options]", "", "evaluations (align eval <evaluation> --help):"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in EVALS.items()]
    lines += ["",
              "Each writes <out>/<name>.json (schema: docs/DEVELOPING.md); `align report --run runs/<project>` gathers rounds."]
    return "\n".join(lines)


def cli(name: str, argv: Sequence[str]) -> int:
    if name == "report":
        from alignment.evals import report

        return report.cli(argv)
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in EVALS:
        import difflib

        close = difflib.get_close_matches(sub, list(EVALS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"align eval: unknown evaluation '{sub}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(EVALS[sub][0])
    return int(module.cli(rest) or 0)
