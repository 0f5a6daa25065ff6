"""The generation engine: the same answers as ``model.generate`` (greedy; sampling with the same seed
and draw), the optimisations' invariants (finished rows leave the batch, the adapter round trip
leaves the weights bit-for-bit unchanged, shared prefixes and duplicates prefilled once), and the
sampling pieces against transformers' own processors."""

from __future__ import annotations

import pytest
import torch

from foundation import models
from foundation.generation import Engine, SamplingParams, encode_prompts, generate, generate_completions, left_pad
from foundation.generation.batching import chunks, prefix_groups
from foundation.generation.sampling import NGramBan, ban_ngrams, draw, warp

QUESTIONS = ["Hi", "What is the capital of France, please?", "2+2?", "Tell me a joke about cats and dogs.",
             "Name three colours.", "Why is the sky blue?", "Translate 'cat' into French.", "What is 7 times 8?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "Hi"]


def _prompts(questions=QUESTIONS, system: str | None = None):
    pre = [{"role": "system", "content": system}] if system else []
    return [pre + [{"role": "user", "content": q}] for q in questions]


def _reference(model, tok, encoded, *, max_new_tokens, batch_size, eos, **kwargs):
    """Plain ``model.generate`` on left-padded batches in the caller's order; responses cut as the engine cuts them."""
    out = []
    with torch.no_grad():
        for s in range(0, len(encoded), batch_size):
            ids, mask = left_pad(encoded[s:s + batch_size], tok.pad_token_id)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=sorted(eos), **kwargs)
            for row in gen[:, ids.shape[1]:].tolist():
                resp = []
                for t in row:
                    if t in eos:
                        resp.append(t)
                        break
                    if t == tok.pad_token_id:
                        break
                    resp.append(t)
                out.append(resp)
    return out


def _lively(model):
    """The tiny random model answers every prompt with one repeated token; larger random weights
    make its answers differ by prompt and end at different lengths, which these tests need."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _frequent_token(model, tok, encoded, upto: int) -> int:
    """A token the tiny model often emits mid-answer (positions 1..upto-1): made the end of sequence, rows end at
    different steps."""
    probe, _ = Engine(model, tok, batch_size=len(encoded)).run(encoded, SamplingParams(max_new_tokens=16))
    counts: dict[int, int] = {}
    for o in probe:
        for t in o.response_ids[1:upto]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    tok, model = models.load_tokenizer(tiny_model), _lively(models.load_causal_lm(tiny_model))
    model.eval()
    return model, tok


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_identical_to_model_generate_tiny(tiny, batch_size):
    model, tok = tiny
    prompts = _prompts() + _prompts(QUESTIONS[:4], system="You answer in French.")
    encoded = encode_prompts(tok, prompts)
    eos = {model.generation_config.eos_token_id}
    ref = _reference(model, tok, encoded, max_new_tokens=12, batch_size=1, eos=eos, do_sample=False)
    gens = generate(model, tok, prompts, max_new_tokens=12, batch_size=batch_size)
    assert [g.response_ids for g in gens] == ref
    assert [g.finished for g in gens] == [bool(r) and r[-1] in eos for r in ref]
    assert gens.stats.new_tokens == sum(len(r) for r in ref) and gens.stats.sequences == len(prompts)


def test_sampling_same_seed_same_tokens_as_model_generate(tiny):
    """With torch.multinomial as the draw (what model.generate does) and no row dropped mid-batch,
    the same seed gives model.generate's tokens."""
    model, tok = tiny
    encoded = encode_prompts(tok, _prompts())
    eos = {model.generation_config.eos_token_id}
    for temperature, top_p, top_k in [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20)]:
        torch.manual_seed(123)
        ref = _reference(model, tok, encoded, max_new_tokens=10, batch_size=len(encoded), eos=eos, do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=top_k)
        engine = Engine(model, tok, batch_size=len(encoded), compact_fraction=2.0, share_prefix=False)
        ours, _ = engine.run(encoded, SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k,
                                                     seed=123, sampler="multinomial"))
        # the engine sorts rows (duplicates and shared prefixes together); model.generate drew in the caller's order
        order = sorted(range(len(encoded)), key=lambda i: tuple(encoded[i]))
        if order == list(range(len(encoded))):
            assert [o.response_ids for o in ours] == ref
        else:  # same draws, rows in the engine's order
            torch.manual_seed(123)
            ref_sorted = _reference(model, tok, [encoded[i] for i in order], max_new_tokens=10, batch_size=len(encoded),
                                    eos=eos, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
            assert [ours[i].response_ids for i in order] == ref_sorted


def test_seed_reproducible_and_global_rng_untouched(tiny):
    model, tok = tiny
    prompts = _prompts()
    state = torch.random.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    c = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, seed=8)
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]
    torch.manual_seed(5)  # without a seed the draws follow torch's global generator
    d = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0)
    torch.manual_seed(5)
    e = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0)
    assert [g.response_ids for g in d] == [g.response_ids for g in e]


