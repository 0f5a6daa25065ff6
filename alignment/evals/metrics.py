"""Task metrics: ROUGE, BLEU, perplexity, classification P/R/F1, embedding cosine, tag-set metrics.

    align eval metrics --predictions preds.jsonl [--model M] [--out DIR]

Each row of the predictions file (JSONL, JSON, CSV or Parquet) holds ``prediction`` and any of:

================================  ==========================================================
key                               metrics
================================  ==========================================================
``reference`` or ``references``   ROUGE-1/2/L (F1, max over references), BLEU (sacrebleu,
(a string or a list of strings)   corpus and per row), embedding cosine (all-MiniLM-L6-v2)
``label``                         accuracy, macro precision / recall / F1, per-label P/R/F1
                                  (``prediction`` is the predicted label)
``reference_tags``                tag-set IoU, intersection over ground truth, intersection
(+ ``predicted_tags``, else the   over model tags, normalised Levenshtein between the sets
tags parsed from ``prediction``)
``prompt`` (with ``--model``)     perplexity of ``reference`` given ``prompt`` (chat template,
                                  assistant tokens only); without ``prompt``: of the text alone
================================  ==========================================================

Conventions for the edge cases (hand-computed in tests/test_eval_metrics.py):
- an empty prediction scores 0 on ROUGE, BLEU and cosine (an empty text has no embedding);
- classification uses sklearn's ``zero_division=0``: a label never predicted has precision 0;
- tag sets are normalised (stripped, lower-cased, empty tags dropped) and compared as sets; a
  ratio whose denominator is an empty set is vacuously 1 (both empty: IoU 1; no ground-truth tags:
  intersection over ground truth 1; no model tags: intersection over model tags 1), so each metric
  is 1 exactly when it has nothing to complain about;
- the Levenshtein distance between two tag sets is the edit distance between the tag sequences in
  the order that aligns shared tags, = max(|P∖G|, |G∖P|) (a wrong tag is one substitution),
  divided by max(|P|, |G|): 0 = same set, 1 = nothing in common; 0 when both are empty.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# text overlap


def _rouge_scorer(types: Sequence[str], use_stemmer: bool = False) -> Any:
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score logs "Using default tokenizer." per scorer
    return rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)


def rouge(prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures in [0, 1] (rouge-score, no stemming), max over references."""

    refs = [references] if isinstance(references, str) else list(references)
    scorer = _rouge_scorer(["rouge1", "rouge2", "rougeL"])
    best = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    if not prediction.strip():
        return best
    for ref in refs:
        scores = scorer.score(ref, prediction)
        best = {k: max(v, scores[k].fmeasure) for k, v in best.items()}
    return best


