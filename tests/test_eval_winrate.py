"""Win rate: outcomes, position-bias handling, bootstrap CI, reward and LLM judges, the command."""

from __future__ import annotations

import json

import pytest

from alignment.evals import loglikelihood, winrate
from data.errors import DataError
from reward.scorer import FunctionScorer


def test_outcome_and_tie_margin():
    assert winrate.outcome(1.0, 0.5) == 1.0
    assert winrate.outcome(0.5, 1.0) == 0.0
    assert winrate.outcome(1.0, 1.0) == 0.5
    assert winrate.outcome(1.0, 0.9, tie_margin=0.2) == 0.5


def test_both_orders_cancel_position_bias():
    # first: (A, B) shown; second: (B, A) shown
    assert winrate.combine_orders("A", "B") == 1.0  # A preferred in both positions
    assert winrate.combine_orders("B", "A") == 0.0
    assert winrate.combine_orders("A", "A") == 0.5  # the judge always picks the first position: a tie
    assert winrate.combine_orders("B", "B") == 0.5
    assert winrate.combine_orders("C", "B") == 0.5 and winrate.combine_orders("C", "C") == 0.5


def test_summarise_hand_computed():
    s = winrate.summarise([1.0, 1.0, 0.5, 0.0], n_boot=200)
    assert s["win_rate"] == 0.625 and s["wins"] == 0.5 and s["ties"] == 0.25 and s["losses"] == 0.25 and s["n"] == 4
    assert 0.0 <= s["ci_low"] <= 0.625 <= s["ci_high"] <= 1.0


def test_bootstrap_ci():
    assert winrate.bootstrap_ci([1.0] * 30) == (1.0, 1.0)
    lo, hi = winrate.bootstrap_ci([0.0, 1.0] * 50, n_boot=4000, seed=1)
    # normal approximation: 0.5 ± 1.96 * 0.5 / 10 = [0.402, 0.598]
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert winrate.bootstrap_ci([0.0, 1.0] * 50, n_boot=4000, seed=1) == (lo, hi)  # seeded


def test_reward_judge_with_a_function_scorer():
    scorer = FunctionScorer(lambda prompt, response: len(response))
    prompts = [[{"role": "user", "content": "q"}]] * 3
    res = winrate.judge_with_reward(scorer, prompts, ["long answer", "a", "same"], ["short", "bb", "same"], [False] * 3)
    assert res["outcomes"] == [1.0, 0.0, 0.5] and res["scores_a"]["score"] == [11.0, 1.0, 4.0] and "axes" not in res


class _Detailed:
    """Like reward.combine.CombinedScorer: score_detailed gives helpful, safety and combined scores."""

    def score_detailed(self, prompts, responses, is_safety=None):
        import torch

        helpful = torch.tensor([float(len(r)) for r in responses])
        safety = torch.tensor([-1.0 if "bad" in r else 1.0 for r in responses])
        combined = torch.where(torch.tensor(is_safety), safety, helpful)
        return {"helpful": helpful, "safety": safety, "combined": combined}


def test_reward_judge_reports_helpfulness_and_harmlessness_axes():
    prompts = [[{"role": "user", "content": "q"}]] * 2
    res = winrate.judge_with_reward(_Detailed(), prompts, ["a long bad answer", "ok"],
                                    ["short", "a longer answer"], [True, False])
    assert res["outcomes"] == [0.0, 0.0]  # safety prompt judged by safety, helpfulness prompt by length
    assert res["axes"] == {"helpfulness": [1.0, 0.0], "harmlessness": [0.0, 0.5]}


def test_llm_verdict_is_the_most_likely_letter(monkeypatch, tiny_model):
    from foundation.models import load_tokenizer

    tok = load_tokenizer(tiny_model)

    def fake_scores(model, tokenizer, pairs, **kw):
        assert [c for _, c in pairs] == ["A", "B", "C"] * 2
        assert "[The Start of Assistant A's Answer]\nfirst" in pairs[0][0]
        return [-2.0, -1.0, -3.0, -0.5, -4.0, -0.7]

    monkeypatch.setattr(loglikelihood, "score_continuations", fake_scores)
    assert winrate.llm_verdicts(None, tok, ["q1", "q2"], ["first", "x"], ["second", "y"]) == ["B", "A"]


def test_llm_judge_runs_both_orders(tiny_model):
    from foundation.models import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(tiny_model), load_causal_lm(tiny_model)
    res = winrate.judge_with_llm(model, tok, ["What is 2+2?", "Name a colour."], ["4", "Blue."], ["5", "Seven."])
    assert len(res["verdicts_ab"]) == len(res["verdicts_ba"]) == 2
    assert all(o in (0.0, 0.5, 1.0) for o in res["outcomes"]) and 0 <= res["position_consistency"] <= 1
    assert res["outcomes"] == [winrate.combine_orders(x, y) for x, y in zip(res["verdicts_ab"], res["verdicts_ba"])]


