"""Model resolver: built-ins, cache atomicity under concurrent first use, folders, adapters, dtypes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from foundation import models, precision
from foundation.generation import generate, left_pad


def test_tiny_llama_has_chat_template_with_generation_markers(tiny_model):
    tok = models.load_tokenizer(tiny_model)
    assert "{% generation %}" in tok.chat_template
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assistant = tok.decode([i for i, m in zip(ids, mask) if m])
    assert assistant == "Hello.<|im_end|>"  # the answer and its end-of-turn token, nothing of the user turn


def test_tiny_llama_is_a_2_layer_llama(tiny_model):
    m = models.load_causal_lm(tiny_model)
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 2
    assert m.dtype == torch.float32 and m.device.type == "cpu"


def test_concurrent_first_use_builds_one_intact_checkpoint(tmp_path):
    """Two processes build tiny-llama into an empty cache at the same moment; both load it."""
    start = time.time() + 8  # both processes are importing by then and start together
    script = textwrap.dedent(f"""
        import time, os
        from foundation import models
        while time.time() < {start}: time.sleep(0.01)
        p = models.builtin_path("tiny-llama")
        m = models.load_causal_lm("tiny-llama")
        print(p, sum(x.numel() for x in m.parameters()))
    """)
    env = {"ALIGN_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1]) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(lines) == 1  # same folder, same parameter count
    entries = sorted(x.name for x in tmp_path.iterdir())
    assert entries == ["tiny-llama-v1"]  # no temp folders left behind
    assert (tmp_path / "tiny-llama-v1" / "model.safetensors").is_file()


def test_resolve_stage_output_and_adapter_chain(tmp_path, tiny_model):
    import json

    from peft import LoraConfig, get_peft_model

    base = models.load_causal_lm(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)  # a non-zero adapter so merging changes the weights
    stage = tmp_path / "sft"
    peft_model.save_pretrained(stage / "model")
    cfg = json.loads((stage / "model" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-llama"
    (stage / "model" / "adapter_config.json").write_text(json.dumps(cfg))
    r = models.resolve(str(stage))
    assert r.adapters == [str(stage / "model")] and r.path == str(models.builtin_path("tiny-llama"))
    merged = models.load_causal_lm(str(stage))
    q_base = base.get_base_model().model.layers[0].self_attn.q_proj.weight if hasattr(base, "get_base_model") else None
    fresh = models.load_causal_lm(tiny_model)
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, fresh.model.layers[0].self_attn.q_proj.weight)
    assert torch.allclose(merged.model.layers[0].self_attn.k_proj.weight, fresh.model.layers[0].self_attn.k_proj.weight)
    del q_base


def test_resolve_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        models.resolve("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_id_fails_clearly_offline():
    with pytest.raises(RuntimeError, match="Hub is unreachable"):
        models.load_tokenizer("someone/definitely-not-a-model-xyz")


def test_dtype_selection():
    assert precision.select_dtype("auto", "cpu") == torch.float32
    assert precision.select_dtype("bfloat16", "cpu") == torch.bfloat16


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_generation_matches_one_by_one(tiny_model):
    """Length-sorted, left-padded batches give the same greedy output as unbatched generation."""
    tok, model = models.load_tokenizer(tiny_model), models.load_causal_lm(tiny_model)
    prompts = [[{"role": "user", "content": t}] for t in ["Hi", "What is the capital of France, please?", "2+2?"]]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert [g.response_ids for g in batched] == [g.response_ids for g in single]
    assert all(len(g.response_ids) <= 8 for g in batched)


def test_weights_trained_in_full_load_in_fp32_where_auto_would_be_bf16(monkeypatch):
    """Issue 24 (F): on a GPU `auto` loads bf16, and full fine-tuning then ran AdamW on bf16 weights (no fp32
    master copy). Weights that train in full now load in fp32 there; bf16 compute comes from train.precision's
    autocast. LoRA (a frozen bf16 base), frozen models and explicit dtypes are unchanged."""
    import torch

    monkeypatch.setattr(precision, "select_dtype", lambda dtype="auto", device=None: torch.bfloat16 if dtype == "auto"
                        else getattr(torch, dtype))  # as on a GPU with bf16
    assert precision.master_dtype("auto", "full", "cuda") == "float32"
    assert precision.master_dtype("auto", "lora", "cuda") == "auto"
    assert precision.master_dtype("auto", "frozen", "cuda") == "auto"
    assert precision.master_dtype("bfloat16", "full", "cuda") == "bfloat16"  # asked for explicitly
    monkeypatch.undo()
    assert precision.master_dtype("auto", "full", "cpu") == "auto"  # fp32 on a CPU anyway


def test_full_sft_with_bf16_autocast_keeps_fp32_weights_and_optimizer_state(tmp_path, tiny_model):
    """The optimiser's state is fp32 when training runs in bf16 autocast (train.precision=bf16)."""
    from foundation.config import load_config
    from alignment.sft import SFTConfig, build_trainer, load_data

    cfg = load_config(SFTConfig, REPO / "configs/sft.yaml", [
        "model.name=tiny-llama", "adapter.method=full", "train.precision=bf16", "train.max_steps=1", "train.batch_size=2",
        "train.grad_accum=1", "data.sample_prompts=0", "data.sources=[{path: 'bundled:sft', limit: 8}]", "run.wandb=disabled",
        f"run.root={tmp_path}"], stage="sft")
    trainer = build_trainer(cfg, tmp_path / "out", *load_data(cfg.data, 0))
    trainer.train()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_inference_precision_block_sets_the_cpu_dtype_of_auto_loads(monkeypatch, tiny_model):
    """``inference_precision`` (a round's ``eval.dtype``): inside the block a model loaded with dtype auto on the CPU
    loads in the block's dtype, outside it in fp32; an ``auto`` block is bf16 on a CPU with native bf16 and fp32 on
    any other; bf16 is refused on a CPU that only emulates it; a typo names the key."""
    assert precision.cpu_native_bf16("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_native_bf16("flags\t\t: fpu sse amx_bf16 amx_tile\n")
    assert not precision.cpu_native_bf16("flags\t\t: fpu sse avx2 avx512f\n") and not precision.cpu_native_bf16("")
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    with precision.inference_precision("bfloat16") as resolved:
        assert resolved == "bfloat16" and precision.select_dtype("auto", "cpu") == torch.bfloat16
        assert precision.select_dtype("float32", "cpu") == torch.float32  # an explicit dtype wins
        with precision.inference_precision("float32"):
            assert precision.select_dtype("auto", "cpu") == torch.float32  # the innermost block wins
        with precision.inference_precision("auto") as auto:
            assert auto == "bfloat16" and precision.select_dtype("auto", "cpu") == torch.bfloat16
        assert next(models.load_causal_lm(tiny_model).parameters()).dtype == torch.bfloat16
    assert precision.select_dtype("auto", "cpu") == torch.float32
    assert next(models.load_causal_lm(tiny_model).parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype: must be one of auto, float32, bfloat16, got 'bf16'"):
        with precision.inference_precision("bf16"):
            pass
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CPU with native bf16"):
        with precision.inference_precision("bfloat16"):
            pass
    with precision.inference_precision("auto") as auto:  # emulated bf16 would be slower: auto is fp32 there
        assert auto == "float32" and precision.select_dtype("auto", "cpu") == torch.float32
    assert precision.select_dtype("auto", "cpu") == torch.float32  # a refused block leaves nothing behind
