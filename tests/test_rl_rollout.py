"""The Rollout batch layout, minibatch trimming, the prompt schedule and the rule-based rewards."""

from __future__ import annotations

import pytest
import torch

from alignment.ppo import prompt_batch
from alignment.rl.rollout import Rollout, build_sequences, position_ids
from alignment.rl.rule_rewards import char_fraction, contains, target_length


def make_rollout() -> Rollout:
    ids, attn, resp = build_sequences([[5, 6], [7, 8, 9]], [[1], [2, 3, 4]], pad_id=0)
    B, R = resp.shape
    per_token = torch.arange(B * R, dtype=torch.float32).view(B, R)
    return Rollout(ids, attn, resp, per_token, per_token + 100, per_token + 200, torch.tensor([1.0, 2.0]))


def test_build_sequences_left_pads_prompts_and_right_pads_responses():
    r = make_rollout()
    assert r.input_ids.tolist() == [[0, 5, 6, 1, 0, 0], [7, 8, 9, 2, 3, 4]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert r.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    assert r.prompt_width == 3 and len(r) == 2
    assert r.position_ids().tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 2, 3, 4, 5]]
    assert position_ids(torch.tensor([[0, 0, 1, 1]])).tolist() == [[0, 0, 0, 1]]


def test_select_cuts_columns_that_are_padding_in_every_selected_row():
    r = make_rollout()
    first = r.select([0])
    assert first.input_ids.tolist() == [[5, 6, 1]]  # leading prompt pad and trailing response pads cut
    assert first.attention_mask.tolist() == [[1, 1, 1]]
    assert first.response_mask.tolist() == [[1]] and first.prompt_width == 2
    assert first.logprobs.tolist() == [[0.0]] and first.values.tolist() == [[200.0]] and first.scores.tolist() == [1.0]
    both = r.select(torch.tensor([1, 0]))
    assert both.input_ids.tolist() == [[7, 8, 9, 2, 3, 4], [0, 5, 6, 1, 0, 0]]  # nothing to cut
    assert both.ref_logprobs.tolist() == [[103.0, 104.0, 105.0], [100.0, 101.0, 102.0]]
    assert both.advantages is None


def test_by_length_groups_short_rows_and_cuts_each_micro_batch():
    ids, attn, resp = build_sequences([[5, 6, 7], [8], [9, 10]], [[1, 2, 3], [4], [11]], pad_id=0)
    zeros = torch.zeros(resp.shape)
    r = Rollout(ids, attn, resp, zeros, zeros, zeros, torch.zeros(3))
    batches = list(r.by_length(2))  # real lengths 6, 2, 3
    assert [rows for rows, _ in batches] == [[1, 2], [0]]
    short = batches[0][1]
    assert short.input_ids.tolist() == [[0, 8, 4], [9, 10, 11]]  # width 3 instead of 6
    assert short.response_mask.tolist() == [[1], [1]]
    assert batches[1][1].input_ids.tolist() == [[5, 6, 7, 1, 2, 3]]


def test_prompt_batches_walk_seeded_epochs_and_split_ranks():
    prompts = list(range(10))
    epoch = [p for it in (1, 2) for p in prompt_batch(prompts, it, 5, seed=3)]
    assert sorted(epoch) == prompts  # every prompt once per epoch
    assert prompt_batch(prompts, 2, 5, seed=3) == prompt_batch(prompts, 2, 5, seed=3)  # deterministic: resumable
    assert prompt_batch(prompts, 1, 5, seed=3) != prompt_batch(prompts, 1, 5, seed=4)
    ranks = [prompt_batch(prompts, 1, 2, seed=3, rank=r, world=2) for r in (0, 1)]
    assert ranks[0] + ranks[1] == prompt_batch(prompts, 1, 4, seed=3)  # disjoint slices of the global batch
    assert len(prompt_batch(prompts, 3, 7, seed=0)) == 7  # crosses an epoch boundary


def test_rule_rewards():
    msgs = [{"role": "user", "content": "hi"}]
    assert target_length(msgs, "one two three", target=3) == 0.0
    assert target_length(msgs, "one", target=3) == pytest.approx(-2 / 3)
    assert target_length(msgs, "abcd", target=2, unit="chars") == -1.0
    assert contains(msgs, "Well, Thank You!", text="thank you") == 1.0
    assert contains(msgs, "Well, Thank You!", text="thank you", case_sensitive=True) == 0.0
    assert char_fraction(msgs, "aab!", chars="a") == 0.5 and char_fraction(msgs, "", chars="a") == 0.0
