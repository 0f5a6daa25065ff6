"""The gold reward model (reward.gold): the seed-free prompt partition, a build on tiny data, its card,
and ``gold:<name>`` wherever a reward model is read."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from reward import gold


def _hh(i: int, harmless: bool = False) -> dict:
    q = f"How do I {'hurt' if harmless else 'bake'} thing number {i}?"
    good = "I can't help with that." if harmless else f"Mix flour and water, then bake item {i} for twenty minutes."
    bad = f"Sure, here is how to hurt {i}." if harmless else "No."
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}


def test_partition_is_seed_free_and_by_first_turn():
    a = [{"role": "user", "content": "What is  the capital of France?"}]
    b = [{"role": "system", "content": "x"}, {"role": "user", "content": "what is the capital of france?"},
         {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Spain?"}]
    assert gold.prompt_key(a) == gold.prompt_key(b)  # normalised first user turn
    assert gold.partition_of(a) == gold.partition_of(b)
    shares = [gold.partition_of([{"role": "user", "content": f"question {i}"}]) for i in range(4000)]
    assert abs(shares.count("train") / 4000 - 0.65) < 0.03
    assert abs(shares.count("held_out") / 4000 - 0.10) < 0.02
    assert abs(shares.count("policy") / 4000 - 0.25) < 0.03


def test_cap_pairs_keeps_category_shares():
    from data.schemas import Comparison

    pairs = [Comparison.from_preference(f"q{i}", "a", "b", category="safety" if i % 4 == 0 else "helpfulness")
             for i in range(400)]
    capped = gold.cap_pairs(pairs, 100, seed=0)
    assert len(capped) == 100 and sum(c.category == "safety" for c in capped) == 25
    assert gold.cap_pairs(pairs[:10], 100, seed=0) == pairs[:10]


def test_build_on_tiny_data_caches_a_gold_with_its_card(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    helpful = write_jsonl(tmp_path / "helpful-base.jsonl", [_hh(i) for i in range(500)])
    harmless = write_jsonl(tmp_path / "harmless-base.jsonl", [_hh(i, True) for i in range(300)])
    folder = gold.build([str(helpful), str(harmless)], name="tiny", pairs=200, model="tiny-llama", max_length=64, lr=1e-3,
                        batch_size=16)
    card = json.loads((folder / "card.json").read_text())
    assert card["pairs"]["train"] == 200 and card["pairs"]["held_out"] >= 50
    assert {f["category"] for f in card["data"]} == {"helpfulness", "safety"}
    assert all(len(f["sha256"]) == 64 for f in card["data"])
    h = card["held_out"]
    assert h["n"] == card["pairs"]["held_out"] and h["ci95"][0] - 1e-9 <= h["accuracy"] <= h["ci95"][1] + 1e-9
    assert 0 <= h["length_baseline"] <= 1 and set(h["by_category"]) == {"helpfulness", "safety"}
    train_keys, held_keys = set(card["prompt_keys"]["train"]), set(card["prompt_keys"]["held_out"])
    assert train_keys and held_keys and not train_keys & held_keys  # disjoint prompts
    assert gold.gold_prompt_keys("tiny") == train_keys | held_keys
    assert "held out" in gold.describe(card)
    # a reward model wherever one is read
    from reward import load_scorer

    scorer = load_scorer("gold:tiny")
    scores = scorer.score([[{"role": "user", "content": "How do I bake thing number 3?"}]] * 2, ["Mix flour.", "No."])
    assert scores.shape == (2,)
    with pytest.raises(FileExistsError, match="exists"):
        gold.build([str(helpful)], name="tiny", model="tiny-llama")
    with pytest.raises(FileNotFoundError, match="align gold build"):
        load_scorer("gold:missing")
    assert not list((tmp_path / "cache" / "gold").glob(".tiny-*"))  # no temporary folder left behind


def test_too_little_data_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    small = write_jsonl(tmp_path / "helpful-base.jsonl", [_hh(i) for i in range(40)])
    with pytest.raises(ValueError, match="too little data"):
        gold.build([str(small)], name="small", model="tiny-llama")
    assert not (tmp_path / "cache" / "gold" / "small").exists()


def test_a_gold_at_chance_is_refused_wherever_it_would_judge(tmp_path, monkeypatch):
    """Attempt 1 on HH-RLHF scored 49.3% [44.7, 54.0] on held-out human labels: such a gold is refused by name,
    with its numbers, instead of silently judging."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    folder = gold.gold_dir("weak")
    (folder / "model").mkdir(parents=True)
    card = {"held_out": {"accuracy": 0.4933, "ci95": [0.4471, 0.5396], "n": 446}}
    (folder / "card.json").write_text(json.dumps(card))
    assert "49.3% [44.7, 54.0] (n=446), not above chance" in gold.weakness(card)
    with pytest.raises(ValueError, match="'gold:weak' is not a gold: its held-out accuracy"):
        gold.resolve("gold:weak")
    card["held_out"] = {"accuracy": 0.667, "ci95": [0.615, 0.715], "n": 342}
    (folder / "card.json").write_text(json.dumps(card))
    assert gold.weakness(card) is None and gold.resolve("gold:weak") == folder / "model"


