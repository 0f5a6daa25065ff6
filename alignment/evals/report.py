"""``align report``: one Markdown and one static HTML report with plots across a run's rounds.

    align report --run runs/<project> [--out runs/<project>/report] [--overwrite]

Reads every evaluation result under ``runs/<project>/round-<N>/`` (``eval/*.json`` and any
``rm_eval.json`` up to three folders deep; schema in docs/DEVELOPING.md) and writes to ``--out``:

- ``report.md`` and ``report.html`` (the HTML embeds its images, so it is one file to share);
- ``gold.png``: mean gold reward of each round's answers to the held-out prompts (SFT first), 95% CIs;
- ``rewards.png``: reward-model scores of the policy's (and the baseline's) responses per round;
- one plot per benchmark of ``alignment.evals.suite.BENCHMARKS`` (its module's ``plot``): ``truthfulqa.png``
  (MC1 and MC2 per round, ± one standard error), ``toxigen.png`` (% toxic per round, the classifier's
  measured accuracy in the title), and its summary-table column and tables;
- ``winrate.png``: win rate against the baseline across rounds in the style of Llama 2's Figure 11
  (helpfulness on x, harmlessness/safety on y, one labelled point per round with 95% CIs);
- ``rm_accuracy.png``: reward-model accuracy per preference-strength bucket, per round.

A plot whose data no round has is left out and the report says so.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.evals.results import pct, pyplot, save_png
from alignment.evals.suite import BENCHMARKS

log = logging.getLogger(__name__)

STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")
_ROUND = re.compile(r"^round-(\d+)$")


@dataclass
class Round:
    number: int
    path: Path
    results: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)  # eval -> [(label, result)]

    @property
    def label(self) -> str:
        return "SFT" if self.number == 0 else f"round {self.number}"

    def first(self, eval_name: str) -> dict | None:
        items = self.results.get(eval_name) or []
        return items[0][1] if items else None

    def named(self, eval_name: str, label: str) -> dict | None:
        """The result of ``eval_name`` whose file stem is ``label`` (e.g. winrate / winrate-gold-vs-sft)."""
        return next((res for lab, res in self.results.get(eval_name, []) if lab == label), None)

    def winrate(self, judge: str, baseline: str) -> dict | None:
        """A round's win rate by ``judge`` (gold, rm) against ``baseline`` (sft, previous)."""
        return self.named("winrate", f"winrate-{judge}-vs-{baseline}")


