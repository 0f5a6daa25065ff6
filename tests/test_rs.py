"""The rejection-sampling stage: best-of-K and pool rules by hand, the sample log, batched scoring
with each prompt's safety flag, a known reward rising over two rounds, and SIGKILL mid-sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_jsonl

from foundation.config import ConfigError, load_config
from alignment.rs import RSConfig, SampleLog, SamplingConfig, main, sample_round
from alignment.rs_pool import best_of, merge_pools, pool_record, prompt_key, read_pool
from data.errors import DataError
from data.loaders import load_sft
from data.schemas import PromptRecord

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny-model ops are too small to gain from threads, and on a shared CPU two OpenMP threads made
    generation ~50x slower than one (measured: 8 s vs 0.17 s per call): run these tests on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocesses
    yield
    torch.set_num_threads(threads)


def share_e(prompt, response) -> float:
    """A known reward: the share of the response's non-space characters that are the letter e."""
    s = "".join(response.split())
    return s.count("e") / len(s) if s else 0.0


def prompt_rows(n: int = 48) -> list[dict]:
    subjects = ["the fox", "a dog", "Paris", "France", "Python", "the capital", "a request",
                "the answer", "a question", "numbers"]
    verbs = ["Tell me about", "Summarise", "Explain", "Describe"]
    return [{"prompt": f"{verbs[i % 4]} {subjects[i % len(subjects)]} ({i}).",
             "category": "safety" if i % 5 == 0 else "helpfulness"}
            for i in range(n)]


def rs_args(tmp_path: Path, prompts: Path, *extra: str) -> list[str]:
    return ["model.name=tiny-llama", f"run.root={tmp_path / 'runs'}", "run.wandb=disabled", "reward.function=test_rs:share_e",
            "reward.helpful=null", "reward.safety=null", f"data.sources=[{{path: {prompts}}}]", "data.val_fraction=0.3",
            "sampling.require_eos=false", "sampling.max_new_tokens=16", "eval.max_new_tokens=16", "eval.temperature=1.0",
            "adapter.method=full", "train.lr=3e-3", "train.warmup_ratio=0", "train.batch_size=4", "train.grad_accum=1", *extra]


# ---------------------------------------------------------------------------------------------
# pure pieces


def test_best_of_picks_the_highest_eligible_reward():
    assert best_of([0.1, 0.9, 0.5], [True, True, True]) == 1
    assert best_of([0.1, 0.9, 0.5], [True, False, True]) == 2  # the best one never finished
    assert best_of([0.5, 0.2, 0.5], [True, True, True]) == 0  # ties: the first
    assert best_of([-3.0, -1.0], [True, True]) == 1
    assert best_of([0.3, 0.4], [False, False]) is None


def test_the_random_pick_control_keeps_a_seeded_eligible_sample_whatever_its_reward():
    """sampling.pick=random (issue 26's control: the same samples, no ranking): only eligible samples, the same one
    for the same seed (a resumed run), every eligible one over seeds; pick=best is best_of."""
    from alignment.rs_pool import pick_of

    rewards, eligible = [0.1, 0.9, 0.5, 0.3], [True, False, True, True]
    assert pick_of(rewards, eligible, "best", 7) == best_of(rewards, eligible) == 2
    picks = [pick_of(rewards, eligible, "random", seed) for seed in range(200)]
    assert set(picks) == {0, 2, 3}  # never the ineligible one, whatever its reward
    assert pick_of(rewards, eligible, "random", 11) == pick_of(rewards, eligible, "random", 11)
    assert pick_of(rewards, [False] * 4, "random", 3) is None


def test_repick_keeps_the_samples_and_draws_what_a_random_pick_run_draws():
    """alignment.rs_pool.repick (the control run from a finished round's samples): each record keeps its samples, its kept
    index is the one pick_of draws for that prompt's key and the run's seed (what a run with sampling.pick=random would
    have written), never an empty or unfinished sample under require_eos, None when none is eligible."""
    from alignment.rs_pool import eligible_of, pick_of, repick

    def rec(key, finished, texts=None):
        texts = texts or ["a"] * len(finished)
        samples = [{"response": t, "finished": f, "reward": float(i)} for i, (t, f) in enumerate(zip(texts, finished))]
        return {"key": key, "samples": samples, "best": len(samples) - 1}

    records = [rec("00000000000000ff", [True, False, True, True]), rec("0000000000000abc", [False, False]),
               rec("0000000000001234", [True, True, True], texts=["a", " ", "b"])]
    assert eligible_of(records[2]["samples"], True) == [True, False, True]  # an empty answer is never kept
    assert eligible_of(records[0]["samples"], False) == [True, True, True, True]
    got = repick(records, "random", 5, True)
    assert [g["samples"] for g in got] == [r["samples"] for r in records] and records[0]["best"] == 3  # inputs untouched
    assert got[0]["best"] == pick_of([0.0, 1.0, 2.0, 3.0], [True, False, True, True], "random", 0xff ^ 5)
    assert got[1]["best"] is None and got[2]["best"] in (0, 2)
    assert {repick(records, "random", seed, True)[0]["best"] for seed in range(100)} == {0, 2, 3}
    assert [g["best"] for g in repick(records, "best", 5, False)] == [3, 1, 2]  # pick=best: the highest reward


