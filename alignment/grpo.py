"""Critic-free online RL with TRL: GRPO or RLOO, with our combined helpfulness/safety reward.

    align grpo --config configs/grpo.yaml [key=value ...] [--resume]
    align grpo --config configs/grpo.yaml grpo.algorithm=rloo

Both sample ``grpo.num_generations`` responses per prompt and use the group itself as the baseline
instead of a learned critic:

- GRPO (Shao et al. 2024, arXiv:2402.03300): advantage = (r - mean of the group) / std of the group
  (``grpo.scale_rewards``), clipped surrogate loss, KL to the reference weighted by ``grpo.beta``.
- RLOO (Ahmadian et al. 2024, arXiv:2402.14740): advantage = r - mean of the *other* responses to the
  same prompt (leave-one-out).

The reward is the same as PPO's (``reward``: Llama 2's piecewise combination of the helpfulness and
safety reward models, the helpfulness model alone, or a rule-based function), called by TRL as a
reward function; helpfulness and safety scores are logged beside the combined one. With LoRA the
reference is the policy with its adapter disabled (TRL does this), so nothing is copied.

This stage is a thin configuration of TRL's GRPOTrainer / RLOOTrainer: the loop, checkpoints and
``--resume`` are TRL's. Departures: rewards are not whitened over the batch as in our PPO (the group
baseline plays that part); responses without EOS get ``reward.missing_eos_penalty`` subtracted from
their raw score.

Outputs in ``runs/<run.name>/grpo/``: ``model/`` (adapter + tokenizer; ``model.name=runs/<run>/grpo``
loads it), ``metrics.jsonl``, ``summary.json``, ``checkpoints/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from foundation import distributed
from foundation.adapters import AdapterConfig, peft_config, set_adapter_base
from foundation.config import check, option
from foundation.models import ModelConfig
from alignment.ppo import build_scorer, load_prompts, score_responses
from alignment.rl.config import OnlineRewardConfig, PromptDataConfig
from foundation.runs import MetricsLogger, RunConfig, last_checkpoint, start_stage
from foundation.training import TrainConfig, metrics_callback, train_resumed, trainer_kwargs

log = logging.getLogger(__name__)
STAGE = "grpo"


@dataclass
class GroupAlgoConfig:
    """The critic-free algorithm and its sampling."""

    algorithm: Literal["grpo", "rloo"] = option("grpo", "grpo (group mean/std baseline) or rloo (leave-one-out baseline)")
    num_generations: int = option(4, "responses sampled per prompt (the group); train.batch_size x grad_accum x "
                                     "processes must be a multiple")
    beta: float = option(0.04, "KL coefficient against the reference (adapter off); 0 = no reference pass")
    epsilon: float = option(0.2, "policy ratio clip")
    num_iterations: int = option(1, "optimisation passes over each generated batch (mu)")
    loss_type: str = option("dapo", "GRPO loss aggregation (grpo, dr_grpo, dapo, bnpo, ...; see TRL's GRPOConfig)")
    scale_rewards: Literal["group", "batch", "none"] = option("group", "GRPO: divide advantages by the group's std, the batch's, "
                                                                       "or not at all (Dr. GRPO)")
    max_new_tokens: int = option(96, "response length limit")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling threshold")
    mask_truncated: bool = option(False, "exclude responses that hit the length limit from the loss (DAPO)")

    def __post_init__(self) -> None:
        check(self.num_generations >= 2, "num_generations",
              f"must be >= 2 (a group needs a baseline), got {self.num_generations}")
        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check(0 < self.epsilon < 1, "epsilon", f"must be in (0, 1), got {self.epsilon}")
        check(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class GroupRLConfig:
    """GRPO / RLOO with TRL and our reward."""

    run: RunConfig = option(factory=RunConfig, doc="run name, output folder, seed, tracking")
    model: ModelConfig = option(factory=ModelConfig,
                                doc="the policy to start from (an SFT output: its LoRA adapter is merged first)")
    adapter: AdapterConfig = option(factory=lambda: AdapterConfig(dropout=0.0), doc="lora (reference = adapter off) or full")
    data: PromptDataConfig = option(factory=PromptDataConfig, doc="prompts (held-out ones are scored every train.eval_steps)")
    reward: OnlineRewardConfig = option(factory=OnlineRewardConfig,
                                        doc="reward models or rule-based reward (as for PPO, without its normalisation)")
    grpo: GroupAlgoConfig = option(factory=GroupAlgoConfig, doc="GRPO or RLOO, and their sampling")
    train: TrainConfig = option(factory=lambda: TrainConfig(batch_size=8, lr=1e-5, lr_scheduler="constant", warmup_ratio=0.0,
                                                            max_steps=100, logging_steps=1),
                                doc="optimisation (batch_size counts responses: prompts x num_generations)")

    def __post_init__(self) -> None:
        check(self.adapter.method in ("lora", "full"), "adapter.method", f"grpo trains lora or full, got {self.adapter.method!r}")
        check(self.train.batch_size * self.train.grad_accum % self.grpo.num_generations == 0, "train.batch_size",
              f"batch_size x grad_accum ({self.train.batch_size * self.train.grad_accum}) must be a multiple of "
              f"grpo.num_generations ({self.grpo.num_generations})")


Config = GroupRLConfig


def reward_function(scorer: Any, missing_eos_penalty: float, eos_ids: set[int]) -> Any:
    """Our scorer as a TRL reward function: (prompts, completions, completion_ids, is_safety, ...) -> floats.

    TRL passes conversational completions as [{"role": "assistant", "content": ...}]; a completion
    ended with EOS when its last token id is an EOS id."""

    def combined(prompts: list, completions: list, completion_ids: list, is_safety: list, log_metric: Any = None,
                 **_: Any) -> list[float]:
        import torch

        from data.schemas import PromptRecord

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        records = [PromptRecord(list(p), "safety" if s else "helpfulness") for p, s in zip(prompts, is_safety)]
        raw = score_responses(scorer, records, texts)
        finished = torch.tensor([bool(ids) and ids[-1] in eos_ids for ids in completion_ids])
        if log_metric is not None:
            for name, values in raw.items():
                if name != "combined":
                    log_metric(f"reward/{name}", values.mean().item())
            log_metric("response/eos_fraction", finished.float().mean().item())
        return (raw["combined"] - missing_eos_penalty * (~finished).float()).tolist()

    return combined


def engine_trainer(base: type) -> type:
    """``base`` (TRL's GRPOTrainer or RLOOTrainer) with its transformers generation replaced by our
    engine (:mod:`foundation.generation`: merged adapter, shared prefill of the group's identical
    prompts, finished rows leaving the batch). Where the engine does not implement what TRL was asked
    for (vLLM, TRL's continuous batching, images, min_p, a repetition penalty, extra generation
    kwargs) TRL's own path runs. Logs ``time/generate`` and ``perf/gen_tokens_per_s``."""

    class EngineTrainer(base):  # type: ignore[misc, valid-type]
        def _engine_supported(self, images: Any, multimodal_fields: Any) -> bool:
            return not (self.use_vllm or getattr(self, "use_transformers_continuous_batching", False) or images
                        or multimodal_fields or self.min_p is not None or self.repetition_penalty != 1.0
                        or self.args.generation_kwargs)

        def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: Any, *args: Any, **kwargs: Any) -> Any:
            if not self._engine_supported(images, multimodal_fields):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            from trl.models import unwrap_model_for_generation

            from foundation.generation import Engine, SamplingParams

            params = SamplingParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                    top_p=self.top_p, top_k=self.top_k or 0)
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                             gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model, \
                    self._dist.summon_full_params(self.model_wrapped, recurse=False):
                engine = Engine(model, self._tokenizer, batch_size=max(1, len(prompt_ids)), eos_token_ids=self.eos_token_ids,
                                stop_at_pad=False)
                outputs, stats = engine.run([list(p) for p in prompt_ids], params)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["time/generate"].append(stats.seconds)
            self._metrics[mode]["perf/gen_tokens_per_s"].append(stats.tokens_per_s)
            completions = [o.response_ids for o in outputs]
            return (completions, None) if self._returns_logprobs else completions

    EngineTrainer.__name__ = EngineTrainer.__qualname__ = f"Engine{base.__name__}"
    import inspect

    # TRL's GRPO returns (completion ids, logprobs) and takes num_generations; its RLOO returns the ids alone
    EngineTrainer._returns_logprobs = "num_generations" in inspect.signature(base._generate_single_turn).parameters
    return EngineTrainer


