"""The decoding loop every sampler shares: one batch at a time, with the KV cache, from token ids.

Length (~470 lines): one loop read top to bottom: admission and prefill, decoding, compaction, the forwards kept in
step with other processes, and the ``model.generate`` fallback.

What it does that a plain ``model.generate`` call does not (each measured by ``python -m benchmarks
generate``; none changes what is computed beyond float rounding):

1. Rows are sorted by prompt length, so a batch pads little; identical prompts (K samples of one
   prompt, as rejection sampling and pair sampling ask) are prefilled once and their cache copied.
2. The prefix every prompt of a batch shares (the chat template's system turn: 30 of SmolLM2's ~54
   prompt tokens) is prefilled once, at batch size 1.
3. Rows that finished (EOS, a stop string, a sampled pad token) leave the batch: the cache drops them
   when an eighth of the batch is dead, instead of decoding pad tokens until the longest row ends;
   waiting prompts join the running batch once a quarter of it is free (continuous batching).
4. The KV cache writes into preallocated buffers (:mod:`.fast`) instead of concatenating per step.
5. A LoRA adapter is merged into its base weights for the duration, exactly undone on exit.
6. On CPU, linear layers over few rows use the transposed GEMM (:mod:`.fast`).
7. Sampling draws one uniform per row (:mod:`.sampling`), not one exponential per vocabulary entry.

Models the loop cannot drive (peft prompt learning, encoder-decoders) go through ``model.generate``
with the same outputs' shape (``Engine.fallback_reason`` says why).

Under ZeRO-3 a model can generate from its partitioned weights (a forward gathers one layer at a time: for a
policy larger than one accelerator). Every forward is then a collective call, and processes whose prompts end
sooner must keep running forwards until the last one is done: ``sync`` (``foundation.distributed.forward_sync``)
is asked before every forward whether any process is still generating, and a process that has finished runs
one-token dummy forwards until none is, as ``model.generate(synced_gpus=True)`` does.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from foundation.generation.batching import BatchState, chunks, prefix_groups
from foundation.generation.sampling import NGramBan, Sampler, next_tokens

log = logging.getLogger(__name__)

LOG_SECONDS = 5.0  # calls that take longer log their cost at INFO (others at DEBUG)
MIN_SHARED_PREFIX = 4  # tokens: below this a separate batch-1 prefill costs more than it saves
COMPACT_FRACTION = 0.125  # drop finished rows from the cache once this share of the batch is finished
REFILL_FRACTION = 0.25  # waiting rows join a running batch once this share of it is free
PREFILL_CHUNK_TOKENS = 4096  # positions per prefill forward pass (bounds its activation memory)


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    eos_bias: float = 0.0  # added to the EOS logits before sampling: > 0 answers stop sooner (a length control)
    stop: tuple[str, ...] = ()  # cut the continuation at the first of these (completion mode)
    seed: int | None = None  # None: drawn from torch's global generator (torch.manual_seed controls it)
    sampler: Sampler = "inverse_cdf"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be >= 0")
        if not math.isfinite(self.eos_bias):
            raise ValueError(f"eos_bias must be finite, got {self.eos_bias}")
        if self.sampler not in ("inverse_cdf", "multinomial"):
            raise ValueError(f"sampler must be inverse_cdf or multinomial, got {self.sampler!r}")


@dataclass
class Output:
    response_ids: list[int]  # up to and including EOS when the model stopped there
    finished: bool  # EOS before max_new_tokens
    stopped: bool = False  # a stop string ended it


@dataclass
class GenerationStats:
    """What one call cost; ``as_metrics()`` gives the ``time/*`` and ``perf/*`` keys samplers log."""

    sequences: int = 0
    prompt_tokens: int = 0  # sum of prompt lengths, once per sequence
    prefill_tokens: int = 0  # positions actually run in prefill (padding included, shared parts once)
    new_tokens: int = 0  # generated tokens kept (EOS included)
    decode_steps: int = 0
    decode_rows: int = 0  # rows run over all decode steps (finished rows still in the batch included)
    compactions: int = 0
    refills: int = 0  # times waiting rows joined a running batch
    sync_forwards: int = 0  # partitioned weights: dummy forwards run while other processes still generated
    seconds_prefill: float = 0.0
    seconds_decode: float = 0.0
    seconds: float = 0.0
    backend: str = "engine"
    merged_layers: int = 0
    linear_kernel: str | None = None  # onednn, transposed or None (F.linear)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: GenerationStats) -> None:
        for f in ("sequences", "prompt_tokens", "prefill_tokens", "new_tokens", "decode_steps", "decode_rows", "compactions",
                  "refills", "sync_forwards", "seconds_prefill", "seconds_decode", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"time/{prefix}generate": self.seconds, f"time/{prefix}prefill": self.seconds_prefill,
                f"time/{prefix}decode": self.seconds_decode, f"perf/{prefix}gen_tokens_per_s": self.tokens_per_s,
                f"tokens/{prefix}generated": float(self.new_tokens)}


@dataclass
class _Row:
    index: int  # position in the caller's list
    prompt: tuple[int, ...]
    out: list[int] = field(default_factory=list)
    done: bool = False
    finished: bool = False
    stopped: bool = False
    ban: NGramBan | None = None
    text_tail: str = ""
    steps: int = 0  # tokens drawn for this row


def fallback_reason(model: Any) -> str | None:
    """Why the loop cannot drive ``model`` (then ``model.generate`` does), or None."""
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        return "peft prompt learning prepends virtual tokens in every forward"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


class Engine:
    """Generates continuations of token-id prompts with ``model``.

    ``batch_size`` rows are decoded together; ``eos_token_ids`` end a row (kept in its output),
    ``pad_token_id`` sampled by the model also ends it (dropped; ``stop_at_pad=False``: it is an
    ordinary token, as TRL's trainers treat it). ``merge_adapters``,
    ``fast_linears``, ``share_prefix`` and ``compact_fraction`` (> 1: never drop rows) switch the
    optimisations off one by one, for measurements; ``backend="model.generate"`` runs plain
    ``model.generate`` on the same batches (the reference the benchmark compares against)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, eos_token_ids: Sequence[int] | None = None,
                 pad_token_id: int | None = None, merge_adapters: bool = True, fast_linears: bool = True,
                 share_prefix: bool = True, compact_fraction: float = COMPACT_FRACTION, backend: str = "auto",
                 stop_at_pad: bool = True, sync: Callable[[bool], bool] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id
            eos_token_ids = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
        self.eos = {int(e) for e in eos_token_ids if e is not None}
        self.pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        if self.pad is None:
            self.pad = tokenizer.eos_token_id
        self.merge_adapters, self.fast_linears, self.share_prefix = merge_adapters, fast_linears, share_prefix
        self.compact_fraction, self.stop_at_pad = compact_fraction, stop_at_pad
        self.refill_fraction = REFILL_FRACTION
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        if backend not in ("auto", "model.generate"):
            raise ValueError(f"backend must be auto or model.generate, got {backend!r}")
        self.fallback_reason = "asked for" if backend == "model.generate" else fallback_reason(model)
        if sync is not None and self.fallback_reason:
            raise ValueError(f"generation from partitioned weights needs the engine's own loop; this model cannot use it "
                             f"({self.fallback_reason})")
        self.sync = sync  # (this process still generating) -> any process still generating; before every forward

    # -- public -------------------------------------------------------------------------------
    def run(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> tuple[list[Output], GenerationStats]:
        """One output per prompt, in the caller's order."""
        import torch

        t_start = time.perf_counter()
        stats = GenerationStats(sequences=len(prompts), prompt_tokens=sum(len(p) for p in prompts))
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens: generation needs at least one")
        rows = [_Row(i, tuple(p)) for i, p in enumerate(prompts)]
        if params.no_repeat_ngram_size:
            for r in rows:
                r.ban = NGramBan(params.no_repeat_ngram_size, list(r.prompt))
        rows.sort(key=lambda r: r.prompt)  # shared prefixes (system turns) and duplicates adjacent
        generator = None
        if params.temperature > 0:
            device = next(self.model.parameters()).device
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=device).manual_seed(seed)
        work = params.max_new_tokens > 0 and bool(rows)
        if work or self.sync is not None:  # with sync, a process with nothing to do still keeps pace with the others
            with self._prepared() as (merged, fast):
                stats.merged_layers, stats.linear_kernel = merged, fast
                if self.fallback_reason:  # never with sync (refused in __init__), so only when there is work
                    stats.backend = "model.generate"
                    for start in range(0, len(rows), self.batch_size):
                        self._hf_batch(rows[start:start + self.batch_size], params, generator, stats)
                elif work:
                    self._stream(rows, params, generator, stats)
                if self.sync is not None:
                    stats.sync_forwards += self._until_all_done()
        outputs: list[Output | None] = [None] * len(rows)
        for r in rows:
            outputs[r.index] = Output(r.out, r.finished, r.stopped)
            stats.new_tokens += len(r.out)
        stats.seconds = time.perf_counter() - t_start
        (log.info if stats.seconds >= LOG_SECONDS else log.debug)(
            "generated %d sequences, %d tokens in %.1f s (%.1f tokens/s; prefill %.1f s, decode %.1f s; %s, linear kernel %s, "
            "%d LoRA layers merged)", stats.sequences, stats.new_tokens, stats.seconds, stats.tokens_per_s, stats.seconds_prefill,
            stats.seconds_decode, stats.backend, stats.linear_kernel or "torch", stats.merged_layers)
        return [o for o in outputs if o is not None], stats

    # -- the loop -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _prepared(self) -> Iterator[tuple[int, str | None]]:
        import torch

        from foundation.generation.fast import merged_adapters, small_batch_linears

        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                merged = stack.enter_context(merged_adapters(model)) if self.merge_adapters and not self.fallback_reason else 0
                fast = stack.enter_context(small_batch_linears(model, self.fast_linears and not self.fallback_reason))
                yield merged, fast
        finally:
            if was_training:
                model.train()

    def _forward(self, **kwargs: Any) -> Any:
        if self.sync is not None:
            self.sync(True)
        return self.model(**kwargs)

    def _until_all_done(self) -> int:
        """Partitioned weights: forwards are collective, so this process runs one-token forwards (their output
        unused) as long as another one is still generating. Returns how many it ran."""
        import torch

        device = next(self.model.parameters()).device
        assert self.sync is not None
        n = 0
        while self.sync(False):
            self.model(input_ids=torch.full((1, 1), self.pad, dtype=torch.long, device=device), use_cache=False,
                       logits_to_keep=1)
            n += 1
        return n

    def _stream(self, rows: list[_Row], params: SamplingParams, generator: Any, stats: GenerationStats) -> None:
        """Decode ``rows`` with at most ``batch_size`` of them in the cache at a time: finished rows
        leave, and waiting rows are prefilled and join once a quarter of the batch is free
        (continuous batching), so the batch stays full while answers end at different lengths."""
        import torch

        model = self.model
        device = next(model.parameters()).device
        pending = collections.deque(rows)
        live: list[_Row] = []  # rows in the cache, in cache order
        state: BatchState | None = None
        stop_tail = max((len(s) for s in params.stop), default=0) + 8
        admit_at = max(1, math.ceil(self.batch_size * self.refill_fraction))
        while pending or live:
            alive = sum(not r.done for r in live)
            if pending and (alive == 0 or self.batch_size - alive >= admit_at):
                t0 = time.perf_counter()
                new = [pending.popleft() for _ in range(min(self.batch_size - alive, len(pending)))]
                state, live = self._admit(new, live, state, params, device, stats)
                stats.seconds_prefill += time.perf_counter() - t0
            assert state is not None
            t0 = time.perf_counter()
            logits = state.logits
            if params.eos_bias:
                logits = logits.clone()
                logits[:, sorted(self.eos)] += params.eos_bias
            tokens = next_tokens(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                 sampler=params.sampler, generator=generator,
                                 bans=[r.ban for r in live] if params.no_repeat_ngram_size else None)
            for r, t in zip(live, tokens.tolist()):
                if not r.done:
                    self._accept(r, t, params, stop_tail)
            dead = sum(r.done for r in live)
            if dead == len(live):
                live, state = [], None
                stats.seconds_decode += time.perf_counter() - t0
                continue
            if dead and dead >= max(1.0, self.compact_fraction * len(live)):
                keep = [i for i, r in enumerate(live) if not r.done]
                state.select(torch.tensor(keep, device=device))
                tokens = tokens[keep]
                live = [live[i] for i in keep]
                stats.compactions += 1
            state.grow_mask()
            state.mask[:, state.length] = 1
            state.length += 1
            out = self._forward(input_ids=tokens[:, None], attention_mask=state.mask[:, :state.length],
                                position_ids=state.next_pos[:, None], past_key_values=state.cache, use_cache=True,
                                logits_to_keep=1)
            state.next_pos = state.next_pos + 1
            state.logits = out.logits[:, -1, :].float()
            stats.decode_steps += 1
            stats.decode_rows += len(live)
            stats.seconds_decode += time.perf_counter() - t0

    def _admit(self, new: list[_Row], live: list[_Row], state: BatchState | None, params: SamplingParams, device: Any,
               stats: GenerationStats) -> tuple[BatchState, list[_Row]]:
        """Prefill ``new`` rows and join them to the live ones that have not finished (a new cache:
        every row right-aligned at the new width, leading columns nobody uses any more dropped)."""
        import torch

        from foundation.generation.fast import buffer_cache

        uniq: list[tuple[int, ...]] = []
        row_to_uniq: list[int] = []
        for r in new:
            if not uniq or uniq[-1] != r.prompt:
                uniq.append(r.prompt)
            row_to_uniq.append(len(uniq) - 1)
        width = max(len(u) for u in uniq)
        cache, logits = self._prefill(uniq, width, params.max_new_tokens, device, stats)
        mask = torch.zeros((len(uniq), width + params.max_new_tokens), dtype=torch.long, device=device)
        for i, u in enumerate(uniq):
            mask[i, width - len(u):width] = 1
        next_pos = torch.tensor([len(u) for u in uniq], device=device)
        if len(uniq) != len(new):
            sel = torch.tensor(row_to_uniq, device=device)
            cache.batch_select_indices(sel)
            logits, mask, next_pos = logits[sel], mask[sel], next_pos[sel]
        fresh = BatchState(cache, mask, next_pos, logits, width)
        keep = [i for i, r in enumerate(live) if not r.done]
        if state is None or not keep:
            return fresh, list(new)
        old = state
        idx = torch.tensor(keep, device=device)
        block = int(old.mask[idx, :old.length].sum(1).max())  # the longest kept row's filled columns
        total = max(block, width)
        merged = buffer_cache(total + params.max_new_tokens)
        n_old = len(keep)
        for old_layer, new_layer in zip(old.cache.layers, fresh.cache.layers):
            layer = merged.layer_class_to_replicate()
            layer.allocate(n_old + len(new), new_layer.keys, new_layer.values)
            layer.write(slice(0, n_old), total - block, old_layer.keys[idx, :, old.length - block:old.length],
                        old_layer.values[idx, :, old.length - block:old.length])
            layer.write(slice(n_old, None), total - width, new_layer.keys, new_layer.values)
            layer.set_length(total)
            merged.layers.append(layer)
        mask = torch.zeros((n_old + len(new), total + params.max_new_tokens), dtype=torch.long, device=device)
        mask[:n_old, total - block:total] = old.mask[idx, old.length - block:old.length]
        mask[n_old:, total - width:total] = fresh.mask[:, :width]
        stats.refills += 1
        joined = BatchState(merged, mask, torch.cat([old.next_pos[idx], fresh.next_pos]),
                            torch.cat([old.logits[idx], fresh.logits]), total)
        return joined, [live[i] for i in keep] + list(new)

    def _prefill(self, uniq: list[tuple[int, ...]], width: int, max_new_tokens: int, device: Any,
                 stats: GenerationStats) -> tuple[Any, Any]:
        """Run the distinct prompts through the model into one cache, each right-aligned at ``width``
        (the columns before it masked, as with left padding). Prompts that share a prefix (a system
        turn) are grouped and the prefix runs once per group at batch size 1; the rest runs in chunks
        of similar length, so a long prompt does not pad the others. Returns the cache and each
        prompt's last logits."""
        import torch

        from foundation.generation.fast import buffer_cache

        cache = buffer_cache(width + max_new_tokens)
        logits = None
        for members, prefix in prefix_groups(uniq, MIN_SHARED_PREFIX if self.share_prefix else None):
            prefix_kv: list[tuple[Any, Any]] = []
            if prefix:
                pc = buffer_cache(prefix)
                self._forward(input_ids=torch.tensor([uniq[members[0]][:prefix]], dtype=torch.long, device=device),
                              position_ids=torch.arange(prefix, device=device)[None], past_key_values=pc, use_cache=True,
                              logits_to_keep=1)
                prefix_kv = [(layer.keys, layer.values) for layer in pc.layers]
                stats.prefill_tokens += prefix
            members = sorted(members, key=lambda i: len(uniq[i]))
            for lo, hi in chunks([len(uniq[i]) - prefix for i in members], self.prefill_chunk_tokens):
                part = members[lo:hi]
                w = max(len(uniq[i]) for i in part) - prefix
                tmp = buffer_cache(prefix + w)
                for li, (k, v) in enumerate(prefix_kv):
                    tmp.update(k.expand(len(part), -1, -1, -1), v.expand(len(part), -1, -1, -1), li)
                ids = torch.full((len(part), w), self.pad, dtype=torch.long)
                mask = torch.zeros((len(part), prefix + w), dtype=torch.long)
                mask[:, :prefix] = 1
                for j, i in enumerate(part):
                    n = len(uniq[i]) - prefix
                    ids[j, w - n:] = torch.tensor(uniq[i][prefix:], dtype=torch.long)
                    mask[j, prefix + w - n:] = 1
                pos = (mask.cumsum(1) - 1).clamp_(min=0)[:, prefix:]
                out = self._forward(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                                    past_key_values=tmp, use_cache=True, logits_to_keep=1)
                stats.prefill_tokens += ids.numel()
                last = out.logits[:, -1, :].float()
                if logits is None:
                    logits = last.new_empty(len(uniq), last.shape[-1])
                logits[part] = last
                while len(cache.layers) < len(tmp.layers):
                    cache.layers.append(cache.layer_class_to_replicate())
                for main, layer in zip(cache.layers, tmp.layers):
                    if not main.is_initialized:
                        main.allocate(len(uniq), layer.keys, layer.values)
                    for j, i in enumerate(part):  # row i: [gap | prefix | suffix] ending at width
                        start, n = width - len(uniq[i]), len(uniq[i]) - prefix
                        if prefix:
                            main.write(slice(i, i + 1), start, layer.keys[j:j + 1, :, :prefix], layer.values[j:j + 1, :, :prefix])
                        main.write(slice(i, i + 1), width - n, layer.keys[j:j + 1, :, prefix + w - n:],
                                   layer.values[j:j + 1, :, prefix + w - n:])
        for main in cache.layers:
            main.set_length(width)
        return cache, logits

    def _accept(self, r: _Row, t: int, params: SamplingParams, stop_tail: int) -> None:
        r.steps += 1
        if t in self.eos:
            r.out.append(t)
            r.done = r.finished = True
            return
        if t == self.pad and self.stop_at_pad:  # a pad token the model sampled ends the row (not part of the response)
            r.done = True
            return
        r.out.append(t)
        if r.ban is not None:
            r.ban.push(t)
        if params.stop:
            r.text_tail = self.tokenizer.decode(r.out[-stop_tail:], skip_special_tokens=True)
            if any(s in r.text_tail for s in params.stop):
                r.done = r.stopped = True
                return
        if r.steps >= params.max_new_tokens:
            r.done = True

    # -- model.generate, for models the loop cannot drive ---------------------------------------
    def _hf_batch(self, batch: list[_Row], params: SamplingParams, generator: Any, stats: GenerationStats) -> None:
        import torch

        from foundation.generation.batching import left_pad

        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        ids, mask = left_pad([r.prompt for r in batch], self.pad)
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.pad, eos_token_id=sorted(self.eos),
                                      use_cache=True, synced_gpus=False)
        if params.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = params.no_repeat_ngram_size
        if params.eos_bias:
            kwargs["sequence_bias"] = {(e,): params.eos_bias for e in sorted(self.eos)}
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        rng = None
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
            rng = torch.random.get_rng_state()  # model.generate draws from the global generator: seed it from ours
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            if rng is not None:
                torch.random.set_rng_state(rng)
        stats.prefill_tokens += ids.numel()
        for r, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            for t in row:
                self._accept(r, t, params, max((len(s) for s in params.stop), default=0) + 8)
                if r.done:
                    break
        stats.seconds_prefill += time.perf_counter() - t0