def test_finished_rows_leave_the_batch(tiny):
    """Rows that end early are dropped from the cache (fewer rows decoded) and nothing else changes."""
    model, tok = tiny
    encoded = encode_prompts(tok, _prompts())
    stop_token = _frequent_token(model, tok, encoded, 6)
    params = SamplingParams(max_new_tokens=16)
    kept, stats = Engine(model, tok, batch_size=len(encoded), eos_token_ids=[stop_token]).run(encoded, params)
    full, full_stats = Engine(model, tok, batch_size=len(encoded), eos_token_ids=[stop_token],
                              compact_fraction=2.0).run(encoded, params)
    assert [o.response_ids for o in kept] == [o.response_ids for o in full]
    lengths = sorted(len(o.response_ids) for o in kept)
    assert lengths[0] < lengths[-1] and any(o.finished for o in kept)
    assert stats.compactions >= 1 and full_stats.compactions == 0
    assert stats.decode_rows < full_stats.decode_rows == full_stats.decode_steps * len(encoded)
    # every row still in the batch at a step is either live or finished since the last compaction
    assert stats.decode_rows >= sum(len(o.response_ids) - 1 for o in kept)


def test_synced_generation_asks_before_every_forward_and_keeps_pace_with_other_processes(tiny):
    """Generation from ZeRO-3 partitions (Engine(sync=...)): every forward is collective, so the engine asks before each
    one whether any process still generates, and once done runs one-token forwards while the (here simulated) other
    processes go on; the answers are those of an unsynced run. A process with no prompts still keeps pace."""
    model, tok = tiny
    encoded = encode_prompts(tok, _prompts())
    params = SamplingParams(max_new_tokens=6)
    plain, _ = Engine(model, tok, batch_size=3).run(encoded, params)
    forwards, calls = [0], []
    original = model.forward

    def counted(*a, **kw):
        forwards[0] += 1
        return original(*a, **kw)

    def others_run_for(extra):
        state = {"left": extra}

        def sync(running):
            calls.append((running, forwards[0]))
            if running:
                return True
            state["left"] -= 1
            return state["left"] >= 0  # the others need `extra` more forwards after this process is done

        return sync

    model.forward = counted
    try:
        synced, stats = Engine(model, tok, batch_size=3, sync=others_run_for(4)).run(encoded, params)
        real = forwards[0] - 4
        assert [o.response_ids for o in synced] == [o.response_ids for o in plain] and stats.sync_forwards == 4
        # one sync before each real forward (the forward count had not yet moved), then 4 + 1 asks after the last
        assert [c for c in calls if c[0]] == [(True, i) for i in range(real)]
        assert [c for c in calls if not c[0]] == [(False, real + i) for i in range(5)]
        calls.clear()
        forwards[0] = 0
        empty, stats = Engine(model, tok, batch_size=3, sync=others_run_for(2)).run([], params)
        assert empty == [] and stats.sync_forwards == 2 and forwards[0] == 2
    finally:
        model.forward = original


def test_waiting_rows_join_a_running_batch(tiny):
    """Continuous batching: with more prompts than the batch holds, rows that wait join once rows
    finish; every answer is what the prompt gets alone."""
    model, tok = tiny
    prompts = _prompts() + _prompts(QUESTIONS[:6], system="Be brief.")
    encoded = encode_prompts(tok, prompts)
    probe, _ = Engine(model, tok, batch_size=len(encoded)).run(encoded, SamplingParams(max_new_tokens=16))
    counts: dict[int, int] = {}
    for o in probe:
        for t in o.response_ids[1:8]:
            counts[t] = counts.get(t, 0) + 1
    stop_token = max(counts, key=counts.get)
    params = SamplingParams(max_new_tokens=16)
    streamed, stats = Engine(model, tok, batch_size=4, eos_token_ids=[stop_token]).run(encoded, params)
    alone = [Engine(model, tok, batch_size=1, eos_token_ids=[stop_token]).run([e], params)[0][0] for e in encoded]
    assert [o.response_ids for o in streamed] == [o.response_ids for o in alone]
    assert stats.refills >= 1
    # the batch never held more than 4 rows: at most 4 rows per decode step
    assert stats.decode_rows <= 4 * stats.decode_steps


