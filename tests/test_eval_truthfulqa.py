"""TruthfulQA MC1/MC2 (lm-eval scoring), the log-likelihood engine, data loading, the command."""

from __future__ import annotations

import json
import math

import pytest

from alignment.evals import loglikelihood, truthfulqa, truthfulqa_data
from alignment.evals.truthfulqa import QA_PRIMER, lm_eval_true_mask, mc1, mc2, mc_context
from data.errors import DataError
from data.schemas import TruthfulnessItem

# ---------------------------------------------------------------------------------------------
# the formulas, by hand


def test_mc1_mc2_two_questions_hand_computed(monkeypatch):
    """Two questions with log-probabilities chosen by hand; MC1/MC2 worked out on paper.

    Q1 mc1 scores: gold -1.0, others -2.0, -0.5  -> the gold is not the best: MC1 = 0
       mc2 scores: true -1.0, -2.0; false -3.0, -0.5
       MC2 = (e^-1 + e^-2) / (e^-1 + e^-2 + e^-3 + e^-0.5)
           = (0.3678794 + 0.1353353) / (0.3678794 + 0.1353353 + 0.0497871 + 0.6065307) = 0.5032147 / 1.1595325 = 0.4339807
    Q2 mc1 scores: gold -0.2, other -1.0 -> MC1 = 1
       mc2 scores: true -0.2; false -1.0, -1.5
       MC2 = 0.8187308 / (0.8187308 + 0.3678794 + 0.2231302) = 0.8187308 / 1.4097404 = 0.5807671
    Means: MC1 = 0.5, MC2 = (0.4339807 + 0.5807671) / 2 = 0.5073739
    """
    q1 = TruthfulnessItem.from_dict({"question": "Q one?", "mc1_targets": {"g1": 1, "x1": 0, "y1": 0},
                                     "mc2_targets": {"t1": 1, "t2": 1, "f1": 0, "f2": 0}})
    q2 = TruthfulnessItem.from_dict({"question": "Q two?", "mc1_targets": {"g2": 1, "x2": 0},
                                     "mc2_targets": {"u1": 1, "h1": 0, "h2": 0}})
    logp = {("Q one?", "g1"): -1.0, ("Q one?", "x1"): -2.0, ("Q one?", "y1"): -0.5,
            ("Q one?", "t1"): -1.0, ("Q one?", "t2"): -2.0, ("Q one?", "f1"): -3.0, ("Q one?", "f2"): -0.5,
            ("Q two?", "g2"): -0.2, ("Q two?", "x2"): -1.0,
            ("Q two?", "u1"): -0.2, ("Q two?", "h1"): -1.0, ("Q two?", "h2"): -1.5}
    seen = []

    def fake_scores(model, tok, pairs, **kw):
        seen.extend(pairs)
        out = []
        for ctx, cont in pairs:
            question = ctx[len(QA_PRIMER) + len("\n\nQ: "):-len("\nA:")]
            assert ctx == mc_context(question) and cont.startswith(" ")
            out.append(logp[(question, cont[1:])])
        return out

    monkeypatch.setattr(loglikelihood, "score_continuations", fake_scores)
    res = truthfulqa.evaluate_mc(None, None, [q1, q2])
    assert [r["mc1"] for r in res["rows"]] == [0.0, 1.0]
    assert res["rows"][0]["mc2"] == pytest.approx(0.4339807, abs=1e-6)
    assert res["rows"][1]["mc2"] == pytest.approx(0.5807671, abs=1e-6)
    assert res["metrics"]["mc1"] == 0.5
    assert res["metrics"]["mc2"] == pytest.approx(0.5073739, abs=1e-6)
    assert res["requests"] == 12 and len(seen) == 12


def test_context_is_the_lm_eval_prompt():
    assert QA_PRIMER.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert QA_PRIMER.endswith("Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")
    assert QA_PRIMER.count("\n\n") == 5 and QA_PRIMER.count("Q: ") == 6
    assert mc_context("Why?") == QA_PRIMER + "\n\nQ: Why?\nA:"


def test_mc1_ties_go_to_the_gold_choice_like_argmax():
    assert mc1([-1.0, -1.0, -3.0]) == 1.0
    assert mc1([-1.0, -0.999]) == 0.0


def test_mc2_is_stable_for_very_negative_scores():
    # e^-800 underflows in float64; subtracting the max keeps the ratio: 1 / (1 + e^-1)
    assert mc2([-800.0, -801.0], [True, False]) == pytest.approx(1 / (1 + math.exp(-1)))


def test_lm_eval_reads_true_answers_as_those_before_the_first_false():
    assert lm_eval_true_mask([1, 1, 0, 1, 0]) == [True, True, False, False, False]
    assert lm_eval_true_mask([1, 1]) == [True, True]


