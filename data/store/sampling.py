"""Sampling the pairs a round's annotators compare: K responses of one or two policies per prompt, paired.

Used by ``align annotate sample`` and the round's ``sample`` step. The annotation layer: it reads
models through the foundation (``foundation.models``, ``foundation.generation``) and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sample_pairs(models: Sequence[str], prompts: Sequence[Any], *, temperatures: Sequence[float], top_p: float = 1.0,
                 max_new_tokens: int = 256, batch_size: int = 8, seed: int = 0, samples: int = 2,
                 pairs_per_prompt: int | None = None) -> tuple[list[dict], int]:
    """``samples`` responses per prompt, paired: response i comes from ``models[i % len(models)]`` at
    ``temperatures[i % len(temperatures)]`` with seed ``seed + i`` (a model is loaded once), and every two distinct
    non-empty responses of a prompt make a task: K responses give up to K(K-1)/2 pairs, as Llama 2 and Gao et al.
    label several answers per prompt (``pairs_per_prompt`` keeps that many of them, drawn with ``seed``).

    Returns (task rows for the queue, pairs dropped because a response was empty or repeated another). With the
    default ``samples=2`` a prompt gives one pair: ``models[0]`` at ``temperatures[0]`` against ``models[1]``."""
    import itertools
    import random

    from foundation.generation import generate
    from foundation.models import load_causal_lm, load_tokenizer

    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a pair needs two responses), got {samples}")
    if pairs_per_prompt is not None and pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1 or None, got {pairs_per_prompt}")
    if not models or not temperatures:
        raise ValueError("sample_pairs needs at least one model and one temperature")
    convs = [p.messages for p in prompts]
    loaded: dict[str, tuple[Any, Any]] = {}
    sources, outs = [], []
    for i in range(samples):
        name, temp = models[i % len(models)], temperatures[i % len(temperatures)]
        if name not in loaded:
            loaded[name] = (load_causal_lm(name), load_tokenizer(name))
        model, tok = loaded[name]
        outs.append(generate(model, tok, convs, max_new_tokens=max_new_tokens, temperature=temp, top_p=top_p,
                             batch_size=batch_size, seed=seed + i))
        sources.append({"model": name, "temperature": temp})
    rng = random.Random(seed)
    rows, dropped = [], 0
    possible = samples * (samples - 1) // 2
    for n, p in enumerate(prompts):
        # a model can decode a NUL character (a small or random model does): never meaningful, and the task
        # queue refuses it (PostgreSQL text cannot hold it), so it is dropped from sampled text here
        answers = [(i, out[n].text.replace("\x00", ""), out[n].finished) for i, out in enumerate(outs)]
        kept, seen = [], set()
        for i, text, finished in answers:
            if text.strip() and text.strip() not in seen:
                seen.add(text.strip())
                kept.append((i, text, finished))
        pairs = list(itertools.combinations(kept, 2))
        dropped += possible - len(pairs)
        if pairs_per_prompt is not None and len(pairs) > pairs_per_prompt:
            pairs = sorted(rng.sample(pairs, pairs_per_prompt), key=lambda ab: (ab[0][0], ab[1][0]))
        for (i, text_a, fin_a), (j, text_b, fin_b) in pairs:
            meta: dict[str, Any] = {"finished_a": fin_a, "finished_b": fin_b}
            if samples > 2:
                meta.update(sample_a=i, sample_b=j, samples=samples)
            if p.id:
                meta["prompt_id"] = p.id
            rows.append({"prompt": p.messages, "response_a": text_a, "response_b": text_b, "category": p.category,
                         "source_a": dict(sources[i]), "source_b": dict(sources[j]), "meta": meta})
    return rows, dropped
