"""``align annotate``: users, queue, stats, export and sampling pairs with tiny-llama, as users run them."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl

from data.loaders import load_comparisons
from data.store import AnnotationStore, FunctionAnnotator, Judgement, read_tasks


def run_align(*args: str, input: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with text on stdin (passwords) when given."""
    return subprocess.run([sys.executable, "-m", "alignment.cli", *args], cwd=REPO, capture_output=True, text=True, input=input,
                          timeout=timeout, env=os.environ.copy(), stdin=None if input is not None else subprocess.DEVNULL,
                          check=False)


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path}/ann.db"


def pairs(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": f"How do I do thing {i}?", "response_a": f"Carefully, step {i}.",
             "response_b": f"No idea {i}.", "category": "helpfulness" if i % 2 else "safety"} for i in range(n)]


def test_annotate_is_registered_and_lists_subcommands():
    res = run_align("--help")
    assert "annotate" in res.stdout
    res = run_align("annotate", "--help")
    assert res.returncode == 0
    for sub in ("add-user", "queue", "serve", "export", "stats", "sample"):
        assert sub in res.stdout


def test_add_user_reads_the_password_and_stores_a_hash(db, tmp_path):
    res = run_align("annotate", "add-user", "alice", "--role", "admin", "--password-stdin", "--db", db, input="hunter2hunter2\n")
    assert res.returncode == 0, res.stderr
    assert "added human user 'alice' (admin)" in res.stdout
    with sqlite3.connect(db.removeprefix("sqlite:///")) as c:
        (stored,) = c.execute("select password_hash from users where name = 'alice'").fetchone()
    assert stored.startswith("scrypt$") and "hunter2" not in stored
    assert AnnotationStore(db).authenticate("alice", "hunter2hunter2")
    again = run_align("annotate", "add-user", "alice", "--password-stdin", "--db", db, input="another-password\n")
    assert again.returncode == 2 and "user 'alice' exists already" in again.stderr
    short = run_align("annotate", "add-user", "bob", "--password-stdin", "--db", db, input="abc\n")
    assert short.returncode != 0 and "at least 8 characters" in short.stderr
    no_tty = run_align("annotate", "add-user", "bob", "--db", db, input="")
    assert no_tty.returncode != 0 and "--password-stdin" in no_tty.stderr
    assert AnnotationStore(db).user("bob") is None
    sim = run_align("annotate", "add-user", "sim:judge", "--kind", "simulated", "--db", db)
    assert sim.returncode == 0 and "simulated" in sim.stdout


def test_queue_bad_file_names_file_and_line(db, tmp_path):
    rows = pairs(3)
    del rows[2]["response_b"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    res = run_align("annotate", "queue", "--round", "1", "--pairs", str(path), "--db", db)
    assert res.returncode == 2
    assert f"{path}:3: response_b: missing required field" in res.stderr


def test_queue_stats_export_roundtrip(db, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(10))
    res = run_align("annotate", "queue", "--round", "1", "--pairs", str(path), "--overlap", "0.2",
                    "--overlap-labels", "2", "--db", db)
    assert res.returncode == 0, res.stderr
    assert "queued 10 tasks in round 1; the round needs 12 more labels" in res.stdout
    store = AnnotationStore(db)
    store.label_with(FunctionAnnotator("sim:a", lambda t: Judgement(chosen="A", strength="better", safe_a=True,
                                                                    safe_b=t.category != "safety")), round=1)
    store.label_with(FunctionAnnotator("sim:b", lambda t: Judgement(chosen="B", strength="slightly_better",
                                                                    safe_a=True, safe_b=True)), round=1)
    stats = run_align("annotate", "stats", "--round", "1", "--db", db)
    assert stats.returncode == 0, stats.stderr
    assert "10 tasks · 12 of 12 labels · **0 missing**" in stats.stdout
    st = json.loads(run_align("annotate", "stats", "--round", "1", "--json", "--db", db).stdout)
    assert st["agreement"]["overlapping_tasks"] == 2 and st["agreement"]["cohen_kappa"][0]["agreement"] == 0.0
    out = tmp_path / "comparisons-r1.jsonl"
    res = run_align("annotate", "export", "--round", "1", "--out", str(out), "--policy", "all", "--db", db)
    assert res.returncode == 0, res.stderr
    assert "wrote 12 comparisons from 10 labelled tasks (round 1, export version 1" in res.stdout
    comps = load_comparisons(str(out))
    assert len(comps) == 12 and {c.annotator for c in comps} == {"sim:a", "sim:b"}
    safety = [c for c in comps if c.category == "safety" and c.annotator == "sim:a"]
    assert safety and all(c.safe_b is False and c.chosen == "A" for c in safety)
    again = run_align("annotate", "export", "--round", "1", "--out", str(out), "--db", db)
    assert again.returncode == 2 and "exists" in again.stderr
    default = run_align("annotate", "export", "--round", "1", "--out-dir", str(tmp_path / "exports"), "--db", db)
    assert default.returncode == 0 and "export version 2" in default.stdout  # majority: the 2 overlap tasks tie
    assert (tmp_path / "exports" / "round-1" / "comparisons-v2.jsonl").exists()


def test_sample_generates_pairs_with_tiny_llama_and_queues_them(db, tmp_path, tiny_model):
    from foundation.models import builtin_path

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": f"q{i}", "prompt": f"Tell me about topic number {i}.", "category": "safety" if i == 0 else "helpfulness"}
        for i in range(6)])
    out = tmp_path / "pairs.jsonl"
    other = str(builtin_path(tiny_model))  # a second "policy": the same weights given as a folder
    res = run_align("annotate", "sample", "--model", tiny_model, "--model-b", other, "--prompts", str(prompts), "--out", str(out),
                    "--temperature-a", "0.7", "--temperature-b", "1.3", "--max-new-tokens", "12", "--batch-size", "4",
                    "--round", "2", "--db", db)
    assert res.returncode == 0, res.stderr
    tasks = read_tasks(out)
    assert 1 <= len(tasks) <= 6 and f"wrote {len(tasks)} pairs" in res.stdout
    t = tasks[0]
    assert t.source_a == {"model": tiny_model, "temperature": 0.7} and t.source_b == {"model": other, "temperature": 1.3}
    assert t.response_a.strip() != t.response_b.strip() and t.meta["prompt_id"].startswith("q")
    assert {x.category for x in tasks} <= {"safety", "helpfulness"}
    assert AnnotationStore(db).missing_labels(2) == len(tasks)
    refused = run_align("annotate", "sample", "--model", tiny_model, "--prompts", str(prompts), "--out", str(out), "--db", db)
    assert refused.returncode == 2 and "exists" in refused.stderr


