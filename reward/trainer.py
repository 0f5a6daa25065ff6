"""TRL's RewardTrainer with our loss: the Llama 2 margin loss plus the optional safety auxiliary loss.

Kept apart from ``reward/rm.py`` because it imports TRL at module level (``align rm --help`` must
not). TRL 1.16's RewardTrainer already gives what the stage needs: the ``margin`` column and
``-log σ(r_c - r_r - m)``, the pair collator (chosen then rejected in one padded batch), peft
SEQ_CLS models (the ``score`` head is trained and saved through ``modules_to_save``), checkpoints
with optimiser/scheduler/RNG/data position for ``--resume``, evaluation and DDP/DeepSpeed.

What it lacks is the safety auxiliary loss (Llama 2 Table 29): a binary safe/unsafe term on each
response's score, which needs each response's label in the batch. So the collator adds a
``safe`` tensor, and ``compute_loss`` is overridden to call the pure losses in
``reward.losses`` (the same functions the unit tests check by hand). Everything else is TRL's.
An own loop would have to re-implement checkpoint/resume and distributed training; a subclass
overriding one method stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from reward.losses import pairwise_loss, safety_aux_loss


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator plus ``safe`` [2B]: 1 safe, 0 unsafe, -1 unlabelled (chosen then rejected)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["safe"] = torch.tensor([e["chosen_safe"] for e in examples] + [e["rejected_safe"] for e in examples],
                                     dtype=torch.float32)
        return batch


class LlamaRewardTrainer(RewardTrainer):
    """RewardTrainer whose loss is ``pairwise_loss(+margin) + safety_aux_weight * safety_aux_loss``."""

    def __init__(self, *args: Any, safety_aux_weight: float = 0.0, **kwargs: Any) -> None:
        self.safety_aux_weight = safety_aux_weight
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)  # [2B]: the chosen responses, then the rejected ones
        chosen, rejected = rewards.chunk(2)
        ranking = pairwise_loss(chosen, rejected, inputs.get("margin"))
        loss = ranking
        if self.safety_aux_weight > 0:
            aux = safety_aux_loss(rewards, inputs["safe"])
            loss = loss + self.safety_aux_weight * aux
            self._metrics[mode]["safety_aux_loss"].append(self.accelerator.gather_for_metrics(aux.detach()).mean().item())

        with torch.no_grad():
            gather = self.accelerator.gather_for_metrics
            self._metrics[mode]["ranking_loss"].append(gather(ranking.detach()).mean().item())
            # one value per pair, so the logged mean is over pairs, not a mean of batch means (a small last
            # batch would otherwise weigh as much as a full one)
            self._metrics[mode]["accuracy"].extend(gather((chosen > rejected).float()).tolist())
            self._metrics[mode]["reward_gap"].extend(gather(chosen - rejected).tolist())
            self._metrics[mode]["mean_reward"].append(gather(rewards.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss
