"""The DPO stage: margin and metric math by hand, the reference without a second copy, learning a
synthetic preference on the tiny model, margins in the loss, kill-and-resume."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_align, write_jsonl

from foundation.config import ConfigError, load_config
from alignment.dpo import (
    MARGIN_TABLES,
    DPOConfig,
    build_trainer,
    implicit_rewards,
    main,
    pair_margin,
    preference_metrics,
    to_rows,
)
from alignment.preferences import load_data
from foundation.runs import read_metrics
from data.schemas import Comparison

WORDS = ["fox", "dog", "capital", "France", "python", "language", "help", "request", "answer", "question", "quick", "lazy"]
STRENGTHS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny-model ops are too small to gain from threads, and on a shared CPU two OpenMP threads made
    generation ~50x slower than one (measured: 8 s vs 0.17 s per call): run these tests on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
    yield
    torch.set_num_threads(threads)


def marker_pairs(n: int = 80) -> list[dict]:
    """Comparisons where the chosen response always contains the word "Paris" (A or B in turn)."""
    rows = []
    for i in range(n):
        base = " ".join(WORDS[(i * 7 + j * 5) % len(WORDS)] for j in range(5))
        good, bad = f"Paris {base}.", f"{base} dog."
        chosen = "A" if i % 2 == 0 else "B"
        rows.append({"prompt": f"Tell me about the {WORDS[i % len(WORDS)]} number {i}.",
                     "response_a": good if chosen == "A" else bad, "response_b": bad if chosen == "A" else good,
                     "chosen": chosen, "strength": STRENGTHS[i % 4], "category": "helpfulness"})
    return rows


def make_cfg(tmp_path: Path, data: Path, *overrides: str) -> DPOConfig:
    return load_config(DPOConfig, REPO / "configs/dpo.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
        "data.val_fraction=0.25", "train.batch_size=4", "train.grad_accum=1", "train.logging_steps=5", "train.warmup_ratio=0",
        *overrides,
    ], stage="dpo")


# ---------------------------------------------------------------------------------------------
# math


def test_pair_margin_follows_llama2_tables():
    assert [pair_margin(s, None, "small") for s in STRENGTHS] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [pair_margin(s, None, "large") for s in STRENGTHS] == [3, 2, 1, 0]
    assert pair_margin(None, None, "large") == 0.0  # unrated pairs (public data) get no margin
    assert pair_margin("better", 0.25, "data") == 0.25 and pair_margin("better", None, "data") == 0.0
    assert pair_margin("significantly_better", 5.0, "none") == 0.0
    assert set(MARGIN_TABLES["small"]) == set(STRENGTHS)


def test_implicit_rewards_and_metrics_by_hand():
    beta = 0.5
    r_c = implicit_rewards(torch.tensor([-10.0, -20.0, -5.0, -8.0]), torch.tensor([-12.0, -19.0, -5.0, -8.0]), beta)
    r_r = implicit_rewards(torch.tensor([-11.0, -30.0, -6.0, -9.0]), torch.tensor([-11.0, -28.0, -6.0, -10.0]), beta)
    assert r_c.tolist() == [1.0, -0.5, 0.0, 0.0]  # 0.5 * (-10 + 12), 0.5 * (-20 + 19), ...
    assert r_r.tolist() == [0.0, -1.0, 0.0, 0.5]
    m = preference_metrics(r_c, r_r)
    # gaps 1, 0.5, 0 (tie), -0.5 -> margin 0.25; accuracy (1 + 1 + 0.5 + 0) / 4
    assert m["margin"] == pytest.approx(0.25) and m["accuracy"] == pytest.approx(0.625) and m["ties"] == 1
    assert m["reward_chosen"] == pytest.approx(0.125) and m["reward_rejected"] == pytest.approx(-0.125) and m["n"] == 4


def test_rows_resolve_chosen_from_a_and_b():
    a = Comparison.from_dict({"prompt": "q", "response_a": "good", "response_b": "bad", "chosen": "A", "strength": "better"})
    b = Comparison.from_dict({"prompt": [{"role": "user", "content": "q2"}], "response_a": "bad",
                              "response_b": "good", "chosen": "B"})
    rows = to_rows([a, b], "large")
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "good"}] and rows[1]["chosen"][0]["content"] == "good"
    assert rows[1]["rejected"][0]["content"] == "bad" and rows[1]["prompt"] == [{"role": "user", "content": "q2"}]
    assert [r["margin"] for r in rows] == [2.0, 0.0] and rows[1]["strength"] == "unrated"


def test_config_rejects_margin_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="dpo.margin: a margin is defined for the sigmoid, hinge, robust losses only, not ipo"):
        load_config(DPOConfig, None, ["dpo.margin=small", "dpo.loss_type=[ipo]"])
    with pytest.raises(ConfigError, match="dpo.precompute_ref: true"):
        load_config(DPOConfig, None, ["dpo.margin=large", "dpo.precompute_ref=false"])
    with pytest.raises(ConfigError, match="dpo.loss_weights"):
        load_config(DPOConfig, None, ["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0]"])
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        load_config(DPOConfig, None, ["dpo.loss_type=[sigmoide]"])


def test_unsafe_chosen_pairs_are_dropped(tmp_path):
    rows = marker_pairs(40)
    rows[0].update(safe_a=False, safe_b=True)  # chosen A unsafe, rejected safe: Llama 2 drops it
    rows[2].update(safe_a=False, safe_b=False)  # both unsafe: kept
    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows))
    train, val = load_data(cfg.data, 0)
    prompts = {c.prompt_text for c in train + val}
    assert len(train) + len(val) == 39 and rows[0]["prompt"] not in prompts and rows[2]["prompt"] in prompts


# ---------------------------------------------------------------------------------------------
# the trainer: reference without a copy, margins in the loss


@pytest.mark.parametrize("method,precompute,copy",
                         [("lora", True, False), ("lora", False, False), ("full", True, False), ("full", False, True)])
def test_reference_policy_is_not_a_second_copy(tmp_path, tiny_model, method, precompute, copy):
    from accelerate.utils import is_peft_model

    cfg = make_cfg(tmp_path, write_jsonl(tmp_path / "p.jsonl", marker_pairs(16)), f"adapter.method={method}",
                   f"dpo.precompute_ref={str(precompute).lower()}")
    trainer = build_trainer(cfg, tmp_path / "out", *load_data(cfg.data, 0))
    assert (trainer.ref_model is not None) == copy  # only full fine-tuning without precomputing keeps a frozen copy
    assert is_peft_model(trainer.model) == (method == "lora")
    assert ("ref_chosen_logps" in trainer.train_dataset.column_names) == precompute


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tmp_path, tiny_model):
    """The held-out rewards of a trained LoRA policy match beta * (log pi_adapter - log pi_base), both
    computed here independently from plain logits."""
    from foundation.models import load_causal_lm, load_tokenizer

    data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(24))
    cfg = make_cfg(tmp_path, data, "adapter.method=lora", "train.max_steps=4", "train.lr=5e-3", "dpo.beta=0.2")
    out = main(cfg)
    after = json.loads((out / "eval.json").read_text())["after"]
    _, val = load_data(cfg.data, cfg.run.seed)
    tok = load_tokenizer("tiny-llama")
    policy, base = load_causal_lm(str(out)), load_causal_lm("tiny-llama")

    def logp(model, prompt, response):
        p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False)
        assert ids[: len(p_ids)] == p_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return lp[len(p_ids) - 1:].sum().item()  # the response tokens only

    gaps = []
    for c in val:
        r_c = 0.2 * (logp(policy, c.prompt, c.chosen_response) - logp(base, c.prompt, c.chosen_response))
        r_r = 0.2 * (logp(policy, c.prompt, c.rejected_response) - logp(base, c.prompt, c.rejected_response))
        gaps.append(r_c - r_r)
    assert after["n"] == len(val)
    assert after["margin"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-4)
    assert after["accuracy"] == pytest.approx(sum(g > 0 for g in gaps) / len(gaps))


def test_margin_enters_the_loss_exactly(tmp_path, tiny_model):
    """With policy = reference (first step, LoRA starts at zero) every pair's loss is -log sigmoid(-m) = softplus(m)."""
    data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(24))
    plain = make_cfg(tmp_path, data, "adapter.method=lora", "train.max_steps=1", "dpo.beta=0.1")
    with_margin = make_cfg(tmp_path, data, "adapter.method=lora", "train.max_steps=1", "dpo.beta=0.1", "dpo.margin=large")
    train, val = load_data(plain.data, 0)
    t_plain = build_trainer(plain, tmp_path / "a", train, val)
    t_margin = build_trainer(with_margin, tmp_path / "b", train, val)
    m = torch.tensor(t_margin.train_dataset["margin"])
    shift = torch.tensor(t_margin.train_dataset["ref_chosen_logps"]) - torch.tensor(t_plain.train_dataset["ref_chosen_logps"])
    assert torch.allclose(shift, m / 0.1, atol=1e-4)  # log pi_ref(y_c) raised by m / beta
    assert t_margin.train_dataset["ref_rejected_logps"] == t_plain.train_dataset["ref_rejected_logps"]
    assert t_margin.eval_dataset["ref_chosen_logps"] == t_plain.eval_dataset["ref_chosen_logps"]  # held-out: no margin

    # the first batch in the trainer's order: its loss is the mean softplus(m) of its 4 pairs
    first = next(iter(t_margin.get_train_dataloader()))
    idx = [t_margin.train_dataset["ref_chosen_logps"].index(v) for v in first["ref_chosen_logps"].tolist()]
    expected = sum(math.log1p(math.exp(m[i].item())) for i in idx) / len(idx)
    assert t_margin.train().training_loss == pytest.approx(expected, rel=1e-4)
    assert t_plain.train().training_loss == pytest.approx(math.log(2), rel=1e-4)  # no margin: -log sigmoid(0)


