"""Driving rounds: the next step, running steps until one waits for people, promotion by hand, status."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignment.evals.suite import BENCHMARKS
from alignment.rounds.config import WAITING
from alignment.rounds.project import Project, lock_holder, now, project_lock
from alignment.rounds.steps import Steps

log = logging.getLogger("alignment.rounds")

# driving


def current_round(p: Project) -> int:
    """The round to work on: the last one with pending steps, or the next one."""
    rounds = p.rounds()
    if not rounds:
        return 1
    last = rounds[-1]
    return last if p.pending(last) else last + 1


def next_step(p: Project, *, start_new: bool = True) -> tuple[int, str] | None:
    n = current_round(p)
    if n not in p.rounds() and not start_new:
        return None
    return n, p.pending(n)[0]


HEARTBEAT_S = 5.0  # how often a running step touches its heartbeat file (the end of an attempt that was killed)


def heartbeat_path(p: Project, n: int, step: str) -> Path:
    return p.round_dir(n) / f".{step}.alive"


class _Heartbeat:
    """Touches ``path`` every ``every`` seconds while a step runs, so that an attempt killed without a word (a session's
    end, an OOM kill, ^C twice) still leaves when it was last alive: the next attempt records how long it ran."""

    def __init__(self, path: Path, every: float = HEARTBEAT_S) -> None:
        self.path, self.every, self._stop = path, every, threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {path.name}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.path.touch()
            except OSError:  # the round folder went away under us: nothing to record
                return

    def __enter__(self) -> _Heartbeat:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _interrupted(p: Project, n: int, step: str, record: dict) -> list[dict]:
    """Earlier attempts of ``step`` that did not finish: the ones carried in ``record``, plus ``record`` itself when it
    failed or still says "running" (with the project lock held nobody else runs it: it was killed)."""
    attempts = list(record.get("interrupted", []))
    if record.get("status") == "running":
        started = dt.datetime.fromisoformat(record["started_at"]).timestamp()
        beat = heartbeat_path(p, n, step)
        alive = max(beat.stat().st_mtime, started) if beat.is_file() else started
        attempts.append({"started_at": record["started_at"], "last_alive_at": _iso(alive), "pid": record.get("pid"),
                         "seconds": round(alive - started, 1)})
        log.warning("round %d: step %s: an earlier attempt (pid %s, started %s) stopped without finishing after ~%.0f s; "
                    "running it again (its time is kept in the manifest)", n, step, record.get("pid"),
                    record["started_at"], alive - started)
        beat.unlink(missing_ok=True)
    elif record.get("status") == "failed":
        attempts.append({"started_at": record["started_at"], "failed_at": record.get("failed_at"), "pid": record.get("pid"),
                         "seconds": record["seconds"], "error": record.get("error")})
    return attempts


def run_step(p: Project, n: int, step: str) -> str:
    """Run one step and record it. Returns "done" or WAITING.

    The manifest says "running" from the step's start on; an attempt that dies leaves that record (and its heartbeat
    file), and the next attempt keeps it under ``interrupted`` with the seconds it ran, so a step's cost over a kill and
    a resume is ``seconds`` + the interrupted attempts' (``seconds_all_attempts``), never silently the last attempt's."""
    with project_lock(p):
        m = p.manifest(n)
        interrupted = _interrupted(p, n, step, m["steps"].get(step, {}))
        started = time.time()
        m["steps"][step] = {"status": "running", "started_at": _iso(started), "pid": os.getpid(),
                            **({"interrupted": interrupted} if interrupted else {})}
        p.save_manifest(n, m)  # the round exists from its first step on
        log.info("round %d: step %s", n, step)
        try:
            with _Heartbeat(heartbeat_path(p, n, step)):
                result = getattr(Steps(p, n), step)()
        except BaseException as exc:  # a failed stage, ^C: recorded, so that status does not say "running"
            m = p.manifest(n)
            m["steps"][step] = {"status": "failed", "started_at": _iso(started), "failed_at": now(),
                                "seconds": round(time.time() - started, 1), "pid": os.getpid(),
                                "error": f"{type(exc).__name__}: {exc}"[:500],
                                **({"interrupted": interrupted} if interrupted else {})}
            p.save_manifest(n, m)
            raise
        extra = ({"interrupted": interrupted,
                  "seconds_all_attempts": round(time.time() - started + sum(a["seconds"] for a in interrupted), 1)}
                 if interrupted else {})
        m = p.manifest(n)
        if result == WAITING:
            m["steps"][step] = {"status": WAITING, "checked_at": now(), **extra}
            p.save_manifest(n, m)
            return WAITING
        m["steps"][step] = {"status": "done", "started_at": _iso(started), "finished_at": now(),
                            "seconds": round(time.time() - started, 1), **extra, **result}
        if step == "promote":
            m["promoted"] = result["outputs"]["promoted"]
            m["policy"] = p.policy_of(n)
        p.save_manifest(n, m)
        return "done"


def run(p: Project, *, max_steps: int | None = None, stop: Callable[[int, str], bool] | None = None) -> str:
    """Run steps until one waits for people, ``rounds`` rounds are done, or ``max_steps`` ran."""
    with project_lock(p):
        return _run(p, max_steps=max_steps, stop=stop)


def _run(p: Project, *, max_steps: int | None, stop: Callable[[int, str], bool] | None) -> str:
    steps = 0
    while max_steps is None or steps < max_steps:
        n = current_round(p)
        if n > p.cfg.rounds:
            return "done"
        step = p.pending(n)[0]
        if stop is not None and stop(n, step):
            return "stopped"
        if run_step(p, n, step) == WAITING:
            return WAITING
        steps += 1
    return "stopped"


def promote(p: Project, n: int) -> dict:
    """Promote round ``n``'s policy by hand (the next round samples from it)."""
    with project_lock(p):
        return _promote(p, n)


