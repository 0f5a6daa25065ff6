"""Stages under multi-process launch configs (CPU, 2 processes, gloo): every rank ends with the same
weights, and those match a single-process run with the same global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_align, write_jsonl
from safetensors.torch import load_file

from foundation.runs import read_metrics

pytestmark = pytest.mark.distributed

# ZeRO-2 (between DDP and ZeRO-3) runs for the reward model only, to keep the suite's time in check;
# zero3_offload also runs; fsdp.yaml runs as DDP on a CPU (with a warning)
LAYOUTS = ["ddp", "zero3"]
LAYOUTS_ALL = ["ddp", "zero2", "zero3"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the two ranks share two cores


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    model = stage_dir / "model"
    name = "model.safetensors" if (model / "model.safetensors").is_file() else "adapter_model.safetensors"
    weights = load_file(model / name)
    # DeepSpeed writes a tied lm_head explicitly; it is the embedding matrix
    head, emb = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if head is not None and emb is not None and torch.equal(head, emb):
        del weights["lm_head.weight"]
    return weights


def _initial_weights() -> dict[str, torch.Tensor]:
    from foundation.models import builtin_path

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(Path(builtin_path("tiny-llama")).glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-3) -> None:
    """Every tensor of the two runs agrees to ``rtol`` of what training changed in it (``|a - b| <= rtol |a - init|``;
    a new head, absent from the initial model, against its own size).

    Not elementwise: the ranks sum gradients in another order than one process, and Adam divides by sqrt(v), so a
    weight whose gradient is ~0 can move by ~lr on one machine and not on the other. Measured on an Intel Xeon
    (2026-12-02): the RM's worst tensor differs by 1.8e-4 of its update (one of 8,192 weights by 3.7e-5); a wrong
    gradient average or a mis-sharded batch differs by O(1)."""
    assert a.keys() == b.keys()
    init = _initial_weights()
    for k in a:
        x, y = a[k].float(), b[k].float()
        ref = init.get(k)
        scale = (x - ref.float()).norm() if ref is not None and ref.shape == x.shape else x.norm()
        assert (x - y).norm() <= rtol * scale + 1e-6, f"{k}: |a - b| = {(x - y).norm():.3g}, update {scale:.3g}"


def _run(stage: str, args: list[str], *extra: str, layout: str | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """``align <stage>``, under ``configs/accelerate/<layout>.yaml`` when given; it must succeed."""
    launch = ["--launch", str(REPO / f"configs/accelerate/{layout}.yaml")] if layout else []
    res = run_align(stage, *args, *extra, *launch, env=env)
    if res.returncode != 0:  # did the ranks die in the work or after it (at teardown)? what they finished tells
        root = next((a.split("=", 1)[1] for a in (*args, *extra) if a.startswith("run.root=")), None)
        done = sorted(str(p.relative_to(root)) for p in Path(root).rglob("summary.json")) if root else []
        raise AssertionError(f"align {stage} exited {res.returncode}; summary.json written: {done or 'none'}\n"
                             + res.stderr[-3000:])
    return res


def _ranks_agree(out: Path) -> dict:
    """The run's summary, after checking that both ranks ended with the same weights."""
    summary = json.loads((out / "summary.json").read_text())
    fp = summary["rank_fingerprints"]
    assert len(fp) == 2 and fp[0] == pytest.approx(fp[1], rel=1e-12)
    return summary


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    rows = []
    for i in range(48):
        a, b = (i * 7) % 50 + 1, (i * 13) % 50 + 1
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return write_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", rows)


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory, sft_data, tiny_model) -> Path:
    """The reference: one process, micro-batch 4."""
    root = tmp_path_factory.mktemp("single")
    _run("sft", _sft_args(sft_data, root), "train.batch_size=4")
    return root / "default" / "sft"


