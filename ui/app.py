"""The annotation web app (Gradio 6). It only calls :class:`data.store.AnnotationStore`.

The page in four parts, top to bottom: ``layout`` (the components, by name in ``Page`` and ``AdminTab``), the
annotator's actions (``Annotator``), the admin's (``Admin``), and ``build_app`` wiring them to events. The label
form's controls are ``ui.form``; what the page shows as text (escaped) is ``ui.render``; security is ``ui.security``.

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
``/submit`` takes the task token and then the label form's controls in ``ui.form.FORM``'s order. A refused annotator
action returns its message in the status output (index ``STATUS_AT``, 12 with the six controls of the form; starting
with "⚠️") and leaves every other output unchanged.
"""

import atexit
import functools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr  # ui/__init__ turned gradio's analytics off first; ``align annotate stats`` reads ui.render, not this

from data.schemas import Strength
from data.store import AnnotationError, AnnotationStore, LeasedTask
from ui.admin import Admin, AdminTab
from ui.assets import CSS, JS, KEYS_HELP
from ui.form import FORM, KEYS, blank, judgement, problems, shown
from ui.render import md_text, render_conversation, render_response

UNDO_LABEL, UNDO_CONFIRM, UNDO_CONFIRM_SECONDS = "Undo last submission", "Confirm undo", 15
EDIT_PREFIX = "edit:"  # the form's token while an earlier label is being changed
EDIT_TOKEN = re.compile(r"edit:(\d{1,18})")
RECENT_LABELS = 10  # "My recent labels" offers (and the server lets change) this many of the annotator's newest labels
PAGE_HOLD_SECONDS = 180.0  # a task on a page that stops renewing (closed, asleep) returns to the queue after this
ADMIN_ENDPOINTS = ("/admin_stats", "/export")  # left out of the API description an annotator can read
CONTROLS = {c.key: c for c in FORM}
SKIP_REASONS = ["I lack the expertise for this topic", "The prompt is unclear or broken", "A response is unreadable or truncated",
                "Offensive content I prefer not to judge", "Other"]
DEFAULT_GUIDELINES = Path(__file__).resolve().parents[1] / "configs" / "guidelines.md"

# ---------------------------------------------------------------------------------------------
# the page: its components by name


@dataclass
class Page:
    """The annotator's tab. ``outputs`` is what every annotator action returns, in the API's output order: the
    conversation, the two responses, the task token, the label form (``ui.form.FORM``'s order), the skip reason,
    the progress header, the status line, the Submit/Skip/Undo buttons, the undo confirmation's clock and the
    recent-labels list. An action returns a dict of the components it changes; the others stay as they are."""

    context: Any
    left: Any
    right: Any
    token: Any
    form: dict[str, Any]
    reason: Any
    header: Any
    status: Any
    submit: Any
    skip: Any
    undo: Any
    undo_armed: Any
    recent: Any
    next_btn: Any
    change: Any

    @property
    def outputs(self) -> list[Any]:
        return [self.context, self.left, self.right, self.token, *self.form.values(), self.reason, self.header, self.status,
                self.submit, self.skip, self.undo, self.undo_armed, self.recent]


STATUS_AT = 6 + len(FORM)  # where the status line is in every annotator action's outputs (12 with the six controls)