def test_lora_merged_for_generation_and_weights_bit_identical_after(tiny_model):
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config

    tok = models.load_tokenizer(tiny_model)
    model = get_peft_model(_lively(models.load_causal_lm(tiny_model)), peft_config(AdapterConfig(dropout=0.0), "CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: merging must change the outputs
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prompts = _prompts()
    merged = generate(model, tok, prompts, max_new_tokens=10)
    assert merged.stats.merged_layers > 0
    assert model.training  # the caller's mode comes back
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a weight changed after the merged generation"
    assert all("forward" not in m.__dict__ for m in model.modules()), "a patched forward was left behind"
    unmerged, _ = Engine(model, tok, merge_adapters=False, fast_linears=False).run(encode_prompts(tok, prompts),
                                                                                   SamplingParams(max_new_tokens=10))
    assert [g.response_ids for g in merged] == [o.response_ids for o in unmerged]
    model.disable_adapter_layers()
    base = generate(model, tok, prompts, max_new_tokens=10)
    model.enable_adapter_layers()
    assert [g.response_ids for g in base] != [g.response_ids for g in merged]  # the adapter was in effect


def test_an_adapter_on_a_tied_lm_head_generates_from_the_policy_itself(tiny_model):
    """LoRA on an LM head tied to the input embeddings (tiny-llama and SmolLM2 tie them): folding that adapter into
    the shared weight would change the embeddings too, and the tokens would be sampled from another model than the
    one PPO scores them with (its KL estimate went to -7 nats). That layer stays unmerged; the others merge."""
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config

    tok = models.load_tokenizer(tiny_model)
    base_model = _lively(models.load_causal_lm(tiny_model))
    assert base_model.get_input_embeddings().weight is base_model.get_output_embeddings().weight  # tied
    cfg = AdapterConfig(dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(base_model, peft_config(cfg, "CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    prompts = _prompts()
    merged = generate(model, tok, prompts, max_new_tokens=10)
    assert merged.stats.merged_layers == 2 * 2  # q_proj and v_proj of both layers; not the LM head
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    unmerged, _ = Engine(model, tok, merge_adapters=False, fast_linears=False).run(encode_prompts(tok, prompts),
                                                                                   SamplingParams(max_new_tokens=10))
    assert [g.response_ids for g in merged] == [o.response_ids for o in unmerged]


def test_shared_prefix_and_duplicates_prefilled_once(tiny):
    model, tok = tiny
    prompts = [p for p in _prompts(QUESTIONS[:5]) for _ in range(3)]  # K=3 samples of each prompt, as RS asks
    encoded = encode_prompts(tok, prompts)
    gens = generate(model, tok, prompts, max_new_tokens=6, batch_size=15)
    lcp = min(next(i for i, (a, b) in enumerate(zip(encoded[0], e)) if a != b) for e in encoded if e != encoded[0])
    distinct = {tuple(e) for e in encoded}
    assert gens.stats.prefill_tokens < lcp + sum(len(e) - lcp for e in distinct) + 5 * 8  # each distinct suffix once
    assert gens.stats.prefill_tokens < gens.stats.prompt_tokens / 2
    one_by_one = [generate(model, tok, [p], max_new_tokens=6)[0].response_ids for p in prompts]
    assert [g.response_ids for g in gens] == one_by_one


def test_stop_strings_and_completion_mode(tiny):
    model, tok = tiny
    texts = ["Q: what is 2+2?\nA:", "The quick brown fox", "Once upon a time"]
    free = generate_completions(model, tok, texts, max_new_tokens=12)
    assert len(free) == 3 and free.stats.sequences == 3
    # a stop string taken from a free continuation cuts it there
    cut_at = next(t for t in free if len(t.strip()) > 2)
    stop = cut_at.strip()[:2]
    cut = generate_completions(model, tok, texts, max_new_tokens=12, stop=[stop])
    for full, short in zip(free, cut):
        assert stop not in short
        assert full.startswith(short)
        if stop in full:
            assert short == full[: full.index(stop)]


def test_no_repeat_ngram_never_repeats_and_matches_transformers(tiny):
    model, tok = tiny
    prompts = _prompts()
    encoded = encode_prompts(tok, prompts)
    eos = {model.generation_config.eos_token_id}
    ref = _reference(model, tok, encoded, max_new_tokens=20, batch_size=1, eos=eos, do_sample=False, no_repeat_ngram_size=2)
    ours = generate(model, tok, prompts, max_new_tokens=20, no_repeat_ngram_size=2, batch_size=4)
    assert [g.response_ids for g in ours] == ref
    for e, g in zip(encoded, ours):  # no generated token completes a bigram seen before it (the prompt's included)
        seq = e + g.response_ids
        for end in range(len(e), len(seq)):
            earlier = {tuple(seq[i:i + 2]) for i in range(end - 1)}
            assert tuple(seq[end - 1:end + 1]) not in earlier


def test_warpers_match_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    scores[0, :10] = 1.0  # ties
    ids = torch.zeros(6, 1, dtype=torch.long)
    for t, k, p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.2, 5, 1.0), (0.5, 10, 0.5), (1.0, 0, 0.05)]:
        ref = TemperatureLogitsWarper(t)(ids, scores.clone())
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(ids, ref)
        assert torch.equal(warp(scores.clone(), t, k, p), ref)


def test_ngram_ban_matches_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3):
        seqs = torch.randint(0, 6, (5, 12), generator=g)
        ref = NoRepeatNGramLogitsProcessor(n)(seqs, torch.zeros(5, 6))
        ours = torch.zeros(5, 6)
        ban_ngrams(ours, [NGramBan(n, row) for row in seqs.tolist()])
        assert torch.equal(ours, ref)


def test_inverse_cdf_draws_the_distribution():
    """100k draws of a known distribution (zero-probability entries included): every frequency within 5 standard errors."""
    probs = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.25, 0.05])
    scores = probs.log().expand(100_000, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    tokens = draw(scores, "inverse_cdf", gen)
    freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
    se = (probs.double() * (1 - probs.double()) / len(tokens)).sqrt()
    assert freq[0] == 0 and freq[3] == 0
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq


def test_prefix_groups_by_hand():
    a = [1, 2, 3, 4, 5, 6, 7, 10]
    b = [1, 2, 3, 4, 5, 6, 7, 11, 12]
    c = [9, 9, 9, 9, 9, 9, 9, 9, 20]
    d = [9, 9, 9, 9, 9, 9, 9, 9, 21]
    groups = prefix_groups([a, c, b, d], min_prefix=4, pass_cost=2)
    assert sorted((sorted(m), p) for m, p in groups) == [([0, 2], 7), ([1, 3], 8)]
    assert prefix_groups([a, b], min_prefix=None) == [([0, 1], 0)]
    # a group's prefix always leaves each member at least one token to run
    assert prefix_groups([a, a[:-1]], min_prefix=4, pass_cost=0) == [([1, 0], 6)]
    # sharing 3 tokens is not worth a pass below min_prefix
    assert all(p == 0 for _, p in prefix_groups([[1, 2, 3, 8, 9], [1, 2, 3, 7, 9]], min_prefix=4))


def test_prefill_chunks_by_hand():
    assert chunks([5, 5, 6, 40], 4096) == [(0, 3), (3, 4)]  # 40 would pad the three short ones to 160 positions
    assert chunks([10] * 10, 35) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # at most 35 positions per pass
    assert chunks([], 100) == []


def test_buffer_cache_grows_and_selects():
    from foundation.generation.fast import buffer_cache

    cache = buffer_cache(3)
    k = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    cache.update(k, -k, 0)
    k2, v2 = cache.update(k + 100, -(k + 100), 0)  # 4 positions > capacity 3: the buffer doubles
    assert k2.shape == (2, 1, 4, 2) and torch.equal(k2[:, :, :2], k) and torch.equal(k2[:, :, 2:], k + 100)
    assert torch.equal(v2, -k2) and cache.get_seq_length() == 4
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, k2[1:]) and torch.equal(cache.layers[0].values, -k2[1:])


