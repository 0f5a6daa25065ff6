"""Sampling the pairs a round's annotators compare: two responses of one or two policies per prompt.

Used by ``align annotate sample`` and the round's ``sample`` step. The annotation layer: it reads
models through the foundation (``alignment.models``, ``alignment.generation``) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sample_pairs(models: Sequence[str], prompts: Sequence[Any], *, temperatures: Sequence[float], top_p: float = 1.0,
                 max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0) -> tuple[list[dict], int]:
    """Two responses per prompt (``models[i]`` at ``temperatures[i]``, i = 0, 1; the same model is
    loaded once). Returns (task rows for the queue, pairs dropped for an empty or identical response)."""
    from alignment.generation import generate
    from alignment.models import load_causal_lm, load_tokenizer

    convs = [p.messages for p in prompts]
    loaded: dict[str, tuple[Any, Any]] = {}
    outs = []
    for i, (name, temp) in enumerate(zip(models, temperatures)):
        if name not in loaded:
            loaded[name] = (load_causal_lm(name), load_tokenizer(name))
        model, tok = loaded[name]
        outs.append(generate(model, tok, convs, max_new_tokens=max_new_tokens, temperature=temp, top_p=top_p,
                             batch_size=batch_size, seed=seed + i))
    rows, dropped = [], 0
    for p, ga, gb in zip(prompts, outs[0], outs[1]):
        # a model can decode a NUL character (a small or random model does): never meaningful, and the task
        # queue refuses it (PostgreSQL text cannot hold it), so it is dropped from sampled text here
        text_a, text_b = ga.text.replace("\x00", ""), gb.text.replace("\x00", "")
        if not text_a.strip() or not text_b.strip() or text_a.strip() == text_b.strip():
            dropped += 1
            continue
        meta = {"finished_a": ga.finished, "finished_b": gb.finished}
        if p.id:
            meta["prompt_id"] = p.id
        rows.append({"prompt": p.messages, "response_a": text_a, "response_b": text_b, "category": p.category,
                     "source_a": {"model": models[0], "temperature": temperatures[0]},
                     "source_b": {"model": models[1], "temperature": temperatures[1]}, "meta": meta})
    return rows, dropped
