"""Reward models: training (``reward.rm``), scoring (``reward.scorer``, ``reward.model``), the
combined reward (``reward.combine``) and accuracy reports (``reward.evaluate``).

    scorer = reward.load_scorer("runs/demo/rm_helpful")   # implements reward.scorer.RewardScorer
"""

from reward.model import RewardModelScorer, load_scorer
from reward.scorer import FunctionScorer, RewardScorer

__all__ = ["FunctionScorer", "RewardModelScorer", "RewardScorer", "load_scorer"]
