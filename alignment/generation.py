"""Batched chat generation with the KV cache.

Prompts are rendered with the tokenizer's chat template, sorted by length so each batch pads as
little as possible, left-padded, generated with ``model.generate`` (KV cache on), and returned in
the caller's order. Used by the demo, rejection sampling, the annotation sampler and the evals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # types only: the foundation does not import the data layer at run time
    import torch

    from data.schemas import Message


@dataclass
class Generation:
    text: str  # decoded response, special tokens removed
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including EOS when the model stopped
    finished: bool  # the model emitted EOS before max_new_tokens


def encode_prompts(tokenizer: Any, prompts: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Chat-template token ids of each prompt, ending with the assistant header."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ids [B, T], attention_mask [B, T]) with sequences right-aligned."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int | None = None,
) -> list[Generation]:
    """Generate one response per prompt. ``temperature=0`` is greedy."""
    import torch

    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    eos_ids = model.generation_config.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids if eos_ids is not None else tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    results: list[Generation | None] = [None] * len(encoded)
    # synced_gpus=False: every caller generates with whole weights (ZeRO-3 gathers them first), so processes
    # with different numbers of prompts or tokens must not wait on each other (transformers syncs under ZeRO-3)
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                      eos_token_id=list(eos_set), use_cache=True, synced_gpus=False)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    generator_state = None
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = left_pad([encoded[i] for i in idx], pad_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
                new = out[:, ids.shape[1]:].tolist()
                for row, i in zip(new, idx):
                    resp: list[int] = []
                    finished = False
                    for tok in row:
                        if tok in eos_set:
                            resp.append(tok)
                            finished = True
                            break
                        if tok == pad_id:
                            break
                        resp.append(tok)
                    text = tokenizer.decode(resp, skip_special_tokens=True).strip()
                    results[i] = Generation(text, encoded[i], resp, finished)
    finally:
        if was_training:
            model.train()
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    return [r for r in results if r is not None]


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[Message] | str], **kwargs: Any) -> list[str]:
    """Convenience: prompts as strings or conversations, responses as strings."""
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    return [g.text for g in generate(model, tokenizer, convs, **kwargs)]


def generate_completions(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> list[str]:
    """Continue plain texts (no chat template): completion mode for TruthfulQA generation and ToxiGen.

    Batched and length-sorted like :func:`generate`; no special tokens are added to the texts. The
    continuation is cut at the first of ``stop`` (the stop string itself removed) and at EOS.
    """
    import torch

    encoded = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id,
                                  "eos_token_id": eos_ids, "use_cache": True,
                                  "synced_gpus": False}  # whole weights everywhere (see generate)
    if stop:
        gen_kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    results: list[str] = [""] * len(texts)
    rng_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = left_pad([encoded[i] for i in idx], pad_id)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
                for row, i in zip(out[:, ids.shape[1]:].tolist(), idx):
                    toks = []
                    for tok in row:
                        if tok in eos_ids or tok == pad_id:
                            break
                        toks.append(tok)
                    text = tokenizer.decode(toks, skip_special_tokens=True)
                    cuts = [text.index(s) for s in stop if s in text]
                    results[i] = text[: min(cuts)] if cuts else text
    finally:
        if was_training:
            model.train()
        if rng_state is not None:
            torch.random.set_rng_state(rng_state)
    return results
