"""Pure parts of the benchmarks, computed by hand (the benchmarks themselves are too long for CI)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks.rm_real import by_length, curve, length_baseline


def _pair(chosen: str, rejected: str) -> SimpleNamespace:
    return SimpleNamespace(chosen_response=chosen, rejected_response=rejected)


def test_rm_real_length_baseline_and_the_length_controlled_split():
    pairs = [_pair("long answer", "short"), _pair("longer one", "tiny"), _pair("no", "a long rejected"), _pair("same", "size")]
    assert length_baseline(pairs) == pytest.approx((1 + 1 + 0 + 0.5) / 4)  # a tie counts half
    chosen, rejected = [1.0, 0.0, 2.0, 5.0], [0.5, 1.0, 1.0, 0.0]  # right, wrong, right, (tie in length: left out)
    split = by_length(chosen, rejected, pairs)
    assert split["chosen_longer"] == {"n": 2, "accuracy": 0.5, "length_baseline": 1.0}
    assert split["chosen_shorter"] == {"n": 1, "accuracy": 1.0, "length_baseline": 0.0}


def test_rm_real_curve_reads_the_evaluation_rows(tmp_path):
    rows = [{"step": 10, "loss": 0.7}, {"step": 50, "eval_accuracy": 0.6, "eval_loss": 0.66}, {"step": 60, "loss": 0.6},
            {"step": 100, "eval/accuracy": 0.65}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert curve(path, 8) == [{"step": 50, "pairs_seen": 400, "accuracy": 0.6, "loss": 0.66},
                              {"step": 100, "pairs_seen": 800, "accuracy": 0.65, "loss": None}]


def test_rlhf_core_math_by_hand():
    import math
    import random

    from benchmarks.rlhf_core import bon_expected, bon_weights, kl_bon, pick_pairs, wilson

    assert kl_bon(1) == 0.0 and kl_bon(16) == pytest.approx(math.log(16) - 15 / 16)
    # 4 samples, best of 2: the j-th smallest is the max of a random pair with probability (j-1)/6
    assert bon_weights(4, 2) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert bon_weights(4, 4) == [0, 0, 0, 1] and bon_weights(3, 1) == pytest.approx([1 / 3] * 3)
    picker, values = [0.1, 0.9, 0.5, 0.3], [10.0, 40.0, 30.0, 20.0]
    # ranks by picker: 10 (0.1), 20 (0.3), 30 (0.5), 40 (0.9) -> (0*10 + 1*20 + 2*30 + 3*40) / 6
    assert bon_expected(picker, values, 2) == pytest.approx(200 / 6)
    assert bon_expected(picker, values, 1) == pytest.approx(25.0) and bon_expected(picker, values, 4) == 40.0
    # a picker that ranks backwards picks the worst at n = k
    assert bon_expected([-x for x in picker], values, 4) == 10.0
    lo, hi = wilson(70, 100)
    assert lo == pytest.approx(0.6041, abs=1e-3) and hi == pytest.approx(0.7810, abs=1e-3)
    pairs = pick_pairs(4, 10, random.Random(0))
    assert len(pairs) == 6 and len(set(pairs)) == 6 and all(i < j for i, j in pairs)
    assert len(pick_pairs(8, 3, random.Random(0))) == 3


def test_rlhf_core_runs_end_to_end_on_tiny_models(tmp_path, monkeypatch, tiny_model):
    """The whole protocol on tiny models and synthetic HH-style data: disjoint prompt sets, K samples
    scored by the gold, nested proxies, agreement, best-of-n, PPO against the proxy and the gold,
    the test comparison, and a results file with every target checked."""
    import gzip

    from benchmarks import rlhf_core

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    for sub, n in (("helpful-base", 900), ("harmless-base", 300)):
        (data / "hh-rlhf" / sub).mkdir(parents=True)
        rows = [{"chosen": f"\n\nHuman: Tell me about topic {sub} {i}\n\nAssistant: Topic {i} is about things and stuff.",
                 "rejected": f"\n\nHuman: Tell me about topic {sub} {i}\n\nAssistant: No."} for i in range(n)]
        with gzip.open(data / "hh-rlhf" / sub / "test.jsonl.gz", "wt") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
    (data / "instruct").mkdir()
    (data / "instruct" / "self_instruct_seed_tasks.jsonl").write_text("".join(
        json.dumps({"id": f"seed_task_{i}", "name": f"t{i}", "instruction": f"Write a word about {i}.",
                    "instances": [{"input": "", "output": f"word{i}"}], "is_classification": False}) + "\n" for i in range(20)))
    out = tmp_path / "bench"
    common = ["--out", str(out), "--data", str(data), "--gold", "gold:tiny", "--policy", "tiny-llama", "--train-prompts", "12",
              "--fresh-prompts", "10", "--val-prompts", "6", "--test-prompts", "6", "--k", "4",
              "--sample-chunk", "5", "--pairs-per-prompt", "4",
              "--pairs", "10,20,40", "--bon", "4", "--new-tokens", "8", "--gen-batch", "16", "--ppo-iterations", "2",
              "--ppo-rollout", "4", "--ppo-minibatch", "4", "--eval-every", "1", "--rm-max-length", "64",
              "--results", str(tmp_path / "results")]
    res = rlhf_core.main([*common, "--gold-pairs", "200", "--gold-model", "tiny-llama"])
    assert len(json.loads((out / "samples.jsonl").read_text().splitlines()[0])["samples"]) == 4
    assert not (out / "samples.partial.jsonl").exists()  # 12 prompts in chunks of 5: whole, and the partial file gone
    manifest = json.loads((out / "prompts" / "manifest.json").read_text())
    assert manifest["disjoint"] and {k: v["n"] for k, v in manifest["sets"].items()} == {
        "test": 6, "validation": 6, "fresh": 10, "train": 12}
    assert res["agreement"]["proxy_40"]["n"] > 0 and 0 <= res["agreement"]["proxy_40"]["agreement"] <= 1
    curves = res["bon"]["curves"]
    assert set(curves) == {"gold", "proxy_10", "proxy_20", "proxy_40"} and [p["n"] for p in curves["gold"]] == [1, 2, 4]
    gains = [p["gold_gain"] for p in curves["gold"]]
    assert gains[0] == pytest.approx(0.0, abs=1e-6) and gains == sorted(gains)  # picking by the gold itself never hurts
    assert set(res["ppo"]) == {"ppo_proxy", "ppo_oracle"}
    assert all(p["gold"] is not None and p["proxy"] is not None for p in res["ppo"]["ppo_proxy"]["curve"])
    assert set(res["final"]) == {"sft", "ppo_proxy", "ppo_oracle"}
    final = res["final"]["ppo_proxy"]
    assert final["winrate_vs_sft"]["n"] == 6 and "lc_win_rate" in final["lc_winrate_vs_sft"]
    assert set(res["targets"]) == {"agreement", "bon", "ppo_proxy", "ppo_oracle"}
    assert (tmp_path / "results" / "rlhf_core_bon.png").is_file()
    assert (tmp_path / "results" / "rlhf_core_history.jsonl").is_file()
    again = rlhf_core.main(common)
    assert again["stage_seconds"].keys() <= {"proxies", "ppo", "final"}  # done stages are not run again
