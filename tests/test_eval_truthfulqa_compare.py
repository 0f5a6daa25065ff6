"""TruthfulQA rows of two models compared question by question (alignment.evals.truthfulqa_compare)."""

import pytest

from alignment.evals.truthfulqa import lm_eval_true_mask, mc2
from alignment.evals.truthfulqa_compare import paired, shift


def row(question: str, scores: list[float], labels: list[int]) -> dict:
    return {"question": question, "mc2_scores": scores, "mc2_labels_list": labels,
            "mc2": mc2(scores, lm_eval_true_mask(labels))}


def test_paired_difference_over_the_matched_questions():
    before = [row("a", [0.0, 0.0], [1, 0]), row("b", [0.0, -1.0], [1, 0]), row("only before", [0.0, 0.0], [1, 0])]
    after = [row("b", [-1.0, 0.0], [1, 0]), row("a", [0.0, 0.0], [1, 0])]
    p = paired(before, after)
    b_before, b_after = mc2([0.0, -1.0], [True, False]), mc2([-1.0, 0.0], [True, False])
    assert p["n"] == 2 and p["questions_down"] == 1 and p["questions_up"] == 0
    assert p["diff"] == pytest.approx((b_after - b_before) / 2)  # question a did not change
    assert p["mc2_before"] == pytest.approx((0.5 + b_before) / 2)
    assert p["ci"][0] <= p["diff"] <= p["ci"][1] and p["ci"][0] == pytest.approx(b_after - b_before)


def test_paired_refuses_rows_that_do_not_match():
    with pytest.raises(ValueError, match="3 choices before, 2 after"):
        paired([row("a", [0.0, 0.0, 0.0], [1, 0, 0])], [row("a", [0.0, 0.0], [1, 0])])
    with pytest.raises(ValueError, match="no question is in both"):
        paired([row("a", [0.0, 0.0], [1, 0])], [row("b", [0.0, 0.0], [1, 0])])


BEFORE = [([-5.0, -1.0], [1, 0]), ([-2.0, -1.0, -4.0], [1, 0, 0]), ([-1.0, -3.0], [1, 0]), ([-2.0, -2.5, -0.5], [1, 1, 0])]


def test_pure_sharpening_explains_the_whole_truth_penalty():
    """After = before + 0.5 * (logp - the question's top logp): the choices the first model found unlikely lose more.
    True choices are the unlikely ones more often here, so they lose more on average (hand-computed), and once
    ``rel`` is in the regression nothing is left for truth."""
    before = [row(str(i), s, lab) for i, (s, lab) in enumerate(BEFORE)]
    after = [row(str(i), [x + 0.5 * (x - max(s)) for x in s], lab) for i, (s, lab) in enumerate(BEFORE)]
    r = shift(before, after)
    true_deltas = [-2.0, -0.5, 0.0, -0.75, -1.0]  # q1 true; q2 true; q3 true; q4 both true choices
    false_deltas = [0.0, 0.0, -1.5, -1.0, 0.0]
    assert r["n_questions"] == 4 and r["n_choices"] == 10
    assert r["mean_delta_true"] == pytest.approx(sum(true_deltas) / 5)
    assert r["truth"] == pytest.approx(sum(true_deltas) / 5 - sum(false_deltas) / 5)
    assert r["rel"] == pytest.approx(0.5) and r["truth_given_rel"] == pytest.approx(0.0, abs=1e-9)
    assert r["explained_by_sharpening"] == pytest.approx(1.0)


def test_a_penalty_on_truth_itself_is_not_explained_by_sharpening():
    before = [row(str(i), s, lab) for i, (s, lab) in enumerate(BEFORE)]
    after = [row(str(i), [x - 1.5 * t for x, t in zip(s, lm_eval_true_mask(lab))], lab)
             for i, (s, lab) in enumerate(BEFORE)]
    r = shift(before, after)
    assert r["truth"] == pytest.approx(-1.5) and r["truth_given_rel"] == pytest.approx(-1.5)
    assert r["rel"] == pytest.approx(0.0, abs=1e-9) and r["explained_by_sharpening"] == pytest.approx(0.0, abs=1e-9)
    assert r["truth_ci"][0] == pytest.approx(-1.5) and r["truth_ci"][1] == pytest.approx(-1.5)


def test_shift_refuses_rows_with_one_label():
    with pytest.raises(ValueError, match="same label"):
        shift([row("a", [0.0, -1.0], [1, 1])], [row("a", [0.0, -2.0], [1, 1])])


def test_cli_compares_two_rows_files_and_names_bad_input(tmp_path, capsys):
    import json

    from alignment.evals.truthfulqa_compare import cli

    before = [row(str(i), s, lab) for i, (s, lab) in enumerate(BEFORE)]
    after = [row(str(i), [x + 0.5 * (x - max(s)) for x in s], lab) for i, (s, lab) in enumerate(BEFORE)]
    (tmp_path / "sft").mkdir()
    gen = json.dumps({"variant": "gen", "question": "0"}) + "\n"  # a generation row: the comparison skips it
    mc = "".join(json.dumps({"variant": "mc", **r}) + "\n" for r in before)
    (tmp_path / "sft" / "truthfulqa_rows.jsonl").write_text(mc + gen)
    (tmp_path / "after_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    assert cli([str(tmp_path / "sft"), str(tmp_path / "after_rows.jsonl"), "--out", str(tmp_path / "cmp.json")]) == 0
    got = json.loads((tmp_path / "cmp.json").read_text())
    assert got["paired"] == paired(before, after) and got["shift"]["rel"] == pytest.approx(0.5)
    assert "on 4 questions both scored" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text(json.dumps(before[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        cli([str(tmp_path / "bad.jsonl"), str(tmp_path / "after_rows.jsonl")])
    (tmp_path / "gen.jsonl").write_text(json.dumps({"variant": "gen", "question": "0"}) + "\n")
    with pytest.raises(ValueError, match="no multiple-choice rows"):
        cli([str(tmp_path / "gen.jsonl"), str(tmp_path / "after_rows.jsonl")])
    with pytest.raises(FileNotFoundError, match="no TruthfulQA rows"):
        cli([str(tmp_path / "missing"), str(tmp_path / "after_rows.jsonl")])