def _sft_args(data: Path, root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/sft.yaml"), "model.name=tiny-llama", "adapter.method=full", "run.wandb=disabled",
            f"data.sources=[{{path: {data}}}]", "data.val_fraction=0", "data.sample_prompts=0", "train.max_steps=6",
            "train.grad_accum=1", "train.lr=1e-3", "train.warmup_ratio=0", f"run.root={root}"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sft_matches_single_process(layout, tmp_path, sft_data, sft_single):
    _run("sft", _sft_args(sft_data, tmp_path), "train.batch_size=2", layout=layout)
    out = tmp_path / "default" / "sft"
    summary = _ranks_agree(out)
    _assert_same(_weights(out), _weights(sft_single))  # 2 x 2 == 1 x 4: same global batch, same result
    single = json.loads((sft_single / "summary.json").read_text())
    assert summary["train_loss"] == pytest.approx(single["train_loss"], rel=1e-4)


def _two_machines(stage: str, args: list[str], layout: str = "ddp", env: dict | None = None) -> None:
    """``align <stage>`` as two "machines" on this host: two launcher invocations, machine ranks 0 and 1, one
    process each (gloo), meeting at 127.0.0.1; both must succeed."""
    import os
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ONE_THREAD, "WANDB_MODE": "disabled", **(env or {})}
    procs = [subprocess.Popen([sys.executable, "-m", "alignment.cli", stage, *args, "--launch",
                               str(REPO / f"configs/accelerate/{layout}.yaml"), "--nproc", "1", "--num-machines", "2",
                               "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1", "--main-process-port",
                               str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"machine {rank}:\n{out[-3000:]}"


def test_two_machines_train_sft_to_the_weights_of_one_process(tmp_path, sft_data, sft_single):
    """Multi-node through the same launcher: 2 machines x 1 process (micro-batch 2) == 1 process x 4."""
    _two_machines("sft", [*_sft_args(sft_data, tmp_path), "train.batch_size=2"])
    out = tmp_path / "default" / "sft"
    _ranks_agree(out)
    _assert_same(_weights(out), _weights(sft_single))


def test_two_machines_train_dpo_and_ppo_to_the_weights_of_one_process(tmp_path, dpo_data, dpo_single, ppo_single):
    _two_machines("dpo", [*_dpo_args(dpo_data, tmp_path / "dpo"), "train.batch_size=2"])
    out = tmp_path / "dpo" / "default" / "dpo"
    _ranks_agree(out)
    _assert_same(_weights(out), _weights(dpo_single))
    _two_machines("ppo", [*PPO, "ppo.rollout_batch_size=4", "ppo.minibatch_size=4", f"run.root={tmp_path / 'ppo'}"],
                  env=PPO_ENV)
    _assert_same_run(ppo_single, tmp_path / "ppo" / "default" / "ppo", [1, 2])


SHARED_CHECK = """
import sys
from foundation import distributed
distributed.init()
try:
    distributed.check_shared_folder(sys.argv[1].format(rank=distributed.rank()))
    print("OK")
except RuntimeError as exc:
    print("REFUSED", exc)
distributed.shutdown()
"""


@pytest.mark.parametrize("shared", [True, False])
def test_two_machines_without_a_shared_run_folder_are_stopped_naming_the_ranks(tmp_path, shared):
    """Checkpoints, the final model and the datasets the ranks share are written by the main rank: on two
    machines whose run folders are not the same filesystem, every rank stops with what to do."""
    import os
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = str(tmp_path / ("run" if shared else "machine-{rank}"))
    for rank in (0, 1):
        Path(folder.format(rank=rank)).mkdir(exist_ok=True)
    procs = [subprocess.Popen([sys.executable, "-c", SHARED_CHECK, folder], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, **ONE_THREAD, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    last = [out.strip().splitlines()[-1] for out in outs]
    if shared:
        assert last == ["OK", "OK"]
        assert not (tmp_path / "run" / ".shared-folder-check").exists()  # the token is removed
    else:
        for line in last:
            assert line.startswith("REFUSED ranks [1] do not see") and "filesystem every machine shares" in line, line


def test_machine_flags_are_checked(tmp_path, sft_data):
    from foundation.launch import LaunchError, Machines, launch_command

    cmd, _, tmp = launch_command(REPO / "configs/accelerate/ddp.yaml", ["sft"], nproc=4,
                                 machines=Machines(num=2, rank=1, ip="10.0.0.1", port=29511))
    import yaml

    written = yaml.safe_load(Path(tmp).read_text())
    Path(tmp).unlink()
    assert (written["num_processes"], written["num_machines"], written["machine_rank"]) == (8, 2, 1)
    assert (written["main_process_ip"], written["main_process_port"]) == ("10.0.0.1", 29511)
    for machines, message in [(Machines(num=2, rank=2, ip="10.0.0.1"), "--machine-rank must be in 0 .. 1"),
                              (Machines(num=2, rank=0), "needs --main-process-ip"),
                              (Machines(num=0), "--num-machines must be >= 1")]:
        with pytest.raises(LaunchError, match=message):
            launch_command(REPO / "configs/accelerate/ddp.yaml", ["sft"], machines=machines)
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "--launch", "configs/accelerate/ddp.yaml", "--num-machines", "2",
                    "--machine-rank", "0")
    assert res.returncode == 2 and "needs --main-process-ip" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs fsdp.yaml runs FSDP")
def test_fsdp_on_a_cpu_says_it_runs_as_ddp(tmp_path, sft_data, sft_single):
    """accelerate runs FSDP on GPUs only: on a CPU the launch is plain data parallel, and says so."""
    res = _run("sft", _sft_args(sft_data, tmp_path), "train.batch_size=2", layout="fsdp", env=ONE_THREAD)
    assert res.stderr.count("FSDP launch on a machine without a GPU") == 1  # once, from the main process
    _assert_same(_weights(tmp_path / "default" / "sft"), _weights(sft_single))


def test_launch_rejects_a_missing_or_bad_config(tmp_path, sft_data):
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "--launch", "configs/accelerate/nope.yaml")
    assert res.returncode == 2 and "config file not found" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: WARP_DRIVE\n")
    res = run_align("sft", *_sft_args(sft_data, tmp_path), "--launch", str(bad))
    assert res.returncode == 2 and "WARP_DRIVE" in res.stderr


def test_cpu_config_with_several_processes_is_rewritten():
    """accelerate's `use_cpu: true` path would silently run one process: the launcher takes the
    multi-process path instead."""
    import yaml

    from foundation.launch import launch_command

    cfg = Path(REPO / "configs/accelerate/ddp.yaml")
    cmd, env, tmp = launch_command(cfg, ["sft"], nproc=None)
    assert tmp is None and "--config_file" in cmd and env["ALIGN_LAUNCHED"] == "1"
    cpu_cfg = Path(REPO / "tests" / "_cpu_tmp.yaml")
    cpu_cfg.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    try:
        cmd, env, tmp = launch_command(cpu_cfg, ["sft"])
        rewritten = yaml.safe_load(Path(tmp).read_text())
        assert rewritten["use_cpu"] is False and rewritten["distributed_type"] == "MULTI_GPU"
        Path(tmp).unlink()
    finally:
        cpu_cfg.unlink()


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory) -> Path:
    from test_reward import pair_rows

    return write_jsonl(tmp_path_factory.mktemp("rmdata") / "pairs.jsonl", pair_rows(48))


def _rm_args(data: Path, root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/rm_helpful.yaml"), "model.name=tiny-llama", "adapter.method=full",
            "run.wandb=disabled", f"data.sources=[{{path: {data}}}]", "data.val_fraction=0.25", "train.max_steps=5",
            "train.grad_accum=1", "train.lr=1e-3", "train.warmup_ratio=0", f"run.root={root}"]


@pytest.fixture(scope="module")
def rm_single(tmp_path_factory, rm_data, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("rmsingle")
    _run("rm", _rm_args(rm_data, root), "train.batch_size=4", env=ONE_THREAD)
    return root / "default" / "rm_helpful"


@pytest.mark.parametrize("layout", LAYOUTS_ALL)
def test_reward_model_matches_single_process(layout, tmp_path, rm_data, rm_single):
    _run("rm", _rm_args(rm_data, tmp_path / "multi"), "train.batch_size=2", layout=layout, env=ONE_THREAD)
    one, two = rm_single, tmp_path / "multi" / "default" / "rm_helpful"
    summary = _ranks_agree(two)
    _assert_same(_weights(two), _weights(one))
    ref = json.loads((one / "summary.json").read_text())
    assert summary["held_out_accuracy"] == ref["held_out_accuracy"]
    assert summary["reward_mean"] == pytest.approx(ref["reward_mean"], abs=1e-4)


# --------------------------------------------------------------------------- DPO


def _dpo_args(data: Path, root: Path) -> list[str]:
    return ["--config", str(REPO / "configs/dpo.yaml"), "model.name=tiny-llama", "adapter.method=full", "run.wandb=disabled",
            f"data.sources=[{{path: {data}}}]", "data.val_fraction=0.25", "train.max_steps=4", "train.grad_accum=1",
            "train.lr=1e-3", "train.warmup_ratio=0", f"run.root={root}"]


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> Path:
    from test_dpo import marker_pairs

    return write_jsonl(tmp_path_factory.mktemp("dpodata") / "pairs.jsonl", marker_pairs(32))


@pytest.fixture(scope="module")
def dpo_single(tmp_path_factory, dpo_data, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("dposingle")
    _run("dpo", _dpo_args(dpo_data, root), "train.batch_size=4", env=ONE_THREAD)
    return root / "default" / "dpo"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dpo_matches_single_process(layout, tmp_path, dpo_data, dpo_single):
    _run("dpo", _dpo_args(dpo_data, tmp_path), "train.batch_size=2", layout=layout, env=ONE_THREAD)
    out = tmp_path / "default" / "dpo"
    _ranks_agree(out)
    _assert_same(_weights(out), _weights(dpo_single))
    after = [json.loads((d / "eval.json").read_text())["after"] for d in (dpo_single, out)]
    assert after[0]["margin"] == pytest.approx(after[1]["margin"], abs=1e-4) and after[0]["n"] == after[1]["n"]


# --------------------------------------------------------------------------- PPO
# Sampling has to give the same responses under both layouts for the weights to be comparable: a
# nucleus of 1e-6 keeps only the most likely token (greedy samples), while PPO's log-probs stay
# those of the full temperature-1 distribution. The reward depends on the prompt, so the two ranks'
# batches have different reward means and spreads: per-rank whitening of rewards or advantages
# would give different updates from the single process's global whitening. Under DeepSpeed the
# policy and the critic are one engine (alignment/rl/actor_critic.py); ZeRO-3 also partitions
# their weights, gathers them to generate and to save, and gives the critic its own backbone.

PPO = ["--config", str(REPO / "configs/ppo.yaml"), "model.name=tiny-llama", "run.wandb=disabled", "run.log_level=warning",
       "reward.helpful=null", "reward.safety=null", "critic.init=policy", "reward.function=dist_rewards:prompt_length",
       "reward.missing_eos_penalty=0", "train.max_steps=2", "ppo.micro_batch_size=2", "ppo.epochs=1",
       "sampling.max_new_tokens=8", "sampling.top_p=1e-6", "train.lr=1e-2", "critic.lr=3e-3",
       "eval.every=0", "eval.max_prompts=4", "eval.keep_best=false"]
PPO_ENV = {**ONE_THREAD, "PYTHONPATH": str(REPO / "tests")}
# what the global batch determines; grad norms differ by design (DeepSpeed clips policy and critic together)
PPO_KEYS = ("reward/combined", "reward/combined_std", "kl/ref", "value/loss", "policy/loss", "value/explained_variance",
            "tokens/generated")


def _ppo(root: Path, per_rank_batch: int, *args: str, layout: str | None = None) -> Path:
    """One minibatch per iteration (minibatch = rollout batch, 2 micro-batches per process), so the
    shuffling order cannot matter."""
    b = per_rank_batch
    _run("ppo", PPO, f"ppo.rollout_batch_size={b}", f"ppo.minibatch_size={b}", f"run.root={root}", *args,
         layout=layout, env=PPO_ENV)
    return root / "default" / "ppo"


def _assert_same_run(one: Path, two: Path, steps: list[int]) -> None:
    _ranks_agree(two)
    _assert_same(_weights(two), _weights(one))
    a_rows, b_rows = [m for m in read_metrics(one) if m["step"] > 0], [m for m in read_metrics(two) if m["step"] > 0]
    assert [m["step"] for m in a_rows] == [m["step"] for m in b_rows] == steps
    for a, b in zip(a_rows, b_rows):
        for key in PPO_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def ppo_single(tmp_path_factory, tiny_model) -> Path:
    return _ppo(tmp_path_factory.mktemp("pposingle"), 8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ppo_matches_single_process_with_global_statistics(layout, tmp_path, ppo_single):
    multi = _ppo(tmp_path, 4, layout=layout)
    _assert_same_run(ppo_single, multi, [1, 2])
    for m in read_metrics(multi):
        # the global batch: 8 prompts either way, rewards that differ between the ranks' halves
        assert m["tokens/generated"] == 64 and m["reward/combined_std"] > 0.05
    if layout != "ddp":
        assert {"grad_norm"} <= set(read_metrics(multi)[0]) and "policy/grad_norm" not in read_metrics(multi)[0]


def test_ppo_generating_from_partitioned_weights_under_zero3_matches_single_process(tmp_path, tiny_model):
    """sampling.gather_for_generation=false (a policy larger than one accelerator): each process generates from its
    ZeRO-3 partitions, every forward gathering one layer at a time, and the one whose rollouts end sooner runs dummy
    forwards until the other is done. The same samples, statistics, validation answers and weights as one process:
    5 validation prompts generated 2 at a time are 3 and 2 per process, so one process decodes a third batch."""
    evals = ["eval.every=1", "eval.max_prompts=5", "sampling.batch_size=2"]
    one = _ppo(tmp_path / "single", 8, *evals)
    multi = _ppo(tmp_path / "zero3", 4, "sampling.gather_for_generation=false", *evals, layout="zero3")
    _assert_same_run(one, multi, [1, 2])
    rows = [m for m in read_metrics(multi) if m["step"] > 0]
    assert all("perf/generate_sync_forwards" in m for m in rows)  # the partitioned path ran, not the gathered one
    synced = [m["eval/generate_sync_forwards"] for m in read_metrics(multi) if "eval/generate_sync_forwards" in m]
    assert synced and min(synced) > 0  # the process with 2 prompts kept pace with the one with 3
    for a, b in zip(read_metrics(one), read_metrics(multi)):
        assert b["eval/reward_combined"] == pytest.approx(a["eval/reward_combined"], abs=1e-5)


def test_ppo_with_reward_models_under_zero3_matches_single_process(tmp_path, tiny_reward_models):
    """The real reward path under ZeRO-3 with full fine-tuning: both RMs, the judge and the frozen
    reference are partitioned over the two processes by DeepSpeed inference engines (defect D), the
    critic gets its own copy of the helpfulness RM's backbone, the best policy is gathered and saved.
    Uneven validation shards (5 prompts: 3 and 2, scored 2 at a time) make one process run a dummy
    forward so that the other's collective gathers finish."""
    rms = ["adapter.method=full", "train.lr=1e-3", f"reward.helpful={tiny_reward_models['helpful']}",
           f"reward.safety={tiny_reward_models['safety']}", "reward.function=null", "reward.batch_size=2",
           f"eval.judges={{rm: {tiny_reward_models['helpful']}}}", "eval.max_prompts=5",
           "critic.init=reward_model", "eval.every=1", "eval.keep_best=true", "eval.patience=0"]
    one = _ppo(tmp_path / "single", 8, *rms)
    three = _ppo(tmp_path / "zero3", 4, *rms, layout="zero3")
    _assert_same_run(one, three, [1, 2])
    for a, b in zip(read_metrics(one), read_metrics(three)):
        assert b["eval/reward_combined"] == pytest.approx(a["eval/reward_combined"], abs=1e-5)
        assert b["eval/reward_judge_rm"] == pytest.approx(a["eval/reward_judge_rm"], abs=1e-5)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, three)]
    assert summaries[0]["best_iteration"] == summaries[1]["best_iteration"]
    assert summaries[1]["model"] == "best"
    # each process holds half of every frozen reward model: the whole model's parameter bytes, counted here,
    # against what rank 0 holds (norms and the score head, under the persistence threshold, stay whole: ~1%)
    from foundation.models import load_causal_lm
    from reward.model import load_reward_model

    frozen = {f"rm_{name}": load_reward_model(str(tiny_reward_models[name]), device="cpu") for name in ("helpful", "safety")}
    frozen["reference"] = load_causal_lm("tiny-llama", device="cpu")
    for name, model in frozen.items():
        whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        assert summaries[0][f"weights_mib/{name}"] <= whole + 1e-3  # one process: whole (less what it shares)
        part = summaries[1][f"weights_mib/{name}"]
        assert 0.49 * whole <= part <= 0.52 * whole, (name, whole, part)


def test_ppo_resumes_under_zero3(tmp_path, tiny_model):
    """ZeRO-3 checkpoints are DeepSpeed's per-process partitions (weights and optimiser) plus our
    state: resuming from iteration 2 reproduces the uninterrupted iteration 3 and final weights."""
    args = ["train.max_steps=3", "eval.save_every=2"]
    whole = _ppo(tmp_path / "whole", 4, *args, layout="zero3")
    ckpt = whole / "checkpoints" / "checkpoint-2"
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "rng-0.pt").is_file() and (ckpt / "rng-1.pt").is_file()
    cut_root = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut_root)
    cut = cut_root / "default" / "ppo"
    for name in ("checkpoints/checkpoint-3", "model"):  # as if killed during iteration 3
        shutil.rmtree(cut / name)
    (cut / "summary.json").unlink()
    _run("ppo", PPO, "ppo.rollout_batch_size=4", "ppo.minibatch_size=4", f"run.root={cut_root}", *args,
         "--resume", layout="zero3", env=PPO_ENV)
    assert json.loads((cut / "summary.json").read_text())["resumed_from"] == "checkpoint-2"
    _assert_same_run(whole, cut, [1, 2, 3])


def test_ppo_under_fsdp_is_refused_before_any_work(tmp_path):
    """accelerate's FSDP2 prepares one model per Accelerator and PPO trains two (policy and critic): the launch is
    refused before any process starts, naming the config and the layouts that work; a process started under FSDP
    another way (accelerate launch --config_file fsdp.yaml) refuses too, before it writes anything."""
    from foundation.launch import launch_command

    cfg = REPO / "configs/accelerate/fsdp.yaml"
    res = run_align("ppo", *PPO, f"run.root={tmp_path}", "--launch", str(cfg), env=PPO_ENV)
    assert res.returncode == 2 and "launching:" not in res.stderr, res.stderr[-2000:]
    assert f"--launch {cfg}: align ppo cannot run under distributed_type FSDP" in res.stderr and "zero3.yaml" in res.stderr
    assert not (tmp_path / "default").exists()
    res = run_align("ppo", *PPO, f"run.root={tmp_path}", env={**PPO_ENV, "ACCELERATE_USE_FSDP": "true"})
    assert res.returncode == 2 and "align ppo cannot run under FSDP" in res.stderr and "zero3.yaml" in res.stderr
    assert not (tmp_path / "default").exists()
    cmd, env, tmp = launch_command(cfg, ["sft"])  # the one-model stages still launch under it
    assert "accelerate.commands.launch" in cmd and env["ALIGN_LAUNCH_CONFIG"] == str(cfg)


@pytest.mark.parametrize("layout", ["ddp", "zero3"])
def test_ppo_lagrangian_matches_single_process(layout, tmp_path, tiny_reward_models):
    """PPO-Lagrangian (two critics in one module; under ZeRO-3 both get their own backbone copies):
    λ moves on the global mean cost, so every rank holds the same λ, equal to the single process's."""
    rms = [f"reward.helpful={tiny_reward_models['helpful']}",
           f"reward.safety={tiny_reward_models['safety']}", "reward.function=null",
           "reward.rule=safe_rlhf", "critic.init=reward_model", "lagrangian.lambda_lr=0.5"]
    one = _ppo(tmp_path / "single", 8, *rms)
    two = _ppo(tmp_path / layout, 4, *rms, layout=layout)
    _assert_same_run(one, two, [1, 2])
    for a, b in zip(read_metrics(one), read_metrics(two)):
        for key in ("lagrangian/lambda", "cost/episode", "cost_value/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_shutdown_destroys_the_process_group(tmp_path):
    """A rank ends its process group itself before exit (left to interpreter teardown, gloo's
    threads can abort a finished rank with SIGABRT)."""
    import torch.distributed as dist

    from foundation.distributed import shutdown

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown()
    assert not dist.is_initialized()
    shutdown()  # nothing to end: a no-op


# --------------------------------------------------------------------------- GRPO


def test_grpo_under_zero3_saves_the_gathered_weights_from_every_rank(tmp_path, tiny_model):
    """A ZeRO-3 save is collective (the partitions are gathered): with rank 0 alone calling save_model it waited
    for the other rank forever. Every rank calls it; the saved weights are whole and match every rank's."""
    args = ["--config", str(REPO / "configs/grpo.yaml"), "model.name=tiny-llama", "adapter.method=full", "run.wandb=disabled",
            "run.log_level=warning", "reward.helpful=null", "reward.safety=null",
            "reward.function=alignment.rl.rule_rewards:char_fraction", "reward.function_kwargs={chars: aeiou}",
            "reward.missing_eos_penalty=0", "grpo.max_new_tokens=8", "train.max_steps=2", "train.batch_size=4",
            "train.eval_steps=100", "train.save_steps=100", "data.val_fraction=0.02", f"run.root={tmp_path}"]
    res = run_align("grpo", *args, "--launch", str(REPO / "configs/accelerate/zero3.yaml"), env=ONE_THREAD, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "default" / "grpo"
    summary = _ranks_agree(out)
    assert summary["global_step"] == 2
    saved, init = _weights(out), _initial_weights()
    assert set(saved) == set(init)
    for name, tensor in saved.items():
        assert tensor.shape == init[name].shape, name  # gathered, not a rank's empty partition
    assert any(not torch.equal(saved[k], init[k]) for k in saved)  # and trained


# --------------------------------------------------------------------------- rejection sampling


@pytest.mark.parametrize("layout", ["ddp", "zero3"])
def test_rejection_sampling_on_two_processes_gives_the_pool_of_one(tmp_path, tiny_model, layout):
    """Defect G: align rs refused more than one process. The pending prompts are dealt out in batches (each with
    its own seed), the scored samples gathered in batch order: the same samples, pool and greedy held-out
    responses as one process, and the SFT on the pool (2 x 2 = 1 x 4) ends with the same weights."""
    from test_rs import prompt_rows

    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))
    args = ["--config", str(REPO / "configs/rs.yaml"), "model.name=tiny-llama", "run.wandb=disabled", "run.log_level=warning",
            "reward.function=test_rs:share_e", "reward.helpful=null", "reward.safety=null", f"data.sources=[{{path: {prompts}}}]",
            "data.val_fraction=0.25", "sampling.require_eos=false", "sampling.num_samples=4", "sampling.batch_size=8",
            "sampling.max_new_tokens=8", "eval.max_new_tokens=8", "eval.temperature=0", "adapter.method=full", "train.lr=3e-3",
            "train.warmup_ratio=0", "train.grad_accum=1", "train.max_steps=2"]
    _run("rs", args, "train.batch_size=4", f"run.root={tmp_path / 'one'}", env=PPO_ENV)
    _run("rs", args, "train.batch_size=2", f"run.root={tmp_path / 'two'}", layout=layout, env=PPO_ENV)
    one, two = tmp_path / "one" / "default" / "rs", tmp_path / "two" / "default" / "rs"
    s1, s2 = json.loads((one / "summary.json").read_text()), _ranks_agree(two)
    assert s1["processes"] == 1 and s2["processes"] == 2
    # 10 prompts to sample, 2 per batch: 3 rounds of one batch per process, the last with one process idle
    assert s2["prompts_sampled"] == s1["prompts_sampled"] == s1["prompts_train"] == 10 and s2["pool_size"] == s1["pool_size"]
    samples = (one / "samples.jsonl").read_text()
    assert samples.count("\n") == 10 and (two / "samples.jsonl").read_text() == samples  # every sample, in order
    assert (two / "pool.jsonl").read_text() == (one / "pool.jsonl").read_text()
    before = [json.loads((d / "eval_before.json").read_text()) for d in (one, two)]
    assert before[0]["n"] == before[1]["n"] == s1["prompts_eval"] == 6  # 3 held-out prompts per process
    assert [r["response"] for r in before[1]["responses"]] == [r["response"] for r in before[0]["responses"]]
    assert s2["reward_before"] == pytest.approx(s1["reward_before"], abs=1e-9)
    _assert_same(_weights(two), _weights(one))


def test_frozen_models_load_on_the_cpu_in_the_dtype_of_their_accelerator_under_zero3(monkeypatch):
    """Under ZeRO-3 a frozen model loads on the CPU and is partitioned onto the GPUs: in bf16 when its GPU would
    load it in bf16 (not in the CPU's fp32, which would double what every GPU holds); elsewhere it loads as asked."""
    from foundation import distributed, precision

    monkeypatch.setattr(precision, "select_device", lambda d="auto": torch.device(d))
    monkeypatch.setattr(precision, "select_dtype",
                        lambda d="auto", dev=None: getattr(torch, d) if d != "auto" else
                        (torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32))
    monkeypatch.setattr(distributed, "zero3", lambda: False)
    assert distributed.frozen_placement("cuda:0") == ("cuda:0", "auto")
    monkeypatch.setattr(distributed, "zero3", lambda: True)
    assert distributed.frozen_placement("cuda:1") == ("cpu", "bfloat16")
    assert distributed.frozen_placement("cuda:1", "float16") == ("cpu", "float16")
    assert distributed.frozen_placement("cpu") == ("cpu", "float32")


def test_a_rank_exits_without_finalisation_but_with_its_logs_and_output(tmp_path):
    """``exit_rank`` skips the interpreter's finalisation (where gloo can abort a finished rank) but not what the rank
    wrote: a buffered log handler and a block-buffered stdout reach their files, and the exit code is kept."""
    import os
    import sys

    code = ("import logging, logging.handlers, sys\n"
            f"target = logging.FileHandler({str(tmp_path / 'rank.log')!r})\n"
            "logging.getLogger().addHandler(logging.handlers.MemoryHandler(capacity=100, target=target))\n"
            "logging.getLogger('x').warning('the rank logged this')\n"
            "print('and printed this', end='')\n"
            "from foundation.distributed import exit_rank\n"
            "exit_rank(3)\n"
            "print('never')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe is block-buffered
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout == "and printed this"
    assert (tmp_path / "rank.log").read_text() == "the rank logged this\n"