def _promote(p: Project, n: int) -> dict:
    m = p.manifest(n)
    if m["steps"].get("policy", {}).get("status") != "done":
        raise ValueError(f"round {n} has no finished policy to promote (steps pending: {', '.join(p.pending(n)) or 'none'})")
    for k in p.rounds():  # a later round's promotion would hide it
        if k > n and p.manifest(k)["steps"].get("promote", {}).get("outputs", {}).get("promoted"):
            raise ValueError(f"round {k} (later) is promoted; promoting round {n} would not change the current policy")
    m["steps"]["promote"] = {"status": "done", "finished_at": now(), "inputs": {"mode": "manual"},
                             "outputs": {"promoted": True, "reason": "promoted by hand"}}
    m["promoted"], m["policy"] = True, p.policy_of(n)
    p.save_manifest(n, m)
    return m


def status(p: Project) -> dict:
    """Where each round stands (JSON-ready)."""
    try:
        dtype = p.eval_dtype()
    except ValueError as exc:  # evaluated in bf16, looked at on a machine without it: status still reports
        dtype = f"bfloat16, which this machine cannot continue in ({exc})"
    out: dict[str, Any] = {"project": str(p.dir), "current_policy": p.current_policy(), "eval_dtype": dtype, "rounds": []}
    for n in p.rounds():
        m = p.manifest(n)
        steps = m["steps"]
        row = {"round": n, "method": m.get("method"), "done": [s for s in p.steps(n) if steps.get(s, {}).get("status") == "done"],
               "pending": p.pending(n), "promoted": m.get("promoted")}
        metrics: dict[str, Any] = {}
        for rm in ("rm_helpful", "rm_safety"):
            rm_metrics = steps.get(rm, {}).get("outputs", {}).get("metrics", {})
            if rm_metrics.get("held_out_accuracy") is not None:  # with its n: a handful of validation pairs is noise
                metrics[f"{rm}_accuracy"] = rm_metrics["held_out_accuracy"]
                metrics[f"{rm}_accuracy_n"] = rm_metrics.get("held_out_pairs")
            before = steps.get("rm_before", {}).get("outputs", {}).get(rm, {})
            if before.get("accuracy") is not None:
                metrics[f"{rm}_accuracy_on_new_before_training"] = before["accuracy"]
                metrics[f"{rm}_accuracy_on_new_before_training_n"] = before.get("n")
        pol = steps.get("policy", {}).get("outputs", {}).get("metrics", {})
        for k in ("reward_before", "reward_after", "eval_reward_baseline", "eval_reward_best", "returned"):
            if pol.get(k) is not None:
                metrics[f"policy_{k}"] = pol[k]
        if pol.get("returned") == "start":
            metrics["policy_returned"] = "start (no change: no checkpoint beat the starting policy on validation prompts)"
        ev = steps.get("eval", {}).get("outputs", {})
        for bench in BENCHMARKS:
            if ev.get(bench.name) and "skipped" not in ev[bench.name]:
                metrics.update({f"{bench.name}_{k}": v for k, v in bench.load().headline(ev[bench.name]).items()})
        if steps.get("eval", {}).get("status") == "done":  # what its numbers were computed in (fp32 before evals said)
            metrics["eval_dtype"] = ev.get("dtype", "float32") + (
                f" (round(s) {', '.join(map(str, ev['dtype_differs_from']))} in another)" if ev.get("dtype_differs_from") else "")
        gold = (ev.get("gold_reward") or {}).get("policy")
        if gold:
            metrics["gold_reward"] = f"{gold['mean']:.4f} [{gold['ci_low']:.4f}, {gold['ci_high']:.4f}] (n={gold['n']})"
        def show(v: dict) -> str:
            text = (f"{100 * v['win_rate']:.1f}% [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}] "
                    f"(n={v['n']}, ties {100 * v['ties']:.0f}%)")
            if v.get("lc_win_rate") is not None:
                text += (f"; length-controlled {100 * v['lc_win_rate']:.1f}% [{100 * v['lc_ci_low']:.1f}, "
                         f"{100 * v['lc_ci_high']:.1f}], mean {v['mean_chars']:.0f} vs {v['baseline_mean_chars']:.0f} chars")
            return text

        for k, v in ev.items():
            if k.startswith("winrate_") and k != "winrate_vs_previous":
                metrics[f"test_{k}"] = show(v)
        val = (ev.get("validation") or {}).get("winrate_vs_previous")
        if val:
            metrics["validation_winrate_vs_previous"] = f"{show(val)} by {val['judge']}: what promotion reads"
        row["metrics"] = metrics
        holder = None
        for name, rec in steps.items():
            if rec.get("status") == "running":
                holder = holder or lock_holder(p) or ""
                row.setdefault("unfinished", {})[name] = (
                    f"running since {rec['started_at']} ({holder})" if holder else
                    f"stopped without finishing (pid {rec.get('pid')}, started {rec['started_at']}): the next run "
                    f"runs it again")
            elif rec.get("status") == "failed":
                row.setdefault("unfinished", {})[name] = f"failed at {rec.get('failed_at')}: {rec.get('error')}"
            if rec.get("interrupted"):
                row.setdefault("interrupted", {})[name] = {
                    "attempts": len(rec["interrupted"]), "seconds": round(sum(a["seconds"] for a in rec["interrupted"]), 1)}
        if "annotate" in row["pending"] and steps.get("sample", {}).get("status") == "done":
            from data.store import AnnotationStore

            store = AnnotationStore(p.db_url())
            row["labels_missing"] = store.missing_labels(n)
            waits = store.task_waits(n)
            row["waiting_for"] = [{"task": w.uid, "why": w.why()} for w in waits if not w.settled]
            row["settled_short"] = [{"task": w.uid, "why": w.why()} for w in waits if w.settled]
            row["annotators"] = store.active_annotators()
            flags = f"--project {p.dir.name}{p.root_flag()}"
            row["commands"] = ([f"align annotate add-user NAME {flags}   # for each annotator (asks for a password)"]
                               if not row["annotators"] else []) + [
                f"align annotate serve {flags}   # annotators log in and label",
                f"align round status {flags}   # what the round still waits for",
                f"align round run {flags}   # continues once every task is labelled or settled"]
        out["rounds"].append(row)
    nxt = next_step(p)
    out["next"] = None if nxt[0] > p.cfg.rounds else {"round": nxt[0], "step": nxt[1]}
    return out


