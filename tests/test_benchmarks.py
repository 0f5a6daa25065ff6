"""Pure parts of the benchmarks, computed by hand (the benchmarks themselves are too long for CI)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from conftest import REPO

from benchmarks.rm_real import by_length, curve, length_baseline
from foundation.runs import read_jsonl


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

    from benchmarks.rlhf_core import bon_expected, bon_weights, kl_bon, pick_pairs
    from foundation.stats import wilson_interval

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
    lo, hi = wilson_interval(70, 100)
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
              "--results", str(tmp_path / "results"), "--state", str(tmp_path / "state"),
              "--gold-packs", str(tmp_path / "golds"), "--replication-prompts", "5"]
    res = rlhf_core.main([*common, "--gold-data", "helpful-base,harmless-base", "--gold-pairs", "200",
                          "--gold-model", "tiny-llama"])
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
    short = res["bon"]["controls"]["shortest"]  # the brevity control: the shortest of n is never longer for larger n
    assert [p["n"] for p in short] == [1, 2, 4] and short[0]["gold_gain"] == pytest.approx(0.0, abs=1e-6)
    assert all(a["tokens"] >= b["tokens"] - 1e-9 for a, b in zip(short, short[1:]))
    assert short[0]["tokens"] == pytest.approx(curves["gold"][0]["tokens"])
    assert set(res["ppo"]) == {"ppo_proxy", "ppo_oracle"}
    assert all(p["gold"] is not None and p["proxy"] is not None for p in res["ppo"]["ppo_proxy"]["curve"])
    assert set(res["final"]) == {"sft", "ppo_proxy", "ppo_oracle"}
    final = res["final"]["ppo_proxy"]
    assert final["winrate_vs_sft"]["n"] == 6 and "lc_win_rate" in final["lc_winrate_vs_sft"]
    strata = final["length_strata"]
    assert strata["shorter"] + strata["same"] + strata["longer"] == 6
    assert set(res["targets"]) == {"agreement", "bon", *(f"{run}{s}" for run in ("ppo_proxy", "ppo_oracle")
                                                          for s in ("", "_replication", "_pooled"))}
    # the replication: the usable prompts no set took (--replication-prompts caps them), disjoint from every set
    rep_keys = {json.dumps(r["messages"]) for r in read_jsonl(out / "prompts" / "replication.jsonl")}
    assert res["replication"]["prompts"]["n"] == len(rep_keys) == 5
    for name in ("test", "validation", "fresh", "train"):
        assert not rep_keys & {json.dumps(r["messages"]) for r in read_jsonl(out / "prompts" / f"{name}.jsonl")}, name
    pooled = res["replication"]["pooled_with_test"]["ppo_oracle"]["winrate_vs_sft"]
    assert res["replication"]["alone"]["ppo_oracle"]["winrate_vs_sft"]["n"] == 5 and pooled["n"] == 11
    w_test, w_rep = (r["ppo_oracle"]["winrate_vs_sft"]["win_rate"] for r in (res["final"], res["replication"]["alone"]))
    assert pooled["win_rate"] == pytest.approx((6 * w_test + 5 * w_rep) / 11)
    # the length control: the SFT model made as long as each PPO policy on the validation prompts by an EOS bias
    lc = res["length_control"]
    assert set(lc) == {"ppo_proxy", "ppo_oracle"}
    for name, got in lc.items():
        trace = [length for _, length in got["match"]["trace"]]  # biases in increasing order: lengths never grow
        assert all(x >= y for x, y in zip(trace, trace[1:]))
        val = read_jsonl(out / f"validation_{name}.jsonl")
        assert got["match"]["target_length"] == pytest.approx(sum(r["tokens"] for r in val) / len(val))
        assert got["test"]["winrate_vs_sft"]["n"] == 6 and got["replication"]["winrate_vs_sft"]["n"] == 5
        assert got["pooled"]["winrate_vs_sft"]["n"] == 11 and "lc_win_rate" in got["pooled"]["lc_winrate_vs_sft"]
        base = read_jsonl(out / f"test_sft_eos_{name}.jsonl")
        assert got["test"]["baseline_tokens"] == pytest.approx(sum(r["tokens"] for r in base) / 6)
        assert [r["prompt"] for r in base] == [r["messages"] for r in read_jsonl(out / "prompts" / "test.jsonl")]
    assert (tmp_path / "results" / "rlhf_core_bon.png").is_file()
    assert (tmp_path / "results" / "rlhf_core_history.jsonl").is_file()
    again = rlhf_core.main(common)
    assert again["stage_seconds"].keys() <= {"proxies", "ppo", "final", "replication"}  # done stages are not run again

    # a machine reset takes --out and the cache; --state brings back what the finished stages made, the gold included
    state = tmp_path / "state"
    assert (tmp_path / "golds" / "tiny" / "model" / "PACKED.json").is_file()
    assert {p.parent.relative_to(state / "packed").as_posix() for p in (state / "packed").rglob("PACKED.json")} == {
        "proxy_10/rm_helpful/model", "proxy_20/rm_helpful/model", "proxy_40/rm_helpful/model", "ppo_proxy/model",
        "ppo_oracle/model"}  # each proxy packed as soon as it is trained (a reset mid-stage keeps the ones done)
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "cache" / "gold")
    third = rlhf_core.main(common)
    assert third["stage_seconds"].keys() <= {"proxies", "ppo", "final", "replication"}
    assert (out / "proxy_40" / "rm_helpful" / "model" / "tokenizer_config.json").is_file()  # unpacked with its tokenizer
    assert (out / "proxy_10" / "rm_helpful" / "model" / "adapter_config.json").is_file()  # unpacked, not retrained
    assert not (out / "ppo_proxy" / "checkpoints").exists()  # not trained again
    for key in ("agreement", "bon", "final", "replication", "proxy_training", "length_control"):
        assert third[key] == res[key], key
    assert [p["gold"] for p in third["ppo"]["ppo_proxy"]["curve"]] == [p["gold"] for p in res["ppo"]["ppo_proxy"]["curve"]]
    assert third["gold"]["unpacked_from"]["weights"] == "float16"

    # PPO against the proxy again with another seed: the same proxy and prompts, its answers to the test and
    # replication prompts, each seed's comparison with the SFT model and the spread over the seeds
    seeded = rlhf_core.main([*common, "--stages", "ppo_seeds", "--ppo-seeds", "1", "--oracle-seeds", "1"])
    assert (out / "ppo_proxy_seed1" / "summary.json").is_file()
    import yaml

    assert yaml.safe_load((out / "ppo_proxy_seed1" / "config.yaml").read_text())["run"]["seed"] == 1
    got = seeded["ppo_seeds"]
    assert got["prompt_sets"] == "pooled" and set(got["seeds"]) == {"0", "1"}
    assert got["seeds"]["0"]["run"] == "ppo_proxy" and got["seeds"]["1"]["run"] == "ppo_proxy_seed1"
    # each seed's gold-vs-KL curve beside seed 0's
    assert set(seeded["ppo"]) == {"ppo_proxy", "ppo_oracle", "ppo_proxy_seed1", "ppo_oracle_seed1"}
    assert all(p["gold"] is not None and p["proxy"] is not None for p in seeded["ppo"]["ppo_proxy_seed1"]["curve"])
    # seed 0 is the run of record: its pooled comparison is the replication's pooled one
    assert got["seeds"]["0"]["pooled"] == seeded["replication"]["pooled_with_test"]["ppo_proxy"]
    assert got["seeds"]["1"]["test"]["winrate_vs_sft"]["n"] == 6 and got["seeds"]["1"]["pooled"]["winrate_vs_sft"]["n"] == 11
    rates = [got["seeds"][s]["pooled"]["winrate_vs_sft"]["win_rate"] for s in ("0", "1")]
    assert got["spread"]["win_rate"]["values"] == rates
    assert got["spread"]["win_rate"]["mean"] == pytest.approx(sum(rates) / 2)
    assert got["spread"]["win_rate"]["sd"] == pytest.approx(abs(rates[0] - rates[1]) / 2 ** 0.5)
    seed_target = seeded["targets"]["ppo_proxy_seeds"]
    assert set(seed_target["seeds"]) == {"0", "1"}
    assert seed_target["met"] == all(v["met"] for v in seed_target["seeds"].values())
    assert seed_target["seeds"]["0"]["met"] == seeded["targets"]["ppo_proxy_pooled"]["met"]
    # oracle PPO with another seed: against the gold, judged by the proxy; its own comparison, spread and target
    oracle_cfg = yaml.safe_load((out / "ppo_oracle_seed1" / "config.yaml").read_text())
    assert oracle_cfg["run"]["seed"] == 1 and oracle_cfg["reward"]["helpful"] == "gold:tiny"
    # its curve reads its reward as the gold and the proxy judge beside it (the oracle's, not the proxy run's, layout)
    assert all(p["gold"] is not None and p["proxy"] is not None for p in seeded["ppo"]["ppo_oracle_seed1"]["curve"])
    ogot = seeded["ppo_oracle_seeds"]
    assert ogot["prompt_sets"] == "pooled" and set(ogot["seeds"]) == {"0", "1"}
    assert ogot["seeds"]["0"]["run"] == "ppo_oracle" and ogot["seeds"]["1"]["run"] == "ppo_oracle_seed1"
    assert ogot["seeds"]["0"]["pooled"] == seeded["replication"]["pooled_with_test"]["ppo_oracle"]
    assert (out / "test_ppo_oracle_seed1.jsonl").is_file() and (out / "replication_ppo_oracle_seed1.jsonl").is_file()
    oracle_target = seeded["targets"]["ppo_oracle_seeds"]
    assert "65%" in oracle_target["target"] and "60%" in seed_target["target"]
    assert oracle_target["seeds"]["0"]["met"] == seeded["targets"]["ppo_oracle_pooled"]["met"]
    assert (state / "packed" / "ppo_oracle_seed1" / "model" / "PACKED.json").is_file()
    assert (state / "files" / "replication_ppo_oracle_seed1.jsonl").is_file()
    assert (state / "packed" / "ppo_proxy_seed1" / "model" / "PACKED.json").is_file()
    assert (state / "files" / "test_ppo_proxy_seed1.jsonl").is_file()
    assert (state / "files" / "replication_ppo_proxy_seed1.jsonl").is_file()
    for key in ("final", "replication", "length_control"):  # nothing the run of record reported changed
        assert seeded[key] == res[key], key
    stamps = {p: p.stat().st_mtime_ns for p in (out / "ppo_proxy_seed1" / "summary.json", out / "test_ppo_proxy_seed1.jsonl")}
    again = rlhf_core.main([*common, "--stages", "ppo_seeds", "--ppo-seeds", "1"])  # done: nothing trained or answered again
    assert again["ppo_seeds"] == got and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a run that does not name the seed (the default stages) still reports it, also after a reset (--state)
    shutil.rmtree(out)
    plain = rlhf_core.main(common)
    assert plain["ppo_seeds"] == got and plain["targets"]["ppo_proxy_seeds"] == seed_target
    assert plain["ppo_oracle_seeds"] == ogot and plain["targets"]["ppo_oracle_seeds"] == oracle_target
    assert not (out / "ppo_proxy_seed1" / "checkpoints").exists()  # restored, not trained again


def test_rlhf_core_ppo_seeds_are_checked_before_anything_runs(capsys):
    from benchmarks import rlhf_core

    for bad in (["--ppo-seeds", "0"], ["--ppo-seeds", "1,1"], ["--ppo-seeds", "one"], ["--oracle-seeds", "0"],
                ["--oracle-seeds", "2,x"]):
        with pytest.raises(SystemExit):
            rlhf_core.main(bad)
        assert bad[0] in capsys.readouterr().err


def test_alignment_seeds_are_kept_and_each_run_once(tmp_path):
    """`benchmarks alignment --seeds 3` on machines reset between sessions: a finished seed's summary is kept and read
    back, not run again; a later call runs only the seeds not done; --fresh runs them all; the golds a config names
    are found in its text and overrides."""
    from benchmarks.alignment import run_seeds
    from benchmarks.common import golds_named

    calls: list[int] = []

    def one(seed: int, saved) -> dict:
        calls.append(seed)
        return {"seed": seed, "final": {"winrate": 0.5 + seed / 10}}

    keep = tmp_path / "seeds"
    first = run_seeds(2, one, keep=keep, project="p")
    assert calls == [0, 1] and sorted(f.name for f in keep.iterdir()) == ["p-s0.json", "p-s1.json"]
    later = run_seeds(3, one, keep=keep, project="p")  # a new session: seeds 0 and 1 are done
    assert calls == [0, 1, 2] and later[:2] == first and later[2] == {"seed": 2, "final": {"winrate": 0.7}}
    assert run_seeds(3, one, keep=keep, project="other") and calls[3:] == [0, 1, 2]  # another project's seeds
    run_seeds(1, one, keep=keep, project="p", fresh=True)
    assert calls[6:] == [0]
    run_seeds(2, one, keep=None, project="p")
    assert calls[7:] == [0, 1]
    assert not list(keep.glob("*.tmp"))

    # a seed kept before its control ran (the session ended during it): run again only while its project is here
    from benchmarks.alignment import PENDING

    def pending(seed: int, saved) -> dict:
        calls.append(seed)
        if saved.is_file():  # the second call: the rounds are done, the control runs
            return {**json.loads(saved.read_text()), "rs_random_control": {"win_rate": 0.6}}
        saved.write_text(json.dumps({"seed": seed, "rs_random_control": PENDING}))
        raise KeyboardInterrupt  # the session ends during the control
    with pytest.raises(KeyboardInterrupt):
        run_seeds(1, pending, keep=keep, project="q")
    assert json.loads((keep / "q-s0.json").read_text())["rs_random_control"] == PENDING
    n_calls = len(calls)
    gone = run_seeds(1, pending, keep=keep, project="q", can_finish=lambda seed: False)  # the project was lost
    assert len(calls) == n_calls and gone[0]["rs_random_control"] == PENDING
    here = run_seeds(1, pending, keep=keep, project="q", can_finish=lambda seed: True)
    assert calls[n_calls:] == [0] and here[0] == {"seed": 0, "rs_random_control": {"win_rate": 0.6}}
    assert json.loads((keep / "q-s0.json").read_text()) == here[0]
    assert run_seeds(1, pending, keep=keep, project="q", can_finish=lambda seed: True) == here and len(calls) == n_calls + 1

    # a kept seed of other settings is refused before anything runs; the same settings are read back
    from benchmarks.alignment import settings_fingerprint

    (tmp_path / "configs").mkdir()
    stage = tmp_path / "configs" / "dpo_x.yaml"
    stage.write_text("train: {lr: 3.0e-4}\n")
    cfg = tmp_path / "round.yaml"
    cfg.write_text(f"policy:\n  dpo:\n    config: {stage}   # the DPO stage\nrounds: 3\n")
    fp = settings_fingerprint(cfg, ["rounds=3"])
    assert fp == settings_fingerprint(cfg, ["rounds=3", "seed=2"]) and len(fp) == 16  # the seed is not a setting
    assert fp != settings_fingerprint(cfg, ["rounds=2"])
    kept = run_seeds(2, lambda seed, saved: {"seed": seed, "settings_fingerprint": fp}, keep=keep, project="r", fingerprint=fp)
    n_calls = len(calls)
    assert run_seeds(2, one, keep=keep, project="r", fingerprint=fp) == kept and len(calls) == n_calls  # read back
    stage.write_text("train: {lr: 5.0e-5}\n")  # a stage config the round names changed: another recipe
    new_fp = settings_fingerprint(cfg, ["rounds=3"])
    assert new_fp != fp
    with pytest.raises(SystemExit, match=r"r-s0.json: seed 0 of project 'r' ran with other settings .*another --project"):
        run_seeds(3, one, keep=keep, project="r", fingerprint=new_fp)
    assert len(calls) == n_calls  # refused before seed 2 ran
    with pytest.raises(SystemExit, match="fingerprint not recorded"):  # seeds kept before fingerprints existed
        run_seeds(1, one, keep=keep, project="p", fingerprint=new_fp)
    assert run_seeds(3, one, keep=keep, project="r2", fingerprint=new_fp) and calls[n_calls:] == [0, 1, 2]

    text = (REPO / "configs" / "round_gold_rm.yaml").read_text()
    assert golds_named(text) == ["hh-helpful-smollm2"]
    assert golds_named("judges: [gold, rm]", "eval.gold_model=gold:a", "x=gold:b", "y=gold:a") == ["a", "b"]



def test_a_seed_evaluated_in_bf16_is_not_pooled_with_seeds_evaluated_in_fp32(tmp_path, monkeypatch):
    """The loop's settings fingerprint says the evals' dtype where it is not fp32: on a CPU with native bf16 ``auto``
    evaluates in bf16, another recipe than seeds evaluated in fp32; ``eval.dtype=float32`` gives those seeds'
    fingerprint back (the override itself is not a setting), and on a CPU without native bf16 nothing changes."""
    from benchmarks.alignment import settings_fingerprint
    from foundation import precision

    cfg = tmp_path / "round.yaml"
    cfg.write_text("rounds: 3\neval:\n  heldout: 8\n")
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: False)
    fp32 = settings_fingerprint(cfg, ["rounds=3"])
    assert settings_fingerprint(cfg, ["rounds=3", "eval.dtype=float32"]) == fp32
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    bf16 = settings_fingerprint(cfg, ["rounds=3"])
    assert bf16 != fp32 and settings_fingerprint(cfg, ["rounds=3", "eval.dtype=bfloat16"]) == bf16
    assert settings_fingerprint(cfg, ["rounds=3", "eval.dtype=float32"]) == fp32
    cfg.write_text("rounds: 3\neval:\n  heldout: 8\n  dtype: float32\n")
    assert settings_fingerprint(cfg, ["rounds=3"]) != bf16  # set in the file: fp32 (the file's text differs, too)
    assert settings_fingerprint(cfg, ["rounds=3"]) == settings_fingerprint(cfg, ["rounds=3", "eval.dtype=float32"])


def test_a_seed_whose_project_evaluates_in_another_dtype_than_the_call_says_is_refused(tmp_path, monkeypatch):
    """An existing project keeps its round.yaml and the dtype of its first eval, so a call whose settings (and
    fingerprint) say another dtype is refused, naming the override that continues it: an fp32-evaluated seed resumed
    where ``auto`` is bf16, and a project made under ``auto`` resumed with ``eval.dtype=float32``."""
    from alignment.rounds import Project, RoundConfig
    from benchmarks.alignment import check_eval_dtype
    from foundation import precision
    from foundation.config import load_config

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    tiny = REPO / "configs" / "round_tiny.yaml"
    p = Project.init(load_config(RoundConfig, tiny, [f"root={tmp_path}", "project=s2"], stage="round"))
    check_eval_dtype(p.dir, tiny, ["seed=2"])  # no eval yet: auto, bf16 here, as the call says
    with pytest.raises(SystemExit, match=r"s2: its evaluations run in bfloat16 .* this call's settings say float32"):
        check_eval_dtype(p.dir, tiny, ["seed=2", "eval.dtype=float32"])  # the override cannot reach round.yaml
    m = p.manifest(1)
    m["steps"]["eval"] = {"status": "done", "outputs": {}}  # round 1 evaluated before evals said their dtype: fp32
    p.save_manifest(1, m)
    with pytest.raises(SystemExit, match=r"run in float32 .*Give eval.dtype=float32 to continue it"):
        check_eval_dtype(p.dir, tiny, ["seed=2"])
    check_eval_dtype(p.dir, tiny, ["seed=2", "eval.dtype=float32"])


def test_ppo_memory_table_is_the_hand_computation():
    """Llama-2-7B's parameter count from its config on the meta device, and PPO-LoRA under ZeRO-2 on 8 GPUs, part by
    part: DeepSpeed's ZeRO-2 formula (2 bytes + 18 / N per trainable parameter) for the LoRA adapters and the value
    head, the frozen bf16 base whole, two bf16 reward models whole (the LM head replaced by a one-output head) but for
    their embeddings, tied to the base's; SmolLM2's tied LM head is counted once."""
    from benchmarks import memory

    s = memory.sizes(memory.SHAPES["7B"])
    assert abs(s["params"] - 6_738_415_616) <= 256  # the Hub's Llama-2-7b (plus the rotary buffer)
    smol = memory.sizes({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True})
    assert abs(smol["params"] - 134_515_008) <= 256  # SmolLM2-135M: the tied head once
    # one CPU process, fp32: the KV cache, the merged and the prepacked weight copies while generating; four
    # vocabulary-sized tensors in the no-grad pass; per token and layer 7h + 2kv + 4i + 7r saved values in the update
    cpu = memory.ppo_cpu(smol, rollout=8, prompt=97, response=64, micro=8, runtime=0)
    assert cpu["generate"] == 4 * 2 * 30 * 192 * 8 * 161 + 4 * smol["linear"] + 4 * (smol["linear"] + 49152 * 576)
    assert cpu["ref_and_values"] == 4 * 4 * 8 * 65 * 49152
    trainable = 2 * smol["lora"] + 577
    assert cpu["update"] == (4 * 8 * 161 * ((7 * 576 + 2 * 192 + 4 * 1536 + 7 * 16) * 30 + 2 * 576) + 4 * 4 * 8 * 65 * 49152
                             + 12 * trainable)
    assert cpu["loaded"] == 4 * smol["params"] + 8 * (smol["linear"] + 576) + 4 * trainable
    assert s["lora"] == 32 * 16 * ((4096 + 4096) * 2 + (4096 + 4096) * 2 + (4096 + 11008) * 3)
    got = memory.ppo_per_gpu(s, method="lora", layout="zero2", gpus=8, rollout=8, seq=1024, micro=1, response=512)
    trainable = 2 * s["lora"] + 4096 + 1
    rm = s["params"] - 32000 * 4096 + 4096
    gib = 2**30
    assert got["engine"] == round((2 * trainable + int(18 * trainable / 8) + 2 * s["params"]) / gib, 1)
    assert got["reward_models_and_reference"] == round(4 * (rm - 32000 * 4096) / gib, 1)  # embeddings tied to the base
    assert got["kv_cache"] == round(2 * 32 * 4096 * 2 * 8 * 1024 / gib, 1)
    assert got["generation_gather"] == 0 and got["peak_phase"] == "generation"  # ZeRO-2: the policy is whole already
    assert got["generation_merge"] == round(2 * s["linear"] / gib, 1)  # merged copies of the adapted weights, bf16
    assert got["total"] == round((2 * trainable + int(18 * trainable / 8) + 2 * s["params"] + 4 * (rm - 32000 * 4096)
                                  + 2 * 32 * 4096 * 2 * 8 * 1024 + 2 * s["linear"]) / gib, 1)
    full3 = memory.ppo_per_gpu(s, method="full", layout="zero3", gpus=8, rollout=8, seq=1024, micro=1, response=512)
    # ZeRO-3: the reward models and the fp32 reference partitioned over 8 GPUs; the fp32 policy gathered to generate
    assert full3["reward_models_and_reference"] == round((4 * rm + 4 * s["params"]) // 8 / gib, 1)
    assert full3["generation_gather"] == round((4 * s["params"] - 4 * s["params"] // 8) / gib, 1)
    off = memory.ppo_per_gpu(s, method="full", layout="zero3_offload", gpus=8, rollout=8, seq=1024, micro=1, response=512)
    assert off["reward_models_and_reference"] == 0 and off["generation_gather"] == round(4 * s["params"] / gib, 1)


def test_alignment_targets_over_seeds_are_computed_from_each_seeds_summary():
    """`benchmarks alignment --seeds 3`: the mean +- sd of the final win rates, each seed's CI, the PPO round against its
    start in at least 2 of 3 seeds, and the decoding control in every seed."""
    from benchmarks.alignment import across_seeds

    def run(final, low, ppo_low, control_met):
        return {"targets": {"winrate_vs_sft": {"value": final, "ci": [low, 0.9], "n": 96},
                            "beats_decoding_control": {"met": control_met}},
                "rounds": [{"method": "rs", "winrate_vs_previous": {"ci_low": 0.9}},
                           {"method": "ppo", "winrate_vs_previous": {"ci_low": ppo_low}}]}

    got = across_seeds([run(0.70, 0.60, 0.55, True), run(0.66, 0.55, 0.45, True), run(0.62, 0.52, 0.51, True)])
    assert got["mean_winrate_vs_sft"]["mean"] == pytest.approx(0.66)
    assert got["mean_winrate_vs_sft"]["sd"] == pytest.approx(0.04)  # sample sd of 0.70, 0.66, 0.62
    assert got["mean_winrate_vs_sft"]["met"] is True
    assert got["ppo_beats_its_start"] == {**got["ppo_beats_its_start"], "seeds": [True, False, True], "met": True}
    assert got["beats_decoding_control"]["met"] is True
    assert not got["truthfulqa_mc2"]["met"] and not got["time"]["met"]  # no seed says it met them
    timed = [run(0.70, 0.60, 0.55, True), run(0.66, 0.55, 0.45, True), run(0.62, 0.52, 0.51, True)]
    timed[0]["targets"].update(time={"minutes": 80.0, "met": True}, truthfulqa_mc2={"value": 0.37, "sft": 0.38, "met": True})
    timed[1]["targets"].update(time={"minutes": 95.5, "met": False}, truthfulqa_mc2={"value": 0.37, "sft": 0.38, "met": True,
                                                                                  "paired": {"diff": -0.01}})
    timed[2]["targets"].update(time={"minutes": 85.0, "met": True}, truthfulqa_mc2={"value": 0.37, "sft": 0.38, "met": True},
                               toxigen_not_worse={"value": 20.0, "sft": 25.0, "met": True})
    t = across_seeds(timed)
    assert t["time"]["seeds"] == [80.0, 95.5, 85.0] and t["time"]["met"] is False and t["truthfulqa_mc2"]["met"] is True
    assert t["truthfulqa_mc2"]["seeds"][1] == {"mc2": 0.37, "sft": 0.38, "paired": {"diff": -0.01}}
    timed[0]["targets"]["toxigen_not_worse"] = {"value": 24.2, "sft": 25.8, "met": True,
                                               "paired": {"n": 124, "diff_points": -1.6, "diff_ci": [-5.0, 1.6], "worse": 3,
                                                          "better": 5, "p_value": 0.86, "pct_before": 25.8}}
    timed[1]["targets"]["toxigen_not_worse"] = {"value": 41.9, "sft": 28.2, "met": False}
    tox = across_seeds(timed)["toxigen_not_worse"]
    assert not tox["met"] and tox["seeds"][1] == {"pct": 41.9, "sft": 28.2, "paired": None}
    assert tox["seeds"][0]["paired"] == {"n": 124, "diff_points": -1.6, "diff_ci": [-5.0, 1.6], "worse": 3, "better": 5,
                                         "p_value": 0.86}
    timed[1]["targets"]["toxigen_not_worse"]["met"] = True
    assert across_seeds(timed)["toxigen_not_worse"]["met"] is True
    worse = across_seeds([run(0.70, 0.60, 0.45, True), run(0.66, 0.49, 0.45, False), run(0.62, 0.52, 0.51, True)])
    assert not worse["mean_winrate_vs_sft"]["met"]  # one seed's CI reaches 50%
    assert not worse["ppo_beats_its_start"]["met"] and not worse["beats_decoding_control"]["met"]
    # the targets are over three seeds: two decide none, even where both seeds meet them (or cannot reach 2 of 3)
    two = across_seeds([run(0.70, 0.60, 0.55, True), run(0.66, 0.55, 0.56, True)])
    assert all(c["met"] is None and c["partial"] == "2 of 3 seeds" for c in two.values())
    assert two["mean_winrate_vs_sft"]["mean"] == pytest.approx(0.68) and two["ppo_beats_its_start"]["seeds"] == [True, True]
    # which seeds' final round promotion refused (the targets still read it)
    refused = [run(0.70, 0.60, 0.55, True), run(0.66, 0.55, 0.56, True), run(0.62, 0.52, 0.51, True)]
    refused[1]["rounds"][-1]["promoted"] = False
    assert across_seeds(refused)["final_not_promoted"]["seeds"] == [False, True, False]
    # the rejection-sampling control per seed: its win rate in brief, or why there is none
    from benchmarks.alignment import PENDING

    runs = [run(0.70, 0.60, 0.55, True), run(0.66, 0.55, 0.45, True)]
    runs[0]["rs_random_control"] = {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": 96, "wins": 50, "baseline": "x"}
    runs[1]["rs_random_control"] = PENDING
    rs = across_seeds(runs)["rs_beats_random_pick"]
    assert rs["met"] is None and rs["seeds"][1] == PENDING
    assert rs["seeds"][0] == {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7, "n": 96, "lc_win_rate": None, "lc_ci_low": None,
                              "lc_ci_high": None}


def test_alignment_markdown_tables_are_written_from_the_seeds_results():
    """`--markdown`: the README's tables come from the results (n, CIs, LC, paired TruthfulQA and ToxiGen changes), each
    comparison in its own column; what a summary lacks is a dash, never a made-up number."""
    from benchmarks.alignment import PENDING, markdown_tables

    def w(rate, lo, hi, lc=None):
        return {"win_rate": rate, "ci_low": lo, "ci_high": hi, "n": 96,
                **({"lc_win_rate": lc, "lc_ci_low": lc - 0.1, "lc_ci_high": lc + 0.1} if lc else {})}

    tox = {"n": 124, "diff_points": -1.6, "diff_ci": [-5.6, 2.4], "ci_before": [18.9, 34.1], "ci_after": [17.5, 32.3]}
    rnd = {"round": 1, "method": "ppo", "promoted": False, "judge": "gold_rm", "winrate_vs_sft": w(0.771, 0.688, 0.844, 0.814),
           "winrate_vs_previous": w(0.677, 0.583, 0.766, 0.726), "winrate_gold_vs_sft": w(0.74, 0.656, 0.833),
           "gold_rm_reward": {"policy": {"mean": 2.1622, "ci_low": 2.011, "ci_high": 2.3077},
                              "sft": {"mean": 1.57, "ci_low": 1.389, "ci_high": 1.754}},
           "decoding_control": {"winrate_gold_rm_vs_decoding": w(0.594, 0.49, 0.688)},
           "truthfulqa": {"mc2": 0.344}, "truthfulqa_sft": {"mc2": 0.380}, "toxigen": {"pct_toxic": 24.19},
           "toxigen_sft": {"pct_toxic": 25.81}, "truthfulqa_vs_sft": {"paired": {"diff": -0.036, "ci": [-0.065, -0.010]}},
           "toxigen_vs_sft": tox, "policy": {"returned": "iteration 30"}, "step_seconds": {"policy": 1800.0, "eval": 600.0}}
    run = {"project": "/r/bench-alignment-s0", "rounds": [rnd], "rs_random_control": PENDING,
           "targets": {"winrate_vs_sft": {"value": 0.771}, "time": {"minutes": 40.0}, "beats_decoding_control": {"met": True},
                       "truthfulqa_mc2": {"paired": {"diff": -0.036, "ci": [-0.065, -0.010]}},
                       "toxigen_not_worse": {"paired": tox}}}
    bare = {**rnd, "gold_rm_reward": None, "truthfulqa": None, "truthfulqa_vs_sft": None, "toxigen": None,
            "toxigen_vs_sft": None, "toxigen_sft": None, "truthfulqa_sft": None, "policy": {}, "promoted": True}
    other = {**run, "project": "/r/bench-alignment-s1", "rounds": [bare], "rs_random_control": w(0.521, 0.42, 0.62, 0.515),
             "targets": {**run["targets"], "winrate_vs_sft": {"value": 0.671}}}
    md = markdown_tables({"seeds": [run, other]}).splitlines()
    assert ("| V1 ppo (not promoted) (returned iteration 30) | 2.162 [2.011, 2.308] | 77.1% [68.8, 84.4], LC 81.4% [71.4, 91.4] "
            "| 67.7% [58.3, 76.6], LC 72.6% [62.6, 82.6] | 74.0% [65.6, 83.3] | 59.4% [49.0, 68.8] "
            "| 34.4 (-3.6 [-6.5, -1.0]) | 24.2 [17.5, 32.3] (-1.6 [-5.6, +2.4]) | 40.0 |") in md
    assert "| SFT | 1.570 [1.389, 1.754] | | | | | 38.0 | 25.8 [18.9, 34.1] | |" in md
    assert ("| V1 ppo | — | 77.1% [68.8, 84.4], LC 81.4% [71.4, 91.4] | 67.7% [58.3, 76.6], LC 72.6% [62.6, 82.6] "
            "| 74.0% [65.6, 83.3] | 59.4% [49.0, 68.8] | — | — | 40.0 |") in md  # nothing made up where numbers are missing
    assert "| SFT | — | | | | | — | — | |" in md
    assert ("| 0 | 77.1% [68.8, 84.4], LC 81.4% [71.4, 91.4] | 67.7% [58.3, 76.6], LC 72.6% [62.6, 82.6] | 59.4% [49.0, 68.8] "
            "| pending | -3.6 [-6.5, -1.0] | -1.6 [-5.6, +2.4] | 40.0 |") in md
    assert any(line.startswith("| 1 | ") and "| 52.1% [42.0, 62.0], LC 51.5% [41.5, 61.5] |" in line for line in md)
    assert "| mean ± sd (sample sd) | 72.1% ± 7.1 | | | | | | |" in md  # 77.1 and 67.1: sd = 10 / sqrt(2)
    assert ("Seed 0: promotion refused its final round (V1 ppo); the row reads it all the same, and the loop's output is "
            "the SFT model.") in md  # seed 1's final round was promoted: no line
    assert not any(line.startswith("Seed 1:") for line in md)
    assert md[-5:] == ["| round: step | seed 0 | seed 1 |", "|---|---|---|", "| 1: policy | 30.0 | 30.0 |",
                       "| 1: eval | 10.0 | 10.0 |", "| total | 40.0 | 40.0 |"]  # where the time goes


def test_alignment_history_keeps_every_attempt_and_replaces_only_the_same_one(tmp_path):
    """alignment_history.jsonl: a project's second call with another note (its control, a resumed seed) is a row of its
    own; the same attempt summarised again replaces its row; the row carries the RS control's win rate."""
    from benchmarks.alignment import record_attempt

    def summary(value, control=None):
        return {"project": "/r/p-s0", "config": "c.yaml", "overrides": ["seed=0"], "all_met": False, "rounds": [],
                "targets": {"time": {"minutes": 100.0}, "winrate_vs_sft": {"value": value},
                            "toxigen_not_worse": {"value": 25.0, "sft": 26.0}, "truthfulqa_mc2": {"value": 0.34, "sft": 0.38}},
                **({"rs_random_control": control} if control else {})}

    path = tmp_path / "history.jsonl"
    record_attempt(path, summary(0.7), note="seed 0")
    record_attempt(path, summary(0.7, {"win_rate": 0.505, "ci_low": 0.427, "ci_high": 0.578, "n": 96}), note="control")
    record_attempt(path, summary(0.8), note="seed 0")  # the same attempt summarised again
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["note"], r["final_winrate_vs_sft"]["value"]) for r in rows] == [("control", 0.7), ("seed 0", 0.8)]
    assert rows[0]["rs_random_control"]["win_rate"] == 0.505 and "rs_random_control" not in rows[1]


