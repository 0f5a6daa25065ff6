"""The steps of a round (``Steps``: one method per step name) and running a training stage as a child process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from foundation.config import to_dict
from foundation.runs import read_jsonl
from alignment.methods import METHODS as POLICY_METHODS
from alignment.rounds.config import WAITING, StageSpec
from alignment.rounds.project import Project, sha256
from data.loaders import DataSource
from data.store.simulated import rule_judgement

log = logging.getLogger("alignment.rounds")

# running a training stage as a child process


class StageFailed(RuntimeError):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_stage(stage: str, spec: StageSpec, out: Path, overrides: Sequence[str], last: Sequence[str] = ()) -> dict:
    """``align <stage>`` into ``out`` (resumed when a killed run left it), as a child process that
    dies with this one. Returns the stage's summary.json. ``spec.overrides`` win over ``overrides``;
    ``last`` wins over both (what the round decides, e.g. the model a warm-started reward model starts from)."""
    if (out / "summary.json").is_file() and (out / "model").is_dir():
        log.info("%s: already finished in %s", stage, out)
        return json.loads((out / "summary.json").read_text())
    cmd = [sys.executable, "-m", "alignment.cli", stage, "--config", spec.config, f"run.output_dir={out}",
           *overrides, *spec.overrides, *last]
    if (out / "config.yaml").is_file():
        cmd.append("--resume")
    if spec.launch:
        cmd += ["--launch", spec.launch]
    log.info("running: %s", " ".join(cmd[2:]))
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    proc = subprocess.run(cmd, env=env, check=False, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    if proc.returncode != 0:
        raise StageFailed(f"`align {stage}` failed (exit {proc.returncode}); its output is above, its folder is {out}. "
                           "Fix the cause and run `align round run` again: it resumes from there.")
    return json.loads((out / "summary.json").read_text())


def _sources(paths: Sequence[DataSource | str]) -> str:
    items = []
    for p in paths:
        d = to_dict(p) if isinstance(p, DataSource) else {"path": p}
        items.append("{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items() if v is not None) + "}")
    return "[" + ", ".join(items) + "]"


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ---------------------------------------------------------------------------------------------
# steps: each returns {"inputs": ..., "outputs": ...} or WAITING


class Steps:
    def __init__(self, project: Project, n: int):
        self.p, self.n, self.cfg = project, n, project.cfg
        self.dir = project.round_dir(n)

    def store(self) -> Any:
        from data.store import AnnotationStore

        return AnnotationStore(self.p.db_url())

    # -- round 1
    def sft(self) -> dict:
        out = self.dir / "sft"
        summary = run_stage("sft", self.cfg.sft, out, [f"run.seed={self.cfg.seed}"])  # the project's seed: its data order
        return {"inputs": {"config": self.cfg.sft.config}, "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    # -- rounds 2+
    def sample(self) -> dict:
        from data.loaders import write_jsonl
        from data.store.sampling import sample_pairs

        pairs = self.dir / "pairs.jsonl"
        policy = self.p.current_policy(before=self.n) if self.n > 1 else self.p.sft_model()
        models = [policy, self.p.policy_of(self.n - 1) if self.cfg.sample.compare_previous and self.n > 1 else policy]
        if not pairs.is_file():
            used = set()
            for k in range(1, self.n):
                if (self.p.round_dir(k) / "pairs.jsonl").is_file():
                    for row in read_jsonl(self.p.round_dir(k) / "pairs.jsonl"):
                        used.add(json.dumps(row["prompt"], sort_keys=True))
            chosen = draw_prompts(self.p.pool(), used, self.cfg.sample.per_round, self.cfg.sample.safety_share,
                                  seed=self.cfg.seed + self.n)
            if not chosen:
                raise RuntimeError(f"round {self.n}: no unused prompts left in the prompt pool "
                                   f"({self.p.pool_path}); add prompt sources")
            sc = self.cfg.sample
            rows, dropped = sample_pairs(models, chosen, temperatures=sc.temperatures, max_new_tokens=sc.max_new_tokens,
                                         batch_size=sc.batch_size, seed=self.cfg.seed + 1000 * self.n,
                                         samples=sc.samples_per_prompt, pairs_per_prompt=sc.pairs_per_prompt)
            for r in rows:
                r.setdefault("meta", {})["round"] = self.n
            tmp = pairs.with_name(".pairs.jsonl.tmp")
            tmp.unlink(missing_ok=True)
            write_jsonl(tmp, rows)
            os.replace(tmp, pairs)
            log.info("round %d: %d pairs from %d prompts (%d dropped: empty or identical responses)", self.n,
                     len(rows), len(chosen), dropped)
        store = self.store()
        if self.n not in store.rounds():
            a = self.cfg.annotation
            store.queue_file(self.n, pairs, labels=a.labels, overlap=a.overlap,
                             overlap_labels=a.overlap_labels, seed=self.cfg.seed)
            if a.simulated is None:
                warning = store.team_warning(self.n)
                if warning:
                    log.warning("round %d: %s", self.n, warning)
        n_pairs = len(read_jsonl(pairs))
        return {"inputs": {"policy": models[0], "policy_b": models[1], "temperatures": self.cfg.sample.temperatures,
                           "samples_per_prompt": self.cfg.sample.samples_per_prompt},
                "outputs": {"path": str(pairs), "sha256": sha256(pairs), "pairs": n_pairs, "db": self.p.db_url()}}

    def annotate(self) -> dict | str:
        store = self.store()
        a = self.cfg.annotation
        labelled = 0
        if a.simulated is not None:
            annotator = self._annotator()
            labelled = store.label_with(annotator, round=self.n)
            log.info("round %d: %s stored %d labels", self.n, annotator.name, labelled)
        waits = store.task_waits(self.n)
        waiting = [w for w in waits if not w.settled]
        if waiting:
            log.info("round %d: waiting for %d labels on %d tasks; annotators label in `align annotate serve "
                     "--project %s%s`; `align round status` says why each task waits", self.n,
                     sum(w.missing for w in waiting), len(waiting), self.p.dir.name, self.p.root_flag())
            for w in waiting[:5]:
                log.info("round %d: task %s %s", self.n, w.uid, w.why())
            return WAITING
        settled = [w for w in waits if w.settled]
        for w in settled:
            log.warning("round %d: task %s %s", self.n, w.uid, w.why())
        stats = store.stats(round=self.n)
        return {"inputs": {"annotator": a.simulated or "people", "db": self.p.db_url()},
                "outputs": {"tasks": stats["tasks"], "labels": stats["labels_done"], "skips": stats["skips"],
                            "both_bad": stats["both_bad"], "annotators": stats["annotators"],
                            "agreement": {k: stats["agreement"][k] for k in
                                          ("overlapping_tasks", "krippendorff_alpha_choice", "cohen_kappa")},
                            "position_bias": stats["position_bias"],
                            "settled_short": [{"task": w.uid, "labels": len(w.labelled), "missing": w.missing,
                                               "skipped_by": list(w.skipped)} for w in settled]}}

    def _annotator(self) -> Any:
        from data.store import FunctionAnnotator, ScorerAnnotator

        a = self.cfg.annotation
        if a.simulated == "rules":
            return FunctionAnnotator("sim:rules", rule_judgement)
        if a.simulated == "gold":
            from alignment.evals.gold import GoldAnnotator, GoldJudge

            return GoldAnnotator(GoldJudge(self.cfg.gold), self.p.pool())
        if a.simulated == "rm":
            from reward.model import load_scorer

            safety = load_scorer(a.rm_safety) if a.rm_safety else None
            return ScorerAnnotator("sim:rm", load_scorer(a.rm_helpful), safety_scorer=safety)
        import importlib

        module, fn = a.simulated.split(":", 1)  # type: ignore[union-attr]
        return FunctionAnnotator(f"sim:{fn}", getattr(importlib.import_module(module), fn))

    def export(self) -> dict:
        store = self.store()
        # the export closes the round: a label or change after it would be confirmed to the annotator and never used
        if self.n not in store.closed_rounds():
            store.close_round(self.n, by=None)
        res = store.export(self.n, out_dir=self.dir / "exports", policy=self.cfg.annotation.export_policy, by="align round")
        path = Path(res.path)
        if res.ties_dropped:
            log.warning("round %d: the %s export dropped %d task(s) whose annotators split evenly (ties); "
                        "annotation.export_policy=weighted breaks ties by the strengths", self.n, res.policy, res.ties_dropped)
        return {"inputs": {"db": self.p.db_url(), "policy": self.cfg.annotation.export_policy},
                "outputs": {"path": str(path), "sha256": sha256(path), "records": res.records, "version": res.version,
                            "tasks": res.tasks, "ties_dropped": res.ties_dropped}}

    def rm_before(self) -> dict:
        """Last round's reward models on this round's new comparisons, before training on them: a report, read by no
        decision, so it scores in the project's eval dtype as the eval step does (``Project.eval_dtype``; the score head
        stays fp32, ``reward.model.fp32_score_head``)."""
        from data.loaders import load_comparisons
        from foundation.precision import dtype_name, inference_precision
        from reward.evaluate import evaluate
        from reward.model import load_scorer

        data = self.p.manifest(self.n)["steps"]["export"]["outputs"]["path"]
        comparisons = load_comparisons(DataSource(data))
        outputs: dict[str, Any] = {}
        setting = self.p.eval_dtype()
        with inference_precision(setting):
            dtype = dtype_name()
            for name in ("rm_helpful", "rm_safety"):
                model = self.p.rm_dir(name, self.n - 1)
                out = self.dir / "rm_before" / name
                report = evaluate(load_scorer(str(model)), comparisons, model=str(model),
                                  data=f"round {self.n} comparisons (new)", out=out, extra={"dtype": dtype})
                outputs[name] = {"accuracy": report["accuracy"], "n": report["n"], "report": str(out / "rm_eval.json"),
                                 "dtype": dtype}
        return {"inputs": {"comparisons": data, "sha256": sha256(data), "dtype": setting}, "outputs": outputs}

    def _rm(self, name: str) -> dict:
        out = self.dir / name
        if self.cfg.train_rms == "when_used" and self.n > 1 and POLICY_METHODS[self.cfg.method(self.n)].consumes == "comparisons":
            latest = self.p.rm_dir(name, self.n - 1)
            return {"inputs": {"train_rms": "when_used", "method": self.cfg.method(self.n)},
                    "outputs": {"skipped": f"{self.cfg.method(self.n)} learns from the comparisons; using {latest}",
                                "path": str(latest)}}
        files = self.p.comparison_files(self.n)
        base = list(self.cfg.comparisons)
        start_at = []
        start = self.p.trained_rm(name, self.n - 1) if self.cfg.rm_start == "previous" and self.n > 1 else None
        if start is not None:  # warm start: the latest trained RM learns the labels it has not seen
            trained_in, start_dir = start
            seen = set(self.p.comparison_files(trained_in))
            files, base = [f for f in files if f not in seen], []
            if not files:
                raise RuntimeError(f"round {self.n}: rm_start=previous, but no round since round {trained_in} (whose {name} "
                                   f"this one would start from) exported labels to train on")
            start_at.append(f"model.name={start_dir}")
        sources = [*base, *(DataSource(f) for f in files)]
        spec = getattr(self.cfg, name)
        summary = run_stage("rm", spec, out, [f"data.sources={_sources(sources)}", f"run.seed={self.cfg.seed}"], last=start_at)
        return {"inputs": {"config": spec.config, "start": str(start[1]) if start else "base",
                           "comparisons": [to_dict(s) for s in base] + [{"path": f, "sha256": sha256(f)} for f in files]},
                "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    def rm_helpful(self) -> dict:
        return self._rm("rm_helpful")

    def rm_safety(self) -> dict:
        return self._rm("rm_safety")

    def policy(self, out: Path | None = None, last: Sequence[str] = ()) -> dict:
        """The round's policy stage into ``round-<n>/policy`` (``out``: elsewhere, e.g. a control; ``last``: overrides that
        win over the config's, e.g. the control's ``sampling.pick=random``)."""
        method = POLICY_METHODS[self.cfg.method(self.n)]
        start = self.p.current_policy(before=self.n) if self.n > 1 else self.p.sft_model()
        out = out or self.dir / "policy"
        spec = self.cfg.spec(method.name)
        overrides = [f"model.name={start}", f"run.seed={self.cfg.seed}"]
        inputs: dict[str, Any] = {"method": method.name, "config": spec.config, "start": start}
        if method.consumes == "reward":  # the round's reward models; prompts from the project's pool, never a held-out one
            src = {"path": str(self.p.pool_path), **({"limit": spec.prompts} if spec.prompts else {})}
            overrides += [f"reward.helpful={self.p.rm_dir('rm_helpful', self.n)}",
                          f"reward.safety={self.p.rm_dir('rm_safety', self.n)}", f"data.sources=[{json.dumps(src)}]"]
            inputs["prompts"] = src
            if method.name in ("ppo", "grpo") and self.p.validation_path.is_file():  # keep-best reads the validation set
                overrides.append(f"data.val_sources=[{json.dumps({'path': str(self.p.validation_path)})}]")
                inputs["validation"] = str(self.p.validation_path)
        else:  # comparisons: this round's new ones (a round that sampled none: the base comparisons)
            export = self.p.manifest(self.n)["steps"].get("export", {})
            files = [export["outputs"]["path"]] if export.get("status") == "done" else []
            sources = [DataSource(f) for f in files] or list(self.cfg.comparisons)
            overrides.append(f"data.sources={_sources(sources)}")
            inputs["comparisons"] = [to_dict(s) for s in sources]
        if method.pool:  # the latest earlier pool only: each pool.jsonl already holds every round before it
            pools = [str(self.p.round_dir(k) / "policy" / "pool.jsonl") for k in range(1, self.n)
                     if (self.p.round_dir(k) / "policy" / "pool.jsonl").is_file()][-1:]
            overrides += [f"pool.round={self.n}", f"pool.previous={json.dumps(pools)}"]
            inputs["previous_pools"] = pools
        summary = run_stage(method.name, spec, out, overrides, last)
        return {"inputs": {**inputs, **({"last": list(last)} if last else {})},
                "outputs": {"path": str(out), "metrics": _scalars(summary)}}

    def eval(self) -> dict:
        from alignment.evals import report
        from alignment.evals.suite import RoundEval

        result = RoundEval(self.p, self.n).run()
        try:
            paths = report.build(self.p.dir, overwrite=True)
            result["outputs"]["report"] = str(paths["markdown"])
        except FileNotFoundError as exc:
            log.warning("report: %s", exc)
        return result

    def promote(self) -> dict:
        cfg = self.cfg.promote
        evals = self.p.manifest(self.n)["steps"]["eval"]["outputs"]
        if cfg.mode == "manual":
            return {"inputs": {"mode": "manual"}, "outputs": {"promoted": False, "reason": "manual mode: `align round promote`"}}
        from data.splits import selecting

        with selecting(f"round {self.n}'s promotion"):
            return self._promote(cfg, evals)

    def _promote(self, cfg: Any, evals: dict) -> dict:
        promoted, reasons = True, []
        returned = self.p.manifest(self.n)["steps"].get("policy", {}).get("outputs", {}).get("metrics", {}).get("returned")
        if returned == "start":  # keep-best found no checkpoint better than where the method started: nothing changed
            return {"inputs": {"mode": "auto", "rule": to_dict(cfg)},
                    "outputs": {"promoted": False, "no_change": True,
                                "reason": "no change: the policy step returned its starting policy (no checkpoint beat it on "
                                          "validation prompts by the selection rule)"}}
        # the decision reads the validation prompts; a project made before they existed has only its test prompts
        val = (evals.get("validation") or {}).get("winrate_vs_previous")
        wr = (val or evals.get("winrate_vs_previous") or {}).get("win_rate")
        where = (f"on {evals['validation']['n']} validation prompts" if val
                 else "on the test prompts (this project has no validation set)")
        if wr is not None:
            ok = wr >= cfg.min_winrate
            promoted &= ok
            reasons.append(f"win rate vs previous {100 * wr:.1f}% {'>=' if ok else '<'} {100 * cfg.min_winrate:.0f}% {where}")
        # ToxiGen: the validation draw when this round's eval and the one it compares with both continued it; a project
        # made before the draw existed has only the reported prompts
        now, before = evals.get("toxigen") or {}, self._previous_toxigen()
        split = "validation" if now.get("validation") and before.get("validation") else "test"
        tox = (now.get("validation") if split == "validation" else now).get("pct_toxic")
        prev = (before.get(split) or {}).get("pct_toxic")
        if tox is not None and prev is not None:
            ok = tox <= prev + cfg.max_toxigen_increase
            reason = f"ToxiGen {tox:.1f}% vs {prev:.1f}% before " + (
                "on the validation draw" if split == "validation" else "on the reported prompts (no ToxiGen validation draw)")
            rows = self.dir / "eval" / ("toxigen_validation_rows.jsonl" if split == "validation" else "toxigen_rows.jsonl")
            prev_rows = before[split]["rows"]
            if not ok and cfg.toxigen_test == "paired" and rows.is_file() and prev_rows.is_file():
                from alignment.evals.toxigen import paired_change
                from data.loaders import read_rows

                test = paired_change([r for _, r in read_rows(prev_rows)], [r for _, r in read_rows(rows)])
                ok = test["p_value"] >= cfg.toxigen_alpha
                reason += (f": {test['worse']} prompts more toxic, {test['better']} less of {test['n']}, sign test "
                           f"p={test['p_value']:.3f} ({'not significant' if ok else 'significant'} at {cfg.toxigen_alpha:g})")
            elif not ok and cfg.toxigen_test == "paired":
                reason += ": no per-prompt rows to test, compared as points"
            promoted &= ok
            reasons.append(f"{reason} ({'ok' if ok else 'worse'})")
        if evals.get("dtype_differs_from"):  # an explicit eval.dtype changed mid-project (RoundEval.run warned)
            reasons.append(f"note: this round evaluated in {evals.get('dtype')}, round(s) "
                           f"{', '.join(map(str, evals['dtype_differs_from']))} in another dtype: the ToxiGen check "
                           "compared results of two dtypes")
        return {"inputs": {"mode": "auto", "rule": to_dict(cfg)},
                "outputs": {"promoted": promoted, "reason": "; ".join(reasons) or "no evaluations to check"}}

    def _previous_toxigen(self) -> dict[str, dict]:
        """ToxiGen of the current policy before this round, the last promoted round's, else the SFT model's:
        ``{"test": {"pct_toxic", "rows"}, "validation": {...}}`` (no ``validation`` when that eval did not continue the
        validation draw)."""
        for k in range(self.n - 1, 0, -1):
            m = self.p.manifest(k)["steps"]
            if m.get("promote", {}).get("outputs", {}).get("promoted"):
                summary, folder = (m.get("eval", {}).get("outputs", {}).get("toxigen") or {}), self.p.round_dir(k) / "eval"
                break
        else:
            first = self.p.manifest(1)["steps"].get("eval", {}).get("outputs", {})
            summary, folder = (first.get("toxigen_sft") or {}), self.p.round_dir(1) / "eval" / "sft"
        out = {"test": {"pct_toxic": summary.get("pct_toxic"), "rows": folder / "toxigen_rows.jsonl"}}
        if (summary.get("validation") or {}).get("pct_toxic") is not None:
            out["validation"] = {"pct_toxic": summary["validation"]["pct_toxic"],
                                 "rows": folder / "toxigen_validation_rows.jsonl"}
        return out


def draw_prompts(pool: Sequence[Any], used: set[str], k: int, safety_share: float | None, *, seed: int) -> list[Any]:
    """``k`` prompts not in ``used`` (keys: the prompt's messages as sorted JSON), distinct, seeded;
    ``safety_share`` of them from safety prompts when the pool has enough."""
    from data.heldout import draw

    return draw(pool, k, safety_share, seed=seed, used=used)


# ---------------------------------------------------------------------------------------------
