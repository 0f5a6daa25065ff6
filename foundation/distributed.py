"""Process-group plumbing shared by every stage, so parallelism comes from launch configs only.

A stage never branches on how it was launched. It calls :func:`init` first; under a multi-process
launch (``torchrun``, ``accelerate launch``, ``align ... --launch CONFIG``) that creates the
Accelerate process state with the backend the hardware needs (``gloo`` on CPU, ``nccl`` on GPUs)
*before* any trainer exists. Creating it first is what makes DeepSpeed work on CPU (see
ENVIRONMENT.md: otherwise the trainer's own state disagrees with DeepSpeed's and batch-size
assertions fail); trainers then reuse it (``accelerator_config={"use_configured_state": True}``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def uses_fsdp() -> bool:
    """Launched under an FSDP config (accelerate sets this for every process it starts)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


_STATE: Any = None


def init() -> Any:
    """Create the process state once (None for a single process that was not launched with DeepSpeed).

    A DeepSpeed launch of one process (``--nproc 1``) gets the state too: DeepSpeed always runs in a
    process group, and on a CPU only the gloo state made here carries it."""
    global _STATE
    if _STATE is not None or not (is_distributed() or (uses_deepspeed() and "LOCAL_RANK" in os.environ)):
        return _STATE
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        _STATE = PartialState(backend="nccl")
    elif uses_deepspeed():
        # DeepSpeed on CPU: accelerate's DeepSpeed path runs only with cpu=False; gloo carries it.
        _STATE = PartialState(backend="gloo")
    else:
        # Plain data parallel on CPU: only cpu=True makes accelerate use MULTI_CPU and wrap models
        # in DDP. (With cpu=False and no GPU it reports DistributedType.NO although the process group
        # exists, and every rank silently trains its own copy.)
        if uses_fsdp() and is_main():
            import logging

            logging.getLogger(__name__).warning(
                "FSDP launch on a machine without a GPU: accelerate runs FSDP on GPUs only, so this runs as plain "
                "data parallel (DDP over gloo): every process holds the whole model")
        _STATE = PartialState(cpu=True, backend="gloo")
    if _STATE.num_processes > 1 and str(_STATE.distributed_type) == "DistributedType.NO":
        raise RuntimeError("multi-process launch, but accelerate set up no distributed training (DistributedType.NO)")
    return _STATE


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Load models whole on every process, also under a DeepSpeed launch.

    Once accelerate has set DeepSpeed up, transformers loads every model under ZeRO-3's
    ``zero.Init``, partitioned across processes: right for what an engine trains, wrong for models
    run outside one (frozen reward models, a critic copied from a loaded model). Inside this
    context they load whole; the engine partitions what it is given when it is created."""
    if not uses_deepspeed():
        yield
        return
    from accelerate.state import AcceleratorState
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()


def zero3() -> bool:
    """Launched under DeepSpeed ZeRO stage 3 (after :func:`init` and the Accelerator exist)."""
    if not uses_deepspeed():
        return False
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState().deepspeed_plugin
    return plugin is not None and int(plugin.zero_stage) == 3


_FROZEN_ENGINES: list[Any] = []  # the inference engines of partitioned frozen models (kept alive with their hooks)


def partition_frozen(model: Any) -> Any:
    """Partition a frozen model (a reward model, a judge, a full fine-tuning reference) over the
    processes under ZeRO-3, as OpenRLHF's DeepSpeed inference engines do: each process keeps 1/world
    of every weight (above the launch's persistence threshold) and a forward gathers them one module
    at a time. A forward is then a collective call: every process must run as many as the others
    (:func:`forwards_to_match`). Outside ZeRO-3 the model is returned as it is.

    The model stays the same object (its parameters become ZeRO-3 parameters), so whatever holds it
    (a scorer, the actor-critic) keeps working. Load it on the CPU (:func:`frozen_placement`): it is
    partitioned one parameter at a time, so the accelerator holds only partitions. The precision
    follows the model's weights; the launch's ``offload_param`` device and persistence threshold apply."""
    if not zero3() or partitioned(model):
        return model
    import deepspeed
    import torch
    from accelerate.state import AcceleratorState

    launch = AcceleratorState().deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    threshold = launch.get("stage3_param_persistence_threshold", "auto")
    if not isinstance(threshold, int):  # accelerate's "auto": 10 x hidden size, as for the trained models
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        threshold = 10 * hidden if hidden else 100_000
    dtypes = {p.dtype for p in model.parameters()}
    offload = launch.get("offload_param", {}) or {}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": threshold,
                              "offload_param": {"device": offload.get("device", "none")}},
        "bf16": {"enabled": torch.bfloat16 in dtypes},
        "fp16": {"enabled": torch.float16 in dtypes and torch.bfloat16 not in dtypes},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for p in model.parameters():
        p.requires_grad_(False)
    # one parameter at a time: moved to this process's device, partitioned, the rest freed (a model
    # loaded on the CPU never stands whole on an accelerator); the engine then adds the gathering hooks
    deepspeed.zero.Init(module=model, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    _FROZEN_ENGINES.append(engine)
    return engine.module


def frozen_placement(device: str, dtype: str = "auto") -> tuple[str, str]:
    """(device, dtype) to load a frozen model with: under ZeRO-3 the CPU (:func:`partition_frozen` moves
    its partitions to the accelerator) in the dtype ``dtype`` resolves to on ``device`` (bf16 on a GPU,
    not the CPU's fp32); else ``(device, dtype)``."""
    if not zero3():
        return device, dtype
    from foundation.precision import dtype_name

    return "cpu", dtype_name(dtype, device)


def partitioned(model: Any) -> bool:
    """Whether the model's parameters are ZeRO-3 partitions (a forward is then collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def forwards_to_match(count: int, device: Any) -> int:
    """How many extra (dummy) forwards this process must run of a partitioned model so that every
    process runs as many as the busiest one: ``max(count over processes) - count``. Collective."""
    if not is_distributed():
        return 0
    import torch
    import torch.distributed as dist

    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) - count


def forward_sync(device: Any) -> Callable[[bool], bool] | None:
    """For generating from partitioned (ZeRO-3) weights: ``sync(running)`` tells the other processes whether this
    one is still generating and returns whether any is (collective; called before every forward, see
    ``foundation.generation.engine``). None for one process."""
    if not is_distributed():
        return None
    import torch
    import torch.distributed as dist

    def sync(running: bool) -> bool:
        t = torch.tensor([int(running)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    return sync


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` for one process. A collective call."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    init()
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard(n: int) -> range:
    """This process's contiguous share of ``n`` items (the first ``n % world`` processes take one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def barrier() -> None:
    if is_distributed():
        init().wait_for_everyone()


def machines() -> int:
    """How many machines the launch spans (torchrun's ``GROUP_WORLD_SIZE``, else world / local world size)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))
    return int(os.environ.get("GROUP_WORLD_SIZE", str(max(1, world_size() // max(1, local)))))


def check_shared_folder(folder: Any) -> None:
    """On several machines, every rank must see the run folder the main rank writes (checkpoints, the
    on-disk datasets that ranks share, the final model): the main rank writes a random token there and
    every rank reads it back, or the stage stops with what to do."""
    if not is_distributed() or machines() < 2:
        return
    import secrets
    from pathlib import Path

    import torch.distributed as dist

    token_file = Path(folder) / ".shared-folder-check"
    box = [secrets.token_hex(8) if is_main() else None]
    if is_main():
        token_file.write_text(box[0])
    dist.broadcast_object_list(box, src=0)
    barrier()
    seen = token_file.read_text() if token_file.is_file() else None
    ok = [seen == box[0]]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, ok[0])
    barrier()
    if is_main():
        token_file.unlink(missing_ok=True)
    if not all(everyone):
        missing = [r for r, v in enumerate(everyone) if not v]
        raise RuntimeError(f"ranks {missing} do not see {folder}: a run on several machines needs run.root on a "
                           "filesystem every machine shares (NFS, Lustre, a cluster's home), for checkpoints, the "
                           "datasets the ranks share on disk and the final model")


def shutdown() -> bool:
    """End the process group before the interpreter exits.

    Left to interpreter shutdown, a gloo (or NCCL) process group is torn down while its worker
    threads may still be joinable, and a rank can abort with "terminate called without an active
    exception" (SIGABRT) after its work is done, failing the whole launch. Each rank destroys its
    group explicitly (no barrier: a rank that failed must not leave the others waiting). True when there was one."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    torch.distributed.destroy_process_group()
    return True


def exit_rank(code: int) -> NoReturn:
    """End a rank of a multi-process launch, its work done and its process group ended (:func:`shutdown`), without
    the interpreter's finalisation.

    ``destroy_process_group`` drops the group, not the collective handles other objects still hold (DeepSpeed ZeRO-3
    keeps its prefetch all-gathers): gloo's worker threads can then release tensors while the interpreter is torn
    down and the rank aborts with "terminate called without an active exception" (SIGABRT) after its work is done,
    failing the launch (seen once in ``test_ppo_resumes_under_zero3``; the mechanism is pytorch/pytorch#179291's).
    Logs and the standard streams are flushed first; nothing this project registers with ``atexit`` is skipped
    (there is none; wandb is finished by ``foundation.runs``)."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def trainer_state_kwargs() -> dict[str, Any]:
    """Extra TrainingArguments so a TRL/transformers trainer reuses the state created by :func:`init`."""
    if _STATE is None:
        return {}
    return {"accelerator_config": {"use_configured_state": True}}


def fingerprints(model: Any) -> list[float] | None:
    """A float64 checksum of the model's weights from every rank (None for one process).

    Replicas in sync give identical numbers. Under ZeRO-3 the parameters are partitioned, so they
    are gathered first. This is a collective call: every rank must make it.
    """
    if not is_distributed():
        return None
    import contextlib

    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters()]
    ctx: Any = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx, torch.no_grad():
        total = 0.0
        for i, p in enumerate(params):
            d = p.detach().double()
            total += float(d.sum()) + 0.5 * float((d * d).sum()) * (1 + i % 7)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, total)
    return [float(x) for x in gathered]