def test_alignment_kept_only_summarises_the_seeds_done_and_decides_nothing(tmp_path):
    """`--seeds 3 --kept-only` between sessions: the seeds kept so far, the others named as missing, no target decided."""
    from benchmarks.__main__ import summary_rows
    from benchmarks.alignment import kept_seeds

    seed0 = {"targets": {"winrate_vs_sft": {"value": 0.7, "ci": [0.6, 0.8], "n": 96}, "beats_decoding_control": {"met": True}},
             "rounds": [{"method": "ppo", "winrate_vs_previous": {"ci_low": 0.55}}]}
    (tmp_path / "p-s0.json").write_text(json.dumps(seed0))
    got = kept_seeds(tmp_path, "p", 3)
    assert got["seeds"] == [seed0] and got["seeds_missing"] == [1, 2]
    assert got["across_seeds"]["mean_winrate_vs_sft"]["mean"] == pytest.approx(0.7)
    assert all(c["met"] is None and c["partial"] == "1 of 3 seeds (missing: 1, 2)" for c in got["across_seeds"].values())
    rows = summary_rows("alignment", got)
    assert rows[0][1] == "final round vs SFT over 1 seeds (2 not run yet), mean +- sd" and rows[0][2] == "70.0% (one seed: no sd)"
    assert {r[2] for r in rows[1:]} == {"1 of 3 seeds (missing: 1, 2)"}
    (tmp_path / "p-s1.json").write_text(json.dumps(seed0))
    (tmp_path / "p-s2.json").write_text(json.dumps(seed0))
    full = kept_seeds(tmp_path, "p", 3)
    assert full["seeds_missing"] == [] and full["across_seeds"]["mean_winrate_vs_sft"]["met"] is True
    assert summary_rows("alignment", full)[0][2] == "70.0% +- 0.0"
    assert ["alignment", "final_not_promoted", "none"] == summary_rows("alignment", full)[-1][:3]
    (tmp_path / "p-s1.json").write_text(json.dumps({**seed0, "rounds": [{**seed0["rounds"][0], "promoted": False}]}))
    assert ["alignment", "final_not_promoted", "seeds 1"] == summary_rows("alignment", kept_seeds(tmp_path, "p", 3))[-1][:3]
    with pytest.raises(SystemExit, match="holds none"):
        kept_seeds(tmp_path, "q", 3)
    # seeds of two recipes are not pooled: one kept seed ran with other settings
    (tmp_path / "p-s2.json").write_text(json.dumps({**seed0, "settings_fingerprint": "abc"}))
    with pytest.raises(SystemExit, match=r"p-s0: not recorded, p-s1: not recorded, p-s2: abc"):
        kept_seeds(tmp_path, "p", 3)


