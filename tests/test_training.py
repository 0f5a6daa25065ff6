"""trainer_kwargs: the CPU defaults (fp32, no activation checkpointing; measured in benchmarks/defaults.py)
and explicit bf16 autocast on a CPU build valid TrainingArguments."""

from __future__ import annotations

import pytest
import torch

from foundation.runs import RunConfig
from foundation.training import TrainConfig, trainer_kwargs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults_and_bf16_autocast(tmp_path):
    from transformers import TrainingArguments

    kw = trainer_kwargs(TrainConfig(), RunConfig(), tmp_path, has_eval=False)
    assert kw["bf16"] is False and kw["fp16"] is False and kw["activation_checkpointing"] is False and "use_cpu" not in kw
    args = TrainingArguments(**trainer_kwargs(TrainConfig(precision="bf16"), RunConfig(), tmp_path, has_eval=False))
    assert args.bf16 and args.use_cpu  # without use_cpu transformers raises "Your setup doesn't support bf16/gpu"


def test_checkpointing_arguments_follow_what_transformers_knows(tmp_path):
    """transformers 5.23 (the pin) says activation_checkpointing; 5.17 (on the GPU check's machine) only
    gradient_checkpointing: the arguments are named after the fields TrainingArguments has."""
    from foundation.training import checkpointing_kwargs

    old = {"gradient_checkpointing", "gradient_checkpointing_kwargs", "output_dir"}
    assert checkpointing_kwargs(True, old) == {"gradient_checkpointing": True,
                                               "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpointing_kwargs(False, old) == {"gradient_checkpointing": False}
    new = old | {"activation_checkpointing", "activation_checkpointing_kwargs"}
    assert checkpointing_kwargs(True, new) == {"activation_checkpointing": True,
                                               "activation_checkpointing_kwargs": {"use_reentrant": False}}
    with pytest.raises(RuntimeError, match="neither"):
        checkpointing_kwargs(True, {"output_dir"})
    from transformers import TrainingArguments

    kw = trainer_kwargs(TrainConfig(gradient_checkpointing=True), RunConfig(), tmp_path, has_eval=False)
    args = TrainingArguments(**kw)  # the installed transformers accepts the names chosen for it
    assert args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)