def sentence_bleu(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence BLEU in [0, 100] (sacrebleu defaults: 13a tokens, exp smoothing)."""
    import sacrebleu

    refs = [references] if isinstance(references, str) else list(references)
    if not prediction.strip():
        return 0.0
    return float(sacrebleu.sentence_bleu(prediction, refs).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 100] over rows; ``references[i]`` is the list of references of row i."""
    import sacrebleu

    if not predictions:
        return 0.0
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; rows with fewer references repeat their last
    streams = [[r[min(j, len(r) - 1)] for r in references] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def bleu_t5(reference: str, prediction: str) -> float:
    """BLEU as lm-evaluation-harness's TruthfulQA generation task computes it (T5 style), in [0, 100]."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu([prediction], [[reference]], smooth_method="exp", smooth_value=0.0, force=False,
                                       lowercase=False, tokenize="intl", use_effective_order=False).score)


def rouge_t5(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1/2/Lsum F-measures in [0, 100] as lm-eval's TruthfulQA generation task computes them."""
    def prepare(summary: str) -> str:  # newlines between sentences, for rougeLsum
        return summary.replace(" . ", ".\n")

    scorer = _rouge_scorer(["rouge1", "rouge2", "rougeLsum"])
    scores = scorer.score(prepare(reference), prepare(prediction))
    return {"rouge1": scores["rouge1"].fmeasure * 100, "rouge2": scores["rouge2"].fmeasure * 100,
            "rougeL": scores["rougeLsum"].fmeasure * 100}


# ---------------------------------------------------------------------------------------------
# classification


def _norm_label(x: Any) -> str:
    return str(x).strip().lower()


def classification_metrics(predictions: Sequence[Any], labels: Sequence[Any]) -> dict:
    """Accuracy and macro precision / recall / F1 over the labels seen in either list (as sklearn).

    Labels compare after ``str().strip().lower()``. A label never predicted has precision 0, one
    never true has recall 0 (``zero_division=0``); F1 of P = R = 0 is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no rows to score")
    pred = [_norm_label(p) for p in predictions]
    gold = [_norm_label(y) for y in labels]
    classes = sorted(set(gold) | set(pred))
    per: dict[str, dict] = {}
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[c] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    # macro averages over every label seen in either list (sklearn's default ``labels``)
    return {
        "accuracy": sum(p == g for p, g in zip(pred, gold)) / len(gold),
        "precision": sum(v["precision"] for v in per.values()) / len(per),
        "recall": sum(v["recall"] for v in per.values()) / len(per),
        "f1": sum(v["f1"] for v in per.values()) / len(per),
        "per_label": per,
    }


# ---------------------------------------------------------------------------------------------
# tag sets


def parse_tags(value: Any) -> set[str]:
    """A list of tags or a comma/semicolon/newline-separated string -> normalised set."""
    if value is None:
        return set()
    if isinstance(value, str):
        for sep in (";", "\n"):
            value = value.replace(sep, ",")
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, (list, tuple, set)):
        items = value
    else:
        raise TypeError(f"tags must be a list or a comma-separated string, got {type(value).__name__}")
    return {str(t).strip().lower() for t in items if str(t).strip()}


def tag_iou(predicted: set[str], truth: set[str]) -> float:
    """|P ∩ G| / |P ∪ G|; 1 when both are empty."""
    union = predicted | truth
    return len(predicted & truth) / len(union) if union else 1.0


def tag_intersection_over_truth(predicted: set[str], truth: set[str]) -> float:
    """|P ∩ G| / |G| (recall of the ground-truth tags); 1 when G is empty."""
    return len(predicted & truth) / len(truth) if truth else 1.0


def tag_intersection_over_predicted(predicted: set[str], truth: set[str]) -> float:
    """|P ∩ G| / |P| (precision of the model's tags); 1 when P is empty."""
    return len(predicted & truth) / len(predicted) if predicted else 1.0


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insert, delete, substitute; each costs 1) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def tag_levenshtein(predicted: set[str], truth: set[str]) -> float:
    """Normalised Levenshtein distance between two tag sets, in [0, 1] (0 = same set).

    The sets become sequences with the shared tags first (sorted) and the others after (sorted),
    which is the order that minimises the edit distance; the distance is divided by the longer length.
    """
    if not predicted and not truth:
        return 0.0
    shared = sorted(predicted & truth)
    p = shared + sorted(predicted - truth)
    g = shared + sorted(truth - predicted)
    return levenshtein(p, g) / max(len(p), len(g))


def tag_metrics(predicted: set[str], truth: set[str]) -> dict[str, float]:
    return {
        "tag_iou": tag_iou(predicted, truth),
        "tag_intersection_over_truth": tag_intersection_over_truth(predicted, truth),
        "tag_intersection_over_predicted": tag_intersection_over_predicted(predicted, truth),
        "tag_levenshtein": tag_levenshtein(predicted, truth),
    }


# ---------------------------------------------------------------------------------------------
# perplexity and embedding similarity


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of tokens)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / n_tokens)


