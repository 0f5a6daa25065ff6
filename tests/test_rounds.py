"""`align round`: the rule judge and prompt draws by hand; two unattended rounds on tiny models,
killed in the middle of a step and resumed, against an uninterrupted run; people in the loop."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_align
from sqlalchemy import text
from safetensors.torch import load_file

from foundation.config import ConfigError, load_config
from alignment.rounds import Project, RoundConfig, draw_prompts, status
from data.heuristics import repetition
from data.store.simulated import rule_judgement, rule_scores
from data.schemas import PromptRecord

TINY = REPO / "configs" / "round_tiny.yaml"


# --------------------------------------------------------------------------- pure pieces


def test_repetition_share_of_repeated_trigrams():
    assert repetition("a b c d") == 0.0
    # trigrams: (a b c) (b c a) (c a b) (a b c): 3 distinct of 4
    assert repetition("a b c a b c") == pytest.approx(0.25)
    assert repetition("too short") == 0.0


def test_rule_scores_by_hand():
    # 40 distinct words of 80, finished: 0.5 + 1
    text = " ".join(f"w{i}" for i in range(40))
    assert rule_scores(text, safety_prompt=False) == (pytest.approx(1.5), True)
    assert rule_scores(text, safety_prompt=False, finished=False)[0] == pytest.approx(0.5)
    # refusing a harmless prompt: 4/80 + 1 - 1
    assert rule_scores("I'm sorry, I cannot.", safety_prompt=False)[0] == pytest.approx(4 / 80)
    # on a safety prompt a refusal is safe (+2), compliance unsafe
    assert rule_scores("I'm sorry, I cannot.", safety_prompt=True) == (pytest.approx(4 / 80 + 1 + 2), True)
    assert rule_scores("Sure, here is how.", safety_prompt=True) == (pytest.approx(4 / 80 + 1), False)


def test_rule_judgement_prefers_the_safe_refusal_on_safety_prompts():
    class Task:
        category, meta = "safety", {"finished_a": True, "finished_b": True}
        response_a, response_b = "Sure, here is how to do it step by step.", "I'm sorry, I can't help with that."

    j = rule_judgement(Task())
    assert (j.chosen, j.safe_a, j.safe_b) == ("B", False, True)
    assert j.strength == "significantly_better"  # gap 2 - 1/80 > 1


def test_draw_prompts_never_reuses_and_keeps_the_safety_share():
    pool = [PromptRecord([{"role": "user", "content": f"q{i}"}], category="safety" if i % 4 == 0 else "helpfulness")
            for i in range(40)]
    used = {json.dumps(pool[0].messages, sort_keys=True), json.dumps(pool[1].messages, sort_keys=True)}
    got = draw_prompts(pool + pool[:5], used, 8, 0.5, seed=3)  # duplicates in the pool are drawn once
    keys = [json.dumps(p.messages, sort_keys=True) for p in got]
    assert len(got) == 8 and len(set(keys)) == 8 and not used & set(keys)
    assert sum(p.category == "safety" for p in got) == 4
    assert [p.messages for p in draw_prompts(pool, used, 8, 0.5, seed=3)] == [p.messages for p in got]  # seeded
    # 9 safety prompts are left (10 minus the used q0): asking for 100% of 12 takes them all, then fills up
    assert sum(p.category == "safety" for p in draw_prompts(pool, used, 12, 1.0, seed=0)) == 9


def test_round_config_is_checked():
    with pytest.raises(ConfigError, match="methods.*unknown method 'sft'"):
        load_config(RoundConfig, None, ["methods=[rs, sft]"], stage="round")
    with pytest.raises(ConfigError, match="sample.temperatures"):
        load_config(RoundConfig, None, ["sample.temperatures=[0.7, 0.9, 1.1]"], stage="round")  # three for two responses
    with pytest.raises(ConfigError, match="sample.samples_per_prompt"):
        load_config(RoundConfig, None, ["sample.samples_per_prompt=1"], stage="round")
    with pytest.raises(ConfigError, match="sample.pairs_per_prompt"):
        load_config(RoundConfig, None, ["sample.pairs_per_prompt=0"], stage="round")
    with pytest.raises(ConfigError, match=r"policy.ppo.overrides.*model.name is set by the round \(the current policy\)"):
        load_config(RoundConfig, None, ["policy.ppo.overrides=[train.lr=1e-4, model.name=smollm2-135m]"], stage="round")
    with pytest.raises(ConfigError, match=r"rm_safety.overrides.*data.sources is set by the round"):
        load_config(RoundConfig, None, ['rm_safety.overrides=["data.sources=[bundled:comparisons]"]'], stage="round")
    assert load_config(RoundConfig, None, ["rm_safety.overrides=[model.name=tiny-llama]"], stage="round")  # the RM's base
    with pytest.raises(ConfigError, match="rm_start"):
        load_config(RoundConfig, None, ["rm_start=latest"], stage="round")
    assert load_config(RoundConfig, None, ["sample.samples_per_prompt=4", "sample.temperatures=[0.8]"], stage="round")
    with pytest.raises(ConfigError, match="annotation.rm_helpful"):
        load_config(RoundConfig, None, ["annotation.simulated=rm"], stage="round")
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(RoundConfig, REPO / "configs/round.yaml", ["promote.min_winrat=0.6"], stage="round")
    cfg = load_config(RoundConfig, REPO / "configs/round.yaml", [], stage="round")
    assert [cfg.method(n) for n in (1, 2, 3, 4)] == ["rs", "rs", "ppo", "ppo"]  # the last method repeats


def test_rs_pools_over_three_rounds_hold_each_round_once(tmp_path, tiny_model, tiny_reward_models):
    """Three rejection-sampling rounds through the orchestrator's policy step (the real `align rs` in
    a child process): every round's pool holds each earlier round's best samples exactly once."""
    from foundation.config import load_config
    from foundation.models import resolve
    from alignment.rounds import run_step

    p = Project.init(load_config(RoundConfig, TINY,
                                 ["methods=[rs]", "rounds=3", "project=rs3", f"root={tmp_path}"], stage="round"))
    (p.round_dir(1)).mkdir(parents=True)
    (p.round_dir(1) / "sft").symlink_to(resolve(tiny_model).path)  # round 1 starts from the tiny model itself
    for n in (1, 2, 3):
        p.round_dir(n).mkdir(parents=True, exist_ok=True)
        for name, objective in (("rm_helpful", "helpful"), ("rm_safety", "safety")):
            (p.round_dir(n) / name).symlink_to(tiny_reward_models[objective])
        assert run_step(p, n, "policy") == "done"
    summaries = {n: json.loads((p.round_dir(n) / "policy" / "summary.json").read_text()) for n in (1, 2, 3)}
    new = {n: summaries[n]["pool_new"] for n in (1, 2, 3)}
    assert all(k > 0 for k in new.values())
    for n in (1, 2, 3):  # round n's pool: rounds 1..n, each once
        assert summaries[n]["pool_by_round"] == {str(k): new[k] for k in range(1, n + 1)}
        rows = [json.loads(line) for line in (p.round_dir(n) / "policy" / "pool.jsonl").read_text().splitlines()]
        assert len(rows) == sum(new[k] for k in range(1, n + 1))
    # the orchestrator hands each round the previous round's pool only (it already holds all before it)
    previous = {n: p.manifest(n)["steps"]["policy"]["inputs"]["previous_pools"] for n in (1, 2, 3)}
    assert (previous
            == {1: [], 2: [str(p.round_dir(1) / "policy" / "pool.jsonl")], 3: [str(p.round_dir(2) / "policy" / "pool.jsonl")]})


def _project(tmp_path: Path, *overrides: str) -> Project:
    cfg = load_config(RoundConfig, TINY, [f"root={tmp_path}", "project=hand", *overrides], stage="round")
    return Project.init(cfg)


def _done(p: Project, n: int, **steps: dict) -> None:
    m = p.manifest(n)
    m["steps"].update({k: {"status": "done", **v} for k, v in steps.items()})
    p.save_manifest(n, m)


def test_a_failed_step_says_so_and_its_time_counts_when_it_runs_again(tmp_path, monkeypatch):
    from alignment.rounds import StageFailed, Steps, format_status, run_step

    p = _project(tmp_path)
    calls = []

    def sft(self):
        calls.append(self.n)
        if len(calls) == 1:
            time.sleep(0.3)
            raise StageFailed("align sft: exit code 1 (see the log)")
        return {"inputs": {}, "outputs": {"path": "sft"}}

    monkeypatch.setattr(Steps, "sft", sft)
    with pytest.raises(StageFailed):
        run_step(p, 1, "sft")
    rec = p.manifest(1)["steps"]["sft"]
    assert rec["status"] == "failed" and rec["error"] == "StageFailed: align sft: exit code 1 (see the log)"
    assert rec["pid"] == os.getpid() and 0.3 <= rec["seconds"] < 30
    assert not (p.round_dir(1) / ".sft.alive").exists()  # the heartbeat goes with the attempt
    assert p.pending(1)[0] == "sft"  # failed is not done
    text_ = format_status(status(p))
    assert "step sft: failed at" in text_ and "exit code 1" in text_

    assert run_step(p, 1, "sft") == "done"
    rec = p.manifest(1)["steps"]["sft"]
    assert rec["status"] == "done" and rec["outputs"] == {"path": "sft"}
    [earlier] = rec["interrupted"]
    assert earlier["error"].startswith("StageFailed") and earlier["seconds"] >= 0.3
    assert rec["seconds_all_attempts"] == pytest.approx(rec["seconds"] + earlier["seconds"], abs=0.1)
    assert status(p)["rounds"][0]["interrupted"] == {"sft": {"attempts": 1, "seconds": earlier["seconds"]}}


def test_a_step_killed_without_a_word_is_timed_by_its_heartbeat(tmp_path, monkeypatch):
    """A "running" record nobody holds the lock for is an attempt that died (a session's end, an OOM kill): the next
    attempt keeps it with the seconds from its start to its heartbeat file's last touch."""
    from alignment.rounds import Steps, format_status, run_step

    p = _project(tmp_path)
    started = time.time() - 100
    m = p.manifest(1)
    m["steps"]["sft"] = {"status": "running", "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(), "pid": 4242}
    p.save_manifest(1, m)
    beat = p.round_dir(1) / ".sft.alive"
    beat.touch()
    os.utime(beat, (started + 60, started + 60))  # last alive 60 s after it started
    assert "step sft: stopped without finishing (pid 4242" in format_status(status(p))

    monkeypatch.setattr(Steps, "sft", lambda self: {"inputs": {}, "outputs": {}})
    assert run_step(p, 1, "sft") == "done"
    rec = p.manifest(1)["steps"]["sft"]
    [earlier] = rec["interrupted"]
    assert earlier["pid"] == 4242 and earlier["seconds"] == pytest.approx(60, abs=1.5)
    assert rec["seconds_all_attempts"] == pytest.approx(60 + rec["seconds"], abs=1.5)
    assert not beat.exists()


def test_one_process_runs_a_projects_steps(tmp_path):
    """Two `align round run` on one project would sample, label and train over each other: the second is refused,
    naming the holder; the lock is re-entrant in its process and released after."""
    from alignment.rounds import project_lock
    from alignment.rounds.project import lock_holder

    p = _project(tmp_path)
    assert lock_holder(p) is None
    other = [sys.executable, "-c", "import sys; from alignment.rounds import Project, project_lock, ProjectBusy\n"
             f"p = Project({str(tmp_path)!r}, 'hand')\n"
             "try:\n    with project_lock(p): print('got it')\nexcept ProjectBusy as e:\n    print(e); sys.exit(3)"]
    with project_lock(p):
        with project_lock(p):  # re-entrant: a step inside a run
            assert lock_holder(p).endswith("(this process)")
        res = subprocess.run(other, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 3, res.stderr[-2000:]
        assert f"pid {os.getpid()} since" in res.stdout and "is running this project's steps" in res.stdout
        res = run_align("round", "run", "--project", "hand", "--root", str(tmp_path), timeout=300)
        assert res.returncode == 1 and "is running this project's steps" in res.stderr
        assert p.manifest(1)["steps"] == {}  # refused before anything ran
    assert lock_holder(p) is None
    res = subprocess.run(other, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "got it" in res.stdout


def _toxigen_rows(path: Path, flags: list[bool]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"group": "g", "prompt_type": "hate", "prompt": f"p{i}", "toxic": f}) + "\n"
                            for i, f in enumerate(flags)))


@pytest.mark.parametrize("test, promoted", [("paired", True), ("none", False)])
def test_promotion_blocks_a_toxigen_rise_only_when_it_is_significant(tmp_path, test, promoted):
    from alignment.rounds import Steps

    p = _project(tmp_path, f"promote.toxigen_test={test}")
    # the SFT model: 36 of 124 toxic; round 1's policy: 10 prompts turn toxic, 6 stop (40 of 124, +3.2 points, p = 0.227)
    sft = [False] * 10 + [True] * 6 + [True] * 30 + [False] * 78
    pol = [True] * 10 + [False] * 6 + [True] * 30 + [False] * 78
    _toxigen_rows(p.round_dir(1) / "eval" / "sft" / "toxigen_rows.jsonl", sft)
    _toxigen_rows(p.round_dir(1) / "eval" / "toxigen_rows.jsonl", pol)
    _done(p, 1, eval={"outputs": {"winrate_vs_previous": {"win_rate": 0.6}, "toxigen": {"pct_toxic": 100 * 40 / 124},
                                  "toxigen_sft": {"pct_toxic": 100 * 36 / 124}}})
    out = Steps(p, 1).promote()["outputs"]
    assert out["promoted"] is promoted
    if test == "paired":
        assert "10 prompts more toxic, 6 less of 124, sign test p=0.227 (not significant at 0.05) (ok)" in out["reason"]
    else:
        assert "ToxiGen 32.3% vs 29.0% before on the reported prompts (no ToxiGen validation draw) (worse)" in out["reason"]
    # a significant rise blocks it under both: 12 new toxic continuations, none fewer (p = 1/4096)
    _toxigen_rows(p.round_dir(1) / "eval" / "sft" / "toxigen_rows.jsonl", [False] * 12 + [True] * 30 + [False] * 82)
    _toxigen_rows(p.round_dir(1) / "eval" / "toxigen_rows.jsonl", [True] * 12 + [True] * 30 + [False] * 82)
    _done(p, 1, eval={"outputs": {"winrate_vs_previous": {"win_rate": 0.6}, "toxigen": {"pct_toxic": 100 * 42 / 124},
                                  "toxigen_sft": {"pct_toxic": 100 * 30 / 124}}})
    out = Steps(p, 1).promote()["outputs"]
    assert out["promoted"] is False
    if test == "paired":
        assert "12 prompts more toxic, 0 less of 124, sign test p=0.000 (significant at 0.05) (worse)" in out["reason"]


def test_promotion_reads_the_toxigen_validation_draw_not_the_reported_prompts(tmp_path):
    """With a validation draw in this round's eval and in the one it compares with, promotion tests ToxiGen there: a
    significant rise on the reported prompts does not block it, one on the validation draw does; the reason says which."""
    from alignment.rounds import Steps

    p = _project(tmp_path)
    ev = p.round_dir(1) / "eval"
    rise, flat = ([False] * 12 + [True] * 30 + [False] * 82, [True] * 12 + [True] * 30 + [False] * 82), ([False] * 124,) * 2
    for name, (before, after) in (("toxigen_rows.jsonl", rise), ("toxigen_validation_rows.jsonl", flat)):
        _toxigen_rows(ev / "sft" / name, before)
        _toxigen_rows(ev / name, after)
    _done(p, 1, eval={"outputs": {"winrate_vs_previous": {"win_rate": 0.6},
                                  "toxigen": {"pct_toxic": 100 * 42 / 124, "validation": {"pct_toxic": 0.0}},
                                  "toxigen_sft": {"pct_toxic": 100 * 30 / 124, "validation": {"pct_toxic": 0.0}}}})
    out = Steps(p, 1).promote()["outputs"]
    assert out["promoted"] is True and "ToxiGen 0.0% vs 0.0% before on the validation draw (ok)" in out["reason"]
    # the same rise on the validation draw blocks it
    _toxigen_rows(ev / "sft" / "toxigen_validation_rows.jsonl", rise[0])
    _toxigen_rows(ev / "toxigen_validation_rows.jsonl", rise[1])
    _done(p, 1, eval={"outputs": {"winrate_vs_previous": {"win_rate": 0.6},
                                  "toxigen": {"pct_toxic": 0.0, "validation": {"pct_toxic": 100 * 42 / 124}},
                                  "toxigen_sft": {"pct_toxic": 0.0, "validation": {"pct_toxic": 100 * 30 / 124}}}})
    out = Steps(p, 1).promote()["outputs"]
    assert out["promoted"] is False
    assert ("ToxiGen 33.9% vs 24.2% before on the validation draw: 12 prompts more toxic, 0 less of 124, sign test "
            "p=0.000 (significant at 0.05) (worse)") in out["reason"]


def test_promotion_says_when_the_toxigen_check_compared_two_dtypes(tmp_path):
    from alignment.rounds import Steps

    p = _project(tmp_path)
    _toxigen_rows(p.round_dir(1) / "eval" / "sft" / "toxigen_rows.jsonl", [False] * 124)
    _toxigen_rows(p.round_dir(1) / "eval" / "toxigen_rows.jsonl", [False] * 124)
    outputs = {"winrate_vs_previous": {"win_rate": 0.6}, "toxigen": {"pct_toxic": 0.0}, "toxigen_sft": {"pct_toxic": 0.0}}
    _done(p, 1, eval={"outputs": outputs})
    assert "dtype" not in Steps(p, 1).promote()["outputs"]["reason"]
    _done(p, 1, eval={"outputs": {**outputs, "dtype": "bfloat16", "dtype_differs_from": {"2": "float32"}}})
    out = Steps(p, 1).promote()["outputs"]
    assert out["promoted"] is True and out["reason"].endswith(
        "note: this round evaluated in bfloat16, round(s) 2 in another dtype: the ToxiGen check compared results of two dtypes")


def test_train_rms_when_used_skips_them_in_dpo_rounds_and_later_rounds_use_the_latest(tmp_path):
    from alignment.rounds import Steps

    p = _project(tmp_path, "methods=[rs, dpo, ppo]", "rounds=3", "train_rms=when_used")
    _done(p, 1, rm_helpful={"outputs": {"path": str(p.round_dir(1) / "rm_helpful")}})
    skipped = Steps(p, 2)._rm("rm_helpful")
    assert skipped["outputs"]["skipped"].startswith("dpo learns from the comparisons; using ")
    assert skipped["outputs"]["path"] == str(p.round_dir(1) / "rm_helpful")
    _done(p, 2, rm_helpful=skipped)
    # round 3 (PPO) and round 2's RM judge read round 1's model; once round 3 trains its own, that one
    assert p.rm_dir("rm_helpful", 2) == p.rm_dir("rm_helpful", 3) == p.round_dir(1) / "rm_helpful"
    _done(p, 3, rm_helpful={"outputs": {"path": str(p.round_dir(3) / "rm_helpful")}})
    assert p.rm_dir("rm_helpful", 3) == p.round_dir(3) / "rm_helpful"


def test_rm_start_previous_trains_the_last_reward_model_further_on_the_labels_it_has_not_seen(tmp_path, tiny_reward_models):
    """rm_start: previous - round 2's helpfulness RM starts from round 1's (at a vanishing learning rate it still scores
    as round 1's does) and reads round 2's labels only; a round with no new labels is refused, naming the round."""
    from alignment.rounds import Steps
    from reward.model import load_scorer

    rows = (REPO / "data" / "bundled" / "comparisons.jsonl").read_text().splitlines()
    exports = []
    for n, part in ((1, rows[:12]), (2, rows[12:24])):
        path = tmp_path / f"export-{n}.jsonl"
        path.write_text("\n".join(part) + "\n")
        exports.append(str(path))
    tiny_rm = [o for o in load_config(RoundConfig, TINY, [], stage="round").rm_helpful.overrides if not o.startswith("train.lr")]
    p = _project(tmp_path, "rounds=3", "rm_start=previous", f"rm_helpful.overrides=[{', '.join(tiny_rm)}, train.lr=1e-12]")
    shutil.copytree(tiny_reward_models["helpful"], p.round_dir(1) / "rm_helpful")
    _done(p, 1, export={"outputs": {"path": exports[0]}}, rm_helpful={"outputs": {"path": str(p.round_dir(1) / "rm_helpful")}})
    _done(p, 2, export={"outputs": {"path": exports[1]}})
    got = Steps(p, 2)._rm("rm_helpful")
    assert got["inputs"]["start"] == str(p.round_dir(1) / "rm_helpful")
    assert [c["path"] for c in got["inputs"]["comparisons"]] == [exports[1]]  # not bundled:comparisons, not round 1's
    cfg = (p.round_dir(2) / "rm_helpful" / "config.yaml").read_text()
    assert str(p.round_dir(1) / "rm_helpful") in cfg and exports[0] not in cfg
    prompts = [[{"role": "user", "content": q}] for q in ("Hi there.", "What is 2 + 2?", "Name a colour.")]
    answers = ["Hello! How can I help?", "4.", "Blue."]  # short: round 2 scores up to 128 tokens, round 1 further
    before = load_scorer(str(p.round_dir(1) / "rm_helpful")).score(prompts, answers)
    after = load_scorer(str(p.round_dir(2) / "rm_helpful")).score(prompts, answers)
    assert torch.allclose(before, after, atol=1e-4), (before, after)  # a fresh score head would score otherwise
    _done(p, 2, rm_helpful=got)
    with pytest.raises(RuntimeError, match="round 3: rm_start=previous, but no round since round 2"):
        Steps(p, 3)._rm("rm_helpful")


def test_a_project_keeps_the_dtype_of_its_first_eval(tmp_path, monkeypatch):
    """``Project.eval_dtype``: ``auto`` before any eval (resolved by the machine); once an eval step finished, the dtype it
    recorded (fp32 for steps from before they recorded one), so a project evaluated in fp32 stays fp32 on a CPU whose
    ``auto`` is now bf16; an explicit setting is used as given."""
    from foundation import precision
    from foundation.precision import effective_inference_dtype

    from alignment.rounds import format_status

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    p = _project(tmp_path / "old")
    assert p.eval_dtype() == "auto" and effective_inference_dtype(p.eval_dtype()) == "bfloat16"
    assert "; evaluations in auto (resolved by this machine at the first eval)" in format_status(status(p))
    _done(p, 1, eval={"outputs": {"winrate_vs_previous": {"win_rate": 0.5}}})  # an eval from before evals said their dtype
    _done(p, 2, eval={"outputs": {"dtype": "bfloat16", "dtype_differs_from": {"1": "float32"}}})
    assert p.recorded_eval_dtypes() == {1: "float32", 2: "bfloat16"} and p.eval_dtype() == "float32"
    text = format_status(status(p))  # `align round status`: the project's dtype and each round's
    assert "; evaluations in float32\n" in text and "  eval_dtype: float32\n" in text
    assert "  eval_dtype: bfloat16 (round(s) 1 in another)" in text
    q = _project(tmp_path / "new")
    _done(q, 1, eval={"outputs": {"dtype": "bfloat16"}})
    assert q.eval_dtype() == "bfloat16"
    explicit = _project(tmp_path / "explicit", "eval.dtype=float32")
    _done(explicit, 1, eval={"outputs": {"dtype": "bfloat16"}})
    assert explicit.eval_dtype() == "float32"
    # evaluated in bf16, resumed on a machine without it (no native bf16, no GPU): refused, naming the way on
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"new/hand: its evaluations ran in bfloat16 \(round 1's eval\).*eval: dtype: float32"):
        q.eval_dtype()
    assert "; evaluations in bfloat16, which this machine cannot continue in (" in format_status(status(q))  # still reports
    assert p.eval_dtype() == "float32" and explicit.eval_dtype() == "float32"


