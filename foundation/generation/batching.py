"""How the engine lays out a batch: which prompts share a prefilled prefix, how prompts are cut into
prefill passes of similar length, and the state of the rows in the cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class BatchState:
    """The rows in the cache: cache, attention mask [b, capacity], next positions [b], last logits [b, V];
    every row ends at column ``length``."""

    cache: Any
    mask: Any
    next_pos: Any
    logits: Any
    length: int

    def select(self, idx: Any) -> None:
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos, self.logits = self.mask[idx], self.next_pos[idx], self.logits[idx]

    def grow_mask(self) -> None:
        if self.length >= self.mask.shape[1]:
            import torch

            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], dim=1)


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def chunks(lengths: Sequence[int], max_tokens: int, slack: float = 1.25) -> list[tuple[int, int]]:
    """Split sorted lengths into runs [lo, hi) whose padded size (longest x count) stays within
    ``slack`` x their real size (+16) and ``max_tokens``: one forward pass each."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > lo and (n * (i - lo + 1) > slack * (total + n) + 16 or n * (i - lo + 1) > max_tokens):
            out.append((lo, i))
            lo, total = i, 0
        total += n
    if lengths:
        out.append((lo, len(lengths)))
    return out


def prefix_groups(prompts: Sequence[Sequence[int]], min_prefix: int | None,
                  pass_cost: int = 16) -> list[tuple[list[int], int]]:
    """Partition prompts into groups that each prefill a shared prefix once: (member indices, prefix
    length; 0 = none). Prompts are ordered lexicographically and cut where it saves the most
    positions, counting ``pass_cost`` positions for each extra forward pass (dynamic programming over
    the cut points; O(n^2) for n prompts). ``min_prefix=None`` turns sharing off (one group, no prefix)."""
    n = len(prompts)
    if min_prefix is None or n < 2:
        return [(list(range(n)), 0)]
    order = sorted(range(n), key=lambda i: tuple(prompts[i]))
    lens = [len(prompts[i]) for i in order]
    adj = [common_prefix([prompts[order[k]], prompts[order[k + 1]]]) for k in range(n - 1)]
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j prompts
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    for j in range(1, n + 1):
        lcp, total, shortest = None, 0, None
        for i in range(j - 1, -1, -1):  # group = order[i:j]
            total += lens[i]
            shortest = lens[i] if shortest is None else min(shortest, lens[i])
            lcp = lens[i] if lcp is None else min(lcp, adj[i])
            p = min(lcp, shortest - 1) if j - i > 1 else 0
            p = p if p >= min_prefix else 0
            cost = best[i] + total - (j - i - 1) * p + pass_cost * (2 if p else 1)
            if cost < best[j]:
                best[j], cut[j] = cost, (i, p)
    groups, j = [], n
    while j > 0:
        i, p = cut[j]
        groups.append(([order[k] for k in range(i, j)], p))
        j = i
    return groups[::-1]


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
