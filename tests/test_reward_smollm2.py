"""A LoRA reward model on the real SmolLM2 (a few steps): it trains, saves, reloads and scores as in training."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_lora_reward_model_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from conftest import REPO

    from foundation.config import load_config
    from reward import load_scorer
    from reward.model import encode
    from reward.rm import RMConfig, load_data, main

    cfg = load_config(RMConfig, REPO / "configs/rm_helpful.yaml", [
        f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", "data.sources=[{path: 'bundled:comparisons', limit: 12}]",
        "data.val_fraction=0.25", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.max_length=192",
    ], stage="rm")
    out = main(cfg)
    assert (json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert json.loads((out / "model" / "align_base.json").read_text()) == {"name": "smollm2-135m"}  # align: the built-in, offline
    scorer = load_scorer(str(out))
    assert scorer.model.config.num_labels == 1 and scorer.model.config.pad_token_id == scorer.tokenizer.pad_token_id
    ids = encode(scorer.tokenizer, [{"role": "user", "content": "Hi"}], "Hello!")
    assert ids[-1] == scorer.tokenizer.convert_tokens_to_ids("<|im_end|>")  # scored at the end-of-turn token
    _, val, _ = load_data(cfg.data, "helpfulness", cfg.run.seed)
    rewards = scorer.score([c.prompt for c in val] * 2, [c.chosen_response for c in val] + [c.rejected_response for c in val])
    stats = json.loads((out / "model" / "reward_stats.json").read_text())
    assert torch.isfinite(rewards).all() and stats["n"] == rewards.numel()
    assert rewards.mean().item() == pytest.approx(stats["mean"], abs=1e-3)