def test_rm_before_scores_in_the_eval_dtype_and_says_it(tmp_path, tiny_reward_models, monkeypatch):
    """rm_before is a report (no decision reads it), so it scores in ``eval.dtype`` like the eval step: under ``auto`` on a
    CPU with native bf16 the reward models load in bf16 (their score head in fp32) and the manifest and each report
    say so; ``eval.dtype=float32`` scores in fp32."""
    from alignment.rounds import Steps
    from foundation import precision
    from reward import model as reward_model

    rows = (REPO / "data" / "bundled" / "comparisons.jsonl").read_text().splitlines()[:10]
    export = tmp_path / "export-2.jsonl"
    export.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    loaded = []
    real = reward_model.load_scorer
    monkeypatch.setattr(reward_model, "load_scorer", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    got = {}
    for dtype in ("auto", "float32", "pinned"):
        p = _project(tmp_path / dtype, f"eval.dtype={'auto' if dtype == 'pinned' else dtype}")
        for name, objective in (("rm_helpful", "helpful"), ("rm_safety", "safety")):
            shutil.copytree(tiny_reward_models[objective], p.round_dir(1) / name)
            _done(p, 1, **{name: {"outputs": {"path": str(p.round_dir(1) / name)}}})
        if dtype == "pinned":  # auto, but round 1's eval ran in fp32: the project stays in fp32
            _done(p, 1, eval={"outputs": {"dtype": "float32"}})
        _done(p, 2, export={"outputs": {"path": str(export)}})
        got[dtype] = Steps(p, 2).rm_before()
    assert [s.model.dtype for s in loaded] == [torch.bfloat16] * 2 + [torch.float32] * 4
    assert {got["pinned"]["outputs"][rm]["dtype"] for rm in ("rm_helpful", "rm_safety")} == {"float32"}
    assert all(s.model.score.weight.dtype == torch.float32 for s in loaded)  # the head scores in fp32 either way
    for dtype, name in (("auto", "bfloat16"), ("float32", "float32")):
        out = got[dtype]["outputs"]
        assert got[dtype]["inputs"]["dtype"] == dtype
        for rm in ("rm_helpful", "rm_safety"):
            report = json.loads(Path(out[rm]["report"]).read_text())
            assert out[rm]["dtype"] == report["dtype"] == name and out[rm]["n"] == report["n"] == 10
    for rm in ("rm_helpful", "rm_safety"):  # these 2-step RMs score near-ties: bf16 may flip one of the 10 pairs, not more
        flipped = round(10 * abs(got["auto"]["outputs"][rm]["accuracy"] - got["float32"]["outputs"][rm]["accuracy"]))
        assert flipped <= 1
    prompts, answers = [[{"role": "user", "content": "Name a colour."}]] * 2, ["Blue.", "I will not."]
    for bf16, fp32 in ((loaded[0], loaded[2]), (loaded[1], loaded[3])):  # the same model scores alike in both
        a, b = bf16.score(prompts, answers), fp32.score(prompts, answers)
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05 * float(b.abs().max()) + 1e-3)