def test_stderr_matches_sample_formula():
    # values 0, 1, 1, 0: mean 0.5, sample variance 1/3, stderr sqrt(1/3 / 4) = 0.288675
    assert truthfulqa.stderr([0, 1, 1, 0]) == pytest.approx(0.288675, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the log-likelihood engine


def test_encode_pair_moves_trailing_space_and_splits_whole(tiny_model):
    from foundation.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ctx, cont = loglikelihood.encode_pair(tok, "Q: What?\nA: ", "Paris.")
    ctx2, cont2 = loglikelihood.encode_pair(tok, "Q: What?\nA:", " Paris.")
    assert (ctx, cont) == (ctx2, cont2)
    whole = tok.encode("Q: What?\nA: Paris.", add_special_tokens=False)
    assert ctx + cont == whole and ctx == tok.encode("Q: What?\nA:", add_special_tokens=False)
    # empty context: EOS stands in (lm-eval's prefix token)
    ctx3, _ = loglikelihood.encode_pair(tok, "", "Paris")
    assert ctx3 == [tok.eos_token_id]


class _UniformLM:
    """A 'model' whose logits are all zero: every token has log-probability -log(V)."""

    def __init__(self, vocab: int):
        import torch

        self.vocab = vocab
        self.config = type("C", (), {"max_position_embeddings": 4096})()
        self.training = False
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        return self

    def __call__(self, input_ids, **kw):
        import torch

        return type("O", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_score_is_sum_of_token_logprobs_hand_computed(tiny_model):
    from foundation.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    model = _UniformLM(512)
    pairs = [("Q: a\nA:", " yes"), ("Q: b\nA:", " a much longer answer here")]
    scores = loglikelihood.score_continuations(model, tok, pairs, batch_size=2)
    for (c, x), s in zip(pairs, scores):
        n = len(loglikelihood.encode_pair(tok, c, x)[1])
        assert s == pytest.approx(-n * math.log(512), rel=1e-6)


def test_cached_batched_and_one_by_one_agree(tiny_model):
    from foundation.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model)
    pairs = []
    for q, choices in [("What is the capital of France?", ["Paris.", "Lyon, the capital.", "It has none."]),
                       ("Is 2 + 2 = 5?", ["No.", "Yes, always."])]:
        pairs += [(mc_context(q), " " + c) for c in choices]
    pairs.append(pairs[0])  # a duplicate is scored once and returned twice
    ref = loglikelihood.score_one_by_one(model, tok, pairs)
    batched = loglikelihood.score_continuations(model, tok, pairs, batch_size=3)
    cached = loglikelihood.score_continuations(model, tok, pairs, batch_size=2, shared_prefix=QA_PRIMER)
    assert batched == pytest.approx(ref, abs=1e-3)
    assert cached == pytest.approx(ref, abs=1e-3)
    assert cached[0] == cached[-1]


def test_prefix_that_does_not_tokenise_as_a_prefix_falls_back(tiny_model):
    from foundation.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model)
    pairs = [("The quick brown fox", " jumps"), ("Another context", " entirely")]
    ref = loglikelihood.score_one_by_one(model, tok, pairs)
    # "The quick bro" is a string prefix of the first context only, and not a token prefix of it
    got = loglikelihood.score_continuations(model, tok, pairs, shared_prefix="The quick bro")
    assert got == pytest.approx(ref, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# data


def test_bundled_items_load_with_categories():
    items = truthfulqa_data.load_items("bundled:truthfulness")
    assert len(items) == 50 and all(it.category for it in items)


def test_hub_layout_and_categories_joined_from_csv_beside_the_file(tmp_path):
    rows = [{"question": "Does it rain up?", "mc1_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]},
             "mc2_targets": {"choices": ["No.", "Never.", "Yes."], "labels": [1, 1, 0]}}]
    (tmp_path / "mc_task.json").write_text(json.dumps(rows))
    (tmp_path / "TruthfulQA.csv").write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                                             "Adversarial,Weather,Does it rain up? ,No,No; Never,Yes,x\n", encoding="utf-8")
    items = truthfulqa_data.load_items(str(tmp_path / "mc_task.json"))
    assert items[0].mc2_targets == {"No.": 1, "Never.": 1, "Yes.": 0}
    assert items[0].category == "Weather"  # the CSV's trailing space does not matter
    gen = truthfulqa_data.load_gen_items(str(tmp_path / "mc_task.json"))  # finds the CSV beside it
    assert gen[0].correct == ["No.", "Never.", "I have no comment."] and gen[0].incorrect == ["Yes."]