def test_eos_bias_ends_greedy_answers_sooner_and_matches_model_generate(tiny):
    """``eos_bias`` (the length control's knob): greedy answers agree with the unbiased ones up to where they end,
    their lengths never grow with the bias, a huge bias ends every answer at once, and the tokens are
    model.generate's with the same ``sequence_bias`` on the EOS token."""
    model, tok = tiny
    encoded = encode_prompts(tok, _prompts())
    stop = _frequent_token(model, tok, encoded, 8)
    engine = Engine(model, tok, batch_size=4, eos_token_ids=[stop])
    runs = {b: [o.response_ids for o in engine.run(encoded, SamplingParams(max_new_tokens=16, eos_bias=b))[0]]
            for b in (0.0, 0.5, 2.0, 1e4)}
    assert runs[0.0] == [o.response_ids for o in engine.run(encoded, SamplingParams(max_new_tokens=16))[0]]
    for b in (0.5, 2.0, 1e4):
        for biased, plain in zip(runs[b], runs[0.0]):
            assert biased[:-1] == plain[:len(biased) - 1] and (biased[-1] == stop or biased == plain[:len(biased)])
    lengths = {b: [len(r) for r in rs] for b, rs in runs.items()}
    assert all(x >= y >= z for x, y, z in zip(lengths[0.0], lengths[0.5], lengths[2.0]))
    assert sum(lengths[2.0]) < sum(lengths[0.0]) and runs[1e4] == [[stop]] * len(encoded)
    ref = _reference(model, tok, encoded, max_new_tokens=16, batch_size=1, eos={stop}, do_sample=False,
                     sequence_bias={(stop,): 2.0})
    assert runs[2.0] == ref


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="eos_bias"):
        SamplingParams(eos_bias=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="sampler"):
        SamplingParams(sampler="beam")  # type: ignore[arg-type]