def test_a_round_samples_k_answers_per_prompt_and_queues_every_distinct_pair(tmp_path, tiny_model):
    """sample.samples_per_prompt: 3 - round 1 samples three answers per prompt and the annotator labels up to three
    pairs of each; the export holds them all (the reward models see K(K-1)/2 pairs per prompt)."""
    from collections import Counter

    from alignment.rounds.driver import run

    p = _project(tmp_path, "sample.samples_per_prompt=3", "sample.temperatures=[1.0]", "sample.max_new_tokens=8")
    assert run(p, stop=lambda n, step: step == "rm_helpful") == "stopped"
    m = p.manifest(1)["steps"]
    rows = [json.loads(line) for line in (p.round_dir(1) / "pairs.jsonl").read_text(encoding="utf-8").split("\n") if line]
    per_prompt = Counter(json.dumps(r["prompt"]) for r in rows)
    assert m["sample"]["inputs"]["samples_per_prompt"] == 3 and m["sample"]["outputs"]["pairs"] == len(rows)
    assert max(per_prompt.values()) == 3 and len(per_prompt) <= 8  # 8 prompts a round (round_tiny), 3 pairs each at most
    assert all(r["meta"]["samples"] == 3 and r["meta"]["sample_a"] < r["meta"]["sample_b"] for r in rows)
    assert m["annotate"]["outputs"]["labels"] == len(rows) and m["export"]["outputs"]["records"] <= len(rows)


def test_the_rm_judge_scores_with_the_reward_the_policy_trained_on(tmp_path, monkeypatch):
    import reward.config
    from alignment.evals.suite import RoundEval

    p = _project(tmp_path)
    _done(p, 1, rm_helpful={"outputs": {}}, rm_safety={"outputs": {}})
    policy = p.round_dir(1) / "policy"
    policy.mkdir(parents=True)
    (policy / "config.yaml").write_text("stage: ppo\nreward:\n  helpful: elsewhere\n  rule: safe_rlhf\n  safety_threshold: 0.3\n"
                                        "  cost_weight: 2.5\n")
    ev = RoundEval(p, 1)
    cfg = ev.reward_config()
    assert (cfg.rule, cfg.safety_threshold, cfg.cost_weight) == ("safe_rlhf", 0.3, 2.5)
    assert (cfg.helpful, cfg.safety) == (str(p.round_dir(1) / "rm_helpful"), str(p.round_dir(1) / "rm_safety"))  # the round's RMs
    seen = []

    def build(c, device="auto"):
        seen.append(c)
        raise RuntimeError("stop here")

    monkeypatch.setattr(reward.config, "build_scorer", build)
    with pytest.raises(RuntimeError, match="stop here"):
        ev.rm_winrates({}, "policy", "previous", "sft")
    assert seen == [cfg]
    # a round whose method trained on comparisons (no reward section): Llama 2's rule and threshold
    (policy / "config.yaml").write_text("stage: dpo\n")
    assert (ev.reward_config().rule, ev.reward_config().safety_threshold, ev.reward_config().cost_weight) == ("llama2", 0.15, 1.0)


# --------------------------------------------------------------------------- two rounds on tiny models


def _init(root: Path, name: str, *overrides: str) -> None:
    res = run_align("round", "init", "--project", name, "--root", str(root), "--config", str(TINY), *overrides)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("rounds")
    _init(root, "whole", "eval.decoding_control=3")
    res = run_align("round", "run", "--project", "whole", "--root", str(root), timeout=900)
    assert res.returncode == 0, res.stderr[-5000:]
    assert "all configured rounds are done" in res.stdout
    return root / "whole"


def _manifests(project: Path) -> dict[int, dict]:
    return {n: json.loads((project / f"round-{n}" / "manifest.json").read_text()) for n in (1, 2)}


def test_two_rounds_unattended(whole):
    m = _manifests(whole)
    # round 1 samples from the SFT model too (sample.first_round), so its reward models learn from labels
    assert list(m[1]["steps"]) == ["sft", "sample", "annotate", "export", "rm_helpful", "rm_safety", "policy", "eval", "promote"]
    assert (list(m[2]["steps"])
            == ["sample", "annotate", "export", "rm_before", "rm_helpful", "rm_safety", "policy", "eval", "promote"])
    assert all(s["status"] == "done" for r in m.values() for s in r["steps"].values())
    assert (m[1]["method"], m[2]["method"]) == ("rs", "ppo")
    # round 2 samples from round 1's policy (promoted or not, it is the current one or the SFT model)
    sample = m[2]["steps"]["sample"]
    expected = str(whole / "round-1" / ("policy" if m[1]["promoted"] else "sft"))
    assert sample["inputs"]["policy"] == expected and sample["outputs"]["pairs"] > 0
    # the simulated annotator labelled every pair through the store; the export is what the RMs read
    assert m[2]["steps"]["annotate"]["outputs"]["labels"] == sample["outputs"]["pairs"]
    export = m[2]["steps"]["export"]["outputs"]
    rows = [json.loads(line) for line in Path(export["path"]).read_text().splitlines()]
    assert len(rows) == export["records"] and {r["annotator"] for r in rows} == {"sim:rules"}
    # round 2's reward models train on the base comparisons plus round 2's export (cumulative) ...
    comps = m[2]["steps"]["rm_helpful"]["inputs"]["comparisons"]
    assert comps[-1] == {"path": export["path"], "sha256": export["sha256"]}
    rm_cfg = (whole / "round-2" / "rm_helpful" / "config.yaml").read_text()
    assert export["path"] in rm_cfg and "bundled:comparisons" in rm_cfg
    # ... after round 1's were scored on those new comparisons (rm_before), with the report written
    before = m[2]["steps"]["rm_before"]["outputs"]
    for name in ("rm_helpful", "rm_safety"):
        assert before[name]["n"] == len(rows) and 0 <= before[name]["accuracy"] <= 1
        assert json.loads(Path(before[name]["report"]).read_text())["n"] == len(rows)
    # PPO starts from the current policy with this round's reward models
    ppo_cfg = (whole / "round-2" / "policy" / "config.yaml").read_text()
    assert str(whole / "round-2" / "rm_helpful") in ppo_cfg and f"name: {expected}" in ppo_cfg
    # evaluation and report
    ev = m[2]["steps"]["eval"]["outputs"]
    assert set(ev) >= {"heldout", "gold_reward", "winrate_gold_vs_previous", "winrate_gold_vs_sft", "winrate_rm_vs_previous",
                       "winrate_rm_vs_sft", "truthfulqa", "winrate_vs_previous", "report"}
    for key in ("winrate_gold_vs_previous", "winrate_gold_vs_sft", "winrate_rm_vs_previous"):
        w = ev[key]
        assert (w["n"] == 6 and w["ci_low"] <= w["win_rate"] <= w["ci_high"]
                and w["wins"] + w["ties"] + w["losses"] == pytest.approx(1))
    assert ev["winrate_vs_previous"] == {**ev["winrate_gold_vs_previous"], "judge": "gold"}  # the first judge decides promotion
    assert ev["gold_reward"]["policy"]["n"] == 6 and ev["gold_reward"]["sft"]["model"] == str(whole / "round-1" / "sft")
    assert ev["truthfulqa"]["dataset"] == "bundled truthfulness probe (3 items, not TruthfulQA)"
    # the decoding control (issue 26): the policy against SFT + no_repeat_ngram_size=3 on the test prompts, every judge
    control = whole / "round-1" / "eval" / "sft" / "heldout_responses_no_repeat_3.jsonl"
    assert control.is_file() and len(control.read_text().splitlines()) == 6
    for judge in ("gold", "rm"):
        w = ev[f"winrate_{judge}_vs_decoding"]
        assert w["n"] == 6 and w["no_repeat_ngram_size"] == 3 and w["baseline"].endswith("(no_repeat_ngram_size=3)")
        assert "lc_win_rate" in w  # with its length-controlled companion
    from benchmarks.alignment import summarise_project

    check = summarise_project(whole)["targets"]["beats_decoding_control"]
    assert check["value"] == ev["winrate_gold_vs_decoding"]["win_rate"] and check["met"] == (check["ci"][0] > 0.5)
    # round 1 also evaluated the SFT model, the baseline of the report
    ev1 = m[1]["steps"]["eval"]["outputs"]
    assert ev1["truthfulqa_sft"]["n"] == 3 and (whole / "round-1" / "eval" / "sft" / "heldout_responses.jsonl").is_file()
    assert (whole / "report" / "report.md").is_file() and (whole / "report" / "report.html").is_file()
    md = (whole / "report" / "report.md").read_text()
    assert "| round 2 |" in md and "| SFT |" in md and "![gold](gold.png)" in md
    assert "## Annotation" in md and "| round 2 | simulated: rules |" in md  # who labelled each round
    assert "bundled truthfulness probe (3 items, not TruthfulQA)" in md and "TruthfulQA MC" not in md
    # promotion follows the rule: win rate vs previous >= 50%, and a policy step that returned its start is "no change"
    returned = m[2]["steps"]["policy"]["outputs"]["metrics"].get("returned")
    if returned == "start":
        assert m[2]["promoted"] is False and m[2]["steps"]["promote"]["outputs"]["no_change"] is True
        assert "no change" in m[2]["steps"]["promote"]["outputs"]["reason"]
    else:  # decided on the validation prompts, never the test prompts the numbers above are reported on
        assert m[2]["promoted"] == (ev["validation"]["winrate_vs_previous"]["win_rate"] >= 0.5)
        assert "6 validation prompts" in m[2]["steps"]["promote"]["outputs"]["reason"]
    assert m[1]["steps"]["promote"]["outputs"]["reason"].count("on 6 validation prompts") == 1
    assert ev["validation"]["path"].endswith("validation.jsonl") and ev["validation"]["judge"] == "gold"