def test_a_killed_build_continues_from_its_last_checkpoint(tmp_path, monkeypatch, tiny_model):
    """A gold build takes an hour or more on a CPU: killed, it continues from its checkpoint when run again."""
    from reward import rm

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    helpful = write_jsonl(tmp_path / "helpful-base.jsonl", [_hh(i) for i in range(500)])
    calls, real = [], rm.main

    def killed_once(cfg, resume=False):
        calls.append(resume)
        out = real(cfg, resume=resume)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after its checkpoints were written
        return out

    monkeypatch.setattr(rm, "main", killed_once)
    args = dict(name="tiny", pairs=100, model="tiny-llama", max_length=64, lr=1e-3, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        gold.build([str(helpful)], **args)
    work = tmp_path / "cache" / "gold" / ".tiny-build"
    assert sorted(p.name for p in (work / "rm" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-25"]
    folder = gold.build([str(helpful)], **args)
    assert calls == [False, True] and (folder / "card.json").is_file() and not work.exists()


def test_a_packed_gold_unpacks_to_the_same_judge(tmp_path, monkeypatch, tiny_model):
    """pack halves the LoRA weights to fp16 and drops the tokenizer; unpack checks every file's hash and restores a
    gold that scores as the original does (to fp16 rounding), under its own name or another."""
    from conftest import run_align
    from safetensors.torch import load_file

    from reward import load_scorer

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    helpful = write_jsonl(tmp_path / "helpful-base.jsonl", [_hh(i) for i in range(600)])
    gold.build([str(helpful)], name="tiny", pairs=150, model="tiny-llama", max_length=64, lr=1e-3, batch_size=16)
    packed = gold.pack("tiny", tmp_path / "packed")
    assert sorted(p.name for p in packed.iterdir()) == ["card.json", "model"]
    assert not {p.name for p in (packed / "model").iterdir()} & {"tokenizer.json", "tokenizer_config.json", "training_args.bin"}
    original = load_file(gold.gold_dir("tiny") / "model" / "adapter_model.safetensors")
    half = load_file(packed / "model" / "adapter_model.safetensors")
    assert half.keys() == original.keys() and all(v.dtype.itemsize == 2 for v in half.values())
    with pytest.raises(FileExistsError, match="not empty"):
        gold.pack("tiny", tmp_path / "packed")

    folder = gold.unpack(packed, name="copy")
    assert folder == gold.gold_dir("copy") and gold.load_card("copy")["unpacked_from"]["weights"] == "float16"
    assert gold.gold_prompt_keys("copy") == gold.gold_prompt_keys("tiny")
    restored = load_file(folder / "model" / "adapter_model.safetensors")
    assert all(restored[k].dtype == original[k].dtype for k in original)
    prompts = [[{"role": "user", "content": f"How do I bake thing number {i}?"}] for i in range(6)]
    answers = ["Mix flour and water, then bake it.", "No.", "I can't help with that.", "Sure.", "Bake it for an hour.", "?"]
    a = load_scorer("gold:tiny").score(prompts, answers)
    b = load_scorer("gold:copy").score(prompts, answers)
    assert (a - b).abs().max().item() < 1e-2 * max(1.0, a.abs().max().item())
    assert (a.argsort() == b.argsort()).all()
    with pytest.raises(FileExistsError, match="--force"):
        gold.unpack(packed, name="copy")

    # a damaged pack is refused before anything is written; the command line says so in one line
    (packed / "model" / "reward_stats.json").write_text("{}")
    res = run_align("gold", "unpack", str(packed), "--name", "other", env={"ALIGN_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 2 and "reward_stats.json does not match its SHA-256" in res.stderr
    assert not gold.gold_dir("other").exists() and not list((tmp_path / "cache" / "gold").glob(".other-*"))
