"""trainer_kwargs: the CPU defaults (fp32, no activation checkpointing; measured in benchmarks/defaults.py)
and explicit bf16 autocast on a CPU build valid TrainingArguments."""

from __future__ import annotations

import pytest
import torch

from alignment.runs import RunConfig
from alignment.training import TrainConfig, trainer_kwargs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults_and_bf16_autocast(tmp_path):
    from transformers import TrainingArguments

    kw = trainer_kwargs(TrainConfig(), RunConfig(), tmp_path, has_eval=False)
    assert kw["bf16"] is False and kw["fp16"] is False and kw["activation_checkpointing"] is False and "use_cpu" not in kw
    args = TrainingArguments(**trainer_kwargs(TrainConfig(precision="bf16"), RunConfig(), tmp_path, has_eval=False))
    assert args.bf16 and args.use_cpu  # without use_cpu transformers raises "Your setup doesn't support bf16/gpu"
