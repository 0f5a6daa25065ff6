"""Per-GPU memory of PPO at 7B / 13B / 70B, computed from the model configs (no GPU, no weights).

    python -m benchmarks memory [--gpus 8] [--gpu-gib 80] [--rollout-per-gpu 8] [--seq 1024] [--micro-batch 1]

What PPO holds on each GPU follows ``alignment/ppo/experience.py::build_models`` and
``alignment/rl/actor_critic.py`` as they are today (``configs/ppo.yaml``: LoRA r=16 on every linear layer of the
policy, the critic a LoRA adapter + value head over the helpfulness reward model's weights, two reward models
of the policy's size, as Llama 2 used):

- **the engine's model states** (what DeepSpeed trains: the policy and the critic in one module): DeepSpeed's
  own estimators (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``) for the
  trainable parameters, plus the frozen weights inside the engine in bf16 (the LoRA base; under ZeRO-3 also the
  critic's own copy of its backbone, since ZeRO-3 partitions what it holds and cannot share it with the reward
  models): whole on every GPU under ZeRO-2, 1/N of them under ZeRO-3, none on the GPU with parameter offload;
- **the frozen models outside the engine**: both reward models in bf16, and with full fine-tuning the reference,
  a copy of the policy loaded in fp32 (``foundation.precision.master_dtype``: full fine-tuning loads fp32 master
  weights): whole on every GPU under ZeRO-2; under ZeRO-3 partitioned over the GPUs by DeepSpeed inference
  engines (``foundation.distributed.partition_frozen``); with parameter offload, in CPU memory;
- **the rollout KV cache**: K and V of every layer for ``--rollout-per-gpu`` sequences of ``--seq`` tokens, bf16;
- **the generation gather**: under ZeRO-3 the policy generates with its whole weights gathered on every GPU
  (``DeepSpeedModels.generating``; TRL's ``unwrap_model_for_generation`` does the same); under ZeRO-2 a LoRA
  policy generates with its adapters merged into new copies of the adapted weights (``merged_adapters``);
- **activations** of one micro-batch with activation checkpointing (on by default on a GPU): each layer's input
  kept for the backward pass plus one layer's working set recomputed, for the policy and the critic
  (Korthikanti et al. 2022's 34·s·b·h bytes per layer in bf16, without the attention-score term: SDPA does not
  materialise it), and the response logits in fp32.

The peak is the larger of the two phases: generation (model states, frozen models, KV cache, gathered policy)
and training (model states, frozen models, activations).

Parameter counts come from ``transformers``' Llama configs instantiated on the meta device and sized with
accelerate's ``calculate_maximum_sizes`` (a reward model: the backbone and a one-output head instead of the LM
head). The table is an estimate: no GPU has measured it, and it has not been checked against measured peaks.
"""

from __future__ import annotations

import argparse

GIB = 2**30
# Llama 2's published shapes (Touvron et al. 2023, Table 1; the Hub configs)
SHAPES: dict[str, dict[str, int]] = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
LAYOUTS = ("zero2", "zero3", "zero3_offload")


def sizes(shape: dict[str, int], lora_r: int = 16) -> dict[str, int]:
    """Parameter counts from a Llama config on the meta device: total, largest layer, LoRA (r on q,k,v,o,gate,up,down)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"tie_word_embeddings": False, **shape}
    cfg = LlamaConfig(**shape)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    total_bytes, (largest_bytes, _) = calculate_maximum_sizes(model)
    if cfg.tie_word_embeddings:  # accelerate counts the tied LM head as a tensor of its own
        total_bytes -= 2 * cfg.vocab_size * cfg.hidden_size
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = lora_r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q, o: h->h; k, v: h->kv; gate, up: h->i; down: i->h
    linear = (h * h * 2 + h * kv * 2 + h * i * 3) * cfg.num_hidden_layers  # the adapted projections of every layer
    return {"params": total_bytes // 2, "largest_layer": largest_bytes // 2, "lora": per_layer * cfg.num_hidden_layers,
            "hidden": h, "layers": cfg.num_hidden_layers, "kv_dim": kv, "vocab": cfg.vocab_size, "intermediate": i,
            "linear": linear, "embedding": cfg.vocab_size * h, "tied": bool(cfg.tie_word_embeddings), "lora_r": lora_r}


def engine_states(trainable: int, largest: int, gpus: int, layout: str) -> int:
    """GPU bytes of the trainable parameters' model states, by DeepSpeed's estimators (one node)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if layout == "zero2":
        return estimate_zero2_model_states_mem_needs(trainable, gpus, 1, cpu_offload=False)[1]
    offload = layout == "zero3_offload"
    return estimate_zero3_model_states_mem_needs(trainable, largest, gpus, 1, cpu_offload=offload,
                                                 cpu_offload_params=offload)[1]


