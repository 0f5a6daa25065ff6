"""Generation: every sampler's answers come from here (PPO and GRPO rollouts, rejection sampling,
pair sampling for annotation, the evaluations' answers and continuations, ``align generate``).

- :func:`generate`: chat prompts (message lists) → :class:`Generation` per prompt.
- :func:`generate_texts`: the same from strings, returning the texts.
- :func:`generate_completions`: plain-text continuation (no chat template), cut at stop strings.

All three run :class:`~foundation.generation.engine.Engine`, the shared decoding loop (see its module
for what makes it fast), and return the call's :class:`GenerationStats` on ``.stats`` of the list
they return, so a sampler can log ``time/generate`` and tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from foundation.generation.batching import left_pad
from foundation.generation.engine import Engine, GenerationStats, Output, SamplingParams

if TYPE_CHECKING:  # types only: the foundation does not import the data layer at run time

    from data.schemas import Message

__all__ = ["Engine", "Generation", "GenerationStats", "Generations", "Output", "SamplingParams", "encode_prompts",
           "generate", "generate_completions", "generate_texts", "left_pad"]


@dataclass
class Generation:
    text: str  # decoded response, special tokens removed
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including EOS when the model stopped
    finished: bool  # the model emitted EOS before max_new_tokens


class Generations(list):
    """A list of results with the call's :class:`GenerationStats` on ``.stats``."""

    stats: GenerationStats

    def __init__(self, items: Sequence[Any], stats: GenerationStats) -> None:
        super().__init__(items)
        self.stats = stats


def encode_prompts(tokenizer: Any, prompts: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Chat-template token ids of each prompt, ending with the assistant header."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out




def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int | None = None,
    no_repeat_ngram_size: int = 0,
    eos_bias: float = 0.0,
    sampler: str = "inverse_cdf",
    sync: Any = None,
) -> Generations:
    """Generate one response per prompt. ``temperature=0`` is greedy.

    ``seed`` fixes the draws of this call (torch's global generator is not touched); without it
    they come from torch's global generator. ``eos_bias`` is added to the EOS logits at every step: greedy answers
    then end sooner or at the same token, and agree with the unbiased ones up to where they end (a length control).
    ``sync`` (``foundation.distributed.forward_sync``): generate from partitioned ZeRO-3 weights, every process
    taking part in every forward (see ``foundation.generation.engine``)."""
    encoded = encode_prompts(tokenizer, prompts)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            no_repeat_ngram_size=no_repeat_ngram_size, eos_bias=eos_bias,
                            sampler=sampler)  # type: ignore[arg-type]
    outputs, stats = Engine(model, tokenizer, batch_size=batch_size, sync=sync).run(encoded, params)
    gens = [Generation(tokenizer.decode(o.response_ids, skip_special_tokens=True).strip(), ids, o.response_ids, o.finished)
            for ids, o in zip(encoded, outputs)]
    return Generations(gens, stats)


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
) -> Generations:
    """Continue plain texts (no chat template): completion mode for TruthfulQA generation and ToxiGen.

    No special tokens are added to the texts. The continuation is cut at the first of ``stop`` (the
    stop string itself removed) and at EOS (the tokenizer's EOS counts too)."""
    encoded = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    eos = model.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop))
    outputs, stats = Engine(model, tokenizer, batch_size=batch_size, eos_token_ids=eos_ids).run(encoded, params)
    results = []
    for o in outputs:
        toks = [t for t in o.response_ids if t not in eos_ids]
        text = tokenizer.decode(toks, skip_special_tokens=True)
        cuts = [text.index(s) for s in stop if s in text]
        results.append(text[: min(cuts)] if cuts else text)
    return Generations(results, stats)
