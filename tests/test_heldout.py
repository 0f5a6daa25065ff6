"""Held-out prompts: the split by hand, and the check that finds a held-out prompt in what a stage read."""

from __future__ import annotations

import json

import pytest
import yaml

from alignment.heldout import HeldOutLeak, check_disjoint, split_pool, stage_usage, user_turns
from data.schemas import PromptRecord


def pool(n: int = 40) -> list[PromptRecord]:
    return [PromptRecord([{"role": "user", "content": f"Question {i}?"}], category="safety" if i % 4 == 0 else "helpfulness")
            for i in range(n)]


def test_split_pool_draws_the_safety_share_and_keeps_the_rest_apart():
    p = pool()
    # a second copy of question 0 (same text, other spacing and case): it leaves the pool with the first when held out
    p.append(PromptRecord([{"role": "system", "content": "be nice"}, {"role": "user", "content": "  question 0? "}]))
    held, rest = split_pool(p, 8, 0.5, seed=3)
    assert len(held) == 8 and sum(h.category == "safety" for h in held) == 4
    held_text = {h.messages[-1]["content"].strip().lower() for h in held}
    assert not any(user_turns(r.messages) & held_text for r in rest)
    assert len(rest) == len(p) - 8 - (1 if "question 0?" in held_text else 0)
    assert [h.messages for h in split_pool(p, 8, 0.5, seed=3)[0]] == [h.messages for h in held]  # seeded
    with pytest.raises(ValueError, match="asked for 100 held-out prompts but the prompt pool has only 40"):
        split_pool(pool(), 100, 0.3, seed=0)
    assert split_pool(p, 0, 0.3, seed=0) == ([], p)


def test_check_disjoint_names_the_source_of_a_leak():
    held = pool(3)
    ok = {"round-1/sft: bundled:sft": [{"hello"}, {"question 7?"}], "round-2/pairs.jsonl": [{"other"}]}
    assert check_disjoint(held, ok) == {"round-1/sft: bundled:sft": 2, "round-2/pairs.jsonl": 1}
    bad = {**ok, "round-1/rm_helpful: x.jsonl": [{"first turn", "question 2?"}]}  # any user turn of a training conversation
    with pytest.raises(HeldOutLeak, match=r"1 held-out prompts appear .*round-1/rm_helpful: x.jsonl: 'Question 2\?'"):
        check_disjoint(held, bad)


def test_stage_usage_reads_each_stage_config_and_the_sampled_pairs(tmp_path):
    r1 = tmp_path / "round-1"
    for stage, section, rows in (("sft", "data", [{"messages": [{"role": "user", "content": "Question 5?"},
                                                                {"role": "assistant", "content": "a"}]}]),
                                 ("policy", "prompts", [{"prompt": "Question 9?"}])):
        (r1 / stage).mkdir(parents=True)
        f = tmp_path / f"{stage}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (r1 / stage / "config.yaml").write_text(yaml.safe_dump({"stage": stage, section: {"sources": [{"path": str(f)}]}}))
    (r1 / "pairs.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Question 11?"}], "response_a": "a",
                                                "response_b": "b"}) + "\n")
    used = stage_usage([r1], ("sft", "rm_helpful", "policy"))
    assert (sorted(used)
            == ["round-1/pairs.jsonl", f"round-1/policy: {tmp_path / 'policy.jsonl'}", f"round-1/sft: {tmp_path / 'sft.jsonl'}"])
    assert check_disjoint(pool(5), used)  # questions 0-4 are not used
    with pytest.raises(HeldOutLeak, match="round-1/pairs.jsonl"):
        check_disjoint(pool(12)[11:], used)