def layout(guidelines: str) -> tuple[Page, AdminTab]:
    """The components, top to bottom, inside the current ``gr.Blocks``. Each label control is made by its
    ``ui.form.Control``; one the layout does not place by name goes in the row of "both bad" and the comment."""
    form: dict[str, Any] = {}

    def put(key: str) -> Any:
        form[key] = CONTROLS[key].component()
        return form[key]

    header = gr.Markdown(elem_id="progress")
    with gr.Accordion("Guidelines", open=False, elem_id="guidelines"):
        gr.Markdown(guidelines or "_No guidelines were given for this round._")
    with gr.Tabs():
        with gr.Tab("Annotate", id="annotate"):
            context = gr.HTML(elem_id="context", js_on_load=None)
            with gr.Row(equal_height=True):
                with gr.Column():
                    left = gr.HTML(elem_id="left", js_on_load=None)
                    put("safe_a")
                with gr.Column():
                    right = gr.HTML(elem_id="right", js_on_load=None)
                    put("safe_b")
            token = gr.Textbox(visible=False, elem_id="lease-token")
            with gr.Row(elem_id="controls", equal_height=True):  # sticks to the bottom of the window: always on screen
                put("choice")
                put("strength")
                with gr.Column(scale=2, min_width=150):
                    submit = gr.Button("Submit", variant="primary", elem_id="submit-btn")
                    undo = gr.Button(UNDO_LABEL, elem_id="undo-btn", size="sm")
            with gr.Row():
                for key in KEYS:
                    if key not in form:
                        put(key)
            with gr.Row():
                reason = gr.Dropdown(SKIP_REASONS, value=None, label="Skip reason", allow_custom_value=True,
                                     elem_id="skip-reason")
                skip = gr.Button("Skip this task", elem_id="skip-btn")
                next_btn = gr.Button("Get a task", elem_id="next-btn", size="sm")
            status = gr.Markdown(elem_id="status")
            gr.HTML(f"<div class='keys'>{KEYS_HELP}</div>", js_on_load=None)
            with gr.Accordion("My recent labels", open=False, elem_id="recent"):
                with gr.Row():
                    recent = gr.Dropdown([], value=None, label=f"Your last {RECENT_LABELS} labels (newest first)",
                                         elem_id="recent-pick", scale=4)
                    change = gr.Button("Change this label", elem_id="change-btn", scale=1)
        with gr.Tab("Admin", id="admin", visible=False) as tab:
            with gr.Row():
                round_pick = gr.Dropdown(["all"], value="all", label="Round", elem_id="admin-round", allow_custom_value=True)
                refresh = gr.Button("Refresh", elem_id="admin-refresh")
            stats = gr.Markdown(elem_id="admin-stats")
            with gr.Row():
                policy = gr.Radio([("Majority vote per task", "majority"), ("Majority, even splits by strength", "weighted"),
                                   ("Every label", "all")], value="majority", label="Disagreements", elem_id="export-policy")
                export_btn = gr.Button("Export comparisons", elem_id="export-btn")
            export_status = gr.Markdown(elem_id="export-status")
            export_file = gr.File(label="Export file", elem_id="export-file")
    page = Page(context, left, right, token, {key: form[key] for key in KEYS}, reason, header, status, submit, skip, undo,
                gr.State(0.0), recent, next_btn, change)
    return page, AdminTab(tab, round_pick, refresh, stats, policy, export_btn, export_status, export_file)


# ---------------------------------------------------------------------------------------------
# the annotator's actions


class Refused(Exception):
    """An annotator action the server turns down: shown as one inline message, the form left as it was."""


