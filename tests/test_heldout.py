"""Held-out prompts: the split by hand, and the check that finds a held-out prompt in what a stage read."""

from __future__ import annotations

import json

import pytest
import yaml

from data.heldout import HeldOutLeak, check_disjoint, split_pool, stage_usage, user_turns
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


def test_three_sets_are_disjoint_and_tagged():
    from data.heldout import split_three
    from data.splits import TEST_TAG, VALIDATION_TAG

    test, val, rest = split_three(pool(60), 8, 12, 0.25, seed=1)
    assert len(test) == 8 and len(val) == 12 and len(rest) == 40
    assert all(r.tags == [TEST_TAG] for r in test) and all(r.tags == [VALIDATION_TAG] for r in val)
    turns = [{r.messages[-1]["content"] for r in s} for s in (test, val, rest)]
    assert not (turns[0] & turns[1]) and not (turns[0] & turns[2]) and not (turns[1] & turns[2])
    with pytest.raises(ValueError, match="eval.validation"):
        split_three(pool(20), 8, 20, None, seed=0)


def test_a_decision_cannot_read_the_test_prompts(tmp_path):
    """Loading test prompts inside a decision (promotion, keep-best) is refused, naming both; reporting reads them."""
    from data.heldout import split_three
    from data.loaders import load_prompts, write_jsonl
    from data.splits import TestSetRead, selecting

    test, val, _ = split_three(pool(30), 5, 5, None, seed=0)
    test_file = write_jsonl(tmp_path / "heldout.jsonl", [r.to_dict() for r in test])
    val_file = write_jsonl(tmp_path / "validation.jsonl", [r.to_dict() for r in val])
    assert len(load_prompts(str(test_file))) == 5  # the reported numbers read them
    with selecting("round 2's promotion"):
        assert len(load_prompts(str(val_file))) == 5
        with pytest.raises(TestSetRead, match=r"round 2's promotion read test prompts \(.*heldout.jsonl\)"):
            load_prompts(str(test_file))
    assert len(load_prompts(str(test_file))) == 5  # the block ended


def test_ppo_refuses_test_prompts_as_its_validation_set(tmp_path, tiny_model):
    from foundation.config import load_config
    from data.heldout import split_three
    from alignment.ppo import PPOConfig, main
    from conftest import REPO
    from data.loaders import write_jsonl
    from data.splits import TestSetRead

    test, _, rest = split_three(pool(30), 5, 5, None, seed=0)
    test_file = write_jsonl(tmp_path / "heldout.jsonl", [r.to_dict() for r in test])
    pool_file = write_jsonl(tmp_path / "pool.jsonl", [r.to_dict() for r in rest])
    cfg = load_config(PPOConfig, REPO / "configs/ppo.yaml", [
        "model.name=tiny-llama", "run.wandb=disabled", f"run.root={tmp_path / 'runs'}", "reward.helpful=null",
        "reward.safety=null", "critic.init=policy", "reward.function=alignment.rl.rule_rewards:target_length",
        f"data.sources=[{{path: '{pool_file}'}}]", f"data.val_sources=[{{path: '{test_file}'}}]", "train.max_steps=1"],
        stage="ppo")
    with pytest.raises(TestSetRead, match="keep-best"):
        main(cfg)


def test_a_project_judged_by_the_gold_rm_leaves_out_the_gold_models_prompts(tmp_path, monkeypatch):
    """Every prompt set of a project (test, validation, pool) is disjoint from what the gold reward model
    trained or was measured on; without the gold model the project is refused, naming the key."""
    from foundation.config import ConfigError
    from alignment.rounds.project import Project
    from reward.gold import prompt_key

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    prompts = pool(40)
    with pytest.raises(ConfigError, match="gold_rm judge needs its gold model.*align gold build --name g"):
        Project.without_gold_prompts(prompts, "g")
    seen = [prompts[i].messages for i in (0, 5, 9)]  # the gold trained on two of them, held out one
    card = tmp_path / "cache" / "gold" / "g" / "card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"prompt_keys": {"train": [prompt_key(m) for m in seen[:2]],
                                                "held_out": [prompt_key(seen[2])]}}))
    kept = Project.without_gold_prompts(prompts, "g")
    assert len(kept) == 37 and not {prompt_key(m) for m in seen} & {prompt_key(p.messages) for p in kept}
