"""The annotation web app (Gradio 6). It only calls :class:`data.store.AnnotationStore`.

Length (~570 lines): one page (layout, CSS, keyboard JS, callbacks) that must be read together; security is ui/security.py.

    align annotate serve --db sqlite:///runs/annotations.db --host 127.0.0.1 --port 7860 \\
        --guidelines configs/guidelines.md

The annotator's page: log in (users from the store; the name comes from the session, never from
a form), then one task at a time: the conversation so far, responses A and B side by side (their
left/right order randomised per assignment; the store keeps the true identity), which is better,
how much (Llama 2's four levels), a safety label for each response, "both are bad", a comment;
skip with a reason; undo the last submission (two clicks: the first asks). The label is committed
before the next task is shown. Keyboard: ``a``/``b`` choose, ``1``-``4`` strength, ``q``/``w``
response A safe/unsafe, ``o``/``p`` response B safe/unsafe, ``Enter`` (or ``Ctrl+Enter`` in the
comment) submits, also when the Undo or Skip button has the focus; ``u`` twice undoes. A refused
action (nothing chosen, nothing to undo, a task that is no longer yours) shows one inline message
in the status line and leaves the form as it was.

Model outputs are shown as text: every response and prompt is HTML-escaped before it reaches the
page, so markup or scripts in them are displayed, never run.

Admins also get an "Admin" tab: progress, per-annotator counts and speed, the strength and safety
bin distributions, position bias, agreement (Cohen's kappa per pair, Krippendorff's alpha), and
an export button. Every admin handler checks the role on the server; hiding the tab is only
cosmetic.

API (what the page calls; also usable with ``gradio_client.Client(url, auth=(user, password))``):
``/load`` -> the current task, ``/submit``, ``/skip``, ``/undo`` (call it twice), ``/next_task``, ``/change_label``,
``/renew`` (keeps the task held: the open page calls it every quarter of ``--page-lease-seconds``; a script that
takes longer than that between ``/load`` and ``/submit`` calls it too, or its task may go to someone else),
``/admin_stats``, ``/export`` (admins; left out of an annotator's ``/gradio_api/info``).
A refused annotator action returns its message in the status output (index 12, starting with "⚠️")
and leaves every other output unchanged.
"""

import atexit
import functools
import html
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from data.schemas import Strength
from data.store import AnnotationError, AnnotationStore, Judgement, LeasedTask

log = logging.getLogger(__name__)

CHOICES = ["A", "B"]
UNDO_LABEL, UNDO_CONFIRM, UNDO_CONFIRM_SECONDS = "Undo last submission", "Confirm undo", 15
EDIT_PREFIX = "edit:"  # the form's token while an earlier label is being changed
EDIT_TOKEN = re.compile(r"edit:(\d{1,18})")
RECENT_LABELS = 10  # "My recent labels" offers (and the server lets change) this many of the annotator's newest labels
PAGE_HOLD_SECONDS = 180.0  # a task on a page that stops renewing (closed, asleep) returns to the queue after this
ADMIN_ENDPOINTS = ("/admin_stats", "/export")  # left out of the API description an annotator can read
N_OUTS, STATUS_AT = 18, 12  # what every annotator action returns, where its status line is (build_app's ``outs``)
STRENGTHS = [(s.label, s.value) for s in Strength]
SAFETY = [("Safe", "safe"), ("Unsafe", "unsafe")]
SKIP_REASONS = ["I lack the expertise for this topic", "The prompt is unclear or broken", "A response is unreadable or truncated",
                "Offensive content I prefer not to judge", "Other"]
DEFAULT_GUIDELINES = Path(__file__).resolve().parents[1] / "configs" / "guidelines.md"

