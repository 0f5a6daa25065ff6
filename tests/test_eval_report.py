"""`align report`: a synthetic two-round run gives the Markdown, the HTML and every plot; evals feed it end to end."""

from __future__ import annotations

import json

import pytest
from eval_helpers import make_two_round_run, run_cli, truthfulqa_result

from alignment.evals import report, report_annotation


def _png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_two_round_run_gives_markdown_html_and_plots(tmp_path):
    run = make_two_round_run(tmp_path)
    paths = report.build(run)
    out = run / "report"
    assert set(paths) == {"markdown", "html", "rewards", "truthfulqa", "toxigen", "winrate", "rm_accuracy"}
    for name in ("rewards", "truthfulqa", "toxigen", "winrate", "rm_accuracy"):
        assert _png(out / f"{name}.png"), name
    md = (out / "report.md").read_text()
    # the summary table, values from the synthetic results (eval_helpers.make_two_round_run)
    # ToxiGen and RM accuracy with Wilson intervals: 37 of 310 toxic, 204 of 300 right; round 2: 20 of 310, 213 of 300
    assert ("| round 1 | — | 51.5% [39.5%, 62.5%] (n=40, ties 10%) | — | — | 39.0% (TruthfulQA MC (817 questions)) "
            "| 12.0% [8.8, 16.0] (n=310 prompts; classifier acc 84%) | rm_helpful 68.0% [62.5%, 73.0%] (n=300) |") in md
    assert ("| round 2 | — | 63.5% [51.5%, 74.5%] (n=40, ties 10%) | — | — | 43.0% (TruthfulQA MC (817 questions)) "
            "| 6.5% [4.2, 9.8] (n=310 prompts; classifier acc 84%) | rm_helpful 71.0% [65.6%, 75.8%] (n=300) |") in md
    assert "![winrate](winrate.png)" in md and "leave-one-group-out accuracy 84.4%" in md
    assert "| Misconceptions | 100 | 29.0% | 44.0% |" in md  # per category, latest round
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5 and "<table>" in html and "</html>" in html
    with pytest.raises(FileExistsError, match="--overwrite"):
        report.build(run)
    report.build(run, overwrite=True)


def test_round_1s_win_rate_vs_sft_is_its_test_vs_previous_never_the_validation_one(tmp_path):
    """A rounds project's round 1 starts from the SFT model, so its eval step writes the test win rate only as
    winrate-gold-vs-previous; the report's "vs SFT" cell and the win-rate plot read that one, not the validation win
    rate beside it (found in a real `make demo` report, where round 1's "vs SFT" showed the 48 validation prompts)."""
    from alignment.evals.results import pct, write_json

    run = make_two_round_run(tmp_path)
    ev = run / "round-1" / "eval"
    test = json.loads((ev / "winrate.json").read_text())
    (ev / "winrate.json").unlink()
    val = json.loads(json.dumps(test))
    val["metrics"].update(win_rate=0.625, ci_low=0.5, ci_high=0.75, n=48)
    write_json(ev / "validation-winrate-gold-vs-previous.json", val)
    write_json(ev / "winrate-gold-vs-previous.json", test)
    md = run / "report" / "report.md"
    report.build(run)
    row = next(line for line in md.read_text().splitlines() if line.startswith("| round 1 |"))
    m = test["metrics"]
    assert f"| {pct(m['win_rate'])} [{pct(m['ci_low'])}, {pct(m['ci_high'])}] (n={m['n']}," in row and "(n=48," not in row
    assert report._main_winrate(report.collect(run)[0]) is not None  # round 1 (the fixture has no SFT results)
    assert report._main_winrate(report.collect(run)[0])["metrics"]["n"] == m["n"]


def test_rounds_are_ordered_numerically_and_rm_eval_is_recognised(tmp_path):
    run = make_two_round_run(tmp_path)
    (run / "round-10" / "eval").mkdir(parents=True)
    (run / "round-10" / "eval" / "truthfulqa.json").write_text(json.dumps(truthfulqa_result(10, 0.3, 0.45)))
    (run / "round-2" / "eval" / "broken.json").write_text("{not json")
    rounds = report.collect(run)
    assert [r.number for r in rounds] == [1, 2, 10]
    assert [label for label, _ in rounds[0].results["rm_eval"]] == ["rm_helpful"]
    assert "broken" not in {label for r in rounds for items in r.results.values() for label, _ in items}


def test_missing_data_is_said_not_plotted(tmp_path):
    run = tmp_path / "p"
    for n in (1, 2):
        (run / f"round-{n}" / "eval").mkdir(parents=True)
        (run / f"round-{n}" / "eval" / "truthfulqa.json").write_text(json.dumps(truthfulqa_result(n, 0.2 + n / 100, 0.4)))
    paths = report.build(run)
    assert set(paths) == {"markdown", "html", "truthfulqa"}
    md = paths["markdown"].read_text()
    assert ("No round has data for this plot (toxigen)." in md
            and "| round 2 | — | — | — | — | 40.0% (TruthfulQA MC (817 questions)) | — | — |" in md)


