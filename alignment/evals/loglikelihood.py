"""Summed log-probabilities of continuations given contexts, the way lm-evaluation-harness does it.

    scores = score_continuations(model, tok, [(context, continuation), ...], shared_prefix=PRIMER)

Conventions copied from lm-evaluation-harness's ``HFLM`` (``lm_eval/models/huggingface.py``) so a
number computed here is the number lm-eval reports:

1. ``_encode_pair``: trailing whitespace of the context moves to the front of the continuation;
   ``whole = encode(context + continuation)``, ``ctx = encode(context)``, and the continuation
   tokens are ``whole[len(ctx):]`` (tokenising the two together keeps BPE merges at the join).
2. ``tok_encode`` for causal LMs calls ``tokenizer.encode(text, add_special_tokens=False)``: no BOS
   token, even for Llama tokenizers that add one by default (lm-eval's ``add_bos_token=False``
   default; it flips it only for Gemma). ``add_bos=True`` here is lm-eval's ``add_bos_token=True``.
3. An empty context is replaced by the EOS token (lm-eval's prefix token).
4. Inputs longer than the model's window keep their last ``max_length + 1`` tokens.
5. Score = sum over continuation tokens of ``log_softmax(logits)[token]`` in fp32; no length
   normalisation.

Departure, for speed only: when every request starts with the same ``shared_prefix`` (TruthfulQA's
6-shot primer), the prefix is run through the model once and its key/value cache is reused for
every batch, so each request computes only its own suffix. A request whose tokens do not start
with the prefix's tokens (a BPE merge across the join) falls back to the full computation, so the
result is the same up to float rounding (checked in tests/test_eval_truthfulqa.py). Identical
(context, continuation) pairs are scored once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def encode(tokenizer: Any, text: str, *, add_bos: bool = False) -> list[int]:
    """Token ids without special tokens (lm-eval's ``tok_encode`` for causal LMs); BOS first if asked."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_pair(tokenizer: Any, context: str, continuation: str, *, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the way lm-eval's ``HFLM._encode_pair`` splits them."""
    if context == "":
        eos = tokenizer.eos_token_id
        return [eos], encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation, add_bos=add_bos)
    ctx = encode(tokenizer, context, add_bos=add_bos)
    return ctx, whole[len(ctx):]


def continuation_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of ``targets`` under ``logits``.

    logits: [T, V] — row t holds the model's prediction for targets[t].
    targets: [T] token ids.
    returns: scalar tensor, sum_t log_softmax(logits[t])[targets[t]] computed in fp32.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).sum()


def _max_length(model: Any, tokenizer: Any = None) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, attr, None)
        if value:
            return int(value)
    tml = getattr(tokenizer, "model_max_length", None)
    return int(tml) if tml and tml < 1_000_000 else 2048


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    import torch

    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def _prefix_cache(model: Any, prefix_ids: list[int], device: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) [1, heads, P, head_dim] of the shared prefix."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True)
    cache = out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def _expanded_cache(model: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> Any:
    from transformers import DynamicCache

    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv], config=model.config)


def score_continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    shared_prefix: str | None = None,
    add_bos: bool = False,
    progress: Any = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context (lm-eval's ``loglikelihood``).

    pairs: [(context, continuation)] strings. Returns one float per pair, in order.
    shared_prefix: a string every context starts with (e.g. a few-shot primer) whose KV cache is
    computed once and reused; None = no cache, full sequences batched.
    progress: optional callable(done, total) called after each batch.
    """
    unique: dict[tuple[str, str], int] = {}
    for pair in pairs:
        unique.setdefault((pair[0], pair[1]), len(unique))
    requests = []
    for context, continuation in unique:
        ctx, cont = encode_pair(tokenizer, context, continuation, add_bos=add_bos)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        requests.append((ctx, cont))
    prefix_ids = encode(tokenizer, shared_prefix.rstrip(), add_bos=add_bos) if shared_prefix else None
    scores = score_tokens(model, requests, batch_size=batch_size, prefix_ids=prefix_ids, pad_id=tokenizer.pad_token_id,
                          max_length=_max_length(model, tokenizer), progress=progress)
    return [scores[unique[(c, x)]] for c, x in pairs]


def score_tokens(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    prefix_ids: Sequence[int] | None = None,
    pad_id: int | None = 0,
    max_length: int | None = None,
    progress: Any = None,
) -> list[float]:
    """Summed log-probability of ``cont`` after ``ctx`` for token-id pairs [(ctx ids, cont ids)].

    With ``prefix_ids``, requests whose tokens start with them (and go on past them before the
    continuation) reuse one KV cache of the prefix; the others are computed in full.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    max_len = max_length or _max_length(model, None)
    pad = pad_id if pad_id is not None else 0
    reqs = []  # (whole ids, len(ctx))
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("every request needs at least one context and one continuation token")
        reqs.append((list(ctx) + list(cont), len(ctx)))
    prefix = list(prefix_ids or [])
    P = len(prefix)

    def cached(i: int) -> bool:
        whole, n_ctx = reqs[i]
        return P > 0 and n_ctx > P and len(whole) <= max_len + 1 and whole[:P] == prefix

    with_cache = [i for i in range(len(reqs)) if cached(i)]
    without = [i for i in range(len(reqs)) if not cached(i)]
    if P and without:
        log.info("%d of %d requests do not start with the shared prefix's tokens; scored without the cache", len(without),
                 len(reqs))
    scores = [0.0] * len(reqs)
    total, done = len(reqs), 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # longest first (lm-eval's order): memory problems show at once, batches pad little
            if with_cache:
                kv = _prefix_cache(model, prefix, device)
                order = sorted(with_cache, key=lambda i: -len(reqs[i][0]))
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    ids = _right_pad([reqs[i][0][P:-1] for i in idx], pad).to(device)
                    cache = _expanded_cache(model, kv, len(idx))
                    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
                    for row, i in enumerate(idx):
                        whole, n_ctx = reqs[i]
                        # input position j (absolute P + j) predicts token P + j + 1
                        first, last = n_ctx - 1 - P, len(whole) - 2 - P
                        target = torch.tensor(whole[n_ctx:], device=device)
                        scores[i] = float(continuation_logprob(logits[row, first:last + 1], target))
                    del logits, cache
                    done += len(idx)
                    if progress:
                        progress(done, total)
            order = sorted(without, key=lambda i: -len(reqs[i][0]))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                inputs = [reqs[i][0][-(max_len + 1):][:-1] for i in idx]  # lm-eval's left truncation
                ids = _right_pad(inputs, pad).to(device)
                logits = model(input_ids=ids).logits
                for row, i in enumerate(idx):
                    whole, n_ctx = reqs[i]
                    n_cont, n_in = len(whole) - n_ctx, len(inputs[row])
                    target = torch.tensor(whole[n_ctx:], device=device)
                    scores[i] = float(continuation_logprob(logits[row, n_in - n_cont:n_in], target))
                del logits
                done += len(idx)
                if progress:
                    progress(done, total)
    finally:
        if was_training:
            model.train()
    return scores


def score_one_by_one(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, add_bos: bool = False) -> list[float]:
    """Reference implementation: one unpadded forward pass per pair, no cache, no batching.

    This is lm-eval's computation with ``batch_size=1``; tests and the benchmark compare the fast
    path above with it.
    """
    import torch

    device = next(model.parameters()).device
    max_len = _max_length(model, tokenizer)
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            ctx, cont = encode_pair(tokenizer, context, continuation, add_bos=add_bos)
            whole = ctx + cont
            inp = whole[-(max_len + 1):][:-1]
            logits = model(input_ids=torch.tensor([inp], device=device)).logits[0]
            out.append(float(continuation_logprob(logits[len(inp) - len(cont):], torch.tensor(cont, device=device))))
    return out