def test_rlhf_core_length_strata_by_hand():
    """Win rates within length strata, counted by hand: pairs within 10 tokens, and pairs both cut at the limit."""
    from benchmarks.rlhf_core import length_strata

    pol = [{"tokens": 20, "finished": True}, {"tokens": 64, "finished": False}, {"tokens": 60, "finished": True},
           {"tokens": 64, "finished": False}]
    base = [{"tokens": 64, "finished": False}, {"tokens": 64, "finished": False}, {"tokens": 64, "finished": False},
            {"tokens": 70, "finished": False}]
    s = length_strata([1.0, 0.0, 1.0, 0.5], pol, base)
    assert (s["shorter"], s["same"], s["longer"]) == (3, 1, 0)
    assert s["similar_length"]["n"] == 3 and s["similar_length"]["win_rate"] == pytest.approx(1.5 / 3)  # pairs 2, 3, 4
    assert s["both_cut"]["n"] == 2 and s["both_cut"]["win_rate"] == pytest.approx(0.25)  # pairs 2 and 4
    assert length_strata([1.0], pol[:1], base[:1])["similar_length"] is None


def test_rlhf_core_refuses_an_empty_replication_set(capsys):
    from benchmarks import rlhf_core

    with pytest.raises(SystemExit) as e:
        rlhf_core.main(["--replication-prompts", "0"])
    assert e.value.code == 2 and "--replication-prompts must be >= 1 (got 0)" in capsys.readouterr().err