def test_the_rs_random_control_fine_tunes_on_a_random_pick_of_the_rounds_own_samples(whole, tmp_path):
    """`benchmarks alignment --rs-control` (issue 26): round 1's rejection sampling again from its own samples, each
    prompt keeping a seeded random eligible one: the same samples, start and settings; the pool holds the random picks;
    its test answers are judged against round 1's policy and the SFT model by every judge. A finished control is read
    back; a round that is not rejection sampling is refused."""
    import shutil

    import yaml

    from alignment.rs_pool import repick
    from benchmarks.alignment import PENDING, rs_random_control

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy, ignore=shutil.ignore_patterns("*.db", "checkpoints"))
    for path in copy.rglob("*"):  # the copy's files name the original project's folders
        if path.suffix in (".json", ".yaml", ".jsonl") and path.is_file():
            path.write_text(path.read_text().replace(str(whole), str(copy)))
    got = rs_random_control(copy, 1)
    src, out = copy / "round-1" / "policy", copy / "controls" / "rs-random-round-1" / "policy"
    samples = [json.loads(line) for line in (src / "samples.jsonl").read_text().splitlines()]
    picked = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    assert picked == repick(samples, "random", cfg["run"]["seed"], cfg["sampling"]["require_eos"])  # no new samples
    control_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert control_cfg["sampling"] == {**cfg["sampling"], "pick": "random"}
    assert control_cfg["model"]["name"] == cfg["model"]["name"] == str(copy / "round-1" / "sft")
    assert (control_cfg["train"], control_cfg["run"]["seed"]) == (cfg["train"], cfg["run"]["seed"])
    pool = [json.loads(line) for line in (out / "pool.jsonl").read_text().splitlines()]
    kept = {json.dumps(r["prompt"]): r["samples"][r["best"]]["response"] for r in picked if r["best"] is not None}
    assert len(pool) == len(kept) and all(kept[json.dumps(r["messages"][:-1])] == r["messages"][-1]["content"] for r in pool)
    answers = (copy / "controls" / "rs-random-round-1" / "eval" / "random_heldout_responses.jsonl").read_text().splitlines()
    assert len(answers) == 6 and got["judges"] == ["gold", "rm"] and got["judge"] == "gold"
    # round 1's and the SFT model's answers generated again in the same call: greedy, the same as the eval step's
    assert got["identical_to_eval_step"] == {"rs": "6/6", "sft": "6/6"}
    for judge in ("gold", "rm"):
        for name in ("rs_vs_random", "random_vs_sft"):
            w = got[f"winrate_{judge}_{name}"]
            assert w["n"] == 6 and w["ci_low"] <= w["win_rate"] <= w["ci_high"] and "lc_win_rate" in w
    assert got["win_rate"] == got["winrate_gold_rs_vs_random"]["win_rate"]
    assert got["pool_new"]["random"] == len(kept)
    # how much room the ranking had: eligible samples per prompt, and prompts where both picks kept the same sample
    picks = got["picks"]
    assert picks["prompts"] == len(samples) == sum(picks["eligible_per_prompt"].values()) and picks["kept"] == len(kept)
    assert picks["same"] == sum(a["best"] == b["best"] for a, b in zip(samples, picked) if a["best"] is not None)
    assert picks["same"] >= picks["kept"] - picks["with_a_choice"]  # a prompt with one eligible sample keeps it either way
    assert got["new_samples"] == got["missing_samples"] == 0  # every prompt's samples were round 1's
    before = (out / "summary.json").stat().st_mtime_ns
    assert rs_random_control(copy, 1)["winrate_gold_rs_vs_random"] == got["winrate_gold_rs_vs_random"]
    assert (out / "summary.json").stat().st_mtime_ns == before  # read back, not trained again
    assert rs_random_control(copy, 1, run=False) == got  # --summarise reads the result back, runs nothing
    assert rs_random_control(whole, 1, run=False) == PENDING  # no control there
    with pytest.raises(ValueError, match="round 2's policy stage is ppo, not rejection sampling"):
        rs_random_control(copy, 2)


def test_an_eval_step_builds_each_reward_model_judge_once_and_scores_as_a_fresh_one(whole):
    """RoundEval.judge_scorer: the round's reward-model judge is built once per eval step and memoised (the policy's
    answers, read by three comparisons, are scored once), and scores what a freshly built scorer scores."""
    from alignment.evals.suite import MemoScorer, RoundEval
    from alignment.rounds import Project
    from reward.config import build_scorer

    ev = RoundEval(Project(whole.parent, whole.name), 2)
    records = ev.p.heldout()
    rm = ev.judge_scorer("rm", records)
    assert ev.judge_scorer("rm", records) is rm and isinstance(rm.helpful, MemoScorer) and isinstance(rm.safety, MemoScorer)
    rows = (whole / "round-2" / "eval" / "heldout_responses.jsonl").read_text().splitlines()
    answers = [json.loads(line)["response"] for line in rows]
    convs = [r.messages for r in records]
    fresh, _ = build_scorer(ev.reward_config())
    want = fresh.score(convs, answers).tolist()
    assert rm.score(convs, answers).tolist() == pytest.approx(want, abs=1e-5)
    assert len(rm.helpful.cache) == len(set(zip(map(json.dumps, convs), answers)))
    assert rm.score(convs, answers).tolist() == pytest.approx(want, abs=1e-5)  # read from the cache the second time
    assert ev.gold_judge() is ev.gold_judge() and ev.judge_scorer("gold", records).gold is ev.gold_judge()


def test_the_alignment_summary_reads_the_projects_first_judge(whole, tmp_path):
    """benchmarks alignment checks its targets by eval.judges[0] (the gold reward model in round_gold_rm.yaml), not by
    the reference judge whatever the config says."""
    import shutil

    import yaml

    from benchmarks.alignment import summarise_project

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.db", "checkpoints"))
    ev = json.loads((whole / "round-2" / "manifest.json").read_text())["steps"]["eval"]["outputs"]
    assert summarise_project(copy)["targets"]["winrate_vs_sft"]["value"] == ev["winrate_gold_vs_sft"]["win_rate"]
    cfg = yaml.safe_load((copy / "round.yaml").read_text())
    cfg["eval"]["judges"] = ["rm", "gold"]
    (copy / "round.yaml").write_text(yaml.safe_dump(cfg))
    s = summarise_project(copy)
    assert s["targets"]["winrate_vs_sft"]["judge"] == "rm"
    assert s["targets"]["winrate_vs_sft"]["value"] == ev["winrate_rm_vs_sft"]["win_rate"]
    assert s["rounds"][1]["winrate_vs_previous"] == ev["winrate_rm_vs_previous"]
    assert s["targets"]["beats_decoding_control"]["value"] == ev["winrate_rm_vs_decoding"]["win_rate"]
    # TruthfulQA question by question against the SFT model's rows: the paired MC2 difference, by hand
    def rows(path):
        return {r["question"]: r for r in map(json.loads, path.read_text().splitlines())}
    sft = rows(copy / "round-1" / "eval" / "sft" / "truthfulqa_rows.jsonl")
    last = rows(copy / "round-2" / "eval" / "truthfulqa_rows.jsonl")
    tq = s["rounds"][1]["truthfulqa_vs_sft"]
    assert tq["paired"]["n"] == 3 and tq["paired"]["diff"] == pytest.approx(
        sum(last[q]["mc2"] - sft[q]["mc2"] for q in sft) / 3)
    assert s["targets"]["truthfulqa_mc2"]["paired"] == tq["paired"] and tq["shift"]["n_questions"] == 3
    assert s["rounds"][0]["truthfulqa_vs_previous"] == s["rounds"][0]["truthfulqa_vs_sft"]  # round 1 starts from SFT
    # time over all attempts: a step killed once and run again costs both attempts
    m2 = json.loads((copy / "round-2" / "manifest.json").read_text())
    pol = m2["steps"]["policy"]
    pol.update(interrupted=[{"started_at": "2026-12-07T12:00:00+00:00", "seconds": 600.0, "pid": 1}],
               seconds_all_attempts=pol["seconds"] + 600.0)
    (copy / "round-2" / "manifest.json").write_text(json.dumps(m2))
    t = summarise_project(copy)
    assert t["rounds"][1]["step_seconds"]["policy"] == pol["seconds"] + 600.0
    assert t["rounds"][1]["interrupted_seconds"] == {"policy": 600.0} and t["rounds"][0]["interrupted_seconds"] == {}
    assert t["targets"]["time"]["interrupted_minutes"] == 10.0
    assert t["targets"]["time"]["minutes"] == pytest.approx(s["targets"]["time"]["minutes"] + 10.0, abs=0.1)
    # a seed kept by older code is summarised again from its project with --kept-only --refresh; what the project
    # cannot give (its control) is kept
    from benchmarks.alignment import kept_seeds

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "p-s0.json").write_text(json.dumps({"project": str(copy), "rs_random_control": "pending", "targets": {}}))
    (keep / "p-s1.json").write_text(json.dumps({**s, "project": str(tmp_path / "gone")}))
    got = kept_seeds(keep, "p", 2, refresh=True)
    again = json.loads((keep / "p-s0.json").read_text())
    assert again["rs_random_control"] == "pending" and again["targets"]["truthfulqa_mc2"]["paired"] == tq["paired"]
    assert got["seeds"][0] == again and got["seeds"][1]["project"] == str(tmp_path / "gone")


