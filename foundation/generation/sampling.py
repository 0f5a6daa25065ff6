"""Choosing the next token: the logits processors and warpers of ``model.generate``, in its order,
and two ways to draw from the result.

Order (as transformers applies them): no-repeat-n-gram ban → temperature → top-k → top-p →
softmax → draw. ``temperature == 0`` is greedy (argmax after the ban).

Draws:
- ``inverse_cdf`` (default): one uniform number per row, located in the row's cumulative
  distribution (float64). Exact sampling from the same distribution, and ~10x cheaper on CPU
  than ``torch.multinomial``, which draws an exponential variate for every one of the 49k
  vocabulary entries of every row (measured in ``python -m benchmarks generate``).
- ``multinomial``: ``torch.multinomial(probs, 1)``, what ``model.generate`` does: with the same
  seed and batch the same tokens as ``model.generate`` (tested), at its cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Sampler = Literal["inverse_cdf", "multinomial"]


class NGramBan:
    """``no_repeat_ngram_size`` as transformers' ``NoRepeatNGramLogitsProcessor`` applies it: a token
    that would complete an n-gram already present in the sequence (prompt included) is banned."""

    def __init__(self, n: int, tokens: list[int]) -> None:
        self.n = n
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.tail: list[int] = []
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        self.tail.append(token)
        if len(self.tail) >= self.n:
            gram = tuple(self.tail[-self.n:])
            self.seen.setdefault(gram[:-1], set()).add(gram[-1])
        if len(self.tail) > self.n:
            del self.tail[0]

    def banned(self) -> set[int]:
        if len(self.tail) < self.n - 1:
            return set()
        key = tuple(self.tail[len(self.tail) - self.n + 1:]) if self.n > 1 else ()
        return self.seen.get(key, set())


def ban_ngrams(scores: "torch.Tensor", bans: list[NGramBan | None]) -> None:
    """Set banned tokens' scores to -inf, in place."""
    rows, cols = [], []
    for i, ban in enumerate(bans):
        if ban is not None:
            for t in ban.banned():
                rows.append(i)
                cols.append(t)
    if rows:
        scores[rows, cols] = float("-inf")


def warp(scores: "torch.Tensor", temperature: float, top_k: int, top_p: float) -> "torch.Tensor":
    """Temperature, top-k and top-p as transformers' warpers compute them (same comparisons, same
    tie handling); returns new scores with removed tokens at -inf."""
    import torch

    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # min_tokens_to_keep = 1
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def draw(scores: "torch.Tensor", sampler: Sampler, generator: "torch.Generator | None") -> "torch.Tensor":
    """One token id per row of ``scores`` [b, V], from softmax(scores)."""
    import torch

    probs = torch.softmax(scores, dim=-1)
    if sampler == "multinomial":
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    cdf = probs.to(torch.float64).cumsum_(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def next_tokens(logits: "torch.Tensor", *, temperature: float, top_k: int, top_p: float, sampler: Sampler,
                generator: Any, bans: list[NGramBan | None] | None = None) -> "torch.Tensor":
    """The next token of each row from its last-position logits [b, V] (float32)."""
    if bans is not None:
        ban_ngrams(logits, bans)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(warp(logits, temperature, top_k, top_p), sampler, generator)