def collect(run: str | Path) -> list[Round]:
    """Rounds (sorted by number) with their results; fails clearly when there is nothing to report.
    Round 1's ``eval/sft/`` (the SFT model's own results) comes first, as round 0 labelled "SFT"."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    rounds = []
    dirs = sorted((p for p in run.iterdir() if p.is_dir() and _ROUND.match(p.name)),
                  key=lambda p: int(_ROUND.match(p.name).group(1)))  # type: ignore[union-attr]
    for d in dirs:
        r = Round(int(_ROUND.match(d.name).group(1)), d)  # type: ignore[union-attr]
        files = sorted((d / "eval").glob("*.json")) if (d / "eval").is_dir() else []
        files += sorted(p for p in d.rglob("rm_eval*.json") if len(p.relative_to(d).parts) <= 3 and p not in files)
        if r.number == 1 and (d / "eval" / "sft").is_dir():  # the SFT model's baseline results: a round of their own
            sft = Round(0, d / "eval" / "sft")
            _read_into(sft, sorted((d / "eval" / "sft").glob("*.json")), d)
            rounds.append(sft)
        _read_into(r, files, d)
        rounds.append(r)
    if not rounds:
        raise FileNotFoundError(f"{run}: no round-<N> folders (expected {run}/round-1/eval/*.json ...)")
    if not any(r.results for r in rounds):
        raise FileNotFoundError(f"{run}: no evaluation results in its round folders (round-<N>/eval/*.json, rm_eval.json)")
    return rounds


def _read_into(r: Round, files: Sequence[Path], d: Path) -> None:
    """Read result files into ``r.results`` (eval name -> [(label, result)]); ``d`` is the round folder."""
    from alignment.evals.results import read_result

    for f in files:
        if f.name.startswith(".") or f.name.endswith("_rows.json"):
            continue
        try:
            res = read_result(f)
        except (ValueError, TypeError) as exc:
            log.warning("skipping %s", exc)
            continue
        label = f.stem
        if res["eval"] == "rm_eval":  # name it by its model: rm_before/rm_helpful/, rm_helpful/eval/
            owner = f.parent.parent if f.parent.name == "eval" and f.parent.parent != d else f.parent
            label = f"{owner.parent.name}/{owner.name}" if owner.parent.name == "rm_before" else owner.name
            label = label if owner != d else f.stem
        r.results.setdefault(res["eval"], []).append((label, res))


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg backend; each returns the PNG path or None when there is no data)


def _judge_name(judge: dict) -> str:
    if judge.get("kind") == "gold":
        return "gold judge (similarity to reference answers, toxicity, refusals; never trained on)"
    if judge.get("kind") == "llm":
        return f"LLM judge {judge.get('model')}"
    if judge.get("safety_rm") or judge.get("scorer") == "CombinedScorer":
        return "combined reward (helpfulness + safety RMs)"
    if judge.get("rm"):
        return "reward model"
    return f"rule-based reward ({judge['reward_fn']})" if judge.get("reward_fn") else "rule-based reward"


def plot_rewards(rounds: Sequence[Round], path: Path) -> Path | None:
    data = []
    for r in rounds:
        res = _main_winrate(r)
        if res and res.get("scores"):
            data.append((r, res))
    if not data:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(data) + 2), 4.5))
    pos_p = [2 * i + 1 - 0.3 for i in range(len(data))]
    pos_b = [2 * i + 1 + 0.3 for i in range(len(data))]
    vp = ax.violinplot([res["scores"]["policy"] for _, res in data], positions=pos_p, widths=0.5, showmedians=True)
    vb = ax.violinplot([res["scores"]["baseline"] for _, res in data], positions=pos_b, widths=0.5, showmedians=True)
    for body in vb["bodies"]:
        body.set_facecolor("lightgrey")
        body.set_alpha(0.8)
    for part in ("cbars", "cmins", "cmaxes", "cmedians"):
        vb[part].set_color("dimgrey")
    ax.set_xticks([2 * i + 1 for i in range(len(data))], [r.label for r, _ in data])
    ax.legend([vp["bodies"][0], vb["bodies"][0]], ["policy (the round's model)", "baseline"], loc="upper center",
              bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.set_xlabel("round")
    judge = data[-1][1].get("judge", {})
    ax.set_ylabel("gold score" if judge.get("kind") == "gold" else "reward-model score (logit)"
                  if judge.get("rm") or judge.get("scorer") == "CombinedScorer" else "reward (the rule-based scorer's units)")
    ax.set_title(f"Reward of responses to held-out prompts per round\njudge: {_judge_name(judge)}; "
                 f"n={data[-1][1]['n']} prompts per round", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


def gold_of(rounds: Sequence[Round], r: Round) -> dict | None:
    """{mean, ci_low, ci_high, n} of the gold reward of round ``r``'s policy (round 0: the SFT model)."""
    if r.number == 0:
        nxt = next((x for x in rounds if x.number >= 1 and x.first("gold")), None)
        return (nxt.first("gold") or {}).get("models", {}).get("sft") if nxt else None
    return (r.first("gold") or {}).get("models", {}).get("policy")