def model_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], prompts: Sequence[Any] | None = None,
                     *, batch_size: int = 8) -> dict:
    """Token-level perplexity of ``texts`` under a causal LM (total NLL over total tokens).

    With ``prompts`` (strings or conversations), each text is scored as the assistant's answer
    after the chat-template rendering of its prompt (the answer's own tokens, no end-of-turn
    token); without, as plain text after the EOS token (lm-eval's rolling log-likelihood start).
    Returns {"perplexity", "nll", "tokens", "per_row"}.
    """
    from alignment.evals.loglikelihood import encode, score_tokens

    requests = []
    for i, text in enumerate(texts):
        cont = encode(tokenizer, text)
        if not cont:
            raise ValueError(f"row {i + 1}: the reference encodes to no tokens")
        if prompts is None or prompts[i] is None:
            ctx = [tokenizer.eos_token_id]
        else:
            conv = [{"role": "user", "content": prompts[i]}] if isinstance(prompts[i], str) else list(prompts[i])
            ctx = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            ctx = list(ctx["input_ids"] if hasattr(ctx, "keys") else ctx)
        requests.append((ctx, cont))
    scores = score_tokens(model, requests, batch_size=batch_size, pad_id=tokenizer.pad_token_id)
    counts = [len(c) for _, c in requests]
    nll, n = -sum(scores), sum(counts)
    return {"perplexity": perplexity(nll, n), "nll": nll, "tokens": n,
            "per_row": [perplexity(-s, k) for s, k in zip(scores, counts)]}


def embedding_cosines(predictions: Sequence[str], references: Sequence[str], embedder: Any = None) -> list[float]:
    """Cosine of the all-MiniLM-L6-v2 embeddings of each (prediction, reference); 0 for an empty prediction."""
    from alignment.evals.embeddings import get_embedder

    emb = embedder or get_embedder()
    keep = [i for i, p in enumerate(predictions) if p.strip()]
    out = [0.0] * len(predictions)
    if keep:
        a = emb.embed([predictions[i] for i in keep])
        b = emb.embed([references[i] for i in keep])
        for row, i in enumerate(keep):
            out[i] = float((a[row] @ b[row]).clamp(-1.0, 1.0))
    return out


# ---------------------------------------------------------------------------------------------
# the command


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_rows(rows: Sequence[dict], *, model: Any = None, tokenizer: Any = None, embedder: Any = None,
                  cosine: bool = True, where: str = "predictions") -> tuple[dict, list[dict]]:
    """(aggregate metrics, per-row metrics) for prediction rows (keys: see the module docstring)."""
    from data.errors import DataError

    per_row: list[dict] = [{} for _ in rows]
    for i, row in enumerate(rows):
        if "prediction" not in row or not isinstance(row["prediction"], str):
            raise DataError("needs a 'prediction' string", path=where, line=i + 1, key="prediction")
    metrics: dict[str, Any] = {}
    counts: dict[str, int] = {}

    text_idx = [i for i, r in enumerate(rows) if r.get("reference") is not None or r.get("references") is not None]
    refs: dict[int, list[str]] = {}
    for i in text_idx:
        r = rows[i].get("references", rows[i].get("reference"))
        r = [r] if isinstance(r, str) else r
        if not isinstance(r, list) or not r or not all(isinstance(x, str) for x in r):
            raise DataError("must be a string or a non-empty list of strings", path=where, line=i + 1, key="references")
        refs[i] = r
    if text_idx:
        for i in text_idx:
            per_row[i].update(rouge(rows[i]["prediction"], refs[i]))
            per_row[i]["bleu"] = sentence_bleu(rows[i]["prediction"], refs[i])
        for k in ("rouge1", "rouge2", "rougeL"):
            metrics[k] = _mean([per_row[i][k] for i in text_idx])
        metrics["bleu"] = corpus_bleu([rows[i]["prediction"] for i in text_idx], [refs[i] for i in text_idx])
        metrics["sentence_bleu"] = _mean([per_row[i]["bleu"] for i in text_idx])
        if cosine:
            cos = embedding_cosines([rows[i]["prediction"] for i in text_idx], [refs[i][0] for i in text_idx], embedder)
            for i, c in zip(text_idx, cos):
                per_row[i]["cosine"] = c
            metrics["cosine"] = _mean(cos)
        counts["text"] = len(text_idx)

    cls_idx = [i for i, r in enumerate(rows) if r.get("label") is not None]
    if cls_idx:
        cm = classification_metrics([rows[i]["prediction"] for i in cls_idx], [rows[i]["label"] for i in cls_idx])
        metrics.update({k: cm[k] for k in ("accuracy", "precision", "recall", "f1")})
        metrics["per_label"] = cm["per_label"]
        for i in cls_idx:
            per_row[i]["correct"] = _norm_label(rows[i]["prediction"]) == _norm_label(rows[i]["label"])
        counts["classification"] = len(cls_idx)

    tag_idx = [i for i, r in enumerate(rows) if "reference_tags" in r]
    if tag_idx:
        for i in tag_idx:
            try:
                truth = parse_tags(rows[i]["reference_tags"])
                pred = parse_tags(rows[i].get("predicted_tags", rows[i]["prediction"]))
            except TypeError as exc:
                raise DataError(str(exc), path=where, line=i + 1, key="reference_tags") from None
            per_row[i].update(tag_metrics(pred, truth))
        for k in ("tag_iou", "tag_intersection_over_truth", "tag_intersection_over_predicted", "tag_levenshtein"):
            metrics[k] = _mean([per_row[i][k] for i in tag_idx])
        counts["tags"] = len(tag_idx)

    if model is not None:
        ppl_idx = [i for i in text_idx]
        if ppl_idx:
            res = model_perplexity(model, tokenizer, [refs[i][0] for i in ppl_idx], [rows[i].get("prompt") for i in ppl_idx])
            metrics["perplexity"] = res["perplexity"]
            metrics["perplexity_tokens"] = res["tokens"]
            for i, p in zip(ppl_idx, res["per_row"]):
                per_row[i]["perplexity"] = p
            counts["perplexity"] = len(ppl_idx)
    if not counts:
        raise DataError("no row has 'reference'/'references', 'label' or 'reference_tags': nothing to score", path=where)
    metrics["counts"] = counts
    return metrics, per_row