# ---------------------------------------------------------------------------------------------
# the stage end to end


def test_dpo_learns_a_synthetic_preference(tmp_path, tiny_model):
    """Chosen responses always contain "Paris": held-out implicit-reward accuracy and margin rise."""
    data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(64))
    out = main(make_cfg(tmp_path, data, "adapter.method=lora", "train.max_steps=20", "train.lr=3e-3", "train.eval_steps=10"))
    for name in ("config.yaml", "eval_before.json", "eval.json", "summary.json", "metrics.jsonl", "model/adapter_config.json",
                 "model/adapter_model.safetensors", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    from foundation.models import builtin_path

    assert (json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
            == str(builtin_path("tiny-llama")))
    result = json.loads((out / "eval.json").read_text())
    before, after = result["before"], result["after"]
    assert before["margin"] == 0.0 and before["accuracy"] == 0.5 and before["ties"] == before["n"]  # policy = reference
    assert after["accuracy"] >= 0.9 and after["margin"] > 0.2
    assert set(after["by_strength"]) == set(STRENGTHS) and sum(v["n"] for v in after["by_strength"].values()) == after["n"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["val_accuracy_after"] == after["accuracy"]
    metrics = read_metrics(out)
    assert any("eval_rewards/margins" in m for m in metrics) and any("rewards/accuracies" in m for m in metrics)


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_model):
    """SIGKILL after a checkpoint, --resume: same final weights as a run that was never killed (full
    fine-tuning: the precomputed reference must come from the initial weights, not the checkpoint)."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(40))
    common = ["--config", str(REPO / "configs/dpo.yaml"), "model.name=tiny-llama", "run.wandb=disabled",
              f"data.sources=[{{path: {data}}}]",
              "data.val_fraction=0.25", "adapter.method=full", "train.max_steps=16", "train.save_steps=4", "train.batch_size=2",
              "train.grad_accum=1", "train.lr=1e-3", "train.logging_steps=1", f"run.root={tmp_path / 'runs'}"]
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "dpo", *common, "run.name=cut"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = tmp_path / "runs" / "cut" / "dpo"
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "checkpoints" / "checkpoint-8" / "trainer_state.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists(), "the run finished before it was killed"
    res = run_align("dpo", "--resume", *common, "run.name=cut")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr
    assert json.loads((cut / "summary.json").read_text())["resumed_from"].startswith("checkpoint-")
    res = run_align("dpo", *common, "run.name=whole")
    assert res.returncode == 0, res.stderr
    whole = tmp_path / "runs" / "whole" / "dpo"
    a, b = load_file(cut / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    def loss(d):
        return {m["step"]: m["loss"] for m in read_metrics(d) if "loss" in m}
    assert loss(cut) == pytest.approx(loss(whole), rel=1e-4) and max(loss(cut)) == 16
    def after(d):
        return json.loads((d / "eval.json").read_text())["after"]
    assert ((after(cut)["margin"], after(cut)["accuracy"])
            == pytest.approx((after(whole)["margin"], after(whole)["accuracy"]), abs=1e-5))


def test_cli_lists_and_documents_dpo():
    res = run_align("dpo", "--help")
    assert res.returncode == 0 and "dpo.beta" in res.stdout and "dpo.margin" in res.stdout and "ODPO" in res.stdout
    res = run_align("dpo", "--config", "configs/dpo.yaml", "dpo.bta=0.2")
    assert res.returncode == 2 and "did you mean 'dpo.beta'" in res.stderr


@pytest.mark.slow
def test_dpo_runs_on_smollm2_with_the_bundled_comparisons(tmp_path):
    """The real model and data, a few steps: the stage runs end to end (numbers: README, benchmarks)."""
    cfg = load_config(DPOConfig, REPO / "configs/dpo.yaml", [
        f"run.root={tmp_path}", "run.wandb=disabled", "data.sources=[{path: 'bundled:comparisons', limit: 12}]",
        "data.val_fraction=0.25", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.max_length=128",
        "dpo.margin=small"], stage="dpo")
    out = main(cfg)
    result = json.loads((out / "eval.json").read_text())
    assert result["before"]["accuracy"] == 0.5 and result["after"]["n"] == result["before"]["n"] > 0
    assert (json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "HuggingFaceTB/SmolLM2-135M-Instruct")
