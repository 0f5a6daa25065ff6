"""Evaluations: TruthfulQA, ToxiGen, win rates, task metrics, and the per-round report.

One module per evaluation; each writes a JSON result (schema in ``alignment.evals.results`` and
docs/DEVELOPING.md) that ``align report`` gathers across rounds.

    align eval truthfulqa  --model M [--data mc_task.json | truthful_qa | bundled:truthfulness] --out DIR
    align eval toxigen     --model M --prompts DIR [--classifier minilm | PATH | HUB_ID] --out DIR
    align eval winrate     --model A --baseline B --prompts FILE --judge rm|llm --out DIR
    align eval metrics     --predictions preds.jsonl --out DIR
    align eval train-classifier --data DIR_OR_FILE --out DIR
    align report           --run runs/<project>

Nothing heavy is imported here, so ``align --help`` stays fast.
"""