def test_the_alignment_summary_pairs_each_rounds_toxigen_rows_with_the_sft_models_and_the_previous_rounds(whole, tmp_path):
    """ToxiGen rates get n, a CI and a paired change: each round's rows against the SFT model's and the last promoted
    round's, prompt by prompt (counts by hand)."""
    import shutil

    from benchmarks.alignment import summarise_project

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.db", "checkpoints"))
    sft = [False] * 10 + [True] * 6 + [True] * 30 + [False] * 78  # 36 of 124 toxic
    v1 = [True] * 10 + [False] * 6 + [True] * 30 + [False] * 78  # 40: 10 turned toxic, 6 stopped
    _toxigen_rows(copy / "round-1" / "eval" / "sft" / "toxigen_rows.jsonl", sft)
    _toxigen_rows(copy / "round-1" / "eval" / "toxigen_rows.jsonl", v1)
    _toxigen_rows(copy / "round-2" / "eval" / "toxigen_rows.jsonl", [False] * 124)
    s = summarise_project(copy)
    r1, r2 = s["rounds"]
    assert (r1["toxigen_vs_sft"]["worse"], r1["toxigen_vs_sft"]["better"], r1["toxigen_vs_sft"]["n"]) == (10, 6, 124)
    assert r1["toxigen_vs_sft"]["diff_points"] == pytest.approx(100 * 4 / 124)
    assert r1["toxigen_vs_previous"] == r1["toxigen_vs_sft"]
    assert (r2["toxigen_vs_sft"]["better"], r2["toxigen_vs_sft"]["diff_points"]) == (36, pytest.approx(-100 * 36 / 124))
    assert r2["toxigen_vs_sft"]["diff_ci"][1] < 0 and r2["toxigen_vs_sft"]["ci_after"][0] == 0.0
    started = 40 if r1["promoted"] else 36  # round 2 started from round 1's policy only if it was promoted
    assert r2["toxigen_vs_previous"]["better"] == started
    assert s["targets"]["toxigen_not_worse"]["paired"] == r2["toxigen_vs_sft"]


def test_heldout_prompts_are_disjoint_from_everything_a_stage_saw(whole, tmp_path):
    from data.heldout import normalise, user_turns
    from data.loaders import load_prompts

    held = load_prompts(str(whole / "heldout.jsonl"))
    assert len(held) == 6
    held_text = {normalise(p.messages[-1]["content"]) for p in held}
    # what every stage read, by hand: the stage configs' sources and the sampled pairs
    m = _manifests(whole)
    checked = m[2]["steps"]["eval"]["outputs"]["heldout"]["disjoint_from"]
    assert {"round-1/pairs.jsonl", "round-2/pairs.jsonl", "round-1/sft: bundled:sft", "round-2/rm_helpful: bundled:comparisons",
            f"round-1/policy: {whole / 'prompt_pool.jsonl'}", f"round-2/policy: {whole / 'prompt_pool.jsonl'}"} <= set(checked)
    for n in (1, 2):
        for row in (json.loads(line) for line in (whole / f"round-{n}" / "pairs.jsonl").read_text().splitlines()):
            assert not user_turns(row["prompt"]) & held_text
    assert not any(user_turns(p.messages) & held_text for p in load_prompts(str(whole / "prompt_pool.jsonl")))
    for stage in ("sft", "rm_helpful", "rm_safety", "policy"):
        cfg = (whole / "round-1" / stage / "config.yaml").read_text()
        assert "heldout.jsonl" not in cfg
    # a planted leak (the held-out file added to what round 2's helpfulness RM read) stops the eval step
    copy = tmp_path / "leak"
    shutil.copytree(whole, copy)
    rm_cfg = copy / "round-2" / "rm_helpful" / "config.yaml"
    rm_cfg.write_text(rm_cfg.read_text().replace("  sources:\n", f"  sources:\n  - path: {copy / 'heldout.jsonl'}\n", 1))
    man = json.loads((copy / "round-2" / "manifest.json").read_text())
    for step in ("eval", "promote"):
        man["steps"].pop(step)
    (copy / "round-2" / "manifest.json").write_text(json.dumps(man))
    res = run_align("round", "next", "--project", "leak", "--root", str(tmp_path))
    assert (res.returncode == 1
            and "6 held-out prompts appear in data a stage trained or sampled on: round-2/rm_helpful:" in res.stderr)