def plot_gold(rounds: Sequence[Round], path: Path) -> Path | None:
    pts = [(r, g) for r in rounds if (g := gold_of(rounds, r))]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = list(range(len(pts)))
    y = [g["mean"] for _, g in pts]
    ax.errorbar(x, y,
                yerr=[[g["mean"] - g["ci_low"] for _, g in pts], [g["ci_high"] - g["mean"] for _, g in pts]], fmt="o-", capsize=4)
    for xi, yi in zip(x, y):
        ax.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xticks(x, [r.label for r, _ in pts])
    ax.set_ylabel("mean gold score (higher is better)")
    ax.set_title(f"Gold reward of each round's answers to the held-out prompts\n(n={pts[-1][1]['n']} prompts; "
                 "bars: 95% bootstrap CI)", fontsize=10)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def _axes_of(res: dict) -> tuple[dict, dict, str, str] | None:
    if res.get("by_axis"):
        return (res["by_axis"]["helpfulness"], res["by_axis"]["harmlessness"], "Helpfulness win rate (%)",
                "Harmlessness win rate (%)")
    cats = res.get("by_category", {})
    if "helpfulness" in cats and "safety" in cats:
        return cats["helpfulness"], cats["safety"], "Win rate on helpfulness prompts (%)", "Win rate on safety prompts (%)"
    return None


def _short(model: Any) -> str:
    """The last two parts of a model path (round-0/sft), or the name."""
    return "/".join(Path(str(model)).parts[-2:])


def _main_winrate(r: Round) -> dict | None:
    """The win rate a round is judged by: the gold judge's against the SFT model on the test prompts (round 1, which
    starts from the SFT model, keeps it as its vs-previous one), else the first other win rate it holds (a standalone
    run's), never a validation one: the decision set's numbers are not reported as results."""
    if r.number == 0:
        return None
    got = r.winrate("gold", "sft") or (r.winrate("gold", "previous") if r.number == 1 else None)
    return got or next((res for label, res in r.results.get("winrate", []) if not label.startswith("validation-")), None)


def plot_winrate(rounds: Sequence[Round], path: Path) -> Path | None:
    pts = [(r, res) for r in rounds if (res := _main_winrate(r))]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 6))
    baseline = pts[-1][1].get("baseline")
    judge = pts[-1][1].get("judge", {})
    two_d = all(_axes_of(res) for _, res in pts)
    if two_d:
        xlabel = ylabel = ""
        for k, (r, res) in enumerate(pts):
            hx, hy, xlabel, ylabel = _axes_of(res)  # type: ignore[misc]
            x, y = 100 * hx["win_rate"], 100 * hy["win_rate"]
            ax.errorbar(x, y, xerr=[[x - 100 * hx["ci_low"]], [100 * hx["ci_high"] - x]],
                        yerr=[[y - 100 * hy["ci_low"]], [100 * hy["ci_high"] - y]], fmt="o", capsize=3, color="tab:blue")
            # alternate label sides so rounds that land on the same spot stay readable
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, 6 - 16 * (k % 2)), fontsize=9)
        xs = [100 * _axes_of(res)[0]["win_rate"] for _, res in pts]  # type: ignore[index]
        ys = [100 * _axes_of(res)[1]["win_rate"] for _, res in pts]  # type: ignore[index]
        ax.plot(xs, ys, "-", color="tab:blue", alpha=0.4)
        ax.axvline(50, ls="--", color="grey", lw=1)
        ax.axhline(50, ls="--", color="grey", lw=1)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"Win rate vs {_short(baseline)} across rounds (Llama 2 Fig. 11 style)\n"
                     f"judge: {_judge_name(judge)}\nbars: 95% bootstrap CI; ties count half", fontsize=9.5)
    else:
        x = [r.number for r, _ in pts]
        y = [100 * res["metrics"]["win_rate"] for _, res in pts]
        lo = [100 * res["metrics"]["ci_low"] for _, res in pts]
        hi = [100 * res["metrics"]["ci_high"] for _, res in pts]
        ax.plot(x, y, "o-")
        ax.fill_between(x, lo, hi, alpha=0.2, label="95% bootstrap CI")
        ax.axhline(50, ls="--", color="grey", lw=1)
        ax.set_xticks(x, [r.label for r, _ in pts])
        ax.set_ylim(0, 100)
        ax.set_xlabel("round")
        ax.set_ylabel("win rate (%), ties count half")
        ax.legend()
        ax.set_title(f"Win rate vs {_short(baseline)} across rounds\n(judge: {_judge_name(judge)})", fontsize=10)
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_rm_accuracy(rounds: Sequence[Round], path: Path) -> Path | None:
    series = [(f"{r.label} {label}", res) for r in rounds for label, res in r.results.get("rm_eval", [])]
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(series) + 5), 4.5))
    width = 0.8 / len(series)
    for k, (name, res) in enumerate(series):
        by = res.get("by_strength", {})
        ys = [100 * by[s]["accuracy"] if s in by and by[s].get("accuracy") is not None else 0.0 for s in STRENGTHS]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(STRENGTHS))]
        ax.bar(xs, ys, width=width, label=f"{name} (all: {100 * res['accuracy']:.0f}%)")
    ax.axhline(50, ls="--", color="grey", lw=1, label="chance")
    ax.set_xticks(range(len(STRENGTHS)), [s.replace("_", " ") for s in STRENGTHS])
    ax.set_xlabel("preference strength of the test pair (Llama 2 scale)")
    ax.set_ylabel("accuracy (%): chosen response scored higher")
    ax.set_ylim(0, 100)
    ax.set_title("Reward-model accuracy per preference-strength bucket")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# the document (one block list rendered to Markdown and to HTML)


