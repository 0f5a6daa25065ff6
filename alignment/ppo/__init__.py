"""Proximal policy optimisation (PPO) against the combined helpfulness/safety reward, on Accelerate.

    align ppo --config configs/ppo.yaml [key=value ...] [--resume]
    align ppo --config configs/ppo.yaml --launch configs/accelerate/ddp.yaml    # several processes (DDP)
    align ppo --config configs/ppo.yaml --launch configs/accelerate/zero3.yaml  # DeepSpeed ZeRO-2/3

How the policy and the critic are wrapped, stepped and checkpointed under each launch is in
:mod:`alignment.rl.actor_critic` (two DDP models, or one DeepSpeed engine holding both).

Each iteration runs three plain steps over a :class:`~alignment.rl.rollout.Rollout`:

1. **Make experience.** Sample one response per prompt from the policy (batched, KV cache,
   temperature/top-p); score (prompt, response) with the reward: Llama 2's piecewise combination
   of the helpfulness and safety reward models (eq. 4: the safety score on safety prompts or when
   sigmoid(R_s) < 0.15, else the helpfulness score, as a logit); normalise it with statistics of
   the global batch, subtract a penalty from responses that never emitted EOS, clip. Then, without
   gradients: log-probs of the sampled tokens under the policy (pi_old) and the reference (pi_ref),
   and the critic's values.
2. **Advantages.** Per-token reward r_t = -beta * KL_t (k1 or k3 estimator, clamped) plus the
   sequence score on the last token; beta fixed or adapted towards a target KL (Ziegler et al.);
   GAE with gamma and lambda; advantages whitened over the global batch.
3. **Update.** ``ppo.epochs`` passes over the rollout in shuffled minibatches, one optimiser step
   per minibatch (micro-batches accumulate gradients): clipped surrogate policy loss
   (- entropy_coef * entropy) for the actor, vf_coef * clipped value loss for the critic (two
   backward passes: actor and critic share no trainable weights, and only one graph is alive).

**PPO-Lagrangian** (``reward.rule=safe_rlhf``, as safe-rlhf's ``ppo_lag`` trainer; math in
:mod:`alignment.rl.lagrangian`): the reward is the helpfulness score and the cost the negated
safety score, each normalised like the reward above (no missing-EOS term on the cost), each with
its own KL-shaped per-token signal, critic (the cost critic starts from the safety reward model,
negated) and GAE. Before step 2 of every iteration, λ = exp(log λ) takes one dual-ascent step on
the iteration's global mean episode cost (raw, unnormalised) against ``lagrangian.cost_limit``,
starting from ``reward.cost_weight``; the policy follows (A_r - λ·A_c) / (1 + λ), each advantage
whitened first. λ is logged (``lagrangian/lambda``) and checkpointed. Departures from safe-rlhf: λ
moves once per iteration on that iteration's batch (safe-rlhf: once per update step on a window
of the last episodes), and the KL penalty enters the combination whole (see the module).
The held-out reward for early stopping stays ``helpful - cost_weight·cost`` with the initial λ, so
evaluations compare across iterations.

Every ``eval.every`` iterations the policy answers held-out prompts greedily and their mean
combined reward is logged; the run stops early when it has not improved for ``eval.patience``
evaluations, and ``model/`` holds the best policy by that measure.

Memory: with LoRA (the default) the reference policy is the policy's own base with the adapter
switched off, and the critic is a weight-sharing copy of the helpfulness reward model's backbone
(OpenRLHF initialises the critic from the reward model) with a second LoRA adapter and a trainable
value head. Frozen weights exist once: one policy base, one helpfulness RM (scorer + critic), one
safety RM, and reward-model tensors that equal the policy base's (the embeddings and norms of RMs
trained with LoRA from the same base) are tied to it. Actor and critic run their backward passes
one after the other. benchmarks/ppo_memory.py measures the peak against SFT-LoRA.

Where this departs from the papers and the usual implementations:
- Llama 2 trains all weights with lr 1e-6 and batch 512; the default here is LoRA (lr 1e-5) with
  small batches for CPUs. ``adapter.method=full`` trains all weights (the reference is then a
  frozen copy).
- The log-probs PPO uses are those of the temperature-scaled distribution the samples came from
  (as TRL and OpenRLHF do); top-p truncation is ignored in them.
- Rewards are whitened over each iteration's global batch (Llama 2's WHITEN) by default;
  ``reward.normalize=running`` uses running statistics instead (OpenRLHF).
- Losses are token-level means over the minibatch (TRL), not per-sequence means.
- Dropout is best left off (``adapter.dropout: 0``): it makes the first ratio pi/pi_old != 1.

Outputs in ``runs/<run.name>/ppo/``: ``model/`` (the policy adapter; ``model.name=runs/<run>/ppo``
loads it), ``metrics.jsonl``, ``samples.jsonl``, ``summary.json``, ``checkpoints/`` for
``--resume`` (trainable weights, optimiser, scheduler, KL controller, reward statistics, RNG
streams of every process, iteration; under DeepSpeed the weights and optimiser are DeepSpeed's
per-process checkpoint in ``deepspeed/``).
"""

from alignment.ppo.config import (
    CriticConfig,
    OptimConfig,
    PPOAlgoConfig,
    PPOConfig,
    PromptDataConfig,
    PPOEvalConfig,
    PPOLagrangianConfig,
    PPORewardConfig,
    SamplingConfig,
)
from alignment.ppo.experience import (
    build_models,
    build_optimizer,
    compute_advantages,
    load_prompts,
    make_experience,
    normalize_scores,
    prompt_batch,
    score_batch,
    score_responses,
)
from alignment.ppo.loop import Context, load_checkpoint, main, save_checkpoint, save_policy, setup
from alignment.ppo.update import evaluate, ppo_update
from reward.config import build_scorer

Config = PPOConfig
STAGE = "ppo"

__all__ = ["STAGE", "Config", "Context", "CriticConfig", "OptimConfig", "PPOAlgoConfig", "PPOConfig",
           "PromptDataConfig", "PPOEvalConfig",
           "PPOLagrangianConfig", "PPORewardConfig", "SamplingConfig", "build_models", "build_optimizer", "build_scorer",
           "compute_advantages", "evaluate", "load_checkpoint", "load_prompts", "main", "make_experience", "normalize_scores",
           "ppo_update", "prompt_batch", "save_checkpoint", "save_policy", "score_batch", "score_responses", "setup"]
