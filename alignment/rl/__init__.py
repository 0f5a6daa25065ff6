"""Reinforcement learning from a reward: the math of PPO as small pure functions, and its pieces.

- ``stats``: masked mean / variance / whitening (with an optional cross-process sum, so batch
  statistics are global under DDP), running moments, explained variance.
- ``distributions``: log-probabilities and entropy from logits.
- ``kl``: per-token KL estimators (k1, k2, k3) and the fixed / adaptive KL controllers.
- ``advantages``: KL-shaped per-token rewards and generalised advantage estimation (GAE).
- ``losses``: the clipped policy (surrogate) loss and the clipped value loss.
- ``lagrangian``: PPO-Lagrangian (safe-rlhf): the multiplier λ learned by dual ascent in log space,
  and the combined advantage (A_r - λ·A_c) / (1 + λ).
- ``rollout``: the ``Rollout`` batch that PPO's three steps pass along.
- ``critic``: the value model (a backbone that shares frozen weights + a value head), and a pair of
  critics (reward and cost) as one module.
- ``rule_rewards``: rule-based rewards (target length, a string, a character set) for smoke tests
  and for tasks with a checkable answer.

The PPO stage itself (``alignment/ppo/``) only calls these.
"""