def _wr(res: dict | None) -> str:
    if not res:
        return "—"
    m = res["metrics"]
    return f"{pct(m['win_rate'])} [{pct(m['ci_low'])}, {pct(m['ci_high'])}] (n={m['n']}, ties {pct(m['ties'], 0)})"


def _acc(res: dict) -> str:
    """A reward model's accuracy with its 95% Wilson interval and n (when the result has n)."""
    from foundation.stats import wilson_interval

    acc, n = res.get("accuracy"), res.get("n")
    if acc is None or not n:
        return pct(acc)
    lo, hi = wilson_interval(round(acc * n), n)
    return f"{pct(acc)} [{pct(lo)}, {pct(hi)}] (n={n})"


def summary_table(rounds: Sequence[Round]) -> tuple[list[str], list[list[str]]]:
    benches = [b.load() for b in BENCHMARKS]
    head = ["round", "gold reward [95% CI]", "vs SFT, gold judge [95% CI]", "vs previous, gold judge",
            "vs previous, RM judge (trained on)", *[m.REPORT_COLUMN for m in benches], "RM accuracy"]
    rows = []
    for r in rounds:
        g = gold_of(rounds, r)
        gold = f"{g['mean']:.3f} [{g['ci_low']:.3f}, {g['ci_high']:.3f}]" if g else "—"
        vs_sft = _main_winrate(r)
        cells = [m.report_cell(res) if (res := r.first(b.name)) else "—" for b, m in zip(BENCHMARKS, benches)]
        rms = ", ".join(f"{label} {_acc(res)}" for label, res in r.results.get("rm_eval", [])) or "—"
        rows.append([r.label, gold, _wr(vs_sft), _wr(r.winrate("gold", "previous")),
                     _wr(r.winrate("rm", "previous")), *cells, rms])
    return head, rows