def build_trainer(cfg: GroupRLConfig, out: Path, logger: MetricsLogger | None = None) -> Any:
    import datasets

    from foundation.models import load_causal_lm, load_tokenizer
    from foundation.precision import master_dtype, select_device

    tokenizer = load_tokenizer(cfg.model.name, revision=cfg.model.revision)
    train, val = load_prompts(cfg.data, tokenizer, cfg.run.seed)
    def to_ds(rs):
        return datasets.Dataset.from_list([{"prompt": r.messages, "is_safety": r.is_safety} for r in rs])
    model = load_causal_lm(cfg.model.name, dtype=master_dtype(cfg.model.dtype, cfg.adapter.method, cfg.model.device),
                           device=cfg.model.device, revision=cfg.model.revision,
                           attn_implementation=cfg.model.attn_implementation)
    scorer, _ = build_scorer(cfg.reward, str(select_device(cfg.model.device)))
    eos = model.generation_config.eos_token_id
    reward_fn = reward_function(scorer, cfg.reward.missing_eos_penalty, set(eos if isinstance(eos, list) else [eos]))
    common = dict(
        **trainer_kwargs(cfg.train, cfg.run, out, has_eval=True), num_generations=cfg.grpo.num_generations,
        max_completion_length=cfg.grpo.max_new_tokens, temperature=cfg.grpo.temperature, top_p=cfg.grpo.top_p,
        beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, num_iterations=cfg.grpo.num_iterations,
        mask_truncated_completions=cfg.grpo.mask_truncated, disable_dropout=True, log_completions=False,
    )
    if cfg.grpo.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(**common, loss_type=cfg.grpo.loss_type, scale_rewards=cfg.grpo.scale_rewards)
        trainer_cls = engine_trainer(GRPOTrainer)
    else:
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(**common)
        trainer_cls = engine_trainer(RLOOTrainer)
    return trainer_cls(
        model=model, reward_funcs=reward_fn, args=args, train_dataset=to_ds(train), eval_dataset=to_ds(val[:32]),
        processing_class=tokenizer, peft_config=peft_config(cfg.adapter, "CAUSAL_LM"),
        callbacks=[metrics_callback(logger)] if logger else None,
    )


