"""The KTO stage (TRL's KTOTrainer): unpairing by hand, config checks, learning a synthetic preference on the
tiny model, and KTO as a round method through the method registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_align, write_jsonl
from test_dpo import marker_pairs, one_thread  # noqa: F401 - one_thread: the DPO tests' autouse one-thread fixture

from foundation.config import ConfigError, load_config
from alignment.kto import KTOConfig, main, to_rows
from data.schemas import Comparison


def make_cfg(tmp_path: Path, data: Path, *overrides: str) -> KTOConfig:
    return load_config(KTOConfig, REPO / "configs/kto.yaml", [
        "model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", f"data.sources=[{{path: {data}}}]",
        "data.val_fraction=0.25", "train.batch_size=4", "train.grad_accum=1", "train.logging_steps=5", "train.warmup_ratio=0",
        *overrides,
    ], stage="kto")


def test_each_pair_becomes_a_desirable_and_an_undesirable_answer():
    c = Comparison(prompt=[{"role": "user", "content": "Q?"}], response_a="good", response_b="bad", chosen="A")
    assert to_rows([c]) == [
        {"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "good"}], "label": True},
        {"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "bad"}], "label": False},
    ]


def test_config_needs_two_answers_per_batch():
    with pytest.raises(ConfigError, match="train.batch_size: KTO's KL estimate needs >= 2 answers per batch, got 1"):
        load_config(KTOConfig, REPO / "configs/kto.yaml", ["train.batch_size=1"], stage="kto")


def test_kto_learns_a_synthetic_preference(tmp_path, tiny_model):
    """Chosen answers always contain "Paris": the held-out reward margin of desirable over undesirable answers rises."""
    data = write_jsonl(tmp_path / "p.jsonl", marker_pairs(64))
    out = main(make_cfg(tmp_path, data, "train.max_steps=20", "train.lr=3e-3", "train.eval_steps=100"))
    for name in ("config.yaml", "eval_before.json", "eval.json", "summary.json", "metrics.jsonl",
                 "model/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    ev = json.loads((out / "eval.json").read_text())
    before, after = ev["before"], ev["after"]
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert after["rewards/margins"] > 0.3 and after["rewards/chosen"] > 0 > after["rewards/rejected"]
    assert after["loss"] < before["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["val_margin_after"] == after["rewards/margins"]


def test_cli_lists_kto_from_the_registry():
    res = run_align("--help")
    assert res.returncode == 0 and "kto" in res.stdout and "KTOTrainer" in res.stdout
    res = run_align("kto", "--help")
    assert res.returncode == 0 and "kto.desirable_weight" in res.stdout


def test_a_round_hands_kto_its_comparisons(tmp_path, monkeypatch):
    """KTO as a round method: the registry says it consumes comparisons, so the round's policy step gives it
    the round's export (not reward models or prompts) and its default config."""
    from alignment.rounds import Project, RoundConfig, Steps, steps

    cfg = load_config(RoundConfig, REPO / "configs" / "round_tiny.yaml",
                      [f"root={tmp_path}", "project=k", "methods=[kto]"], stage="round")
    p = Project.init(cfg)
    export = tmp_path / "comparisons-v1.jsonl"
    m = p.manifest(1)
    m["steps"]["export"] = {"status": "done", "outputs": {"path": str(export)}}
    p.save_manifest(1, m)
    calls = []
    monkeypatch.setattr(steps, "run_stage",
                        lambda name, spec, out, overrides, last=(): calls.append((name, spec.config, overrides))
                        or {"global_step": 1})
    res = Steps(p, 1).policy()
    (name, config, overrides), = calls
    assert (name, config) == ("kto", "configs/kto.yaml")
    assert (any(o.startswith(f'data.sources=[{{path: "{export}", ') for o in overrides)
            and not any(o.startswith("reward.") for o in overrides))
    assert res["inputs"]["method"] == "kto" and res["inputs"]["comparisons"][0]["path"] == str(export)