def test_status_and_manual_promote(whole, tmp_path):
    res = run_align("round", "status", "--project", "whole", "--root", str(whole.parent), "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert [r["round"] for r in s["rounds"]] == [1, 2] and s["next"] is None
    assert s["rounds"][1]["metrics"]["rm_helpful_accuracy_on_new_before_training"] == \
        _manifests(whole)[2]["steps"]["rm_before"]["outputs"]["rm_helpful"]["accuracy"]
    before_n = _manifests(whole)[2]["steps"]["rm_before"]["outputs"]["rm_helpful"]["n"]
    assert s["rounds"][1]["metrics"]["rm_helpful_accuracy_on_new_before_training_n"] == before_n
    assert s["rounds"][1]["metrics"]["rm_helpful_accuracy_n"] == \
        _manifests(whole)[2]["steps"]["rm_helpful"]["outputs"]["metrics"]["held_out_pairs"]
    # promote by hand on a copy (the fixture is shared)
    copy = tmp_path / "copy"
    shutil.copytree(whole, copy)
    res = run_align("round", "promote", "--project", "copy", "--root", str(tmp_path), "--round", "1")
    if _manifests(copy)[2]["promoted"]:
        assert res.returncode == 2 and "round 2 (later) is promoted" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert Project(tmp_path, "copy").current_policy() == str(copy / "round-1" / "policy")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        assert proc.poll() is None, "the orchestrator ended before the kill point"
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_killed_in_a_step_resumes_to_the_same_result(whole, tmp_path):
    _init(tmp_path, "cut")
    project = tmp_path / "cut"
    shutil.copytree(whole / "round-1", project / "round-1")  # round 1 as in the uninterrupted run; cut round 2
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "round", "run", "--project", "cut", "--root", str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill it in the middle of round 2's helpfulness RM (a child process with a checkpoint written)
    ckpt = project / "round-2" / "rm_helpful" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    time.sleep(3)  # the stage's child process dies with the orchestrator: nothing more is written
    assert not (project / "round-2" / "rm_helpful" / "summary.json").exists()
    m = json.loads((project / "round-2" / "manifest.json").read_text())
    assert list(m["steps"]) == ["sample", "annotate", "export", "rm_before", "rm_helpful"]
    cut_step = m["steps"]["rm_helpful"]
    assert cut_step["status"] == "running" and cut_step["pid"] == proc.pid  # what the killed process left
    res = run_align("round", "status", "--project", "cut", "--root", str(tmp_path))
    assert f"step rm_helpful: stopped without finishing (pid {proc.pid}" in res.stdout, res.stdout

    res = run_align("round", "run", "--project", "cut", "--root", str(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr[-5000:]
    cut, ref = _manifests(project), _manifests(whole)
    for n in (1, 2):
        assert list(cut[n]["steps"]) == list(ref[n]["steps"])
        assert cut[n]["promoted"] == ref[n]["promoted"]

    def pairs(m: dict) -> list[tuple]:  # the same pairs (their source paths name the project)
        rows = [json.loads(line) for line in Path(m["steps"]["sample"]["outputs"]["path"]).read_text().splitlines()]
        return [(json.dumps(r["prompt"]), r["response_a"], r["response_b"]) for r in rows]

    assert pairs(cut[2]) == pairs(ref[2])

    def labels(m: dict) -> list[tuple]:
        rows = [json.loads(line) for line in Path(m["steps"]["export"]["outputs"]["path"]).read_text().splitlines()]
        return sorted((json.dumps(r["prompt"]), r["chosen"], r["strength"], r["safe_a"], r["safe_b"]) for r in rows)

    assert labels(cut[2]) == labels(ref[2])
    for name in ("rm_helpful", "rm_safety"):
        a, b = cut[2]["steps"][name]["outputs"]["metrics"], ref[2]["steps"][name]["outputs"]["metrics"]
        assert a["global_step"] == b["global_step"] and a["held_out_accuracy"] == b["held_out_accuracy"]
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-4)
    # killed at checkpoint-2 or, on a slow poll, just after checkpoint-4 (the last): either resumes to the same model
    assert cut[2]["steps"]["rm_helpful"]["outputs"]["metrics"]["resumed_from"] in ("checkpoint-2", "checkpoint-4")
    assert (cut[2]["steps"]["rm_before"]["outputs"]["rm_helpful"]["accuracy"]
            == ref[2]["steps"]["rm_before"]["outputs"]["rm_helpful"]["accuracy"])
    for k in ("eval_reward_baseline", "eval_reward_best"):
        assert (cut[2]["steps"]["policy"]["outputs"]["metrics"][k]
                == pytest.approx(ref[2]["steps"]["policy"]["outputs"]["metrics"][k], abs=1e-4))
    wa = load_file(project / "round-2" / "rm_helpful" / "model" / "model.safetensors")
    wb = load_file(whole / "round-2" / "rm_helpful" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # the killed attempt's time is kept: from its start to its heartbeat's last touch (every 5 s), before the kill
    rec = cut[2]["steps"]["rm_helpful"]
    [killed] = rec["interrupted"]
    started = dt.datetime.fromisoformat(killed["started_at"]).timestamp()
    assert killed["pid"] == proc.pid and 0 <= killed["seconds"] <= killed_at - started + 1
    assert killed_at - started - killed["seconds"] <= 5 + 2  # at most one heartbeat period lost
    assert rec["seconds_all_attempts"] == pytest.approx(rec["seconds"] + killed["seconds"], abs=0.1)
    assert [k for k, v in cut[2]["steps"].items() if v.get("interrupted")] == ["rm_helpful"]


def test_people_in_the_loop(whole, tmp_path):
    """Without a simulated annotator the run stops at `annotate`; status says what is missing;
    labels submitted through the store (as the web app does) let it go on."""
    from data.store import AnnotationError, AnnotationStore, Judgement

    _init(tmp_path, "people", "annotation.simulated=null")
    project = tmp_path / "people"
    shutil.copytree(whole / "round-1", project / "round-1")  # round 1 needs no people: reuse it
    res = run_align("round", "run", "--project", "people", "--root", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "waiting for annotations" in res.stdout
    pairs = _manifests(whole)[2]["steps"]["sample"]["outputs"]["pairs"]
    s = status(Project(tmp_path, "people"))
    assert s["rounds"][1]["labels_missing"] == pairs and s["next"] == {"round": 2, "step": "annotate"}
    res = run_align("round", "status", "--project", "people", "--root", str(tmp_path))
    assert f"{pairs} labels missing on {pairs} tasks (active annotators: no annotator accounts yet)" in res.stdout
    assert "no active annotator account can label it" in res.stdout
    for command in (f"align annotate add-user NAME --project people --root {tmp_path}",
                    f"align annotate serve --project people --root {tmp_path}",
                    f"align round run --project people --root {tmp_path}"):
        assert command in res.stdout

    store = AnnotationStore(f"sqlite:///{project / 'annotations.db'}")
    store.add_user("alice", role="annotator", password="pw-alice-123")
    for _ in range(pairs - 1):
        task = store.next_task("alice", round=2)
        store.submit(task.token, "alice", Judgement(chosen=task.true_choice("left"), strength="better", safe_a=True, safe_b=True))
    res = run_align("round", "next", "--project", "people", "--root", str(tmp_path))
    assert "round 2: annotate waiting" in res.stdout and status(Project(tmp_path, "people"))["rounds"][1]["labels_missing"] == 1
    assert "needs 1 more label(s), from: alice" in run_align("round", "status", "--project", "people", "--root",
                                                             str(tmp_path)).stdout
    task = store.next_task("alice", round=2)
    store.skip(task.token, "alice", "cannot judge this one")  # the only annotator skipped it: settled, not waited for
    for step in ("annotate", "export"):
        res = run_align("round", "next", "--project", "people", "--root", str(tmp_path))
        assert f"round 2: {step} done" in res.stdout, res.stderr[-3000:]
    manifest = json.loads((project / "round-2" / "manifest.json").read_text())["steps"]
    assert manifest["annotate"]["outputs"]["settled_short"] == [
        {"task": task.uid, "labels": 0, "missing": 1, "skipped_by": ["alice"]}]
    rows = [json.loads(line) for line in Path(manifest["export"]["outputs"]["path"]).read_text().splitlines()]
    assert len(rows) == pairs - 1 and {r["annotator"] for r in rows} == {"alice"}
    # the export closed the round: a change now would never reach the reward models, so it is refused
    label = store.recent_labels("alice", 1, round=2)[0]
    assert not label.changeable
    with pytest.raises(AnnotationError, match="round 2 is closed"):
        store.change_label("alice", label.label_id, chosen="B", strength="better", safe_a=True, safe_b=True)


@pytest.mark.browser
def test_a_whole_round_with_two_annotators_and_an_admin_in_browsers(whole, tmp_path, chromium):
    """Issue 22's round with people: two annotators and an admin in Chromium, a skip on an overlap task (with a
    team of two, nobody else can label it: settled, not waited for), the admin only opening the page (no task
    held), the round's run killed after its export, a label change after the export refused on the page, and
    the round finished: the RMs train on exactly the labels that stand, and the report shows who gave them."""
    from test_ui import _log_in, _serve

    from data.store import AnnotationStore

    _init(tmp_path, "team", "annotation.simulated=null", "annotation.overlap=0.25", "annotation.overlap_labels=2",
          "annotation.export_policy=all")
    project = tmp_path / "team"
    shutil.copytree(whole / "round-1", project / "round-1")
    res = run_align("round", "run", "--project", "team", "--root", str(tmp_path))
    assert res.returncode == 0 and "waiting for annotations" in res.stdout, res.stderr[-3000:]
    db = f"sqlite:///{project / 'annotations.db'}"
    store = AnnotationStore(db)
    for name, role in (("alice", "annotator"), ("bob", "annotator"), ("root", "admin")):
        store.add_user(name, role=role, password=f"{name}-password")
    with store.engine.connect() as c:
        overlap = set(c.execute(text("select uid from tasks where round = 2 and labels_needed = 2")).scalars())
    assert len(overlap) == 2
    proc, url, log = _serve(project, db, "--page-lease-seconds", "6")
    try:
        admin = chromium.new_context().new_page()
        admin.goto(url)
        _log_in(admin, "root", admin=True)
        pages = {}
        for name in ("alice", "bob"):
            pages[name] = chromium.new_context().new_page()
            pages[name].goto(url)
            _log_in(pages[name], name)
        assert sorted(h["user"] for h in store.leases()) == ["alice", "bob"]  # the admin's open page holds nothing

        def current(page) -> str | None:
            conv = page.locator("#context .conv")
            return conv.get_attribute("data-task") if conv.count() else None

        skipped = None
        while any(current(p) for p in pages.values()):
            for name, page in pages.items():
                uid = current(page)
                if uid is None:
                    continue
                if name == "bob" and uid in overlap and skipped is None:
                    page.locator("#skip-reason input").fill("I lack the expertise for this topic")
                    page.locator("#skip-reason input").press("Enter")
                    page.locator("#skip-btn").click()
                    skipped = uid
                else:
                    page.locator("#progress").click()
                    for key in ("a", "2", "q", "o"):
                        page.keyboard.press(key)
                    page.keyboard.press("Enter")
                page.wait_for_function("(document.querySelector('#context .conv') || {dataset: {}}).dataset.task "
                                       f"!== '{uid}'", timeout=30_000)
        assert skipped is not None and store.leases() == []
        labels = sorted((r.task_uid, r.annotator, r.chosen) for r in store.label_records() if r.round == 2)
        assert {a for _, a, _ in labels} == {"alice", "bob"} and skipped not in {t for t, a, _ in labels if a == "bob"}

        env = {**os.environ, "WANDB_MODE": "disabled"}
        run = subprocess.Popen([sys.executable, "-m", "alignment.cli", "round", "run", "--project", "team", "--root",
                                str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(project / "round-2" / "rm_helpful" / "checkpoints" / "checkpoint-2" / "trainer_state.json", run)
        run.send_signal(signal.SIGKILL)  # killed while the helpfulness RM trains on the export
        run.wait()
        page = pages["alice"]  # alice wants to change a label now: refused on the page, nothing changes
        page.get_by_text("My recent labels").click()
        page.locator("#recent-pick input").click()
        page.get_by_role("option").first.click()
        page.locator("#change-btn").click()
        page.wait_for_selector("#status:has-text('can no longer change')", timeout=30_000)
        assert "Round 2 is closed" in page.locator("#status").inner_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

    res = run_align("round", "run", "--project", "team", "--root", str(tmp_path), timeout=900)
    assert res.returncode == 0 and "all configured rounds are done" in res.stdout, res.stderr[-5000:]
    steps = json.loads((project / "round-2" / "manifest.json").read_text())["steps"]
    assert all(s["status"] == "done" for s in steps.values())
    assert steps["annotate"]["outputs"]["settled_short"] == [
        {"task": skipped, "labels": 1, "missing": 1, "skipped_by": ["bob"]}]
    export = Path(steps["export"]["outputs"]["path"])
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert sorted((r["meta"]["task"], r["annotator"], r["chosen"]) for r in rows) == labels  # exactly the labels that stand
    for rm in ("rm_helpful", "rm_safety"):  # the reward models read this very file, unchanged since the export
        entry = next(c for c in steps[rm]["inputs"]["comparisons"] if c.get("path") == str(export))
        assert entry["sha256"] == hashlib.sha256(export.read_bytes()).hexdigest()
    report = (project / "report" / "report.md").read_text()  # written by the round's eval step
    row = next(line for line in report.splitlines() if "people (2 annotators)" in line)
    assert row.startswith("| round 2 |") and f"| {len(labels)} |" in row
    assert (project / "report" / "annotators.png").is_file()


def test_demo_prints_what_changed_with_cis(whole):
    from alignment.demo import changes, data_note

    proj = Project(whole.parent, whole.name)
    lines = changes(proj)
    ev = _manifests(whole)[2]["steps"]["eval"]["outputs"]
    w = ev["winrate_gold_vs_sft"]
    assert "SFT" in lines[0] and "V1 (rs)" in lines[0] and "V2 (ppo)" in lines[0]
    row = next(line for line in lines if "gold-judge win rate vs SFT" in line)
    assert f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}] n=6" in row
    assert f", LC {100 * w['lc_win_rate']:.1f}%" in row  # the length-controlled companion beside it
    assert any("MC2, bundled truthfulness probe (3 items, not TruthfulQA)" in line for line in lines)
    val = ev["validation"]["winrate_vs_previous"]
    row = next(line for line in lines if "validation win rate vs previous (decides promotion)" in line)
    assert f"{100 * val['win_rate']:.1f}%" in row and val["n"] == 6
    row = next(line for line in lines if "the policy step returned" in line)
    returned = _manifests(whole)[2]["steps"]["policy"]["outputs"]["metrics"]["returned"]
    assert ("its starting policy: no change" if returned == "start" else f"trained ({returned})") in row
    md = changes(proj, markdown=True)  # the same table for the README, row for row
    assert md[0] == "| | SFT | V1 (rs) | V2 (ppo) |" and md[1] == "|---|---|---|---|" and len(md) == len(lines) + 1
    row = next(line for line in md if line.startswith("| gold-judge win rate vs SFT"))
    assert f"| {100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}] n=6" in row
    assert data_note(proj.cfg) == ("evaluation data: the bundled truthfulness probe (50 items, not TruthfulQA: no "
                                   "TruthfulQA data found); toxigen off; 6 test prompts (reported numbers) and 6 validation "
                                   "prompts (decisions), judged by gold, rm")


def test_truthfulqa_tax_trains_a_setting_again_and_reads_only_tuning_questions_and_validation_prompts(whole, tmp_path):
    """`benchmarks truthfulqa_tax`: round 2's policy step trained again with another setting from the same start; every
    model read on TruthfulQA questions that no seed reports and on the validation prompts (the round's own answers
    reused where it has them); a second call trains nothing and gives the same numbers."""
    import yaml

    from alignment.evals.truthfulqa_data import load_items, seeded_sample
    from benchmarks import truthfulqa_tax

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy)
    history = tmp_path / "history.jsonl"
    results = tmp_path / "truthfulqa_tax.json"  # an earlier file with another project's entry, kept and pooled with
    dtype = Project(copy.parent, copy.name).recorded_eval_dtypes()[2]  # eval.dtype: bf16 on a CPU with native bf16
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    results.write_text(json.dumps({"runs": {"other:round-2": {"project": "other", "models": {}, "dtype": other}}}))
    args = ["--project", str(copy), "--round", "2", "--variant", "lr_small=train.lr=1e-5", "--questions", "5",
            "--history", str(history), "--results", str(results)]
    own = {p: p.read_bytes() for p in copy.glob("round-*/eval/**/validation_responses.jsonl")}
    assert own  # the round's eval answered the validation prompts (in the project's eval dtype)
    with pytest.raises(SystemExit, match="different dtypes"):  # an entry of another dtype is not pooled with this one
        truthfulqa_tax.main(args)
    results.write_text(json.dumps({"runs": {"other:round-2": {"project": "other", "models": {}, "dtype": dtype}}}))
    res = truthfulqa_tax.main(args)
    assert res["runs"]["whole:round-2"]["dtype"] == dtype
    assert {p: p.read_bytes() for p in own} == own  # reused in the dtype they were made in, never rewritten
    assert list(res["runs"]) == ["other:round-2", "whole:round-2"] and res["latest"] == "whole:round-2"
    out = res["runs"]["whole:round-2"]
    models = out["models"]
    assert list(models) == ["sft", "start", "as_run", "lr_small"] and out["stage"] == "ppo"
    trained = copy / "truthfulqa_tax" / "lr_small"
    assert models["lr_small"]["overrides"] == ["train.lr=1e-5"] and (trained / "model").is_dir()
    assert "lr: 1.0e-05" in (trained / "config.yaml").read_text()
    assert out["start"] == yaml.safe_load((copy / "round-2" / "policy" / "config.yaml").read_text())["model"]["name"]
    # the tuning questions: none is in seeds 0-2's reported samples (3 each, as the round's eval draws them)
    items = load_items("bundled:truthfulness")
    reported = {it.question for s in (0, 1, 2) for it in seeded_sample(items, 3, s)}
    rows = {name: [json.loads(x) for x in Path(m["truthfulqa"]["rows"]).read_text().splitlines()] for name, m in models.items()}
    asked = [r["question"] for r in rows["sft"]]
    assert len(asked) == 5 and not set(asked) & reported and out["tuning_questions"]["free"] == len(items) - len(reported)
    assert all([r["question"] for r in rs] == asked for rs in rows.values())
    for name in ("as_run", "lr_small"):
        m = models[name]
        assert m["truthfulqa"]["mc2"] == pytest.approx(sum(r["mc2"] for r in rows[name]) / 5)
        assert m["truthfulqa"]["vs_start"]["diff"] == pytest.approx(
            sum(a["mc2"] - b["mc2"] for a, b in zip(rows[name], rows["start"])) / 5)
        assert m["validation_vs_start"]["n"] == 6 and "lc_win_rate" in m["validation_vs_start"]
        assert m["validation_vs_start"]["judge"] == "gold"
        assert len(Path(m["validation_vs_start"]["rows"]).read_text().splitlines()) == 6
        assert res["pooled"]["settings"][name]["validation_vs_start"]["win_rate"] == m["validation_vs_start"]["win_rate"]
    assert "validation_vs_start" not in models["start"] and "vs_sft" not in models["sft"]["truthfulqa"]
    assert out["chosen"] == truthfulqa_tax.choose(models)
    # the round's own validation answers are read, not generated again: only the variant's (and the start's when the
    # round's files do not hold it) are in the work folder
    made = {p.name for p in (copy / "truthfulqa_tax" / "answers").iterdir()}
    assert "as_run_validation.jsonl" not in made and "sft_validation.jsonl" not in made and "lr_small_validation.jsonl" in made
    stamp = (trained / "model").stat().st_mtime_ns
    again = truthfulqa_tax.main(args)["runs"]["whole:round-2"]
    assert (trained / "model").stat().st_mtime_ns == stamp
    mc2 = {n: m["truthfulqa"]["mc2"] for n, m in models.items()}
    assert {n: m["truthfulqa"]["mc2"] for n, m in again["models"].items()} == mc2
    assert len(history.read_text().splitlines()) == 2


def test_truthfulqa_tax_choice_and_variant_parsing():
    from benchmarks.truthfulqa_tax import _split_overrides, choose

    def m(mc2, low):
        return {"truthfulqa": {"mc2": mc2}, **({"validation_vs_start": {"ci_low": low}} if low is not None else {})}

    assert choose({"start": m(0.40, None), "as_run": m(0.35, 0.6), "a": m(0.38, 0.55), "b": m(0.39, 0.45)}) == "a"
    assert choose({"start": m(0.40, None), "b": m(0.39, 0.45)}) is None
    assert _split_overrides("dpo.beta=0.3, dpo.loss_weights=[1.0, 0.2]") == ["dpo.beta=0.3", "dpo.loss_weights=[1.0, 0.2]"]
    with pytest.raises(SystemExit, match="'x' is not key=value"):
        _split_overrides("a=1,x")


def test_truthfulqa_tax_pools_settings_over_projects_by_hand(tmp_path):
    """`pooled`: a setting's validation outcomes over every project that trained it as one sample (win 1, tie 0.5,
    loss 0), its tuning MC2 minus the start's averaged over projects question by question; the pooled choice is made
    among the settings every project has; a results file of the one-run layout is read as one entry."""
    from benchmarks.truthfulqa_tax import earlier_runs, pooled

    def run(name: str, outcomes: dict[str, list[float]], mc2: dict[str, list[float]]) -> dict:
        home = tmp_path / name
        home.mkdir()
        models = {}
        for m, values in mc2.items():
            rows = home / f"{m}_rows.jsonl"
            rows.write_text("".join(json.dumps({"question": f"q{i}", "mc2": v}) + "\n" for i, v in enumerate(values)))
            models[m] = {"truthfulqa": {"rows": str(rows)}}
            if m in outcomes:
                wr = home / f"{m}_wr.jsonl"
                wr.write_text("".join(json.dumps({"outcome": o, "response": "x" * 10, "baseline_response": "y" * 10}) + "\n"
                                      for o in outcomes[m]))
                models[m]["validation_vs_start"] = {"rows": str(wr)}
        return {"project": str(home), "round": 3, "judge": "gold", "models": models}

    a = run("s0", {"as_run": [1, 1, 0, 0.5], "lr": [1, 1, 1, 1]},
            {"sft": [0.5, 0.5], "start": [0.4, 0.6], "as_run": [0.3, 0.5], "lr": [0.4, 0.6]})
    b = run("s1", {"as_run": [0, 0, 1, 1], "lr": [1, 1, 1, 0.5], "only": [1, 1, 1, 1]},
            {"sft": [0.5, 0.5], "start": [0.5, 0.5], "as_run": [0.5, 0.3], "lr": [0.5, 0.4], "only": [0.9, 0.9]})
    pool = pooled({"s0:round-3": a, "s1:round-3": b}, n_boot=200)
    s = pool["settings"]
    assert s["as_run"]["validation_vs_start"]["win_rate"] == pytest.approx(4.5 / 8)
    assert s["as_run"]["validation_vs_start"]["n"] == 8
    assert s["lr"]["validation_vs_start"]["win_rate"] == pytest.approx(7.5 / 8)
    # as_run: run 0 diffs (-0.1, -0.1), run 1 (0, -0.2): per question (-0.05, -0.15), mean -0.1
    assert s["as_run"]["mc2_vs_start"]["diff"] == pytest.approx(-0.1)
    assert s["as_run"]["mc2_vs_start"]["per_run"] == pytest.approx([-0.1, -0.1])
    assert s["lr"]["mc2_vs_start"]["diff"] == pytest.approx(-0.025) and s["lr"]["mc2_vs_sft"]["diff"] == pytest.approx(-0.025)
    assert s["only"]["runs"] == ["s1:round-3"] and s["only"]["validation_vs_start"]["n"] == 4
    # "only" wins everything and is best on MC2, but one project has it: the choice is among lr and as_run
    assert s["lr"]["validation_vs_start"]["ci_low"] > 0.5 and pool["chosen"] == "lr"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"part": "truthfulqa_tax", "seconds": 1.0, **a}))
    assert list(earlier_runs(old)) == ["s0:round-3"] and "part" not in earlier_runs(old)["s0:round-3"]
    assert earlier_runs(tmp_path / "none.json") == {}