def run(predictions: str, *, out: str | Path, model: str | None = None, cosine: bool = True, name: str = "metrics",
        overwrite: bool = False) -> dict:
    """Score a predictions file and write ``<out>/<name>.json`` and ``<out>/<name>_rows.jsonl``."""
    from alignment.evals.results import check_free, header, write_json
    from data.loaders import read_rows, write_jsonl

    out = Path(out)
    json_path, rows_path = out / f"{name}.json", out / f"{name}_rows.jsonl"
    if not overwrite:
        check_free(json_path, rows_path)
    rows = [row for _, row in read_rows(predictions)]
    if not rows:
        from data.errors import DataError

        raise DataError("no rows", path=predictions)
    t0 = time.time()
    lm = tok = None
    if model:
        from foundation.models import load_causal_lm, load_tokenizer

        lm, tok = load_causal_lm(model), load_tokenizer(model)
    metrics, per_row = evaluate_rows(rows, model=lm, tokenizer=tok, cosine=cosine, where=predictions)
    result = header("metrics", model, predictions=str(predictions), n=len(rows), metrics=metrics,
                    timing={"seconds": round(time.time() - t0, 2)},
                    conventions="ROUGE F1 in [0,1] (max over references); BLEU in [0,100] (sacrebleu); cosine of "
                                "all-MiniLM-L6-v2 embeddings (0 for empty predictions); tag metrics on normalised sets")
    write_json(json_path, result, overwrite=overwrite)
    write_jsonl(rows_path, [{**{k: rows[i].get(k) for k in ("id",) if k in rows[i]}, "row": i + 1, **per_row[i]}
                            for i in range(len(rows))], overwrite=overwrite)
    return result


def cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align eval metrics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predictions", required=True, help="JSONL/JSON/CSV/Parquet file of rows with 'prediction' (see above)")
    p.add_argument("--model", help="also compute perplexity of the references under this model")
    p.add_argument("--out", default=None, help="output folder (default: the predictions file's folder)")
    p.add_argument("--name", default="metrics", help="file stem of the outputs (default: metrics)")
    p.add_argument("--no-cosine", action="store_true", help="skip the embedding cosine (no MiniLM load)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    a = p.parse_args(argv)
    from foundation.runs import setup_logging

    setup_logging()
    out = Path(a.out) if a.out else Path(a.predictions).resolve().parent
    result = run(a.predictions, out=out, model=a.model, cosine=not a.no_cosine, name=a.name, overwrite=a.overwrite)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result["metrics"].items() if k != "per_label"}
    print(json.dumps(shown, indent=2))
    print(out / f"{a.name}.json")
    return 0