CSS = """
.conv, .resp {font-size: 15px; line-height: 1.45;}
.turn {margin: 0 0 10px 0; padding: 8px 12px; border-radius: 8px; border: 1px solid var(--border-color-primary);}
.turn.user {background: var(--background-fill-secondary);}
.turn.final {border-width: 2px; border-color: var(--color-accent);}
.role {font-weight: 600; font-size: 12px; text-transform: uppercase; opacity: .7; margin-bottom: 4px;}
.text {white-space: pre-wrap; overflow-wrap: anywhere;}
.resp {padding: 10px 14px; border-radius: 8px; border: 1px solid var(--border-color-primary); min-height: 120px;}
.resp-head {font-weight: 700; font-size: 18px; margin-bottom: 6px;}
.empty {padding: 24px; text-align: center; font-size: 17px;}
.keys {font-size: 12px; opacity: .75;}
/* Fits a 1280x800 window: the prompt and the two responses scroll inside fixed-height panes (as in Label Studio and
   Argilla), the choice, strength and Submit stay on screen. */
#context {max-height: 15vh; overflow-y: auto;}
#left .resp, #right .resp {height: 30vh; min-height: 0; overflow-y: auto;}
#controls {position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
           border-top: 1px solid var(--border-color-primary); padding-top: 4px;}
/* A phone: A and B stack with shorter panes; the controls are a bar fixed to the bottom of the screen (sticky does
   not hold inside Gradio's stacked columns) and the page leaves room to scroll everything above it. */
@media (max-width: 640px) {
  #left .resp, #right .resp {height: 22vh;}
  #context {max-height: 12vh;}
  #controls {position: fixed; left: 0; right: 0; bottom: 0; margin: 0; padding: 4px 8px; gap: 4px; max-height: 48vh;
             overflow-y: auto; box-shadow: 0 -2px 10px rgba(0, 0, 0, .18);}
  #controls .block {padding: 4px 8px;}
  body {padding-bottom: 50vh;}
}
/* No keyboard hint on touch screens. */
@media (hover: none) and (pointer: coarse) { .keys {display: none;} }
"""

# Keyboard shortcuts: click the same controls a mouse would (the radio inputs inside each group).
JS = r"""
() => {
  const pick = (id, value) => {
    const el = document.querySelector(`#${id} input[type=radio][value="${value}"]`);
    if (el) { el.click(); }
  };
  const click = (id) => { const b = document.getElementById(id); if (b && !b.disabled) { b.click(); } };
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    const typing = t && (t.tagName === 'TEXTAREA' || (t.tagName === 'INPUT' && t.type !== 'radio' && t.type !== 'checkbox'));
    if (typing) {
      if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); click('submit-btn'); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    if (e.key === 'Enter' && t && t.tagName === 'BUTTON') {
      // Enter submits the label. On the focused Undo or Skip button (e.g. after clicking it) the browser
      // would press that button instead; other buttons (tabs, admin) keep their own Enter.
      if (t.id === 'undo-btn' || t.id === 'skip-btn') { e.preventDefault(); click('submit-btn'); }
      return;
    }
    const strengths = ['significantly_better', 'better', 'slightly_better', 'negligibly_better'];
    const k = e.key.toLowerCase();
    if (k === 'a' || k === 'b') { pick('choice', k.toUpperCase()); }
    else if (['1', '2', '3', '4'].includes(k)) { pick('strength', strengths[Number(k) - 1]); }
    else if (k === 'q') { pick('safe-a', 'safe'); }
    else if (k === 'w') { pick('safe-a', 'unsafe'); }
    else if (k === 'o') { pick('safe-b', 'safe'); }
    else if (k === 'p') { pick('safe-b', 'unsafe'); }
    else if (k === 'enter') { click('submit-btn'); }
    else if (k === 'u') { click('undo-btn'); }
    else { return; }
    e.preventDefault();
  });
}
"""

KEYS_HELP = ("Keys: <b>a</b>/<b>b</b> choose · <b>1</b>-<b>4</b> strength · <b>q</b>/<b>w</b> A safe/unsafe · "
             "<b>o</b>/<b>p</b> B safe/unsafe · <b>Enter</b> submit (Ctrl+Enter in the comment) · <b>u u</b> undo")


