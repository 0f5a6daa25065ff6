"""The batch PPO's three steps pass along: one iteration's experience."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Rollout:
    """B sampled responses with everything the update needs.

    Each row is [prompt, left-padded to P | response, right-padded to R]; T = P + R. Per-token
    fields are over the R response positions: position t holds the quantity for response token
    y_t given the prompt x and y_<t.
    """

    input_ids: Tensor  # [B, T] token ids of prompt + response
    attention_mask: Tensor  # [B, T] 1 = a real token, 0 = padding
    response_mask: Tensor  # [B, R] 1 = a sampled response token (through EOS), 0 = padding
    logprobs: Tensor  # [B, R] log pi_old(y_t | x, y_<t): the policy that sampled
    ref_logprobs: Tensor  # [B, R] log pi_ref(y_t | x, y_<t): the frozen reference
    values: Tensor  # [B, R] V_old(x, y_<t): the critic's estimate before y_t
    scores: Tensor  # [B] sequence reward after normalisation, EOS penalty and clipping
    rewards: Tensor | None = None  # [B, R] KL-shaped per-token rewards (step 2)
    advantages: Tensor | None = None  # [B, R] GAE advantages, whitened (step 2); PPO-Lagrangian: (A_r - λ·A_c) / (1 + λ)
    returns: Tensor | None = None  # [B, R] value targets A + V (step 2)
    # PPO-Lagrangian only (reward.rule=safe_rlhf): the cost stream, with its own critic
    cost_scores: Tensor | None = None  # [B] sequence cost after normalisation and clipping
    cost_values: Tensor | None = None  # [B, R] V_cost,old(x, y_<t)
    cost_returns: Tensor | None = None  # [B, R] the cost critic's targets (step 2)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_width(self) -> int:
        """P: where the responses start in ``input_ids``."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def position_ids(self) -> Tensor:
        return position_ids(self.attention_mask)

    def select(self, rows: Tensor | Sequence[int]) -> Rollout:
        """The rows ``rows``, with the columns that are padding in all of them cut away: leading
        prompt padding and trailing response padding (a minibatch of short responses runs short)."""
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        attn = self.attention_mask[rows]
        resp = self.response_mask[rows]
        P = self.prompt_width
        first = int(attn[:, :P].any(0).float().argmax()) if P else 0  # first prompt column in use
        used = resp.any(0).nonzero()
        keep_r = int(used.max()) + 1 if len(used) else 1
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                fields[f.name] = None
                continue
            value = value[rows]
            if f.name in ("input_ids", "attention_mask"):
                value = value[:, first:P + keep_r]
            elif value.dim() == 2:
                value = value[:, :keep_r]
            fields[f.name] = value
        return Rollout(**fields)

    def by_length(self, size: int) -> Iterator[tuple[list[int], Rollout]]:
        """(rows, micro-batch) for micro-batches of up to ``size`` rows taken in order of real
        length, each cut to its own width (:meth:`select`): short sequences run together and short."""
        order = sorted(range(len(self)), key=lambda i: int(self.attention_mask[i].sum()))
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            yield rows, self.select(rows)

    def to(self, device: str | object) -> Rollout:
        return Rollout(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device))
                          for f in dataclasses.fields(self)})


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] -> [B, T] positions counted from each row's first real token (left padding skipped),
    as ``generate()`` counts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids [B, P+R], attention_mask [B, P+R], response_mask [B, R]) from token lists:
    prompts left-padded to the longest prompt P, responses right-padded to the longest response R."""
    import torch

    P = max(len(p) for p in prompts)
    R = max(max(len(r) for r in responses), 1)
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, P - len(p):P] = 1
        if r:
            input_ids[i, P:P + len(r)] = torch.tensor(list(r), dtype=torch.long)
            attention_mask[i, P:P + len(r)] = 1
            response_mask[i, :len(r)] = 1
    return input_ids, attention_mask, response_mask
