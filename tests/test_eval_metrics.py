"""Task metrics against hand-computed values, edge cases included, and the `align eval metrics` command."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from alignment.evals import metrics as M
from data.errors import DataError


def test_rouge_hand_computed():
    # prediction "the cat sat" vs reference "the cat sat on the mat" (6 tokens)
    # ROUGE-1: 3 matches, P = 3/3, R = 3/6 -> F = 2 * 1 * 0.5 / 1.5 = 0.666667
    # ROUGE-2: bigrams "the cat", "cat sat" both in the 5 reference bigrams: P = 1, R = 2/5 -> F = 0.571429
    # ROUGE-L: LCS 3 -> same as ROUGE-1
    r = M.rouge("the cat sat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(2 / 3)
    assert r["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert r["rougeL"] == pytest.approx(2 / 3)
    # max over references
    assert M.rouge("the cat sat", ["dogs bark", "the cat sat"])["rouge1"] == pytest.approx(1.0)


def test_rouge_and_bleu_of_an_empty_prediction_are_zero():
    assert M.rouge("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.rouge("   ", ["a"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert M.sentence_bleu("", "the cat sat") == 0.0


def test_bleu_hand_computed():
    # "a b c d e" vs "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; brevity penalty 1
    # BLEU = (0.8 * 0.75 * 0.6667 * 0.5) ** (1/4) = 0.2 ** 0.25 = 0.668740
    assert M.sentence_bleu("a b c d e", "a b c d f") == pytest.approx(100 * 0.2 ** 0.25, abs=1e-3)
    assert M.sentence_bleu("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(100.0)
    # corpus: matches are pooled over rows: 1-grams 10/11, 2-grams 8/9, 3-grams 6/7, 4-grams 4/5; lengths equal
    assert M.corpus_bleu(["a b c d e", "the cat sat on the mat"], [["a b c d f"], ["the cat sat on the mat"]]) == pytest.approx(
        100 * math.exp((math.log(10 / 11) + math.log(8 / 9) + math.log(6 / 7) + math.log(4 / 5)) / 4), abs=1e-3)


def test_classification_hand_computed():
    # predictions a a b b c, labels a b b b a
    # a: tp 1, fp 1, fn 1 -> P 0.5, R 0.5, F1 0.5; b: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8; c: tp 0, fp 1 -> 0, 0, 0
    # macro over {a, b, c} (sklearn's labels): P 0.5, R (0.5 + 2/3 + 0) / 3 = 0.388889, F1 1.3 / 3 = 0.433333
    m = M.classification_metrics(["a", "A ", "b", "b", "c"], ["a", "b", "b", "b", "a"])
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_label"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_label"]["b"]["f1"] == pytest.approx(0.8)
    assert m["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx((0.5 + 2 / 3) / 3)
    assert m["f1"] == pytest.approx(1.3 / 3)


def test_classification_empty_prediction_is_a_wrong_label():
    m = M.classification_metrics(["", "yes"], ["no", "yes"])
    assert m["accuracy"] == 0.5 and m["per_label"][""]["precision"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        M.classification_metrics(["a", "b"], ["a"])


def test_tag_metrics_hand_computed():
    # P = {a, b, c}, G = {b, c, d, e}: shared {b, c}
    # IoU 2/5, over truth 2/4, over model tags 2/3; Levenshtein: P\G = {a}, G\P = {d, e} -> 2 edits / max(3, 4) = 0.5
    p, g = M.parse_tags("A, b; c"), M.parse_tags(["b", "C", "d", "e", " "])
    assert p == {"a", "b", "c"} and g == {"b", "c", "d", "e"}
    assert M.tag_metrics(p, g) == pytest.approx({"tag_iou": 0.4, "tag_intersection_over_truth": 0.5,
                                                 "tag_intersection_over_predicted": 2 / 3, "tag_levenshtein": 0.5})


def test_tag_metrics_empty_sets():
    both = M.tag_metrics(set(), set())
    assert (both == {"tag_iou": 1.0, "tag_intersection_over_truth": 1.0,
                     "tag_intersection_over_predicted": 1.0, "tag_levenshtein": 0.0})
    no_prediction = M.tag_metrics(set(), {"a", "b"})
    assert no_prediction == {"tag_iou": 0.0, "tag_intersection_over_truth": 0.0, "tag_intersection_over_predicted": 1.0,
                             "tag_levenshtein": 1.0}
    no_truth = M.tag_metrics({"a"}, set())
    assert no_truth == {"tag_iou": 0.0, "tag_intersection_over_truth": 1.0, "tag_intersection_over_predicted": 0.0,
                        "tag_levenshtein": 1.0}
    assert M.parse_tags("") == set() and M.parse_tags(None) == set()


def test_levenshtein_hand_computed_and_tag_order_is_the_best_one():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein([], ["x", "y"]) == 2
    # the tag-set distance equals the best edit distance over all orderings of both sets
    for p, g in [({"a", "b"}, {"b", "c"}), ({"a", "b", "c"}, {"c", "d"}), ({"x"}, {"a", "b", "x", "y"})]:
        best = min(M.levenshtein(pp, gg) for pp in itertools.permutations(sorted(p)) for gg in itertools.permutations(sorted(g)))
        assert M.tag_levenshtein(p, g) == pytest.approx(best / max(len(p), len(g)))
        assert best == max(len(p - g), len(g - p))


def test_perplexity_hand_computed():
    assert M.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)


def test_model_perplexity_matches_logits(tiny_model):
    import torch

    from foundation.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model)
    text = "Paris is the capital of France."
    res = M.model_perplexity(model, tok, [text])
    ids = [tok.eos_token_id] + tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    nll = -logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item()
    assert res["tokens"] == len(ids) - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    # with a prompt only the answer's tokens count
    res2 = M.model_perplexity(model, tok, [text], prompts=["Capital of France?"])
    assert res2["tokens"] == len(tok.encode(text, add_special_tokens=False))


def test_embedding_cosine_behaviour():
    cos = M.embedding_cosines(["A cat sits on the mat.", "A cat sits on the mat.", "", "Stock markets fell sharply today."],
                              ["A cat sits on the mat.", "A kitten is sitting on a rug.", "anything",
                               "A kitten is sitting on a rug."])
    assert cos[0] == pytest.approx(1.0, abs=1e-5)
    assert cos[2] == 0.0  # empty prediction
    assert cos[1] > 0.5 > cos[3]


def test_command_writes_hand_checkable_metrics(tmp_path):
    rows = [{"id": "r1", "prediction": "the cat sat", "reference": "the cat sat on the mat"},
            {"id": "r2", "prediction": "", "references": ["a", "b"]},
            {"prediction": "yes", "label": "yes"}, {"prediction": "no", "label": "yes"},
            {"prediction": "a, b, c", "reference_tags": ["b", "c", "d", "e"]},
            {"prediction": "ignored", "predicted_tags": [], "reference_tags": []}]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = M.run(str(preds), out=tmp_path / "out", cosine=False)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert m["rouge1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["accuracy"] == 0.5
    assert m["tag_iou"] == pytest.approx((0.4 + 1.0) / 2) and m["tag_levenshtein"] == pytest.approx(0.25)
    assert m["counts"] == {"text": 2, "classification": 2, "tags": 2} and res["n"] == 6
    per_row = [json.loads(x) for x in (tmp_path / "out" / "metrics_rows.jsonl").read_text().splitlines()]
    assert per_row[0]["id"] == "r1" and per_row[1]["bleu"] == 0.0 and per_row[3]["correct"] is False
    with pytest.raises(FileExistsError):
        M.run(str(preds), out=tmp_path / "out", cosine=False)


def test_command_rejects_bad_rows(tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"prediction": "x", "reference": "y"}) + "\n" + json.dumps({"reference": "y"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: prediction: needs a 'prediction' string"):
        M.run(str(preds), out=tmp_path / "o", cosine=False)
    preds.write_text(json.dumps({"prediction": "x", "reference_tags": 5}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl:1: reference_tags"):
        M.run(str(preds), out=tmp_path / "o", cosine=False)
    preds.write_text(json.dumps({"prediction": "x"}) + "\n")
    with pytest.raises(DataError, match="nothing to score"):
        M.run(str(preds), out=tmp_path / "o", cosine=False)
    assert not (tmp_path / "o" / "metrics.json").exists()