def build_blocks(run: Path, rounds: Sequence[Round], images: dict[str, Path | None],
                 annotation: Sequence[dict] = ()) -> list[tuple[str, Any]]:
    blocks: list[tuple[str, Any]] = [("h1", f"Evaluation report: {run.name}"),
                                     ("p", f"{len(rounds)} rounds under {run}: " + ", ".join(r.label for r in rounds) + ".")]
    blocks += [("h2", "Summary"), ("table", summary_table(rounds))]
    if annotation:
        from alignment.evals import report_annotation

        blocks += [("h2", "Annotation"),
                   ("p", "Who labelled the pairs each round's reward models learned from. Settled short: tasks every "
                         "active annotator labelled or skipped before they had all their labels. Ties dropped: tasks "
                         "the majority export left out because the annotators split evenly. The left/right share "
                         "counts people only (50% = no position bias)."),
                   ("table", report_annotation.annotation_table(annotation))]
        blocks += [("img", images["annotators"])] if images.get("annotators") else []
    labelled_by = {r["by"] for r in annotation}
    who = ("the gold judge labelled the pairs the reward models learned from, and nothing else in the loop sees it"
           if labelled_by and all(b.startswith("simulated: gold") for b in labelled_by)
           else "who labelled the pairs the reward models learned from is under Annotation" if annotation
           else "no stage trains on these answers")
    captions = {
        "gold": ("Gold reward", ("Mean gold score of each round's greedy answers to the held-out prompts "
                                 f"(never trained or sampled on), with a 95% bootstrap CI; {who}.")),
        "rewards": ("Reward distributions", ("Reward-model scores of the responses each round's policy "
                                             "(and its baseline) gave to the held-out win-rate prompts.")),
        **{b.name: b.load().caption(rounds) for b in BENCHMARKS},
        "winrate": ("Win rate across rounds", ("Each round's policy against the baseline (the SFT model "
                                               "when the gold judge ran), judged pairwise on the held-out "
                                               "prompts; ties count half.")),
        "rm_accuracy": ("Reward-model accuracy per strength", ("Share of test pairs where the reward model scores the chosen "
                                                               "response higher, per Llama 2 preference-strength bucket.")),
    }
    for key, (title, text) in captions.items():
        blocks.append(("h2", title))
        if images.get(key):
            blocks += [("p", text), ("img", images[key])]
        else:
            blocks.append(("p", f"No round has data for this plot ({key})."))
    for b in BENCHMARKS:
        blocks += b.load().report_blocks(rounds)
    return blocks


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def render_markdown(blocks: list[tuple[str, Any]], base: Path) -> str:
    parts = []
    for kind, value in blocks:
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "p":
            parts.append(value)
        elif kind == "table":
            parts.append(_md_table(*value))
        elif kind == "img":
            parts.append(f"![{value.stem}]({value.relative_to(base).as_posix()})")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[tuple[str, Any]], title: str) -> str:
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(value)}</p>")
        elif kind == "table":
            head, rows = value
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                        + "</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(value).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(value.stem)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}"
             "th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build(run: str | Path, out: str | Path | None = None, *, overwrite: bool = False) -> dict[str, Path]:
    """Write the report; returns {"markdown", "html", <plot name>: png} paths."""
    run = Path(run)
    rounds = collect(run)
    out = Path(out) if out else run / "report"
    md_path, html_path = out / "report.md", out / "report.html"
    if not overwrite:
        for p in (md_path, html_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite to replace the report, or choose --out")
    out.mkdir(parents=True, exist_ok=True)
    plots = {"gold": plot_gold, "rewards": plot_rewards, **{b.name: b.load().plot for b in BENCHMARKS}, "winrate": plot_winrate,
             "rm_accuracy": plot_rm_accuracy}
    images = {name: fn(rounds, out / f"{name}.png") for name, fn in plots.items()}
    from alignment.evals.report_annotation import annotation_of, plot_annotators

    annotation = annotation_of(run)
    images["annotators"] = plot_annotators(annotation, out / "annotators.png") if annotation else None
    blocks = build_blocks(run, rounds, images, annotation)
    md_path.write_text(render_markdown(blocks, out), encoding="utf-8")
    html_path.write_text(render_html(blocks, f"Evaluation report: {run.name}"), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, **{k: v for k, v in images.items() if v}}


def cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="align report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the run folder holding round-<N>/ folders (runs/<project>)")
    p.add_argument("--out", help="output folder (default: <run>/report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    a = p.parse_args(argv)
    from foundation.runs import setup_logging

    setup_logging()
    paths = build(a.run, a.out, overwrite=a.overwrite)
    for k, v in paths.items():
        print(f"{k}\t{v}")
    return 0