def test_prompt_tuning_falls_back_to_model_generate(tiny_model):
    from peft import get_peft_model

    from foundation.adapters import AdapterConfig, peft_config

    tok = models.load_tokenizer(tiny_model)
    model = get_peft_model(models.load_causal_lm(tiny_model),
                           peft_config(AdapterConfig(method="prompt_tuning", num_virtual_tokens=4, prompt_init_text=None)))
    gens = generate(model, tok, _prompts(QUESTIONS[:3]), max_new_tokens=5)
    assert gens.stats.backend == "model.generate" and len(gens) == 3
    ended = generate(model, tok, _prompts(QUESTIONS[:3]), max_new_tokens=5, eos_bias=1e4)  # sequence_bias there
    assert [g.response_ids for g in ended] == [[model.generation_config.eos_token_id]] * 3 and all(g.finished for g in ended)


@pytest.mark.slow
def test_greedy_matches_model_generate_smollm2():
    """The embedded model: greedy answers equal model.generate's, except where model.generate's own
    top two logits are within float noise (then either token is the argmax; different kernels round
    differently)."""
    from data.loaders import DataSource, load_prompts

    tok, model = models.load_tokenizer("smollm2-135m"), models.load_causal_lm("smollm2-135m")
    model.eval()
    prompts = [p.messages for p in load_prompts(DataSource("bundled:prompts"))[::26]][:12]
    encoded = encode_prompts(tok, prompts)
    eos = {model.generation_config.eos_token_id}
    ref = _reference(model, tok, encoded, max_new_tokens=32, batch_size=4, eos=eos, do_sample=False)
    ours = generate(model, tok, prompts, max_new_tokens=32, batch_size=4)  # three batches of four
    assert ours.stats.linear_kernel in ("onednn", "transposed")
    same = 0
    for e, r, g in zip(encoded, ref, ours):
        if g.response_ids == r:
            same += 1
            continue
        t = next(i for i, (a, b) in enumerate(zip(r, g.response_ids)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([e + r[:t]])).logits[0, -1]
        assert abs(float(logits[r[t]] - logits[g.response_ids[t]])) < 1e-3, f"diverged at {t} without a tie"
    assert same >= len(prompts) // 2


def test_a_bf16_model_decodes_on_prepacked_bf16_kernels_and_gets_its_own_forwards_back(tiny):
    """A bf16 model (``eval.dtype: bfloat16``) runs its linear layers on oneDNN's prepacked bf16 kernels where this
    torch has them: each layer's output matches ``F.linear`` to bf16 precision, the engine says which kernel ran, and
    the layers get their own ``forward`` back afterwards."""
    import copy

    import torch.nn.functional as F

    from foundation.generation.fast import _onednn_usable, small_batch_linears

    model, tok = tiny
    low = copy.deepcopy(model).to(torch.bfloat16)
    linears = [m for m in low.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(5, linears[0].in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with small_batch_linears(low) as kernel:
        assert kernel == ("onednn-bf16" if _onednn_usable(torch.bfloat16) else None)
        if kernel:
            assert all("forward" in m.__dict__ for m in linears)
            got, want = linears[0](x), F.linear(x, linears[0].weight, linears[0].bias)
            assert got.dtype == torch.bfloat16
            assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert not any("forward" in m.__dict__ for m in linears)
    outs, stats = Engine(low, tok, batch_size=4).run(encode_prompts(tok, _prompts()[:4]), SamplingParams(max_new_tokens=6))
    assert stats.linear_kernel == kernel and all(0 < len(o.response_ids) <= 6 for o in outs)
    mixed = copy.deepcopy(model)
    layers = [m for m in mixed.modules() if type(m) is torch.nn.Linear]
    layers[0].to(torch.bfloat16)  # one bf16 layer in a fp32 model: only the fp32 layers switch
    with small_batch_linears(mixed) as kernel:
        assert kernel in ("onednn", "transposed") and "forward" not in layers[0].__dict__
        assert all("forward" in m.__dict__ for m in layers[1:])