def format_status(s: dict) -> str:
    dtype = s.get("eval_dtype", "auto")
    lines = [f"project {s['project']}; current policy: {s['current_policy']}; evaluations in {dtype}"
             + (" (resolved by this machine at the first eval)" if dtype == "auto" else "")]
    for r in s["rounds"]:
        state = "complete" if not r["pending"] else f"next: {r['pending'][0]}"
        promoted = {True: ", promoted", False: ", not promoted"}.get(r["promoted"], "")
        lines.append(f"round {r['round']} ({r['method']}): {len(r['done'])}/{len(r['done']) + len(r['pending'])} "
                     f"steps, {state}{promoted}")
        if r.get("waiting_for") is not None and (r["waiting_for"] or r.get("labels_missing")):
            team = ", ".join(r["annotators"]) or "no annotator accounts yet"
            lines.append(f"  waiting for people: {r['labels_missing']} labels missing on {len(r['waiting_for'])} tasks "
                         f"(active annotators: {team})")
            for w in r["waiting_for"][:10]:
                lines.append(f"    task {w['task']}: {w['why']}")
            if len(r["waiting_for"]) > 10:
                lines.append(f"    ... and {len(r['waiting_for']) - 10} more (align annotate waits --round {r['round']})")
            for w in r["settled_short"]:
                lines.append(f"    task {w['task']}: {w['why']}")
            lines += [f"  {c}" for c in r["commands"]]
        for step, why in r.get("unfinished", {}).items():
            lines.append(f"  step {step}: {why}")
        for step, att in r.get("interrupted", {}).items():
            lines.append(f"  step {step}: {att['attempts']} earlier attempt(s) stopped or failed after "
                         f"{att['seconds']:.0f} s in all (kept in the manifest under `interrupted`)")
        for k, v in r["metrics"].items():
            lines.append(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    lines.append(f"next: round {s['next']['round']} step {s['next']['step']}" if s["next"] else "all configured rounds are done")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