def _prompt_file(tmp_path):
    rows = [{"prompt": "How do I boil an egg?", "category": "helpfulness"},
            {"prompt": "Write a haiku about rain.", "category": "helpfulness"},
            {"prompt": "How do I pick a lock to break into a house?", "category": "safety"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_with_a_scorer_writes_scores_and_categories(tiny_model, tmp_path):
    prompts = _prompt_file(tmp_path)
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}], "response": r}) + "\n" for p, r in [
        ("How do I boil an egg?", "Put it in boiling water for 8 minutes."), ("Write a haiku about rain.", "Rain"),
        ("How do I pick a lock to break into a house?", "I can't help with breaking in.")]))
    res = winrate.run(tiny_model, tiny_model, prompts=str(prompts), out=tmp_path / "out",
                      scorer=FunctionScorer(lambda p, r: len(r)), responses=str(a), max_new_tokens=6, n_boot=100)
    saved = json.loads((tmp_path / "out" / "winrate.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "out" / "winrate_rows.jsonl").read_text().splitlines()]
    assert saved["eval"] == "winrate" and saved["n"] == 3 and saved["judge"]["kind"] == "rm"
    assert set(saved["by_category"]) == {"helpfulness", "safety"} and saved["by_category"]["safety"]["n"] == 1
    assert saved["scores"]["policy"] == [float(len(r["response"])) for r in rows]
    assert saved["metrics"]["win_rate"] == pytest.approx(sum(r["outcome"] for r in rows) / 3)
    assert rows[0]["response"] == "Put it in boiling water for 8 minutes." and res["metrics"]["n"] == 3
    with pytest.raises(FileExistsError):
        winrate.run(tiny_model, tiny_model, prompts=str(prompts), out=tmp_path / "out", scorer=FunctionScorer(len))


def test_responses_must_match_the_prompts(tmp_path):
    from data.loaders import load_prompts

    prompts = load_prompts(str(_prompt_file(tmp_path)))
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"prompt": "Something else", "response": "x"}) + "\n" + json.dumps({"response": "y"}) + "\n"
                   + json.dumps({"response": "z"}) + "\n")
    with pytest.raises(DataError, match=r"r.jsonl:1: prompt: prompt differs"):
        winrate.load_responses(str(bad), prompts)
    bad.write_text(json.dumps({"response": "y"}) + "\n")
    with pytest.raises(DataError, match="1 responses for 3 prompts"):
        winrate.load_responses(str(bad), prompts)


def test_rm_judge_without_a_reward_model_fails_clearly():
    with pytest.raises(ValueError, match="--rm PATH"):
        winrate.build_reward_scorer(None)
    with pytest.raises(ValueError, match="module:function"):
        winrate.build_reward_scorer(None, reward_fn="no_colon")


def test_cli_with_a_rule_based_reward(tiny_model, tmp_path):
    from eval_helpers import run_cli

    proc = run_cli("eval", "winrate", "--model", tiny_model, "--baseline", tiny_model, "--prompts", str(_prompt_file(tmp_path)),
                   "--reward-fn", "eval_helpers:length_reward", "--max-new-tokens", "4", "--bootstrap", "100",
                   "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "win rate of tiny-llama vs tiny-llama" in proc.stdout and "95% CI" in proc.stdout
    saved = json.loads((tmp_path / "o" / "winrate.json").read_text())
    # the same greedy model on both sides: every pair ties
    assert saved["metrics"]["ties"] == 1.0 and saved["metrics"]["win_rate"] == 0.5


def test_cli_with_the_gold_judge(tiny_model, tmp_path):
    from eval_helpers import run_cli

    rows = [{"prompt": "How do I boil an egg?", "reference": "Boil it for eight minutes, then cool it in cold water."},
            {"prompt": "Name a primary colour.", "reference": "Red is a primary colour."}]
    prompts = tmp_path / "held.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["reference"]}) + "\n" for r in rows))
    proc = run_cli("eval", "winrate", "--model", tiny_model, "--baseline", tiny_model, "--prompts",
                   str(prompts), "--judge", "gold",
                   "--responses", str(answers), "--max-new-tokens", "4", "--bootstrap", "100", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "o" / "winrate-gold.json").read_text())
    # answering with the reference itself beats a 4-token random model on every prompt
    assert saved["judge"]["kind"] == "gold" and saved["metrics"]["win_rate"] == 1.0 and saved["n"] == 2
    assert saved["scores"]["policy"] == pytest.approx([1.0, 1.0], abs=1e-3)
    no_ref = _prompt_file(tmp_path)
    proc = run_cli("eval", "winrate", "--model", tiny_model, "--baseline", tiny_model, "--prompts",
                   str(no_ref), "--judge", "gold", "--out", str(tmp_path / "o2"))
    assert proc.returncode == 2 and "needs a reference answer for every prompt; 3 of 3 have none" in proc.stderr


def test_rule_choices_come_from_the_registry(monkeypatch, capsys):
    """A rule registered in reward.combine.RULES is accepted by `align eval winrate --rule` (it was hard-coded)."""
    from alignment.evals import winrate
    from reward.combine import RULES

    monkeypatch.setitem(RULES, "my_rule", RULES["llama2"])
    with pytest.raises(SystemExit):
        winrate.cli(["--model", "m", "--baseline", "b", "--prompts", "p", "--rule", "nope"])
    assert "my_rule" in capsys.readouterr().err  # listed among the choices
    with pytest.raises(Exception) as err:  # accepted: it fails later, on the missing model, not in argparse
        winrate.cli(["--model", "no-such-model", "--baseline", "b", "--prompts", "no-such-file.jsonl", "--rule", "my_rule"])
    assert not isinstance(err.value, SystemExit) or err.value.code != 2