def test_rlhf_core_checks_the_proxy_sizes_before_training_any():
    """300 prompts x 8 pairs is 2,400 at most, less the pairs the gold scores equal: asking for 2,400 of 2,399 is refused
    before the first proxy trains (it was found after two proxies, 25 minutes in)."""
    from benchmarks.rlhf_core import check_pair_sizes

    check_pair_sizes([250, 1000, 2300], 2399)
    with pytest.raises(ValueError, match="asks for 2400 pairs, but the gold labelled 2399"):
        check_pair_sizes([250, 1000, 2400], 2399)
    with pytest.raises(ValueError, match="increasing"):
        check_pair_sizes([1000, 250], 2399)


def test_rlhf_core_agreement_has_the_cooler_answer_baseline_and_the_proxy_where_the_gold_prefers_the_hotter(tmp_path):
    """On fresh pairs (a at temperature 0.7, b at 1.3) 'the cooler answer wins' is the baseline a proxy must beat;
    the proxy's agreement where the gold preferred the hotter answer shows it does more than tell temperatures apart."""
    from types import SimpleNamespace

    from benchmarks.rlhf_core import Bench

    rows = [  # gold prefers a in 3 of 4; the proxy agrees on 3 of those and on the one where b wins
        {"gold_a": 1, "gold_b": 0, "proxy_5_a": 1, "proxy_5_b": 0},
        {"gold_a": 1, "gold_b": 0, "proxy_5_a": 1, "proxy_5_b": 0},
        {"gold_a": 1, "gold_b": 0, "proxy_5_a": 0, "proxy_5_b": 1},
        {"gold_a": 0, "gold_b": 1, "proxy_5_a": 0, "proxy_5_b": 1},
        {"gold_a": 1, "gold_b": 1, "proxy_5_a": 0, "proxy_5_b": 1},  # a gold tie: left out
    ]
    lines = [json.dumps({**r, "a": f"answer {i}", "b": f"other {i}", "len_a": 3 + i, "len_b": 4}) for i, r in enumerate(rows)]
    (tmp_path / "agreement.jsonl").write_text("\n".join(lines) + "\n")
    bench = Bench.__new__(Bench)
    bench.a, bench.out = SimpleNamespace(pairs=[5]), tmp_path
    got = bench.agreement()
    assert got["cooler_answer_rule"] == {"accuracy": 0.75, "n": 4}
    assert got["proxy_5"]["agreement"] == 0.75 and got["proxy_5"]["n"] == 4
    assert got["proxy_5"]["gold_prefers_cooler"]["agreement"] == 2 / 3 and got["proxy_5"]["gold_prefers_cooler"]["n"] == 3
    assert got["proxy_5"]["gold_prefers_hotter"] == {**got["proxy_5"]["gold_prefers_hotter"], "agreement": 1.0, "n": 1}


