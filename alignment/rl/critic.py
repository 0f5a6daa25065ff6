"""The critic: a value V(x, y_<t) for every position, from a transformer backbone and a linear head.

Memory-lean by construction: the backbone is a *weight-sharing copy* (:func:`shared_copy`) of a
model that is loaded anyway - the helpfulness reward model (the default, as in OpenRLHF: the
critic starts out predicting the reward model's score) or the policy's frozen base - plus its own
small LoRA adapter and a trainable head. The frozen weights exist once in memory; the critic
adds only its adapter, its head and their optimiser state.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


def shared_copy(module: nn.Module) -> nn.Module:
    """A new module tree whose parameters ARE ``module``'s (same tensors, no new weight memory).

    Adapters injected into the copy do not touch the original; buffers (e.g. rotary tables) are
    copied. The shared parameters must stay frozen: they belong to both models."""
    memo: dict[int, Any] = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def tie_identical_weights(target: nn.Module, source: nn.Module) -> int:
    """Make ``target`` use ``source``'s parameter wherever the two hold the same tensor under the
    same name (same shape, dtype, device and values); returns the bytes freed.

    A reward model trained with LoRA over the policy's base still carries copies of the base's
    embeddings and norms after merging; tying them keeps one copy. Both sides must stay frozen."""
    import torch

    source_params = dict(source.named_parameters())
    freed = 0
    for name, param in list(target.named_parameters()):
        other = source_params.get(name)
        if (other is None or other is param or other.shape != param.shape or other.dtype != param.dtype
                or other.device != param.device):
            continue
        if param.requires_grad or other.requires_grad or not torch.equal(param, other):
            continue
        owner = target.get_submodule(name.rsplit(".", 1)[0]) if "." in name else target
        setattr(owner, name.rsplit(".", 1)[-1], other)
        freed += param.numel() * param.element_size()
    return freed


def _value_model_class():
    from torch import nn

    class ValueModel(nn.Module):
        """V for every token position: backbone hidden states [B, T, H] -> head -> [B, T]."""

        def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head

        @property
        def backbones(self) -> list[nn.Module]:
            return [self.backbone]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    return ValueModel


def value_model(backbone: nn.Module, head: nn.Linear) -> nn.Module:
    """Wrap a backbone (a transformers base model returning ``last_hidden_state``) and a [H -> 1] head."""
    return _value_model_class()(backbone, head)


def critic_from_reward_model(reward_model: nn.Module, *, lora: Any | None, share: bool = True, sign: float = 1.0) -> nn.Module:
    """Critic initialised from a sequence-classification reward model (``num_labels=1``).

    The backbone shares the reward model's (frozen) weights; ``lora`` (a peft LoraConfig) adds
    a trainable adapter to it, or, when None, the backbone is a full trainable copy. The head is a
    trainable copy of the reward model's score head in float32 times ``sign``, so before training
    V(prefix) equals ``sign`` x the reward model's score of that prefix (``sign=-1`` turns the
    safety reward model into a cost critic: cost = -safety score)."""
    import torch

    head = getattr(reward_model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"{type(reward_model).__name__}: expected a reward model with a single-output `score` head")
    backbone = reward_model.base_model
    new_head = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, device=head.weight.device, dtype=torch.float32)
    with torch.no_grad():
        new_head.weight.copy_(sign * head.weight.float())
        if head.bias is not None:
            new_head.bias.copy_(sign * head.bias.float())
    return value_model(_trainable_backbone(backbone, lora, share), new_head)


def _critic_pair_class():
    import torch
    from torch import nn

    class CriticPair(nn.Module):
        """Two critics, one module (PPO-Lagrangian): V_reward and V_cost for every position,
        [B, T] x 2 -> [B, T, 2]. Each keeps its own backbone (or adapter) and head; being one module,
        the launch code prepares, steps and checkpoints it as it does a single critic."""

        def __init__(self, reward: nn.Module, cost: nn.Module) -> None:
            super().__init__()
            self.reward = reward
            self.cost = cost

        @property
        def backbones(self) -> list[nn.Module]:
            return [self.reward.backbone, self.cost.backbone]

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
            return torch.stack([self.reward(input_ids, attention_mask, position_ids),
                                self.cost(input_ids, attention_mask, position_ids)], -1)

    return CriticPair


def critic_pair(reward: nn.Module, cost: nn.Module) -> nn.Module:
    """A reward critic and a cost critic as one module whose values are [B, T, 2] (reward, cost)."""
    return _critic_pair_class()(reward, cost)


def critic_from_causal_lm(causal_lm: nn.Module, *, lora: Any | None, share: bool = True) -> nn.Module:
    """Critic over a causal LM's backbone (shared, frozen) with a zero-initialised head (V = 0 at first)."""
    import torch

    backbone = causal_lm.base_model
    hidden = causal_lm.config.get_text_config().hidden_size
    device = next(backbone.parameters()).device
    head = torch.nn.Linear(hidden, 1, bias=True, device=device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return value_model(_trainable_backbone(backbone, lora, share), head)


def _trainable_backbone(backbone: nn.Module, lora: Any | None, share: bool = True) -> nn.Module:
    """The critic's backbone: a full trainable copy (``lora`` None), or the frozen backbone's weights
    plus an adapter - shared with ``backbone`` (:func:`shared_copy`) or, with ``share=False``, copied."""
    if lora is None:
        copy_ = copy.deepcopy(backbone)  # full critic: its own weights
        for p in copy_.parameters():
            p.requires_grad_(True)
        return copy_
    import peft
    import torch

    for p in backbone.parameters():
        p.requires_grad_(False)
    copy_ = shared_copy(backbone) if share else copy.deepcopy(backbone)
    copy_ = peft.inject_adapter_in_model(lora, copy_, adapter_name="critic")
    for name, p in copy_.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name and p.is_floating_point() and p.dtype != torch.float32:
            # as peft does for the policy's adapter (autocast_adapter_dtype): the adapter trains in fp32 over a
            # bf16/fp16 backbone; it also keeps every trainable weight of the actor-critic one dtype (DeepSpeed needs that)
            p.data = p.data.float()
    return copy_