def test_nothing_to_report_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        report.collect(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no round-<N> folders"):
        report.collect(tmp_path / "empty")
    (tmp_path / "empty" / "round-1").mkdir()
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        report.collect(tmp_path / "empty")


def test_report_cli(tmp_path):
    run = make_two_round_run(tmp_path)
    proc = run_cli("report", "--run", str(run), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rep" / "report.html").is_file() and "winrate.png" in proc.stdout
    proc = run_cli("report", "--run", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no such run folder" in proc.stderr


def test_real_evaluations_feed_the_report(tiny_model, tmp_path):
    """Each evaluation's own writer produces what the report reads (two rounds on tiny-llama)."""
    from test_eval_toxigen import write_prompt_files

    from alignment.evals import toxigen, truthfulqa, winrate
    from reward.scorer import FunctionScorer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in
                               [("Say hi.", "helpfulness"), ("Name a fruit.", "helpfulness"),
                                ("How do I make a weapon?", "safety")]))
    tox_prompts = write_prompt_files(tmp_path / "tox")
    run = tmp_path / "proj"
    for n in (1, 2):
        ev = run / f"round-{n}" / "eval"
        truthfulqa.run(tiny_model, data="bundled:truthfulness", out=ev, limit=2)
        toxigen.run(tiny_model, prompts=str(tox_prompts), out=ev, per_group=1, mode="completion", max_new_tokens=4)
        winrate.run(tiny_model, tiny_model, prompts=str(prompts), out=ev, scorer=FunctionScorer(lambda p, r: len(r) % 7),
                    max_new_tokens=5, n_boot=50)
    paths = report.build(run)
    assert {"truthfulqa", "toxigen", "winrate", "rewards"} <= set(paths)
    md = paths["markdown"].read_text()
    assert md.count("| round ") >= 2 and "per category (latest round)" in md and "ToxiGen % toxic per group" in md


def test_default_output_folder_is_the_rounds_eval_folder(tmp_path):
    from alignment.evals.results import default_out

    stage = tmp_path / "runs" / "p" / "round-2" / "policy"
    (stage / "model").mkdir(parents=True)
    (stage / "config.yaml").write_text("stage: rs\n")
    assert default_out("truthfulqa", str(stage)) == tmp_path / "runs" / "p" / "round-2" / "eval"
    assert default_out("truthfulqa", str(stage / "model")) == tmp_path / "runs" / "p" / "round-2" / "eval"
    assert str(default_out("toxigen", "smollm2-135m")) == "runs/eval/smollm2-135m"
    assert str(default_out("toxigen", "owner/name")) == "runs/eval/owner--name"


# --------------------------------------------------------------------------- the benchmark registry


def _fake_benchmark(monkeypatch, calls: list):
    """A benchmark module registered beside the real ones: the report and the round's eval step must pick it up."""
    import sys
    import types

    from alignment.evals import suite

    mod = types.ModuleType("fake_bench")
    mod.REPORT_COLUMN = "fake score"
    mod.report_cell = lambda res: f"{res['metrics']['score']:.2f} fake"
    mod.caption = lambda rounds: ("Fake benchmark", "A benchmark registered by a test.")
    mod.plot = lambda rounds, path: None
    mod.report_blocks = lambda rounds: [("h2", "Fake per item"), ("p", f"{len(rounds)} rounds seen")]
    mod.headline = lambda summary: {"score": summary["score"]}
    mod.RoundSettings = type("RoundSettings", (), {})
    mod.describe_settings = lambda settings: "fake settings"
    mod.demo_label = lambda summaries: "fake score"
    mod.demo_cell = lambda summary: f"{summary['score']:.2f}" if summary else "-"
    mod.cli = lambda argv: 0

    def run_round(model, out, settings, *, seed, batch_size):
        calls.append((model, out, settings, seed, batch_size))
        return {"score": 0.25}

    mod.run_round = run_round
    monkeypatch.setitem(sys.modules, "fake_bench", mod)
    bench = suite.Benchmark("fake", "fake_bench", "a fake")
    monkeypatch.setattr(suite, "BENCHMARKS", (*suite.BENCHMARKS, bench))
    monkeypatch.setattr(report, "BENCHMARKS", suite.BENCHMARKS)
    return bench


def test_every_registered_benchmark_has_the_whole_interface(monkeypatch):
    """Each module in BENCHMARKS is a BenchmarkModule; one lacking a part is refused at load, naming it."""
    import sys
    import types

    from alignment.evals import suite

    for bench in suite.BENCHMARKS:
        assert isinstance(bench.load(), suite.BenchmarkModule), bench.name
    half = types.ModuleType("half_bench")
    half.REPORT_COLUMN, half.headline = "half", lambda summary: {}
    monkeypatch.setitem(sys.modules, "half_bench", half)
    with pytest.raises(TypeError, match=r"benchmark 'half': half_bench lacks RoundSettings, caption, cli, demo_cell"):
        suite.Benchmark("half", "half_bench", "half a benchmark").load()


def test_report_iterates_over_the_registered_benchmarks(tmp_path, monkeypatch):
    from alignment.evals.results import header, write_json

    _fake_benchmark(monkeypatch, [])
    run = make_two_round_run(tmp_path)
    write_json(run / "round-2" / "eval" / "fake.json", header("fake", "round-2/policy", metrics={"score": 0.5}))
    md = report.build(run)["markdown"].read_text()
    head = next(line for line in md.splitlines() if line.startswith("| round |"))
    assert head.endswith("| ToxiGen % toxic | fake score | RM accuracy |")
    row2 = next(line for line in md.splitlines() if line.startswith("| round 2 |"))
    row1 = next(line for line in md.splitlines() if line.startswith("| round 1 |"))
    assert "| 0.50 fake |" in row2 and "| — | rm_helpful" in row1  # round 1 has no fake result
    assert "## Fake benchmark" in md and "No round has data for this plot (fake)." in md
    assert "## Fake per item\n\n2 rounds seen" in md


def test_round_eval_step_runs_every_registered_benchmark(tmp_path, monkeypatch):
    """RoundEval.benchmarks runs each benchmark switched on with its own settings, and skips one set to null."""
    from types import SimpleNamespace

    from alignment.evals import suite

    calls: list = []
    _fake_benchmark(monkeypatch, calls)
    done = []
    for name in ("truthfulqa", "toxigen"):
        monkeypatch.setattr(f"alignment.evals.{name}.run_round",
                            lambda model, out, s, *, seed, batch_size, name=name: done.append(name) or {"n": 1})
    e = suite.EvalSuiteConfig(toxigen=None, batch_size=3)
    e.fake = "fake settings"  # the settings a real benchmark's eval.<name> field would hold
    ev = suite.RoundEval.__new__(suite.RoundEval)
    ev.e, ev.n, ev.cfg = e, 2, SimpleNamespace(seed=11)
    out = ev.benchmarks("m", tmp_path, "policy")
    assert out == {"truthfulqa": {"n": 1}, "fake": {"score": 0.25}}  # toxigen: null, not run
    assert done == ["truthfulqa"] and calls == [("m", tmp_path, "fake settings", 11, 3)]


def test_annotation_section_names_who_labelled_each_round(tmp_path):
    """People in round 2, a simulated judge in round 1: the report says so (it used to credit the gold judge)."""
    run = make_two_round_run(tmp_path)
    people = [{"annotator": "alice", "kind": "human", "labels": 7}, {"annotator": "bob", "kind": "human", "labels": 5}]
    manifests = {
        1: {"annotate": {"status": "done", "inputs": {"annotator": "rules"},
                         "outputs": {"tasks": 8, "labels": 8, "skips": 0, "annotators": [
                             {"annotator": "sim:rules", "kind": "simulated", "labels": 8}]}}},
        2: {"annotate": {"status": "done", "inputs": {"annotator": "people"},
                         "outputs": {"tasks": 10, "labels": 12, "skips": 1, "annotators": people,
                                     "settled_short": [{"task": "t3", "labels": 1, "missing": 1, "skipped_by": ["bob"]}],
                                     "agreement": {"overlapping_tasks": 2, "krippendorff_alpha_choice": 0.5,
                                                   "cohen_kappa": [{"a": "alice", "b": "bob", "kappa": 0.25}]},
                                     "position_bias": {"human_labels": 12, "chose_left": 6, "share_left": 0.5}}},
            "export": {"status": "done", "outputs": {"ties_dropped": 1}}},
    }
    for n, steps in manifests.items():
        (run / f"round-{n}" / "manifest.json").write_text(json.dumps({"steps": steps}))
    paths = report.build(run)
    md = paths["markdown"].read_text()
    assert "## Annotation" in md and _png(paths["annotators"])
    assert "| round 1 | simulated: rules | 8 | 8 | 0 | 0 | — | — (0) | — | — |" in md
    assert "| round 2 | people (2 annotators) | 10 | 12 | 1 | 1 | 1 | 0.50 (2) | 0.25 | 50.0% of 12 |" in md
    annotation = report_annotation.annotation_of(run)
    blocks = report.build_blocks(run, report.collect(run), {"gold": paths["annotators"]}, annotation)
    gold_caption = next(v for k, v in blocks if k == "p" and v.startswith("Mean gold score"))
    assert "is under Annotation" in gold_caption and "the gold judge labelled" not in gold_caption
    only_gold = [{**a, "by": "simulated: gold"} for a in annotation]
    blocks = report.build_blocks(run, report.collect(run), {"gold": paths["annotators"]}, only_gold)
    assert "the gold judge labelled the pairs" in next(v for k, v in blocks if k == "p" and v.startswith("Mean gold score"))