# ---------------------------------------------------------------------------------------------
# rendering: everything from the model or the task file is escaped here


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


# ---------------------------------------------------------------------------------------------


def build_app(store: AnnotationStore, *, guidelines: str = "", round: int | None = None,
              export_dir: str | Path | None = None, max_comment_chars: int = 5000, max_reason_chars: int = 500,
              page_hold: float | None = PAGE_HOLD_SECONDS) -> Any:
    """The Blocks app; launch it with :func:`launch` (login, CSS and keyboard shortcuts are set there).
    A comment or a skip reason longer than ``max_comment_chars`` / ``max_reason_chars`` is refused.

    A task shown on a page is held for ``page_hold`` seconds, and the open page renews that every
    ``page_hold / 4`` s (``/renew``), up to the store's lease (``--lease-minutes``) after it was handed out:
    a page that was only opened, then closed, gives its task back within ``page_hold`` seconds.
    ``None``: the store's full lease, no renewal."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    export_dir = Path(export_dir) if export_dir else Path("runs/annotations/exports")
    downloads = Path(tempfile.mkdtemp(prefix="align-export-"))  # the admin's download copies: one at a time
    atexit.register(shutil.rmtree, downloads, ignore_errors=True)

    def user_of(request: gr.Request) -> str:
        name = getattr(request, "username", None)
        if not name:
            raise gr.Error("Not logged in.")
        return name

    def admin_of(request: gr.Request) -> str:
        name = user_of(request)
        info = store.user(name)
        if info is None or not info.is_admin or not info.active:
            raise gr.Error("Admins only.")
        return name

    def progress_md(name: str) -> str:
        p = store.progress(name, round=round, max_age=2.0)  # the round's total may lag by 2 s; the user's own counts are exact
        scope = f"round {round}" if round is not None else "all rounds"
        return (f"**{md_text(name)}** · done today: **{p.done_today}** · remaining in {scope}: **{p.missing}** labels "
                f"({p.available} {'task' if p.available == 1 else 'tasks'} open to you)")

    def task_outputs(name: str, task: LeasedTask | None, status: str) -> tuple:
        return (render_conversation(task), render_response(task, "left"), render_response(task, "right"),
                task.token if task else "", None, None, None, None, False, "", None, progress_md(name), status,
                gr.Button(interactive=task is not None), gr.Button(interactive=task is not None),
                gr.Button(value=UNDO_LABEL), 0.0, gr.Dropdown(choices=recent_choices(name), value=None))

    def recent_choices(name: str) -> list[tuple[str, str]]:
        out = []
        for r in store.recent_labels(name, RECENT_LABELS, round=round):
            prompt = " ".join(r.prompt.split())
            prompt = prompt if len(prompt) <= 48 else prompt[:47] + "…"
            strength = Strength(r.strength).label if r.strength else "-"
            closed = "" if r.changeable else " · round closed"
            out.append((f"#{r.label_id} · {r.created_at:%H:%M} · {prompt} · {strength}{closed}", str(r.label_id)))
        return out

    def refused(message: str) -> tuple:
        """A refused action: one inline message, every other output left as it is (raising gr.Error
        would cover each output with an error overlay and block the form)."""
        return (*[gr.skip()] * STATUS_AT, f"⚠️ {message}", gr.skip(), gr.skip(), gr.Button(value=UNDO_LABEL), 0.0, gr.skip())

    class Refused(Exception):
        pass

    def call(fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except AnnotationError as exc:
            raise Refused(md_text(exc)) from None  # the store's messages quote task ids and names: shown as typed

    def edited_label(token: str, name: str) -> int:
        """The label id an ``edit:<id>`` token names, if it is one of the user's last RECENT_LABELS (what the page
        offers; the server enforces it, whatever a client sends)."""
        m = EDIT_TOKEN.fullmatch(token)
        if m is None:
            raise Refused("Unknown task token; reload the page.")
        label_id = int(m.group(1))
        if label_id not in {r.label_id for r in store.recent_labels(name, RECENT_LABELS, round=round)}:
            raise Refused(f"Only your last {RECENT_LABELS} labels can be changed here; label #{label_id} is not one of them.")
        return label_id

    def limited(text: str | None, limit: int, what: str) -> str | None:
        if text is not None and len(text) > limit:
            raise Refused(f"The {what} is {len(text)} characters long; the limit is {limit}. Shorten it and try again.")
        return text

    def inline(handler: Any) -> Any:
        """Run an annotator action; a refusal (bad input, the store says no) becomes an inline message."""
        @functools.wraps(handler)
        def run(*args: Any) -> tuple:
            try:
                return handler(*args)
            except Refused as exc:
                return refused(str(exc))
        return run

    def on_load(request: gr.Request) -> tuple:
        name = user_of(request)
        info = store.user(name)
        if info and info.is_admin:  # an admin who only looks at progress must not hold a task for the lease's 30 minutes
            return (*task_outputs(name, None, "Admins get a task only when they ask: press **Get a task** to label."),
                    gr.Tab(visible=True))
        try:
            task = call(store.next_task, name, round=round, hold=page_hold)
        except Refused as exc:
            return (*refused(str(exc)), gr.Tab(visible=False))
        return (*task_outputs(name, task, ""), gr.Tab(visible=False))

    @inline
    def on_next(request: gr.Request) -> tuple:
        """The task to label now (the one already held, or a new lease)."""
        name = user_of(request)
        task = call(store.next_task, name, round=round, hold=page_hold)
        return task_outputs(name, task, "" if task else "No task for you right now.")

    def on_renew(token: str, request: gr.Request) -> tuple:
        """The open page's heartbeat: keep holding its task. If the hold lapsed (the computer slept), take the
        task again when it is still free (a new token, the form untouched), else show the next one."""
        nothing = tuple([gr.skip()] * N_OUTS)
        if not token or token.startswith(EDIT_PREFIX) or page_hold is None:
            return nothing
        name = user_of(request)
        try:
            if store.renew(token, name, page_hold):
                return nothing
            was = store.task_for(token, name)
            if was.round in store.closed_rounds():
                return nothing  # a submit will say so
            task = store.next_task(name, round=round, hold=page_hold)
        except AnnotationError:
            return nothing
        if task is not None and task.uid == was.uid and task.round == was.round:
            if task.swapped == was.swapped:  # the same task, shown the same way: only its token changes
                return (*[gr.skip()] * 3, task.token, *[gr.skip()] * (N_OUTS - 4))
            return task_outputs(name, task, "⚠️ Your hold on this task lapsed while the page was idle; it is yours "
                                            "again, with A and B drawn anew: please check your choices.")
        return task_outputs(name, task, "⚠️ Your hold on that task lapsed while the page was idle and it went to "
                                        "someone else; here is the next one.")

    @inline
    def on_submit(token: str, choice: str | None, strength: str | None, safe_a: str | None, safe_b: str | None,
                  both_bad: bool, comment: str, request: gr.Request) -> tuple:
        name = user_of(request)
        if not token:
            raise Refused("No task is open; reload the page.")
        missing = [what for what, v in (("which response is better", choice), ("how much better", strength),
                                        ("safety of response A", safe_a), ("safety of response B", safe_b)) if not v]
        if missing:
            raise Refused("Please choose " + ", ".join(missing) + ".")
        if choice not in CHOICES or strength not in [v for _, v in STRENGTHS] or {safe_a, safe_b} - {"safe", "unsafe"}:
            raise Refused("Unknown choice.")
        comment = limited(comment, max_comment_chars, "comment")
        editing = token.startswith(EDIT_PREFIX)
        if editing:
            label_id = edited_label(token, name)
            task, _ = call(store.label_task, name, label_id)
        else:
            task = call(store.task_for, token, name)
        true_safe_a, true_safe_b = task.true_safety(safe_a == "safe", safe_b == "safe")
        judgement = Judgement(chosen=task.true_choice("left" if choice == "A" else "right"),
                              strength=strength, safe_a=true_safe_a,
                              safe_b=true_safe_b, both_bad=bool(both_bad), comment=comment or None)
        if editing:
            call(store.change_label, name, label_id, judgement)
            nxt = call(store.next_task, name, round=round, hold=page_hold)
            return task_outputs(name, nxt, f"Changed your label #{label_id}.")
        result = call(store.submit, token, name, judgement)  # committed (fsynced) before the page moves on
        nxt = call(store.next_task, name, round=round, hold=page_hold)
        done = (f"Saved label #{result.label_id}." if not result.duplicate
                else f"Already saved as label #{result.label_id} (submitted twice).")
        return task_outputs(name, nxt, done)

    @inline
    def on_skip(token: str, reason: str | None, request: gr.Request) -> tuple:
        name = user_of(request)
        if not token:
            raise Refused("No task is open; reload the page.")
        if token.startswith(EDIT_PREFIX):
            raise Refused("You are changing an earlier label: Submit the change, or reload the page to leave it as it was.")
        if not reason or not reason.strip():
            raise Refused("Please give a reason for skipping.")
        limited(reason, max_reason_chars, "skip reason")
        call(store.skip, token, name, reason)
        nxt = call(store.next_task, name, round=round, hold=page_hold)
        return task_outputs(name, nxt, "Skipped.")

    @inline
    def on_undo(armed: float | None, request: gr.Request) -> tuple:
        """Undo takes two clicks (or two presses of u) within UNDO_CONFIRM_SECONDS: the first only asks."""
        name = user_of(request)
        if not armed or time.time() - armed > UNDO_CONFIRM_SECONDS:
            return (*[gr.skip()] * STATUS_AT,
                    f"Undo deletes your last label and gives its task back. Click **{UNDO_CONFIRM}** (or press u) "
                    f"within {UNDO_CONFIRM_SECONDS} s to undo; anything else keeps it.",
                    gr.skip(), gr.skip(), gr.Button(value=UNDO_CONFIRM), time.time(), gr.skip())
        task = call(store.undo_last, name, round=round)
        if task is None:
            raise Refused("Nothing to undo.")
        return task_outputs(name, task, f"Undid your last label (task {md_text(task.uid)}); label it again.")

    @inline
    def on_change_label(picked_label: str | None, request: gr.Request) -> tuple:
        """Show one of the annotator's recent labels in the form (same left/right order as when it was made)."""
        name = user_of(request)
        if not picked_label:
            raise Refused("Pick one of your recent labels first.")
        task, j = call(store.label_task, name, edited_label(f"{EDIT_PREFIX}{picked_label}", name))
        if task.round in store.closed_rounds():
            raise Refused(f"Round {task.round} is closed: label #{picked_label} can no longer change.")
        safe_left, safe_right = task.true_safety(j.safe_a, j.safe_b)  # the swap is its own inverse

        def shown(v: bool | None) -> str | None:
            return None if v is None else "safe" if v else "unsafe"

        out = list(task_outputs(name, task, f"Changing your label #{picked_label} (task {md_text(task.uid)}): change what you "
                                            "want, then Submit. Reload the page to leave it as it was."))
        out[3:10] = [f"{EDIT_PREFIX}{picked_label}", "A" if j.chosen == task.true_choice("left") else "B", j.strength,
                     shown(safe_left), shown(safe_right), bool(j.both_bad), j.comment or ""]
        return tuple(out)

    def picked(selected: str | None) -> int | None:
        if round is not None:
            return round
        if selected in (None, "", "all"):
            return None
        try:
            return int(selected)
        except ValueError:
            raise gr.Error(f"Unknown round {selected!r}.") from None

    def on_admin_stats(selected: str | None, request: gr.Request) -> tuple:
        admin_of(request)
        rounds = store.rounds()
        r = picked(selected)
        choices = ["all"] + [str(x) for x in rounds]
        return stats_markdown(store.stats(r)), gr.Dropdown(choices=choices, value="all" if r is None else str(r))

    def on_export(selected: str | None, policy: str, request: gr.Request) -> tuple:
        name = admin_of(request)
        r = picked(selected)
        if r is None:
            raise gr.Error("Pick a round to export.")
        res = call(store.export, r, out_dir=export_dir, policy=policy, by=name)
        msg = (f"Wrote **{res.records}** comparisons (round {res.round}, version {res.version}, policy {res.policy}) to "
               f"`{res.path}`; {res.ties_dropped} ties dropped.")
        # The export folder is never served (anyone logged in could fetch it by path): the admin's download is
        # a copy that gradio moves into its cache under a content-hash URL only this response names.
        for old in downloads.iterdir():  # gradio has moved the earlier copy into its cache (cleared hourly)
            old.unlink(missing_ok=True)
        copy = downloads / Path(res.path).name
        shutil.copyfile(res.path, copy)
        return msg, str(copy)

    with gr.Blocks(title="align · annotation", delete_cache=(3600, 3600)) as demo:
        header = gr.Markdown(elem_id="progress")
        with gr.Accordion("Guidelines", open=False, elem_id="guidelines"):
            gr.Markdown(guidelines or "_No guidelines were given for this round._")
        with gr.Tabs():
            with gr.Tab("Annotate", id="annotate"):
                context = gr.HTML(elem_id="context", js_on_load=None)
                with gr.Row(equal_height=True):
                    with gr.Column():
                        left = gr.HTML(elem_id="left", js_on_load=None)
                        safe_a = gr.Radio(SAFETY, label="Response A is", elem_id="safe-a")
                    with gr.Column():
                        right = gr.HTML(elem_id="right", js_on_load=None)
                        safe_b = gr.Radio(SAFETY, label="Response B is", elem_id="safe-b")
                token = gr.Textbox(visible=False, elem_id="lease-token")
                with gr.Row(elem_id="controls", equal_height=True):  # sticks to the bottom of the window: always on screen
                    choice = gr.Radio(CHOICES, label="Which response is better?", elem_id="choice", scale=2, min_width=150)
                    strength = gr.Radio(STRENGTHS, label="How much better?", elem_id="strength", scale=5, min_width=300)
                    with gr.Column(scale=2, min_width=150):
                        submit = gr.Button("Submit", variant="primary", elem_id="submit-btn")
                        undo = gr.Button(UNDO_LABEL, elem_id="undo-btn", size="sm")
                with gr.Row():
                    both_bad = gr.Checkbox(label="Both responses are bad", elem_id="both-bad")
                    comment = gr.Textbox(label="Comment (optional)", lines=1, elem_id="comment")
                with gr.Row():
                    reason = gr.Dropdown(SKIP_REASONS, value=None, label="Skip reason",
                                         allow_custom_value=True, elem_id="skip-reason")
                    skip = gr.Button("Skip this task", elem_id="skip-btn")
                    next_btn = gr.Button("Get a task", elem_id="next-btn", size="sm")
                status = gr.Markdown(elem_id="status")
                gr.HTML(f"<div class='keys'>{KEYS_HELP}</div>", js_on_load=None)
                with gr.Accordion("My recent labels", open=False, elem_id="recent"):
                    with gr.Row():
                        recent = gr.Dropdown([], value=None, label="Your last 10 labels (newest first)",
                                             elem_id="recent-pick", scale=4)
                        change = gr.Button("Change this label", elem_id="change-btn", scale=1)
            with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                with gr.Row():
                    round_pick = gr.Dropdown(["all"], value="all", label="Round", elem_id="admin-round", allow_custom_value=True)
                    refresh = gr.Button("Refresh", elem_id="admin-refresh")
                stats_md = gr.Markdown(elem_id="admin-stats")
                with gr.Row():
                    policy = gr.Radio([("Majority vote per task", "majority"), ("Majority, even splits by strength", "weighted"),
                                       ("Every label", "all")], value="majority",
                                      label="Disagreements", elem_id="export-policy")
                    export_btn = gr.Button("Export comparisons", elem_id="export-btn")
                export_md = gr.Markdown(elem_id="export-status")
                export_file = gr.File(label="Export file", elem_id="export-file")

        undo_armed = gr.State(0.0)
        heartbeat = gr.Timer(value=max(1.0, (page_hold or 0) / 4), active=page_hold is not None)
        outs = [context, left, right, token, choice, strength, safe_a, safe_b, both_bad, comment, reason,
                header, status, submit, skip, undo, undo_armed, recent]
        assert len(outs) == N_OUTS and outs[STATUS_AT] is status
        demo.load(on_load, None, [*outs, admin_tab], api_name="load")
        submit.click(on_submit, [token, choice, strength, safe_a, safe_b, both_bad, comment], outs, api_name="submit")
        skip.click(on_skip, [token, reason], outs, api_name="skip")
        next_btn.click(on_next, None, outs, api_name="next_task")
        heartbeat.tick(on_renew, [token], outs, api_name="renew", show_progress="hidden", queue=False)
        undo.click(on_undo, [undo_armed], outs, api_name="undo")
        change.click(on_change_label, [recent], outs, api_name="change_label")
        refresh.click(on_admin_stats, [round_pick], [stats_md, round_pick], api_name="admin_stats", api_visibility="undocumented")
        admin_tab.select(on_admin_stats, [round_pick], [stats_md, round_pick], api_name=False)
        export_btn.click(on_export, [round_pick, policy], [export_md, export_file], api_name="export",
                         api_visibility="undocumented")
    return demo


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