def test_bad_item_names_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"question": "q", "mc1_targets": {"a": 0, "b": 1}, "mc2_targets": {"a": 1, "b": 0}}) + "\n")
    with pytest.raises(DataError, match=r"items.jsonl:1: mc1_targets: .*listed first"):
        truthfulqa_data.load_items(str(path))


def test_hub_unreachable_fails_clearly():
    with pytest.raises(DataError, match="truthful_qa"):
        truthfulqa_data.load_items("truthful_qa")


def test_real_files_817_questions(shared_data):
    items = truthfulqa_data.load_items(str(shared_data / "truthfulqa" / "mc_task.json"))
    assert len(items) == 817 and all(it.category for it in items)
    differ = [it for it in items
              if lm_eval_true_mask(list(it.mc2_targets.values())) != [bool(v) for v in it.mc2_targets.values()]]
    assert len(differ) == 2  # lm-eval counts a late true answer of these two as false
    gen = truthfulqa_data.load_gen_items(str(shared_data / "truthfulqa" / "TruthfulQA.csv"))
    assert len(gen) == 817 and all(g.correct[-1] == "I have no comment." or "I have no comment." in g.correct for g in gen)


# ---------------------------------------------------------------------------------------------
# the command


def test_run_writes_result_and_refuses_to_overwrite(tiny_model, tmp_path):
    res = truthfulqa.run(tiny_model, data="bundled:truthfulness", out=tmp_path, variant="both", limit=3,
                         batch_size=4, max_new_tokens=8)
    saved = json.loads((tmp_path / "truthfulqa.json").read_text())
    assert saved["eval"] == "truthfulqa" and saved["schema_version"] == 1 and saved["n"] == 3
    assert 0 <= saved["metrics"]["mc1"] <= 1 and 0 <= saved["metrics"]["mc2"] <= 1
    assert set(saved["generation"]["metrics"]) >= {"bleu_max", "bleu_diff", "bleu_acc", "rouge1_acc", "rougeL_diff"}
    assert saved["by_category"] and saved["settings"]["kv_cache"] is True and res["timing"]["seconds"] >= 0
    rows = [json.loads(x) for x in (tmp_path / "truthfulqa_rows.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["mc"] * 3 + ["gen"] * 3
    assert sum(r["mc1"] for r in rows[:3]) / 3 == pytest.approx(saved["metrics"]["mc1"])
    with pytest.raises(FileExistsError, match="truthfulqa.json"):
        truthfulqa.run(tiny_model, data="bundled:truthfulness", out=tmp_path, limit=3)


def test_cli_reports_mc1_mc2(tiny_model, tmp_path):
    from eval_helpers import run_cli

    proc = run_cli("eval", "truthfulqa", "--model", tiny_model, "--data", "bundled:truthfulness", "--limit",
                   "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "MC1" in proc.stdout and "MC2" in proc.stdout
    proc = run_cli("eval", "truthfulqa", "--model", tiny_model, "--data", str(tmp_path / "missing.json"),
                   "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "missing.json: file not found" in proc.stderr
    from foundation.precision import cpu_native_bf16

    proc = run_cli("eval", "truthfulqa", "--model", tiny_model, "--data", "bundled:truthfulness", "--limit", "2",
                   "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16")
    if cpu_native_bf16():  # the model ran in bf16 and the result says so
        assert proc.returncode == 0, proc.stderr
        saved = json.loads((tmp_path / "bf16" / "truthfulqa.json").read_text())
        assert saved["settings"]["dtype"] == "torch.bfloat16"
    auto = json.loads((tmp_path / "truthfulqa.json").read_text())["settings"]["dtype"]  # the first run: --dtype auto
    assert auto == ("torch.bfloat16" if cpu_native_bf16() else "torch.float32")
    if not cpu_native_bf16():  # refused, not emulated many times slower
        assert proc.returncode != 0 and "needs a CPU with native bf16" in proc.stderr
        assert not (tmp_path / "bf16" / "truthfulqa.json").exists()


@pytest.mark.slow
def test_smollm2_cached_scores_match_one_by_one(shared_data):
    from foundation.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer("smollm2-135m"), load_causal_lm("smollm2-135m")
    items = truthfulqa_data.load_items(str(shared_data / "truthfulqa" / "mc_task.json"), limit=2)
    pairs = [(mc_context(it.question), " " + c) for it in items for c in it.mc2_targets]
    ref = loglikelihood.score_one_by_one(model, tok, pairs)
    fast = loglikelihood.score_continuations(model, tok, pairs, batch_size=8, shared_prefix=QA_PRIMER)
    assert fast == pytest.approx(ref, abs=1e-3)
