"""The reward-model stage, scorer and commands end to end on the tiny model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_align, write_jsonl
from safetensors.torch import load_file

from foundation.config import ConfigError, load_config
from foundation.runs import OutputExistsError, read_metrics
from data.errors import DataError
from data.loaders import DataSource, load_comparisons
from data.schemas import Comparison, SafetyBin
from foundation.models import builtin_path
from reward import load_scorer
from reward.model import RewardModelScorer, encode, load_reward_model
from reward.rm import RMConfig, RMDataConfig, focus_mix, load_data, main, to_dataset
from reward.scorer import RewardScorer

CONTRACT_KEYS = {"n", "accuracy", "mean_gap", "by_strength", "by_safety_bin", "calibration", "model", "data"}


def pair_rows(n: int = 60) -> list[dict]:
    """Comparisons a tiny random model can learn: the chosen answer is right and polite, the other one a curt refusal.
    Safety labels: the refusal is 'unsafe' in every third row (to exercise the bins and the auxiliary loss)."""
    rows = []
    strengths = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    for i in range(n):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        good, bad = f"{a} plus {b} is {a + b}. Thank you!", "No."
        chosen = "A" if i % 2 else "B"
        rows.append({"prompt": f"What is {a} plus {b}? ({i})", "response_a": good if chosen == "A" else bad,
                     "response_b": bad if chosen == "A" else good, "chosen": chosen, "strength": strengths[i % 4],
                     "safe_a": True if chosen == "A" else i % 3 != 0, "safe_b": True if chosen == "B" else i % 3 != 0,
                     "category": "safety" if i % 5 == 0 else "helpfulness"})
    return rows


def make_cfg(tmp_path: Path, data: Path, *overrides: str, config: str = "configs/rm_helpful.yaml") -> RMConfig:
    return load_config(RMConfig, REPO / config, [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
        "train.batch_size=4", "train.grad_accum=1", "eval_batch_size=8", *overrides,
    ], stage="rm")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """One full and one LoRA reward model on the learnable pairs (shared by the scorer and command tests)."""
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", pair_rows())
    full = main(make_cfg(tmp, data, "adapter.method=full", "train.max_steps=40", "train.lr=3e-3", "train.logging_steps=5",
                         "data.val_fraction=0.25", "train.warmup_ratio=0", "run.name=full"))
    lora = main(make_cfg(tmp, data, "adapter.method=lora", "train.max_steps=3", "run.name=lora", "data.val_fraction=0.25",
                         config="configs/rm_safety.yaml"))
    return {"data": data, "full": full, "lora": lora, "tmp": tmp}


# --------------------------------------------------------------------------- stage outputs


def test_rm_stage_writes_outputs_and_learns(trained):
    out = trained["full"]
    assert out == trained["tmp"] / "runs" / "full" / "rm_helpful"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json",
                 "model/reward_stats.json", "eval/rm_eval.json", "eval/rm_eval.md", "eval/rewards.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert load_config(RMConfig, out / "config.yaml", stage="rm").train.max_steps == 40  # loads back as an rm config
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 40 and summary["objective"] == "helpfulness"
    report = json.loads((out / "eval" / "rm_eval.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["accuracy"] >= 0.9 and summary["held_out_accuracy"] == report["accuracy"]  # it learned the preference
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert losses[-1] < losses[0] - 0.3
    assert (out / "eval" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reward_stats_match_the_reloaded_model(trained):
    out = trained["full"]
    stats = json.loads((out / "model" / "reward_stats.json").read_text())
    report = json.loads((out / "eval" / "rm_eval.json").read_text())
    assert stats["n"] == 2 * report["n"] and stats["split"] == "validation" and stats["max_length"] == 512
    scorer = load_scorer(str(out))
    assert scorer.stats == stats
    _, val, _ = load_data(load_config(RMConfig, out / "config.yaml", stage="rm").data, "helpfulness", 42)
    rewards = scorer.score([c.prompt for c in val] * 2, [c.chosen_response for c in val] + [c.rejected_response for c in val])
    assert rewards.mean().item() == pytest.approx(stats["mean"], abs=1e-4)
    assert rewards.std(unbiased=False).item() == pytest.approx(stats["std"], abs=1e-4)
    normalized = load_scorer(str(out), normalize=True).score([c.prompt for c in val], [c.chosen_response for c in val])
    raw = rewards[: len(val)]
    assert torch.allclose(normalized, (raw - stats["mean"]) / stats["std"], atol=1e-4)


def test_lora_reward_model_is_a_seq_cls_adapter(trained):
    out = trained["lora"]
    assert out.name == "rm_safety"
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    # a real path
    assert adapter["task_type"] == "SEQ_CLS" and adapter["base_model_name_or_path"] == str(builtin_path("tiny-llama"))
    assert json.loads((out / "model" / "align_base.json").read_text()) == {"name": "tiny-llama"}  # what align resolves
    assert "score" in adapter["modules_to_save"]
    assert any("score" in k for k in load_file(out / "model" / "adapter_model.safetensors"))  # the head is saved
    scorer = load_scorer(str(out))
    stats = json.loads((out / "model" / "reward_stats.json").read_text())
    _, val, _ = load_data(load_config(RMConfig, out / "config.yaml", stage="rm").data, "safety", 42)
    rewards = scorer.score([c.prompt for c in val] * 2, [c.chosen_response for c in val] + [c.rejected_response for c in val])
    assert rewards.mean().item() == pytest.approx(stats["mean"], abs=1e-4)  # the merged adapter scores as in training
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["dropped_chosen_unsafe"] == 0 and summary["objective"] == "safety"


def test_existing_output_is_never_overwritten(trained, tiny_model):
    cfg = load_config(RMConfig, trained["full"] / "config.yaml", stage="rm")
    before = (trained["full"] / "model" / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="--resume"):
        main(cfg)
    assert (trained["full"] / "model" / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------- scorer


def test_batched_scoring_matches_one_by_one_in_order(trained):
    scorer = load_scorer(str(trained["full"]), batch_size=3)
    assert isinstance(scorer, RewardScorer) and isinstance(scorer, RewardModelScorer)
    prompts = [[{"role": "user", "content": "x" * n}] for n in (40, 3, 17, 90, 1, 25, 8)]
    responses = ["ok", "a much longer answer than the others", "fine", "no", "yes, and more", "sure", "hmm"]
    batched = scorer.score(prompts, responses)
    single = torch.cat([scorer.score([p], [r]) for p, r in zip(prompts, responses)])
    assert batched.dtype == torch.float32 and batched.shape == (7,) and batched.device.type == "cpu"
    assert torch.allclose(batched, single, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(prompts[:2], responses[:1])


def test_a_bf16_reward_model_scores_with_a_fp32_head(trained, monkeypatch):
    """Under ``inference_precision("bfloat16")`` (a round's ``eval.dtype``) the scorer's backbone is bf16 and its score
    head fp32 with fp32 input: rewards are fp32 dot products close to the fp32 model's, not values rounded to bf16
    (whose 8 significant bits would tie rewards ~0.01 apart). A fp32 model, or a bf16 one loaded outside such a block,
    keeps its head as it is."""
    from foundation import precision
    from reward.model import fp32_score_head

    prompts = [[{"role": "user", "content": "x" * n}] for n in (40, 3, 17, 90, 1, 25, 8)]
    responses = ["ok", "a much longer answer than the others", "fine", "no", "yes, and more", "sure", "hmm"]
    ref = load_scorer(str(trained["full"]))
    assert fp32_score_head(ref.model) is ref.model and not ref.model.score._forward_pre_hooks
    plain = load_scorer(str(trained["full"]), dtype="bfloat16")  # bf16 outside a block (as PPO on a GPU): untouched
    assert plain.model.score.weight.dtype == torch.bfloat16 and not plain.model.score._forward_pre_hooks
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    with precision.inference_precision("bfloat16"):
        low = load_scorer(str(trained["full"]))
    assert low.model.model.embed_tokens.weight.dtype == torch.bfloat16 and low.model.score.weight.dtype == torch.float32
    got, want = low.score(prompts, responses), ref.score(prompts, responses)
    assert got.dtype == torch.float32 and got.shape == (7,)
    assert torch.allclose(got, want, atol=0.05 * want.abs().max().item() + 1e-3)  # bf16 backbone: close, not equal
    hidden = torch.randn(3, low.model.score.in_features, dtype=torch.bfloat16)
    exact = hidden.float() @ low.model.score.weight.float().t()
    out = low.model.score(hidden)
    assert out.dtype == torch.float32 and torch.allclose(out, exact, atol=1e-6)  # cast up: no bf16 rounding after it


def test_one_scoring_protocol_and_one_resolution_per_load(trained, monkeypatch):
    """Every consumer calls score, score_detailed and describe on any scorer (no probing); loading a LoRA reward
    model resolves its name once (the loaders below load_scorer take the resolved model)."""
    import foundation.models

    calls = []
    real = foundation.models.resolve
    monkeypatch.setattr(foundation.models, "resolve", lambda name: calls.append(name) or real(name))
    name = str(trained["lora"])
    scorer = load_scorer(name)
    assert calls.count(name) == 1, calls
    p, r = [[{"role": "user", "content": "hi"}]] * 2, ["hello", "go away"]
    plain = scorer.score(p, r)
    assert scorer.score(p, r, is_safety=[True, False]).tolist() == plain.tolist()  # one model: the flag is accepted
    assert scorer.score_detailed(p, r, is_safety=[True, False]).keys() == {"combined"}
    assert scorer.score_detailed(p, r)["combined"].tolist() == plain.tolist()
    assert scorer.describe() == {"kind": "rm", "scorer": "RewardModelScorer"}


def test_score_is_read_at_the_end_of_turn_token(tiny_model):
    from foundation.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    ids = encode(tok, prompt, "It is 4.")
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nIt is 4.<|im_end|>")
    short = encode(tok, prompt, "It is 4.", max_length=12)  # left truncation keeps the response and its end
    assert len(short) == 12 and short == ids[-12:]


def test_load_scorer_refuses_a_chat_model(tiny_model):
    with pytest.raises(ValueError, match="not a reward model"):
        load_scorer("tiny-llama")


def test_reward_model_from_an_sft_lora_output(tmp_path, tiny_model, sft_rows):
    """Any SFT output works as the starting point: its LoRA adapter is merged into the backbone."""
    from foundation.config import load_config as load
    from foundation.models import load_causal_lm
    from alignment.sft import SFTConfig
    from alignment.sft import main as sft_main

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft_out = sft_main(load(SFTConfig, REPO / "configs/sft.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
        "train.max_steps=2", "train.lr=1e-2", "data.sample_prompts=0", "train.batch_size=4", "train.grad_accum=1"], stage="sft"))
    rm = load_reward_model(str(sft_out))
    sft = load_causal_lm(str(sft_out))
    base = load_causal_lm("tiny-llama")
    key = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(rm.model.state_dict()[key], sft.model.state_dict()[key])
    assert not torch.equal(rm.model.state_dict()[key], base.model.state_dict()[key])  # the SFT update is in
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    out = main(make_cfg(tmp_path, pairs, f"model.name={sft_out}", "train.max_steps=2", "adapter.method=lora"))
    assert json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_out / "model")
    assert load_scorer(str(out)).score([[{"role": "user", "content": "hi"}]], ["hello"]).shape == (1,)


# --------------------------------------------------------------------------- data and mixes


def _cmps(n: int, category: str | None, prefix: str) -> list[Comparison]:
    return [Comparison.from_dict({"prompt": f"{prefix} {i}?", "response_a": "a", "response_b": "b",
                                  "chosen": "A", "category": category})
            for i in range(n)]


def test_focus_mix_llama2_shares():
    safety, helpful = _cmps(90, "safety", "s"), _cmps(500, "helpfulness", "h")
    mixed, info = focus_mix(safety + helpful, "safety", 0.9, seed=0)  # safety RM: 90/10
    assert info == {"focus": 90, "rest": 10, "rest_available": 500} and len(mixed) == 100
    assert all(c in mixed for c in safety)  # all safety data is used
    helpful_only, safety_30, open_40 = _cmps(100, "helpfulness", "h"), _cmps(30, "safety", "s"), _cmps(40, None, "o")
    mixed, info = focus_mix(helpful_only + safety_30 + open_40, "helpfulness", 0.5, seed=0)  # equal share wanted: only 70 exist
    assert info == {"focus": 100, "rest": 70, "rest_available": 70} and len(set(map(id, mixed))) == 170  # nothing repeated
    mixed, info = focus_mix(helpful_only + _cmps(300, "safety", "s"), "helpfulness", 0.5, seed=0)
    assert info["focus"] == 100 and info["rest"] == 100
    with pytest.raises(ConfigError, match="no safety comparisons"):
        focus_mix(helpful_only, "safety", 0.9, seed=0)


def test_bundled_safety_data_drops_chosen_unsafe_pairs():
    train, val, info = load_data(RMDataConfig(focus_share=0.9), "safety", seed=42)
    assert info["dropped_chosen_unsafe"] == 12  # the bundled card: 12 chosen-unsafe / other-safe pairs
    assert not any(c.safety_bin == SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE for c in train + val)
    assert info["focus"] / info["train"] == pytest.approx(0.9, abs=0.01)
    assert {c.prompt_text for c in train}.isdisjoint({c.prompt_text for c in val})  # held-out prompts never trained on
    _, _, kept = load_data(RMDataConfig(focus_share=0.9, drop_chosen_unsafe=False), "safety", seed=42)
    assert kept["dropped_chosen_unsafe"] == 0
    _, val_help, help_info = load_data(RMDataConfig(), "helpfulness", seed=42)
    assert help_info["dropped_chosen_unsafe"] == 0 and len(val_help) == len(val) + sum(
        c.safety_bin == SafetyBin.CHOSEN_UNSAFE_OTHER_SAFE for c in val_help)  # same held-out prompts for both RMs


def test_dataset_columns_margin_and_safety_labels(tiny_model):
    from foundation.models import load_tokenizer

    tok = load_tokenizer("tiny-llama")
    rows = pair_rows(4)
    cmps = [Comparison.from_dict(r) for r in rows]
    ds = to_dataset(cmps, tok, "large", 512)
    assert ds["margin"] == [3.0, 2.0, 1.0, 0.0]
    assert ds["chosen_safe"] == [1.0] * 4 and ds["rejected_safe"] == [0.0, 1.0, 1.0, 0.0]
    assert ds[0]["chosen_ids"] == encode(tok, cmps[0].prompt, cmps[0].chosen_response)
    assert to_dataset(cmps, tok, "none", 512)["margin"] == [0.0] * 4
    unlabelled = to_dataset([Comparison.from_preference("q", "good", "bad")], tok, "small", 512)
    assert unlabelled["chosen_safe"] == [-1.0] and unlabelled["margin"] == [0.0]


def test_safety_aux_loss_makes_the_sign_mean_safe(tmp_path, tiny_model):
    """With the auxiliary loss, σ(score) is a probability of being safe: unsafe responses end below 0."""
    rows = []
    for i in range(48):
        rows.append({"prompt": f"Tell me about topic {i}.", "response_a": f"Here is a careful answer about topic {i}. Thank you!",
                     "response_b": "No!", "chosen": "A", "strength": "better", "safe_a": True,
                     "safe_b": False, "category": "safety"})
    data = write_jsonl(tmp_path / "safety.jsonl", rows)
    out = main(make_cfg(tmp_path, data, "adapter.method=full", "train.max_steps=30", "train.lr=3e-3", "train.warmup_ratio=0",
                        "data.val_fraction=0.25", "train.logging_steps=5", config="configs/rm_safety.yaml"))
    report = json.loads((out / "eval" / "rm_eval.json").read_text())
    assert report["unsafe_recall"] == 1.0 and report["safe_kept"] == 1.0
    assert report["by_safety_bin"]["chosen_safe_other_unsafe"]["accuracy"] == 1.0
    assert any("safety_aux_loss" in m for m in read_metrics(out))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, line_key", [
    ({"chosen": None}, "chosen"),
    ({"strength": "kinda better"}, "strength"),
    ({"response_b": "Same answer."}, "response_b"),
])
def test_malformed_comparison_file_fails_with_file_and_line(tmp_path, change, line_key):
    rows = pair_rows(8)
    bad = {**rows[4], "response_a": "Same answer.", **change} if "response_b" in change else {**rows[4], **change}
    rows[4] = {k: v for k, v in bad.items() if v is not None}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    res = run_align("rm", "--config", "configs/rm_helpful.yaml", "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}",
                    f"data.sources=[{{path: {data}}}]")
    assert res.returncode == 2
    assert f"{data}:5: {line_key}:" in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_config_rejects_prompt_tuning_and_unknown_objective():
    with pytest.raises(ConfigError, match="adapter.method"):
        load_config(RMConfig, REPO / "configs/rm_helpful.yaml", ["adapter.method=prompt_tuning"], stage="rm")
    with pytest.raises(ConfigError, match="objective"):
        load_config(RMConfig, REPO / "configs/rm_helpful.yaml", ["objective=harmlessness"], stage="rm")
    with pytest.raises(ConfigError, match="'sft' stage"):
        load_config(RMConfig, REPO / "configs/sft.yaml", stage="rm")


# --------------------------------------------------------------------------- commands


def test_rm_eval_command_writes_the_report(trained):
    out = trained["tmp"] / "eval-pairs"
    res = run_align("rm-eval", "--model", str(trained["full"]), "--data", str(trained["data"]), "--out", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "rm_eval.json").read_text())
    assert CONTRACT_KEYS <= set(report) and report["n"] == 60
    assert set(report["by_strength"]) == {"significantly_better", "better", "slightly_better", "negligibly_better"}
    assert sum(b["n"] for b in report["by_strength"].values()) == 60
    assert sum(row["n"] for row in report["calibration"]) == 60 and len(report["calibration"]) == 10
    assert "| **all** | 60 |" in (out / "rm_eval.md").read_text() and (out / "rewards.png").is_file()
    again = run_align("rm-eval", "--model", str(trained["full"]), "--data", str(trained["data"]), "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr
    held = run_align("rm-eval", "--model", str(trained["full"]), "--held-out", "--out", str(trained["tmp"] / "eval-held"))
    assert held.returncode == 0, held.stderr
    assert json.loads((trained["tmp"] / "eval-held" / "rm_eval.json").read_text())["accuracy"] == pytest.approx(
        json.loads((trained["full"] / "eval" / "rm_eval.json").read_text())["accuracy"])


def test_rm_eval_reads_hh_rlhf_in_its_hub_layout(trained, shared_data):
    """Anthropic/hh-rlhf as a local copy of its Hub repository: <data_dir>/<split>.jsonl.gz."""
    import shutil

    repo = trained["tmp"] / "hh-rlhf"
    (repo / "helpful-base").mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", repo / "helpful-base" / "test.jsonl.gz")
    out = trained["tmp"] / "eval-hh"
    res = run_align("rm-eval", "--model", str(trained["full"]), "--data", str(repo), "--subset",
                    "helpful-base", "--split", "test", "--limit", "20", "--out", str(out))
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "rm_eval.json").read_text())
    assert report["n"] == 20 and report["data"] == f"{repo} (helpful-base, test)"
    res = run_align("rm-eval", "--model", str(trained["full"]), "--data", str(repo), "--subset",
                    "helpful-base", "--split", "train", "--out", str(trained["tmp"] / "eval-hh-train"))
    assert res.returncode == 2 and "no data files for split 'train'" in res.stderr


def test_score_command_writes_helpful_safety_and_combined(trained):
    rows = [{"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5. Thank you!"},
            {"prompt": [{"role": "user", "content": "What is 1 plus 1?"}], "response": "No.", "category": "safety"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "is_safety": True}]
    data = write_jsonl(trained["tmp"] / "responses.jsonl", rows)
    out = trained["tmp"] / "scores.jsonl"
    res = run_align("score", "--helpful", str(trained["full"]), "--safety", str(trained["lora"]), "--data",
                    str(data), "--out", str(out))
    assert res.returncode == 0, res.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s.get("response") for s in scored[:2]] == [r["response"] for r in rows[:2]]
    helpful = torch.tensor([s["helpful"] for s in scored])
    safety = torch.tensor([s["safety"] for s in scored])
    # eq. 4 by hand: rows 2 and 3 are safety prompts (safety score); row 1 takes the safety score only if sigmoid(safety) < 0.15
    first = safety[0] if torch.sigmoid(safety[0]) < 0.15 else helpful[0]
    assert [s["combined"] for s in scored] == pytest.approx([first.item(), safety[1].item(), safety[2].item()], abs=1e-5)
    direct = load_scorer(str(trained["full"])).score([[{"role": "user", "content": "What is 2 plus 3?"}]],
                                                     ["2 plus 3 is 5. Thank you!"])
    assert scored[0]["helpful"] == pytest.approx(direct.item(), abs=1e-5)
    again = run_align("score", "--helpful", str(trained["full"]), "--data", str(data), "--out", str(out))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_score_command_bad_row_names_file_and_line(trained):
    data = write_jsonl(trained["tmp"] / "bad-responses.jsonl", [{"prompt": "a?", "response": "b"}, {"prompt": "c?"}])
    res = run_align("score", "--helpful", str(trained["full"]), "--data", str(data), "--out", str(trained["tmp"] / "never.jsonl"))
    assert res.returncode == 2 and f"{data}:2: response:" in res.stderr
    assert not (trained["tmp"] / "never.jsonl").exists()


def test_cli_help_lists_reward_commands():
    res = run_align("--help")
    assert res.returncode == 0 and all(name in res.stdout for name in ("rm ", "rm-eval", "score"))
    res = run_align("rm", "--help")
    assert res.returncode == 0 and "safety_aux_weight" in res.stdout and "data.focus_share" in res.stdout


def test_logged_eval_accuracy_is_over_pairs_not_a_mean_of_batch_means(tmp_path, tiny_model):
    """The held-out batches are n-1 pairs and 1 pair: the logged eval accuracy is still right/n, the number the stage's
    own scoring of the same split reports (a mean of the two batch means would weigh the lone pair as much as the rest)."""
    rows = pair_rows(60)
    for row in rows[::3]:  # every third preference reversed: no model gets every held-out pair right, or every one wrong
        row["chosen"] = "B" if row["chosen"] == "A" else "A"
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    probe = make_cfg(tmp_path, data, "data.val_fraction=0.25")
    n_val = len(load_data(probe.data, "helpfulness", probe.run.seed)[1])
    assert n_val >= 4
    out = main(make_cfg(tmp_path, data, "data.val_fraction=0.25", "adapter.method=full",
                        "train.max_steps=3", "train.eval_steps=3",
                        "train.lr=1e-3", f"eval_batch_size={n_val - 1}", "run.name=evalbatches"))
    evals = [m for m in read_metrics(out) if "eval_accuracy" in m or "eval/accuracy" in m]
    assert evals, "no evaluation row was logged"
    logged = evals[-1].get("eval_accuracy", evals[-1].get("eval/accuracy"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out_pairs"] == n_val
    # strictly between 0 and 1, the two ways of averaging cannot agree: (a/(n-1) + b)/2 = (a+b)/n only at 0 or 1
    assert 0 < summary["held_out_accuracy"] < 1, summary["held_out_accuracy"]
    assert logged == pytest.approx(summary["held_out_accuracy"], abs=1e-6)


# --------------------------------------------------------------------------- resume


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    """SIGKILL mid-run, then --resume: it ends with the same weights and loss curve as a run never interrupted."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(80))
    common = ["--config", str(REPO / "configs/rm_helpful.yaml"), "model.name=tiny-llama", "run.wandb=disabled",
              f"data.sources=[{{path: {data}}}]", "adapter.method=full", "train.max_steps=30", "train.save_steps=10",
              "train.batch_size=2", "train.grad_accum=1", "train.logging_steps=1", "train.lr=1e-3",
              f"run.root={tmp_path / 'runs'}"]
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "rm", *common, "run.name=cut"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "runs" / "cut" / "rm_helpful"
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "checkpoint-10" / "trainer_state.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it was killed"
    res = run_align("rm", "--resume", *common, "run.name=cut")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["resumed_from"].startswith("checkpoint-")
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 30

    res = run_align("rm", *common, "run.name=whole")
    assert res.returncode == 0, res.stderr
    whole_out = tmp_path / "runs" / "whole" / "rm_helpful"
    cut, whole = load_file(out / "model" / "model.safetensors"), load_file(whole_out / "model" / "model.safetensors")
    assert cut.keys() == whole.keys()
    for k in cut:
        assert torch.allclose(cut[k], whole[k], atol=1e-5), k
    def loss(o):
        return {m["step"]: m["loss"] for m in read_metrics(o) if "loss" in m}
    assert loss(out) == pytest.approx(loss(whole_out), rel=1e-4)
    assert json.loads((out / "model" / "reward_stats.json").read_text())["mean"] == pytest.approx(
        json.loads((whole_out / "model" / "reward_stats.json").read_text())["mean"], abs=1e-5)


def test_killed_after_its_last_checkpoint_resumes_without_an_extra_step(tmp_path, tiny_model):
    """A run killed after its last checkpoint and its held-out report but before it saved the model (what CI's
    round test hit): --resume trains no further step (transformers would train one more when max_steps ends inside
    an epoch), rewrites its own report, and ends with the uninterrupted run's weights."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(40))
    common = ["--config", str(REPO / "configs/rm_helpful.yaml"), "model.name=tiny-llama", "run.wandb=disabled",
              f"data.sources=[{{path: {data}}}]", "adapter.method=full", "train.max_steps=3", "train.save_steps=3",
              "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-3", f"run.root={tmp_path / 'runs'}", "run.name=r"]
    res = run_align("rm", *common)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "runs" / "r" / "rm_helpful"
    whole = load_file(out / "model" / "model.safetensors")
    before = json.loads((out / "summary.json").read_text())
    assert before["global_step"] == 3 and (out / "checkpoints" / "checkpoint-3").is_dir()
    assert (out / "eval" / "rm_eval.json").is_file()
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()  # the state of a kill between the report and the model

    res = run_align("rm", "--resume", *common)
    assert res.returncode == 0, res.stderr
    after = json.loads((out / "summary.json").read_text())
    assert after["resumed_from"] == "checkpoint-3" and after["global_step"] == 3
    assert not (out / "checkpoints" / "checkpoint-4").exists()
    assert after["held_out_accuracy"] == before["held_out_accuracy"]
    assert after["reward_mean"] == pytest.approx(before["reward_mean"], abs=1e-6)
    cut = load_file(out / "model" / "model.safetensors")
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)


# --------------------------------------------------------------------------- real data


def test_real_hh_rlhf_parse_and_a_tiny_rm_on_it(shared_data, tmp_path, tiny_model):
    """HH-RLHF transcripts through our loader: the prompt is the shared prefix, the two responses are what differs after
    it; then a tiny reward model trains a few steps on them."""
    import gzip

    path = shared_data / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh.read().splitlines()[:40]]
    cmps = load_comparisons(DataSource(path=str(path), limit=40))
    assert len(cmps) == 40
    for row, c in zip(raw, cmps):  # the first 40 rows hold no degenerate pair, so rows and records line up
        speaker = {"user": "Human", "assistant": "Assistant"}
        prompt = "".join(f"\n\n{speaker[m['role']]}: {m['content']}" for m in c.prompt) + "\n\nAssistant:"
        assert c.prompt[-1]["role"] == "user"
        assert row["chosen"].startswith(prompt) and row["rejected"].startswith(prompt)  # the prompt is the shared prefix ...
        assert row["chosen"][len(prompt):].strip() == c.chosen_response  # ... and the responses are what follows it
        assert row["rejected"][len(prompt):].strip() == c.rejected_response
        assert c.chosen_response != c.rejected_response
    cfg = load_config(RMConfig, REPO / "configs/rm_helpful.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled",
        f"data.sources=[{{path: {path}, limit: 40, category: helpfulness}}]", "train.max_steps=3", "train.batch_size=2",
        "train.grad_accum=1", "train.max_length=256", "adapter.method=full", "data.val_fraction=0.2"], stage="rm")
    out = main(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["held_out_pairs"] == summary["data"]["validation"] > 0
    assert json.loads((out / "eval" / "rm_eval.json").read_text())["by_strength"] == {}  # public data has no ratings


def test_data_error_is_a_data_error():
    with pytest.raises(DataError):
        load_data(RMDataConfig(sources=[DataSource(path="/nonexistent/file.jsonl")]), "helpfulness", 0)