def test_alignment_markdown_without_seeds_is_refused_with_a_message(capsys):
    """`--markdown` prints tables over seeds: alone it is an error that says what to add, before anything runs."""
    from benchmarks.alignment import main

    with pytest.raises(SystemExit) as e:
        main(["--markdown", "--kept-only"])
    assert e.value.code == 2
    assert "give --seeds N" in capsys.readouterr().err


def test_rs_room_pick_gains_by_the_gold_computed_by_hand():
    """benchmarks.rs_room.pick_gains: only prompts with two or more eligible samples count; the gold scores of the
    ranked pick, the random pick, the gold's own best eligible sample and the eligible mean; the share of the oracle's
    gain over the eligible mean that the ranked pick gets."""
    from benchmarks.rs_room import gold_scores, pick_gains

    def rec(best, finished, texts=("a", "b", "c")):
        return {"prompt": [{"role": "user", "content": "q"}], "best": best,
                "samples": [{"response": t, "finished": f, "reward": 0.0} for t, f in zip(texts, finished)]}

    ranked = {"p1": rec(0, [True, True, True]), "p2": rec(2, [True, False, True]), "p3": rec(1, [False, True, False]),
              "p4": rec(None, [False, False, False])}
    random = {"p1": rec(1, [True, True, True]), "p2": rec(2, [True, False, True]), "p3": rec(1, [False, True, False]),
              "p4": rec(None, [False, False, False])}
    gold = {"p1": [3.0, 1.0, 2.0], "p2": [0.0, 9.0, 1.0], "p3": [5.0, 5.0, 5.0]}
    g = pick_gains(ranked, random, gold, require_eos=True, n_boot=200)
    # p1: ranked 3, random 1, best 3, mean 2; p2 (sample 1 unfinished): ranked 1, random 1, best 1, mean 0.5; p3: one
    # eligible sample, no choice; p4: nothing kept
    assert g["prompts"] == 2
    assert g["gold_ranked"] == pytest.approx(2.0) and g["gold_random"] == pytest.approx(1.0)
    assert g["gold_best"] == pytest.approx(2.0) and g["gold_mean_eligible"] == pytest.approx(1.25)
    assert g["ranked_minus_random"]["diff"] == pytest.approx(1.0)
    assert g["ranked_above_random"] == 1 and g["ranked_below_random"] == 0
    assert g["share_of_oracle_gain"] == pytest.approx((2.0 - 1.25) / (2.0 - 1.25))
    assert pick_gains(ranked, random, gold, require_eos=False, n_boot=200)["prompts"] == 3  # p3 now has a choice
    assert pick_gains({"p3": ranked["p3"]}, random, gold, require_eos=True) == {"prompts": 0}
    with pytest.raises(ValueError, match="p1: 2 gold scores for 3 samples"):
        pick_gains(ranked, random, {"p1": [1.0, 2.0]}, require_eos=True)

    class Scorer:  # the gold: the answer's length
        def score(self, prompts, responses):
            import torch

            return torch.tensor([float(len(r)) for r in responses])

    scored = gold_scores(Scorer(), {"p1": rec(0, [True, True, True], ("x", "yy", "zzz")), "p3": ranked["p3"]},
                         require_eos=True, batch=2)
    assert scored == {"p1": [1.0, 2.0, 3.0]}  # p3 has no choice: not scored


