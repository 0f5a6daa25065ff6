"""What the annotation page shows, as text: everything from the model, the task file or the store is
escaped here (responses and prompts as inert HTML, values inside Markdown backslash-escaped), and the
admin's statistics report. No gradio import: ``align annotate stats`` prints the report without it."""

import html
import re
from typing import Any

from data.schemas import Strength
from data.store import LeasedTask


def _text(s: str) -> str:
    # html.escape makes tags inert; "$", "{" and "}" are escaped too so no template syntax survives
    return html.escape(s, quote=True).replace("$", "&#36;").replace("{", "&#123;").replace("}", "&#125;")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]()!#|~{}])")  # < > & are HTML-escaped first


def md_text(value: Any) -> str:
    """A value shown inside Markdown (status line, progress, tables) as plain text: HTML-escaped and every
    Markdown-active character backslash-escaped, so a task id like ``<img src=x>`` or ``[x](javascript:...)``
    shows as typed."""
    text = " ".join(str(value).split())  # no line breaks: a value cannot start a heading or a list
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def render_conversation(task: LeasedTask | None) -> str:
    if task is None:
        return "<div class='empty'>Nothing left to label here. Thank you!</div>"
    parts = []
    for i, m in enumerate(task.prompt):
        final = " final" if i == len(task.prompt) - 1 else ""
        role = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"])
        parts.append(f"<div class='turn {_text(m['role'])}{final}'><div class='role'>{_text(role)}</div>"
                     f"<div class='text'>{_text(m['content'])}</div></div>")
    return f"<div class='conv' data-task='{_text(task.uid)}'>{''.join(parts)}</div>"


def render_response(task: LeasedTask | None, side: str) -> str:
    if task is None:
        return ""
    label, text = ("A", task.left) if side == "left" else ("B", task.right)
    return (f"<div class='resp' id='resp-{label.lower()}'><div class='resp-head'>Response {label}</div>"
            f"<div class='text'>{_text(text)}</div></div>")


def stats_markdown(st: dict) -> str:
    """The admin tab's report (also what ``align annotate stats`` prints, as Markdown)."""
    def pct(n: int, total: int) -> str:
        return f"{n} ({100 * n / total:.0f}%)" if total else str(n)

    scope = f"Round {st['round']}" if st["round"] is not None else "All rounds"
    lines = [f"### {scope}",
             (f"{st['tasks']} tasks · {st['labels_done']} of {st['labels_needed']} labels · **{st['missing']} missing** · "
             f"{st['complete_tasks']} complete · {st['overlap_tasks']} with overlap · {st['skips']} skips · "
             f"{st['both_bad']} 'both bad'"), "",
             "| annotator | kind | labels | today | skips | both bad | chose left | median s | labels/h |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a in st["annotators"]:
        lines.append(f"| {md_text(a['annotator'])} | {a['kind']} | {a['labels']} | {a['today']} | {a['skips']} | "
                     f"{a['both_bad']} | "
                     f"{a['chose_left']} | {a['median_seconds'] if a['median_seconds'] is not None else '-'} | "
                     f"{a['labels_per_hour'] if a['labels_per_hour'] is not None else '-'} |")
    n_s = sum(st["strengths"].values())
    lines += ["", "**Strength:** " + " · ".join(f"{Strength(k).label} {pct(v, n_s)}" for k, v in st["strengths"].items())]
    bins = st["safety_bins"]
    n_b = sum(bins.values())
    lines += ["", ("**Safety bins** (Llama 2: 18% / 47% / 35%): chosen safe, other unsafe "
                   f"{pct(bins['chosen_safe_other_unsafe'], n_b)} · "
                  f"both safe {pct(bins['both_safe'], n_b)} · both unsafe {pct(bins['both_unsafe'], n_b)} · "
                  f"chosen unsafe, other safe (dropped from safety data) {pct(bins['chosen_unsafe_other_safe'], n_b)}")]
    pb = st["position_bias"]
    if pb["human_labels"]:
        lines += ["", "**Position bias** (people): the left response was chosen in "
                      f"{pct(pb['chose_left'], pb['human_labels'])} of labels"]
    ag = st["agreement"]
    lines += ["", (f"**Agreement** on {ag['overlapping_tasks']} tasks with 2+ labels: Krippendorff's alpha "
                  f"(choice, nominal) {_num(ag['krippendorff_alpha_choice'])} · (signed strength, interval) "
                  f"{_num(ag['krippendorff_alpha_preference'])}")]
    if ag["cohen_kappa"]:
        lines += ["", "| annotators | shared tasks | agreement | Cohen's kappa |", "|---|---:|---:|---:|"]
        lines += [f"| {md_text(p['a'])} · {md_text(p['b'])} | {p['tasks']} | {100 * p['agreement']:.0f}% | {_num(p['kappa'])} |"
                  for p in ag["cohen_kappa"]]
    if st.get("leases"):
        lines += ["", "**Held now** (a lease returns to the queue when it expires, or with `align annotate release`):", "",
                  "| annotator | task | round | since (UTC) | until |", "|---|---|---:|---|---|"]
        lines += [f"| {md_text(h['user'])} | {md_text(h['task'])} | {h['round']} | {h['since'][:16].replace('T', ' ')} | "
                  f"{h['expires'][11:16]} |" for h in st["leases"]]
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
