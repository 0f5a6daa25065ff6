"""The policy methods: each declares itself here once; the CLI, rounds, demo and tests read this table.

A method is a stage module exposing ``Config`` (a typed config dataclass) and ``main(cfg, resume=...)``.
What a round hands it follows from ``consumes``:

- ``reward``: the round's two reward models (``reward.helpful``, ``reward.safety``) and prompts from the
  project's prompt pool (``data.sources``), never a held-out one;
- ``comparisons``: the round's new comparisons (``data.sources``: the round's export; a round that
  sampled none gets the project's base comparisons).

Every method starts from the current policy (``model.name``) and writes its model to the round's
``policy/`` folder. ``pool``: the method keeps a pool of earlier rounds' samples (rejection
sampling), handed over as ``pool.round`` / ``pool.previous``.

Adding a method (docs/ARCHITECTURE.md, "A new policy method"): its module, one line below, its
YAML config in ``configs/``, and a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # exposes Config and main(cfg, resume=...)
    help: str  # one line for `align --help`
    consumes: Literal["reward", "comparisons"]
    config: str  # the default YAML config, relative to the repository root
    pool: bool = False  # keeps a pool of earlier rounds' samples (pool.round, pool.previous)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rs", "alignment.rs", "rejection sampling: best-of-K by reward, pool of all rounds' best, SFT on the pool",
           "reward", "configs/rs.yaml", pool=True),
    Method("ppo", "alignment.ppo",
           "PPO against the combined helpfulness/safety reward (own loop on Accelerate; LoRA, shared-weight critic)",
           "reward", "configs/ppo.yaml"),
    Method("grpo", "alignment.grpo", "critic-free online RL with TRL (GRPO or RLOO) against the same combined reward",
           "reward", "configs/grpo.yaml"),
    Method("dpo", "alignment.dpo",
           "direct preference optimisation on comparisons (TRL DPOTrainer), optional Llama 2 strength margin",
           "comparisons", "configs/dpo.yaml"),
    Method("kto", "alignment.kto",
           "Kahneman-Tversky optimisation on comparisons split into desirable / undesirable answers (TRL KTOTrainer)",
           "comparisons", "configs/kto.yaml"),
)}


def get(name: str) -> Method:
    """The method called ``name``; a clear error naming the known ones otherwise."""
    if name not in METHODS:
        raise KeyError(f"unknown policy method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
