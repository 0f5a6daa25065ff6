"""PPO's two trained models - the policy (actor) and the value model (critic) - under every launch.

PPO's loop only asks for log-probs, reference log-probs and values, a backward pass per loss and
an optimiser step; how the two models are wrapped depends on the launch, and lives here:

- :class:`SeparateModels` (one process, DDP): accelerate prepares the policy and the critic as two
  models with one optimiser (two DDP wrappers); micro-batches accumulate under ``no_sync`` and
  each model's gradient norm is clipped on its own.
- :class:`DeepSpeedModels` (ZeRO-2/3): accelerate (like DeepSpeed itself) prepares one model per
  engine, so both live in one :class:`ActorCritic` module trained by one engine and one ZeRO
  optimiser (TRL's former PPOTrainer did the same). Gradient accumulation is caller-owned
  (DeepSpeed's ``managed_gradient_accumulation: false``): every backward only accumulates and
  ``step()`` reduces and updates, so the actor and critic losses keep their own backward passes.
  Differences from the other launches: the gradient norm is clipped over both models together
  (DeepSpeed clips its engine's global norm); under ZeRO-3 the weights are partitioned, so
  generation gathers them first (TRL's ``unwrap_model_for_generation``), saving gathers the
  trainable ones, and the critic cannot share frozen weights with the reward models (those run
  outside the engine): it gets its own copy, which ZeRO-3 partitions.

Checkpoints follow the launch too: optimiser state is one ``state_dict`` with DDP, and DeepSpeed's
own per-rank checkpoint (trainable weights and optimiser partitions) under ZeRO.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# forward passes (plain functions of a model)


def policy_logprobs(model: Any, input_ids: Any, attention_mask: Any, response_width: int, temperature: float,
                    *, with_entropy: bool = False, entropy_grad: bool = False) -> tuple[Any, Any]:
    """log pi(y_t | x, y_<t) of the R response tokens [B, R] (and their entropy [B, R], with a
    gradient when ``entropy_grad``) under the temperature-scaled distribution. Only the last R + 1
    positions are projected onto the vocabulary."""
    from alignment.rl.distributions import entropy_from_logits, logprobs_from_logits
    from alignment.rl.rollout import position_ids

    R = response_width
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=R + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature
    logprobs = logprobs_from_logits(logits, input_ids[:, -R:])
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None
    return logprobs, entropy


def critic_values(critic: Any, input_ids: Any, attention_mask: Any, response_width: int) -> Any:
    """V(x, y_<t) before each of the R response tokens: [B, R]."""
    from alignment.rl.rollout import position_ids

    values = critic(input_ids, attention_mask, position_ids(attention_mask))
    return values[:, -response_width - 1:-1]


def _reference(policy: Any, reference: Any) -> tuple[Any, Any]:
    """(model, context) for reference log-probs: the policy with its LoRA adapter off, or the frozen copy."""
    if reference is not None:
        return reference, contextlib.nullcontext()
    return policy, policy.disable_adapter()


def _actor_critic_class():
    from torch import nn

    class ActorCritic(nn.Module):
        """The policy and the critic in one module, so that one DeepSpeed engine trains both. Every
        pass goes through ``forward`` (and so through the engine's hooks): ``kind`` picks it."""

        def __init__(self, policy: nn.Module, critic: nn.Module) -> None:
            super().__init__()
            self.policy = policy
            self.critic = critic
            self.config = policy.config  # accelerate sizes DeepSpeed's buckets from the model config

        def forward(self, kind: str, input_ids: Any, attention_mask: Any, response_width: int, temperature: float = 1.0,
                    with_entropy: bool = False, entropy_grad: bool = False) -> Any:
            if kind == "values":
                return critic_values(self.critic, input_ids, attention_mask, response_width)
            if kind == "policy":
                return policy_logprobs(self.policy, input_ids, attention_mask, response_width, temperature,
                                       with_entropy=with_entropy, entropy_grad=entropy_grad)
            if kind == "reference":  # the policy with its LoRA adapter off
                with self.policy.disable_adapter():
                    return policy_logprobs(self.policy, input_ids, attention_mask, response_width, temperature)
            raise ValueError(f"unknown pass {kind!r}")

    return ActorCritic


# ---------------------------------------------------------------------------------------------
# one process or DDP


class SeparateModels:
    """Policy and critic prepared as two models (DDP wrappers under a multi-process launch)."""

    generation_sync = None  # the policy generates from its whole weights on every process

    def __init__(self, accelerator: Any, policy: Any, reference: Any, critic: Any, optimizer: Any) -> None:
        self.accelerator = accelerator
        self.policy_wrapped, self.critic_wrapped, self.optimizer = accelerator.prepare(policy, critic, optimizer)
        self.reference = reference

    @property
    def policy(self) -> Any:
        """The policy module itself (a peft model with LoRA): generation, saving, fingerprints."""
        return self.accelerator.unwrap_model(self.policy_wrapped)

    @property
    def critic(self) -> Any:
        return self.accelerator.unwrap_model(self.critic_wrapped)

    def train(self, mode: bool = True) -> None:
        self.policy_wrapped.train(mode)
        self.critic_wrapped.train(mode)

    def logprobs(self, input_ids: Any, attention_mask: Any, R: int, temperature: float, *, reference: bool = False,
                 with_entropy: bool = False, entropy_grad: bool = False) -> tuple[Any, Any]:
        """Policy (or reference) log-probs; through the DDP wrapper when gradients are needed."""
        import torch

        if reference:
            model, ctx = _reference(self.policy, self.reference)
            with ctx:
                return policy_logprobs(model, input_ids, attention_mask, R, temperature)
        model = self.policy_wrapped if torch.is_grad_enabled() else self.policy
        return policy_logprobs(model, input_ids, attention_mask, R, temperature, with_entropy=with_entropy,
                               entropy_grad=entropy_grad)

    def values(self, input_ids: Any, attention_mask: Any, R: int) -> Any:
        import torch

        return critic_values(self.critic_wrapped if torch.is_grad_enabled() else self.critic, input_ids, attention_mask, R)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Forward and backward passes of one micro-batch; gradients are all-reduced on the last one only."""
        with contextlib.ExitStack() as stack:
            if not last:
                stack.enter_context(self.accelerator.no_sync(self.policy_wrapped))
                stack.enter_context(self.accelerator.no_sync(self.critic_wrapped))
            yield

    def backward(self, loss: Any) -> None:
        self.accelerator.backward(loss)

    def step(self, max_grad_norm: float) -> dict[str, float]:
        """Clip each model's gradient norm, update, zero the gradients; returns the norms."""
        norms = {}
        if max_grad_norm > 0:
            norms["policy/grad_norm"] = float(self.accelerator.clip_grad_norm_(self.policy_wrapped.parameters(), max_grad_norm))
            norms["value/grad_norm"] = float(self.accelerator.clip_grad_norm_(self.critic_wrapped.parameters(), max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    @contextlib.contextmanager
    def generating(self) -> Iterator[Any]:
        """The policy, ready to generate."""
        yield self.policy

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Trainable weights complete on every process (they already are)."""
        yield

    # checkpoints: trainable weights and the optimiser in the main process's state.pt
    def checkpoint_state(self) -> dict[str, Any]:
        from alignment.rl.checkpoint import trainable_state

        return {"policy": trainable_state(self.policy), "critic": trainable_state(self.critic),
                "optimizer": self.optimizer.state_dict()}

    def save_engine(self, folder: Path) -> None:
        pass

    def load_checkpoint(self, state: dict[str, Any], folder: Path) -> None:
        from alignment.rl.checkpoint import load_trainable_state

        if "policy" not in state:
            raise ValueError(f"{folder} was written under DeepSpeed (its weights are in {folder / DeepSpeedModels.ENGINE_TAG}): "
                             "resume it with the same --launch config")
        load_trainable_state(self.policy, state["policy"])
        load_trainable_state(self.critic, state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2/3


def one_trainable_dtype(module: Any) -> Any:
    """Cast the trainable weights of ``module`` to one dtype, the one most of them have (by count); returns it.

    A ZeRO optimiser flattens every trainable weight into one buffer and refuses mixed dtypes. With
    LoRA, policy and critic adapters and the value heads are all fp32 (nothing changes); with full
    fine-tuning in bf16 the fp32 value head joins the bf16 backbones."""
    import logging

    trainable = [p for p in module.parameters() if p.requires_grad]
    counts: dict[Any, int] = {}
    for p in trainable:
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) <= 1:
        return next(iter(counts), None)
    dtype = max(counts, key=counts.__getitem__)
    cast = [p for p in trainable if p.dtype != dtype]
    for p in cast:
        p.data = p.data.to(dtype)
    logging.getLogger(__name__).info("DeepSpeed trains one dtype: %d trainable tensors (%d weights) cast to %s",
                                     len(cast), sum(p.numel() for p in cast), dtype)
    return dtype


class DeepSpeedModels:
    """Policy and critic in one :class:`ActorCritic` module, trained by one DeepSpeed engine."""

    ENGINE_TAG = "deepspeed"

    def __init__(self, accelerator: Any, policy: Any, reference: Any, critic: Any, optimizer: Any, *,
                 micro_batch_size: int, accumulation_steps: int, max_grad_norm: float,
                 gather_for_generation: bool = True) -> None:
        from foundation import distributed

        plugin = accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = accumulation_steps  # bookkeeping only: we own the boundary
        ds["train_batch_size"] = micro_batch_size * accumulation_steps * accelerator.num_processes
        ds["managed_gradient_accumulation"] = False
        ds["gradient_clipping"] = max_grad_norm
        accelerator.gradient_accumulation_steps = accumulation_steps  # else accelerate warns that the two disagree
        self.accelerator = accelerator
        self.zero_stage = int(plugin.zero_stage)
        self.reference = reference
        module = _actor_critic_class()(policy, critic)
        one_trainable_dtype(module)
        self.engine, self.optimizer = accelerator.prepare(module, optimizer)
        # ZeRO-3 without gathering: the policy generates from its partitions, every forward collective (sync)
        self.gather_for_generation = gather_for_generation or self.zero_stage < 3
        self.generation_sync = None if self.gather_for_generation else distributed.forward_sync(accelerator.device)

    @property
    def module(self) -> Any:
        return self.engine.module

    @property
    def policy(self) -> Any:
        return self.engine.module.policy

    @property
    def critic(self) -> Any:
        return self.engine.module.critic

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def logprobs(self, input_ids: Any, attention_mask: Any, R: int, temperature: float, *, reference: bool = False,
                 with_entropy: bool = False, entropy_grad: bool = False) -> tuple[Any, Any]:
        if reference and self.reference is not None:  # full fine-tuning: a frozen copy outside the engine
            return policy_logprobs(self.reference, input_ids, attention_mask, R, temperature)
        return self.engine("reference" if reference else "policy", input_ids, attention_mask, R, temperature,
                           with_entropy=with_entropy, entropy_grad=entropy_grad)

    def values(self, input_ids: Any, attention_mask: Any, R: int) -> Any:
        return self.engine("values", input_ids, attention_mask, R)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        yield  # caller-owned accumulation: backward accumulates, step() reduces

    def backward(self, loss: Any) -> None:
        # our losses are already weighted for the minibatch: no division by the accumulation steps
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> dict[str, float]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float(norm)} if max_grad_norm > 0 and norm is not None else {}

    @contextlib.contextmanager
    def generating(self) -> Iterator[Any]:
        """The policy with every weight present (ZeRO-3 gathers them and lifts its hooks meanwhile,
        so processes generating different numbers of tokens do not wait on each other;
        TRL's ``unwrap_model_for_generation`` does the same for one transformers model). Only the
        policy's weights are gathered: the critic stays partitioned while the policy generates.
        Without ``gather_for_generation`` the policy keeps its partitions and hooks (a model larger than
        one accelerator): pass ``generation_sync`` to ``generate``."""
        if self.zero_stage < 3 or not self.gather_for_generation:
            yield self.policy
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(self.policy.parameters())):
            remove_hooks(self.engine)
            try:
                yield self.policy
            finally:
                add_hooks(self.engine)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The trainable weights complete on every process (ZeRO-3 partitions them). Collective."""
        if self.zero_stage < 3:
            yield
            return
        import deepspeed

        params = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield

    def checkpoint_state(self) -> dict[str, Any]:
        return {}  # weights and optimiser partitions are in the engine's checkpoint

    def save_engine(self, folder: Path) -> None:
        """Every process writes its partition (collective)."""
        self.engine.save_checkpoint(str(folder), tag=self.ENGINE_TAG, exclude_frozen_parameters=True)

    def load_checkpoint(self, state: dict[str, Any], folder: Path) -> None:
        if not (folder / self.ENGINE_TAG).is_dir():
            raise FileNotFoundError(f"{folder / self.ENGINE_TAG} is missing: the checkpoint was not written under DeepSpeed; "
                                    "resume it with the launch it was written under")
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.ENGINE_TAG, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")


def prepare_models(accelerator: Any, policy: Any, reference: Any, critic: Any, optimizer: Any, *, micro_batch_size: int,
                   accumulation_steps: int, max_grad_norm: float,
                   gather_for_generation: bool = True) -> SeparateModels | DeepSpeedModels:
    from foundation import distributed

    if distributed.uses_deepspeed():
        return DeepSpeedModels(accelerator, policy, reference, critic, optimizer, micro_batch_size=micro_batch_size,
                               accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
                               gather_for_generation=gather_for_generation)
    return SeparateModels(accelerator, policy, reference, critic, optimizer)
