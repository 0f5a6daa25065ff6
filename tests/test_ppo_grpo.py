"""`align grpo`: TRL's GRPO / RLOO with our reward as the reward function, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO

from foundation.config import ConfigError, load_config
from alignment.grpo import GroupRLConfig, main, reward_function
from foundation.runs import read_metrics
from reward.scorer import FunctionScorer

TINY = [
    "model.name=tiny-llama", "run.wandb=disabled", "run.log_level=warning", "reward.helpful=null", "reward.safety=null",
    "reward.function=alignment.rl.rule_rewards:char_fraction", "reward.function_kwargs={chars: aeiou}",
    "reward.missing_eos_penalty=0", "grpo.max_new_tokens=16", "train.eval_steps=100", "train.save_steps=100",
]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(tmp_path: Path, *overrides: str) -> GroupRLConfig:
    return load_config(GroupRLConfig, REPO / "configs/grpo.yaml",
                       [*TINY, f"run.root={tmp_path / 'runs'}", *overrides], stage="grpo")


def test_grpo_raises_a_known_reward(tmp_path, tiny_model):
    out = main(make_cfg(tmp_path, "adapter.method=full", "train.max_steps=30", "train.batch_size=16", "train.lr=3e-3"))
    reward = [m["rewards/combined/mean"] for m in read_metrics(out) if "rewards/combined/mean" in m]
    assert len(reward) == 30
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.05, reward  # 0.23 -> ~0.33 in these runs
    assert (out / "model" / "model.safetensors").is_file()


def test_rloo_with_lora_writes_a_loadable_adapter(tmp_path, tiny_model):
    from foundation.models import load_causal_lm

    out = main(make_cfg(tmp_path, "grpo.algorithm=rloo", "train.max_steps=2"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "rloo" and summary["global_step"] == 2
    from foundation.models import builtin_path

    assert (json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
            == str(builtin_path("tiny-llama")))
    from peft import PeftModel

    loaded = load_causal_lm(str(out), device="cpu")  # tiny-llama + this adapter, merged
    by_hand = PeftModel.from_pretrained(load_causal_lm("tiny-llama", device="cpu"), str(out / "model"))
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, by_hand(ids).logits, atol=1e-5)
    assert any("reward" in k for m in read_metrics(out) for k in m)
    # the answers came from our engine, not TRL's model.generate path (it logs its own timings)
    assert any(m.get("perf/gen_tokens_per_s", 0) > 0 and "time/generate" in m for m in read_metrics(out))


def test_reward_function_combines_and_penalises_missing_eos():
    """Our scorer behind TRL's reward-function interface: conversational completions, the safety flag
    reaches the scorer, responses that never emitted EOS lose the penalty."""
    seen = []

    class Detailed:
        def score_detailed(self, prompts, responses, is_safety=None):
            seen.append(list(is_safety))
            helpful = torch.tensor([float(len(r)) for r in responses])
            return {"helpful": helpful, "safety": -helpful, "combined": helpful * 10}

    logged = {}
    fn = reward_function(Detailed(), missing_eos_penalty=0.5, eos_ids={7})
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    completions = [[{"role": "assistant", "content": "xy"}], [{"role": "assistant", "content": "xyz"}]]
    out = fn(prompts, completions, completion_ids=[[3, 7], [3, 4, 5]], is_safety=[True, False], log_metric=logged.__setitem__)
    assert out == [20.0, 29.5]  # the second never emitted EOS (id 7)
    assert seen == [[True, False]]
    assert logged == {"reward/helpful": 2.5, "reward/safety": -2.5, "response/eos_fraction": 0.5}
    plain = reward_function(FunctionScorer(lambda p, r: 1.0), 0.0, {7})
    assert plain(prompts, completions, completion_ids=[[7], [7]], is_safety=[False, False]) == [1.0, 1.0]


def test_batch_must_hold_whole_groups():
    with pytest.raises(ConfigError, match="must be a multiple of grpo.num_generations"):
        load_config(GroupRLConfig, REPO / "configs/grpo.yaml", ["train.batch_size=6"], stage="grpo")