def test_sample_pairs_in_process_batches_one_model_at_two_temperatures(tiny_model):
    from data.store.sampling import sample_pairs
    from data.schemas import PromptRecord

    prompts = [PromptRecord([{"role": "user", "content": f"Say something about {w}."}], id=w) for w in ("cats", "rain", "maps")]
    rows, dropped = sample_pairs([tiny_model, tiny_model], prompts, temperatures=[0.8, 1.4],
                                 max_new_tokens=10, batch_size=2, seed=3)
    assert len(rows) + dropped == 3
    again, _ = sample_pairs([tiny_model, tiny_model], prompts, temperatures=[0.8, 1.4], max_new_tokens=10, batch_size=2, seed=3)
    assert again == rows  # seeded
    for r in rows:
        assert r["source_a"]["temperature"] == 0.8 and r["source_b"]["temperature"] == 1.4


def test_k_samples_per_prompt_give_every_distinct_pair_and_count_the_rest_dropped(monkeypatch):
    """K responses per prompt make up to K(K-1)/2 tasks; an empty or repeated response takes its pairs with it;
    response i comes from models[i % 2] at temperatures[i % 3] with seed + i; pairs_per_prompt keeps a seeded subset."""
    from types import SimpleNamespace

    import foundation.generation
    import foundation.models
    from data.schemas import PromptRecord
    from data.store.sampling import sample_pairs

    texts = {"p1": ["a", "b", "a", "c"], "p2": ["x", " ", "y", "z"]}  # p1: sample 2 repeats 0; p2: sample 1 is empty
    calls = []

    def fake_generate(model, tok, convs, *, temperature, seed, **kw):
        calls.append((model, temperature, seed))
        i = seed - 10
        return [SimpleNamespace(text=texts[c[0]["content"]][i], finished=i != 3) for c in convs]

    monkeypatch.setattr(foundation.generation, "generate", fake_generate)
    monkeypatch.setattr(foundation.models, "load_causal_lm", lambda name: f"model:{name}")
    monkeypatch.setattr(foundation.models, "load_tokenizer", lambda name: None)
    prompts = [PromptRecord([{"role": "user", "content": k}], id=k) for k in texts]
    rows, dropped = sample_pairs(["m1", "m2"], prompts, temperatures=[0.7, 1.0, 1.3], seed=10, samples=4)
    assert calls == [("model:m1", 0.7, 10), ("model:m2", 1.0, 11), ("model:m1", 1.3, 12), ("model:m2", 0.7, 13)]
    got = [(r["meta"]["prompt_id"], r["response_a"], r["response_b"], r["meta"]["sample_a"], r["meta"]["sample_b"]) for r in rows]
    assert got == [("p1", "a", "b", 0, 1), ("p1", "a", "c", 0, 3), ("p1", "b", "c", 1, 3),
                   ("p2", "x", "y", 0, 2), ("p2", "x", "z", 0, 3), ("p2", "y", "z", 2, 3)]
    assert dropped == (6 - 3) + (6 - 3)
    assert rows[1]["source_b"] == {"model": "m2", "temperature": 0.7} and rows[1]["meta"]["finished_b"] is False
    some, _ = sample_pairs(["m1"], prompts, temperatures=[0.7], seed=10, samples=4, pairs_per_prompt=2)
    assert [r["meta"]["prompt_id"] for r in some] == ["p1", "p1", "p2", "p2"]
    assert {(r["response_a"], r["response_b"]) for r in some} <= {g[1:3] for g in got}
    assert some == sample_pairs(["m1"], prompts, temperatures=[0.7], seed=10, samples=4, pairs_per_prompt=2)[0]  # seeded
    with pytest.raises(ValueError, match="samples must be >= 2"):
        sample_pairs(["m1"], prompts, temperatures=[0.7], samples=1)


