"""The SFT stage end to end on the tiny model: outputs, learning, resume, adapters, merge, masking."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foundation.config import load_config
from foundation.runs import OutputExistsError, read_metrics
from alignment.sft import SFTConfig, build_trainer, main

from conftest import REPO, run_align, write_jsonl


def make_cfg(tmp_path: Path, data: Path, *overrides: str) -> SFTConfig:
    return load_config(SFTConfig, REPO / "configs/sft.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled",
        f"data.sources=[{{path: {data}}}]", "train.batch_size=4", "train.grad_accum=1", "data.sample_prompts=2",
        "data.sample_max_new_tokens=8", *overrides,
    ], stage="sft")


def test_sft_writes_outputs_and_learns(tmp_path, tiny_model, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    cfg = make_cfg(tmp_path, data, "adapter.method=full", "train.max_steps=40", "train.lr=3e-3", "train.logging_steps=10",
                   "train.eval_steps=20", "train.warmup_ratio=0")
    out = main(cfg)
    assert out == tmp_path / "runs" / "default" / "sft"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.jsonl", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/chat_template.jinja"):
        assert (out / name).is_file(), name
    assert load_config(SFTConfig, out / "config.yaml", stage="sft") == cfg  # resolved config loads back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 40
    assert summary["eval_perplexity"] == pytest.approx(torch.exp(torch.tensor(summary["eval_loss"])).item(), rel=1e-5)
    metrics = read_metrics(out)
    first_loss = next(m["loss"] for m in metrics if "loss" in m)  # step 1: an untrained model, ~ln(vocab)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1] < first_loss - 2.0  # it learned the arithmetic answers
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("reference" in s for s in samples)


def test_existing_output_is_never_overwritten(tmp_path, tiny_model, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    cfg = make_cfg(tmp_path, data, "train.max_steps=1")
    out = main(cfg)
    before = (out / "model" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="--resume"):
        main(cfg)
    assert (out / "model" / "adapter_model.safetensors").read_bytes() == before
    other = make_cfg(tmp_path, data, "train.max_steps=1", "run.name=fresh")
    with pytest.raises(OutputExistsError, match="no run to resume"):
        main(other, resume=True)


def test_assistant_only_loss_masks_user_tokens(tmp_path, tiny_model, sft_rows):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    cfg = make_cfg(tmp_path, data)
    from alignment.sft import load_data

    train, val = load_data(cfg.data, 0)
    trainer = build_trainer(cfg, tmp_path, train, val)
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    trained = tok.decode([t for t, lab in zip(batch["input_ids"][0].tolist(), labels.tolist()) if lab != -100])
    expected = train[0].messages[-1]["content"] + "<|im_end|>"
    assert trained == expected  # only the assistant's answer and its end-of-turn token carry loss


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_adapter_methods_train_and_reload(tmp_path, tiny_model, sft_rows, method):
    from foundation.generation import generate_texts
    from foundation.models import load_causal_lm, load_tokenizer

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    out = main(make_cfg(tmp_path, data, f"adapter.method={method}", "train.max_steps=3", "adapter.num_virtual_tokens=4"))
    adapter_cfg = json.loads((out / "model" / "adapter_config.json").read_text())
    from foundation.models import builtin_path

    assert adapter_cfg["base_model_name_or_path"] == str(builtin_path("tiny-llama"))
    assert adapter_cfg["peft_type"] == {"lora": "LORA", "prompt_tuning": "PROMPT_TUNING"}[method]
    model, tok = load_causal_lm(str(out)), load_tokenizer(str(out))
    assert len(generate_texts(model, tok, ["What is 3 plus 4?"], max_new_tokens=4)) == 1


def test_merge_command_folds_lora_into_full_checkpoint(tmp_path, tiny_model, sft_rows):
    from foundation.models import load_causal_lm

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    out = main(make_cfg(tmp_path, data, "adapter.method=lora", "train.max_steps=5", "train.lr=1e-2"))
    merged_dir = tmp_path / "merged"
    res = run_align("merge", "--adapter", str(out), "--out", str(merged_dir))
    assert res.returncode == 0, res.stderr
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged, via_adapter = load_causal_lm(str(merged_dir)), load_causal_lm(str(out))
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, via_adapter(ids).logits, atol=1e-5)
    res = run_align("merge", "--adapter", str(out), "--out", str(merged_dir))
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr


def test_kill_and_resume_continues_from_last_checkpoint(tmp_path, tiny_model, sft_rows):
    """SIGKILL mid-run, then --resume: it continues from the newest checkpoint and ends where an
    uninterrupted run of the same seed ends."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows * 5)
    common = ["--config", str(REPO / "configs/sft.yaml"), "model.name=tiny-llama", "run.wandb=disabled",
              f"data.sources=[{{path: {data}}}]",
              "train.max_steps=60", "train.save_steps=10", "train.batch_size=2", "train.grad_accum=1", "data.sample_prompts=0",
              "train.logging_steps=1"]
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "sft", *common, f"run.root={runs}", "run.name=cut"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = runs / "cut" / "sft" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "checkpoint-20" / "trainer_state.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (runs / "cut" / "sft" / "model").exists(), "the run finished before it was killed"
    res = run_align("sft", "--resume", *common, f"run.root={runs}", "run.name=cut")
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stderr and "checkpoint-" in res.stderr
    summary = json.loads((runs / "cut" / "sft" / "summary.json").read_text())
    assert summary["global_step"] == 60 and summary["resumed_from"].startswith("checkpoint-")
    steps = [m["step"] for m in read_metrics(runs / "cut" / "sft") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one clean curve, no repeated steps

    res = run_align("sft", *common, f"run.root={runs}", "run.name=whole")
    assert res.returncode == 0, res.stderr
    cut = load_file(runs / "cut" / "sft" / "model" / "adapter_model.safetensors")
    whole = load_file(runs / "whole" / "sft" / "model" / "adapter_model.safetensors")
    assert cut.keys() == whole.keys()
    for k in cut:
        assert torch.allclose(cut[k], whole[k], atol=1e-5), k
    loss = lambda run: {m["step"]: m["loss"] for m in read_metrics(runs / run / "sft") if "loss" in m}  # noqa: E731
    assert loss("cut") == pytest.approx(loss("whole"), rel=1e-4)


def test_cli_typo_is_rejected_with_suggestion():
    res = run_align("sft", "--config", "configs/sft.yaml", "trian.max_steps=3")
    assert res.returncode == 2
    assert "trian" in res.stderr and "did you mean 'train'" in res.stderr


def test_cli_help_lists_stages_and_fields():
    res = run_align("--help")
    assert res.returncode == 0 and "sft" in res.stdout
    res = run_align("sft", "--help")
    assert res.returncode == 0 and "train.max_steps" in res.stdout and "assistant_only_loss" in res.stdout


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_plain_loss_equals_trl_loss(tmp_path, tiny_model, sft_rows, method):
    """The default loss (token_metrics=false: cross-entropy from the logits) is TRL's loss (computed
    through its chunked LM head with the entropy/accuracy metrics), with and without num_items_in_batch."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    from alignment.sft import load_data

    losses = {}
    for metrics in (False, True):
        cfg = make_cfg(tmp_path, data, f"adapter.method={method}", f"token_metrics={str(metrics).lower()}")
        train, val = load_data(cfg.data, 0)
        torch.manual_seed(0)  # the same adapter initialisation on both sides
        trainer = build_trainer(cfg, tmp_path / str(metrics), train, val)
        assert type(trainer).__name__ == ("SFTTrainer" if metrics else "PlainLossSFTTrainer")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        trainer.model.eval()
        with torch.no_grad():
            losses[metrics] = [float(trainer.compute_loss(trainer.model, dict(batch))),
                               float(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(50)))]
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)