def main(cfg: GroupRLConfig, *, resume: bool = False) -> Path:
    import torch

    out = start_stage(cfg, STAGE, resume=resume)
    checkpoint = last_checkpoint(out) if resume else None
    torch.manual_seed(cfg.run.seed)
    logger = MetricsLogger(out, run=cfg.run, stage=STAGE, config=cfg, enabled=distributed.is_main(),
                           resume_step=int(checkpoint.name.split("-")[-1]) if checkpoint else None)
    trainer = build_trainer(cfg, out, logger)
    if checkpoint:
        log.info("resuming from %s", checkpoint)
    t0 = time.time()
    result = train_resumed(trainer, checkpoint)
    seconds = time.time() - t0
    summary: dict[str, Any] = {"algorithm": cfg.grpo.algorithm, "train_loss": result.training_loss,
                               "global_step": trainer.state.global_step,
                               "train_seconds": round(seconds, 2), "resumed_from": checkpoint.name if checkpoint else None}
    summary.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    summary["rank_fingerprints"] = distributed.fingerprints(trainer.model_wrapped)  # collective; None for one process
    # every rank calls save_model: under ZeRO-3 it gathers the partitioned weights (a collective); only rank 0 writes
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(model_dir)
        if cfg.adapter.method != "full":
            set_adapter_base(model_dir, cfg.model.name)
        logger.summary(summary)
        log.info("%s done: %s", cfg.grpo.algorithm.upper(), out)
    logger.close()
    return out