@dataclass
class Annotator:
    """The annotator's actions on ``page``. Each returns {component: new value} (``Page``); a refusal (bad input,
    the store says no) is one inline message in the status line (raising gr.Error would cover every output with an
    error overlay and block the form)."""

    store: AnnotationStore
    page: Page
    round: int | None = None
    page_hold: float | None = PAGE_HOLD_SECONDS
    max_comment_chars: int = 5000
    max_reason_chars: int = 500

    # -- what the page shows

    def progress(self, name: str) -> str:
        p = self.store.progress(name, round=self.round, max_age=2.0)  # the round's total may lag by 2 s; own counts are exact
        scope = f"round {self.round}" if self.round is not None else "all rounds"
        return (f"**{md_text(name)}** · done today: **{p.done_today}** · remaining in {scope}: **{p.missing}** labels "
                f"({p.available} {'task' if p.available == 1 else 'tasks'} open to you)")

    def recent_choices(self, name: str) -> list[tuple[str, str]]:
        out = []
        for r in self.store.recent_labels(name, RECENT_LABELS, round=self.round):
            prompt = " ".join(r.prompt.split())
            prompt = prompt if len(prompt) <= 48 else prompt[:47] + "…"
            strength = Strength(r.strength).label if r.strength else "-"
            closed = "" if r.changeable else " · round closed"
            out.append((f"#{r.label_id} · {r.created_at:%H:%M} · {prompt} · {strength}{closed}", str(r.label_id)))
        return out

    def show(self, name: str, task: LeasedTask | None, status: str, form: dict[str, Any] | None = None) -> dict:
        """The whole tab: ``task`` (or nothing left), the form (empty unless given), progress and ``status``."""
        p, live = self.page, task is not None
        return {p.context: render_conversation(task), p.left: render_response(task, "left"),
                p.right: render_response(task, "right"), p.token: task.token if task else "",
                **{p.form[k]: v for k, v in (form or blank()).items()}, p.reason: None, p.header: self.progress(name),
                p.status: status, p.submit: gr.Button(interactive=live), p.skip: gr.Button(interactive=live),
                p.undo: gr.Button(value=UNDO_LABEL), p.undo_armed: 0.0,
                p.recent: gr.Dropdown(choices=self.recent_choices(name), value=None)}

    def refused(self, message: str) -> dict:
        return {self.page.status: f"⚠️ {message}", self.page.undo: gr.Button(value=UNDO_LABEL), self.page.undo_armed: 0.0}

    # -- checks

    @staticmethod
    def user(request: gr.Request) -> str:
        name = getattr(request, "username", None)
        if not name:
            raise gr.Error("Not logged in.")
        return name

    def call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except AnnotationError as exc:
            raise Refused(md_text(exc)) from None  # the store's messages quote task ids and names: shown as typed

    def next_task(self, name: str) -> LeasedTask | None:
        return self.call(self.store.next_task, name, round=self.round, hold=self.page_hold)

    def edited_label(self, token: str, name: str) -> int:
        """The label id an ``edit:<id>`` token names, if it is one of the user's last RECENT_LABELS (what the page
        offers; the server enforces it, whatever a client sends)."""
        m = EDIT_TOKEN.fullmatch(token)
        if m is None:
            raise Refused("Unknown task token; reload the page.")
        label_id = int(m.group(1))
        if label_id not in {r.label_id for r in self.store.recent_labels(name, RECENT_LABELS, round=self.round)}:
            raise Refused(f"Only your last {RECENT_LABELS} labels can be changed here; label #{label_id} is not one of them.")
        return label_id

    @staticmethod
    def limited(text: str | None, limit: int, what: str) -> str | None:
        if text is not None and len(text) > limit:
            raise Refused(f"The {what} is {len(text)} characters long; the limit is {limit}. Shorten it and try again.")
        return text

    # -- actions (wired in build_app; gradio passes the request first)

    def on_load(self, request: gr.Request) -> dict:
        name = self.user(request)
        info = self.store.user(name)
        if info and info.is_admin:  # an admin who only looks at progress must not hold a task for the lease's 30 minutes
            return self.show(name, None, "Admins get a task only when they ask: press **Get a task** to label.")
        try:
            return self.show(name, self.next_task(name), "")
        except Refused as exc:
            return self.refused(str(exc))

    def on_next(self, request: gr.Request) -> dict:
        """The task to label now (the one already held, or a new lease)."""
        name = self.user(request)
        task = self.next_task(name)
        return self.show(name, task, "" if task else "No task for you right now.")

    def on_renew(self, request: gr.Request, token: str) -> dict:
        """The open page's heartbeat: keep holding its task. If the hold lapsed (the computer slept), take the
        task again when it is still free (a new token, the form untouched), else show the next one."""
        if not token or token.startswith(EDIT_PREFIX) or self.page_hold is None:
            return gr.skip()
        name = self.user(request)
        try:
            if self.store.renew(token, name, self.page_hold):
                return gr.skip()
            was = self.store.task_for(token, name)
            if was.round in self.store.closed_rounds():
                return gr.skip()  # a submit will say so
            task = self.store.next_task(name, round=self.round, hold=self.page_hold)
        except AnnotationError:
            return gr.skip()
        if task is not None and task.uid == was.uid and task.round == was.round:
            if task.swapped == was.swapped:  # the same task, shown the same way: only its token changes
                return {self.page.token: task.token}
            return self.show(name, task, "⚠️ Your hold on this task lapsed while the page was idle; it is yours again, with "
                                         "A and B drawn anew: please check your choices.")
        return self.show(name, task, "⚠️ Your hold on that task lapsed while the page was idle and it went to someone "
                                     "else; here is the next one.")

    def on_submit(self, request: gr.Request, token: str, *values: Any) -> dict:
        """``values``: the form's controls in ``ui.form.FORM``'s order."""
        name = self.user(request)
        if not token:
            raise Refused("No task is open; reload the page.")
        form = dict(zip(KEYS, values, strict=True))
        problem = problems(form)
        if problem:
            raise Refused(problem)
        self.limited(form.get("comment"), self.max_comment_chars, "comment")
        if token.startswith(EDIT_PREFIX):
            label_id = self.edited_label(token, name)
            task, _ = self.call(self.store.label_task, name, label_id)
            self.call(self.store.change_label, name, label_id, judgement(form, task))
            return self.show(name, self.next_task(name), f"Changed your label #{label_id}.")
        task = self.call(self.store.task_for, token, name)
        result = self.call(self.store.submit, token, name, judgement(form, task))  # committed (fsynced) before moving on
        done = (f"Saved label #{result.label_id}." if not result.duplicate
                else f"Already saved as label #{result.label_id} (submitted twice).")
        return self.show(name, self.next_task(name), done)

    def on_skip(self, request: gr.Request, token: str, reason: str | None) -> dict:
        name = self.user(request)
        if not token:
            raise Refused("No task is open; reload the page.")
        if token.startswith(EDIT_PREFIX):
            raise Refused("You are changing an earlier label: Submit the change, or reload the page to leave it as it was.")
        if not reason or not reason.strip():
            raise Refused("Please give a reason for skipping.")
        self.limited(reason, self.max_reason_chars, "skip reason")
        self.call(self.store.skip, token, name, reason)
        return self.show(name, self.next_task(name), "Skipped.")

    def on_undo(self, request: gr.Request, armed: float | None) -> dict:
        """Undo takes two clicks (or two presses of u) within UNDO_CONFIRM_SECONDS: the first only asks."""
        name = self.user(request)
        if not armed or time.time() - armed > UNDO_CONFIRM_SECONDS:
            return {self.page.status: f"Undo deletes your last label and gives its task back. Click **{UNDO_CONFIRM}** "
                                      f"(or press u) within {UNDO_CONFIRM_SECONDS} s to undo; anything else keeps it.",
                    self.page.undo: gr.Button(value=UNDO_CONFIRM), self.page.undo_armed: time.time()}
        task = self.call(self.store.undo_last, name, round=self.round)
        if task is None:
            raise Refused("Nothing to undo.")
        return self.show(name, task, f"Undid your last label (task {md_text(task.uid)}); label it again.")

    def on_change_label(self, request: gr.Request, picked_label: str | None) -> dict:
        """Show one of the annotator's recent labels in the form (same left/right order as when it was made)."""
        name = self.user(request)
        if not picked_label:
            raise Refused("Pick one of your recent labels first.")
        task, label = self.call(self.store.label_task, name, self.edited_label(f"{EDIT_PREFIX}{picked_label}", name))
        if task.round in self.store.closed_rounds():
            raise Refused(f"Round {task.round} is closed: label #{picked_label} can no longer change.")
        out = self.show(name, task, f"Changing your label #{picked_label} (task {md_text(task.uid)}): change what you want, "
                                    "then Submit. Reload the page to leave it as it was.", form=shown(label, task))
        return out | {self.page.token: f"{EDIT_PREFIX}{picked_label}"}


