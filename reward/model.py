"""Reward models on disk and in memory: loading, encoding, and batched scoring.

A reward model is a transformers ``AutoModelForSequenceClassification`` with ``num_labels=1``:
the chat model's LM head is replaced by a linear ``score`` head, read at the last non-pad token.
What it scores is the chat-template rendering of the prompt conversation plus the assistant's
response (:func:`encode`), ending at the assistant's end-of-turn token; training and scoring share
that function, so they cannot drift apart.

    scorer = reward.load_scorer("runs/demo/rm_helpful")        # full checkpoint or LoRA adapter
    scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])   # tensor([0.83])

:func:`load_reward_model` builds the model from anything ``foundation.models.resolve`` accepts:
a chat checkpoint (a new random head), an SFT output (its LoRA adapter is merged into the
backbone first), or a trained reward model (full, or a peft SEQ_CLS adapter over its base).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.schemas import Message
from reward.scorer import Scorer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from foundation.models import ResolvedModel

log = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"
DEFAULT_MAX_LENGTH = 2048


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Sequence[Message], response: str,
           max_length: int | None = None) -> list[int]:
    """Token ids of ``prompt + [assistant: response]`` rendered with the chat template.

    Trailing whitespace after the end-of-turn token is dropped, so the score is read at the
    end-of-turn token itself (the last token of every sequence). Longer than ``max_length``: the
    *start* is cut (left truncation) so the response and its end are always kept.
    """
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention_mask [B, T]) with sequences left-aligned and padded to the longest."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _task_type(adapter: str) -> str | None:
    data = json.loads(Path(adapter, "adapter_config.json").read_text())
    return data.get("task_type")


def load_reward_model(
    name: str | ResolvedModel, *, dtype: str = "auto", device: str = "auto", merge_adapter: bool = True,
    quantization_config: Any = None,
    revision: str | None = None, attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A sequence-classification model with one output from a chat model, SFT output or reward model.

    Adapters from earlier causal-LM stages (an SFT LoRA) are merged into the backbone; a peft
    SEQ_CLS adapter (a LoRA reward model) is applied on top, merged unless ``merge_adapter=False``.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification

    from foundation.models import ResolvedModel, load_causal_lm, resolve
    from foundation.precision import select_device, select_dtype

    resolved = resolve(name)
    name = resolved.name
    lm_adapters = [a for a in resolved.adapters if _task_type(a) != "SEQ_CLS"]
    rm_adapters = [a for a in resolved.adapters if _task_type(a) == "SEQ_CLS"]
    if lm_adapters and rm_adapters and resolved.adapters.index(rm_adapters[0]) < resolved.adapters.index(lm_adapters[-1]):
        raise ValueError(f"{name}: a causal-LM adapter is stacked over a reward-model adapter; cannot build "
                         "a reward model from it")
    dev = select_device(device)
    kwargs: dict[str, Any] = {"dtype": select_dtype(dtype, dev), "num_labels": 1}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": dev})
    if revision:
        kwargs["revision"] = revision
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # A chat checkpoint has an lm_head and no score head: both are expected, not worth a warning.
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        raise RuntimeError(f"could not load {name!r} as a reward model: not a local folder and the Hugging Face Hub is "
                           f"unreachable ({exc})") from exc
    finally:
        transformers.logging.set_verbosity(level)
    if lm_adapters:  # an SFT LoRA output: fold its adapters into the backbone
        causal = load_causal_lm(ResolvedModel(lm_adapters[-1], resolved.path, adapters=lm_adapters), dtype=dtype, device="cpu")
        prefix = model.base_model_prefix
        missing, unexpected = getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict(), strict=False)
        if unexpected or missing:
            raise ValueError(f"{name}: the SFT backbone does not fit the reward model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        del causal
    for i, adapter in enumerate(rm_adapters):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if merge_adapter or i < len(rm_adapters) - 1:
            model = model.merge_and_unload()
    if quantization_config is None:
        model.to(dev)
    return model


def read_stats(name: str | ResolvedModel) -> dict | None:
    """The ``reward_stats.json`` saved with a reward model, or None."""
    from foundation.models import resolve

    resolved = resolve(name)
    for folder in [resolved.adapter, resolved.path] if resolved.adapter else [resolved.path]:
        path = Path(folder) / STATS_FILE
        if path.is_file():
            return json.loads(path.read_text())
    return None


class RewardModelScorer(Scorer):
    """Batched scoring with a reward model (implements ``reward.scorer.RewardScorer``).

    Pairs are encoded with :func:`encode`, sorted by length and scored ``batch_size`` at a time,
    so a batch pads only to its own longest sequence; scores come back in the caller's order.
    ``normalize=True`` returns ``(r - mean) / std`` with the statistics saved at training time.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 16,
                 max_length: int | None = DEFAULT_MAX_LENGTH, stats: dict | None = None, normalize: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if normalize and not stats:
            raise ValueError("normalize=True needs the reward statistics (reward_stats.json) saved with the model")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length, self.stats, self.normalize = max_length, stats, normalize
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        model.config.pad_token_id = tokenizer.pad_token_id  # where the head finds the last real token

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str], is_safety: Any = None) -> torch.Tensor:
        """[B] float32 rewards on CPU, in the order given (``is_safety`` is for combination rules: ignored)."""

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        return self.score_ids(encoded)

    def score_ids(self, encoded: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of already encoded sequences (see :func:`encode`).

        A model partitioned over the processes (ZeRO-3, ``foundation.distributed.partition_frozen``)
        gathers its weights in every forward, with every process: a process with fewer batches than
        the others (uneven shards, an empty one) runs dummy forwards until all have run as many."""
        import torch

        from foundation import distributed

        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.zeros(len(encoded), dtype=torch.float32)
        device = next(self.model.parameters()).device
        starts = range(0, len(order), self.batch_size)
        dummies = distributed.forwards_to_match(len(starts), device) if distributed.partitioned(self.model) else 0
        if not starts and not dummies:
            return out
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in starts:
                    idx = order[start:start + self.batch_size]
                    ids, mask = right_pad([encoded[i] for i in idx], self.tokenizer.pad_token_id)
                    logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                    out[idx] = logits[:, 0].float().cpu()
                one = torch.tensor([[self.tokenizer.pad_token_id]], device=device)
                for _ in range(dummies):  # the other processes' remaining forwards gather weights from this one too
                    self.model(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False)
        finally:
            if was_training:
                self.model.train()
        if self.normalize:
            out = (out - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return out


def fp32_score_head(model: PreTrainedModel) -> PreTrainedModel:
    """A reward model loaded in a bf16 ``inference_precision`` block (CPU evaluation) scores with its head in fp32: the
    head's weights are cast and its input (the last hidden state) is cast up before it, so the reward is a fp32 dot
    product, not a value rounded to bf16's 8 significant bits (which would tie rewards 0.01 apart). Any other model
    (fp32; bf16 on a GPU or under ZeRO-3, as PPO loads it) is returned as it is."""
    import torch

    from foundation.precision import inference_dtype

    head = getattr(model, "score", None)
    if (inference_dtype() != "bfloat16" or head is None or not isinstance(head, torch.nn.Linear)
            or head.weight.dtype != torch.bfloat16 or head.weight.device.type != "cpu"):
        return model
    head.float()
    head.register_forward_pre_hook(lambda _module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return model


def load_scorer(name_or_path: str, *, device: str = "auto", batch_size: int = 16, normalize: bool = False,
                max_length: int | None = None, dtype: str = "auto") -> RewardModelScorer:
    """A batched scorer for a trained reward model (stage output, checkpoint or adapter folder).

    ``max_length`` defaults to the length the model was trained with (saved in reward_stats.json).
    """
    from foundation.models import load_tokenizer, resolve

    if name_or_path.startswith("gold:"):  # a cached gold reward model (reward.gold)
        from reward.gold_cache import resolve as resolve_gold

        name_or_path = str(resolve_gold(name_or_path))
    resolved = resolve(name_or_path)  # once: the loaders below take the resolved model
    if not resolved.value_head and not any(_task_type(a) == "SEQ_CLS" for a in resolved.adapters):
        raise ValueError(f"{name_or_path} is not a reward model (no sequence-classification head or SEQ_CLS adapter); "
                         "train one with `align rm`")
    stats = read_stats(resolved)
    if max_length is None:
        max_length = int(stats.get("max_length", DEFAULT_MAX_LENGTH)) if stats else DEFAULT_MAX_LENGTH
    model = fp32_score_head(load_reward_model(resolved, dtype=dtype, device=device))
    tokenizer = load_tokenizer(resolved)
    return RewardModelScorer(model, tokenizer, batch_size=batch_size, max_length=max_length, stats=stats, normalize=normalize)