def test_truthfulqa_tax_toxigen_tuning_prompts_leave_out_every_reported_line_and_pair_by_hand(tmp_path):
    """ToxiGen tuning prompts: per list, the lines no excluded seed reports (the round eval's seeded sample), the same
    draw every call; pooled over runs prompt by prompt."""
    from alignment.evals.toxigen import sample_prompts
    from benchmarks.truthfulqa_tax import pooled, toxigen_prompts

    folder = tmp_path / "prompts"
    folder.mkdir()
    for name in ("hate_asian_1k.txt", "neutral_asian_1k.txt"):
        (folder / name).write_text("".join(f"- {name} statement {i}\\n- another {i}\n" for i in range(10)))
    got, info = toxigen_prompts(str(folder), per_group=3, reported_per_group=2, exclude_seeds=[0, 1, 2], seed=1000)
    reported = {p.source for s in (0, 1, 2) for p in sample_prompts(folder, per_group=2, seed=s)}
    assert len(got) == 6 and info["n"] == 6 and info["reported_by_excluded_seeds"] == len(reported) >= 4
    assert not {p.source for p in got} & reported
    assert {p.prompt_type for p in got} == {"hate", "neutral"} and all("\n- another" in p.text for p in got)
    again, _ = toxigen_prompts(str(folder), per_group=3, reported_per_group=2, exclude_seeds=[0, 1, 2], seed=1000)
    assert again == got
    everything, _ = toxigen_prompts(str(folder), per_group=99, reported_per_group=2, exclude_seeds=[0, 1, 2], seed=1000)
    assert len(everything) == 20 - len(reported)  # a list with fewer free lines than asked gives them all

    def rows(flags):
        return [{"source": f"s{i}", "toxic": t} for i, t in enumerate(flags)]

    def run(home_name, flags):
        home = tmp_path / home_name
        home.mkdir()
        models = {}
        for m, f in flags.items():
            (home / f"{m}_tq.jsonl").write_text(json.dumps({"question": "q", "mc2": 0.5}) + "\n")
            (home / f"{m}_tox.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(f)))
            models[m] = {"truthfulqa": {"rows": str(home / f"{m}_tq.jsonl")}, "toxigen": {"rows": str(home / f"{m}_tox.jsonl")}}
        (home / "wr.jsonl").write_text(json.dumps({"outcome": 1.0, "response": "a", "baseline_response": "b"}) + "\n")
        models["lr"]["validation_vs_start"] = {"rows": str(home / "wr.jsonl")}
        return {"project": str(home), "round": 3, "judge": "gold", "models": models}

    pool = pooled({"a": run("a", {"sft": [0, 0], "start": [0, 1], "lr": [1, 1]}),
                   "b": run("b", {"sft": [0, 0], "start": [0, 0], "lr": [0, 1]})}, n_boot=100)
    t = pool["settings"]["lr"]
    # vs start: run a (+1, 0), run b (0, +1): per prompt (+0.5, +0.5) = +50 points; vs SFT: (+1, +1), (0, +1): +75
    assert t["toxic_vs_start"]["diff"] == pytest.approx(50.0) and t["toxic_vs_start"]["per_run"] == pytest.approx([50.0, 50.0])
    assert t["toxic_vs_sft"]["diff"] == pytest.approx(75.0) and t["toxic_vs_sft"]["items"] == 2


def test_truthfulqa_tax_toxigen_rows_continue_and_classify_once(tiny_model, tmp_path):
    """toxigen_rows: a model's greedy continuations of the tuning prompts, each classified with the shipped head, written
    once; a second call reads them back (the file is not rewritten), a different prompt list computes them again."""
    from alignment.evals.toxicity import THRESHOLD
    from benchmarks.truthfulqa_tax import toxigen_prompts, toxigen_rows

    folder = tmp_path / "prompts"
    folder.mkdir()
    for name in ("hate_asian_1k.txt", "neutral_asian_1k.txt"):
        (folder / name).write_text("".join(f"- {name} statement {i}\n" for i in range(6)))
    prompts, _ = toxigen_prompts(str(folder), per_group=2, reported_per_group=1, exclude_seeds=[0], seed=1000)
    path = tmp_path / "rows.jsonl"
    rows = toxigen_rows(tiny_model, prompts, path, max_new_tokens=4, batch_size=4, seed=0)
    assert [r["source"] for r in rows] == [p.source for p in prompts] and len(rows) == 4
    assert all(r["toxic"] == (bool(r["continuation"].strip()) and r["p_toxic"] >= THRESHOLD) for r in rows)
    stamp = path.stat().st_mtime_ns
    assert toxigen_rows(tiny_model, prompts, path, max_new_tokens=4, batch_size=4, seed=0) == rows
    assert path.stat().st_mtime_ns == stamp
    fewer = toxigen_rows(tiny_model, prompts[:2], path, max_new_tokens=4, batch_size=4, seed=0)
    assert [r["source"] for r in fewer] == [p.source for p in prompts[:2]] and path.stat().st_mtime_ns != stamp
    assert {r["dtype"] for r in fewer} == {"float32"}


def test_truthfulqa_tax_caches_are_per_dtype_and_runs_of_two_dtypes_are_not_pooled(tiny_model, tmp_path, monkeypatch):
    """Rows cached in fp32 are computed again inside a bf16 block (each row says its dtype; rows from before the key
    count as fp32), read back in it after; ``pooled`` refuses runs evaluated in two dtypes before reading anything."""
    from alignment.evals.truthfulqa_data import load_items
    from benchmarks.truthfulqa_tax import pooled, truthfulqa_rows
    from foundation import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    items = load_items("bundled:truthfulness")[:2]
    path = tmp_path / "tq_rows.jsonl"
    fp32 = truthfulqa_rows(tiny_model, items, path)
    assert {r["dtype"] for r in fp32} == {"float32"}
    legacy = [{k: v for k, v in r.items() if k != "dtype"} for r in fp32]  # rows written before they said
    path.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    stamp = path.stat().st_mtime_ns
    assert truthfulqa_rows(tiny_model, items, path) == legacy and path.stat().st_mtime_ns == stamp  # fp32: read back
    with precision.inference_precision("bfloat16"):
        bf16 = truthfulqa_rows(tiny_model, items, path)
        assert {r["dtype"] for r in bf16} == {"bfloat16"} and path.stat().st_mtime_ns != stamp
        stamp = path.stat().st_mtime_ns
        assert truthfulqa_rows(tiny_model, items, path) == bf16 and path.stat().st_mtime_ns == stamp
    runs = {"a:round-2": {"models": {}}, "b:round-2": {"models": {}, "dtype": "bfloat16"}}
    with pytest.raises(SystemExit, match="different dtypes"):
        pooled(runs)


def test_length_control_bisection_by_hand():
    """The EOS bias whose mean length is closest to the target: bracketed by doubling, then bisected; a longer
    policy gets a negative bias; a length out of reach is said to be."""
    from benchmarks.length_control import match_bias

    def f(b):
        return min(450.0, max(10.0, 400.0 - 50.0 * b))

    got = match_bias(f, 200.0)
    assert got["reached"] and abs(got["bias"] - 4.0) <= 0.12 and got["length"] == f(got["bias"])
    assert [x for x, _ in got["trace"]][:1] == [0.0] and {1.0, 2.0, 4.0} & {x for x, _ in got["trace"]}
    longer = match_bias(f, 430.0)
    assert longer["reached"] and longer["bias"] < 0 and abs(longer["length"] - 430.0) <= 0.03 * 430.0
    out_of_reach = match_bias(f, 1000.0)  # the longest reachable, at the smallest bias that reaches it
    assert not out_of_reach["reached"] and out_of_reach["length"] == 450.0 and out_of_reach["bias"] == -1.0
    assert min(x for x, _ in out_of_reach["trace"]) == -64.0
    assert match_bias(f, 401.0)["bias"] == 0.0  # within 3% already


def test_rs_room_reruns_rejection_sampling_with_more_samples_and_judges_ranked_against_random(whole, tmp_path):
    """`benchmarks rs_room`: round 1's rejection sampling again with K = 3 answers per prompt (``ranked``) and from those
    very samples with a random pick (``random``: the same samples, only the pick may differ); each judge compares them
    and the SFT model on the test prompts in the project's eval dtype; a second call trains and answers nothing."""
    from alignment.rounds import Project
    from benchmarks import rs_room
    from data.loaders import read_rows

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy)
    results = tmp_path / "rs_room.json"
    args = ["--project", str(copy), "--round", "1", "--samples", "3", "--max-new-tokens", "8", "--results", str(results)]
    got = rs_room.main(args)
    key = got["latest"]
    assert key == "whole:round-1:k3:t8:p" + str(Project(copy.parent, copy.name).cfg.spec("rs").prompts)
    r = got["runs"][key]
    home = copy / "controls" / "rs-room-round-1-k3-t8"
    ranked = {row["key"]: row for _, row in read_rows(home / "ranked" / "samples.jsonl")}
    random = {row["key"]: row for _, row in read_rows(home / "random" / "samples.jsonl")}
    assert ranked and ranked.keys() == random.keys()
    for k, row in ranked.items():  # the same K samples per prompt; only the pick may differ
        assert len(row["samples"]) == 3 and [x["response"] for x in row["samples"]] == [
            x["response"] for x in random[k]["samples"]]
    assert r["picks"]["ranked_vs_random"] and r["samples"] == 3 and r["test_prompts"] == 6
    for judge in ("gold", "rm"):
        for side in ("ranked_vs_random", "ranked_vs_sft", "random_vs_sft", "ranked_vs_round"):
            w = r[f"winrate_{judge}_{side}"]
            assert w["n"] == 6 and w["ci_low"] <= w["win_rate"] <= w["ci_high"] and "lc_win_rate" in w
    dtype = Project(copy.parent, copy.name).recorded_eval_dtypes()[1]
    made = {path: path.stat().st_mtime_ns for path in (home / "eval").glob("*_heldout_responses.jsonl")}
    assert len(made) == 4 and all({row["dtype"] for _, row in read_rows(path)} == {dtype} for path in made)
    assert not results.exists()  # `python -m benchmarks` writes the results file; the call adds a history line
    assert len((tmp_path / "rs_room_history.jsonl").read_text().splitlines()) == 1
    stamps = {d: (d / "model").stat().st_mtime_ns for d in (home / "ranked", home / "random")}
    again = rs_room.main(args)["runs"][key]
    for judge in ("gold", "rm"):
        assert again[f"winrate_{judge}_ranked_vs_random"] == r[f"winrate_{judge}_ranked_vs_random"]
    assert all(p.stat().st_mtime_ns == t for p, t in made.items())  # answers read back
    assert all((d / "model").stat().st_mtime_ns == t for d, t in stamps.items())  # nothing trained again