def inline(action: Any) -> Any:
    """An annotator action whose refusals become an inline message (``Annotator.refused``)."""
    owner = action.__self__

    @functools.wraps(action)
    def run(*args: Any) -> dict:
        try:
            return action(*args)
        except Refused as exc:
            return owner.refused(str(exc))
    return run


# ---------------------------------------------------------------------------------------------
# the app


def build_app(store: AnnotationStore, *, guidelines: str = "", round: int | None = None,
              export_dir: str | Path | None = None, max_comment_chars: int = 5000, max_reason_chars: int = 500,
              page_hold: float | None = PAGE_HOLD_SECONDS) -> Any:
    """The Blocks app; launch it with :func:`launch` (login, CSS and keyboard shortcuts are set there).
    A comment or a skip reason longer than ``max_comment_chars`` / ``max_reason_chars`` is refused.

    A task shown on a page is held for ``page_hold`` seconds, and the open page renews that every
    ``page_hold / 4`` s (``/renew``), up to the store's lease (``--lease-minutes``) after it was handed out:
    a page that was only opened, then closed, gives its task back within ``page_hold`` seconds.
    ``None``: the store's full lease, no renewal."""
    downloads = Path(tempfile.mkdtemp(prefix="align-export-"))
    atexit.register(shutil.rmtree, downloads, ignore_errors=True)
    with gr.Blocks(title="align · annotation", delete_cache=(3600, 3600)) as demo:
        page, tab = layout(guidelines)
        act = Annotator(store, page, round=round, page_hold=page_hold, max_comment_chars=max_comment_chars,
                        max_reason_chars=max_reason_chars)
        admin = Admin(store, tab, round, Path(export_dir) if export_dir else Path("runs/annotations/exports"), downloads)
        heartbeat = gr.Timer(value=max(1.0, (page_hold or 0) / 4), active=page_hold is not None)
        outs = page.outputs

        def on_load(request: gr.Request) -> dict:  # the admin tab shows for admins only
            info = store.user(Annotator.user(request))
            return act.on_load(request) | {tab.tab: gr.Tab(visible=bool(info and info.is_admin))}

        demo.load(on_load, None, [*outs, tab.tab], api_name="load")
        page.submit.click(inline(act.on_submit), [page.token, *page.form.values()], outs, api_name="submit")
        page.skip.click(inline(act.on_skip), [page.token, page.reason], outs, api_name="skip")
        page.next_btn.click(inline(act.on_next), None, outs, api_name="next_task")
        heartbeat.tick(act.on_renew, [page.token], outs, api_name="renew", show_progress="hidden", queue=False)
        page.undo.click(inline(act.on_undo), [page.undo_armed], outs, api_name="undo")
        page.change.click(inline(act.on_change_label), [page.recent], outs, api_name="change_label")
        tab.refresh.click(admin.on_stats, [tab.round_pick], [tab.stats, tab.round_pick], api_name="admin_stats",
                          api_visibility="undocumented")
        tab.tab.select(admin.on_stats, [tab.round_pick], [tab.stats, tab.round_pick], api_name=False)
        tab.export_btn.click(admin.on_export, [tab.round_pick, tab.policy], [tab.export_status, tab.export_file],
                             api_name="export", api_visibility="undocumented")
    return demo


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
