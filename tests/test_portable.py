"""Saved adapters load outside align: an SFT adapter, a LoRA reward model and a PPO policy, with plain
transformers + peft in a subprocess that cannot import the project, give the logits and scores align
gives. Their adapter_config.json names a real base (the Hub id for smollm2-135m, a path otherwise);
align_base.json keeps the model.name align resolves (offline for the built-ins)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, write_jsonl

from foundation.config import load_config
from foundation.models import SMOLLM2_HUB_ID, builtin_path, load_causal_lm, portable_base, resolve

IDS = [[1, 50, 60, 70, 80, 90, 2]]

# runs with `python -I` (no PYTHONPATH, no current folder on sys.path) from a temporary folder
PLAIN = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sft_dir, rm_dir, ppo_dir = sys.argv[1:4]
ids = torch.tensor(IDS)
out = {}
with torch.no_grad():
    for name, folder in (("sft", sft_dir), ("ppo", ppo_dir)):
        model = AutoPeftModelForCausalLM.from_pretrained(folder)  # base from adapter_config.json
        AutoTokenizer.from_pretrained(folder)
        out[name] = model(ids).logits[0, -1].tolist()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)  # transformers applies the LoRA adapter
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(rm_dir).pad_token_id
    out["rm"] = rm(ids).logits[0, 0].item()
ours = ("foundation", "alignment", "reward", "data", "ui", "benchmarks")
out["project_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ours)
print(json.dumps(out))
""".replace("IDS", repr(IDS))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_portable_base_names():
    assert portable_base("smollm2-135m") == SMOLLM2_HUB_ID
    assert portable_base("tiny-llama") == str(builtin_path("tiny-llama").resolve())
    assert portable_base("owner/some-model") == "owner/some-model"


def test_adapters_load_with_plain_transformers_and_peft(tmp_path, tiny_reward_models, sft_rows):
    from alignment.ppo import PPOConfig
    from alignment.ppo import main as ppo_main
    from alignment.sft import SFTConfig
    from alignment.sft import main as sft_main
    from reward.model import load_reward_model

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft = sft_main(load_config(SFTConfig, REPO / "configs/sft.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.name=s", "run.wandb=disabled",
        f"data.sources=[{{path: {data}}}]", "train.max_steps=2", "train.lr=1e-2", "data.sample_prompts=0"], stage="sft"))
    ppo = ppo_main(load_config(PPOConfig, REPO / "configs/ppo.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.name=p", "run.wandb=disabled", "run.log_level=warning",
        "reward.helpful=null", "reward.safety=null", "critic.init=policy",
        "reward.function=alignment.rl.rule_rewards:char_fraction",
        "reward.function_kwargs={chars: aeiou}", "train.max_steps=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4",
        "ppo.micro_batch_size=4", "sampling.max_new_tokens=8", "train.lr=1e-2", "eval.every=0", "eval.max_prompts=2",
        "eval.keep_best=false"], stage="ppo"))
    rm = tiny_reward_models["helpful"]
    folders = {"sft": sft / "model", "rm": rm / "model", "ppo": ppo / "model"}
    for name, folder in folders.items():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str(builtin_path("tiny-llama").resolve()), name  # a real path, not the alias
        assert resolve(str(folder)).path == str(builtin_path("tiny-llama")), name  # align resolves it as before

    res = subprocess.run([sys.executable, "-I", "-c", PLAIN, *(str(f) for f in folders.values())], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    plain = json.loads(res.stdout.strip().splitlines()[-1])
    assert plain["project_modules"] == []

    ids = torch.tensor(IDS)
    with torch.no_grad():
        for name in ("sft", "ppo"):
            ours = load_causal_lm(str(folders[name].parent), device="cpu")(ids).logits[0, -1]
            assert torch.allclose(torch.tensor(plain[name]), ours, atol=1e-4), name
        base_logits = load_causal_lm("tiny-llama", device="cpu")(ids).logits[0, -1]
        assert not torch.allclose(torch.tensor(plain["sft"]), base_logits, atol=1e-3)  # the adapter was applied
        ours_rm = load_reward_model(str(rm), device="cpu")(input_ids=ids).logits[0, 0].item()
    assert plain["rm"] == pytest.approx(ours_rm, abs=1e-4)