def test_precision_fidelity_is_zero_for_one_model_twice_and_not_for_bf16(tiny_model, tiny_reward_models, monkeypatch):
    """The bf16-vs-fp32 comparison of ``benchmarks precision`` on a tiny model: the same model in both slots gives
    identical greedy answers, equal MC2 and log-probabilities; the model in bf16 gives different log-probabilities."""
    import torch

    from benchmarks import precision
    from foundation import precision as foundation_precision
    from benchmarks.__main__ import summary_rows
    from foundation import models

    tok = models.load_tokenizer(tiny_model)
    fp32 = models.load_causal_lm(tiny_model, dtype="float32").eval()
    prompts = [[{"role": "user", "content": q}] for q in ("Hi", "Why is the sky blue?", "Name three colours.")]
    with torch.inference_mode():
        same, answers = precision.greedy({"float32": fp32, "bfloat16": fp32}, tok, prompts, 6)
        assert same == {"prompts": 3, "new_tokens": 6, "identical": 3, "mean_shared_prefix_share": 1.0}
        scored = precision.scoring({"float32": fp32, "bfloat16": fp32}, tok, prompts, answers["float32"], 3, 0)
        assert scored["truthfulqa"]["n"] == 3 and scored["truthfulqa"]["mc2_max_abs_diff"] == 0.0
        assert scored["answer_logprobs"]["mean_abs_diff_per_token"] == 0.0
        assert scored["answer_logprobs"]["tokens"] == sum(len(a.response_ids) for a in answers["float32"]) > 0
        bf16 = models.load_causal_lm(tiny_model, dtype="bfloat16").eval()
        assert next(bf16.parameters()).dtype == torch.bfloat16
        mixed = precision.scoring({"float32": fp32, "bfloat16": bf16}, tok, prompts, answers["float32"], 3, 0)
        _, both = precision.greedy({"float32": fp32, "bfloat16": bf16}, tok, prompts, 6)
    assert mixed["answer_logprobs"]["mean_abs_diff_per_token"] > 0
    monkeypatch.setattr(foundation_precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    texts = {k: [tok.decode(o.response_ids, skip_special_tokens=True) + " (a)" for o in v] for k, v in both.items()}
    texts["bfloat16"][0] = texts["float32"][0]  # one pair with the same answer twice: not a pair to pick from
    judged = precision.judging(str(tiny_reward_models["helpful"]), prompts, texts)
    differ = sum(x != y for x, y in zip(texts["float32"], texts["bfloat16"]))
    assert judged["answers"] == 6 and judged["pairs_with_different_answers"] == differ
    assert 0 <= judged["same_pick"] <= differ and judged["mean_abs_score_diff"] > 0
    result = {"generation": {"best_tokens_per_s": {"float32": 50.0, "bfloat16": 125.0}}, "scoring": mixed,
              "training": [{"setting": "fp32", "median_s": 2.0, "vs_fp32": 1.0},
                           {"setting": "bf16 autocast, fp32 weights", "median_s": 1.0, "vs_fp32": 0.5},
                           {"setting": "bf16 autocast, bf16 base weights", "error": "RuntimeError: no"}]}
    rows = summary_rows("precision", result)
    assert rows[0][2] == 2.5 and rows[1][2] == pytest.approx(mixed["truthfulqa"]["mc2_diff_points"])
    assert [r[2] for r in rows[2:]] == [0.5, "RuntimeError: no"]