def test_prompt_key_is_content_based():
    a = [{"role": "user", "content": "hi"}]
    assert prompt_key(a) == prompt_key([{"content": "hi", "role": "user"}]) and len(prompt_key(a)) == 16
    assert prompt_key(a) != prompt_key([{"role": "user", "content": "hi "}])


def test_pool_keeps_every_earlier_round_and_reads_as_sft(tmp_path):
    p1, p2 = PromptRecord([{"role": "user", "content": "q1"}]), PromptRecord([{"role": "user", "content": "q2"}], "safety", "x")
    r1 = [pool_record(p1, "a1", 0.5, 1, temperature=1.0, model="m0")]
    r2 = [pool_record(p1, "a1 again", 0.7, 2, temperature=1.0, model="m1")]
    new = [pool_record(p1, "a3", 0.9, 3, temperature=1.2, model="m2"),
           pool_record(p2, "a3b", 0.1, 3, temperature=1.2, model="m2")]
    merged = merge_pools([r1, r2], new)
    assert [(r["round"], r["messages"][-1]["content"]) for r in merged] == [(1, "a1"), (2, "a1 again"), (3, "a3"), (3, "a3b")]
    path = write_jsonl(tmp_path / "pool.jsonl", merged)
    assert read_pool(str(path)) == merged
    dialogues = load_sft(str(path))  # the data layer reads a pool as SFT dialogues
    assert dialogues[3].messages == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a3b"}]
    assert dialogues[3].category == "safety" and merged[3]["prompt_key"] == prompt_key(p2.messages)
    # round 3's pool already holds rounds 1-2: given with round 2's (which holds round 1's), each record stays once
    r2_pool = merge_pools([r1], r2)
    r4 = merge_pools([r1, r2_pool, merged], [pool_record(p2, "a4", 0.3, 4, temperature=1.2, model="m3")])
    assert ([(r["round"], r["messages"][-1]["content"]) for r in r4]
            == [(1, "a1"), (2, "a1 again"), (3, "a3"), (3, "a3b"), (4, "a4")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [merged[0], {"messages": merged[0]["messages"]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*`round`"):
        read_pool(str(bad))


def test_sample_log_drops_a_half_written_line_and_rejects_damage(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"key": "a", "best": 0}\n{"key": "b", "best": 1}\n{"key": "c", "be')  # killed mid-write
    log = SampleLog(path)
    assert log.done == {"a", "b"} and path.read_text().endswith('"best": 1}\n')
    log.append({"key": "c", "best": None})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b", "c"]
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"samples.jsonl:2: malformed JSON"):
        SampleLog(path)


def test_config_checks():
    with pytest.raises(ConfigError, match="reward.function: a reward function replaces the reward models"):
        load_config(RSConfig, None, ["reward.function=m:f"])  # the reward models are still set
    with pytest.raises(ConfigError, match="reward.function: must look like module:function"):
        load_config(RSConfig, None, ["reward.function=share_e", "reward.helpful=null", "reward.safety=null"])
    cfg = load_config(RSConfig, None,
                      ["reward.function=m:f", "reward.helpful=null", "reward.safety=null", "reward.function_kwargs={target: 3}"])
    assert cfg.reward.function_kwargs == {"target": 3}
    with pytest.raises(ConfigError, match="sampling.temperature"):
        load_config(RSConfig, None, ["sampling.temperature=0"])
    with pytest.raises(ConfigError, match="eval.samples: several responses per prompt need temperature > 0"):
        load_config(RSConfig, None, ["eval.samples=4"])
    with pytest.raises(ConfigError, match="did you mean 'sampling.num_samples'"):
        load_config(RSConfig, None, ["sampling.num_sample=4"])


# ---------------------------------------------------------------------------------------------
# sampling


class RecordingScorer:
    """A combined-style scorer that records the safety flag it was given for each prompt."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def score_detailed(self, prompts, responses, is_safety=None):
        self.seen += [(p[-1]["content"], s) for p, s in zip(prompts, is_safety)]
        helpful = torch.tensor([float(len(r)) for r in responses])
        safety = torch.tensor([share_e(None, r) for r in responses])
        return {"helpful": helpful, "safety": safety, "combined": torch.where(torch.tensor(is_safety), safety, helpful)}


def test_sampling_batches_prompts_and_passes_each_prompts_safety_flag(tmp_path, tiny_model, monkeypatch):
    from foundation import generation
    from foundation.models import load_causal_lm, load_tokenizer

    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate",
                        lambda model, tok, convs, **kw: calls.append(len(convs)) or real(model, tok, convs, **kw))
    prompts = [PromptRecord.from_dict(r) for r in prompt_rows(5)]  # prompt 0 is a safety prompt
    scorer = RecordingScorer()
    log = SampleLog(tmp_path / "samples.jsonl")
    cfg = SamplingConfig(num_samples=3, batch_size=6, max_new_tokens=6, require_eos=False)
    stats = sample_round(load_causal_lm("tiny-llama"), load_tokenizer("tiny-llama"), scorer, prompts, cfg, log, seed=0)
    assert calls == [6, 6, 3]  # 2 prompts x 3 samples per call, then the last prompt
    assert scorer.seen == [(p.text, p.is_safety) for p in prompts for _ in range(3)]
    assert stats["prompts_sampled"] == 5 and len(log.records) == 5
    for p, rec in zip(prompts, log.records):
        assert rec["key"] == prompt_key(p.messages) and rec["category"] == p.category and len(rec["samples"]) == 3
        rewards = [s["reward"] for s in rec["samples"]]
        assert rec["best"] == rewards.index(max(rewards))
        expected = [s["safety"] if p.is_safety else s["helpful"] for s in rec["samples"]]
        assert rewards == pytest.approx(expected)
    again = sample_round(None, None, scorer, prompts, cfg, SampleLog(tmp_path / "samples.jsonl"), seed=0)
    assert again["prompts_sampled"] == 0 and calls == [6, 6, 3]  # all done: nothing generated
    # a run with pick=random keeps what repick draws from the same samples (the RS control's re-pick), and the
    # re-pick of a pick=best run's samples is what that run would have kept
    from alignment.rs_pool import repick

    rand = SampleLog(tmp_path / "random.jsonl")
    sample_round(load_causal_lm("tiny-llama"), load_tokenizer("tiny-llama"), scorer, prompts,
                 SamplingConfig(num_samples=3, batch_size=6, max_new_tokens=6, require_eos=False, pick="random"), rand, seed=7)
    assert repick(rand.records, "random", 7, False) == rand.records
    assert [r["best"] for r in repick(rand.records, "best", 7, False)] == [
        max(range(3), key=lambda i: (r["samples"][i]["reward"], -i)) for r in rand.records]


# ---------------------------------------------------------------------------------------------
# the stage end to end


def test_two_rounds_raise_a_known_reward_and_keep_every_round(tmp_path, tiny_model, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))
    common = rs_args(tmp_path, prompts, "sampling.num_samples=16", "sampling.batch_size=32",
                     "train.num_epochs=4", "eval.samples=8")
    out1 = main(load_config(RSConfig, REPO / "configs/rs.yaml", [*common, "run.name=r1"], stage="rs"))
    s1 = json.loads((out1 / "summary.json").read_text())
    assert s1["mean_best_reward"] > s1["mean_sample_reward"] + 0.03  # best-of-16 is well above the average sample
    assert s1["reward_after"] > s1["reward_before"] * 1.3, s1  # the fine-tuned policy earns clearly more
    for name in ("samples.jsonl", "pool.jsonl", "eval_before.json", "eval_after.json",
                 "model/model.safetensors", "metrics.jsonl"):
        assert (out1 / name).is_file(), name
    samples = [json.loads(x) for x in (out1 / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == s1["prompts_train"] == s1["pool_new"] and all(len(r["samples"]) == 16 for r in samples)

    out2 = main(load_config(RSConfig, REPO / "configs/rs.yaml", [
        *common, "run.name=r2", f"model.name={out1}", "pool.round=2", f"pool.previous=[{out1 / 'pool.jsonl'}]"], stage="rs"))
    s2 = json.loads((out2 / "summary.json").read_text())
    pool2 = read_pool(str(out2 / "pool.jsonl"))
    assert s2["pool_by_round"] == {"1": s1["pool_new"], "2": s2["pool_new"]} and len(pool2) == s1["pool_new"] + s2["pool_new"]
    assert pool2[: s1["pool_new"]] == read_pool(str(out1 / "pool.jsonl"))  # round 1's records, unchanged
    assert s2["reward_before"] == pytest.approx(s1["reward_after"], abs=1e-6)  # round 2 starts where round 1 ended
    assert s2["reward_after"] > s1["reward_before"] * 1.3


def test_sigkill_during_sampling_then_resume_skips_finished_prompts(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(48))
    args = ["rs", "--config", str(REPO / "configs/rs.yaml"), *rs_args(
        tmp_path, prompts, "sampling.num_samples=4", "sampling.batch_size=4", "sampling.max_new_tokens=48", "train.max_steps=2",
        "eval.temperature=0", "eval.max_new_tokens=4")]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_path = tmp_path / "runs" / "default" / "rs" / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not log_path.is_file() or log_path.read_text().count("\n") < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (log_path.parent / "pool.jsonl").exists(), "sampling finished before the kill"
    kept = [line for line in log_path.read_text().split("\n")[:-1] if line]  # complete lines only
    assert len(kept) >= 4

    res = subprocess.run([sys.executable, "-m", "alignment.cli", *args, "--resume"], check=False, cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"sampling: {len(kept)} of " in res.stderr
    lines = log_path.read_text().splitlines()
    assert lines[: len(kept)] == kept  # finished prompts untouched
    keys = [json.loads(x)["key"] for x in lines]
    summary = json.loads((log_path.parent / "summary.json").read_text())
    assert len(keys) == len(set(keys)) == summary["prompts_train"]  # every prompt exactly once
    assert summary["prompts_already_done"] == len(kept) and summary["prompts_sampled"] == len(keys) - len(kept)
    assert summary["pool_size"] == len(keys)


def test_cli_lists_and_documents_rs():
    from conftest import run_align

    res = run_align("--help")
    assert res.returncode == 0 and " rs " in res.stdout and " dpo " in res.stdout
    res = run_align("rs", "--help")
    assert res.returncode == 0 and "sampling.num_samples" in res.stdout and "pool.previous" in res.stdout


def test_expected_best_of_by_hand():
    from alignment.rs_pool import expected_best_of

    r = [3.0, 1.0, 2.0]  # sorted 1, 2, 3
    assert expected_best_of(r, 1) == pytest.approx(2.0)  # the mean
    assert expected_best_of(r, 2) == pytest.approx((2 + 3 + 3) / 3)  # pairs {1,2} {1,3} {2,3}
    assert expected_best_of(r, 3) == 3.0
    with pytest.raises(ValueError, match="k must be in"):
        expected_best_of(r, 4)


def length_per(prompt, response, *, unit: float = 1.0) -> float:
    return len(response) / unit


def test_rule_based_reward_takes_its_keyword_arguments(monkeypatch):
    from reward.config import RewardConfig, build_scorer

    monkeypatch.syspath_prepend(str(TESTS))
    scorer, _ = build_scorer(RewardConfig(helpful=None, safety=None, function="test_rs:length_per",
                                          function_kwargs={"unit": 2.0}))
    assert scorer.score([[{"role": "user", "content": "q"}]] * 2, ["abcd", "ab"]).tolist() == [2.0, 1.0]
    with pytest.raises(ConfigError, match="reward.function: cannot import 'test_rs:nope'"):
        build_scorer(RewardConfig(helpful=None, safety=None, function="test_rs:nope"))
    with pytest.raises(ConfigError, match="reward.helpful: no reward model at /nonexistent"):
        build_scorer(RewardConfig(helpful="/nonexistent", safety=None))


@pytest.mark.slow
def test_rs_runs_on_smollm2_with_the_bundled_prompts(tmp_path, monkeypatch):
    """The real model and prompts, tiny sizes, a rule-based reward (the reward-model run is in the README)."""
    monkeypatch.syspath_prepend(str(TESTS))
    cfg = load_config(RSConfig, REPO / "configs/rs.yaml", [
        f"run.root={tmp_path}", "run.wandb=disabled", "reward.function=test_rs:share_e", "reward.helpful=null",
        "reward.safety=null", "data.sources=[{path: 'bundled:prompts', limit: 8}]", "data.val_fraction=0.25",
        "sampling.num_samples=2", "sampling.max_new_tokens=24", "sampling.require_eos=false", "eval.max_new_tokens=16",
        "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1"], stage="rs")
    out = main(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pool_size"] == summary["prompts_train"] and summary["sft_global_step"] == 1
    assert (json.loads((out / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
            == "HuggingFaceTB/SmolLM2-135M-Instruct")