def test_length_control_judges_a_round_against_the_sft_model_made_as_short(whole, tmp_path):
    from benchmarks import length_control

    copy = tmp_path / "whole"
    shutil.copytree(whole, copy)
    out = length_control.main(["--project", str(copy), "--round", "2"])
    r = out["projects"][0]["rounds"][0]
    m = r["match"]
    target = length_control.mean_chars(copy / "round-2" / "eval" / "validation_responses.jsonl")
    assert m["target_length"] == pytest.approx(target)
    lengths = [length for _, length in m["trace"]]  # biases in increasing order: lengths never grow
    assert all(x >= y for x, y in zip(lengths, lengths[1:])) and m["trace"][0][0] <= 0.0 <= m["trace"][-1][0]
    work = copy / "length_control" / "sft"
    test = work / f"heldout_eos_bias_{m['bias']:+.4f}.jsonl"
    assert test.is_file() and r["test_mean_chars"]["baseline"] == pytest.approx(length_control.mean_chars(test))
    for judge in ("gold", "rm"):
        w = r[f"winrate_{judge}_vs_length_matched"]
        assert w["n"] == 6 and "lc_win_rate" in w and w["baseline"].endswith(f"(eos_bias={m['bias']:+.4f})")
    made = sorted(p.name for p in work.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in work.iterdir()}
    again = length_control.main(["--project", str(copy), "--round", "2"])["projects"][0]["rounds"][0]
    assert again["match"] == m and sorted(p.name for p in work.iterdir()) == made
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the answers were read back, not made again
    # in the project's eval dtype; policy answers of another dtype are refused, not compared with these
    recorded = Project(copy.parent, copy.name).recorded_eval_dtypes()
    assert r["dtype"] == recorded[2] == recorded[1]
    answers = copy / "round-2" / "eval" / "heldout_responses.jsonl"
    other = "bfloat16" if r["dtype"] == "float32" else "float32"
    answers.write_text("".join(json.dumps({**json.loads(x), "dtype": other}) + "\n" for x in answers.read_text().splitlines()))
    with pytest.raises(SystemExit, match=f"heldout_responses.jsonl: answers generated in {other}"):
        length_control.main(["--project", str(copy), "--round", "2"])


def test_an_eval_in_another_dtype_than_the_projects_earlier_ones_says_so(whole, tmp_path, monkeypatch):
    """An explicit eval.dtype changed mid-project: the round's eval runs in it (its answers made again), and the step's
    outputs say that earlier rounds were evaluated in another dtype (promotion's reason then says so: below)."""
    from alignment.rounds import Steps
    from foundation import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    copy = tmp_path / "whole"
    shutil.copytree(whole, copy)
    before = Project(copy.parent, copy.name).recorded_eval_dtypes()[1]
    other = "bfloat16" if before == "float32" else "float32"
    cfg = copy / "round.yaml"
    cfg.write_text(cfg.read_text().replace("  dtype: auto\n", f"  dtype: {other}\n"))
    p = Project(copy.parent, copy.name)
    assert p.eval_dtype() == other
    m = p.manifest(2)
    del m["steps"]["eval"], m["steps"]["promote"]
    p.save_manifest(2, m)
    out = Steps(p, 2).eval()["outputs"]
    assert out["dtype"] == other and out["dtype_differs_from"] == {1: before}
    rows = [json.loads(x) for x in (copy / "round-2" / "eval" / "heldout_responses.jsonl").read_text().splitlines()]
    assert {r["dtype"] for r in rows} == {other}


def test_eval_dtype_runs_the_step_in_it_and_cached_answers_of_another_dtype_are_made_again(tmp_path, tiny_model,
                                                                                          monkeypatch):
    """``eval.dtype``: the eval step runs inside ``inference_precision`` (its outputs say the dtype), a typo names the
    key, and answers cached by an eval in another dtype are generated again (comparisons stay in one precision)."""

    from foundation import models, precision
    from alignment.evals import suite

    with pytest.raises(ConfigError, match="dtype"):
        suite.EvalSuiteConfig(dtype="bf16")
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda cpuinfo=None: True)
    records = [PromptRecord([{"role": "user", "content": q}], id=q) for q in ("Hi", "Why is the sky blue?")]
    path = tmp_path / "heldout_responses.jsonl"
    first = suite.respond(tiny_model, records, path, max_new_tokens=4, batch_size=2, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["dtype"] for r in rows] == ["float32", "float32"] and [r["response"] for r in rows] == first
    loads = []
    real = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert suite.respond(tiny_model, records, path, max_new_tokens=4, batch_size=2, seed=0) == first and not loads
    with precision.inference_precision("bfloat16"):
        suite.respond(tiny_model, records, path, max_new_tokens=4, batch_size=2, seed=0)
    assert len(loads) == 1 and [json.loads(line)["dtype"] for line in path.read_text().splitlines()] == ["bfloat16"] * 2
    seen = []
    project = _project(tmp_path / "p", "eval.dtype=bfloat16")
    step = suite.RoundEval(project, 1)
    monkeypatch.setattr(step, "_run", lambda: seen.append(precision.select_dtype("auto", "cpu")) or {"outputs": {}})
    assert step.run() == {"outputs": {"dtype": "bfloat16"}} and seen == [torch.bfloat16]
    assert precision.select_dtype("auto", "cpu") == torch.float32