def launch(store: AnnotationStore, *, host: str = "127.0.0.1", port: int = 7860, guidelines: str = "", round: int | None = None,
           export_dir: str | Path | None = None, concurrency: int = 16, prevent_thread_lock: bool = False,
           security: Any = None, forwarded_allow_ips: str = "", page_hold: float | None = PAGE_HOLD_SECONDS) -> Any:
    """Serve the app with login against the store's users (sessions, login throttling, SameSite cookies and the
    origin check of :mod:`ui.security`, with ``security`` a :class:`ui.security.SecurityPolicy`). Blocks unless
    ``prevent_thread_lock``. ``forwarded_allow_ips``: comma-separated proxy addresses whose ``X-Forwarded-For``
    is believed (default none: the address is the TCP peer's)."""
    from ui.security import SecurityPolicy, middleware

    # X-Forwarded-For / -Proto are believed only from these proxies (uvicorn reads FORWARDED_ALLOW_IPS when gradio
    # builds its server; uvicorn's own default trusts 127.0.0.1, so any local process could pose as any address)
    os.environ["FORWARDED_ALLOW_IPS"] = forwarded_allow_ips
    policy = security or SecurityPolicy()
    policy.server_host = policy.server_host or host
    demo = build_app(store, guidelines=guidelines, round=round, export_dir=export_dir,
                     max_comment_chars=policy.max_comment_chars, max_reason_chars=policy.max_reason_chars, page_hold=page_hold)
    demo.queue(default_concurrency_limit=concurrency)
    guard, auth = middleware(store, policy, admin_endpoints=ADMIN_ENDPOINTS)
    demo.launch(server_name=host, server_port=port, auth=auth, auth_message="Log in with the account your admin created.",
                css=CSS, js=JS, footer_links=["settings"], prevent_thread_lock=prevent_thread_lock, quiet=False,
                max_file_size=policy.max_request_bytes,
                blocked_paths=[str(Path(export_dir or "runs/annotations/exports").resolve())],
                app_kwargs={"middleware": [guard]})
    return demo