def ppo_per_gpu(s: dict[str, int], *, method: str, layout: str, gpus: int, rollout: int, seq: int, micro: int,
                response: int) -> dict[str, float]:
    """GiB per GPU, by part, for PPO with ``method`` (lora | full) under ``layout``."""
    P = s["params"]
    critic_trainable = s["lora"] + s["hidden"] + 1  # critic LoRA + value head
    trainable = (s["lora"] if method == "lora" else P) + critic_trainable
    rm = P - s["vocab"] * s["hidden"] + s["hidden"]  # a reward model: the LM head replaced by a one-output score head
    frozen_in_engine = (P if method == "lora" else 0) + (rm if layout != "zero2" else 0)  # LoRA base; ZeRO-3: critic copy
    if layout == "zero2":
        frozen = 2 * frozen_in_engine
    elif layout == "zero3":
        frozen = 2 * frozen_in_engine // gpus
    else:
        frozen = 0  # parameters offloaded to the CPU, gathered a layer at a time (in the largest-layer buffer)
    outside = 2 * 2 * rm + (4 * P if method == "full" else 0)  # two bf16 reward models; full: an fp32 reference copy
    # the frozen models outside the engine (distributed.partition_frozen): whole under ZeRO-2, partitioned by
    # DeepSpeed inference engines under ZeRO-3, in CPU memory with the launch's parameter offload
    # (under ZeRO-2 each RM's embedding, identical to the policy's base when the RM trained a LoRA, is tied to it)
    held = {"zero2": outside - 2 * 2 * s["embedding"], "zero3": outside // gpus}.get(layout, 0)
    # generation gathers the whole policy on every GPU (ZeRO-3; TRL's unwrap_model_for_generation does the same)
    policy = 2 * P + 4 * s["lora"] if method == "lora" else 4 * P  # bf16 base + fp32 adapters, or fp32 weights
    gather = {"zero2": 0, "zero3": policy - policy // gpus}.get(layout, policy)
    # a LoRA policy generates with its adapters merged into new tensors, the originals kept (fast.merged_adapters;
    # not with ZeRO-3's partitioned parameters)
    merge = 2 * s["linear"] if method == "lora" and layout == "zero2" else 0
    kv = 2 * s["layers"] * s["kv_dim"] * 2 * rollout * seq
    act = 2 * (micro * seq * s["hidden"] * 2 * s["layers"] + 34 * seq * micro * s["hidden"])  # policy and critic
    logits = micro * response * s["vocab"] * 4
    engine = engine_states(trainable, s["largest_layer"], gpus, layout) + frozen
    parts = {"engine": engine, "reward_models_and_reference": held, "kv_cache": kv, "generation_gather": gather,
             "generation_merge": merge, "activations": act + logits}
    phases = {"generation": engine + held + kv + gather + merge, "training": engine + held + act + logits}
    out = {k: round(v / GIB, 1) for k, v in parts.items()}
    out["peak_phase"] = max(phases, key=phases.__getitem__)
    out["total"] = round(max(phases.values()) / GIB, 1)
    return out


def ppo_cpu(s: dict[str, int], *, rollout: int, prompt: int, response: int, micro: int, runtime: int) -> dict[str, int]:
    """Resident bytes of one PPO process on a CPU in each phase, as ``configs/ppo.yaml`` runs there (fp32, LoRA, one
    process: the critic's backbone is the helpfulness RM's, and the RMs' weights identical to the policy's base, the
    embeddings and norms, are tied to it; no activation checkpointing on a CPU). ``runtime``: Python, torch and the
    libraries before any model loads (PPO's ``memory/runtime_gb``). The same parts as :func:`ppo_per_gpu`, at fp32:

    - weights: the policy's base, both RMs' own weights (their projections and score heads), the adapters and the value
      head with their gradients and Adam's two moments;
    - generate: the KV cache (prompt + response tokens of every rollout), the adapted projections merged into new
      tensors for the duration (``foundation.generation.fast.merged_adapters``) and every linear weight prepacked for
      oneDNN (``small_batch_linears``: the merged projections and the LM head);
    - ref_and_values: a no-grad forward of a micro-batch with the entropy: four [micro, response + 1, vocab] fp32
      tensors at once (the model's logits, the temperature-scaled copy, the entropy's softmax and its product with
      the logits; ``alignment.rl.distributions``);
    - update: the policy's forward kept for backward (the critic's runs after the policy's backward, and is smaller):
      per token and layer 7h + 2·kv + 4i + 7r values (norm inputs and outputs, q, k, v, the attention output and its
      contiguous copy, the gate, its SiLU, up and their product, each LoRA's r-wide middle), and four [micro,
      response + 1, vocab] tensors (logits, log-softmax and their gradients).
    """
    b = 4
    h, kv, i, r, layers, vocab = s["hidden"], s["kv_dim"], s["intermediate"], s["lora_r"], s["layers"], s["vocab"]
    trainable = 2 * s["lora"] + h + 1  # the policy's and the critic's LoRA, the value head
    weights = b * s["params"] + 2 * b * (s["linear"] + h) + b * trainable
    seq = prompt + response
    logits = b * micro * (response + 1) * vocab
    parts = {
        "runtime": runtime, "weights": weights,
        "generate": b * 2 * layers * kv * rollout * seq + b * s["linear"] + b * (s["linear"] + s["embedding"]),
        "ref_and_values": 4 * logits,
        # the first update: the gradients and Adam's two moments are created in it
        "update": b * micro * seq * ((7 * h + 2 * kv + 4 * i + 7 * r) * layers + 2 * h) + 4 * logits + 3 * b * trainable,
    }
    loaded = runtime + weights
    return {**parts, "loaded": loaded, **{f"peak_{k}": loaded + parts[k] for k in ("generate", "ref_and_values", "update")}}


def check(argv: list[str]) -> dict:
    """``--check``: :func:`ppo_cpu` against PPO's measured peak per phase on this CPU (SmolLM2-135M, two reward
    models of its size, fixed-length prompts); the goal is agreement within 15%."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks memory --check")
    p.add_argument("--batch", type=int, default=8, help="rollouts per iteration = minibatch = micro-batch")
    p.add_argument("--micro-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--prompt-words", type=int, default=60)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args(argv)
    micro = a.micro_batch or a.batch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from foundation.models import builtin_path, load_tokenizer

    src = builtin_path("smollm2-135m")
    tok = load_tokenizer(str(src))
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for k, name in enumerate(("helpful", "safety")):  # reward models of the policy's size, their projections trained
            torch.manual_seed(k)
            rm = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32)
            with torch.no_grad():
                for n, w in rm.named_parameters():
                    if w.dim() == 2 and "embed" not in n:
                        w.add_(1e-3 * torch.randn_like(w))
            rm.save_pretrained(root / name)
            tok.save_pretrained(root / name)
            del rm
        words = " ".join(["alignment"] * a.prompt_words)
        rows = [{"prompt": f"Question {n}: explain {words}."} for n in range(64)]
        (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        prompt = max(len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)) for r in rows)
        args = [f"--config={repo / 'configs/ppo.yaml'}", "model.name=smollm2-135m", f"run.root={root}", "run.name=check",
                "run.wandb=disabled", f"reward.helpful={root / 'helpful'}", f"reward.safety={root / 'safety'}",
                "critic.init=reward_model", f"data.sources=[{{path: {root / 'prompts.jsonl'}}}]", "data.val_fraction=0.2",
                f"train.max_steps={a.steps}", f"ppo.rollout_batch_size={a.batch}", f"ppo.minibatch_size={a.batch}",
                f"ppo.micro_batch_size={micro}", f"sampling.max_new_tokens={a.new_tokens}", f"sampling.batch_size={a.batch}",
                "eval.every=0", f"eval.max_prompts={a.batch}", "eval.keep_best=false"]
        # glibc keeps freed memory for reuse, so a later phase's resident set would include what earlier ones
        # freed; allocations of 64 KiB and more mapped on their own go back to the system when freed, and the
        # resident set then follows what is alive (what the estimate counts)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        res = subprocess.run([sys.executable, "-m", "alignment.cli", "ppo", *args], cwd=repo, capture_output=True, text=True,
                             env=env)
        if res.returncode != 0:
            raise SystemExit(f"align ppo failed:\n{res.stderr[-4000:]}")
        summary = json.loads((root / "check" / "ppo" / "summary.json").read_text())
    s = sizes({k: getattr(AutoConfig.from_pretrained(src), k) for k in (*SHAPES["7B"], "tie_word_embeddings")})
    runtime = int(summary["memory/runtime_gb"] * GIB)
    est = ppo_cpu(s, rollout=a.batch, prompt=prompt, response=a.new_tokens, micro=micro, runtime=runtime)
    rows = []
    # each phase's first visit (iteration 1, in order): later visits read what the allocator kept from earlier phases
    for phase, key in (("loaded", "memory/loaded_gb"), ("generate", "memory/first_generate_gb"),
                       ("ref_and_values", "memory/first_ref_and_values_gb"), ("update", "memory/first_update_gb")):
        measured = summary[key]
        estimate = est["loaded" if phase == "loaded" else f"peak_{phase}"] / GIB
        rows.append({"phase": phase, "estimate_gib": round(estimate, 3), "measured_gib": round(measured, 3),
                     "error": round(estimate / measured - 1, 3)})
    peak = max(r["estimate_gib"] for r in rows)
    rows.append({"phase": "peak (whole run)", "estimate_gib": round(peak, 3),
                 "measured_gib": round(summary["memory/peak_rss_gb"], 3),
                 "error": round(peak / summary["memory/peak_rss_gb"] - 1, 3)})
    rows_later = {k.split("/", 1)[1]: round(v, 3) for k, v in summary.items()
                  if k.startswith("memory/") and not k.startswith("memory/first_")}
    from benchmarks.common import table

    print(table([[r["phase"], r["estimate_gib"], r["measured_gib"], f"{100 * r['error']:+.1f}%"] for r in rows],
                ["phase", "estimate GiB", "measured GiB", "error"]))
    return {"check": {"args": vars(a), "prompt_tokens": prompt, "runtime_gib": round(runtime / GIB, 3),
                      "weights_mib": {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("weights_mib/")},
                      "parts_gib": {k: round(v / GIB, 3) for k, v in est.items()}, "rows": rows,
                      "measured_over_the_run_gib": rows_later,
                      # "loaded" is not judged: safetensors weights become resident only once a forward touches them
                      "within_15pct": all(abs(r["error"]) <= 0.15 for r in rows if r["phase"] != "loaded")}}


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--rollout-per-gpu", type=int, default=8, help="rollout sequences generated at once on a GPU")
    p.add_argument("--seq", type=int, default=1024, help="prompt + response tokens")
    p.add_argument("--response", type=int, default=512, help="response tokens (logits kept in fp32)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--check", action="store_true", help="also run PPO on SmolLM2 on this CPU and compare its measured "
                   "peak per phase with the same estimate at fp32 (goal: within 15%%); options after --check go to it")
    check_argv = argv[argv.index("--check") + 1:] if "--check" in argv else []
    a = p.parse_args(argv[:argv.index("--check") + 1] if "--check" in argv else argv)
    rows = []
    for name, shape in SHAPES.items():
        s = sizes(shape)
        for method in ("lora", "full"):
            for layout in LAYOUTS:
                est = ppo_per_gpu(s, method=method, layout=layout, gpus=a.gpus, rollout=a.rollout_per_gpu, seq=a.seq,
                                  micro=a.micro_batch, response=a.response)
                rows.append({"model": name, "params_b": round(s["params"] / 1e9, 2), "method": method, "layout": layout,
                             **est, "fits": est["total"] <= a.gpu_gib})
    from benchmarks.common import table

    print(table([[r["model"], r["method"], r["layout"], r["engine"], r["reward_models_and_reference"], r["kv_cache"],
                  r["generation_gather"], r["activations"], r["total"], r["peak_phase"], "yes" if r["fits"] else "no"]
                 for r in rows],
                ["policy", "PPO", "layout", "engine GiB", "RMs+ref GiB", "KV GiB", "gen. gather GiB", "act GiB",
                 "peak GiB", "peak in", f"fits {a.gpu_gib:.0f}"]))
    out = {"args": vars(a), "rows": rows}
    if a.check:
        out.update(check(check_argv))
    return out