def test_project_flag_uses_the_projects_database_and_admin_commands_unblock_a_round(tmp_path):
    """`--project P` reaches the round project's database (accounts made without it used to land in
    runs/annotations.db); a task two annotators cannot finish is named, released, lowered or dropped."""
    root = tmp_path / "runs"
    init = run_align("round", "init", "--project", "team", "--root", str(root),
                     "--config", str(REPO / "configs" / "round_tiny.yaml"))
    assert init.returncode == 0, init.stderr
    flags = ("--project", "team", "--root", str(root))
    for name in ("alice", "bob"):
        res = run_align("annotate", "add-user", name, "--password-stdin", *flags, input=f"{name}-password\n")
        assert res.returncode == 0, res.stderr
    store = AnnotationStore(f"sqlite:///{root / 'team' / 'annotations.db'}")
    assert [u.name for u in store.users()] == ["alice", "bob"]
    both = run_align("annotate", "users", "--db", "sqlite:///x.db", *flags)
    assert both.returncode == 2 and "--project or --db, not both" in both.stderr
    missing = run_align("annotate", "users", "--project", "nope", "--root", str(root))
    assert missing.returncode == 2 and "no project here" in missing.stderr

    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(3))
    res = run_align("annotate", "queue", "--round", "5", "--pairs", str(path), "--labels", "3", *flags)
    assert res.returncode == 0, res.stderr
    assert "3 task(s) of round 5 need up to 3 labels but there are 2 active annotators (alice, bob)" in res.stderr
    held = store.next_task("alice", round=5)
    waits = run_align("annotate", "waits", "--round", "5", *flags)
    assert f"{held.uid}\tneeds 3 more label(s), from: alice, bob; held by alice since" in waits.stdout
    assert "only 2 can still label it" in waits.stdout
    res = run_align("annotate", "release", "--user", "alice", *flags)
    assert res.returncode == 0 and "released 1 lease(s)" in res.stdout and store.leases(5) == []
    assert "Held now" not in run_align("annotate", "stats", "--round", "5", *flags).stdout
    store.next_task("bob", round=5)
    assert "| bob | p0 | 5 |" in run_align("annotate", "stats", "--round", "5", *flags).stdout
    res = run_align("annotate", "set-labels", "--round", "5", "--task", "p1", "--labels", "2", *flags)
    assert res.returncode == 0 and "now needs 2 labels" in res.stdout
    res = run_align("annotate", "drop-task", "--round", "5", "--task", "p2", *flags)
    assert res.returncode == 0 and "dropped" in res.stdout
    assert [(w.uid, w.missing) for w in store.task_waits(5)] == [("p0", 3), ("p1", 2)]
    bad = run_align("annotate", "set-labels", "--round", "5", "--task", "p9", "--labels", "1", *flags)
    assert bad.returncode == 2 and "round 5 has no task 'p9'" in bad.stderr

    t = store.next_task("alice", round=5)
    store.submit(t.token, "alice", chosen="A")
    dry = run_align("annotate", "export", "--round", "5", "--dry-run", "--out-dir", str(tmp_path / "ex"), *flags)
    assert dry.returncode == 0 and "would write 1 comparisons from 1 labelled tasks" in dry.stdout
    assert not (tmp_path / "ex").exists() and store.exports(5) == []


def test_serve_refuses_bad_options_naming_the_flag(tmp_path):
    db = f"sqlite:///{tmp_path}/a.db"
    for args, message in [(["--max-comment-chars", "0"], "--max-comment-chars must be >= 1, got 0"),
                          (["--max-request-kb", "0"], "--max-request-kb (in bytes) must be >= 1, got 0"),
                          (["--page-lease-seconds", "-1"], "--page-lease-seconds must be >= 0"),
                          (["--allowed-origin", "annotate.example.org"], "--allowed-origin 'annotate.example.org'")]:
        res = run_align("annotate", "serve", "--db", db, *args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
